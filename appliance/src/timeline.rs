//! A group's timeline: the recoverable window, its bookmarks, and write activity per time
//! bucket. Computed by scanning the journal's record headers (payloads are CRC-checked, not
//! kept or decompressed). TODO: keep per-segment activity summaries so a long journal is not
//! rescanned on every request.

use cdp_journal::Journal;

use crate::bookmark::Bookmark;
use crate::consolidation::ConsolidationState;
use crate::error::ApplianceError;
use crate::limits::{TIMELINE_BUCKETS_MAX, TIMELINE_BUCKET_NS_DEFAULT};
use crate::point::format_time;

pub use cdp_control::{
    ActivityBucket, ConsolidatedHistory as Consolidated, NotRecoverable, Timeline, WindowEnd,
};

/// Scans the journal from its first record and builds the timeline. `oldest` is the group's
/// oldest recoverable point (`Group::oldest_point`): when it is the state just before the
/// first record, the window starts there, stamped just before that record, as `cdp status`
/// and `cdp point resolve` say.
pub fn timeline(
    group: &str,
    journal: &Journal,
    bookmarks: Vec<Bookmark>,
    consolidation: &ConsolidationState,
    oldest: u64,
) -> Result<Timeline, ApplianceError> {
    let mut kept = Vec::new();
    // (timestamp, bytes) of every change record, in seq order.
    let mut stamps: Vec<(u64, u64)> = Vec::new();
    let mut first = None;
    let mut last = None;
    let mut activity: Vec<ActivityBucket> = Vec::new();
    let reader = journal.read_headers_from(journal.first_seq())?;
    for record in reader {
        let record = record?;
        let end = WindowEnd {
            seq: record.seq.0,
            timestamp_ns: record.timestamp.0,
            time: format_time(record.timestamp.0),
        };
        // Records below the oldest point (undo floor, consolidation) are history no image
        // can show.
        if end.seq < oldest {
            continue;
        }
        if first.is_none() {
            if oldest < end.seq {
                let before = WindowEnd {
                    seq: oldest,
                    timestamp_ns: end.timestamp_ns.saturating_sub(1),
                    time: format_time(end.timestamp_ns.saturating_sub(1)),
                };
                if before.seq < consolidation.consolidated_below
                    && consolidation.kept.contains(&before.seq)
                {
                    kept.push(before.clone());
                }
                first = Some(before);
            } else {
                first = Some(end.clone());
            }
        }
        if end.seq < consolidation.consolidated_below && consolidation.kept.contains(&end.seq) {
            kept.push(end.clone());
        }
        last = Some(end);
        // Only volume changes count as activity (not bookmarks or other markers).
        if record.kind.change_kind().is_some() {
            stamps.push((record.timestamp.0, record.length));
        }
    }
    // Widen the bucket until the window fits in the bucket limit.
    let mut bucket_ns = TIMELINE_BUCKET_NS_DEFAULT;
    if let (Some(f), Some(l)) = (&first, &last) {
        let span = l.timestamp_ns - f.timestamp_ns.min(l.timestamp_ns);
        while span / bucket_ns >= TIMELINE_BUCKETS_MAX as u64 {
            bucket_ns = bucket_ns.saturating_mul(2);
        }
    }
    for (ts, bytes) in stamps {
        let start_ns = ts - ts % bucket_ns;
        match activity.last_mut() {
            Some(b) if b.start_ns == start_ns => {
                b.records += 1;
                b.bytes += bytes;
            }
            _ => activity.push(ActivityBucket {
                start_ns,
                start: format_time(start_ns),
                records: 1,
                bytes,
            }),
        }
    }
    Ok(Timeline {
        group: group.to_string(),
        first,
        last,
        bookmarks,
        bucket_s: bucket_ns / 1_000_000_000,
        activity,
        consolidated: (consolidation.consolidated_below > 0).then_some(Consolidated {
            below_seq: consolidation.consolidated_below,
            kept,
        }),
        not_recoverable: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_journal::{JournalConfig, RecordIn, RecordKind};

    /// Goal: the timeline's window and activity match what was appended. Method: append
    /// writes of known sizes and a bookmark to a tempdir journal; the oracle is the count and
    /// byte sum of the appended writes (all within one minute, so one or two buckets).
    #[test]
    fn counts_records_and_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(tmp.path(), 3, JournalConfig::default()).expect("open");
        let empty = timeline("g", &journal, Vec::new(), &ConsolidationState::default(), 1)
            .expect("empty timeline");
        assert!(empty.first.is_none() && empty.activity.is_empty());
        let writes: Vec<RecordIn> = (1..=5u64)
            .map(|i| {
                RecordIn::write(
                    1,
                    i * 4096,
                    bytes::Bytes::from(vec![1u8; 1000 * i as usize]),
                )
            })
            .collect();
        journal.append(&writes).expect("append");
        journal
            .append(&[RecordIn::bookmark("b")])
            .expect("bookmark");
        journal
            .append(&[RecordIn::range(RecordKind::Trim, 1, 0, 8192)])
            .expect("trim");
        let t = timeline("g", &journal, Vec::new(), &ConsolidationState::default(), 1)
            .expect("timeline");
        assert_eq!(t.first.as_ref().map(|f| f.seq), Some(1));
        assert_eq!(t.last.as_ref().map(|l| l.seq), Some(7));
        assert_eq!(t.bucket_s, 60);
        let records: u64 = t.activity.iter().map(|b| b.records).sum();
        let bytes: u64 = t.activity.iter().map(|b| b.bytes).sum();
        assert_eq!(records, 6);
        assert_eq!(bytes, 15_000 + 8192);
        assert!(t.activity.len() <= 2);
    }
}
