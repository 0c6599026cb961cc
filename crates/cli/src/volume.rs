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
        /// The splitter's control socket. Default: DIR/splitter.ctl.
        #[arg(long)]
        splitter_control: Option<PathBuf>,
        /// Data directory of `cdp up` (or env CDP_DIR).
        #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
        dir: PathBuf,
    },
}

pub fn run(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Resync {
            volume,
            splitter_control,
            dir,
        } => {
            let socket = splitter_control.unwrap_or_else(|| dir.join("splitter.ctl"));
            let answer = crate::control_client::request(
                &socket,
                "splitter",
                &serde_json::json!({"command": "resync", "volume": volume}),
            )?;
            let dirty = answer["state"]["dirty_bytes"].as_u64().unwrap_or(0);
            println!(
                "full resync of {volume} started: {} to copy; follow it with `cdp status`",
                format_bytes(dirty)
            );
            Ok(())
        }
    }
}
