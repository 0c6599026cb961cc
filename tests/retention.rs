//! Journal retention end to end: writes far past a group's journal capacity through NBD, then
//! checks the journal's disk usage, the advanced first_seq, the replica against production, a
//! crash-restart of the appliance (recovery from a journal whose first segments are gone, and a
//! splitter resuming a volume whose last change was released), and the time window.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SEGMENT: u64 = MIB;
const CAPACITY: u64 = 4 * MIB;

/// A site whose group has 1 MiB segments and the given retention settings, not yet started.
/// Compression is off: qemu-io's patterns would compress to almost nothing, and these tests
/// need the journal to grow by what the host writes.
fn site(volumes: &[(&str, u64)], group_settings: &str) -> Site {
    let site = Site::create(volumes, SiteOptions::default());
    site.add_appliance_settings(
        &format!("journal_segment_bytes = {SEGMENT}\n"),
        &format!("journal_compress = false\n{group_settings}"),
    );
    site
}

fn journal_dir(site: &Site) -> PathBuf {
    site.root().join("appliance/groups/default/journal/journal")
}

/// Sum of the segment files' sizes on disk. The appliance may release a segment between
/// listing and measuring it; a file gone by then no longer counts.
fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes `rounds` rounds of 256 KiB patterned writes at pseudo-random 4 KiB-aligned offsets,
/// one qemu-io process per round, into `vol` and the model.
fn write_rounds(site: &Site, vol: &str, model: &mut Model, rng: &mut SplitMix64, rounds: u32) {
    let size = site.volume(vol).size;
    for _ in 0..rounds {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for _ in 0..16 {
            let len = 256 * 1024;
            let offset = rng.below((size - len) / 4096) * 4096;
            let byte = (rng.below(255) + 1) as u8;
            cmd.arg("-c")
                .arg(format!("write -P {byte:#x} {offset} {len}"));
            model.fill(offset, len, byte);
        }
        cmd.arg(site.nbd_uri(vol));
        let out = run_ok(&mut cmd, Duration::from_secs(120));
        assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    }
}

fn group(status: &serde_json::Value) -> serde_json::Value {
    status["groups"][0].clone()
}

#[test]
fn capacity_releases_oldest_segments_and_recovers() {
    // Goal: a journal written ten times past its capacity stays within capacity plus one
    // segment once distribution catches up, releases only distributed history, and still
    // recovers (first segment index > 1) and resumes every volume's split link after a crash.
    // Oracle: the model of each production volume, the replica (qemu-img compare), the
    // journal's files on disk, and `cdp journal inspect`.
    if !requires("qemu-io") || !requires("qemu-img") || reference_mode() {
        return;
    }
    let mut site = site(
        &[("vol0", 32 * MIB), ("vol1", 8 * MIB)],
        &format!("journal_capacity_bytes = {CAPACITY}\n"),
    );
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let mut rng = SplitMix64(seed("retention"));
    let mut model0 = Model::zeroed(32 * MIB);
    let mut model1 = Model::zeroed(8 * MIB);

    // vol1's only changes go first, so retention releases all of them.
    write_rounds(&site, "vol1", &mut model1, &mut rng, 1);
    // 10 rounds of 4 MiB: ten times the capacity. After each, the point and what vol0 held.
    let mut points = Vec::new();
    for _ in 0..10 {
        write_rounds(&site, "vol0", &mut model0, &mut rng, 1);
        site.flush("vol0");
        let seq = group(&site.status())["last_seq"]
            .as_u64()
            .expect("last_seq");
        points.push((seq, model0.clone()));
    }
    site.settle();
    let dir = journal_dir(&site);
    // Retention runs after distribution checkpoints; give it the passes it needs.
    let within = poll_until(Duration::from_secs(30), || {
        segment_bytes(&dir) <= CAPACITY + SEGMENT
            && group(&site.status())["journal_over_capacity"] == false
    });
    let status = group(&site.status());
    assert!(
        within,
        "journal uses {} bytes on disk, capacity {CAPACITY}; status {status:#}",
        segment_bytes(&dir)
    );
    eprintln!("after 40 MiB of writes: {status:#}");
    assert_eq!(status["journal_capacity_bytes"], CAPACITY);
    assert_eq!(status["journal_over_capacity"], false);
    let first = status["first_seq"].as_u64().unwrap();
    let last = status["last_seq"].as_u64().unwrap();
    assert!(first > 16, "first_seq {first} did not pass vol1's records");
    assert!(status["journal_bytes"].as_u64().unwrap() <= CAPACITY + SEGMENT);
    assert!(site.logs().contains("journal segments released"));
    model0.check_file("vol0 production", &site.volume("vol0").production);
    model1.check_file("vol1 production", &site.volume("vol1").production);
    site.assert_all_replicas_equal_production();
    // Every point retention kept is still exact; the released ones are refused.
    let mut kept = 0;
    for (seq, want) in &points {
        let at = format!("seq:{seq}");
        if *seq < first {
            let refused = run(
                &mut site.cdp(&["image", "access", "--at", &at, "--json"]),
                Duration::from_secs(60),
            );
            assert!(
                !refused.status.success(),
                "released point seq {seq} was opened"
            );
            continue;
        }
        kept += 1;
        let image = site.cdp_json(&["image", "access", "--at", &at, "--json"]);
        for (vol, model) in [("vol0", want), ("vol1", &model1)] {
            let file = site.root().join(format!("point-{seq}-{vol}.img"));
            run_ok(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "raw"])
                    .arg(site.image_uri(&image, vol))
                    .arg(&file),
                Duration::from_secs(60),
            );
            model.check_file(&format!("image at seq {seq}, {vol}"), &file);
        }
        site.cdp_json(&[
            "image",
            "release",
            image["id"].as_str().expect("id"),
            "--json",
        ]);
    }
    // The undo stream shares the capacity, so about one 4 MiB round stays recoverable.
    assert!(kept >= 1, "none of the round points is still recoverable");

    // Crash the appliance: it recovers from the remaining segments, and the splitter resumes
    // both volumes, including vol1 whose last journaled change was released.
    site.restart_appliance();
    let status = group(&site.status());
    assert_eq!(status["first_seq"].as_u64().unwrap(), first);
    assert_eq!(status["last_seq"].as_u64().unwrap(), last);
    // Writes made before the splitter is back would be marked and resynced by region, which
    // journals a different number of records; wait so each write is journaled as itself.
    site.wait_connected(Duration::from_secs(30));
    write_rounds(&site, "vol1", &mut model1, &mut rng, 1);
    write_rounds(&site, "vol0", &mut model0, &mut rng, 2);
    site.settle();
    site.assert_alive();
    model0.check_file("vol0 production", &site.volume("vol0").production);
    model1.check_file("vol1 production", &site.volume("vol1").production);
    site.assert_all_replicas_equal_production();
    let status = group(&site.status());
    // 3 rounds of 16 writes, plus each volume's reconnect after the restart: a splitter that
    // was marking sends a (here empty) resync bracket, ResyncStart and ResyncEnd, so the
    // volume is not recoverable until it is journaled.
    let added = status["last_seq"].as_u64().unwrap() - last;
    assert!(
        added >= 3 * 16 && (added - 3 * 16).is_multiple_of(2) && added - 3 * 16 <= 2 * 2,
        "{added} records after the restart: {status:#}"
    );

    // Offline, the journal that is left is clean.
    site.terminate(Role::Splitter, Duration::from_secs(30));
    site.terminate(Role::Appliance, Duration::from_secs(60));
    let out = run(
        Command::new(cdp_bin())
            .args(["journal", "inspect"])
            .arg(site.root().join("appliance")),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("clean"), "{text}");
}

#[test]
fn time_window_releases_old_segments() {
    // Goal: with a 1 s window and a large capacity, segments older than the window are
    // released once distributed, and status shows the window and the oldest record's time.
    if !requires("qemu-io") || !requires("qemu-img") || reference_mode() {
        return;
    }
    let mut site = site(
        &[("vol0", 16 * MIB)],
        "journal_capacity_bytes = 1073741824\njournal_retention_s = 1\n",
    );
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let mut rng = SplitMix64(seed("retention-window"));
    let mut model = Model::zeroed(16 * MIB);
    write_rounds(&site, "vol0", &mut model, &mut rng, 3);
    site.settle();
    let before = group(&site.status());
    assert!(
        before["journal_segments"].as_u64().unwrap() > 1,
        "{before:#}"
    );
    let released = poll_until(Duration::from_secs(20), || {
        group(&site.status())["journal_segments"].as_u64() == Some(1)
    });
    let after = group(&site.status());
    assert!(released, "old segments were not released: {after:#}");
    assert_eq!(after["journal_retention_s"], 1);
    let oldest = after["first_timestamp_ns"]
        .as_u64()
        .expect("first_timestamp_ns");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(oldest <= now && now - oldest < 120_000_000_000, "{after:#}");
    assert!(after["first_seq"].as_u64() > before["first_seq"].as_u64());
    model.check_file("production", &site.volume("vol0").production);
    site.assert_all_replicas_equal_production();
    // The table shows the window too.
    let table = run_ok(
        Command::new(cdp_bin())
            .args(["status", "--control"])
            .arg(&site.control_sock),
        Duration::from_secs(30),
    );
    assert!(
        table.contains("retention window 1 s, oldest record 20"),
        "{table}"
    );
    site.assert_alive();
}

#[test]
fn over_capacity_is_reported_while_distribution_is_deferred() {
    // Goal: when distribution cannot keep up (here: deferred while the host keeps writing),
    // the journal grows past its capacity, the host is not stopped, status says
    // journal_over_capacity, a warning is logged, and everything returns to normal once
    // distribution catches up. Oracle: status, the logs, the model, qemu-img compare.
    if !requires("qemu-io") || !requires("qemu-img") || reference_mode() {
        return;
    }
    let mut site = site(
        &[("vol0", 32 * MIB)],
        &format!("journal_capacity_bytes = {}\n", 2 * SEGMENT),
    );
    // Distribution waits for a pause in host writes for up to an hour.
    let text = std::fs::read_to_string(&site.appliance_config).unwrap();
    std::fs::write(
        &site.appliance_config,
        format!("distribution_delay_max_s = 3600\n{text}"),
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let uri = site.nbd_uri("vol0");
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut model = Model::zeroed(32 * MIB);
            let mut rng = SplitMix64(seed("retention-over-capacity"));
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                let mut cmd = Command::new("qemu-io");
                cmd.args(["-f", "raw"]);
                for _ in 0..64 {
                    let len = 256 * 1024;
                    let offset = rng.below((32 * MIB - len) / 4096) * 4096;
                    let byte = (rng.below(255) + 1) as u8;
                    cmd.arg("-c")
                        .arg(format!("write -P {byte:#x} {offset} {len}"));
                    model.fill(offset, len, byte);
                }
                run_ok(cmd.arg(&uri), Duration::from_secs(120));
            }
            model
        })
    };
    let seen = poll_until(Duration::from_secs(30), || {
        group(&site.status())["journal_over_capacity"] == true
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let model = writer.join().unwrap();
    assert!(
        seen,
        "journal_over_capacity never showed: {:#}",
        site.status()
    );
    site.settle();
    let back = poll_until(Duration::from_secs(30), || {
        let g = group(&site.status());
        g["journal_over_capacity"] == false && g["journal_bytes"].as_u64().unwrap() <= 3 * SEGMENT
    });
    assert!(back, "journal did not shrink back: {:#}", site.status());
    let logs = site.logs();
    assert!(logs.contains("journal over capacity"), "no warning logged");
    assert!(logs.contains("journal back within capacity"));
    site.assert_alive();
    model.check_file("production", &site.volume("vol0").production);
    site.assert_replica_equals_production("vol0");
}

/// Starts qemu-io writing `rounds` x 256 KiB of pattern `byte` from offset 0 into vol0 in
/// the background (and into the model).
fn spawn_writes(site: &Site, model: &mut Model, byte: u8, rounds: u64) -> std::process::Child {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..rounds {
        cmd.arg("-c")
            .arg(format!("write -P {byte:#x} {} 262144", i * 262_144));
        model.fill(i * 262_144, 262_144, byte);
    }
    cmd.arg("-c").arg("flush").arg(site.nbd_uri("vol0"));
    cmd.stdout(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-io")
}

#[test]
fn journal_full_policies_throttle_or_release() {
    // Goal: when the journal is full because distribution cannot keep up, `throttle` holds
    // the host's writes until it can and `release` lets them through (the journal grows past
    // its capacity until distribution catches up); both are visible in status, and no write
    // is lost. Method: a logged image holds distribution at a point (deterministically
    // "behind"); a host writes three times the capacity; observe status and the writer; then
    // release the image and check the replica against the model.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    for policy in ["throttle", "release"] {
        let mut site = site(
            &[("vol0", 64 * MIB)],
            &format!("journal_capacity_bytes = {CAPACITY}\njournal_full_policy = \"{policy}\"\n"),
        );
        site.start_role(Role::Appliance);
        site.start_role(Role::Splitter);
        let mut model = Model::zeroed(64 * MIB);
        let mut first = spawn_writes(&site, &mut model, 0x21, 4);
        assert!(wait_child(&mut first, Duration::from_secs(60)).is_some_and(|s| s.success()));
        site.settle();
        let image = site.cdp_json(&["image", "access", "--at", "-0s", "--logged", "--json"]);
        let mut writer = spawn_writes(&site, &mut model, 0x42, 3 * CAPACITY / 262_144);
        if policy == "throttle" {
            let held = poll_until(Duration::from_secs(60), || {
                group(&site.status())["journal_throttling"] == true
            });
            assert!(held, "never throttled: {:#}", site.status());
            assert!(
                writer.try_wait().expect("qemu-io").is_none(),
                "the host's writes completed although the journal is full"
            );
        } else {
            let status = wait_child(&mut writer, Duration::from_secs(60)).expect("writer hung");
            assert!(status.success());
            let g = group(&site.status());
            assert_eq!(g["journal_throttling"], false, "{g:#}");
            assert_eq!(g["journal_over_capacity"], true, "{g:#}");
            assert!(g["journal_bytes"].as_u64().unwrap_or(0) > CAPACITY, "{g:#}");
        }
        site.cdp_json(&[
            "image",
            "release",
            image["id"].as_str().expect("id"),
            "--json",
        ]);
        let status = wait_child(&mut writer, Duration::from_secs(60)).expect("writer hung");
        assert!(status.success(), "qemu-io: {status}");
        site.settle();
        let within = poll_until(Duration::from_secs(30), || {
            group(&site.status())["journal_over_capacity"] == false
        });
        assert!(within, "{policy}: {:#}", site.status());
        assert!(
            site.logs().contains("journal over capacity"),
            "{policy}: no warning logged"
        );
        model.check_file(
            &format!("{policy}: production"),
            &site.volume("vol0").production,
        );
        site.assert_replica_equals_production("vol0");
    }
}
