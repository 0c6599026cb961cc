//! `cdp bookmark create|list`: named points in a group's journal, optionally taken between
//! an application's quiesce and thaw hooks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cdp_control::limits::BOOKMARK_ANSWER_GRACE;
use cdp_control::{
    validate_new_bookmark_name, BookmarkCreated, BookmarkListed, Consistency, Request,
};
use clap::{Args, Subcommand};

/// Where the appliance's control socket is (as for `cdp status`).
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// The appliance's control socket. Default: DIR/appliance.ctl.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Data directory of `cdp up` (or env CDP_DIR).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    dir: PathBuf,
}

impl ControlArgs {
    pub fn socket(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.dir.join("appliance.ctl"))
    }
}

#[derive(Subcommand, Debug)]
pub enum BookmarkCommand {
    /// Take a bookmark: a named point after every write acknowledged so far.
    Create(CreateArgs),
    /// List a group's bookmarks, oldest first.
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// The bookmark's name: 1-128 printable ASCII bytes, no `:`, not all digits, not
    /// starting with `-`; unique in the group.
    name: String,
    /// Shell command (`sh -c`) that quiesces the application; the bookmark is then marked
    /// application-consistent. Needs --thaw.
    #[arg(long, requires = "thaw")]
    quiesce: Option<String>,
    /// Shell command that thaws the application; always run once quiesce was started, also
    /// when quiesce or the bookmark fails.
    #[arg(long, requires = "quiesce")]
    thaw: Option<String>,
    /// Seconds allowed for each of: quiesce, the bookmark request, thaw.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Keep this point when consolidation thins out old history.
    #[arg(long)]
    keep: bool,
    /// While a volume of the group is marking or resynchronising (a bookmark then would
    /// lack acknowledged writes, so it is refused), wait up to this many seconds for the
    /// group to be protected again and take the bookmark then. With --quiesce the
    /// application stays frozen during the wait.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
}

pub fn run(command: BookmarkCommand) -> anyhow::Result<()> {
    match command {
        BookmarkCommand::Create(args) => crate::runtime()?.block_on(create(args)),
        BookmarkCommand::List(args) => list(args),
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    // Refuse a bad name before freezing the application for nothing.
    validate_new_bookmark_name(&args.name).map_err(|e| {
        crate::output::CliError::new(crate::output::ErrorKind::Usage, e.to_string())
    })?;
    let timeout = Duration::from_secs(args.timeout);
    let socket = args.control.socket();
    let recoverable_wait = args.wait.map(Duration::from_secs);
    let ask = |consistency, freeze_window_ms| {
        let socket = socket.clone();
        let req = Request::BookmarkCreate {
            group: args.group.clone(),
            name: args.name.clone(),
            consistency,
            freeze_window_ms,
            // The appliance appends within the timeout or not at all, so a bookmark marked
            // application-consistent never lands after the thaw below.
            deadline_ms: Some(timeout.as_millis().min(u64::MAX as u128) as u64),
            keep: args.keep,
            wait_recoverable_ms: recoverable_wait.map(|w| w.as_millis() as u64),
        };
        async move {
            let wait = timeout + recoverable_wait.unwrap_or_default() + BOOKMARK_ANSWER_GRACE;
            let asked = tokio::task::spawn_blocking(move || {
                crate::control_client::request_within::<BookmarkCreated>(
                    &socket,
                    "appliance",
                    &req,
                    wait,
                )
            })
            .await;
            match asked {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(e))
                    if crate::output::kind_of(&e) == crate::output::ErrorKind::Unreachable =>
                {
                    Err(e.context("the bookmark may or may not exist (see `cdp bookmark list`)"))
                }
                Ok(Err(e)) => Err(e),
                Err(e) => bail!("the bookmark request failed: {e}"),
            }
        }
    };
    let (answer, freeze_window_ms) = match (&args.quiesce, &args.thaw) {
        (Some(quiesce), Some(thaw)) => {
            let start = Instant::now();
            let frozen = async {
                match run_hook("quiesce", quiesce, timeout).await {
                    Ok(()) => {
                        let so_far = start.elapsed().as_millis().min(u32::MAX as u128) as u32;
                        ask(Consistency::Application, so_far).await
                    }
                    Err(e) => Err(anyhow::anyhow!("quiesce failed, no bookmark taken: {e:#}")),
                }
            };
            // SIGINT/SIGTERM while the application may be frozen: stop waiting, but thaw.
            let answer = tokio::select! {
                a = frozen => a,
                () = crate::stop_signal() => Err(anyhow::anyhow!(
                    "interrupted; thawing (see `cdp bookmark list` for whether the bookmark was taken)"
                )),
            };
            // Always thaw: a failed quiesce may have frozen part of the application.
            let thawed = run_hook("thaw", thaw, timeout).await;
            let window = start.elapsed().as_millis().min(u64::MAX as u128) as u64;
            match (answer, thawed) {
                (Ok(a), Ok(())) => (a, window),
                (Err(e), Ok(())) => return Err(e),
                // The first failure first, then what the thaw did.
                (Err(e), Err(t)) => {
                    let kind = crate::output::kind_of(&e);
                    return Err(crate::output::CliError::new(
                        kind,
                        format!("{e:#}; the thaw failed too: {t:#}"),
                    )
                    .into());
                }
                (Ok(a), Err(t)) => bail!(
                    "bookmark {} was taken (seq {}), but thaw failed: {t:#}",
                    args.name,
                    a.bookmark.seq
                ),
            }
        }
        _ => (ask(Consistency::Crash, 0).await?, 0),
    };
    let b = &answer.bookmark;
    let out = serde_json::json!({
        "group": answer.group,
        "name": b.name,
        "seq": b.seq,
        "timestamp_ns": b.timestamp_ns,
        "time": b.time,
        "consistency": b.consistency,
        "keep": b.keep,
        // Quiesce start to thaw end, as the application saw it.
        "freeze_window_ms": freeze_window_ms,
    });
    if crate::output::json() {
        crate::output::print_json(&out)?;
    } else {
        let kind = if args.quiesce.is_some() {
            format!("application-consistent, freeze window {freeze_window_ms} ms")
        } else {
            "crash-consistent".to_string()
        };
        crate::out!(
            "bookmark {} in group {}: seq {} at {} ({kind})",
            args.name,
            answer.group,
            b.seq,
            b.time,
        );
    }
    Ok(())
}

/// Runs `sh -c command` with its output on stderr (stdout is ours, for --json). The hook
/// gets its own process group, and after `timeout` the whole group is killed, so a hung
/// hook's children (`sleep`, a database client) go too.
async fn run_hook(what: &str, command: &str, timeout: Duration) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {what} command"))?;
    let mut hook = HookGroup(child);
    match tokio::time::timeout(timeout, hook.0.wait()).await {
        Ok(status) => {
            let status = status.with_context(|| format!("waiting for the {what} command"))?;
            if status.success() {
                Ok(())
            } else {
                bail!("the {what} command `{command}` failed ({status})")
            }
        }
        // Dropping `hook` kills its process group.
        Err(_) => bail!("the {what} command `{command}` did not finish within {timeout:?}; killed"),
    }
}

/// A running hook; dropped before it exited (timeout, interrupt), it kills the hook's
/// whole process group.
struct HookGroup(tokio::process::Child);

impl Drop for HookGroup {
    fn drop(&mut self) {
        // `id()` is None once the child was reaped: then it exited and nothing is killed
        // (whatever it deliberately left running in the background stays).
        if let Some(pid) = self.0.id() {
            // SAFETY: kill(2) takes no pointers; -pid names the group created for this
            // child, which is not yet reaped, so the id is still ours.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        }
    }
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let answer: BookmarkListed = crate::control_client::appliance(
        &args.control.socket(),
        &Request::BookmarkList { group: args.group },
    )?;
    if crate::output::json() {
        return crate::output::print_json(&answer);
    }
    crate::out_nonl!("{}", table(&answer));
    Ok(())
}

fn table(answer: &BookmarkListed) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<24} {:>10} {:<12} {:>10}  KEPT",
        "NAME", "TIME", "SEQ", "CONSISTENCY", "FREEZE_MS"
    );
    for b in &answer.bookmarks {
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:>10} {:<12} {:>10}  {}",
            b.name,
            b.time,
            b.seq,
            consistency_word(b.consistency),
            b.freeze_window_ms,
            match (b.consolidated, b.keep) {
                (true, _) => "consolidated away",
                (_, true) => "keep",
                _ => "",
            },
        );
    }
    out
}

/// A consistency as the protocol spells it (`crash`, `application`).
pub fn consistency_word(consistency: Consistency) -> &'static str {
    match consistency {
        Consistency::Crash => "crash",
        Consistency::Application => "application",
    }
}
