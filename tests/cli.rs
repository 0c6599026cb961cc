//! The operator's view: `cdp status` (JSON and table) on a multi-volume site, and `cdp up`
//! starting a working protected volume and stopping on SIGINT.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn group(status: &serde_json::Value) -> &serde_json::Value {
    let groups = status["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{status:#}");
    assert_eq!(groups[0]["name"], "default", "{status:#}");
    &groups[0]
}

fn seq(g: &serde_json::Value, field: &str) -> u64 {
    g[field]
        .as_u64()
        .unwrap_or_else(|| panic!("status field {field} missing: {g:#}"))
}

#[test]
fn status_reports_volumes_and_progress() {
    // Goal: `cdp status` tells an operator which volumes are protected, whether their splitter is
    // connected, and how far journal and distribution have got. Method: a two-volume site; check
    // names, sizes, replicas and `connected`; write and flush through NBD and require last_seq to
    // grow and durable_seq to reach it; then wait for distribution and check the table output.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let site = Site::start(&[("vol0", 16 * MIB), ("vol1", 8 * MIB)]);
    // The splitter connects its link after it starts serving NBD; wait for that condition.
    let connected = poll_until(Duration::from_secs(30), || {
        let st = site.status();
        group(&st)["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().all(|v| v["connected"] == true))
    });
    let st = site.status();
    assert!(connected, "volumes never showed connected: {st:#}");
    let g = group(&st);
    let volumes = g["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2, "{st:#}");
    for v in &site.volumes {
        let entry = volumes
            .iter()
            .find(|e| e["name"] == v.name.as_str())
            .unwrap_or_else(|| panic!("{} missing from status: {st:#}", v.name));
        assert_eq!(entry["size"].as_u64(), Some(v.size), "{st:#}");
        assert_eq!(
            entry["replica"].as_str().map(std::path::PathBuf::from),
            Some(v.replica.clone()),
            "{st:#}"
        );
    }
    let before = seq(g, "last_seq");

    for (vol, n) in [("vol0", 5u64), ("vol1", 3)] {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for i in 0..n {
            cmd.arg("-c")
                .arg(format!("write -P {} {} 4096", i + 1, i * 65536));
        }
        cmd.arg("-c").arg("flush").arg(site.nbd_uri(vol));
        run_ok(&mut cmd, Duration::from_secs(60));
    }
    let st = site.status();
    let g = group(&st);
    let last = seq(g, "last_seq");
    assert!(
        last >= before + 8,
        "8 writes moved last_seq only from {before} to {last}: {st:#}"
    );
    assert!(
        seq(g, "durable_seq") >= last,
        "after FLUSH, durable_seq < last_seq: {st:#}"
    );
    // Journal payloads may be stored compressed; the logical count is what the host wrote.
    assert!(seq(g, "journal_write_logical_bytes") >= 8 * 4096, "{st:#}");
    assert!(seq(g, "journal_bytes") > 0, "{st:#}");
    assert!(seq(g, "first_seq") <= last, "{st:#}");

    site.wait_distributed(DISTRIBUTED_DEADLINE);
    let st = site.status();
    assert_eq!(
        seq(group(&st), "lag_records"),
        0,
        "caught up but lagging: {st:#}"
    );
    site.assert_all_replicas_equal_production();

    let table = run_ok(
        Command::new(cdp_bin())
            .arg("status")
            .arg("--control")
            .arg(&site.control_sock),
        Duration::from_secs(30),
    );
    for word in ["default", "vol0", "vol1"] {
        assert!(table.contains(word), "status table lacks {word}:\n{table}");
    }

    // A dead splitter must show as disconnected, and come back as connected after a restart.
    let mut site = site;
    site.kill_splitter();
    let all_connected = |site: &Site, want: bool| {
        poll_until(Duration::from_secs(30), || {
            let st = site.status();
            group(&st)["volumes"]
                .as_array()
                .is_some_and(|v| v.iter().all(|v| v["connected"] == want))
        })
    };
    assert!(
        all_connected(&site, false),
        "volumes still connected after the splitter died: {:#}",
        site.status()
    );
    site.start_role(Role::Splitter);
    assert!(
        all_connected(&site, true),
        "volumes not connected after the splitter restarted: {:#}",
        site.status()
    );
}

/// Stops a `cdp up` left running by a failed assertion: SIGINT (so it stops its children), then
/// SIGKILL if it does not exit.
struct UpGuard(std::process::Child);

impl Drop for UpGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGINT) };
            wait_child(&mut self.0, Duration::from_secs(20));
        }
    }
}

#[test]
fn cdp_up_serves_and_stops_on_sigint() {
    // Goal: the one-command start works: `cdp up` brings up a protected volume whose export
    // reads back what was written, over both unix socket and TCP, and Ctrl-C stops everything.
    // Method: run `cdp up` on a fresh directory and a free port, write and read with qemu-io,
    // wait for distribution, compare replica and production, send SIGINT, require exit 0.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") || !requires("nbdinfo") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cdp-up-")
        .tempdir_in("/tmp")
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("up.out")).unwrap();
    let mut up = UpGuard(
        Command::new(cdp_bin())
            .arg("up")
            .arg("--dir")
            .arg(dir.path())
            .args(["--size", "32M", "--name", "vol0"])
            .arg("--nbd-tcp")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let sock = dir.path().join("nbd.sock");
    let out_path = dir.path().join("up.out");
    let ready = poll_until(READY_DEADLINE, || {
        unix_accepts(&sock) || up.0.try_wait().unwrap().is_some()
    });
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        ready && up.0.try_wait().unwrap().is_none(),
        "cdp up did not come up:\n{}",
        output()
    );
    let unix_uri = format!("nbd+unix:///vol0?socket={}", sock.display());
    let tcp_uri = format!("nbd://127.0.0.1:{port}/vol0");
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x3c 12345 100000",
                "-c",
                "flush",
            ])
            .arg(&unix_uri),
        Duration::from_secs(60),
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x3c 12345 100000"])
            .arg(&tcp_uri),
        Duration::from_secs(60),
    );
    let info = run_ok(
        Command::new("nbdinfo").args(["--size", &tcp_uri]),
        Duration::from_secs(60),
    );
    assert_eq!(info.trim(), (32 * MIB).to_string());
    let mut model = Model::zeroed(32 * MIB);
    model.fill(12345, 100000, 0x3c);
    let production = dir.path().join("production/vol0.img");
    model.check_file("cdp up production", &production);
    let status = |json: bool| {
        let mut c = Command::new(cdp_bin());
        c.arg("status").arg("--dir").arg(dir.path());
        if json {
            c.arg("--json");
        }
        run_ok(&mut c, Duration::from_secs(30))
    };
    let caught_up = poll_until(DISTRIBUTED_DEADLINE, || {
        let st: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
        let g = group(&st);
        seq(g, "distributed_seq") == seq(g, "last_seq")
    });
    assert!(caught_up, "distribution did not catch up: {}", status(true));
    model.check_file("cdp up replica", &dir.path().join("replica/vol0.img"));
    assert!(
        status(false).contains("vol0"),
        "status table: {}",
        status(false)
    );

    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(up.0.id() as libc::pid_t, libc::SIGINT) };
    let exit = wait_child(&mut up.0, Duration::from_secs(30));
    assert!(
        exit.is_some_and(|s| s.success()),
        "cdp up did not stop cleanly on SIGINT ({exit:?}):\n{}",
        output()
    );
    assert!(
        !unix_accepts(&sock),
        "the splitter still serves after cdp up stopped"
    );
}

/// `cdp status --watch` redraws the table in place: each frame starts at the cursor's home,
/// clears every line's rest and the screen below, and a later frame shows a write's new
/// last seq without the command being run again.
#[test]
fn status_watch_redraws_in_place() {
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let site = Site::start(&[("vol0", 16 * MIB)]);
    site.wait_connected(Duration::from_secs(30));
    let out_path = site.root().join("watch.out");
    let mut watch = Command::new(cdp_bin())
        .args(["status", "--watch", "0.2", "--control"])
        .arg(&site.control_sock)
        .arg("--splitter-control")
        .arg(site.splitter_control())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .spawn()
        .expect("start cdp status --watch");
    let frames = || {
        let text = std::fs::read_to_string(&out_path).unwrap();
        text.split("\x1b[H")
            .skip(1)
            .filter(|f| f.ends_with("\x1b[J"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(poll_until(Duration::from_secs(30), || frames().len() >= 2));
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 3 0 64k", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(30),
    );
    let last = seq(group(&site.status()), "last_seq");
    assert!(last > 0);
    let shows_last = |f: &String| {
        f.lines()
            .find(|l| l.starts_with("default "))
            .is_some_and(|l| l.split_whitespace().any(|w| w == last.to_string()))
    };
    let seen = poll_until(Duration::from_secs(30), || frames().iter().any(shows_last));
    let _ = watch.kill();
    let _ = watch.wait();
    let all = frames();
    assert!(seen, "no frame shows last seq {last}: {:?}", all.last());
    assert!(
        !shows_last(&all[0]),
        "the first frame already showed seq {last}"
    );
    for f in &all {
        assert!(f.starts_with("Every 0.2s: cdp status"), "{f:?}");
        assert!(
            f.lines().all(|l| l.ends_with("\x1b[K") || l == "\x1b[J"),
            "{f:?}"
        );
        assert!(f.contains("GROUP"), "{f:?}");
    }
}
