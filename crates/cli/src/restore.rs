//! `cdp restore`: brings production back to a point in time by writing the differences through the splitter.
//!
//! The writes go through the splitter's NBD exports like any host's, so they are journaled
//! and the timeline stays truthful: the restore is itself a span of history, closed by a
//! `restore-to-seq-N` bookmark whose image equals the restored point.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context};
use cdp_control::{
    validate_bookmark_name, ApplianceStatus, Bookmark, BookmarkCreated, BookmarkListed,
    Consistency, Request, SplitterRequest, SplitterStatus,
};
use cdp_nbd::client::Client;
use cdp_types::Endpoint;
use clap::Args;

use crate::bookmark::ControlArgs;
use crate::image_export::{
    check_stop, connect, image_endpoint, is_zero, progress_bar, DescribePoint, ImageVolume,
    Interruptible, OpenImage, BLOCK_BYTES, CHUNK_BYTES,
};
use crate::units::format_bytes;

/// Attempts at a free bookmark name (`restore-to-seq-N`, `-2`, `-3`, ...).
const BOOKMARK_NAME_ATTEMPTS_MAX: u32 = 100;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The splitter's control socket. Default: splitter.ctl beside the appliance's control
    /// socket (DIR/splitter.ctl).
    #[arg(long)]
    splitter_control: Option<PathBuf>,
    /// The consistency group (may be left out when the appliance has one).
    #[arg(long)]
    group: Option<String>,
    /// The point in time to restore: a bookmark name, `seq:N`, an RFC 3339 time with
    /// milliseconds, or `-30s`, `-5m`, `-2h`, `-1d`.
    // Relative points start with '-' (`-5m`): a value, not a flag.
    #[arg(long, allow_hyphen_values = true)]
    at: String,
    /// Restore although hosts are attached to the group's volumes. Their caches then hold
    /// data production no longer has; they must drop them (remount, restart) afterwards.
    #[arg(long)]
    force: bool,
}

/// A volume as the splitter reports it.
struct SplitterVolume {
    name: String,
    state: String,
    nbd_clients: u64,
}

/// Totals of one volume's restore.
#[derive(Default, Clone, Copy)]
struct Restored {
    compared_bytes: u64,
    written_bytes: u64,
}

pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let appliance = args.control.socket();
    let splitter = args
        .splitter_control
        .clone()
        .unwrap_or_else(|| appliance.with_file_name("splitter.ctl"));

    let (group, volumes) = group_volumes(&appliance, args.group.as_deref())?;
    let (served, nbd_endpoints) = splitter_state(&splitter)?;
    check_volumes(&group, &volumes, &served, args.force)?;
    let production = production_endpoint(&nbd_endpoints, &splitter)?;

    let mut interruptible = Interruptible::install()?;
    let image = OpenImage::open(&appliance, Some(&group), &args.at)?;
    let info = image.info.clone();
    if info.group != group {
        bail!(
            "asked for an image of group {group} but the appliance opened one of group {}",
            info.group
        );
    }
    let point = info.describe_point(&args.at);
    let image_volumes: Vec<ImageVolume> = info.exports.clone();
    let image_endpoint = image_endpoint(&info)?;
    let total: u64 = image_volumes.iter().map(|v| v.size).sum();
    let restored = interruptible.run(move |stop| {
        let bar = progress_bar(total)?;
        let mut sum = Restored::default();
        for volume in &image_volumes {
            bar.set_message(volume.volume.clone());
            let one = restore_volume(&image_endpoint, volume, &production, stop, &bar)?;
            sum.compared_bytes += one.compared_bytes;
            sum.written_bytes += one.written_bytes;
        }
        bar.finish_and_clear();
        Ok(sum)
    });
    let released = image.release();
    let restored = restored.with_context(|| {
        format!(
            "restoring group {group} to {point}; production may be partly restored: run the same \
             `cdp restore` again to finish"
        )
    })?;
    released?;

    let bookmark = create_bookmark(&appliance, &group, info.seq)?;
    let seconds = started.elapsed().as_secs_f64();
    if crate::output::json() {
        let out = serde_json::json!({
            "group": group,
            "seq": info.seq,
            "point": args.at,
            "compared_bytes": restored.compared_bytes,
            "written_bytes": restored.written_bytes,
            "seconds": seconds,
            "bookmark": bookmark,
        });
        crate::output::print_json(&out)?;
    } else {
        crate::out!(
            "restored group {group} to {point}: compared {}, wrote {} in {seconds:.1} s; bookmark {} at seq {}",
            format_bytes(restored.compared_bytes),
            format_bytes(restored.written_bytes),
            bookmark.name,
            bookmark.seq,
        );
    }
    Ok(())
}

/// The group (named, or the appliance's only one) and its volume names.
fn group_volumes(
    appliance: &std::path::Path,
    group: Option<&str>,
) -> anyhow::Result<(String, Vec<String>)> {
    let status: ApplianceStatus = crate::control_client::appliance(appliance, &Request::Status)?;
    let groups = status.groups;
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    let found = match group {
        Some(name) => groups.iter().find(|g| g.name == name),
        None if groups.len() == 1 => groups.first(),
        None => bail!(
            "the appliance has {} groups; say which with --group ({})",
            groups.len(),
            names.join(", ")
        ),
    };
    let Some(found) = found else {
        bail!(
            "no group named {:?} (groups: {})",
            group.unwrap_or_default(),
            names.join(", ")
        );
    };
    let volumes = found.volumes.iter().map(|v| v.name.clone()).collect();
    Ok((found.name.clone(), volumes))
}

/// The splitter's volumes and its NBD endpoints.
fn splitter_state(
    splitter: &std::path::Path,
) -> anyhow::Result<(Vec<SplitterVolume>, Vec<String>)> {
    let status: SplitterStatus =
        crate::control_client::splitter(splitter, &SplitterRequest::Status)
            .context("restore writes through the splitter, so it must be running")?;
    let volumes = status
        .volumes
        .into_iter()
        .map(|v| SplitterVolume {
            name: v.name,
            state: v.state,
            nbd_clients: v.nbd_clients.unwrap_or(0) as u64,
        })
        .collect();
    Ok((volumes, status.nbd))
}

/// Refuses unless the splitter protects every volume of the group and (without `force`) no
/// host is attached. The check happens before the copy; a host attaching during the restore
/// is not stopped, which is why the message says to detach hosts first.
fn check_volumes(
    group: &str,
    volumes: &[String],
    served: &[SplitterVolume],
    force: bool,
) -> anyhow::Result<()> {
    if volumes.is_empty() {
        bail!("group {group} has no volumes");
    }
    let mut attached = Vec::new();
    for name in volumes {
        let Some(v) = served.iter().find(|v| &v.name == name) else {
            bail!("volume {name} of group {group} is not served by this splitter; restore writes through it");
        };
        if v.state != "protecting" {
            bail!(
                "volume {name} is {} at the splitter; restore needs every volume protecting, so \
                 that its writes reach the journal (see `cdp status`)",
                v.state
            );
        }
        if v.nbd_clients > 0 {
            attached.push(format!(
                "{name} ({} host{})",
                v.nbd_clients,
                if v.nbd_clients == 1 { "" } else { "s" }
            ));
        }
    }
    if !attached.is_empty() && !force {
        bail!(
            "hosts are attached to group {group}: {}. Restoring under them would leave their \
             caches (page cache, file system, database) holding data production no longer has. \
             Detach them first (unmount, nbd-client -d, stop the VM), or use --force and make \
             them drop their caches afterwards",
            attached.join(", ")
        );
    }
    Ok(())
}

/// The splitter endpoint to write production through: the unix socket if it has one (no
/// TCP stack in the way), else its first TCP address.
fn production_endpoint(
    endpoints: &[String],
    splitter: &std::path::Path,
) -> anyhow::Result<Endpoint> {
    let chosen = endpoints
        .iter()
        .find(|e| e.starts_with("unix:"))
        .or_else(|| endpoints.first());
    let Some(chosen) = chosen else {
        bail!(
            "the splitter at {} does not report its NBD endpoints (an older splitter?)",
            splitter.display()
        );
    };
    chosen
        .parse()
        .with_context(|| format!("the splitter reports a bad NBD endpoint {chosen:?}"))
}

/// Compares the image with production chunk by chunk and writes the differing 64 KiB blocks
/// to production (no FUA; one FLUSH at the end makes them durable in production and journal).
fn restore_volume(
    image_endpoint: &Endpoint,
    volume: &ImageVolume,
    production_endpoint: &Endpoint,
    stop: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Restored> {
    let what = |side: &str| format!("opening volume {} ({side})", volume.volume);
    let mut image = connect(image_endpoint, &volume.export).with_context(|| what("image"))?;
    let mut production =
        connect(production_endpoint, &volume.volume).with_context(|| what("production"))?;
    let size = image.size();
    if production.size() != size {
        bail!(
            "volume {}: production is {} bytes but the image is {}",
            volume.volume,
            production.size(),
            size
        );
    }
    if production.read_only() {
        bail!("volume {} is read-only at the splitter", volume.volume);
    }
    let mut source = vec![0u8; CHUNK_BYTES];
    let mut target = vec![0u8; CHUNK_BYTES];
    let mut restored = Restored::default();
    let mut offset = 0u64;
    while offset < size {
        check_stop(stop)?;
        let length = (size - offset).min(CHUNK_BYTES as u64) as usize;
        image.read(offset, &mut source[..length])?;
        production.read(offset, &mut target[..length])?;
        restored.written_bytes += write_differences(
            &mut production,
            offset,
            &source[..length],
            &target[..length],
        )?;
        restored.compared_bytes += length as u64;
        offset += length as u64;
        bar.inc(length as u64);
    }
    production.flush().with_context(|| {
        format!(
            "flushing volume {}: the restored data may not be durable",
            volume.volume
        )
    })?;
    let _ = image.disconnect();
    let _ = production.disconnect();
    Ok(restored)
}

/// Writes the blocks of `wanted` that differ from `current`; returns the bytes written.
fn write_differences(
    production: &mut Client,
    offset: u64,
    wanted: &[u8],
    current: &[u8],
) -> anyhow::Result<u64> {
    let mut written = 0u64;
    for range in differing_runs(wanted, current) {
        written += range.len() as u64;
        write_range(production, offset + range.start as u64, &wanted[range])?;
    }
    Ok(written)
}

/// The byte ranges, in whole `BLOCK_BYTES` blocks (the last one may be short), where `wanted`
/// differs from `current`; neighbouring differing blocks merge into one range, so one
/// request writes them.
fn differing_runs(wanted: &[u8], current: &[u8]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    if wanted == current {
        return runs;
    }
    for (index, (a, b)) in wanted
        .chunks(BLOCK_BYTES)
        .zip(current.chunks(BLOCK_BYTES))
        .enumerate()
    {
        if a == b {
            continue;
        }
        let start = index * BLOCK_BYTES;
        let end = start + a.len();
        match runs.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// Zero ranges become WRITE_ZEROES (which may punch holes, as the image has none there
/// that a reader could tell apart); the rest a plain WRITE without FUA.
fn write_range(production: &mut Client, offset: u64, data: &[u8]) -> anyhow::Result<()> {
    if is_zero(data) && production.can_write_zeroes() {
        production.write_zeroes(offset, data.len() as u64, false, true)?;
    } else {
        production.write(offset, data, false)?;
    }
    Ok(())
}

/// Takes the `restore-to-seq-N` bookmark (with a `-2`, `-3`, ... suffix when restoring to
/// the same point again) so the timeline shows where the restore ended.
fn create_bookmark(appliance: &std::path::Path, group: &str, seq: u64) -> anyhow::Result<Bookmark> {
    let listed: BookmarkListed = crate::control_client::appliance(
        appliance,
        &Request::BookmarkList {
            group: Some(group.to_string()),
        },
    )?;
    let taken: BTreeSet<&str> = listed.bookmarks.iter().map(|b| b.name.as_str()).collect();
    let base = format!("restore-to-seq-{seq}");
    let name = (1..=BOOKMARK_NAME_ATTEMPTS_MAX)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|name| !taken.contains(name.as_str()))
        .with_context(|| format!("{BOOKMARK_NAME_ATTEMPTS_MAX} bookmarks named {base}* exist"))?;
    validate_bookmark_name(&name)?;
    let answer: BookmarkCreated = crate::control_client::appliance(
        appliance,
        &Request::BookmarkCreate {
            group: Some(group.to_string()),
            name,
            consistency: Consistency::Crash,
            freeze_window_ms: 0,
            deadline_ms: None,
            keep: false,
            wait_recoverable_ms: None,
        },
    )
    .context("production is restored, but the bookmark marking it failed")?;
    Ok(answer.bookmark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_runs_cover_exactly_the_changed_blocks() {
        let size = 4 * BLOCK_BYTES + 100;
        let current = vec![7u8; size];
        assert!(differing_runs(&current, &current).is_empty());

        let mut wanted = current.clone();
        // One byte in block 0, bytes in blocks 1 and 2 (merged), and in the short tail.
        wanted[5] = 0;
        wanted[BLOCK_BYTES + 1] = 0;
        wanted[2 * BLOCK_BYTES + 9] = 0;
        wanted[size - 1] = 0;
        assert_eq!(
            differing_runs(&wanted, &current),
            vec![0..3 * BLOCK_BYTES, 4 * BLOCK_BYTES..size]
        );

        let mut wanted = current.clone();
        wanted[3 * BLOCK_BYTES] = 1;
        assert_eq!(
            differing_runs(&wanted, &current),
            vec![3 * BLOCK_BYTES..4 * BLOCK_BYTES]
        );
    }
}
