//! The operator's surface as acceptance testing found it: each test reproduces one defect an
//! administrator hit by hand (a deadlocked release, `cdp up` dropping the host when the
//! appliance died, panics on a closed pipe, a second `cdp up` on a busy directory, silently
//! ignored flags, unclear errors, requests that wait forever, world-readable data) and
//! checks the fixed behaviour through the real `cdp` command, real processes and qemu-io.

mod common;

use common::cli::copy_export;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

/// Exit statuses documented in docs/cli.md.
const EXIT_NOT_FOUND: i32 = 3;
const EXIT_USAGE: i32 = 2;
const EXIT_UNREACHABLE: i32 = 5;

/// A running `cdp up` in its own directory; dropped, it is stopped with SIGINT (then killed).
struct Up {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    port: u16,
    child: Child,
    out: PathBuf,
}

impl Up {
    /// Starts `cdp up` on a fresh directory with a 32 MiB volume, waiting until it serves.
    fn start() -> Up {
        let dir = tempfile::Builder::new()
            .prefix("cdp-op-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut up = Up::start_at(dir.path(), free_port(), &[]);
        up._tmp = Some(dir);
        up
    }

    /// Starts `cdp up` on `dir` (new or used before), serving NBD on `port`.
    fn start_at(dir: &Path, port: u16, extra: &[&str]) -> Up {
        let out = dir.join(format!("up-{port}-{}.out", std::process::id()));
        let log = std::fs::File::create(&out).unwrap();
        let child = Command::new(cdp_bin())
            .arg("up")
            .arg("--dir")
            .arg(dir)
            .args(["--size", "32M", "--nbd-tcp", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut up = Up {
            dir: dir.to_path_buf(),
            _tmp: None,
            port,
            child,
            out,
        };
        let ready = poll_until(Duration::from_secs(60), || {
            up.output().contains("is up.") || up.child.try_wait().unwrap().is_some()
        });
        assert!(
            ready && up.child.try_wait().unwrap().is_none(),
            "cdp up did not come up:\n{}",
            up.output()
        );
        up
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn cdp(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cdp_bin());
        c.args(args).arg("--dir").arg(self.path());
        c
    }

    fn tcp_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.port)
    }

    fn status(&self) -> serde_json::Value {
        let out = run_ok(&mut self.cdp(&["status", "--json"]), T);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad status JSON ({e}): {out}"))
    }

    /// The pid of this directory's appliance child (from its command line).
    fn appliance_pid(&self) -> Option<u32> {
        let wanted = format!("{}/appliance.toml", self.path().display());
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let is_it =
                args.iter().any(|a| *a == b"appliance") && args.contains(&wanted.as_bytes());
            is_it.then_some(pid)
        })
    }

    /// SIGINT and wait; returns the exit status and everything `cdp up` printed.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        signal(self.child.id(), libc::SIGINT);
        let status = wait_child(&mut self.child, Duration::from_secs(60))
            .expect("cdp up did not stop within 60 s of SIGINT");
        let out = self.output();
        (status, out)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), libc::SIGINT);
            wait_child(&mut self.child, Duration::from_secs(30));
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started; no memory is involved.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn qemu_write(uri: &str, byte: u8, offset: u64, len: u64) -> Output {
    run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {byte} {offset} {len}"),
            "-c",
            "flush",
            uri,
        ]),
        T,
    )
}

#[test]
fn releasing_an_unknown_image_answers_and_the_appliance_keeps_serving() {
    // Goal: `image release` of an id that is not open (mistyped, or released twice) is a
    // clear "not found", and the appliance is not deadlocked afterwards. Method: open one
    // image, release a wrong id and the same id twice, each within a deadline, then require
    // list, access and release to keep answering and the image to read the bookmark's bytes.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let up = Up::start();
    assert!(qemu_write(&up.tcp_uri(), 0x5a, 0, MIB).status.success());
    run_ok(&mut up.cdp(&["bookmark", "create", "b1"]), T);
    let image: serde_json::Value = serde_json::from_str(&run_ok(
        &mut up.cdp(&["image", "access", "--at", "b1", "--json"]),
        T,
    ))
    .unwrap();
    let id = image["id"].as_str().unwrap().to_string();
    for wrong in ["default", "img999"] {
        let out = run(
            &mut up.cdp(&["image", "release", wrong]),
            Duration::from_secs(20),
        );
        assert_eq!(code(&out), Some(EXIT_NOT_FOUND), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("no open image \"{wrong}\""))
                && stderr(&out).contains(&id),
            "the refusal should name the id and list the open ones: {}",
            stderr(&out)
        );
    }
    // Still serving: list shows the image, and its bytes are the bookmark's.
    let list = run_ok(
        &mut up.cdp(&["image", "list", "--json"]),
        Duration::from_secs(20),
    );
    assert!(list.contains(&id), "{list}");
    let copy = up.path().join("b1.img");
    copy_export(&up_image_uri(&image), &copy);
    let mut model = Model::zeroed(32 * MIB);
    model.fill(0, MIB, 0x5a);
    model.check_file("image at b1", &copy);
    run_ok(
        &mut up.cdp(&["image", "release", &id]),
        Duration::from_secs(20),
    );
    let again = run(
        &mut up.cdp(&["image", "release", &id]),
        Duration::from_secs(20),
    );
    assert_eq!(code(&again), Some(EXIT_NOT_FOUND), "{}", stderr(&again));
    // And a new access still works after all the refusals.
    let second = run_ok(
        &mut up.cdp(&["image", "access", "--at", "b1", "--json"]),
        Duration::from_secs(20),
    );
    assert!(second.contains("\"id\""), "{second}");
}

fn up_image_uri(image: &serde_json::Value) -> String {
    let nbd = image["nbd"].as_str().unwrap();
    let export = image["exports"][0]["export"].as_str().unwrap();
    let path = nbd.strip_prefix("unix:").expect("unix image endpoint");
    format!("nbd+unix:///{export}?socket={path}")
}

#[test]
fn cdp_up_keeps_serving_when_the_appliance_dies_and_restarts_it() {
    // Goal: under `cdp up`, kill -9 of the appliance does not take the volume away from the
    // host: the splitter serves on in marking mode, `cdp up` says it restarts the appliance,
    // and protection resumes with a resync, after which the replica equals production.
    // Method: a host keeps writing with qemu-io (each write flushed) while the appliance is
    // killed twice; every write must succeed; the model of all writes is checked against
    // production and, after protection resumes, against the replica.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let mut up = Up::start();
    let mut model = Model::zeroed(32 * MIB);
    let mut byte = 1u8;
    let mut write = |model: &mut Model, offset: u64| {
        let out = qemu_write(&up.tcp_uri(), byte, offset, 64 * 1024);
        assert!(
            out.status.success(),
            "host write failed while the appliance was down: {}\n{}",
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        );
        model.fill(offset, 64 * 1024, byte);
        byte = byte.wrapping_add(1).max(1);
    };
    for round in 0..2u64 {
        write(&mut model, round * MIB);
        let pid = up.appliance_pid().expect("appliance pid");
        signal(pid, libc::SIGKILL);
        // Writes while the appliance is dead or restarting: served, in marking mode.
        for i in 0..8u64 {
            write(&mut model, 4 * MIB + round * MIB + i * 64 * 1024);
        }
        let restarted = poll_until(Duration::from_secs(60), || {
            up.appliance_pid().is_some_and(|p| p != pid)
        });
        assert!(
            restarted,
            "cdp up did not restart the appliance:\n{}",
            up.output()
        );
    }
    assert!(
        up.output()
            .contains("the appliance exited (killed by signal 9)")
            && up.output().contains("restarting it"),
        "cdp up should say what happened:\n{}",
        up.output()
    );
    model.check_file("production", &up.path().join("production/vol0.img"));
    let protected = poll_until(Duration::from_secs(120), || {
        let st = up.status();
        let v = &st["splitter"]["volumes"][0];
        let g = &st["groups"][0];
        v["state"] == "protecting" && g["distributed_seq"] == g["last_seq"]
    });
    assert!(protected, "protection did not resume: {:#}", up.status());
    model.check_file("replica after resync", &up.path().join("replica/vol0.img"));
    let (status, out) = up.stop();
    assert!(status.success(), "{out}");
    assert!(out.contains("Stopped cleanly."), "{out}");
}

#[test]
fn cdp_up_reports_a_child_it_had_to_kill_and_exits_nonzero() {
    // Goal: "Stopped cleanly." only when both children stopped by themselves. Method: freeze
    // the appliance with SIGSTOP (it cannot act on SIGTERM), stop `cdp up` with SIGINT, and
    // require a non-zero exit naming the appliance as killed.
    if reference_mode() {
        return;
    }
    let mut up = Up::start();
    let pid = up.appliance_pid().expect("appliance pid");
    signal(pid, libc::SIGSTOP);
    let (status, out) = up.stop();
    assert!(
        !status.success(),
        "exit 0 after killing the appliance:\n{out}"
    );
    assert!(!out.contains("Stopped cleanly."), "{out}");
    assert!(
        out.contains("the appliance did not stop within") && out.contains("was killed"),
        "{out}"
    );
}

#[test]
fn printing_commands_exit_quietly_when_the_pipe_closes() {
    // Goal: `cdp status | head -1` and friends never panic. Method: run each printing
    // subcommand with stdout a pipe whose reader is already closed; require exit 0 and no
    // panic message.
    if reference_mode() {
        return;
    }
    let up = Up::start();
    run_ok(&mut up.cdp(&["bookmark", "create", "b1"]), T);
    let commands: &[&[&str]] = &[
        &["status"],
        &["status", "--json"],
        &["timeline"],
        &["timeline", "--json"],
        &["bookmark", "list"],
        &["bookmark", "list", "--json"],
        &["image", "list", "--json"],
        &["group", "list"],
        &["group", "list", "--json"],
        &["point", "resolve", "b1"],
        &["point", "resolve", "b1", "--json"],
    ];
    for args in commands {
        let mut cmd = up.cdp(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let status = wait_child(&mut child, Duration::from_secs(30)).expect("finished");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            status.success() && !err.contains("panicked"),
            "cdp {args:?} into a closed pipe: {status}\n{err}"
        );
    }
}

#[test]
fn a_second_cdp_up_on_a_busy_directory_names_the_holder() {
    // Goal: a second `cdp up` on a directory in use fails first, naming the process, and
    // prints no banner. Method: start one, start a second on the same directory.
    if reference_mode() {
        return;
    }
    let up = Up::start();
    let out = run(
        Command::new(cdp_bin())
            .arg("up")
            .arg("--dir")
            .arg(up.path())
            .args(["--nbd-tcp", &format!("127.0.0.1:{}", free_port())]),
        T,
    );
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!text.contains("is up"), "{text}");
    assert!(
        text.contains("already in use") && text.contains(&format!("pid {}", up.child.id())),
        "{text}"
    );
}

#[test]
fn nbd_tcp_on_an_existing_directory_is_applied() {
    // Goal: `--nbd-tcp` on an existing directory is applied, never ignored, and the banner
    // shows the address really served. Method: run `cdp up` on one port, stop it, run it
    // again on the same directory with another, write through the new port and read back.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("cdp-op-")
        .tempdir_in("/tmp")
        .unwrap();
    let (old, new) = (free_port(), free_port());
    let mut first = Up::start_at(tmp.path(), old, &[]);
    let (status, out) = first.stop();
    assert!(status.success(), "{out}");
    let second = Up::start_at(tmp.path(), new, &[]);
    let banner = second.output();
    assert!(banner.contains(&format!("127.0.0.1 {new}")), "{banner}");
    assert!(!banner.contains(&format!("127.0.0.1 {old}")), "{banner}");
    assert!(qemu_write(&second.tcp_uri(), 0x42, 4096, 8192)
        .status
        .success());
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x42 4096 8192",
            &second.tcp_uri(),
        ]),
        T,
    );
    let toml = std::fs::read_to_string(tmp.path().join("splitter.toml")).unwrap();
    assert!(
        toml.contains(&format!("nbd_tcp = \"127.0.0.1:{new}\"")),
        "{toml}"
    );
}

#[test]
fn a_port_in_use_is_named_with_the_fix() {
    // Goal: when the NBD port is taken, `cdp up` says which address and how to fix it.
    // Method: hold a TCP listener on a port and start `cdp up` on it.
    if reference_mode() {
        return;
    }
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        Command::new(cdp_bin())
            .arg("up")
            .arg("--dir")
            .arg(tmp.path())
            .args(["--size", "8M", "--nbd-tcp", &format!("127.0.0.1:{port}")]),
        T,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("127.0.0.1:{port}"))
            && err.contains("already in use")
            && err.contains("--nbd-tcp"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("is up"));
}

#[test]
fn every_hint_names_a_flag_that_exists() {
    // Goal: one convention: `--group NAME` on every command that works inside a group, and
    // the hint printed when the group is ambiguous is runnable as printed. Method: two
    // groups; each command without a group must fail with a hint naming --group, and the
    // same command with `--group default` must succeed.
    if reference_mode() {
        return;
    }
    let up = Up::start();
    run_ok(&mut up.cdp(&["bookmark", "create", "b1"]), T);
    run_ok(&mut up.cdp(&["group", "create", "g2"]), T);
    let commands: &[&[&str]] = &[
        &["timeline"],
        &["journal", "consolidate"],
        &["image", "access", "--at", "b1"],
        &["bookmark", "list"],
        &["point", "resolve", "b1"],
    ];
    for args in commands {
        let out = run(&mut up.cdp(args), T);
        assert_eq!(
            code(&out),
            Some(EXIT_USAGE),
            "cdp {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("--group NAME"),
            "cdp {args:?}: {}",
            stderr(&out)
        );
        let mut fixed: Vec<&str> = args.to_vec();
        fixed.extend(["--group", "default"]);
        let ok = run(&mut up.cdp(&fixed), T);
        // `journal consolidate` then refuses for its own reason (no policy): the group was
        // found, which is what the hint is about.
        let own_reason = stderr(&ok).contains("has no consolidation policy");
        assert!(
            ok.status.success() || own_reason,
            "cdp {fixed:?}: {}",
            stderr(&ok)
        );
    }
}

#[test]
fn bad_input_is_refused_at_the_boundary() {
    // Goal: bookmark names with spaces, certificates without a usable name and volume sizes
    // that are not whole 4 KiB blocks are refused with a usage error, and nothing is made.
    if reference_mode() {
        return;
    }
    let up = Up::start();
    let out = run(&mut up.cdp(&["bookmark", "create", "pre upgrade"]), T);
    assert_eq!(code(&out), Some(EXIT_USAGE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("spaces are not allowed"),
        "{}",
        stderr(&out)
    );
    let list = run_ok(&mut up.cdp(&["bookmark", "list", "--json"]), T);
    assert!(!list.contains("pre upgrade"), "{list}");

    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    run_ok(
        Command::new(cdp_bin())
            .args(["tls", "ca", "--out"])
            .arg(&ca),
        T,
    );
    let issued = tmp.path().join("bad");
    let out = run(
        Command::new(cdp_bin())
            .args(["tls", "issue", "--name", "bad name", "--ca"])
            .arg(&ca)
            .arg("--out")
            .arg(&issued),
        T,
    );
    assert_eq!(code(&out), Some(EXIT_USAGE), "{}", stderr(&out));
    assert!(
        !issued.join("cert.pem").exists(),
        "a certificate was written"
    );

    let out = run(
        Command::new(cdp_bin())
            .arg("up")
            .arg("--dir")
            .arg(tmp.path().join("odd"))
            .args(["--size", "1000"]),
        T,
    );
    assert_eq!(code(&out), Some(EXIT_USAGE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("multiple of 4096"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("odd/production/vol0.img").exists());
}

#[test]
fn data_is_readable_by_its_owner_only() {
    // Goal: production, replica, journal, images, configs and control sockets are not
    // readable by other local users. Method: walk a `cdp up` directory (with an open image
    // and its scratch file) and require no group/other permission bits anywhere.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let up = Up::start();
    assert!(qemu_write(&up.tcp_uri(), 1, 0, 4096).status.success());
    run_ok(&mut up.cdp(&["bookmark", "create", "b1"]), T);
    run_ok(
        &mut up.cdp(&["image", "access", "--at", "b1", "--writable"]),
        T,
    );
    let mut open = Vec::new();
    let mut stack = vec![up.path().to_path_buf()];
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        seen += 1;
        // The test's own output capture is not the product's.
        // The test's own output capture and the temporary directory it made are not the
        // product's.
        let ours = p == up.path()
            || p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("up-"));
        if meta.permissions().mode() & 0o077 != 0 && !ours {
            open.push(format!(
                "{:o} {}",
                meta.permissions().mode() & 0o777,
                p.display()
            ));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    assert!(seen > 15, "walked only {seen} entries");
    assert!(open.is_empty(), "readable by others:\n{}", open.join("\n"));
}

#[test]
fn a_failed_quiesce_is_reported_first() {
    // Goal: when quiesce fails and thaw fails too, the message reads in the order things
    // happened: the quiesce failure, then the thaw's outcome.
    if reference_mode() {
        return;
    }
    let up = Up::start();
    let out = run(
        &mut up.cdp(&[
            "bookmark",
            "create",
            "b1",
            "--quiesce",
            "exit 3",
            "--thaw",
            "exit 4",
        ]),
        T,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let quiesce = err
        .find("quiesce failed")
        .unwrap_or_else(|| panic!("{err}"));
    let thaw = err
        .find("the thaw failed too")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(quiesce < thaw, "{err}");
    let list = run_ok(&mut up.cdp(&["bookmark", "list", "--json"]), T);
    assert!(!list.contains("\"b1\""), "a bookmark was taken: {list}");
}

#[test]
fn status_shows_the_splitter_while_the_appliance_is_down() {
    // Goal: `cdp status` is useful exactly when the appliance is down: it shows the
    // splitter's marking state and dirty bytes, marks the appliance unreachable, and exits 5.
    // Method: separate processes; kill the appliance, write through the splitter, then status.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let mut site = Site::start(&[("vol0", 16 * MIB)]);
    site.wait_connected(T);
    site.kill_appliance();
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 9 0 1M", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        T,
    );
    let status = |json: bool| {
        let mut c = Command::new(cdp_bin());
        c.arg("status")
            .arg("--control")
            .arg(&site.control_sock)
            .arg("--splitter-control")
            .arg(site.splitter_control());
        if json {
            c.arg("--json");
        }
        run(&mut c, T)
    };
    let marked = poll_until(T, || {
        let out = status(true);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["splitter"]["volumes"][0]["state"] == "marking"
            && v["splitter"]["volumes"][0]["dirty_bytes"].as_u64() >= Some(MIB)
    });
    let out = status(true);
    assert!(marked, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(code(&out), Some(EXIT_UNREACHABLE), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["appliance"]["reachable"], false, "{v:#}");
    let text = status(false);
    assert_eq!(code(&text), Some(EXIT_UNREACHABLE));
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(
        table.contains("marking") && table.contains("APPLIANCE UNREACHABLE"),
        "{table}"
    );
}

#[test]
fn a_control_socket_that_never_answers_times_out_with_a_clear_message() {
    // Goal: every CLI request has a deadline; a process that accepts and never answers is
    // named, and the command exits 5 soon after the deadline. Method: a unix listener that
    // accepts and stays silent, `cdp status` against it with CDP_TIMEOUT_S=2.
    if reference_mode() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("silent.ctl");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let held = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(15));
        drop(conn);
    });
    let started = Instant::now();
    let out = run(
        Command::new(cdp_bin())
            .env("CDP_TIMEOUT_S", "2")
            .args(["status", "--control"])
            .arg(&sock)
            .arg("--splitter-control")
            .arg(tmp.path().join("none.ctl")),
        Duration::from_secs(12),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code(&out), Some(EXIT_UNREACHABLE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the appliance at")
            && stderr(&out).contains("did not answer within 2 s"),
        "{}",
        stderr(&out)
    );
    drop(held);
}

#[test]
fn a_permission_error_is_not_called_a_stopped_process() {
    // Goal: the hint follows the error: a control socket the user may not open gets a
    // permission hint, not "is it running?". Method: as an unprivileged user (setpriv),
    // ask a running appliance whose socket is its owner's only.
    if reference_mode() || !is_root() || !requires("setpriv") {
        return;
    }
    let up = Up::start();
    // The unprivileged user must reach the binary and the directory's entries by path.
    let out = run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cdp_bin())
            .args(["status", "--control"])
            .arg(up.path().join("appliance.ctl")),
        T,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("permission denied") || err.contains("Permission denied"),
        "{err}"
    );
    assert!(!err.contains("is it running"), "{err}");
}

#[test]
fn resync_summary_reports_the_finished_operation() {
    // Goal: the summary of `cdp volume resync` is the finished operation's totals, equal to
    // what the splitter reports, not the last progress sample. Method: write 8 MiB, resync
    // with --json and compare with the splitter's last_resync; then verify the replica.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let up = Up::start();
    assert!(qemu_write(&up.tcp_uri(), 3, 0, 8 * MIB).status.success());
    let answer = run_ok(
        &mut up.cdp(&["volume", "resync", "vol0", "--json"]),
        Duration::from_secs(120),
    );
    let summary: serde_json::Value =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    let st = up.status();
    let last = &st["splitter"]["volumes"][0]["last_resync"];
    assert_eq!(
        summary["copied_bytes"], last["copied_bytes"],
        "{summary:#} vs {st:#}"
    );
    // A full copy resync sends the data regions; at least what was written.
    assert!(
        summary["copied_bytes"].as_u64() >= Some(8 * MIB),
        "{summary:#}"
    );
}

#[test]
fn image_export_creates_a_missing_directory() {
    // Goal: `image export --to DIR/` works when DIR does not exist yet, and the exported
    // file holds the point's bytes.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let up = Up::start();
    assert!(qemu_write(&up.tcp_uri(), 0x77, MIB, MIB).status.success());
    run_ok(&mut up.cdp(&["bookmark", "create", "b1"]), T);
    let to = up.path().join("exports/new/");
    let mut arg = to.display().to_string();
    if !arg.ends_with('/') {
        arg.push('/');
    }
    let out = run_ok(
        &mut up.cdp(&["image", "export", "--at", "b1", "--to", &arg, "--json"]),
        T,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exported"][0]["volume"], "vol0", "{v:#}");
    let mut model = Model::zeroed(32 * MIB);
    model.fill(MIB, MIB, 0x77);
    model.check_file("exported image", &to.join("vol0.img"));
}

#[test]
fn every_command_agrees_on_the_oldest_point() {
    // Goal: one function decides what is recoverable: the oldest point `cdp status` shows is
    // the one `timeline` starts at, `point resolve` accepts it, and `image access` opens it
    // with the bytes production held then (nothing). Method: write, then ask each command.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let up = Up::start();
    assert!(qemu_write(&up.tcp_uri(), 0x11, 0, MIB).status.success());
    let st = up.status();
    let oldest = st["groups"][0]["oldest_point_seq"]
        .as_u64()
        .expect("oldest_point_seq");
    let timeline: serde_json::Value =
        serde_json::from_str(&run_ok(&mut up.cdp(&["timeline", "--json"]), T)).unwrap();
    assert_eq!(
        timeline["first"]["seq"].as_u64(),
        Some(oldest),
        "{timeline:#}"
    );
    let at = format!("seq:{oldest}");
    let resolved: serde_json::Value = serde_json::from_str(&run_ok(
        &mut up.cdp(&["point", "resolve", &at, "--json"]),
        T,
    ))
    .unwrap();
    assert_eq!(
        resolved["resolved"]["seq"].as_u64(),
        Some(oldest),
        "{resolved:#}"
    );
    let image: serde_json::Value = serde_json::from_str(&run_ok(
        &mut up.cdp(&["image", "access", "--at", &at, "--json"]),
        T,
    ))
    .unwrap();
    let copy = up.path().join("oldest.img");
    copy_export(&up_image_uri(&image), &copy);
    Model::zeroed(32 * MIB).check_file("image at the oldest point", &copy);
    let below = oldest.checked_sub(1).map(|s| format!("seq:{s}"));
    if let Some(below) = below {
        let out = run(&mut up.cdp(&["point", "resolve", &below]), T);
        assert_eq!(code(&out), Some(EXIT_NOT_FOUND), "{}", stderr(&out));
    }
}

#[test]
fn json_everywhere_including_errors() {
    // Goal: every reporting command takes --json and prints parseable JSON; errors under
    // --json are JSON on stderr with a stable code and the exit status. Method: run each
    // command with --json against a `cdp up` and parse what it prints.
    if reference_mode() {
        return;
    }
    let up = Up::start();
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let ok: Vec<Vec<String>> = vec![
        vec!["status".into()],
        vec!["bookmark".into(), "create".into(), "b1".into()],
        vec!["bookmark".into(), "list".into()],
        vec!["point".into(), "resolve".into(), "b1".into()],
        vec!["timeline".into()],
        vec!["group".into(), "create".into(), "g2".into()],
        vec!["group".into(), "list".into()],
        vec!["image".into(), "list".into()],
        vec![
            "image".into(),
            "export".into(),
            "--group".into(),
            "default".into(),
            "--at".into(),
            "b1".into(),
            "--to".into(),
            tmp.path().join("e.img").display().to_string(),
        ],
        vec![
            "tls".into(),
            "ca".into(),
            "--out".into(),
            ca.display().to_string(),
        ],
        vec![
            "tls".into(),
            "issue".into(),
            "--name".into(),
            "site-b".into(),
            "--ca".into(),
            ca.display().to_string(),
            "--out".into(),
            tmp.path().join("b").display().to_string(),
        ],
    ];
    for args in &ok {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.push("--json");
        // `cdp tls` works on files, not on a running appliance: it takes no --dir.
        let mut cmd = if a[0] == "tls" {
            let mut c = Command::new(cdp_bin());
            c.args(&a);
            c
        } else {
            up.cdp(&a)
        };
        let out = run(&mut cmd, T);
        assert!(out.status.success(), "cdp {a:?}: {}", stderr(&out));
        let _: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cdp {a:?} printed bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    }
    let failing: &[(&[&str], &str, i32)] = &[
        (
            &["image", "release", "img42", "--json"],
            "not_found",
            EXIT_NOT_FOUND,
        ),
        (
            &["point", "resolve", "--group", "default", "nope", "--json"],
            "not_found",
            EXIT_NOT_FOUND,
        ),
        (
            &["timeline", "--group", "nope", "--json"],
            "not_found",
            EXIT_NOT_FOUND,
        ),
        (
            &["bookmark", "create", "a b", "--json"],
            "usage",
            EXIT_USAGE,
        ),
        (&["no-such-command", "--json"], "usage", EXIT_USAGE),
    ];
    for (args, want, exit) in failing {
        let out = run(&mut up.cdp(args), T);
        assert_eq!(code(&out), Some(*exit), "cdp {args:?}: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("cdp {args:?}: error not JSON ({e}): {}", stderr(&out)));
        assert_eq!(v["error"]["code"], *want, "{v}");
        assert_eq!(v["error"]["exit_status"], *exit, "{v}");
    }
    // `cdp up --json` describes the running volume.
    let tmp2 = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = tmp2.path().join("out.json");
    let mut child = Command::new(cdp_bin())
        .arg("up")
        .arg("--dir")
        .arg(tmp2.path().join("d"))
        .args([
            "--size",
            "8M",
            "--nbd-tcp",
            &format!("127.0.0.1:{port}"),
            "--json",
        ])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let printed = poll_until(T, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.ends_with('\n'))
    });
    signal(child.id(), libc::SIGINT);
    wait_child(&mut child, T);
    assert!(printed);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(v["nbd_tcp"], format!("127.0.0.1:{port}"), "{v:#}");
}

/// `cdp status --json` against `site`'s appliance socket, run as the unprivileged `nobody`
/// (uid and gid 65534) with no supplementary groups.
fn status_as_nobody(site: &Site) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cdp_bin())
        .args(["--json", "status", "--control"])
        .arg(&site.control_sock);
    run(&mut cmd, T)
}

#[test]
fn control_sockets_admit_their_owner_and_the_configured_group_only() {
    // Goal (defect 13): a control socket is usable by its owner, or also by one configured
    // group, never by every local user, whatever umask the process was started with.
    // Method: an appliance started as root (the harness's umask, 022 in CI) on a directory
    // `nobody` can traverse: its socket is 0600 and `nobody` is refused with a permission
    // error; with
    // `control_socket_group = "65534"` the socket is 0660, group 65534, and `nobody`'s
    // status answers. An unknown group stops the start with its name.
    if reference_mode() || !is_root() || !requires("setpriv") {
        return;
    }
    let mut site = Site::create(&[("vol0", 1 << 20)], SiteOptions::default());
    std::fs::set_permissions(site.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    for socket in [site.control_sock.clone(), site.splitter_control()] {
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} mode {mode:o}", socket.display());
    }
    site.kill_splitter();
    let out = status_as_nobody(&site);
    assert!(
        !out.status.success(),
        "nobody reached the appliance: {out:?}"
    );
    assert!(
        stderr(&out).contains("ermission denied"),
        "{}",
        stderr(&out)
    );
    site.kill_appliance();

    site.add_appliance_settings("control_socket_group = \"65534\"\n", "");
    site.start_role(Role::Appliance);
    let meta = std::fs::metadata(&site.control_sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    let out = status_as_nobody(&site);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status.get("groups").is_some(), "{status}");
    site.kill_appliance();

    let text = std::fs::read_to_string(&site.appliance_config).unwrap();
    std::fs::write(
        &site.appliance_config,
        text.replace("\"65534\"", "\"no-such-group\""),
    )
    .unwrap();
    let out = run(
        Command::new(cdp_bin())
            .arg("appliance")
            .arg("--config")
            .arg(&site.appliance_config),
        T,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"no-such-group\" is not a group"),
        "{}",
        stderr(&out)
    );
}
