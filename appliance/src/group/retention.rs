//! Retention: which journal and undo segments may go, and the pins (open images, the remote
//! copy) that keep history from going.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use cdp_journal::RetentionPolicy;
use cdp_types::{Seq, TimestampNs};

use super::Group;
use crate::config::{GroupConfig, JournalFullPolicy};
use crate::error::ApplianceError;

impl Group {
    /// One retention pass: releases the oldest journal segments whose records are all at
    /// or below `checkpointed` (durably in the replica) while the journal is over capacity or
    /// they are older than the window. Failures are logged, never fatal: an unreleased
    /// segment only costs disk space.
    pub(super) fn retain(&self, checkpointed: Seq) {
        // A consolidation pass is moving history; the next pass of retention runs soon.
        let Some(_no_consolidation) = self.consolidation_pass.try_lock() else {
            return;
        };
        // The undo stream shares the group's capacity with the journal.
        let policy = RetentionPolicy {
            capacity_bytes: self
                .retention
                .capacity_bytes
                .saturating_sub(self.undo.size_bytes()),
            window_ns: self.retention.window_ns,
        };
        // Open images read the records just above their point, and the remote copy still
        // needs what it has not acknowledged: release nothing at or above either, unless the
        // remote copy is configured to be resynchronised by regions instead.
        let pins = self.pins.lock();
        let release_unshipped = self.replication.shipping.as_ref().is_some_and(|s| {
            s.config.unshipped_history == crate::config::UnshippedHistory::Release
        });
        let pinned = pins
            .iter()
            .filter(|(&id, _)| !(release_unshipped && id == REMOTE_COPY_PIN))
            .map(|(_, &p)| p)
            .min();
        let remote_acked = pins.get(&REMOTE_COPY_PIN).copied();
        let remote_holds = pins
            .get(&REMOTE_COPY_PIN)
            .is_some_and(|&p| Some(p) == pinned);
        let archive_holds = pins.get(&ARCHIVE_PIN).is_some_and(|&p| Some(p) == pinned);
        let releasable = pinned.map_or(checkpointed, |p| p.min(checkpointed));
        let plan = self
            .journal
            .retention_plan(&policy, releasable, TimestampNs::now().0);
        if let Some(through) = plan.through {
            if let Err(e) = self.persist_source_seqs() {
                tracing::warn!(group = %self.name, "journal retention postponed: {e}");
                return;
            }
            match self.journal.release_through(through) {
                Ok(r) => tracing::info!(
                    group = %self.name,
                    segments = r.segments,
                    bytes = r.bytes,
                    first_seq = %r.first_seq,
                    journal_bytes = self.journal.size_bytes(),
                    "journal segments released"
                ),
                Err(e) => tracing::warn!(group = %self.name, "journal retention failed: {e}"),
            }
            self.release_undo();
            if let Some(acked) = remote_acked.filter(|a| through > *a) {
                tracing::warn!(
                    group = %self.name,
                    remote_acknowledged = %acked,
                    released_through = %through,
                    "journal over capacity: released history the remote copy has not received \
                     (unshipped_history = \"release\"); it will be resynchronised by regions"
                );
            }
        }
        drop(pins);
        // Over capacity only because an open image holds history is not distribution's
        // fault: the host is not held for it (the image's owner is told in the log).
        let distribution_behind = plan.over_capacity
            && (pinned.is_none_or(|p| p >= checkpointed)
                || self
                    .journal
                    .retention_plan(&policy, checkpointed, TimestampNs::now().0)
                    .over_capacity);
        let held_by_images = plan.over_capacity && !distribution_behind;
        if held_by_images && !self.held_by_images.swap(true, Ordering::Relaxed) {
            if archive_holds {
                tracing::warn!(
                    group = %self.name,
                    pinned = pinned.map(|p| p.0),
                    "journal over capacity: the archive has not confirmed its oldest history, \
                     which is kept until the archiver catches up (release_unarchived = false)"
                );
            } else if remote_holds {
                tracing::warn!(
                    group = %self.name,
                    pinned = pinned.map(|p| p.0),
                    "journal over capacity: the remote copy has not acknowledged its oldest \
                     history, which is kept until shipping catches up"
                );
            } else {
                tracing::warn!(
                    group = %self.name,
                    pinned = pinned.map(|p| p.0),
                    "journal over capacity while open images hold its oldest history; release them"
                );
            }
        } else if !held_by_images {
            self.held_by_images.store(false, Ordering::Relaxed);
        }
        let was_over = self.over_capacity.send_replace(distribution_behind);
        if distribution_behind && !was_over {
            tracing::warn!(
                group = %self.name,
                journal_bytes = self.journal.size_bytes(),
                capacity = self.retention.capacity_bytes,
                distributed = %checkpointed,
                policy = %self.journal_full_policy,
                "journal over capacity: distribution is behind, nothing more can be released \
                 yet; distribution runs now{}",
                if self.journal_full_policy == JournalFullPolicy::Throttle {
                    " and host writes are held until the journal is back within capacity"
                } else {
                    ""
                }
            );
        } else if was_over && !distribution_behind {
            tracing::info!(group = %self.name, "journal back within capacity");
        }
    }

    /// Stores the distributed source_seq maxima (atomically: temp file, fsync, rename).
    pub(super) fn persist_source_seqs(&self) -> Result<(), ApplianceError> {
        let seqs = self.distributed_source_seqs.lock().clone();
        self.state.store_released_source_seqs(&seqs)
    }

    /// Drops index entries and undo segments for history retention released.
    pub(super) fn release_undo(&self) {
        let first = self.journal.first_seq().0;
        let through = {
            let mut history = self.history.lock();
            history.release_redo_before(first);
            history.undo_release_point(first.saturating_sub(1))
        };
        let Some(through) = through else { return };
        match self.undo.release_through(Seq(through)) {
            Ok(r) => {
                self.history
                    .lock()
                    .release_undo_before(self.undo.first_seq().0);
                if r.segments > 0 {
                    tracing::info!(group = %self.name, segments = r.segments, bytes = r.bytes, "undo segments released");
                }
            }
            Err(e) => tracing::warn!(group = %self.name, "undo stream retention failed: {e}"),
        }
    }

    /// The oldest point an image can show: retention released what lies below, and the
    /// undo stream holds nothing older than its floor.
    pub fn oldest_point(&self) -> Seq {
        let oldest = self
            .undo_floor
            .max(self.journal.first_seq().0.saturating_sub(1));
        // Consolidation may have dropped that point: the oldest kept one is the oldest.
        let state = self.consolidation_state.read();
        if state.is_kept(oldest) {
            return Seq(oldest);
        }
        Seq(state
            .kept
            .range(oldest..)
            .next()
            .copied()
            .unwrap_or(state.consolidated_below))
    }

    /// Keeps retention away from what an image at `at` reads; refuses points outside the
    /// window. Returns the pin to give back to `unpin`.
    pub fn pin_point(&self, at: Seq) -> Result<u64, ApplianceError> {
        let mut pins = self.pins.lock();
        self.check_recoverable(at).map_err(|e| match e.code {
            cdp_link::control_socket::ErrorCode::NotFound => ApplianceError::NotFound(e.message),
            _ => ApplianceError::Refused(e.message),
        })?;
        let id = self.next_pin.fetch_add(1, Ordering::Relaxed);
        pins.insert(id, at);
        Ok(id)
    }

    pub fn unpin(&self, pin: u64) {
        self.pins.lock().remove(&pin);
    }

    /// Retention pins for a group that ships to a remote copy: from open on, nothing the
    /// remote has not acknowledged may be released (the shipper moves the pin as acks come).
    pub(super) fn replication_pins(config: &GroupConfig) -> BTreeMap<u64, Seq> {
        let mut pins = BTreeMap::new();
        if config.remote.is_some() {
            pins.insert(REMOTE_COPY_PIN, Seq::ZERO);
        }
        // Nothing the archive has not confirmed goes either, until the archiver has read the
        // archive's manifest and moves the pin (`release_unarchived` lifts the guard).
        if config
            .archive
            .as_ref()
            .is_some_and(|a| !a.release_unarchived)
        {
            pins.insert(ARCHIVE_PIN, Seq::ZERO);
        }
        pins
    }

    /// Lets retention release records up to `acked` (durable at the remote copy), no more.
    pub fn release_for_remote_copy_through(&self, acked: Seq) {
        self.pins.lock().insert(REMOTE_COPY_PIN, acked);
    }

    /// Lets retention release records up to `archived` (named by the archive's newest
    /// manifest), no more.
    pub fn release_for_archive_through(&self, archived: Seq) {
        self.pins.lock().insert(ARCHIVE_PIN, archived);
    }
}

/// The retention pin id the remote-copy shipper holds (image pins count from 1).
pub(super) const REMOTE_COPY_PIN: u64 = 0;
/// The retention pin id the archiver holds (image pins never reach it).
pub(super) const ARCHIVE_PIN: u64 = u64::MAX;
