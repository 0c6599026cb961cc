//! Spans of the journal in which a volume was being resynchronised: points inside them are
//! not consistent with production and are not offered for recovery.

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
}

impl ResyncSpan {
    /// The state after record `seq` has some but maybe not all of the copies.
    pub fn contains(&self, seq: u64) -> bool {
        seq > self.start && self.end.is_none_or(|end| seq < end)
    }
}

/// The group's resync spans, rebuilt from the journal at start-up and kept current by appends.
#[derive(Default)]
pub struct ResyncSpans {
    spans: Mutex<Vec<ResyncSpan>>,
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

    /// Records the markers of a batch appended with seqs ending at `last`.
    pub fn note_batch(&self, records: &[RecordIn], last: Seq) {
        let first = last.0 + 1 - records.len() as u64;
        for (i, r) in records.iter().enumerate() {
            self.note(r.kind, r.volume, first + i as u64);
        }
    }

    fn note(&self, kind: RecordKind, volume: u32, seq: u64) {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            // A new start while one is open (an interrupted resync) extends that span.
            RecordKind::ResyncStart
                if !spans.iter().any(|s| s.volume == volume && s.end.is_none()) =>
            {
                spans.push(ResyncSpan {
                    volume,
                    start: seq,
                    end: None,
                });
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
    pub fn containing(&self, seq: u64) -> Option<ResyncSpan> {
        let spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans.iter().find(|s| s.contains(seq)).cloned()
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
        assert_eq!(
            spans.containing(10),
            None,
            "the start itself changed nothing"
        );
        assert_eq!(
            spans.containing(11).map(|s| (s.start, s.end)),
            Some((10, Some(20)))
        );
        assert_eq!(spans.containing(19).map(|s| s.start), Some(10));
        assert_eq!(spans.containing(20), None, "the end is consistent again");
        assert_eq!(spans.containing(25), None);
        assert_eq!(
            spans.containing(31).map(|s| (s.volume, s.end)),
            Some((2, None))
        );
    }
}
