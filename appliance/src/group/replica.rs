//! The replica: what it holds as image reads see it, holds for logged access, rollback with
//! the undo stream, and reads of its current bytes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cdp_types::Seq;

use super::{Group, GroupVolume};
use crate::error::ApplianceError;
use crate::history::UndoRef;
use crate::record_cache::Stream;

impl Group {
    /// Waits until the replica is exact again after a restart (distribution re-applies the
    /// records after the last checkpoint), asking distribution to hurry.
    pub fn wait_replica_exact(&self, timeout: Duration) -> Result<(), ApplianceError> {
        self.wait_for_distribution(
            Instant::now() + timeout,
            |mark| mark.exact,
            |_| {
                let state = *self.replica_state.read();
                format!(
                    "the replica is still catching up after a restart (at seq {} of {}); try again shortly",
                    state.seq, state.exact_from
                )
            },
        )
    }

    /// Blocks until `done` holds for distribution's progress, urging distribution not to
    /// wait for a pause in host writes; `Fenced` if the group fails meanwhile, and `Busy`
    /// with `busy`'s message at `deadline`.
    pub(super) fn wait_for_distribution(
        &self,
        deadline: Instant,
        done: impl Fn(DistributionMark) -> bool,
        busy: impl FnOnce(DistributionMark) -> String,
    ) -> Result<(), ApplianceError> {
        let mut seen = self.distribution.subscribe();
        loop {
            let mark = *seen.borrow_and_update();
            if done(mark) {
                return Ok(());
            }
            self.refuse_if_fenced()?;
            if Instant::now() >= deadline {
                return Err(ApplianceError::Busy(busy(mark)));
            }
            self.urge_distribution();
            self.distribution.wait_changed(&mut seen, deadline);
        }
    }

    /// Distribution's progress, for async waiters (`replica_verify.rs`).
    pub fn subscribe_distribution(&self) -> tokio::sync::watch::Receiver<DistributionMark> {
        self.distribution.subscribe()
    }

    /// Holds the replica at `at` for logged access: distribution stops there, and a replica
    /// already past it is rolled back with the undo stream (progress: `rollback_progress`).
    /// Blocks until done: call from a blocking thread.
    pub fn hold_replica(&self, at: Seq) -> Result<(), ApplianceError> {
        {
            let mut hold = self.hold.lock();
            if let Some(held) = *hold {
                return Err(ApplianceError::Refused(format!(
                    "a logged image already holds this group's replica at seq {held}; release it first"
                )));
            }
            *hold = Some(at);
        }
        let result = self.roll_replica_to(at);
        if result.is_err() {
            self.release_replica();
        }
        result
    }

    /// Lets distribution carry the replica forward again after logged access.
    pub fn release_replica(&self) {
        *self.hold.lock() = None;
        self.urge_distribution();
    }

    /// Undo records applied by the running rollback, of how many.
    pub fn rollback_progress(&self) -> (u64, u64) {
        (
            self.rollback_progress.0.load(Ordering::Relaxed),
            self.rollback_progress.1.load(Ordering::Relaxed),
        )
    }

    pub(super) fn roll_replica_to(&self, at: Seq) -> Result<(), ApplianceError> {
        self.wait_replica_exact(Duration::from_secs(600))?;
        // A replica behind the point first catches up to it (distribution stops there).
        // Distribution applies only durable records.
        if self.journal.durable_seq() < at {
            self.refuse_if_fenced()?;
            self.journal.sync()?;
        }
        // No deadline: the caller holds the replica and waits for it (`image access --log`).
        self.wait_for_distribution(
            Instant::now() + ROLLBACK_CATCH_UP_WAIT,
            |mark| mark.distributed >= at,
            |mark| {
                format!(
                    "distribution did not reach seq {at} (it is at {})",
                    mark.distributed
                )
            },
        )?;
        let _no_consolidation = self.consolidation_pass.lock();
        let _writer = self.replica_writer.lock();
        let distributed = self.distributed_seq().0;
        if distributed <= at.0 {
            return Ok(());
        }
        // In consolidated history the replica is exact only at kept points (dropped
        // before-images are skipped), so image reads see it only there.
        let consolidated = self.consolidation_state.read().clone();
        // Checkpoint the target first: if the appliance dies mid-rollback, it restarts
        // distribution from `at`, which rewrites every block the rollback may have touched.
        self.state.store_distributed(at)?;
        let undos: Vec<(u64, UndoRef)> = {
            let history = self.history.lock();
            let mut v = Vec::new();
            let mut u = history.undo_next();
            while u > 0 {
                u -= 1;
                let Some(r) = history.undo_ref(u) else { break };
                if r.redo_seq <= at.0 {
                    break;
                }
                if r.redo_seq <= distributed {
                    v.push((u, r));
                }
            }
            v
        };
        self.rollback_progress.0.store(0, Ordering::Relaxed);
        self.rollback_progress
            .1
            .store(undos.len() as u64, Ordering::Relaxed);
        let volumes = self.volumes();
        let by_id: BTreeMap<u32, &GroupVolume> =
            volumes.iter().map(|v| (v.id, v.as_ref())).collect();
        tracing::info!(group = %self.name, from = distributed, to = %at, records = undos.len(), "rolling the replica back");
        // Newest first; a redo record's before-images restore the state just before it, so
        // the replica is exact at `redo_seq - 1` after each record's group.
        let mut i = 0;
        let mut held = None;
        while i < undos.len() {
            let redo_seq = undos[i].1.redo_seq;
            let mut state = held.take().unwrap_or_else(|| self.replica_state.write());
            while i < undos.len() && undos[i].1.redo_seq == redo_seq {
                let (undo_seq, r) = undos[i];
                if r.dropped {
                    // No kept point needs it: a later (older) before-image of the same
                    // blocks is applied before the replica is shown again.
                    i += 1;
                    self.rollback_progress.0.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(volume) = by_id.get(&r.volume) else {
                    // Only a volume removed from the group has no entry (ids are never
                    // reused); its replica is no longer the group's to roll.
                    tracing::debug!(
                        undo_seq,
                        volume = r.volume,
                        "undo record of a removed volume skipped"
                    );
                    i += 1;
                    self.rollback_progress.0.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let applied = if r.zero {
                    volume.replica.zero(r.offset, r.length, true)
                } else {
                    self.payload(Stream::Undo, undo_seq, r.location)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|p| volume.replica.write_at(r.offset, &p))
                };
                applied.map_err(|e| {
                    ApplianceError::from(e).context(&format!("rolling back seq {redo_seq}"))
                })?;
                i += 1;
                self.rollback_progress.0.fetch_add(1, Ordering::Relaxed);
            }
            if consolidated.is_kept(redo_seq - 1) {
                state.seq = Seq(redo_seq - 1);
                self.distribution.set(state.mark());
            } else {
                held = Some(state);
            }
        }
        let mut state = held.unwrap_or_else(|| self.replica_state.write());
        state.seq = at;
        self.distribution.set(state.mark());
        drop(state);
        self.checkpoint()?;
        tracing::info!(group = %self.name, at = %at, "replica rolled back");
        Ok(())
    }

    /// Reads the replica's current bytes (no point in time: what distribution has applied).
    pub fn read_replica(
        &self,
        volume: &GroupVolume,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ApplianceError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > volume.size) {
            return Err(ApplianceError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at {offset} is past the end of volume {} ({} bytes)",
                    buf.len(),
                    volume.name,
                    volume.size
                ),
            )));
        }
        volume.replica.read_into(offset, buf)?;
        Ok(())
    }
}

/// The replica's state as image reads see it.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReplicaState {
    /// The replica holds exactly the group's state after this seq...
    pub(super) seq: Seq,
    /// ...unless false: after a crash it may also hold some later records (applied after
    /// the last checkpoint) until distribution passes `exact_from` again.
    pub(super) exact: bool,
    pub(super) exact_from: Seq,
}

impl ReplicaState {
    /// What waiters for distribution see of it.
    pub(super) fn mark(&self) -> DistributionMark {
        DistributionMark {
            distributed: self.seq,
            exact: self.exact,
        }
    }
}

/// Distribution's progress, the group's distributed watermark: the replica holds every
/// record up to `distributed` (and, unless `exact` is false after a restart, nothing later).
/// Set with `ReplicaState`, whose lock image reads hold; waiters need no lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistributionMark {
    pub distributed: Seq,
    pub exact: bool,
}

/// "Forever" for a rollback waiting for distribution to reach its point.
const ROLLBACK_CATCH_UP_WAIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
