//! Verified seeding: a replica copied by other means is checked region by region and only the differing regions travel.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// The splitter's state of one volume, from `cdp status --json`.
fn splitter_volume(site: &Site, vol: &str) -> serde_json::Value {
    let status = site.status();
    status["splitter"]["volumes"]
        .as_array()
        .and_then(|vols| vols.iter().find(|v| v["name"] == vol))
        .cloned()
        .unwrap_or_else(|| panic!("status has no splitter volume {vol}: {status}"))
}

/// Payload bytes the splitter's resyncs copied since it started (its status counter).
fn copied_bytes(site: &Site, vol: &str) -> u64 {
    splitter_volume(site, vol)["resync_copied_bytes"]
        .as_u64()
        .expect("resync_copied_bytes")
}

/// Overwrites `count` bytes at `offset` of a file with a pattern no production region holds.
fn alter(path: &Path, offset: u64, count: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&pattern(seed, count as usize), offset)
        .unwrap();
    f.sync_all().unwrap();
}

/// Punches a hole (reads back as zeroes, no data extent) into a file.
fn punch_hole(path: &Path, offset: u64, count: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            count as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    f.sync_all().unwrap();
}

/// Production full of seeded data, one MiB pattern per region.
fn fill_production(site: &Site, vol: &str, size: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&site.volume(vol).production)
        .unwrap();
    for i in 0..size / MIB {
        f.write_all_at(&pattern(0x5eed_0000 + i, MIB as usize), i * MIB)
            .unwrap();
    }
    f.sync_all().unwrap();
}

/// `cdp volume resync VOL --verify`, following it until the volume protects again.
fn resync_verify(site: &Site, vol: &str) -> String {
    let out = run_ok(
        std::process::Command::new(cdp_bin())
            .args(["volume", "resync", vol, "--verify", "--splitter-control"])
            .arg(site.splitter_control()),
        Duration::from_secs(300),
    );
    assert!(
        out.contains(&format!("verified resync of {vol} started")),
        "{out}"
    );
    assert!(out.contains(&format!("resync of {vol} complete")), "{out}");
    out
}

#[test]
fn seeded_replica_initializes_by_copying_only_differing_regions() {
    // Goal: first protection of a volume whose replica was seeded by copying the disk copies
    // only the regions that differ, while a host writes, and ends with replica == production.
    // Method: 512 MiB of seeded data in production; the replica is a copy of it with K 1 MiB
    // regions overwritten and one region punched to a hole. Start cdp; while the splitter
    // verifies, qemu-io writes 4 KiB blocks into altered regions (they stay different) and
    // into matching ones (the comparison must not be fooled into skipping or copying them).
    // The splitter's copy counter must be exactly (K + 1) MiB; then qemu-img compare.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let size = 512 * MIB;
    let mut site = Site::create(&[("vol0", size)], SiteOptions::default());
    fill_production(&site, "vol0", size);
    let v = site.volume("vol0").clone();
    std::fs::copy(&v.production, &v.replica).unwrap();
    let altered: Vec<u64> = vec![3, 17, 64, 100, 101, 200, 511];
    for (n, region) in altered.iter().enumerate() {
        // Part of a region is enough to make it differ; its other bytes still match.
        alter(
            &v.replica,
            region * MIB + 4096 * n as u64,
            8192,
            0xbad0 + n as u64,
        );
    }
    let hole_region = 130;
    punch_hole(&v.replica, hole_region * MIB, MIB);
    let differing = altered.len() as u64 + 1;

    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, batches, uri) = (
            Arc::clone(&stop),
            Arc::clone(&batches),
            site.nbd_uri("vol0"),
        );
        let altered = altered.clone();
        std::thread::spawn(move || {
            let mut rng = SplitMix64(seed("seeding-writer"));
            while !stop.load(Ordering::Relaxed) {
                let mut cmd = std::process::Command::new("qemu-io");
                cmd.args(["-f", "raw"]);
                for _ in 0..10 {
                    let region = if rng.below(2) == 0 {
                        altered[rng.below(altered.len() as u64) as usize]
                    } else {
                        rng.below(size / MIB)
                    };
                    // Never the whole region: a full overwrite would make an altered region
                    // equal again, and then skipping it would be right but uncountable.
                    let offset = region * MIB + rng.below(MIB / 4096 - 1) * 4096;
                    cmd.args([
                        "-c",
                        &format!("write -P 0x{:02x} {offset} 4096", 1 + rng.below(254)),
                    ]);
                }
                cmd.args(["-c", "flush"]).arg(&uri);
                run_ok(&mut cmd, Duration::from_secs(60));
                batches.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Let the writer run during the verification, then until the volume is protecting.
    let started = Instant::now();
    let mut batches_seen_initializing = 0;
    let mut batches_while_initializing = None;
    loop {
        let state = splitter_volume(&site, "vol0");
        if state["state"] == "initializing" {
            batches_seen_initializing = batches.load(Ordering::Relaxed);
            if let Some(resync) = state["resync"].as_object() {
                assert_eq!(resync["method"], "verify", "{state}");
            }
        }
        if state["state"] == "protecting" && batches_while_initializing.is_none() {
            batches_while_initializing = Some(batches.load(Ordering::Relaxed));
        }
        if state["state"] == "protecting" && batches.load(Ordering::Relaxed) >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "not protecting after 300 s: {state}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    site.settle();
    let copied = copied_bytes(&site, "vol0");
    let log = std::fs::read_to_string(site.log_path(Role::Splitter)).unwrap();
    eprintln!(
        "seeded init: {} writer batches ({batches_while_initializing:?} done before protecting), \
         {batches_seen_initializing} seen while initializing, copied {copied} bytes for {differing} differing MiB \
         regions of {} ({:.1} s)\n{}",
        batches.load(Ordering::Relaxed),
        size / MIB,
        started.elapsed().as_secs_f64(),
        log.lines()
            .filter(|l| l.contains("resync") || l.contains("verif"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(log.contains("method=verify"), "{log}");
    // NBD is served only once the link is up, and the verification starts then: a batch seen
    // finished while the volume still initialized wrote during the verification.
    assert!(
        batches_seen_initializing > 0,
        "the writer never overlapped the verification"
    );
    assert_eq!(
        copied,
        differing * MIB,
        "verified initialization must copy exactly the differing regions\n{log}"
    );
    site.assert_replica_equals_production("vol0");
}

#[test]
fn volume_resync_verify_copies_nothing_in_sync_and_only_altered_regions_after() {
    // Goal: `cdp volume resync VOL --verify` on a protected, in-sync volume copies nothing and
    // ends protecting; after replica regions were changed behind cdp's back it copies exactly
    // those regions and the replica equals production again. Method: write 48 MiB through NBD
    // into a 64 MiB volume (the rest stays a hole); settle; overwrite 16 MiB and at once run
    // --verify (the replica trails the journal) and check the copy counter is unchanged. Stop the appliance, alter 3 replica regions and punch a hole into
    // a fourth that holds data in production, restart it, run --verify again: the counter
    // grows by exactly 4 MiB; qemu-img compare.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 64 * MIB)]);
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..48u64 {
        cmd.args([
            "-c",
            &format!("write -P 0x{:02x} {} 1M", 1 + i, (8 + i) * MIB),
        ]);
    }
    run_ok(
        cmd.args(["-c", "flush"]).arg(site.nbd_uri("vol0")),
        Duration::from_secs(120),
    );
    site.settle();
    site.assert_replica_equals_production("vol0");

    // Fresh writes, journaled but likely not yet distributed when the verify starts: the
    // appliance must wait for distribution, or they would look like differences.
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..16u64 {
        cmd.args([
            "-c",
            &format!("write -P 0x{:02x} {} 1M", 0x80 + i, (20 + i) * MIB),
        ]);
    }
    run_ok(cmd.arg(site.nbd_uri("vol0")), Duration::from_secs(120));
    let before = copied_bytes(&site, "vol0");
    let out = resync_verify(&site, "vol0");
    site.settle();
    let in_sync_copied = copied_bytes(&site, "vol0") - before;
    eprintln!("verify of an in-sync volume copied {in_sync_copied} bytes: {out}");
    assert_eq!(in_sync_copied, 0, "{}", site.logs());
    assert_eq!(splitter_volume(&site, "vol0")["state"], "protecting");

    site.terminate(Role::Appliance, Duration::from_secs(60));
    let replica = site.volume("vol0").replica.clone();
    for (n, region) in [9u64, 30, 55].iter().enumerate() {
        alter(
            &replica,
            region * MIB + 65536 * n as u64,
            4096,
            0xdead + n as u64,
        );
    }
    punch_hole(&replica, 40 * MIB, MIB);
    site.start_role(Role::Appliance);
    site.wait_connected(DISTRIBUTED_DEADLINE);
    let before = copied_bytes(&site, "vol0");
    resync_verify(&site, "vol0");
    site.settle();
    let repaired = copied_bytes(&site, "vol0") - before;
    eprintln!("verify after altering 4 replica regions copied {repaired} bytes");
    assert_eq!(repaired, 4 * MIB, "{}", site.logs());
    site.assert_replica_equals_production("vol0");
}

#[test]
fn appliance_killed_during_verification_verifies_again_and_copies_only_the_differences() {
    // Goal: a link loss in the middle of a verifying initialization loses nothing and wastes
    // nothing: the next connection verifies the regions still pending, only the altered
    // regions are copied, and the replica ends equal to production. Method: 1 GiB seeded
    // replica with 5 altered regions; start; as soon as the splitter's control socket shows
    // some but under half of the bytes compared, SIGKILL the appliance, restart it, settle,
    // count the copied bytes and compare the copies.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let size = 1024 * MIB;
    let mut site = Site::create(&[("vol0", size)], SiteOptions::default());
    fill_production(&site, "vol0", size);
    let v = site.volume("vol0").clone();
    std::fs::copy(&v.production, &v.replica).unwrap();
    let altered = [1u64, 300, 600, 900, 1023];
    for (n, region) in altered.iter().enumerate() {
        alter(
            &v.replica,
            region * MIB + 512 * 1024,
            4096,
            0xc0de + n as u64,
        );
    }
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let deadline = Instant::now() + Duration::from_secs(120);
    let verified_at_kill = loop {
        let status = control_request(
            &site.splitter_control(),
            &serde_json::json!({"command": "status"}),
        );
        let verified = status["volumes"][0]["resync"]["verified_bytes"]
            .as_u64()
            .unwrap_or(0);
        if verified > 0 {
            site.kill(Role::Appliance);
            break verified;
        }
        assert!(
            Instant::now() < deadline,
            "verification never started: {status}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    site.start_role(Role::Appliance);
    site.settle();
    let copied = copied_bytes(&site, "vol0");
    let log = std::fs::read_to_string(site.log_path(Role::Splitter)).unwrap();
    eprintln!(
        "killed the appliance after {verified_at_kill} of {size} bytes compared; copied {copied} bytes"
    );
    site.assert_replica_equals_production("vol0");
    if verified_at_kill < size / 2 {
        // The copy phase starts only after every region was compared, so nothing was sent
        // before the kill and exactly the altered regions are sent after it.
        let verifying_starts: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("resync started") && l.contains("method=verify"))
            .collect();
        assert_eq!(verifying_starts.len(), 2, "{log}");
        // The second pass starts with fewer regions: those found equal before the kill
        // were settled and are not compared again.
        assert!(
            !verifying_starts[1].contains(&format!("regions={}", size / (64 * 1024))),
            "{log}"
        );
        assert_eq!(copied, altered.len() as u64 * MIB, "{log}");
    }
}
