//! `cdp volume`: per-volume operations on the splitter (`resync`).

use std::path::PathBuf;

use clap::Subcommand;

use crate::units::format_bytes;

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Copy every region of a volume from production into the journal again (full resync),
    /// while the host keeps writing; `cdp status` shows the progress.
    Resync {
        /// The volume name.
        volume: String,
        /// Compare each 1 MiB region's checksum with the replica's and copy only the regions
        /// that differ (for a replica seeded by other means, or to check one).
        #[arg(long)]
        verify: bool,
        /// The splitter's control socket. Default: DIR/splitter.ctl.
        #[arg(long)]
        splitter_control: Option<PathBuf>,
        /// Data directory of `cdp up` (or env CDP_DIR).
        #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
        dir: PathBuf,
        /// Return at once instead of following the copy with a progress bar.
        #[arg(long)]
        no_wait: bool,
    },
}

pub fn run(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Resync {
            volume,
            verify,
            splitter_control,
            dir,
            no_wait,
        } => {
            let socket = splitter_control.unwrap_or_else(|| dir.join("splitter.ctl"));
            let answer = crate::control_client::request(
                &socket,
                "splitter",
                &serde_json::json!({"command": "resync", "volume": volume, "verify": verify}),
            )?;
            let dirty = answer["state"]["dirty_bytes"].as_u64().unwrap_or(0);
            if verify {
                println!(
                    "verified resync of {volume} started: {} to compare with the replica, \
                     differing regions are copied; follow it with `cdp status`",
                    format_bytes(dirty)
                );
            } else {
                println!(
                    "full resync of {volume} started: {} to copy; follow it with `cdp status`",
                    format_bytes(dirty)
                );
            }
            if no_wait {
                return Ok(());
            }
            follow(&socket, &volume, dirty)
        }
    }
}

/// Shows the copy's progress (a bar on a terminal, nothing otherwise) until the volume is
/// protecting again.
fn follow(socket: &std::path::Path, volume: &str, total: u64) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(total.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let (mut last_verified, mut last_copied) = (0, 0);
    loop {
        let status = crate::control_client::request(
            socket,
            "splitter",
            &serde_json::json!({"command": "status"}),
        )?;
        let state = status["volumes"]
            .as_array()
            .and_then(|vols| vols.iter().find(|v| v["name"] == volume))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the splitter no longer reports {volume}"))?;
        let mode = state["state"].as_str().unwrap_or("?").to_string();
        if mode == "protecting" {
            bar.finish_and_clear();
            println!(
                "resync of {volume} complete in {:.1} s ({} compared, {} copied); protecting",
                started.elapsed().as_secs_f64(),
                format_bytes(last_verified),
                format_bytes(last_copied),
            );
            return Ok(());
        }
        if let Some(done) = state["resync"]["done_bytes"].as_u64() {
            bar.set_position(done.min(total));
        }
        // The last numbers seen while it ran: the splitter drops them once it is done.
        if let Some(verified) = state["resync"]["verified_bytes"].as_u64() {
            last_verified = verified;
        }
        if let Some(copied) = state["resync"]["copied_bytes"].as_u64() {
            last_copied = copied;
        }
        bar.set_message(mode);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
