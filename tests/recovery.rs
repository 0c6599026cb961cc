//! Recovery paths beyond a plain crash: an appliance outage while the host keeps writing, a torn
//! journal tail, and a second splitter claiming volumes that are already split.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn qemu_io_ok(uri: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run_ok(cmd.arg(uri), Duration::from_secs(120));
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {commands:?}:\n{out}"
    );
}

/// Every journal segment file under the appliance's data directory, sorted by name.
fn segments(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "seg") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

#[test]
fn appliance_outage_while_host_writes() {
    // Goal: an appliance that is down for a while (not just restarted at once) loses nothing:
    // host writes issued during the outage complete once it is back (or earlier), and land in
    // production and, after catch-up, in the replica. Method: SIGKILL the appliance, start a
    // qemu-io writer, keep the appliance down for 2 s (the outage itself is the stimulus),
    // restart it, and require the writer to finish and both copies to match the model.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 16 * MIB)]);
    let uri = site.nbd_uri("vol0");
    qemu_io_ok(&uri, &["write -P 0x01 0 4M", "flush"]);
    site.kill_appliance();
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0x02 1M 2M"])
        .args(["-c", "write -P 0x03 8M 4M"])
        .args(["-c", "flush"])
        .arg(&uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    site.start_role(Role::Appliance);
    let status = wait_child(&mut writer, Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "host writes did not complete after the appliance came back\n{}",
            site.logs()
        )
    });
    assert!(status.success(), "qemu-io writer: {status}");
    let mut model = Model::zeroed(16 * MIB);
    model.fill(0, 4 * MIB, 0x01);
    model.fill(MIB, 2 * MIB, 0x02);
    model.fill(8 * MIB, 4 * MIB, 0x03);
    model.check_file("production", &site.volume("vol0").production);
    site.settle();
    model.check_file("replica", &site.volume("vol0").replica);
}

#[test]
fn torn_journal_tail_is_cut_and_service_resumes() {
    // Goal: DESIGN rule 4's "torn tails are detected by CRC and cut": bytes of a record that
    // was never completely written at the end of the last segment must not stop the appliance
    // or reach the replica. Method: write and flush, SIGKILL the appliance, append garbage
    // (random bytes, then a copy of the segment's own first bytes) to the last segment,
    // restart, write more, and compare the replica with production and the model.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 16 * MIB)]);
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(16 * MIB);
    for (i, tail) in [pattern(7, 3000), Vec::new()].into_iter().enumerate() {
        let byte = 0x10 + i as u8;
        qemu_io_ok(
            &uri,
            &[
                &format!("write -P {byte} {} 1M", i as u64 * 2 * MIB),
                "flush",
            ],
        );
        model.fill(i as u64 * 2 * MIB, MIB, byte);
        site.settle();
        site.kill_appliance();
        // The journal's segments, not the undo stream's (groups/default/undo/...).
        let segs = segments(&site.root().join("appliance/groups/default/journal"));
        let last = segs.last().expect("no journal segment (*.seg) found");
        let tail = if tail.is_empty() {
            // A plausible-looking torn record: the segment's own leading bytes.
            let head = std::fs::read(last).unwrap();
            head[..head.len().min(200)].to_vec()
        } else {
            tail
        };
        let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
        std::io::Write::write_all(&mut f, &tail).unwrap();
        drop(f);
        site.start_role(Role::Appliance);
        qemu_io_ok(
            &uri,
            &[
                &format!("write -P 0x2{i} {} 4096", 12 * MIB + i as u64 * 4096),
                "flush",
            ],
        );
        model.fill(12 * MIB + i as u64 * 4096, 4096, 0x20 + i as u8);
        site.settle();
        model.check_file("production", &site.volume("vol0").production);
        model.check_file("replica", &site.volume("vol0").replica);
    }
    site.assert_replica_equals_production("vol0");
}

#[test]
fn second_splitter_for_split_volume_is_refused() {
    // Goal: no split brain (DESIGN rule 6; ARCHITECTURE: a second splitter for a connected
    // volume is refused): a second splitter process for the same volume must not get writes
    // into the journal or production past the first. Method: start a second splitter with its
    // own NBD socket on the same config's volumes; it must exit with an error naming the
    // reason, without serving NBD; the first splitter keeps working and the copies stay equal.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 8 * MIB)]);
    let uri = site.nbd_uri("vol0");
    qemu_io_ok(&uri, &["write -P 0x31 0 1M", "flush"]);
    let second_sock = site.root().join("nbd2.sock");
    let config = std::fs::read_to_string(&site.splitter_config)
        .unwrap()
        .replace(
            &site.nbd_sock.display().to_string(),
            &second_sock.display().to_string(),
        );
    let second_config = site.root().join("splitter2.toml");
    std::fs::write(&second_config, config).unwrap();
    let log = std::fs::File::create(site.root().join("splitter2.log")).unwrap();
    let mut second = Command::new(cdp_bin())
        .arg("splitter")
        .arg("--config")
        .arg(&second_config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // The appliance refuses the volume before ever welcoming the second splitter, which is a
    // configuration error: the process must exit with a failure and say why.
    let exited = poll_until(Duration::from_secs(20), || {
        second.try_wait().unwrap().is_some()
    });
    let second_log = || std::fs::read_to_string(site.root().join("splitter2.log")).unwrap();
    assert!(exited, "second splitter did not exit:\n{}", second_log());
    let status = second.try_wait().unwrap().expect("exited");
    assert!(
        !status.success(),
        "second splitter exited 0:\n{}",
        second_log()
    );
    assert!(
        second_log().contains("already has a connected splitter"),
        "second splitter did not say why it stopped:\n{}",
        second_log()
    );
    assert!(
        !unix_accepts(&second_sock),
        "second splitter served NBD for an already split volume"
    );
    let _ = second.kill();
    let _ = second.wait();
    site.assert_alive();
    qemu_io_ok(
        &uri,
        &["write -P 0x32 4096 4096", "flush", "read -P 0x31 0 4096"],
    );
    let mut model = Model::zeroed(8 * MIB);
    model.fill(0, MIB, 0x31);
    model.fill(4096, 4096, 0x32);
    model.check_file("production", &site.volume("vol0").production);
    site.settle();
    site.assert_replica_equals_production("vol0");
}

#[test]
fn journal_across_segments_survives_restart() {
    // Goal: a journal larger than one segment (256 MiB by default) recovers after a crash in the
    // middle of distribution, and the replica still converges. Method: fio rewrites a 64 MiB
    // volume five times (320 MiB journaled, the last pass with crc32c verify), SIGKILL the
    // appliance before distribution is known to be done, restart it, wait for catch-up, replay
    // the verify pass on the replica file and compare replica with production.
    if reference_mode() || !requires("fio") || !requires("qemu-img") || !requires("qemu-io") {
        return;
    }
    let mut site = Site::start(&[("vol0", 64 * MIB)]);
    let uri = site.nbd_uri("vol0");
    let fio_dir = site.root().to_path_buf();
    let fio = |args: &[String]| {
        // fio writes verify state files into its working directory; keep them in the site.
        let out = run(
            Command::new("fio").current_dir(&fio_dir).args(args),
            Duration::from_secs(300),
        );
        assert!(
            out.status.success(),
            "fio {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    fio(&[
        "--name=fill".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        "--size=64M".into(),
        "--loops=4".into(),
        "--end_fsync=1".into(),
    ]);
    let verify_job = |engine: Vec<String>| {
        let mut v = engine;
        v.extend(
            [
                "--name=last",
                "--rw=randwrite",
                "--bs=64k",
                "--size=64M",
                "--verify=crc32c",
                "--verify_fatal=1",
            ]
            .map(String::from),
        );
        v
    };
    fio(&verify_job(vec![
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--iodepth=8".into(),
        "--end_fsync=1".into(),
    ]));
    let st = site.status();
    eprintln!("before the kill: {st}");
    assert!(
        st["groups"][0]["journal_segments"].as_u64().unwrap_or(0) >= 2,
        "320 MiB did not roll the journal over: {st:#}"
    );
    site.kill_appliance();
    site.start_role(Role::Appliance);
    site.settle();
    site.assert_replica_equals_production("vol0");
    let mut replay = verify_job(vec![
        "--ioengine=psync".into(),
        format!("--filename={}", site.volume("vol0").replica.display()),
    ]);
    replay.push("--verify_only".into());
    fio(&replay);
}
