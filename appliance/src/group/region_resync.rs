//! The remote copy's side of a resynchronisation by regions: the source released history this
//! copy never received, so instead of records it sends the regions whose bytes differ at a
//! point P; afterwards this copy's history restarts after P.
//!
//! Crash safety: before the first region is written, `resync_marker.state` (holding P) is stored
//! and the replica is marked inexact, so no image reads a half-resynchronised replica. The
//! marker goes only after the journal restarted at P + 1; a restart that finds it with a
//! journal not yet restarted keeps images refused, and the source, finding the same gap,
//! resynchronises again (comparing, so only what still differs is sent).

use std::time::Duration;

use cdp_types::Seq;

use super::{Group, GroupState, ReplicaState};
use crate::consolidation::ConsolidationState;
use crate::error::ApplianceError;
use crate::history::History;
use crate::state_file::StateFileError;

/// Longest wait for this copy's distribution to apply its journal before a resync compares.
const RESYNC_DISTRIBUTION_WAIT: Duration = Duration::from_secs(600);

impl Group {
    /// At open: a resync that did not finish keeps images refused until one does.
    pub(super) fn resync_marker_at_open(
        state: &GroupState,
        journal_first: Seq,
    ) -> Result<bool, StateFileError> {
        let Some(through) = state.resync_marker()? else {
            return Ok(false);
        };
        if journal_first.0 == through + 1 {
            // Finished but for removing the marker.
            state.remove_resync_marker()?;
            return Ok(false);
        }
        let path = state.resync_marker_path();
        tracing::warn!(path = %path.display(), through, "a resynchronisation by regions did not finish; images stay refused until the source resynchronises this copy again");
        Ok(true)
    }

    /// Starts a resync to the source's point `through`: refused while images are open here;
    /// waits until the replica holds every journaled record, then marks it in progress.
    pub fn begin_region_resync(&self, through: Seq) -> Result<(), ApplianceError> {
        // The remote-copy pin (this copy ships once promoted) is no image.
        if self
            .pins
            .lock()
            .keys()
            .any(|&id| id != super::retention::REMOTE_COPY_PIN)
        {
            return Err(ApplianceError::Refused(
                "images are open at the remote copy; a resynchronisation replaces its history, \
                 release them first"
                    .into(),
            ));
        }
        self.distribute_everything(RESYNC_DISTRIBUTION_WAIT)?;
        self.state.store_resync_marker(through.0)?;
        let mut state = self.replica_state.write();
        state.exact = false;
        state.exact_from = Seq(u64::MAX);
        self.distribution.set(state.mark());
        Ok(())
    }

    fn volume_by_id(&self, id: u32) -> Result<std::sync::Arc<super::GroupVolume>, ApplianceError> {
        self.volumes()
            .into_iter()
            .find(|v| v.id == id)
            .ok_or_else(|| ApplianceError::NotFound(format!("no volume with id {id}")))
    }

    /// BLAKE3 sums (`cdp_link::checksum`) of `count` regions of the replica of volume `id`
    /// from region `first` (fewer at the volume's end).
    pub fn replica_region_sums(
        &self,
        id: u32,
        region_bytes: u32,
        first: u64,
        count: usize,
    ) -> Result<Vec<[u8; 32]>, ApplianceError> {
        let volume = self.volume_by_id(id)?;
        let mut sums = Vec::with_capacity(count);
        let mut buf = vec![0u8; region_bytes as usize];
        let mut at = first.saturating_mul(region_bytes as u64);
        while at < volume.size && sums.len() < count {
            let len = (volume.size - at).min(region_bytes as u64) as usize;
            self.read_replica(&volume, at, &mut buf[..len])?;
            sums.push(cdp_link::checksum::region_checksum(&buf[..len]));
            at += len as u64;
        }
        Ok(sums)
    }

    /// Writes one region the source sent into the replica of volume `id`.
    pub fn write_resync_region(
        &self,
        id: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ApplianceError> {
        let volume = self.volume_by_id(id)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > volume.size)
        {
            return Err(ApplianceError::Refused(format!(
                "resync region {offset}+{} is past the end of volume {} ({} bytes)",
                data.len(),
                volume.name,
                volume.size
            )));
        }
        let _writer = self.replica_writer.lock();
        Ok(volume.replica.write_at(offset, data)?)
    }

    /// Ends a resync: the replica holds the source's state at `through`; journal, undo
    /// stream, index, bookmarks and kept points restart after it.
    pub fn finish_region_resync(&self, through: Seq) -> Result<(), ApplianceError> {
        let _no_consolidation = self.consolidation_pass.lock();
        let _writer = self.replica_writer.lock();
        for v in self.volumes() {
            v.replica.sync_data()?;
        }
        self.state.store_distributed(through)?;
        let mut history = self.history.lock();
        // A reprotected copy restarts below its own end: its records past the primary's
        // point diverged (they were kept as an image first).
        let restarted = if through < self.journal.last_seq() {
            self.journal.restart_discarding(through.next())
        } else {
            self.journal.restart_at(through.next())
        };
        restarted
            .inspect_err(|e| tracing::error!(group = %self.name, "restarting the journal: {e}"))?;
        let undo_next = self.undo.last_seq().next();
        self.undo.restart_at(undo_next).inspect_err(
            |e| tracing::error!(group = %self.name, "restarting the undo stream: {e}"),
        )?;
        *history = History::new(through.0 + 1, undo_next.0);
        drop(history);
        self.bookmarks.clear();
        self.resync_spans.clear();
        let fresh = ConsolidationState::default();
        self.state.store_consolidation(&fresh)?;
        *self.consolidation_state.write() = fresh;
        let mut state = self.replica_state.write();
        *state = ReplicaState {
            seq: through,
            exact: true,
            exact_from: through,
        };
        self.distribution.set(state.mark());
        drop(state);
        self.state.remove_resync_marker()?;
        Ok(())
    }
}
