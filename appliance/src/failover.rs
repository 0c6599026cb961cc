//! Failover: the planned handover to the peer, the unplanned promotion of a secondary,
//! demotion on meeting a newer primary, reprotect, and the production volumes a promoted
//! copy serves.
//!
//! Planned (`cdp failover G --planned` at the primary): host changes wait at the split
//! links (`GroupRole::set_draining`), the shipper ships everything and the remote acks it
//! durable, then — with no append in progress (`GroupRole::exclusive_gate`) — this copy is
//! persisted secondary *before* the peer is asked to promote itself, so at no instant are
//! two copies primary. The shipper thread carries the request (`Promote`) over its own
//! secured link; the peer materialises its production volumes and answers `Promoted`.
//! If the peer never answers, both copies are secondary: the error says so and names the
//! command that finishes the job (`cdp failover G --force` at either site).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cdp_control::{CopyRole, FailedOver, FailoverRecord, GenerationEntry, LostRange};
use cdp_types::BlockFile;

use crate::error::ApplianceError;
use crate::group::Group;

/// Default bound of a planned failover's drain (hosts wait at most this long).
pub const PLANNED_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// Longest wait for distribution to bring the replica up to date before a promotion.
const DISTRIBUTION_WAIT: Duration = Duration::from_secs(600);
/// Bytes copied per step when production volumes are written from the replica.
const COPY_CHUNK_BYTES: usize = 1 << 20;

fn now_ns() -> u64 {
    cdp_types::TimestampNs::now().0
}

/// What a handover request gets back from the shipper thread.
pub type HandoverResult = Result<u64, ApplianceError>;

/// Planned failover, run at the primary on a blocking thread.
pub fn planned(group: &Group, timeout: Duration) -> Result<FailedOver, ApplianceError> {
    let role = group.role();
    if !role.is_primary() {
        return Err(ApplianceError::Refused(format!(
            "group {} is secondary here: run cdp failover --planned at the primary site, or \
             cdp failover (unplanned) here if the primary is lost",
            group.name
        )));
    }
    let Some(shipping) = group.replication().shipping.as_ref() else {
        return Err(ApplianceError::Refused(format!(
            "group {} has no [group.remote]: there is no peer to fail over to",
            group.name
        )));
    };
    if !shipping
        .connected
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err(ApplianceError::Busy(format!(
            "the replication link of group {} is down ({}): a planned failover needs the peer \
             connected; fix the link, or run cdp failover at the peer if this site is lost",
            group.name,
            shipping
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "not connected yet".into())
        )));
    }
    let started = Instant::now();
    let deadline = started + timeout;
    role.set_draining(true);
    tracing::warn!(group = %group.name, timeout_ms = timeout.as_millis() as u64, "planned failover: draining (host writes wait)");
    let drained = drain(group, shipping, deadline);
    let last = match drained {
        Ok(last) => last,
        Err(e) => {
            role.set_draining(false);
            tracing::warn!(group = %group.name, "planned failover abandoned, this copy stays primary: {e}");
            return Err(e);
        }
    };
    // Secondary from here on, durably, before the peer is asked: never two primaries.
    let generation = role.facts().generation() + 1;
    let first_seq = last + 1;
    let request = shipping.request_handover(generation);
    let waited = request.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let pause_ms = started.elapsed().as_millis() as u64;
    role.set_draining(false);
    match waited {
        Ok(Ok(promoted)) => {
            role.update(|f| {
                f.last_failover = Some(FailoverRecord {
                    kind: "planned".into(),
                    generation: promoted,
                    first_seq,
                    at_ns: now_ns(),
                    pause_ms: Some(pause_ms),
                    lost: None,
                });
            })?;
            tracing::warn!(group = %group.name, generation = promoted, first_seq, pause_ms, "planned failover done: the peer is primary, this copy is secondary");
            Ok(FailedOver {
                group: group.name.clone(),
                planned: true,
                primary_site: shipping.config.endpoint.clone(),
                generation: promoted,
                first_seq,
                pause_ms: Some(pause_ms),
                lost: None,
                production: Vec::new(),
            })
        }
        Ok(Err(e)) => Err(handover_failed(group, &e.to_string())),
        Err(_) => Err(handover_failed(
            group,
            "the peer did not confirm its promotion in time",
        )),
    }
}

fn handover_failed(group: &Group, why: &str) -> ApplianceError {
    tracing::error!(group = %group.name, "planned failover: {why}; both copies may be secondary now");
    ApplianceError::Busy(format!(
        "planned failover of group {}: this copy was demoted, but {why}. No copy may be \
         primary now: check `cdp status` at the peer; if it is not primary, run `cdp failover \
         {} --force` at the site that should be",
        group.name, group.name
    ))
}

/// Waits until the remote holds every journaled change, then demotes this copy with no
/// append in progress. Returns the last seq both copies hold.
fn drain(
    group: &Group,
    shipping: &crate::replication::ShippingState,
    deadline: Instant,
) -> Result<u64, ApplianceError> {
    let role = group.role();
    let mut shipped = shipping.shipped.subscribe();
    loop {
        let target = group.journal().last_seq().0;
        if group.journal().durable_seq().0 < target {
            group.journal().sync()?;
        }
        if let Some(t) = shipping.shipper_thread.get() {
            t.unpark();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let reached = block_on(async {
            tokio::time::timeout(left, shipped.wait_for(|s| *s >= target))
                .await
                .map(|r| r.is_ok())
                .unwrap_or(false)
        });
        if !reached {
            return Err(ApplianceError::Busy(format!(
                "the remote copy did not acknowledge seq {target} within the failover timeout \
                 (it holds {}); nothing changed, host writes resume",
                *shipped.borrow()
            )));
        }
        let _gate = role.exclusive_gate();
        if group.journal().last_seq().0 != target {
            continue; // a change was journaled meanwhile (it passed the drain check first)
        }
        role.update(|f| f.role = CopyRole::Secondary)?;
        return Ok(target);
    }
}

/// Runs a future to completion from a blocking thread of the runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map(|rt| rt.block_on(f))
            .unwrap_or_else(|e| panic!("cannot build a runtime to wait on: {e}")),
    }
}

/// The peer's side of a planned failover (`Promote` on the replication link): this
/// secondary holds exactly `last_seq` of `history`; it becomes primary in `generation`.
pub fn promote_planned(
    group: &Group,
    history: Vec<GenerationEntry>,
    last_seq: u64,
    generation: u64,
) -> Result<u64, ApplianceError> {
    let role = group.role();
    if role.is_primary() {
        return Err(ApplianceError::Refused(format!(
            "group {} is already primary here",
            group.name
        )));
    }
    let ours = group.sync_replicated()?.0;
    if ours != last_seq {
        return Err(ApplianceError::Refused(format!(
            "this copy holds seqs up to {ours}, the old primary up to {last_seq}: not promoting"
        )));
    }
    if history.last().is_some_and(|e| e.generation >= generation) {
        return Err(ApplianceError::Refused(format!(
            "generation {generation} does not follow the history's last"
        )));
    }
    materialize_production(group)?;
    let entry = GenerationEntry {
        generation,
        first_seq: last_seq + 1,
        site: role.site().to_string(),
    };
    role.update(|f| {
        f.history = history;
        f.push_generation(entry.clone());
        f.role = CopyRole::Primary;
        f.divergence_seq = None;
        f.last_failover = Some(FailoverRecord {
            kind: "planned".into(),
            generation,
            first_seq: entry.first_seq,
            at_ns: now_ns(),
            pause_ms: None,
            lost: None,
        });
    })?;
    tracing::warn!(group = %group.name, generation, first_seq = entry.first_seq, "promoted to primary (planned failover)");
    Ok(generation)
}

/// Unplanned failover at a secondary: it becomes primary at the latest seq it holds.
pub fn promote_unplanned(group: &Group, force: bool) -> Result<FailedOver, ApplianceError> {
    let role = group.role();
    if role.is_primary() {
        return Err(ApplianceError::Refused(format!(
            "group {} is already primary here (generation {})",
            group.name,
            role.facts().generation()
        )));
    }
    let receiving = &group.replication().receiving;
    if receiving.connected.get() && !force {
        return Err(ApplianceError::Refused(format!(
            "the primary of group {} is connected and shipping to this copy: run cdp failover \
             --planned at the primary (no write lost), or add --force to promote here anyway \
             (the old primary is then demoted when it next connects; writes it takes meanwhile \
             are lost to this copy)",
            group.name
        )));
    }
    let last = group.sync_replicated()?.0;
    let last_ns = group.timestamp_of(last);
    let facts = role.facts();
    let generation = facts.generation() + 1;
    let production = materialize_production(group)?;
    let entry = GenerationEntry {
        generation,
        first_seq: last + 1,
        site: role.site().to_string(),
    };
    let lost = LostRange {
        first_seq: last + 1,
        last_seq: None,
        after_ns: last_ns,
    };
    role.update(|f| {
        f.push_generation(entry.clone());
        f.role = CopyRole::Primary;
        f.last_failover = Some(FailoverRecord {
            kind: "unplanned".into(),
            generation,
            first_seq: entry.first_seq,
            at_ns: now_ns(),
            pause_ms: None,
            lost: Some(lost.clone()),
        });
    })?;
    tracing::warn!(group = %group.name, generation, first_seq = entry.first_seq, "promoted to primary (unplanned failover): records the old primary journaled after seq {last} are not here");
    Ok(FailedOver {
        group: group.name.clone(),
        planned: false,
        primary_site: role.site().to_string(),
        generation,
        first_seq: entry.first_seq,
        pause_ms: None,
        lost: Some(lost),
        production,
    })
}

/// This primary met a copy that is primary in a newer generation: it becomes secondary,
/// with the seq its records began to differ from the newer primary's, if they did.
pub fn demote_by_peer(
    group: &Group,
    divergence_seq: Option<u64>,
    reason: &str,
) -> Result<(), ApplianceError> {
    let role = group.role();
    let _gate = role.exclusive_gate();
    role.update(|f| {
        f.role = CopyRole::Secondary;
        if divergence_seq.is_some() {
            f.divergence_seq = divergence_seq;
        }
    })?;
    match divergence_seq {
        Some(seq) => {
            tracing::error!(group = %group.name, divergence_seq = seq, "demoted: another copy is primary in a newer generation and this copy's records differ from seq {seq} on (split brain, not resolved: run cdp reprotect here to keep them as an image and follow the new primary): {reason}")
        }
        None => {
            tracing::warn!(group = %group.name, "demoted: another copy is primary in a newer generation: {reason}")
        }
    }
    Ok(())
}

/// `cdp reprotect` at a diverged secondary: keeps this copy as it is (one image file per
/// volume under `GROUP_DIR/diverged-S/`) and asks the next replication link from the
/// primary to resynchronise it by regions.
pub fn reprotect(group: &Group, force: bool) -> Result<cdp_control::Reprotected, ApplianceError> {
    let role = group.role();
    let facts = role.facts();
    if facts.role == CopyRole::Primary {
        return Err(ApplianceError::Refused(format!(
            "group {} is primary here; reprotect makes a demoted copy follow the new primary",
            group.name
        )));
    }
    let Some(divergence) = facts.divergence_seq else {
        return Err(ApplianceError::Refused(format!(
            "group {} has no divergence to resolve: it follows the primary already",
            group.name
        )));
    };
    let last = group.last_seq().0;
    let kept = if force {
        None
    } else {
        group.distribute_everything(DISTRIBUTION_WAIT)?;
        let dir = group.dir().join(format!("diverged-{divergence}"));
        std::fs::create_dir_all(&dir)?;
        for v in group.volumes() {
            let to = dir.join(format!("{}.img", v.name));
            copy_replica(group, &v, &to)?;
        }
        Some(dir)
    };
    role.update(|f| f.resync_pending = true)?;
    tracing::warn!(group = %group.name, divergence_seq = divergence, diverged_last_seq = last, kept = ?kept, "reprotect: this copy's writes since the divergence are kept; the primary resynchronises it by regions at its next link");
    Ok(cdp_control::Reprotected {
        group: group.name.clone(),
        divergence_seq: divergence,
        kept_image_dir: kept,
        diverged_last_seq: last,
    })
}

/// Writes each volume's current replica bytes to its configured production volume (holes
/// stay holes) and a clean dirty bitmap beside it if none is there, so a splitter started
/// on it resumes protection with no resync. Returns (volume, production path) of each.
pub fn materialize_production(group: &Group) -> Result<Vec<(String, PathBuf)>, ApplianceError> {
    group.distribute_everything(DISTRIBUTION_WAIT)?;
    let mut done = Vec::new();
    for v in group.volumes() {
        let Some(path) = group.production_path(&v.name) else {
            tracing::warn!(group = %group.name, volume = %v.name, "no production path configured for this volume: its splitter must be given a copy by hand (and copies it in full once)");
            continue;
        };
        let started = Instant::now();
        copy_replica(group, &v, &path)?;
        let mut bitmap = path.clone().into_os_string();
        bitmap.push(".cdp-dirty");
        let bitmap = PathBuf::from(bitmap);
        let (map, opened) = cdp_link::dirty_bitmap::DirtyBitmap::open(&bitmap, v.size)?;
        if opened == cdp_link::dirty_bitmap::Opened::Created {
            map.sync()?;
        }
        tracing::info!(group = %group.name, volume = %v.name, production = %path.display(), seconds = started.elapsed().as_secs_f64(), "production volume written from the replica");
        done.push((v.name.clone(), path));
    }
    Ok(done)
}

/// Copies the replica of `volume` to `to` (created sparse if missing), skipping holes.
fn copy_replica(
    group: &Group,
    volume: &crate::group::GroupVolume,
    to: &Path,
) -> Result<(), ApplianceError> {
    let target = if to.exists() {
        BlockFile::open(to, false)?
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        BlockFile::create_sparse(to, volume.size)?
    };
    if target.size() != volume.size {
        return Err(ApplianceError::Refused(format!(
            "{} is {} bytes, volume {} is {}",
            to.display(),
            target.size(),
            volume.name,
            volume.size
        )));
    }
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at = 0u64;
    while at < volume.size {
        let len = (volume.size - at).min(COPY_CHUNK_BYTES as u64);
        let runs = volume
            .replica_allocation(at, len, 64)?
            .unwrap_or_else(|| vec![(len, false)]);
        let mut pos = at;
        for (run, hole) in runs {
            let run = run.min(at + len - pos);
            if hole {
                target.zero(pos, run, true)?;
            } else {
                let chunk = &mut buf[..run as usize];
                group.read_replica(volume, pos, chunk)?;
                if chunk.iter().all(|&b| b == 0) {
                    target.zero(pos, run, true)?;
                } else {
                    target.write_at(pos, chunk)?;
                }
            }
            pos += run;
            if pos >= at + len {
                break;
            }
        }
        if pos < at + len {
            // Runs ended early (`runs_max`): copy the rest as data.
            let chunk = &mut buf[..(at + len - pos) as usize];
            group.read_replica(volume, pos, chunk)?;
            target.write_at(pos, chunk)?;
        }
        at += len;
    }
    target.sync_data()?;
    Ok(())
}
