//! `cdp volume`: add and remove volumes of a group (appliance and splitter), and `resync`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cdp_control::{
    Request, SplitterRequest, SplitterResyncing, SplitterStatus, SplitterVolumeAdded,
    SplitterVolumeRemoved, VolumeAdded, VolumeRemoved,
};
use clap::Subcommand;

use crate::group::ApplianceControlArgs;
use crate::units::{format_bytes, parse_volume_size};

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Protect a volume in a group: the appliance adds it to the group's journal (with a
    /// sparse replica), then the splitter serves it as an NBD export and copies it once in
    /// the background. Kept across restarts of both.
    Add {
        /// The group (see `cdp group create`).
        group: String,
        /// The volume name; also its NBD export name.
        volume: String,
        /// The production volume: an existing file or block device.
        #[arg(long)]
        path: PathBuf,
        /// The volume size. Default: the size of PATH.
        #[arg(long, value_parser = parse_volume_size)]
        size: Option<u64>,
        /// The replica file or block device. Default: the appliance's
        /// DATA_DIR/replicas/GROUP/VOLUME.img, created sparse.
        #[arg(long)]
        replica: Option<PathBuf>,
        /// Serve the export read-only.
        #[arg(long)]
        read_only: bool,
        /// The splitter's control socket. Default: DIR/splitter.ctl.
        #[arg(long)]
        splitter_control: Option<PathBuf>,
        #[command(flatten)]
        control: ApplianceControlArgs,
    },
    /// Stop protecting a volume: the splitter stops serving it, then the appliance removes
    /// it from the group. Refused while a host is attached (or its splitter connected)
    /// unless --force. The journal keeps its history until retention releases it; the
    /// replica file and production are kept.
    Remove {
        group: String,
        volume: String,
        /// Remove even with hosts attached (they keep their connection; their writes reach
        /// production but are no longer journaled) or a splitter connected.
        #[arg(long)]
        force: bool,
        /// The splitter's control socket. Default: DIR/splitter.ctl.
        #[arg(long)]
        splitter_control: Option<PathBuf>,
        #[command(flatten)]
        control: ApplianceControlArgs,
    },
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
        VolumeCommand::Add {
            group,
            volume,
            path,
            size,
            replica,
            read_only,
            splitter_control,
            control,
        } => {
            let splitter = splitter_control.unwrap_or_else(|| control.dir.join("splitter.ctl"));
            add(
                &control.socket(),
                &splitter,
                &group,
                &volume,
                &path,
                size,
                replica,
                read_only,
            )
        }
        VolumeCommand::Remove {
            group,
            volume,
            force,
            splitter_control,
            control,
        } => {
            let splitter = splitter_control.unwrap_or_else(|| control.dir.join("splitter.ctl"));
            remove(&control.socket(), &splitter, &group, &volume, force)
        }
        VolumeCommand::Resync {
            volume,
            verify,
            splitter_control,
            dir,
            no_wait,
        } => {
            let socket = splitter_control.unwrap_or_else(|| dir.join("splitter.ctl"));
            let requested_ns = cdp_types::TimestampNs::now().0;
            let answer: SplitterResyncing = crate::control_client::splitter(
                &socket,
                &SplitterRequest::Resync {
                    volume: volume.clone(),
                    verify,
                },
            )?;
            let dirty = answer.state.dirty_bytes;
            if crate::output::json() {
                if no_wait {
                    crate::output::report(
                        &serde_json::json!({
                            "volume": volume,
                            "started": true,
                            "method": if verify { "verify" } else { "copy" },
                            "dirty_bytes": dirty,
                        }),
                        String::new,
                    )?;
                }
            } else if verify {
                crate::out!(
                    "verified resync of {volume} started: {} to compare with the replica, \
                     differing regions are copied; follow it with `cdp status`",
                    format_bytes(dirty)
                );
            } else {
                crate::out!(
                    "full resync of {volume} started: {} to copy; follow it with `cdp status`",
                    format_bytes(dirty)
                );
            }
            if no_wait {
                return Ok(());
            }
            follow(&socket, &volume, dirty, requested_ns)
        }
    }
}

/// Adds the volume to the appliance's group, then to the splitter; undoes the first if the
/// second fails, so neither is left half-configured.
#[allow(clippy::too_many_arguments)]
fn add(
    appliance: &Path,
    splitter: &Path,
    group: &str,
    volume: &str,
    path: &Path,
    size: Option<u64>,
    replica: Option<PathBuf>,
    read_only: bool,
) -> anyhow::Result<()> {
    // Both processes may run elsewhere than this shell's directory.
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("production volume {}", path.display()))?;
    let path_size = cdp_types::BlockFile::open(&path, true)
        .with_context(|| format!("production volume {}", path.display()))?
        .size();
    let size = size.unwrap_or(path_size);
    if size != path_size {
        bail!(
            "--size {size} differs from {}'s size {path_size}; the splitter serves the whole \
             file, so resize the file instead",
            path.display()
        );
    }
    let replica = replica.map(|r| std::path::absolute(&r).unwrap_or(r));
    let added: VolumeAdded = crate::control_client::appliance(
        appliance,
        &Request::VolumeAdd {
            group: group.to_string(),
            name: volume.to_string(),
            size,
            replica,
        },
    )?;
    let served = crate::control_client::splitter::<SplitterVolumeAdded>(
        splitter,
        &SplitterRequest::VolumeAdd {
            name: volume.to_string(),
            path: path.clone(),
            read_only,
        },
    );
    if let Err(e) = served {
        let undo = crate::control_client::appliance::<VolumeRemoved>(
            appliance,
            &Request::VolumeRemove {
                group: group.to_string(),
                name: volume.to_string(),
                force: true,
            },
        );
        return match undo {
            Ok(_) => Err(e.context(format!(
                "volume {volume} not added (the appliance's side was undone)"
            ))),
            Err(undo) => Err(e.context(format!(
                "volume {volume} not added, and undoing the appliance's side failed too \
                 ({undo:#}); run `cdp volume remove {group} {volume} --force`"
            ))),
        };
    }
    let report = serde_json::json!({
        "group": group,
        "added": volume,
        "size": size,
        "production": path,
        "replica": added.replica,
        "volume_id": added.volume_id,
        "export": volume,
    });
    crate::output::report(&report, || {
        format!(
            "volume {volume} added to group {group}: {} from {}, replica {}; served as NBD \
             export {volume}, first copied in the background (see cdp status)",
            format_bytes(size),
            path.display(),
            added.replica.display(),
        )
    })?;
    Ok(())
}

/// Removes the volume from the splitter (if it serves it), then from the appliance's group;
/// if the appliance refuses, the splitter serves it again.
fn remove(
    appliance: &Path,
    splitter: &Path,
    group: &str,
    volume: &str,
    force: bool,
) -> anyhow::Result<()> {
    let served_here = if splitter.exists() {
        let status: SplitterStatus =
            crate::control_client::splitter(splitter, &SplitterRequest::Status)?;
        status.volumes.iter().any(|v| v.name == volume)
    } else {
        false
    };
    let mut production = None;
    if served_here {
        let answer: SplitterVolumeRemoved = crate::control_client::splitter(
            splitter,
            &SplitterRequest::VolumeRemove {
                name: volume.to_string(),
                force,
            },
        )?;
        production = Some(answer.production);
        if !answer.last_changes_journaled {
            eprintln!(
                "cdp: warning: the appliance did not confirm {volume}'s last changes; they \
                 stay marked in the splitter's dirty bitmap"
            );
        }
    } else {
        eprintln!(
            "cdp: note: the splitter at {} does not serve {volume}; removing it from the \
             appliance only",
            splitter.display()
        );
    }
    let removed = crate::control_client::appliance::<VolumeRemoved>(
        appliance,
        &Request::VolumeRemove {
            group: group.to_string(),
            name: volume.to_string(),
            force,
        },
    );
    let removed = match removed {
        Ok(answer) => answer,
        Err(e) => {
            let Some(path) = production else {
                return Err(e);
            };
            let again = crate::control_client::splitter::<SplitterVolumeAdded>(
                splitter,
                &SplitterRequest::VolumeAdd {
                    name: volume.to_string(),
                    path,
                    read_only: false,
                },
            );
            return Err(match again {
                Ok(_) => e.context(format!(
                    "volume {volume} not removed (the splitter serves it again)"
                )),
                Err(again) => e.context(format!(
                    "volume {volume} not removed from the appliance, and the splitter could \
                     not serve it again ({again:#})"
                )),
            });
        }
    };
    crate::output::report(&removed, || {
        format!(
            "volume {volume} removed from group {group}; its history stays in the journal \
             until retention releases it; replica kept at {}",
            removed.replica_kept.display()
        )
    })?;
    Ok(())
}

/// Shows the copy's progress (a bar on a terminal, nothing otherwise) until the volume is
/// protecting again.
fn follow(
    socket: &std::path::Path,
    volume: &str,
    total: u64,
    started_ns: u64,
) -> anyhow::Result<()> {
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
        let status: SplitterStatus =
            crate::control_client::splitter(socket, &SplitterRequest::Status)?;
        let state = status
            .volumes
            .into_iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| anyhow::anyhow!("the splitter no longer reports {volume}"))?;
        let mode = state.state.clone();
        if mode == "protecting" {
            bar.finish_and_clear();
            // The totals of the finished operation, when the splitter reports them (a
            // progress sample lags the end by up to one poll).
            if let Some(last) = state
                .last_resync
                .as_ref()
                .filter(|last| last.completed_ns >= started_ns)
            {
                last_verified = last.verified_bytes;
                last_copied = last.copied_bytes;
            }
            let seconds = started.elapsed().as_secs_f64();
            let report = serde_json::json!({
                "volume": volume,
                "state": "protecting",
                "verified_bytes": last_verified,
                "copied_bytes": last_copied,
                "seconds": seconds,
            });
            crate::output::report(&report, || {
                format!(
                    "resync of {volume} complete in {seconds:.1} s ({} compared, {} copied); \
                     protecting",
                    format_bytes(last_verified),
                    format_bytes(last_copied),
                )
            })?;
            return Ok(());
        }
        if let Some(resync) = &state.resync {
            bar.set_position(resync.done_bytes.min(total));
            // The last numbers seen while it ran: the splitter drops them once it is done.
            last_verified = resync.verified_bytes;
            last_copied = resync.copied_bytes;
        }
        bar.set_message(mode);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
