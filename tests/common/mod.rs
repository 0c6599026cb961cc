//! End-to-end test harness: starts a real appliance and splitter (`cdp appliance`, `cdp splitter`)
//! on generated configs in a temporary directory, and gives tests an oracle to check bytes against.
//!
//! Fault model: the tests drive the product only through its public interfaces (NBD sockets, the
//! `cdp status` control socket, the files of the copies) and inject crashes with SIGKILL.
//!
//! Setting `CDP_TEST_REFERENCE=1` serves the same volumes with `qemu-storage-daemon` instead of
//! cdp, so that a test's client-side steps can be validated against a known-good NBD server;
//! appliance-only checks (status, replica, appliance kills) are then skipped.
#![allow(dead_code)]

pub mod cli;
pub mod garage;
pub mod journals;
pub mod link_proxy;
pub mod mount;
pub mod replication;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to start accepting connections.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long distribution may take to catch up with the journal after a test's writes.
pub const DISTRIBUTED_DEADLINE: Duration = Duration::from_secs(120);
/// The interpreter with the `nbd` (libnbd) module; a pyenv `python3` on PATH may lack it.
pub const PYTHON: &str = "/usr/bin/python3";

/// Returns true if `tool` is on PATH (or in an sbin directory). If it is missing, a test must not
/// pass as green in CI: panic when `CI` is set, otherwise print SKIP and return false.
pub fn requires(tool: &str) -> bool {
    if find_tool(tool).is_some() {
        return true;
    }
    skip_or_fail(&format!("required tool `{tool}` is not installed"))
}

/// Like `requires`, for the Python libnbd binding (Debian package python3-libnbd).
pub fn requires_python_libnbd() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok || skip_or_fail("python3 module `nbd` (python3-libnbd) is not installed")
}

/// Like `requires`, for a condition that is not a tool (root, /dev/fuse, ...).
pub fn requires_condition(ok: bool, what: &str) -> bool {
    ok || skip_or_fail(what)
}

fn skip_or_fail(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set, so a missing requirement fails the test)");
    }
    eprintln!("SKIP: {why}");
    false
}

/// Finds an executable on PATH, then in the sbin directories that a non-login PATH can miss.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(tool);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Some(candidate);
            }
        }
    }
    None
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True when tests run against qemu-storage-daemon instead of cdp (see the module comment).
pub fn reference_mode() -> bool {
    std::env::var("CDP_TEST_REFERENCE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Where sites and remote appliances keep their files: `/tmp`, or `CDP_TEST_DIR` (a short
/// path: unix socket paths must stay under 108 bytes), e.g. a tmpfs for a long campaign.
pub fn test_dir_base() -> PathBuf {
    std::env::var_os("CDP_TEST_DIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
}

/// Path of the product binary under test: the one cargo built, or `CDP_TEST_BIN` (to test an
/// installed or saved binary).
pub fn cdp_bin() -> PathBuf {
    match std::env::var_os("CDP_TEST_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_BIN_EXE_cdp")),
    }
}

/// A seed for randomized tests: `CDP_TEST_SEED` if set, else derived from the clock. Printed so a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("CDP_TEST_SEED") {
        Ok(v) => v.parse().expect("CDP_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (replay with CDP_TEST_SEED={seed})");
    seed
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline.

/// Renders a command line for failure messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with captured output, killing it at `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let line = show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = wait_child(&mut child, timeout);
    let stdout = out_thread.join().unwrap();
    let stderr = err_thread.join().unwrap();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "`{line}` did not finish within {timeout:?}; killed.\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Runs `cmd` and panics (with its output) unless it exits 0. Returns stdout as text.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let line = show(cmd);
    let out = run(cmd, timeout);
    if !out.status.success() {
        panic!(
            "`{line}` failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls a child until it exits or the timeout passes; on timeout kills it and returns None.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until it holds; returns false if `timeout` passes first.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True if a unix socket at `path` accepts a connection now.
pub fn unix_accepts(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Model: deterministic patterns and an in-memory image of what a volume must hold.

/// splitmix64: a tiny, well-mixed PRNG whose stream is easy to reproduce in any language.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in 0..n (n > 0); the slight modulo bias does not matter for tests.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `len` deterministic bytes from `seed`: the little-endian splitmix64 stream.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What a volume must hold: its bytes, plus ranges whose content the protocol leaves unspecified
/// (after TRIM a server may return the old data or zeroes).
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
    dont_care: Vec<(u64, u64)>,
}

impl Model {
    pub fn zeroed(size: u64) -> Model {
        Model {
            bytes: vec![0; size as usize],
            dont_care: Vec::new(),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
        self.cut_dont_care(offset, data.len() as u64);
    }

    pub fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        let o = offset as usize;
        self.bytes[o..o + len as usize].fill(byte);
        self.cut_dont_care(offset, len);
    }

    /// TRIM: afterwards the range may read as anything (old data or zeroes).
    pub fn discard(&mut self, offset: u64, len: u64) {
        self.cut_dont_care(offset, len);
        self.dont_care.push((offset, offset + len));
    }

    fn cut_dont_care(&mut self, offset: u64, len: u64) {
        let (s, e) = (offset, offset + len);
        let mut out = Vec::new();
        for &(a, b) in &self.dont_care {
            if b <= s || a >= e {
                out.push((a, b));
                continue;
            }
            if a < s {
                out.push((a, s));
            }
            if b > e {
                out.push((e, b));
            }
        }
        self.dont_care = out;
    }

    fn cared(&self, pos: u64) -> bool {
        !self.dont_care.iter().any(|&(a, b)| pos >= a && pos < b)
    }

    /// Panics, naming the first differing offset, unless `actual` matches the model.
    pub fn check(&self, what: &str, actual: &[u8]) {
        assert_eq!(
            actual.len(),
            self.bytes.len(),
            "{what}: size {} but the model has {}",
            actual.len(),
            self.bytes.len()
        );
        if let Some(pos) = first_difference(&self.bytes, actual, |p| self.cared(p)) {
            let end = (pos as usize + 16).min(actual.len());
            panic!(
                "{what}: differs from the model at offset {pos}: expected {:02x?}, found {:02x?}",
                &self.bytes[pos as usize..end],
                &actual[pos as usize..end]
            );
        }
    }

    pub fn check_file(&self, what: &str, path: &Path) {
        let actual = std::fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
        self.check(what, &actual);
    }
}

/// The first offset where `a` and `b` differ among offsets `care` accepts.
pub fn first_difference(a: &[u8], b: &[u8], care: impl Fn(u64) -> bool) -> Option<u64> {
    const CHUNK: usize = 4096;
    for (i, (ca, cb)) in a.chunks(CHUNK).zip(b.chunks(CHUNK)).enumerate() {
        if ca == cb {
            continue;
        }
        for (j, (x, y)) in ca.iter().zip(cb).enumerate() {
            let pos = (i * CHUNK + j) as u64;
            if x != y && care(pos) {
                return Some(pos);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Site: one appliance and one splitter protecting N volumes.

/// One protected volume of a site.
#[derive(Clone, Debug)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub production: PathBuf,
    pub replica: PathBuf,
}

/// Which of the two product processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Appliance,
    Splitter,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Appliance => "appliance",
            Role::Splitter => "splitter",
        }
    }
}

/// How the site's processes are wired; the default is unix sockets for both the split link and
/// NBD.
#[derive(Clone, Copy, Debug, Default)]
pub struct SiteOptions {
    /// Split link over TCP on 127.0.0.1 instead of a unix socket.
    pub link_tcp: bool,
    /// Also serve NBD on 127.0.0.1 TCP (the unix socket is always there).
    pub nbd_tcp: bool,
}

/// A free TCP port on 127.0.0.1 (bound and released; a small race with other processes is
/// accepted in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running appliance + splitter in a temporary directory. Drop kills both and, if the test is
/// failing, prints their logs.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub volumes: Vec<Volume>,
    pub nbd_sock: PathBuf,
    pub link_sock: PathBuf,
    pub control_sock: PathBuf,
    pub appliance_config: PathBuf,
    pub splitter_config: PathBuf,
    /// The split link's TCP port when `SiteOptions::link_tcp`.
    pub link_port: Option<u16>,
    /// The NBD TCP port when `SiteOptions::nbd_tcp`.
    pub nbd_port: Option<u16>,
    appliance: Option<Child>,
    splitter: Option<Child>,
}

impl Site {
    /// Starts a site with one volume per `(name, size)`.
    pub fn start(volumes: &[(&str, u64)]) -> Site {
        Site::start_with(volumes, SiteOptions::default())
    }

    pub fn start_with(volumes: &[(&str, u64)], options: SiteOptions) -> Site {
        let mut site = Site::create(volumes, options);
        site.start_role(Role::Appliance);
        site.start_role(Role::Splitter);
        site
    }

    /// Adds settings to the appliance config before the appliance starts: `top_level` keys
    /// (they must precede every table) and keys of the group `default` (placed right after its
    /// name, so a table must be given inline).
    pub fn add_appliance_settings(&self, top_level: &str, group_keys: &str) {
        let text = std::fs::read_to_string(&self.appliance_config).unwrap();
        let text = format!(
            "{top_level}{}",
            text.replacen(
                "name = \"default\"\n",
                &format!("name = \"default\"\n{group_keys}"),
                1
            )
        );
        std::fs::write(&self.appliance_config, text).unwrap();
    }

    /// Writes configs and creates sparse production files without starting anything.
    pub fn create(volumes: &[(&str, u64)], options: SiteOptions) -> Site {
        // Short prefix and /tmp: unix socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("cdp-e2e-")
            .tempdir_in(test_dir_base())
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        for sub in ["production", "replica", "appliance"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let volumes: Vec<Volume> = volumes
            .iter()
            .map(|&(name, size)| Volume {
                name: name.to_string(),
                size,
                production: root.join("production").join(format!("{name}.img")),
                replica: root.join("replica").join(format!("{name}.img")),
            })
            .collect();
        for v in &volumes {
            let f = File::create(&v.production).unwrap();
            f.set_len(v.size).unwrap();
        }
        let site = Site {
            nbd_sock: root.join("nbd.sock"),
            link_sock: root.join("link.sock"),
            control_sock: root.join("appliance.ctl"),
            appliance_config: root.join("appliance.toml"),
            splitter_config: root.join("splitter.toml"),
            link_port: options.link_tcp.then(free_port),
            nbd_port: options.nbd_tcp.then(free_port),
            dir,
            volumes,
            appliance: None,
            splitter: None,
        };
        site.write_configs();
        site
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The split link endpoint as both configs spell it.
    fn link_endpoint(&self) -> String {
        match self.link_port {
            Some(port) => format!("127.0.0.1:{port}"),
            None => format!("unix:{}", self.link_sock.display()),
        }
    }

    fn write_configs(&self) {
        let root = self.root();
        let mut a = format!(
            "data_dir = \"{}\"\nlink_listen = \"{}\"\ncontrol = \"{}\"\n\n[[group]]\nname = \"default\"\n",
            root.join("appliance").display(),
            self.link_endpoint(),
            self.control_sock.display()
        );
        for v in &self.volumes {
            a += &format!(
                "\n[[group.volume]]\nname = \"{}\"\nsize = {}\nreplica = \"{}\"\n",
                v.name,
                v.size,
                v.replica.display()
            );
        }
        std::fs::write(&self.appliance_config, a).unwrap();
        let mut s = format!(
            "appliance = \"{}\"\nnbd_unix = \"{}\"\ncontrol = \"{}\"\nhandshake_timeout_s = 60\n",
            self.link_endpoint(),
            self.nbd_sock.display(),
            self.splitter_control().display()
        );
        if let Some(port) = self.nbd_port {
            s += &format!("nbd_tcp = \"127.0.0.1:{port}\"\n");
        }
        for v in &self.volumes {
            s += &format!(
                "\n[[volume]]\nname = \"{}\"\npath = \"{}\"\n",
                v.name,
                v.production.display()
            );
        }
        std::fs::write(&self.splitter_config, s).unwrap();
    }

    /// Sum of `copied_bytes=N` over the splitter's "resync complete" log lines: the payload
    /// bytes its resyncs copied from production into the journal.
    pub fn resync_copied_bytes(&self) -> Option<u64> {
        let log = std::fs::read_to_string(self.log_path(Role::Splitter)).ok()?;
        let mut total = None;
        for line in log.lines().filter(|l| l.contains("resync complete")) {
            let n = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("copied_bytes="))
                .and_then(|v| v.parse::<u64>().ok())?;
            total = Some(total.unwrap_or(0) + n);
        }
        total
    }

    /// The splitter's control socket (protection state, resync progress).
    pub fn splitter_control(&self) -> PathBuf {
        self.root().join("splitter.ctl")
    }

    pub fn volume(&self, name: &str) -> &Volume {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    pub fn log_path(&self, role: Role) -> PathBuf {
        self.root().join(format!("{}.log", role.name()))
    }

    /// `nbd+unix:///VOL?socket=...`, for libnbd tools, qemu and fio.
    pub fn nbd_uri(&self, vol: &str) -> String {
        format!("nbd+unix:///{vol}?socket={}", self.nbd_sock.display())
    }

    /// `nbd://127.0.0.1:PORT/VOL`, when the site serves NBD over TCP.
    pub fn nbd_tcp_uri(&self, vol: &str) -> String {
        let port = self.nbd_port.expect("site started without nbd_tcp");
        format!("nbd://127.0.0.1:{port}/{vol}")
    }

    fn child_mut(&mut self, role: Role) -> &mut Option<Child> {
        match role {
            Role::Appliance => &mut self.appliance,
            Role::Splitter => &mut self.splitter,
        }
    }

    /// Starts `role` (appending to its log) and waits until its sockets accept connections.
    pub fn start_role(&mut self, role: Role) {
        assert!(
            self.child_mut(role).is_none(),
            "{} already running",
            role.name()
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(role))
            .unwrap();
        let _ = writeln!(&log, "===== harness: starting {} =====", role.name());
        let mut cmd = if reference_mode() {
            match role {
                // No appliance in reference mode: qemu-storage-daemon has no journal.
                Role::Appliance => return,
                Role::Splitter => self.reference_server_command(),
            }
        } else {
            let config = match role {
                Role::Appliance => &self.appliance_config,
                Role::Splitter => &self.splitter_config,
            };
            let mut c = Command::new(cdp_bin());
            c.arg(role.name()).arg("--config").arg(config);
            c
        };
        // cdp reads its log filter from CDP_LOG; keep a caller's choice.
        if std::env::var_os("CDP_LOG").is_none() {
            cmd.env("CDP_LOG", "info");
        }
        // Logs go to a file: no terminal colour codes.
        cmd.env("NO_COLOR", "1");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", show(&cmd)));
        *self.child_mut(role) = Some(child);
        self.wait_ready(role);
    }

    fn reference_server_command(&self) -> Command {
        let mut c = Command::new("qemu-storage-daemon");
        for (i, v) in self.volumes.iter().enumerate() {
            c.arg("--blockdev").arg(format!(
                "driver=file,node-name=f{i},filename={}",
                v.production.display()
            ));
            c.arg("--blockdev")
                .arg(format!("driver=raw,node-name=v{i},file=f{i}"));
        }
        c.arg("--nbd-server").arg(format!(
            "addr.type=unix,addr.path={},max-connections=32",
            self.nbd_sock.display()
        ));
        for (i, v) in self.volumes.iter().enumerate() {
            c.arg("--export").arg(format!(
                "type=nbd,id=e{i},node-name=v{i},name={},writable=on",
                v.name
            ));
        }
        c
    }

    fn wait_ready(&mut self, role: Role) {
        let sockets: Vec<PathBuf> = match role {
            Role::Appliance => vec![self.control_sock.clone()],
            Role::Splitter => vec![self.nbd_sock.clone()],
        };
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child_mut(role).as_mut().unwrap().try_wait().unwrap() {
                *self.child_mut(role) = None;
                panic!(
                    "{} exited during startup ({status})\n{}",
                    role.name(),
                    self.logs()
                );
            }
            let tcp_ready = match (role, self.nbd_port) {
                (Role::Splitter, Some(port)) => {
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                }
                _ => true,
            };
            if tcp_ready && sockets.iter().all(|s| unix_accepts(s)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not accept connections on {sockets:?} within {READY_DEADLINE:?}\n{}",
                    role.name(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs `role` (a crash at an arbitrary instant) and reaps it.
    pub fn kill(&mut self, role: Role) {
        if let Some(mut child) = self.child_mut(role).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn kill_appliance(&mut self) {
        self.kill(Role::Appliance);
    }

    pub fn kill_splitter(&mut self) {
        self.kill(Role::Splitter);
    }

    pub fn restart(&mut self, role: Role) {
        self.kill(role);
        self.start_role(role);
    }

    pub fn restart_appliance(&mut self) {
        self.restart(Role::Appliance);
    }

    pub fn restart_splitter(&mut self) {
        self.restart(Role::Splitter);
    }

    /// True if `role` is still running (it did not crash on its own).
    pub fn is_running(&mut self, role: Role) -> bool {
        if reference_mode() && role == Role::Appliance {
            return true;
        }
        match self.child_mut(role) {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Panics with the logs unless both processes are still running.
    pub fn assert_alive(&mut self) {
        for role in [Role::Appliance, Role::Splitter] {
            if !self.is_running(role) {
                let status = self
                    .child_mut(role)
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "{} is not running ({status:?})\n{}",
                    role.name(),
                    self.logs()
                );
            }
        }
    }

    /// Sends SIGTERM to `role` and waits for it to exit; panics if it does not exit within
    /// `timeout` or dies by a signal instead of stopping cleanly.
    pub fn terminate(&mut self, role: Role, timeout: Duration) -> ExitStatus {
        let mut child = self
            .child_mut(role)
            .take()
            .unwrap_or_else(|| panic!("{} is not running", role.name()));
        // SAFETY: kill(2) on our own child's pid; the child is not yet reaped, so the pid is ours.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        match wait_child(&mut child, timeout) {
            Some(status) => status,
            None => panic!(
                "{} did not exit within {timeout:?} of SIGTERM\n{}",
                role.name(),
                self.logs()
            ),
        }
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for role in [Role::Appliance, Role::Splitter] {
            let text = std::fs::read_to_string(self.log_path(role)).unwrap_or_default();
            // Keep failure output readable: the last 200 lines are where the trouble is.
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            s += &format!(
                "----- {} log ({}) -----\n{}\n",
                role.name(),
                self.log_path(role).display(),
                tail.join("\n")
            );
        }
        s
    }

    /// `cdp status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        assert!(
            !reference_mode(),
            "status() has no appliance in reference mode"
        );
        let out = run(
            Command::new(cdp_bin())
                .arg("status")
                .arg("--control")
                .arg(&self.control_sock)
                .arg("--splitter-control")
                .arg(self.splitter_control())
                .arg("--json"),
            Duration::from_secs(30),
        );
        if !out.status.success() {
            panic!(
                "cdp status failed: {}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cdp status --json printed invalid JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Sends NBD FLUSH on every volume, so that every write completed before is in the journal
    /// (DESIGN rule 1) and `last_seq` covers it.
    pub fn flush_all(&self) {
        for v in &self.volumes {
            self.flush(&v.name);
        }
    }

    pub fn flush(&self, vol: &str) {
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", "flush"])
                .arg(self.nbd_uri(vol)),
            Duration::from_secs(60),
        );
    }

    /// Polls status until the appliance sees a splitter connected for every volume and the
    /// splitter reports every volume as protecting (no resync pending or running).
    pub fn wait_connected(&self, timeout: Duration) {
        if reference_mode() {
            return;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let all = status["groups"].as_array().is_some_and(|groups| {
                groups.iter().all(|g| {
                    g["volumes"].as_array().is_some_and(|vols| {
                        vols.iter().all(|v| v["connected"].as_bool() == Some(true))
                    })
                })
            });
            // Resyncs (after an outage, or the first-time copy) must be done too: until then
            // the journal lacks regions production has.
            let protecting = status["splitter"]["volumes"]
                .as_array()
                .is_some_and(|vols| {
                    vols.iter()
                        .all(|v| v["state"].as_str() == Some("protecting"))
                });
            if all && protecting {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "splitter not connected for every volume within {timeout:?}: {status}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls status until every group has `distributed_seq == last_seq`.
    pub fn wait_distributed(&self, timeout: Duration) {
        if reference_mode() {
            return;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let groups = status["groups"].as_array().expect("status.groups array");
            assert!(!groups.is_empty(), "status lists no groups: {status}");
            let caught_up = groups.iter().all(|g| {
                let last = g["last_seq"].as_u64().expect("last_seq");
                let distributed = g["distributed_seq"].as_u64().expect("distributed_seq");
                distributed == last
            });
            if caught_up {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "distribution did not catch up within {timeout:?}; last status:\n{status:#}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Flush every volume, then wait until the replica has every journaled write.
    pub fn settle(&self) {
        // After an outage the splitter serves the host in marking mode; a flush only covers
        // the journal once its link is back, so wait for that first.
        self.wait_connected(DISTRIBUTED_DEADLINE);
        self.flush_all();
        self.wait_distributed(DISTRIBUTED_DEADLINE);
    }

    /// `qemu-img compare` of a volume's replica against its production file.
    pub fn assert_replica_equals_production(&self, vol: &str) {
        if reference_mode() {
            eprintln!("reference mode: replica of {vol} not checked");
            return;
        }
        let v = self.volume(vol);
        let meta = std::fs::metadata(&v.replica)
            .unwrap_or_else(|e| panic!("replica {:?} of {vol}: {e}", v.replica));
        assert_eq!(meta.len(), v.size, "replica of {vol} has the wrong size");
        let out = run(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&v.replica)
                .arg(&v.production),
            Duration::from_secs(120),
        );
        if !out.status.success() {
            panic!(
                "replica of {vol} differs from production (qemu-img compare exit {}):\n{}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
    }

    pub fn assert_all_replicas_equal_production(&self) {
        for v in &self.volumes {
            self.assert_replica_equals_production(&v.name);
        }
    }

    /// Reads a volume's production file.
    pub fn production_bytes(&self, vol: &str) -> Vec<u8> {
        std::fs::read(&self.volume(vol).production).unwrap()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill(Role::Splitter);
        self.kill(Role::Appliance);
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if std::env::var_os("CDP_TEST_KEEP").is_some() {
                let path =
                    std::mem::replace(&mut self.dir, tempfile::Builder::new().tempdir().unwrap())
                        .keep();
                eprintln!("CDP_TEST_KEEP: site directory kept at {}", path.display());
            }
        }
    }
}

/// The directory holding tests/py and tests/guest.
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// A python script from tests/py, run with the libnbd-capable interpreter.
pub fn python(script: &str) -> Command {
    let mut c = Command::new(PYTHON);
    c.arg(tests_dir().join("py").join(script));
    c
}

/// Sends one JSON request to a control socket (appliance or splitter) and returns the answer;
/// panics on an `{"error": ...}` answer.
pub fn control_request(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {socket:?}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut line = serde_json::to_vec(request).unwrap();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut answer)
        .unwrap_or_else(|e| panic!("reading the answer to {request} from {socket:?}: {e}"));
    let value: serde_json::Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("bad answer to {request} ({e}): {answer}"));
    assert!(
        value.get("error").is_none(),
        "{request} to {socket:?} failed: {value}"
    );
    value
}

// ---------------------------------------------------------------------------------------------
// Relocating the appliance's data directory (for tests that put it on a filesystem of their
// own, e.g. a small tmpfs to fill it up).

impl Site {
    /// The appliance's `data_dir` as its config currently says.
    pub fn appliance_data_dir(&self) -> PathBuf {
        let config = std::fs::read_to_string(&self.appliance_config).unwrap();
        let line = config
            .lines()
            .find_map(|l| l.strip_prefix("data_dir = \""))
            .expect("appliance.toml has a data_dir line");
        PathBuf::from(line.trim_end_matches('"'))
    }

    /// Points the appliance at another `data_dir` by rewriting appliance.toml; takes effect
    /// at the appliance's next start (call between `Site::create` and `start_role`).
    pub fn set_appliance_data_dir(&mut self, dir: &Path) {
        let old = self.appliance_data_dir();
        let config = std::fs::read_to_string(&self.appliance_config)
            .unwrap()
            .replacen(
                &format!("data_dir = \"{}\"", old.display()),
                &format!("data_dir = \"{}\"", dir.display()),
                1,
            );
        std::fs::write(&self.appliance_config, config).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Remote replication: a second appliance holding the remote copy of a site's group.

/// How a test's replication link is secured: mutual TLS with `test_pki()` (the default), or
/// plaintext, explicitly configured at both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSecurity {
    Tls,
    Plaintext,
}

/// `cdp tls ca --out DIR`: a certificate authority (ca.pem, ca-key.pem).
pub fn cdp_tls_ca(out: &Path) {
    run_ok(
        Command::new(cdp_bin())
            .args(["tls", "ca", "--out"])
            .arg(out),
        Duration::from_secs(30),
    );
}

/// `cdp tls issue --ca CA --name NAME EXTRA... --out DIR`: cert.pem, key.pem and ca.pem.
pub fn cdp_tls_issue(ca: &Path, name: &str, extra: &[&str], out: &Path) {
    run_ok(
        Command::new(cdp_bin())
            .args(["tls", "issue", "--ca"])
            .arg(ca)
            .args(["--name", name])
            .args(extra)
            .arg("--out")
            .arg(out),
        Duration::from_secs(30),
    );
}

/// The inline TOML table naming the three PEM files `cdp tls issue` wrote into `dir`.
pub fn tls_table(dir: &Path) -> String {
    format!(
        "{{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        dir.join("ca.pem").display(),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    )
}

/// Certificates every replication test of this test process shares, made once by the
/// `cdp tls` commands under test: one CA, `remote` for receivers (valid for 127.0.0.1 and
/// localhost) and `source` for shippers. Each directory holds ca.pem, cert.pem, key.pem.
pub struct TestPki {
    pub ca: PathBuf,
    pub remote: PathBuf,
    pub source: PathBuf,
}

pub fn test_pki() -> &'static TestPki {
    static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Directories of test processes that are gone (named by their pid).
        if let Ok(entries) = std::fs::read_dir(base) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("cdp-tls-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        let root = base.join(format!("cdp-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pki = TestPki {
            ca: root.join("ca"),
            remote: root.join("remote"),
            source: root.join("source"),
        };
        cdp_tls_ca(&pki.ca);
        cdp_tls_issue(
            &pki.ca,
            "remote",
            &["--ip", "127.0.0.1", "--dns", "localhost"],
            &pki.remote,
        );
        cdp_tls_issue(&pki.ca, "source", &[], &pki.source);
        pki
    })
}

/// A remote appliance (`cdp appliance --config`, its own data directory) whose group
/// `default` is the remote copy (`source = "remote"`) of a site's group, fed over loopback TCP.
pub struct RemoteAppliance {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub control_sock: PathBuf,
    /// `replication_listen`, the address the site's `[group.remote]` names.
    pub endpoint: String,
    /// Volume name and remote replica file.
    pub replicas: Vec<(String, PathBuf)>,
    child: Option<Child>,
}

impl RemoteAppliance {
    /// Writes the config for a remote copy of `volumes` (mutual TLS with `test_pki()`) and
    /// starts the appliance.
    pub fn start(volumes: &[(&str, u64)]) -> RemoteAppliance {
        RemoteAppliance::start_with(volumes, LinkSecurity::Tls)
    }

    /// Like `start`, with the replication listener secured as `security` says.
    pub fn start_with(volumes: &[(&str, u64)], security: LinkSecurity) -> RemoteAppliance {
        RemoteAppliance::start_configured(volumes, security, "")
    }

    /// Like `start_with`, with `top_level` (whole `key = value` lines) added to the config's
    /// top level.
    pub fn start_configured(
        volumes: &[(&str, u64)],
        security: LinkSecurity,
        top_level: &str,
    ) -> RemoteAppliance {
        let dir = tempfile::Builder::new()
            .prefix("cdp-remote-")
            .tempdir_in(test_dir_base())
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("replica")).unwrap();
        let endpoint = format!("127.0.0.1:{}", free_port());
        let control_sock = root.join("appliance.ctl");
        let security_line = match security {
            LinkSecurity::Tls => format!("replication_tls = {}\n", tls_table(&test_pki().remote)),
            LinkSecurity::Plaintext => "replication_plaintext = true\n".to_string(),
        };
        let mut text = format!(
            "data_dir = \"{}\"\nlink_listen = \"unix:{}\"\ncontrol = \"{}\"\nreplication_listen = \"{endpoint}\"\n{security_line}{top_level}\n[[group]]\nname = \"default\"\nsource = \"remote\"\n",
            root.join("appliance").display(),
            root.join("link.sock").display(),
            control_sock.display()
        );
        let mut replicas = Vec::new();
        for &(name, size) in volumes {
            let replica = root.join("replica").join(format!("{name}.img"));
            text += &format!(
                "\n[[group.volume]]\nname = \"{name}\"\nsize = {size}\nreplica = \"{}\"\n",
                replica.display()
            );
            replicas.push((name.to_string(), replica));
        }
        let config = root.join("appliance.toml");
        std::fs::write(&config, text).unwrap();
        let mut remote = RemoteAppliance {
            dir,
            config,
            control_sock,
            endpoint,
            replicas,
            child: None,
        };
        remote.start_process();
        remote
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.root().join("remote-appliance.log")
    }

    /// Starts the process and waits for its control socket.
    pub fn start_process(&mut self) {
        assert!(self.child.is_none(), "remote appliance already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let _ = writeln!(&log, "===== harness: starting remote appliance =====");
        let mut cmd = Command::new(cdp_bin());
        cmd.arg("appliance").arg("--config").arg(&self.config);
        if std::env::var_os("CDP_LOG").is_none() {
            cmd.env("CDP_LOG", "info");
        }
        cmd.env("NO_COLOR", "1");
        self.child = Some(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", show(&cmd))),
        );
        let ready = poll_until(READY_DEADLINE, || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "remote appliance exited during startup ({status})\n{}",
                    self.logs()
                );
            }
            unix_accepts(&self.control_sock)
        });
        assert!(ready, "remote appliance not ready\n{}", self.logs());
    }

    /// SIGKILLs the process (a crash at an arbitrary instant) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last 200 lines of its log.
    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "----- remote appliance log ({}) -----\n{}\n",
            self.log_path().display(),
            lines[lines.len().saturating_sub(200)..].join("\n")
        )
    }

    /// `cdp status --json` of the remote appliance.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(
            Command::new(cdp_bin())
                .args(["status", "--json", "--control"])
                .arg(&self.control_sock),
            Duration::from_secs(30),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("remote status JSON ({e}): {out}"))
    }

    /// `cdp ARGS --control REMOTE_CTL --json`, parsed.
    pub fn cdp_json(&self, args: &[&str]) -> serde_json::Value {
        let out = run_ok(
            Command::new(cdp_bin())
                .args(args)
                .arg("--control")
                .arg(&self.control_sock),
            Duration::from_secs(120),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("cdp {args:?} JSON ({e}): {out}"))
    }

    pub fn replica(&self, volume: &str) -> &Path {
        &self
            .replicas
            .iter()
            .find(|(n, _)| n == volume)
            .unwrap_or_else(|| panic!("no remote volume {volume}"))
            .1
    }

    /// Waits until the remote group's replica holds every record it received.
    pub fn wait_distributed(&self, last_seq: u64, timeout: Duration) {
        let ok = poll_until(timeout, || {
            let g = &self.status()["groups"][0];
            g["last_seq"].as_u64() == Some(last_seq)
                && g["distributed_seq"].as_u64() == Some(last_seq)
        });
        assert!(
            ok,
            "remote did not distribute through seq {last_seq}: {}\n{}",
            self.status(),
            self.logs()
        );
    }

    /// The journal directory of the remote group (for offline comparison once stopped).
    pub fn group_dir(&self) -> PathBuf {
        self.root().join("appliance").join("groups").join("default")
    }
}

impl Drop for RemoteAppliance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Adds `[group.remote]` (shipping to `endpoint` over mutual TLS with `test_pki()`'s
/// `source` certificate) to the site's last configured group.
pub fn add_remote_to_site_config(site: &Site, endpoint: &str, rpo_s: u64) {
    let tls = format!("tls = {}\n", tls_table(&test_pki().source));
    add_remote_to_site_config_with(site, endpoint, rpo_s, &tls);
}

/// Adds `[group.remote]` shipping to `endpoint` with the link secured as `security` says.
pub fn add_remote_to_site_config_secured(
    site: &Site,
    endpoint: &str,
    rpo_s: u64,
    security: LinkSecurity,
) {
    match security {
        LinkSecurity::Tls => add_remote_to_site_config(site, endpoint, rpo_s),
        LinkSecurity::Plaintext => {
            add_remote_to_site_config_with(site, endpoint, rpo_s, "plaintext = true\n")
        }
    }
}

/// Adds `[group.remote]` shipping to `endpoint`, with `security_lines` (a `tls = {..}` or
/// `plaintext = true` line, or none to test the refusal) in it.
pub fn add_remote_to_site_config_with(
    site: &Site,
    endpoint: &str,
    rpo_s: u64,
    security_lines: &str,
) {
    let mut text = std::fs::read_to_string(&site.appliance_config).unwrap();
    text +=
        &format!("\n[group.remote]\nendpoint = \"{endpoint}\"\nrpo_s = {rpo_s}\n{security_lines}");
    std::fs::write(&site.appliance_config, text).unwrap();
}

/// `py/crash_client.py verify`: `image` holds every write the client's log calls durable
/// (or a later one), and outside the workload's region what `baseline` holds.
pub fn verify_crash_log(log: &Path, image: &Path, baseline: &Path, what: &str, site: &Site) {
    let out = run(
        python("crash_client.py")
            .arg("verify")
            .arg(log)
            .arg(image)
            .arg(baseline),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("{what}: {text}");
    assert!(
        out.status.success(),
        "{what}: durable writes lost or corrupted ({}):\n{text}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        site.logs()
    );
}
