//! Retention: which whole segments may be released (deleted) from the front of the journal,
//! and releasing them crash-safely.
//!
//! The journal never decides on its own what is safe to drop: the caller passes `safe`, the
//! highest seq whose effect is durably elsewhere (the appliance passes the replica's
//! checkpointed distribution seq, because the replica is the base image). A segment is
//! released only if it is not the active one and every record in it is ≤ `safe`.
//!
//! Crash safety: segments are unlinked oldest first, with a directory fsync after each, so
//! the files left on disk are always a contiguous run of indexes ending at the active
//! segment. Recovery accepts a journal whose first index is not 1 (only gaps are damage).
//! A reader that already holds a released segment keeps reading it through its open file.

use std::sync::{Arc, MutexGuard};

use cdp_types::Seq;

use crate::engine::{Inner, Journal};
use crate::error::JournalError;
use crate::format::{RecordHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::segment::Segment;

/// How much journal to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Release the oldest segments while the journal is bigger than this.
    pub capacity_bytes: u64,
    /// Also release segments whose every record is older than this many ns.
    pub window_ns: Option<u64>,
}

/// One segment as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub index: u64,
    pub first_seq: u64,
    /// Bytes in the file (header included) as far as appends have returned.
    pub bytes: u64,
    pub created_ns: u64,
}

/// What a retention pass should do, computed without touching any file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Release every segment whose records are all ≤ this seq (`None`: release nothing).
    pub through: Option<Seq>,
    /// Segments and bytes the release will free.
    pub segments: usize,
    pub bytes: u64,
    /// The journal is still bigger than the capacity after the planned release, because
    /// the records that would have to go are not yet `safe` (distribution is behind).
    pub over_capacity: bool,
}

/// What `release_through` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub segments: usize,
    pub bytes: u64,
    /// The journal's first seq afterwards: the oldest recoverable point.
    pub first_seq: Seq,
}

/// Decides which front segments to release. `segs` is in index order and its last entry is
/// the active segment, which is never released. Pure, so it is tested on its own.
pub fn plan(
    segs: &[SegmentInfo],
    policy: &RetentionPolicy,
    safe: Seq,
    now_ns: u64,
) -> RetentionPlan {
    let mut total: u64 = segs.iter().map(|s| s.bytes).sum();
    let cutoff = policy.window_ns.map(|w| now_ns.saturating_sub(w));
    let mut out = RetentionPlan::default();
    for pair in segs.windows(2) {
        let (seg, next) = (&pair[0], &pair[1]);
        let over = total > policy.capacity_bytes;
        // The next segment was created after every record of this one was stamped.
        let expired = cutoff.is_some_and(|c| next.created_ns <= c);
        if !over && !expired {
            break;
        }
        let last_seq = next.first_seq.saturating_sub(1);
        if last_seq > safe.0 {
            break;
        }
        total -= seg.bytes;
        out.segments += 1;
        out.bytes += seg.bytes;
        out.through = Some(Seq(last_seq));
    }
    out.over_capacity = total > policy.capacity_bytes;
    out
}

impl Journal {
    /// Every segment, oldest first; the last is the active one.
    pub fn segment_infos(&self) -> Vec<SegmentInfo> {
        self.inner()
            .segments()
            .iter()
            .map(|s| SegmentInfo {
                index: s.index,
                first_seq: s.first_seq,
                bytes: s.written(),
                created_ns: s.created_ns,
            })
            .collect()
    }

    /// What a retention pass under `policy` would release now, given that every record
    /// ≤ `safe` may go.
    pub fn retention_plan(
        &self,
        policy: &RetentionPolicy,
        safe: Seq,
        now_ns: u64,
    ) -> RetentionPlan {
        plan(&self.segment_infos(), policy, safe, now_ns)
    }

    /// Deletes, oldest first, every segment except the active one whose records all have
    /// seq ≤ `through`. Crash-safe (see the module comment). One call runs at a time.
    /// On an error the segments deleted so far stay deleted and the rest stay readable.
    pub fn release_through(&self, through: Seq) -> Result<Released, JournalError> {
        let inner = self.inner();
        let _one_at_a_time: MutexGuard<'_, ()> =
            inner.release.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = Released::default();
        loop {
            let Some(seg) = releasable_front(inner, through) else {
                break;
            };
            let path = seg.path().to_path_buf();
            inner
                .env
                .remove_file(&path)
                .map_err(|e| JournalError::io("remove", &path, e))?;
            // The name is gone whether or not the directory fsync below succeeds, so the
            // segment leaves the list first.
            inner
                .segments
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| s.index != seg.index);
            inner.times().release_before(seg.index + 1);
            crate::time_index::remove(&inner.dir, seg.index);
            done.segments += 1;
            done.bytes += seg.written();
            // Make each unlink durable before the next, so a crash never leaves a gap.
            inner
                .env
                .sync_dir(&inner.dir)
                .map_err(|e| JournalError::io("fsync dir", &inner.dir, e))?;
        }
        done.first_seq = self.first_seq();
        Ok(done)
    }

    /// Timestamp (ns since the Unix epoch) of the oldest record kept, or `None` if the
    /// journal holds no record. Reads one record header.
    pub fn first_record_timestamp(&self) -> Result<Option<u64>, JournalError> {
        let seg = self.inner().segments()[0].clone();
        if seg.written() < (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64 {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        let got = seg
            .file()
            .read_at(&mut head, SEGMENT_HEADER_LEN as u64)
            .map_err(|e| JournalError::io("read", seg.path(), e))?;
        let h = RecordHeader::decode(&head[..got])
            .map_err(|c| JournalError::corruption(seg.path(), SEGMENT_HEADER_LEN as u64, c.0))?;
        Ok(Some(h.timestamp_ns))
    }
}

/// The oldest segment, if it may be released: not the active one, all records ≤ `through`.
fn releasable_front(inner: &Inner, through: Seq) -> Option<Arc<Segment>> {
    let segs = inner.segments();
    let (first, next) = (segs.first()?, segs.get(1)?);
    (next.first_seq.saturating_sub(1) <= through.0).then(|| first.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(index: u64, first_seq: u64, bytes: u64, created_ns: u64) -> SegmentInfo {
        SegmentInfo {
            index,
            first_seq,
            bytes,
            created_ns,
        }
    }

    fn policy(capacity_bytes: u64, window_ns: Option<u64>) -> RetentionPolicy {
        RetentionPolicy {
            capacity_bytes,
            window_ns,
        }
    }

    /// Capacity releases the oldest segments until the rest fit, never the active one,
    /// never past `safe`.
    #[test]
    fn capacity_releases_oldest_up_to_safe() {
        // Four segments of 100 bytes: seqs 1..=10, 11..=20, 21..=30, 31.. (active).
        let segs = [
            seg(1, 1, 100, 0),
            seg(2, 11, 100, 0),
            seg(3, 21, 100, 0),
            seg(4, 31, 100, 0),
        ];
        let p = plan(&segs, &policy(250, None), Seq(100), 0);
        assert_eq!(p.through, Some(Seq(20)));
        assert_eq!((p.segments, p.bytes, p.over_capacity), (2, 200, false));
        // Under capacity: nothing.
        assert_eq!(plan(&segs, &policy(400, None), Seq(100), 0).through, None);
        // Distribution behind: only what is safe, and the rest is over capacity.
        let p = plan(&segs, &policy(150, None), Seq(15), 0);
        assert_eq!(p.through, Some(Seq(10)));
        assert!(p.over_capacity);
        let p = plan(&segs, &policy(150, None), Seq(9), 0);
        assert_eq!((p.through, p.over_capacity), (None, true));
        // Capacity smaller than the active segment: everything but the active one goes.
        let p = plan(&segs, &policy(1, None), Seq(100), 0);
        assert_eq!((p.through, p.segments), (Some(Seq(30)), 3));
        // One segment only: never released.
        assert_eq!(
            plan(&segs[..1], &policy(1, None), Seq(100), 0).through,
            None
        );
    }

    /// The time window releases segments whose successor was created before the cutoff.
    #[test]
    fn window_releases_old_segments() {
        let segs = [seg(7, 1, 10, 100), seg(8, 5, 10, 200), seg(9, 9, 10, 300)];
        // now 350, window 100: cutoff 250; segment 7 (successor created at 200) is older.
        let p = plan(&segs, &policy(u64::MAX, Some(100)), Seq(100), 350);
        assert_eq!((p.through, p.segments), (Some(Seq(4)), 1));
        let p = plan(&segs, &policy(u64::MAX, Some(10)), Seq(100), 1000);
        assert_eq!((p.through, p.segments), (Some(Seq(8)), 2));
        assert_eq!(
            plan(&segs, &policy(u64::MAX, Some(1000)), Seq(100), 1000).through,
            None
        );
    }
}
