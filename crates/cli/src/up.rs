//! `cdp up`: one protected volume with embedded defaults, for a first try or a lab.
//!
//! Everything lives under one directory: the production and replica images, the appliance's
//! journal, both configs and both logs. The configs are written on first run and reused
//! afterwards, so `cdp up` again resumes the same volume. The directory is locked while
//! `cdp up` runs, and `cdp up` supervises its two children: an appliance that dies is
//! restarted with backoff while the splitter keeps serving the host in marking mode.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::dir_lock::DirLock;
use crate::units::{format_bytes, parse_volume_size};

/// How long `cdp up` waits for each process to open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping process may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// First wait before restarting a child that died; doubled on each quick death.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait between restarts.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A child that ran this long before dying counts as healthy again: the backoff restarts.
const RESTART_HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Deaths in a row, each before `RESTART_HEALTHY_AFTER`, after which `cdp up` gives up.
const RESTARTS_MAX: u32 = 8;
/// How often the supervisor looks at its children's exit status.
const CHILD_POLL: Duration = Duration::from_millis(100);
/// The NBD TCP address of a new directory.
const NBD_TCP_DEFAULT: &str = "127.0.0.1:10809";

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory holding everything (created 0700 if missing).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    dir: PathBuf,
    /// Size of the production volume when it is first created (e.g. 1G, 512M; a multiple of
    /// 4096 bytes).
    #[arg(long, default_value = "1G", value_parser = parse_volume_size)]
    size: u64,
    /// Volume name, also the NBD export name.
    #[arg(long, default_value = "vol0")]
    name: String,
    /// NBD TCP listen address [default: 127.0.0.1:10809 for a new directory; an existing
    /// directory keeps the address in its splitter.toml unless this is given, which rewrites it].
    #[arg(long)]
    nbd_tcp: Option<String>,
}

/// The two children and what `cdp up` needs to restart them.
struct Supervised {
    role: &'static str,
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    ready: PathBuf,
    child: Child,
    started: Instant,
    quick_deaths: u32,
}

impl Supervised {
    fn start(exe: &Path, role: &'static str, dir: &Path, ready: PathBuf) -> anyhow::Result<Self> {
        let config = dir.join(format!("{role}.toml"));
        let log = dir.join("logs").join(format!("{role}.log"));
        let child = spawn(exe, role, &config, &log)?;
        let mut this = Supervised {
            role,
            exe: exe.to_path_buf(),
            config,
            log,
            ready,
            child,
            started: Instant::now(),
            quick_deaths: 0,
        };
        if let Err(e) = this.wait_ready() {
            let _ = this.child.kill();
            let _ = this.child.wait();
            return Err(e);
        }
        Ok(this)
    }

    /// Waits until the child accepts on its socket, or says why it did not.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.ready).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the {} exited during start-up ({}):\n{}\n(full log: {})",
                    self.role,
                    describe_exit(status),
                    log_tail(&self.log),
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} did not open {} within {START_TIMEOUT:?}; see {}",
                    self.role,
                    self.ready.display(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The wait before the next restart, or None when the child keeps dying at once.
    fn next_backoff(&mut self) -> Option<Duration> {
        if self.started.elapsed() >= RESTART_HEALTHY_AFTER {
            self.quick_deaths = 0;
        }
        self.quick_deaths += 1;
        if self.quick_deaths > RESTARTS_MAX {
            return None;
        }
        let doublings = (self.quick_deaths - 1).min(16);
        Some((RESTART_BACKOFF_MIN * (1u32 << doublings)).min(RESTART_BACKOFF_MAX))
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.exe, self.role, &self.config, &self.log)?;
        self.started = Instant::now();
        self.wait_ready()
    }

    /// SIGTERM, then SIGKILL after `STOP_TIMEOUT`. Says how the child ended.
    fn stop(&mut self) -> StopOutcome {
        if let Ok(Some(status)) = self.child.try_wait() {
            return StopOutcome::AlreadyExited(status);
        }
        // SAFETY: kill with a pid we own (the child is not reaped yet) and a valid signal.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return StopOutcome::Stopped(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        StopOutcome::Killed
    }
}

enum StopOutcome {
    Stopped(ExitStatus),
    AlreadyExited(ExitStatus),
    Killed,
}

/// The paths of one `cdp up` directory.
struct Layout {
    dir: PathBuf,
    production: PathBuf,
    replica: PathBuf,
    appliance_toml: PathBuf,
    splitter_toml: PathBuf,
    nbd_sock: PathBuf,
    control: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf, name: &str) -> Layout {
        Layout {
            production: dir.join("production").join(format!("{name}.img")),
            replica: dir.join("replica").join(format!("{name}.img")),
            appliance_toml: dir.join("appliance.toml"),
            splitter_toml: dir.join("splitter.toml"),
            nbd_sock: dir.join("nbd.sock"),
            control: dir.join("appliance.ctl"),
            dir,
        }
    }
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    cdp_types::validate_name(&args.name)?;
    if let Some(tcp) = &args.nbd_tcp {
        validate_tcp_address(tcp)?;
    }
    // The protected data is readable by its owner only: every directory, file and socket
    // `cdp up` and its children create.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    // Checked before anything is written or started: a second `cdp up` on the same
    // directory would fight the first one for its journal and sockets.
    let _lock = DirLock::acquire(&dir)?;
    crate::permissions::warn_if_open(&dir);
    let layout = Layout::new(dir.clone(), &args.name);
    std::fs::create_dir_all(dir.join("logs"))?;

    let size = prepare_production(&layout, args.size)?;
    // The package's commented examples (every key, its default, what it does), with this
    // directory's paths: `cdp up`'s layout is an instance's under /var/lib/cdp.
    // Metrics on loopback, on ports free now: fixed well-known ports would make a second
    // `cdp up` on the machine fail to start; the configs keep the ports for later runs.
    let metrics_ports = (free_loopback_port()?, free_loopback_port()?);
    let metrics_listen = (
        format!("127.0.0.1:{}", metrics_ports.0),
        format!("127.0.0.1:{}", metrics_ports.1),
    );
    let example = crate::packaging::ExampleInstance {
        dir: &dir,
        volume: &args.name,
        size,
        nbd_tcp: args.nbd_tcp.as_deref().unwrap_or(NBD_TCP_DEFAULT),
        metrics_listen: Some((&metrics_listen.0, &metrics_listen.1)),
    };
    if !layout.appliance_toml.exists() {
        write_new(&layout.appliance_toml, &example.appliance_toml())?;
    }
    let nbd_tcp = prepare_splitter_toml(&layout, &args, &example)?;
    check_tcp_free(&nbd_tcp)?;

    let exe = std::env::current_exe().context("locating the cdp binary")?;
    let mut appliance = Supervised::start(&exe, "appliance", &dir, layout.control.clone())?;
    let mut splitter = match Supervised::start(&exe, "splitter", &dir, layout.nbd_sock.clone()) {
        Ok(s) => s,
        Err(e) => {
            appliance.stop();
            return Err(e);
        }
    };
    print_ready(&layout, &args, &nbd_tcp, size)?;

    let rt = crate::runtime()?;
    let stop = rt.block_on(async {
        let supervise = supervise(&mut appliance, &mut splitter);
        tokio::select! {
            () = crate::stop_signal() => None,
            why = supervise => Some(why),
        }
    });
    eprintln!("Stopping...");
    let mut problems = Vec::new();
    if let Some(why) = stop {
        problems.push(why);
    }
    for child in [&mut splitter, &mut appliance] {
        match child.stop() {
            StopOutcome::Stopped(status) if status.success() => {}
            StopOutcome::Stopped(status) => problems.push(format!(
                "the {} stopped with {}",
                child.role,
                describe_exit(status)
            )),
            StopOutcome::AlreadyExited(status) => problems.push(format!(
                "the {} had already exited ({})",
                child.role,
                describe_exit(status)
            )),
            StopOutcome::Killed => problems.push(format!(
                "the {} did not stop within {STOP_TIMEOUT:?} and was killed",
                child.role
            )),
        }
    }
    if problems.is_empty() {
        eprintln!("Stopped cleanly.");
        return Ok(());
    }
    bail!(
        "stopped, but not cleanly: {}; see {}",
        problems.join("; "),
        dir.join("logs").display()
    )
}

/// Restarts whichever child dies, with backoff, until one keeps dying; returns why it gave up.
/// An appliance death leaves the splitter serving the host in marking mode; the restarted
/// appliance resynchronises the dirty regions when the splitter reconnects.
async fn supervise(appliance: &mut Supervised, splitter: &mut Supervised) -> String {
    loop {
        for child in [&mut *appliance, &mut *splitter] {
            let Ok(Some(status)) = child.child.try_wait() else {
                continue;
            };
            let consequence = match child.role {
                "appliance" => "the splitter keeps serving the host in marking mode",
                _ => "hosts lost their NBD connections and must reconnect",
            };
            let Some(backoff) = child.next_backoff() else {
                return format!(
                    "the {} exited ({}) {} times in a row within {RESTART_HEALTHY_AFTER:?} \
                     of starting; giving up",
                    child.role,
                    describe_exit(status),
                    RESTARTS_MAX + 1
                );
            };
            eprintln!(
                "cdp up: the {} exited ({}); {consequence}; restarting it in {backoff:?} \
                 (attempt {})",
                child.role,
                describe_exit(status),
                child.quick_deaths
            );
            tokio::time::sleep(backoff).await;
            match child.restart() {
                Ok(()) => eprintln!(
                    "cdp up: the {} is running again (pid {})",
                    child.role,
                    child.child.id()
                ),
                Err(e) => eprintln!("cdp up: restarting the {} failed: {e:#}", child.role),
            }
        }
        tokio::time::sleep(CHILD_POLL).await;
    }
}

fn prepare_production(layout: &Layout, size: u64) -> anyhow::Result<u64> {
    if layout.production.exists() {
        let existing = cdp_types::BlockFile::open(&layout.production, true)?.size();
        if existing != size {
            eprintln!(
                "cdp up: reusing existing {} ({}); --size applies only to a new volume",
                layout.production.display(),
                format_bytes(existing)
            );
        }
        return Ok(existing);
    }
    Ok(
        cdp_types::BlockFile::create_sparse(&layout.production, size)
            .with_context(|| format!("creating {}", layout.production.display()))?
            .size(),
    )
}

/// Writes splitter.toml for a new directory, or applies `--nbd-tcp` to an existing one.
/// Returns the TCP address the splitter will really listen on.
fn prepare_splitter_toml(
    layout: &Layout,
    args: &UpArgs,
    example: &crate::packaging::ExampleInstance<'_>,
) -> anyhow::Result<String> {
    let path = &layout.splitter_toml;
    if !path.exists() {
        let tcp = args.nbd_tcp.as_deref().unwrap_or(NBD_TCP_DEFAULT);
        write_new(path, &example.splitter_toml())?;
        return Ok(tcp.to_string());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config = cdp_splitter::SplitterConfig::from_toml(&text)
        .with_context(|| format!("in {}", path.display()))?;
    let current = config.nbd_tcp.clone();
    match (&args.nbd_tcp, current) {
        (Some(wanted), Some(current)) if *wanted == current => Ok(current),
        (Some(wanted), current) => {
            let rewritten = set_nbd_tcp(&text, wanted).with_context(|| {
                format!(
                    "cannot apply --nbd-tcp {wanted} to {}; edit its nbd_tcp key by hand",
                    path.display()
                )
            })?;
            std::fs::write(path, rewritten)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "cdp up: NBD TCP address changed from {} to {wanted} in {}",
                current.as_deref().unwrap_or("none"),
                path.display()
            );
            Ok(wanted.clone())
        }
        (None, Some(current)) => Ok(current),
        (None, None) => bail!(
            "{} has no nbd_tcp address; add one or pass --nbd-tcp HOST:PORT",
            path.display()
        ),
    }
}

/// Replaces the top-level `nbd_tcp = ...` line (or adds one before the first table).
fn set_nbd_tcp(text: &str, address: &str) -> anyhow::Result<String> {
    let line = format!("nbd_tcp = {address:?}");
    let mut out = Vec::new();
    let mut done = false;
    for l in text.lines() {
        let trimmed = l.trim_start();
        if !done && trimmed.starts_with('[') {
            out.push(line.clone());
            done = true;
        }
        if !done && trimmed.starts_with("nbd_tcp") && trimmed[7..].trim_start().starts_with('=') {
            out.push(line.clone());
            done = true;
            continue;
        }
        out.push(l.to_string());
    }
    if !done {
        out.push(line);
    }
    let mut rewritten = out.join("\n");
    rewritten.push('\n');
    // Whatever was rewritten must still be a config the splitter accepts, with this address.
    let parsed = cdp_splitter::SplitterConfig::from_toml(&rewritten)?;
    if parsed.nbd_tcp.as_deref() != Some(address) {
        bail!("the rewritten config does not hold nbd_tcp = {address:?}");
    }
    Ok(rewritten)
}

fn validate_tcp_address(address: &str) -> anyhow::Result<()> {
    let Some((host, port)) = address.rsplit_once(':') else {
        bail!("--nbd-tcp {address:?}: expected HOST:PORT, for example 127.0.0.1:10809");
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("--nbd-tcp {address:?}: expected HOST:PORT with a port from 0 to 65535");
    }
    Ok(())
}

/// Fails with the address and the fix when something else already listens there.
fn check_tcp_free(address: &str) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(address) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "cannot serve NBD on {address}: the address is already in use (another cdp up, \
             qemu-nbd or nbd-server?); stop that server or choose another address with \
             --nbd-tcp HOST:PORT"
        ),
        Err(e) => bail!("cannot serve NBD on {address}: {e}; choose another with --nbd-tcp"),
    }
}

/// A TCP port on 127.0.0.1 that is free now (bound and released).
fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free loopback port for the metrics listener")?;
    Ok(listener.local_addr()?.port())
}

/// The metrics URLs the configs set (appliance, splitter), `None` where one is off.
fn metrics_urls(layout: &Layout) -> (Option<String>, Option<String>) {
    let url = |listen: Option<std::net::SocketAddr>| listen.map(|a| format!("http://{a}/metrics"));
    let appliance = std::fs::read_to_string(&layout.appliance_toml)
        .ok()
        .and_then(|t| cdp_appliance::ApplianceConfig::from_toml(&t).ok())
        .and_then(|c| url(c.metrics_listen));
    let splitter = std::fs::read_to_string(&layout.splitter_toml)
        .ok()
        .and_then(|t| cdp_splitter::SplitterConfig::from_toml(&t).ok())
        .and_then(|c| url(c.metrics_listen));
    (appliance, splitter)
}

fn print_ready(layout: &Layout, args: &UpArgs, nbd_tcp: &str, size: u64) -> anyhow::Result<()> {
    let (metrics_appliance, metrics_splitter) = metrics_urls(layout);
    let (host, port) = nbd_tcp.rsplit_once(':').unwrap_or(("127.0.0.1", "10809"));
    let name = &args.name;
    let dir = &layout.dir;
    let journal = dir.join("appliance/groups/default/journal");
    let image_sock = dir.join("appliance/image.sock");
    let mut out = std::io::stdout().lock();
    if crate::output::json() {
        let v = serde_json::json!({
            "volume": name,
            "size": size,
            "dir": dir,
            "production": layout.production,
            "replica": layout.replica,
            "journal": journal,
            "logs": dir.join("logs"),
            "nbd_tcp": nbd_tcp,
            "nbd_unix": layout.nbd_sock,
            "nbd_uri": format!("nbd://{host}:{port}/{name}"),
            "control": layout.control,
            "image_nbd": format!("unix:{}", image_sock.display()),
            "metrics": { "appliance": metrics_appliance, "splitter": metrics_splitter },
        });
        writeln!(out, "{v}")?;
        return Ok(out.flush()?);
    }
    let sock = layout.nbd_sock.display();
    writeln!(
        out,
        "Protected volume {name:?} ({}) is up.\n\
         \n  production  {}\n  replica     {}\n  journal     {}\n  logs        {}\n\
         \nAttach it:\n\
         \x20 nbd-client {host} {port} /dev/nbd0 -N {name}        # kernel block device (as root)\n\
         \x20 nbd-client -u {sock} /dev/nbd0 -N {name}\n\
         \x20 qemu-system-x86_64 -drive file=nbd://{host}:{port}/{name},format=raw,cache=none ...\n\
         \x20 qemu-io -f raw nbd://{host}:{port}/{name}\n\
         \x20 nbdinfo nbd://{host}:{port}/{name}\n\
         \x20 nbdinfo 'nbd+unix:///{name}?socket={sock}'\n\
         \nStatus:  cdp status --dir {d}\n\
         Metrics: {}  (appliance)\n\
         \x20        {}  (splitter)\n\
         Points in time:  cdp bookmark create --dir {d} NAME;  \
         cdp image access --dir {d} --at NAME  (served on unix:{})\n\
         Press Ctrl-C to stop.",
        format_bytes(size),
        layout.production.display(),
        layout.replica.display(),
        journal.display(),
        dir.join("logs").display(),
        metrics_appliance
            .as_deref()
            .unwrap_or("off (set metrics_listen in appliance.toml)"),
        metrics_splitter
            .as_deref()
            .unwrap_or("off (set metrics_listen in splitter.toml)"),
        image_sock.display(),
        d = dir.display(),
    )?;
    Ok(out.flush()?)
}

/// Creates a file that must not exist yet, readable by its owner only.
fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn spawn(exe: &Path, role: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg(role)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: prctl is async-signal-safe; it makes the child die with `cdp up` instead of
    // lingering with the volume open if `cdp up` is killed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting the {role}"))
}

/// "exit code 1" or "killed by signal 9", for people.
fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last error lines of a log, so a start-up failure is explained on the terminal.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("ERROR") || l.contains("error:"))
        .collect();
    let chosen = if errors.is_empty() { lines } else { errors };
    let start = chosen.len().saturating_sub(5);
    chosen[start..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_tcp_is_replaced_in_place_and_checked() {
        let text = "appliance = \"unix:/l\"\nnbd_unix = \"/n\"\nnbd_tcp = \"127.0.0.1:1\"\n\n[[volume]]\nname = \"a\"\npath = \"/p\"\n";
        let out = set_nbd_tcp(text, "127.0.0.1:2").expect("rewrite");
        assert!(out.contains("nbd_tcp = \"127.0.0.1:2\""), "{out}");
        assert!(!out.contains("127.0.0.1:1"), "{out}");
        let added = set_nbd_tcp(
            "appliance = \"unix:/l\"\nnbd_unix = \"/n\"\n[[volume]]\nname = \"a\"\npath = \"/p\"\n",
            "0.0.0.0:3",
        )
        .expect("add");
        assert!(
            added.contains("nbd_tcp = \"0.0.0.0:3\"\n[[volume]]"),
            "{added}"
        );
    }

    #[test]
    fn bad_tcp_addresses_are_refused() {
        assert!(validate_tcp_address("127.0.0.1:10809").is_ok());
        assert!(validate_tcp_address("10809").is_err());
        assert!(validate_tcp_address("host:99999").is_err());
        assert!(validate_tcp_address(":1").is_err());
    }
}
