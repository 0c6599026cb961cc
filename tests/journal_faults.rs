//! Journal faults through the real processes: a full disk under the appliance's data directory
//! and a torn journal tail after a SIGKILL while writes flow. The library-level failpoint
//! tests (`journal/tests/failpoints.rs`) cover the same faults inside the journal crate; these
//! check what the host, `cdp status`, the logs and the copies show end to end.
//!
//! Fault model: ENOSPC from a real filesystem (a small tmpfs the test mounts over the data
//! directory, grown later with `mount -o remount,size=`), SIGKILL of the appliance at a seeded
//! point of a seeded libnbd workload (`py/crash_client.py`), and garbage appended to the last
//! journal segment while the appliance is down. The oracle is the client's durable log:
//! `crash_client.py verify` checks an image holds every acknowledged-durable write (or a later
//! one), and `qemu-img compare` checks the replica against production. Needs root (mount).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// The workload's region: bytes around it are checked to stay untouched.
const REGION_OFFSET: u64 = 8 * MIB;
const REGION: u64 = 32 * MIB;
const BLOCK: u64 = 64 * 1024;
/// Size of the filesystem the appliance's data directory starts on: far less than the
/// workload writes, so the journal fills it within seconds.
const DATA_FS_SMALL: &str = "96m";
/// Its size once "an administrator added space".
const DATA_FS_LARGE: &str = "1g";
const FAULT_DEADLINE: Duration = Duration::from_secs(120);

/// A tmpfs mounted on a directory of its own; unmounted (lazily if still busy) on drop, after
/// the site that uses it has been dropped (declare it before the `Site`).
struct TmpfsMount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl TmpfsMount {
    fn new(size: &str) -> TmpfsMount {
        let dir = tempfile::Builder::new()
            .prefix("cdp-e2e-fs-")
            .tempdir_in("/tmp")
            .expect("tempdir for the mount point");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
            Duration::from_secs(30),
        );
        TmpfsMount { dir, mounted: true }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Changes the size in place; the files stay.
    fn resize(&self, size: &str) {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(self.path()),
            Duration::from_secs(30),
        );
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
        self.mounted = false;
    }
}

/// Kills the workload client if the test fails before the client exits.
struct ClientGuard(Child);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_client(site: &Site, log: &Path, stop: &Path, seed: u64, flush_every: u64) -> ClientGuard {
    ClientGuard(
        python("crash_client.py")
            .arg("run")
            .arg(site.nbd_uri("vol0"))
            .arg(log)
            .arg(stop)
            .arg(format!("--seed={}", seed >> 1))
            .arg(format!("--block-size={BLOCK}"))
            .arg(format!("--blocks={}", REGION / BLOCK))
            .arg(format!("--region-offset={REGION_OFFSET}"))
            .arg(format!("--flush-every={flush_every}"))
            .arg("--fua-every=16")
            .arg("--depth=16")
            .stdin(Stdio::null())
            .spawn()
            .expect("start crash_client.py"),
    )
}

/// Creates the stop file and waits for the client; it must have stopped on the stop file,
/// never on a failed request (the host is served throughout).
fn stop_client(mut client: ClientGuard, stop: &Path, log: &Path, site: &Site) {
    std::fs::write(stop, b"").unwrap();
    let status = wait_child(&mut client.0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the workload did not stop\n{}", site.logs()));
    assert!(status.success(), "crash_client.py run: {status}");
    let text = std::fs::read_to_string(log).unwrap();
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("E ")).collect();
    assert!(
        failed.is_empty(),
        "the host saw a failed request: {failed:?}\n{}",
        site.logs()
    );
    assert!(
        text.lines().last().is_some_and(|l| l.starts_with("X ")),
        "the client log does not end with its stop line"
    );
}

fn count_flushes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.lines().filter(|l| l.starts_with("F ")).count())
        .unwrap_or(0)
}

/// The client log's whole lines so far.
fn log_prefix(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match text.rfind('\n') {
        Some(end) => text[..=end].to_string(),
        None => String::new(),
    }
}

/// The splitter's state for `vol` in `cdp status --json` ("protecting", "marking", ...).
fn splitter_state(status: &serde_json::Value, vol: &str) -> String {
    let vols = status["splitter"]["volumes"].as_array().cloned();
    let v = vols
        .unwrap_or_default()
        .into_iter()
        .find(|v| v["volume"].as_str() == Some(vol) || v["name"].as_str() == Some(vol));
    match v {
        Some(v) => v["state"]
            .as_str()
            .or_else(|| v["state"]["state"].as_str())
            .or_else(|| v["state"]["mode"].as_str())
            .unwrap_or("?")
            .to_string(),
        None => "?".into(),
    }
}

fn group_failure(status: &serde_json::Value) -> Option<String> {
    status["groups"][0]["failure"].as_str().map(str::to_string)
}

fn assert_no_panic(site: &Site) {
    for role in [Role::Appliance, Role::Splitter] {
        let log = std::fs::read_to_string(site.log_path(role)).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "the {role:?} panicked\n{}",
            site.logs()
        );
    }
}

/// The journal's segment files (not the undo stream's), highest index last.
fn journal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join("groups").join("default").join("journal");
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
    walk(&dir, &mut out);
    // Names are zero-padded indexes, so the name order is the index order.
    out.sort();
    out
}

/// `cdp journal inspect DATA_DIR --json` must exit 0 and say clean.
fn assert_journal_clean(data_dir: &Path, site: &Site) {
    let out = run(
        Command::new(cdp_bin())
            .args(["journal", "inspect", "--json"])
            .arg(data_dir),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "cdp journal inspect printed no JSON ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report["clean"] == serde_json::Value::Bool(true),
        "cdp journal inspect {data_dir:?} is not clean ({}): {report:#}\n{}",
        out.status,
        site.logs()
    );
}

/// A file of zeroes as large as the volume: what production and replica held before the test.
fn zero_baseline(site: &Site) -> PathBuf {
    let path = site.root().join("baseline-zero.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    path
}

#[test]
fn journal_disk_full_fences_group_and_host_keeps_writing() {
    // Goal: DESIGN rule 5 for a full disk, plus rule 1 across it. When the journal cannot grow,
    // the group is fenced with a clear error (status `failure`, appliance log), the host keeps
    // being served (the splitter marks), no process panics, every write durable before the
    // fence is in the journal, and once space is added and the appliance restarted, the resync
    // brings the replica to production. Method: the appliance's data_dir is a 96 MiB tmpfs;
    // a seeded libnbd workload (64 KiB writes, FLUSH every few, some FUA) writes far more than
    // that. While it runs the test notes the client log read just before each status poll that
    // still shows no failure: every FLUSH/FUA in that prefix was acknowledged through the
    // journal; the log read once the fence is seen lists every write the journal may hold.
    // After the fence is seen the host must complete more FLUSHes. Then the workload stops, the
    // splitter is stopped (its bitmap keeps the marked regions), the tmpfs grown, the appliance
    // restarted: the replica, fed by the journal alone, must hold every write durable in that
    // prefix. Finally the splitter restarts and resyncs: production and replica must hold
    // every durable write of the whole log and equal each other, and the journal inspects
    // clean.
    if reference_mode()
        || !requires_condition(is_root(), "mounting a tmpfs needs root")
        || !requires("mount")
        || !requires("qemu-img")
        || !requires("qemu-io")
        || !requires_python_libnbd()
    {
        return;
    }
    let seed = seed("journal_disk_full");
    let mut rng = SplitMix64(seed);
    // Declared before the site: dropped after it, once the appliance no longer holds files.
    let data_fs = TmpfsMount::new(DATA_FS_SMALL);
    let data_dir = data_fs.path().join("appliance");
    let mut site = Site::create(&[("vol0", SIZE)], SiteOptions::default());
    site.set_appliance_data_dir(&data_dir);
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(DISTRIBUTED_DEADLINE);
    let baseline = zero_baseline(&site);

    let log = site.root().join("client.log");
    let stop = site.root().join("stop");
    let flush_every = 4 + rng.below(13);
    eprintln!("flush every {flush_every} writes");
    let client = start_client(&site, &log, &stop, rng.next_u64(), flush_every);

    // Poll until the group is fenced; remember the log prefix seen before the last poll that
    // still showed no failure (read before the status call, so it precedes the fence).
    let mut durable_prefix = String::new();
    let deadline = Instant::now() + FAULT_DEADLINE;
    let (failure, log_at_fence) = loop {
        let prefix = log_prefix(&log);
        let status = site.status();
        if let Some(failure) = group_failure(&status) {
            eprintln!("fenced: {failure}; status: {status}");
            // Read after the fence was seen: every write the journal can hold is issued here.
            break (failure, log_prefix(&log));
        }
        durable_prefix = prefix;
        assert!(
            Instant::now() < deadline,
            "the journal never filled {DATA_FS_SMALL}: {status:#}\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        failure.contains("No space left on device"),
        "the group's failure does not name the full disk: {failure}"
    );
    let appliance_log = std::fs::read_to_string(site.log_path(Role::Appliance)).unwrap();
    assert!(
        appliance_log.contains("group fenced") && appliance_log.contains("No space left"),
        "the appliance log does not report the fence and its cause\n{}",
        site.logs()
    );

    // The host is still served: more FLUSHes complete after the fence, and the splitter says
    // it is marking.
    let flushes_at_fence = count_flushes(&log);
    assert!(
        poll_until(FAULT_DEADLINE, || count_flushes(&log)
            >= flushes_at_fence + 5),
        "the host's flushes stopped completing after the journal filled\n{}",
        site.logs()
    );
    let status = site.status();
    assert_eq!(
        splitter_state(&status, "vol0"),
        "marking",
        "the splitter is not marking after the fence: {status:#}"
    );
    stop_client(client, &stop, &log, &site);
    site.assert_alive();
    assert_no_panic(&site);

    // Stop the splitter cleanly (its bitmap holds the regions the journal lacks), then the
    // appliance: neither may die of the full disk.
    let splitter_exit = site.terminate(Role::Splitter, Duration::from_secs(30));
    assert!(splitter_exit.success(), "splitter stop: {splitter_exit}");
    let appliance_exit = site.terminate(Role::Appliance, Duration::from_secs(30));
    assert!(
        appliance_exit.success(),
        "the fenced appliance did not stop cleanly: {appliance_exit}\n{}",
        site.logs()
    );
    assert_no_panic(&site);

    // Space added; the appliance reopens the journal and distributes it.
    data_fs.resize(DATA_FS_LARGE);
    site.start_role(Role::Appliance);
    let status = site.status();
    assert_eq!(
        group_failure(&status),
        None,
        "the group is still fenced after a restart with space: {status:#}"
    );
    site.wait_distributed(DISTRIBUTED_DEADLINE);
    // The oracle for the journal alone: durability claims (F, U) only from the prefix read
    // before the fence, but every write issued until the fence was seen, since any of them
    // may have been journaled.
    let mut oracle = durable_prefix.clone();
    for line in log_at_fence[durable_prefix.len()..].lines() {
        if line.starts_with("I ") {
            oracle.push_str(line);
            oracle.push('\n');
        }
    }
    let prefix_log = site.root().join("client-before-fence.log");
    std::fs::write(&prefix_log, &oracle).unwrap();
    verify_crash_log(
        &prefix_log,
        &site.volume("vol0").replica,
        &baseline,
        "replica from the journal alone, writes durable before the fence",
        &site,
    );

    // The splitter resyncs what it marked; then both copies hold every durable write.
    site.start_role(Role::Splitter);
    site.settle();
    assert_copies_durable_and_clean(&mut site, &log, &baseline, &data_dir);
}

#[test]
fn journal_torn_tail_after_kill_during_writes() {
    // Goal: DESIGN rule 4 with writes in flight: a SIGKILLed appliance whose last journal
    // segment ends in garbage reopens cleanly, cuts exactly the garbage (and at most a
    // partly written record before it), and the splitter reconnects and resyncs, losing no
    // durable write. Method: a seeded libnbd workload runs; after a seeded number of FLUSHes
    // the appliance is SIGKILLed and random bytes are appended to the highest-index journal
    // segment; the appliance restarts while the host keeps writing. Its log must report the
    // cut of that file, the host must complete FLUSHes again through the journal, production
    // and replica must hold every durable write and equal each other, and `cdp journal
    // inspect` must report the journal clean.
    if reference_mode()
        || !requires("qemu-img")
        || !requires("qemu-io")
        || !requires_python_libnbd()
    {
        return;
    }
    let seed = seed("journal_torn_tail");
    let mut rng = SplitMix64(seed);
    let mut site = Site::start(&[("vol0", SIZE)]);
    site.wait_connected(DISTRIBUTED_DEADLINE);
    let data_dir = site.appliance_data_dir();
    let baseline = zero_baseline(&site);
    let log = site.root().join("client.log");
    let stop = site.root().join("stop");
    let flush_every = 4 + rng.below(13);
    let kill_after = 2 + rng.below(30) as usize;
    eprintln!("flush every {flush_every} writes, kill after {kill_after} flushes");
    let client = start_client(&site, &log, &stop, rng.next_u64(), flush_every);
    assert!(
        poll_until(FAULT_DEADLINE, || count_flushes(&log) >= kill_after),
        "the workload did not reach {kill_after} flushes\n{}",
        site.logs()
    );
    site.kill_appliance();

    let segments = journal_segments(&data_dir);
    let last = segments
        .last()
        .expect("no journal segment (*.seg) found")
        .clone();
    let length_before = std::fs::metadata(&last).unwrap().len();
    let garbage = pattern(rng.next_u64(), 1 + rng.below(8192) as usize);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &garbage).unwrap();
    drop(f);
    eprintln!(
        "appended {} garbage bytes to {} ({length_before} bytes)",
        garbage.len(),
        last.display()
    );

    let flushes_before_restart = count_flushes(&log);
    site.start_role(Role::Appliance);
    let appliance_log = std::fs::read_to_string(site.log_path(Role::Appliance)).unwrap();
    let cut = appliance_log
        .lines()
        .rfind(|l| l.contains("cutting torn journal tail"))
        .unwrap_or_else(|| panic!("the appliance did not log a tail cut\n{}", site.logs()))
        .to_string();
    let file_name = last.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        cut.contains(&file_name),
        "the cut names another file than {file_name}: {cut}"
    );
    let field = |name: &str| -> u64 {
        cut.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in the cut line: {cut}"))
    };
    let (offset, cut_bytes) = (field("offset"), field("cut_bytes"));
    assert!(
        offset <= length_before && cut_bytes >= garbage.len() as u64,
        "the cut (offset {offset}, {cut_bytes} bytes) does not cover exactly the garbage after \
         {length_before} bytes ({} bytes)",
        garbage.len()
    );

    // The splitter reconnects and resyncs what it marked; FLUSHes complete again.
    assert!(
        poll_until(FAULT_DEADLINE, || count_flushes(&log)
            >= flushes_before_restart + 5),
        "the host's flushes did not resume after the restart\n{}",
        site.logs()
    );
    site.wait_connected(DISTRIBUTED_DEADLINE);
    stop_client(client, &stop, &log, &site);
    site.settle();
    assert_copies_durable_and_clean(&mut site, &log, &baseline, &data_dir);
}

/// Both copies hold every durable write of the log and equal each other, the journal is
/// clean offline, both processes live and none panicked.
fn assert_copies_durable_and_clean(site: &mut Site, log: &Path, baseline: &Path, data_dir: &Path) {
    for (what, copy) in [
        ("production", &site.volume("vol0").production),
        ("replica", &site.volume("vol0").replica),
    ] {
        verify_crash_log(log, copy, baseline, what, site);
    }
    site.assert_replica_equals_production("vol0");
    assert_journal_clean(data_dir, site);
    site.assert_alive();
    assert_no_panic(site);
}
