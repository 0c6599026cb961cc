//! The `cdp` command line: argument parsing and one module per subcommand.

#[macro_use]
pub mod output;
mod archive;
mod bookmark;
mod control_client;
mod dir_lock;
mod events;
mod failover;
mod group;
mod image;
mod image_export;
mod journal;
mod logging;
mod packaging;
mod permissions;
mod point;
mod restore;
mod service_notify;
mod status;
mod timeline;
mod tls;
pub mod units;
mod up;
mod volume;
mod witness;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

/// Continuous data protection for block volumes: an NBD write-splitter, a journaling
/// appliance, and any-point-in-time recovery.
#[derive(Parser, Debug)]
#[command(
    name = "cdp",
    version,
    about = "Continuous data protection for block volumes: NBD write-splitter, journaling appliance, any-point-in-time recovery",
    long_about = None,
    after_help = output::EXIT_STATUS_HELP
)]
struct Cli {
    /// Print what the command reports as JSON on stdout, and errors as JSON on stderr
    /// (`{"error": {"code", "exit_status", "message"}}`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a protected volume with embedded defaults (appliance + splitter) and print how to attach it.
    Up(up::UpArgs),
    /// Run the appliance (journal, replica, control socket) from a TOML config.
    Appliance {
        /// Path to appliance.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the splitter (NBD server for production volumes) from a TOML config.
    Splitter {
        /// Path to splitter.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the fencing witness: a third process, at a third location, that holds each
    /// group's primary lease (`fencing = "witness"`).
    Witness(witness::WitnessArgs),
    /// Show volumes, journal size, last sequence number and distribution lag.
    Status(status::StatusArgs),
    /// State changes recorded by the appliance and the splitter (marking, resync, RPO,
    /// journal fill, fencing, images, links), oldest first.
    Events(events::EventsArgs),
    /// Consistency groups on the running appliance: `create`, `list`.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// Volumes: `add` to a group, `remove`, `resync`.
    Volume {
        #[command(subcommand)]
        command: volume::VolumeCommand,
    },
    /// Bookmarks: named points in a group's journal (crash- or application-consistent).
    Bookmark {
        #[command(subcommand)]
        command: bookmark::BookmarkCommand,
    },
    /// Points in time: resolve a bookmark, seq or time to a journal seq.
    Point {
        #[command(subcommand)]
        command: point::PointCommand,
    },
    /// A group's recoverable window, its bookmarks and write activity over time.
    Timeline(timeline::TimelineArgs),
    /// Point-in-time images: open a group at any point as NBD exports while protection
    /// goes on (`access`, `list`, `release`, `export`).
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Bring production back to a point in time, writing the differences through the
    /// splitter (journaled; ends with a `restore-to-seq-N` bookmark).
    Restore(restore::RestoreArgs),
    /// Make a copy of a group primary: `--planned` at the primary hands over to the peer
    /// with no write lost; without it, at a secondary whose primary is lost, promotes it.
    Failover(failover::FailoverArgs),
    /// Make a demoted, diverged old primary follow the new one: keep its writes since the
    /// divergence as image files, then let the primary resynchronise it by regions.
    Reprotect(failover::ReprotectArgs),
    /// Certificates for replication links (mutual TLS): `ca` makes a certificate
    /// authority, `issue` signs an appliance's certificate with it.
    Tls {
        #[command(subcommand)]
        command: tls::TlsCommand,
    },
    /// Offline journal tools.
    Journal {
        #[command(subcommand)]
        command: journal::JournalCommand,
    },
    /// The journal on object storage: `push`, `list`, `verify`, `restore` (from the archive
    /// alone, no appliance).
    Archive {
        #[command(subcommand)]
        command: archive::ArchiveCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions(packaging::CompletionsArgs),
    /// Write man pages: one per command and subcommand (`cdp.1`, `cdp-image.1`, ...).
    Man(packaging::ManArgs),
}

/// Entry point used by the `cdp` binary.
pub fn main() -> ExitCode {
    // `--json` anywhere asks for errors as JSON too, including usage errors.
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let message = e.to_string();
            let message = message.trim().trim_start_matches("error: ");
            let failure = anyhow::Error::new(output::CliError::new(
                output::ErrorKind::Usage,
                message.to_string(),
            ));
            return output::report_error(&failure, true);
        }
        Err(e) => e.exit(),
    };
    output::set_json(cli.json);
    logging::init(match &cli.command {
        Command::Appliance { config } | Command::Splitter { config } => {
            logging::format_of_config(config)
        }
        Command::Witness(witness::WitnessArgs {
            config: Some(config),
            ..
        }) => logging::format_of_config(config),
        _ => cdp_types::LogFormat::Text,
    });
    match run(cli) {
        Ok(code) => code,
        Err(e) => output::report_error(&e, json),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        // Inspection has its own exit statuses (clean, damaged, usage).
        Command::Journal { command } => return Ok(journal::run(command)),
        Command::Up(args) => up::run(args)?,
        Command::Archive { command } => archive::run(command)?,
        Command::Appliance { config } => {
            restrict_new_files();
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config = cdp_appliance::ApplianceConfig::from_toml(&text)
                .with_context(|| format!("in {}", config.display()))?;
            permissions::warn_if_open(&config.data_dir);
            runtime()?.block_on(cdp_appliance::run_with_ready(
                config,
                stop_signal_notified(),
                || service_notify::notify_logged(service_notify::READY),
            ))?;
        }
        Command::Splitter { config } => {
            restrict_new_files();
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config = cdp_splitter::SplitterConfig::from_toml(&text)
                .with_context(|| format!("in {}", config.display()))?;
            runtime()?.block_on(cdp_splitter::run_with_ready(
                config,
                stop_signal_notified(),
                || service_notify::notify_logged(service_notify::READY),
            ))?;
        }
        Command::Witness(args) => {
            restrict_new_files();
            witness::run(args)?
        }
        Command::Status(args) => status::run(args)?,
        Command::Events(args) => events::run(args)?,
        Command::Bookmark { command } => bookmark::run(command)?,
        Command::Point { command } => point::run(command)?,
        Command::Timeline(args) => timeline::run(args)?,
        Command::Image { command } => image::run(command)?,
        Command::Restore(args) => restore::run(args)?,
        Command::Volume { command } => volume::run(command)?,
        Command::Group { command } => group::run(command)?,
        Command::Failover(args) => failover::failover(args)?,
        Command::Reprotect(args) => failover::reprotect(args)?,
        Command::Tls { command } => tls::run(command)?,
        Command::Completions(args) => packaging::completions(args, Cli::command())?,
        Command::Man(args) => packaging::man(args, Cli::command())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Files, directories and sockets the appliance and splitter create (journal, replicas,
/// images, scratch, control sockets) are for their owner only: they hold the protected data.
fn restrict_new_files() {
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// `stop_signal`, then tells a service manager (`Type=notify`) that the clean stop began.
async fn stop_signal_notified() {
    stop_signal().await;
    service_notify::notify_logged(service_notify::STOPPING);
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, stopping"),
        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
    }
}
