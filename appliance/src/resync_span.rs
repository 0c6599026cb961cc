//! Spans of the journal in which a volume was being resynchronised: points inside them are
//! not consistent with production and are not offered for recovery.
//!
//! A resync after marking mode starts earlier than its `ResyncStart`: from the moment the
//! splitter began marking, it acknowledged host writes that only production and its dirty
//! bitmap hold. The splitter says when (`ResyncStart`'s `marking_since_ns`), and the span
//! then covers every point stamped at or after that moment too. That moment is kept in
//! memory only (the journal's marker records carry no time of their own): after an
//! appliance restart a finished span goes back to starting at its `ResyncStart`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cdp_journal::{Journal, RecordIn, RecordKind};
use cdp_types::Seq;

use crate::error::ApplianceError;

/// One resync of one volume: from its `ResyncStart` record to its `ResyncEnd` (open while
/// still running or interrupted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncSpan {
    pub volume: u32,
    pub start: u64,
    pub end: Option<u64>,
    /// The splitter began marking at this moment (ns since the Unix epoch), before `start`.
    pub marking_since_ns: Option<u64>,
}

impl ResyncSpan {
    /// The state after record `seq` (stamped `timestamp_ns`) has some but maybe not all of
    /// the copies, or lacks writes the splitter acknowledged while marking.
    pub fn contains(&self, seq: u64, timestamp_ns: u64) -> bool {
        if self.end.is_some_and(|end| seq >= end) {
            return false;
        }
        seq > self.start || self.marking_since_ns.is_some_and(|m| timestamp_ns >= m)
    }
}

/// The group's resync spans, rebuilt from the journal at start-up and kept current by appends.
#[derive(Default)]
pub struct ResyncSpans {
    spans: Mutex<Vec<ResyncSpan>>,
    /// Per volume, the marking moment the next `ResyncStart` record of it brings.
    marking_since: Mutex<BTreeMap<u32, u64>>,
}

impl ResyncSpans {
    /// Forgets every span (the history was restarted after a resynchronisation).
    pub fn clear(&self) {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Reads every record header once (no payloads) to find the markers.
    pub fn rebuild(journal: &Journal) -> Result<ResyncSpans, ApplianceError> {
        let spans = ResyncSpans::default();
        for record in journal.read_headers_from(journal.first_seq())? {
            let record = record?;
            spans.note(record.kind, record.volume, record.seq.0);
        }
        Ok(spans)
    }

    /// The next `ResyncStart` of `volume` follows marking that began at `since_ns`.
    pub fn note_marking_since(&self, volume: u32, since_ns: u64) {
        let mut pending = self.marking_since.lock().unwrap_or_else(|p| p.into_inner());
        let at = pending.entry(volume).or_insert(since_ns);
        *at = (*at).min(since_ns);
    }

    /// Every span, oldest first.
    pub fn list(&self) -> Vec<ResyncSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the markers of a batch appended with seqs ending at `last`.
    pub fn note_batch(&self, records: &[RecordIn], last: Seq) {
        let first = last.0 + 1 - records.len() as u64;
        for (i, r) in records.iter().enumerate() {
            self.note(r.kind, r.volume, first + i as u64);
        }
    }

    pub(crate) fn note(&self, kind: RecordKind, volume: u32, seq: u64) {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            RecordKind::ResyncStart => {
                let since = self
                    .marking_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&volume);
                // A new start while one is open (an interrupted resync) extends that span.
                if let Some(open) = spans
                    .iter_mut()
                    .find(|s| s.volume == volume && s.end.is_none())
                {
                    if let Some(since) = since {
                        open.marking_since_ns =
                            Some(open.marking_since_ns.map_or(since, |m| m.min(since)));
                    }
                } else {
                    spans.push(ResyncSpan {
                        volume,
                        start: seq,
                        end: None,
                        marking_since_ns: since,
                    });
                }
            }
            RecordKind::ResyncEnd => {
                if let Some(open) = spans
                    .iter_mut()
                    .rev()
                    .find(|s| s.volume == volume && s.end.is_none())
                {
                    open.end = Some(seq);
                }
            }
            _ => {}
        }
    }

    /// The span a point falls into, if any.
    pub fn containing(&self, seq: u64, timestamp_ns: u64) -> Option<ResyncSpan> {
        let spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .iter()
            .find(|s| s.contains(seq, timestamp_ns))
            .cloned()
    }

    /// A span still open (its volume is resyncing), if any.
    pub fn open(&self) -> Option<ResyncSpan> {
        let spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans.iter().find(|s| s.end.is_none()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_inside_a_span_are_found_and_ends_are_consistent() {
        let spans = ResyncSpans::default();
        spans.note(RecordKind::ResyncStart, 1, 10);
        spans.note(RecordKind::Write, 1, 11);
        spans.note(RecordKind::ResyncStart, 1, 12);
        spans.note(RecordKind::ResyncEnd, 1, 20);
        spans.note(RecordKind::ResyncStart, 2, 30);
        let spans_containing = |seq| spans.containing(seq, 0);
        assert_eq!(
            spans_containing(10),
            None,
            "the start itself changed nothing"
        );
        assert_eq!(
            spans_containing(11).map(|s| (s.start, s.end)),
            Some((10, Some(20)))
        );
        assert_eq!(spans_containing(19).map(|s| s.start), Some(10));
        assert_eq!(spans_containing(20), None, "the end is consistent again");
        assert_eq!(spans_containing(25), None);
        assert_eq!(
            spans_containing(31).map(|s| (s.volume, s.end)),
            Some((2, None))
        );
    }

    #[test]
    fn a_span_after_marking_starts_at_the_marking_moment() {
        // Points stamped after marking began lack acknowledged writes although they come
        // before the ResyncStart record; points before it, and from the end on, are fine.
        let spans = ResyncSpans::default();
        spans.note_marking_since(1, 1_000);
        spans.note(RecordKind::ResyncStart, 1, 50);
        assert_eq!(spans.containing(40, 999), None, "before marking began");
        assert_eq!(spans.containing(41, 1_000).map(|s| s.start), Some(50));
        assert_eq!(spans.containing(50, 2_000).map(|s| s.start), Some(50));
        spans.note(RecordKind::ResyncEnd, 1, 60);
        assert!(spans.containing(59, 3_000).is_some());
        assert_eq!(
            spans.containing(60, 3_000),
            None,
            "the end is consistent again"
        );
        assert_eq!(spans.containing(70, 4_000), None);
    }
}
