//! `cdp up`: one protected volume with embedded defaults, for a first try or a lab.
//!
//! Everything lives under one directory: the production and replica images, the appliance's
//! journal, both configs and both logs. The configs are written on first run and reused
//! afterwards, so `cdp up` again resumes the same volume.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::units::{format_bytes, parse_size};

/// How long `cdp up` waits for each process to open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping process may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory holding everything (created if missing).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    dir: PathBuf,
    /// Size of the production volume when it is first created (e.g. 1G, 512M).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Volume name, also the NBD export name.
    #[arg(long, default_value = "vol0")]
    name: String,
    /// NBD TCP listen address (loopback by default).
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_tcp: String,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    cdp_types::validate_name(&args.name)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let production = dir.join("production").join(format!("{}.img", args.name));
    let replica = dir.join("replica").join(format!("{}.img", args.name));
    let appliance_toml = dir.join("appliance.toml");
    let splitter_toml = dir.join("splitter.toml");
    let nbd_sock = dir.join("nbd.sock");
    let control = dir.join("appliance.ctl");
    std::fs::create_dir_all(dir.join("logs"))?;

    let size = if production.exists() {
        let size = cdp_types::BlockFile::open(&production, true)?.size();
        if size != args.size {
            eprintln!(
                "cdp up: reusing existing {} ({}); --size applies only to a new volume",
                production.display(),
                format_bytes(size)
            );
        }
        size
    } else {
        cdp_types::BlockFile::create_sparse(&production, args.size)
            .with_context(|| format!("creating {}", production.display()))?
            .size()
    };
    // The package's commented examples (every key, its default, what it does), with this
    // directory's paths: `cdp up`'s layout is an instance's under /var/lib/cdp.
    let example = crate::packaging::ExampleInstance {
        dir: &dir,
        volume: &args.name,
        size,
        nbd_tcp: &args.nbd_tcp,
    };
    if !appliance_toml.exists() {
        std::fs::write(&appliance_toml, example.appliance_toml())?;
    }
    if !splitter_toml.exists() {
        std::fs::write(&splitter_toml, example.splitter_toml())?;
    }

    let exe = std::env::current_exe().context("locating the cdp binary")?;
    let mut appliance = spawn(
        &exe,
        "appliance",
        &appliance_toml,
        &dir.join("logs/appliance.log"),
    )?;
    if let Err(e) = wait_for_socket(&control, &mut appliance, "appliance", &dir) {
        let _ = appliance.kill();
        return Err(e);
    }
    let mut splitter = spawn(
        &exe,
        "splitter",
        &splitter_toml,
        &dir.join("logs/splitter.log"),
    )?;
    if let Err(e) = wait_for_socket(&nbd_sock, &mut splitter, "splitter", &dir) {
        let _ = splitter.kill();
        stop(&mut appliance, "appliance");
        return Err(e);
    }

    let (host, port) = args
        .nbd_tcp
        .rsplit_once(':')
        .unwrap_or(("127.0.0.1", "10809"));
    let name = &args.name;
    let sock = nbd_sock.display();
    println!(
        "Protected volume {name:?} ({}) is up.\n\
         \n  production  {}\n  replica     {}\n  journal     {}\n  logs        {}\n\
         \nAttach it:\n\
         \x20 nbd-client {host} {port} /dev/nbd0 -N {name}        # kernel block device (as root)\n\
         \x20 nbd-client -u {sock} /dev/nbd0 -N {name}\n\
         \x20 qemu-system-x86_64 -drive file=nbd://{host}:{port}/{name},format=raw,cache=none ...\n\
         \x20 qemu-io -f raw nbd://{host}:{port}/{name}\n\
         \x20 nbdinfo nbd://{host}:{port}/{name}\n\
         \x20 nbdinfo 'nbd+unix:///{name}?socket={sock}'\n\
         \nStatus:  cdp status --dir {}\n\
         Points in time:  cdp bookmark create --dir {} NAME;  \
         cdp image access --dir {} --at NAME  (served on unix:{})\n\
         Press Ctrl-C to stop.",
        format_bytes(size),
        production.display(),
        replica.display(),
        dir.join("appliance/groups/default/journal").display(),
        dir.join("logs").display(),
        dir.display(),
        dir.display(),
        dir.display(),
        dir.join("appliance/image.sock").display(),
    );

    let rt = crate::runtime()?;
    let exited = rt.block_on(async {
        let watch_children = async {
            loop {
                if let Ok(Some(s)) = splitter.try_wait() {
                    return format!("splitter exited ({s})");
                }
                if let Ok(Some(s)) = appliance.try_wait() {
                    return format!("appliance exited ({s})");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            () = crate::stop_signal() => None,
            why = watch_children => Some(why),
        }
    });
    println!("Stopping...");
    stop(&mut splitter, "splitter");
    stop(&mut appliance, "appliance");
    if let Some(why) = exited {
        bail!("{why}; see {}", dir.join("logs").display());
    }
    println!("Stopped cleanly.");
    Ok(())
}

fn spawn(exe: &Path, role: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
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

fn wait_for_socket(path: &Path, child: &mut Child, role: &str, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {role} exited during start-up ({status}); see {}",
                dir.join("logs").join(format!("{role}.log")).display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the {role} did not open {} within {START_TIMEOUT:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(child: &mut Child, role: &str) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: kill with a pid we own and a valid signal number.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("cdp up: the {role} did not stop within {STOP_TIMEOUT:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}
