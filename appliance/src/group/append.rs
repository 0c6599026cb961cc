//! Appends to the group's journal: a link connection's batch (`append`) and records shipped
//! from a source group (`append_replicated`) take one path that indexes them for images and
//! fences the group on a journal failure; and the journal-full policy applied before appends.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cdp_journal::{Journal, JournalError, RecordIn, RecordKind, RecordLocation};
use cdp_types::Seq;

use super::{Group, GroupVolume};
use crate::config::JournalFullPolicy;
use crate::error::ApplianceError;
use crate::history::RedoRef;

impl Group {
    /// Appends a batch of one volume's changes, in order, and records the last source_seq;
    /// returns the journal seq of the last change. A failure fences the group: nothing after
    /// it is acknowledged.
    pub fn append(
        &self,
        volume: &GroupVolume,
        changes: &[RecordIn],
    ) -> Result<Seq, ApplianceError> {
        self.refuse_if_fenced()?;
        if volume.removed.load(Ordering::Relaxed) {
            return Err(ApplianceError::Refused(format!(
                "volume {} was removed from group {}",
                volume.name, self.name
            )));
        }
        let last = self.append_indexed(changes, Origin::Host, |journal, locations| {
            journal.append_located(changes, locations)
        })?;
        if let Some(last) = changes.iter().map(|c| c.source_seq).max() {
            volume.last_source_seq.fetch_max(last, Ordering::Relaxed);
        }
        // Sync mode ships appended records at once: the host waits for the round trip.
        if let Some(shipping) = self.replication.shipping.as_ref() {
            if shipping.tracks_remote_acks() {
                shipping.wake_shipper();
            }
        }
        Ok(last)
    }

    /// Appends records shipped from the source group with their original seqs and times,
    /// indexing them like `append` (history for images, resync spans, bookmarks). A record
    /// that does not continue the journal is the peer's error and changes nothing; an I/O
    /// failure fences the group.
    pub fn append_replicated(
        &self,
        records: &[RecordIn],
        first_seq: Seq,
        timestamps_ns: &[u64],
    ) -> Result<Seq, ApplianceError> {
        let last = self.append_indexed(records, Origin::Replicated, |journal, locations| {
            journal.append_replicated_located(records, first_seq, timestamps_ns, locations)
        })?;
        let by_id: BTreeMap<u32, Arc<GroupVolume>> =
            self.volumes().into_iter().map(|v| (v.id, v)).collect();
        for (i, r) in records.iter().enumerate() {
            if r.kind == RecordKind::Bookmark {
                self.bookmarks.note_replicated(
                    Seq(first_seq.0 + i as u64),
                    timestamps_ns[i],
                    &r.payload,
                );
            } else if let Some(v) = by_id.get(&r.volume) {
                // Kept for a later failover: a splitter attaching here resumes from it.
                v.last_source_seq.fetch_max(r.source_seq, Ordering::Relaxed);
            }
        }
        Ok(last)
    }

    /// The one path of every append to the journal: refuses a fenced group, appends with
    /// `append_to` under the history lock (so once a seq is visible every lower change is
    /// indexed), indexes the records for images and resync spans, and fences the group when
    /// the journal fails.
    fn append_indexed(
        &self,
        records: &[RecordIn],
        origin: Origin,
        append_to: impl FnOnce(&Journal, &mut Vec<RecordLocation>) -> Result<Seq, JournalError>,
    ) -> Result<Seq, ApplianceError> {
        self.refuse_if_fenced()?;
        self.last_append_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut history = self.history.lock();
        let mut locations = Vec::with_capacity(records.len());
        let last = match append_to(&self.journal, &mut locations) {
            Ok(last) => last,
            Err(JournalError::InvalidArgument(what)) if origin == Origin::Replicated => {
                return Err(ApplianceError::Refused(what))
            }
            Err(e) => {
                drop(history);
                let what = format!("journal append failed: {e}");
                self.fail(what.clone());
                return Err(ApplianceError::Fenced(what));
            }
        };
        let first = last.0 + 1 - locations.len() as u64;
        for (i, (r, location)) in records.iter().zip(&locations).enumerate() {
            history.note_redo(first + i as u64, redo_ref(r, *location));
        }
        drop(history);
        self.resync_spans.note_batch(records, last);
        Ok(last)
    }

    /// `Fenced` once the group failed: nothing is appended or acknowledged after a failure.
    pub(super) fn refuse_if_fenced(&self) -> Result<(), ApplianceError> {
        match self.failure.borrow().clone() {
            Some(failure) => Err(ApplianceError::Fenced(failure)),
            None => Ok(()),
        }
    }

    /// The journal-full policy, applied before each append from a split link: over
    /// capacity, distribution runs at once so retention can release the oldest history;
    /// under `throttle` the caller must also hold the host's writes (returns true) until
    /// this returns false.
    pub fn journal_full_hold(&self) -> bool {
        // Async replication with `throttle_on_rpo`: the remote copy is further behind than
        // its RPO while the link is up, so the host waits for shipping to catch up.
        if let Some(s) = self
            .replication
            .shipping
            .as_ref()
            .filter(|s| s.rpo_regulated())
        {
            // The byte target is checked on every append, not only at the shipper's
            // once-a-second measurement, so the backlog never grows far past it.
            let shipped = Seq(s.shipped_seq.load(Ordering::Relaxed));
            if s.rpo_throttling()
                || s.config
                    .rpo_bytes
                    .is_some_and(|b| self.journal_bytes_after(shipped) > b)
            {
                return true;
            }
        }
        if !*self.over_capacity.borrow() {
            return false;
        }
        self.urge_distribution();
        self.journal_full_policy == JournalFullPolicy::Throttle
    }

    /// Returns once `journal_full_hold` is false. It can only turn false when a retention
    /// pass clears `over_capacity` or the remote copy's position or RPO state moves (the
    /// shipper pulses `shipped` for each), so it waits on those instead of polling.
    pub async fn wait_journal_full_hold(&self) {
        // Subscribed before each check, so a change between the check and the wait wakes it.
        let mut capacity = self.over_capacity.subscribe();
        let mut shipped = self
            .replication
            .shipping
            .as_ref()
            .map(|s| s.shipped.subscribe());
        while self.journal_full_hold() {
            let shipping_moved = async {
                let moved = match shipped.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                };
                if !moved {
                    // No shipper, or it is gone: only the retention pass can release.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = capacity.changed() => {
                    if changed.is_err() {
                        // The group is being dropped; the connection ends with it.
                        return;
                    }
                }
                () = shipping_moved => {}
            }
        }
    }

    /// Journal bytes holding records after `seq` (what a remote copy at `seq` lacks), to
    /// record precision where the index knows the next change's place, else by segment.
    pub fn journal_bytes_after(&self, seq: Seq) -> u64 {
        let infos = self.journal.segment_infos();
        let next = seq.0 + 1;
        let i = infos
            .partition_point(|s| s.first_seq <= next)
            .saturating_sub(1);
        let Some(holding) = infos.get(i) else {
            return 0;
        };
        let later: u64 = infos[i + 1..].iter().map(|s| s.bytes).sum();
        let in_holding = {
            let history = self.history.lock();
            (next..next.saturating_add(RPO_BYTES_LOOKAHEAD_RECORDS))
                .find_map(|s| history.redo_ref(s))
                .filter(|r| r.location.segment == holding.index)
                .map_or(holding.bytes, |r| {
                    holding.bytes.saturating_sub(r.location.offset)
                })
        };
        if seq.0 >= self.journal.last_seq().0 {
            return 0;
        }
        in_holding + later
    }
}

/// Where an append's records come from, which decides what a refused batch means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A split link: the appliance built the batch itself, so any journal error fences.
    Host,
    /// The replication link: a batch that does not continue the journal
    /// (`InvalidArgument`) is the peer's error and changes nothing; other errors fence.
    Replicated,
}

pub(super) fn redo_ref(c: &RecordIn, location: RecordLocation) -> Option<RedoRef> {
    RedoRef::new(location, c.kind, c.volume, c.offset, c.length)
}

/// `journal_bytes_after` looks this far for the next record the index places.
pub(super) const RPO_BYTES_LOOKAHEAD_RECORDS: u64 = 64;
