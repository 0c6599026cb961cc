//! The markers a group's journal carries (bookmarks and resync spans) and whether a point
//! taken now would be recoverable (volumes without a split link, resyncs open).

use crate::bookmark::{Bookmark, BookmarkPayload};
use crate::error::ApplianceError;
use crate::resync_span::ResyncSpan;
use std::time::Instant;

use super::Group;

impl Group {
    /// The resync span a recovery point (record `seq`, stamped `timestamp_ns`) falls into,
    /// with the volume's name.
    pub fn resync_span_containing(
        &self,
        seq: u64,
        timestamp_ns: u64,
    ) -> Option<(String, ResyncSpan)> {
        let span = self.resync_spans.containing(seq, timestamp_ns)?;
        Some((self.volume_name(span.volume), span))
    }

    pub(super) fn volume_name(&self, id: u32) -> String {
        self.read_volumes()
            .values()
            .find(|v| v.id == id)
            .map_or_else(|| format!("volume id {id}"), |v| v.name.clone())
    }

    /// The next `ResyncStart` of `volume` follows marking that began at `since_ns`.
    pub fn note_marking_since(&self, volume: u32, since_ns: u64) {
        self.resync_spans.note_marking_since(volume, since_ns);
    }

    /// Every resync span still known, oldest first, with its volume's name.
    pub fn resync_spans(&self) -> Vec<(String, ResyncSpan)> {
        self.resync_spans
            .list()
            .into_iter()
            .map(|s| (self.volume_name(s.volume), s))
            .collect()
    }

    /// Volumes no splitter connection holds, with the moment since when (ns since the
    /// Unix epoch): their splitters may be marking, so points from then on may lack writes
    /// acknowledged to their hosts (DESIGN.md rule 7).
    pub fn volumes_down(&self) -> Vec<(String, u64)> {
        // A remote copy has no splitters: replication brings the source's recoverable points.
        if self.refuse_local_changes_at_remote_copy().is_err() {
            return Vec::new();
        }
        self.volumes()
            .iter()
            .filter_map(|v| v.link.down_since_ns().map(|since| (v.name.clone(), since)))
            .collect()
    }

    /// Why a point taken now would not be recoverable, if it would not be: a volume of the
    /// group has no split link (its splitter may be marking) or is resynchronising.
    pub fn not_recoverable_now(&self) -> Option<String> {
        if let Some((name, since)) = self.volumes_down().into_iter().next() {
            return Some(format!(
                "volume {name:?} has no connected splitter since {}: its splitter may be in \
                 marking mode, acknowledging host writes the journal does not have",
                crate::point::format_time(since)
            ));
        }
        self.resync_spans.open().map(|span| {
            format!(
                "volume {} is resynchronising (since seq {}): the journal lacks regions of it \
                 until the resync ends",
                self.volume_name(span.volume),
                span.start
            )
        })
    }

    /// Takes a bookmark after every write already acknowledged to a host and makes it
    /// durable; refused once `append_deadline` has passed. Blocks on an fsync: call from a
    /// blocking thread.
    pub fn create_bookmark(
        &self,
        payload: BookmarkPayload,
        append_deadline: Option<Instant>,
    ) -> Result<Bookmark, ApplianceError> {
        if let Some(failure) = self.failure.borrow().clone() {
            return Err(ApplianceError::Fenced(failure));
        }
        self.refuse_local_changes_at_remote_copy()?;
        self.bookmarks
            .create(&self.journal, payload, append_deadline, |what| {
                self.fail(what)
            })
    }

    /// The bookmarks still in the journal, oldest first.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        let mut list = self.bookmarks.list(&self.journal);
        let state = self.consolidation_state.read();
        for b in &mut list {
            b.consolidated = !state.is_kept(b.seq);
        }
        list
    }
}
