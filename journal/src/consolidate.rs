//! Consolidation's file work: rewriting one sealed segment with some Write payloads dropped,
//! crash-safely, under the same index and first seq.
//!
//! The caller decides which payloads no kept point needs (the appliance's consolidation
//! policy); this module only rewrites. Kept records are copied with their header fields and
//! stored payload unchanged (so their CRC is the same), dropped ones keep their header with
//! `RECORD_FLAG_PAYLOAD_DROPPED` and no payload, so seqs stay contiguous and every record's
//! time and kind stay readable. Offsets change: the new location of every record is returned.
//!
//! Crash safety: the new file is written as `<segment>.consolidating`, fdatasynced, renamed
//! over the segment and the directory fsynced. A crash before the rename leaves the old
//! segment and a leftover that `recover` deletes; after it, the new segment, which is valid
//! on its own. Readers that already hold the old file keep reading it through their handle.

use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

use cdp_types::Seq;

use crate::engine::Journal;
use crate::error::JournalError;
use crate::format::{
    RecordHeader, SegmentHeader, Version, RECORD_FLAG_PAYLOAD_DROPPED, RECORD_FLAG_ZSTD,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::record::{Record, RecordKind, RecordLocation};
use crate::recover::read_header;
use crate::scan::{Payload, ScanError, Scanner};
use crate::segment::{segment_path, Segment};

pub use crate::recover::CONSOLIDATING_SUFFIX;

/// Bytes gathered before each write of the new file.
const REWRITE_BUFFER_BYTES: usize = 8 << 20;

/// What rewriting one segment did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentRewrite {
    pub index: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Payloads dropped by this rewrite (not counting ones dropped before).
    pub dropped: u64,
    /// Every record of the segment: seq, new location, whether its payload is dropped now.
    pub records: Vec<(u64, RecordLocation, bool)>,
}

/// The path of segment `index`'s rewrite in progress.
fn consolidating_path(dir: &Path, index: u64) -> PathBuf {
    let mut name = segment_path(dir, index).into_os_string();
    name.push(CONSOLIDATING_SUFFIX);
    PathBuf::from(name)
}

impl Journal {
    /// Rewrites sealed segment `index` without the payloads of the Write records for which
    /// `drop_payload` (given each record with an empty payload) returns true. Returns `None`
    /// when the segment is gone (released) or is the active one, or when nothing would be
    /// dropped. Runs under the journal's release lock, so retention never races it.
    pub fn consolidate_segment(
        &self,
        index: u64,
        drop_payload: &mut dyn FnMut(&Record) -> bool,
    ) -> Result<Option<SegmentRewrite>, JournalError> {
        let inner = self.inner();
        let _one_at_a_time: MutexGuard<'_, ()> =
            inner.release.lock().unwrap_or_else(|e| e.into_inner());
        let old: Arc<Segment> = {
            let segs = inner.segments();
            let i = segs.partition_point(|s| s.index < index);
            match segs.get(i) {
                Some(s) if s.index == index && i + 1 < segs.len() => s.clone(),
                _ => return Ok(None),
            }
        };
        let old_header = read_header(old.file(), index, Some(inner.group_id))?;
        let limit = old.written();

        // First pass: decide, so an unchanged segment is not rewritten at all.
        let mut drops = Vec::new();
        let mut scanner = Scanner::new(inner.group_id, index, SEGMENT_HEADER_LEN as u64);
        while let Some(found) = next(&mut scanner, &old, limit, Payload::Skip)? {
            let h = found.header;
            if h.kind == RecordKind::Write && !h.payload_dropped() {
                let record = header_record(&h);
                if drop_payload(&record) {
                    drops.push(h.seq);
                }
            }
        }
        if drops.is_empty() {
            return Ok(None);
        }

        let tmp = consolidating_path(&inner.dir, index);
        let _ = std::fs::remove_file(&tmp);
        let file = inner
            .env
            .create_new(&tmp)
            .map_err(|e| JournalError::io("create", &tmp, e))?;
        let written = (|| {
            let header = SegmentHeader {
                version: Version::V3,
                ..old_header
            };
            let mut out = Vec::with_capacity(REWRITE_BUFFER_BYTES + RECORD_HEADER_LEN);
            out.extend_from_slice(&header.encode());
            let mut file_at = 0u64;
            let mut rewrite = SegmentRewrite {
                index,
                bytes_before: limit,
                ..SegmentRewrite::default()
            };
            let mut drops = drops.iter().peekable();
            let mut scanner = Scanner::new(inner.group_id, index, SEGMENT_HEADER_LEN as u64);
            while let Some(found) = next(&mut scanner, &old, limit, Payload::KeepFrom(0))? {
                let mut h = found.header;
                let mut payload = found.payload;
                let drop_now = drops.peek() == Some(&&h.seq);
                if drop_now {
                    drops.next();
                    h.flags = (h.flags & !RECORD_FLAG_ZSTD) | RECORD_FLAG_PAYLOAD_DROPPED;
                    h.payload_len = 0;
                    payload = bytes::Bytes::new();
                    rewrite.dropped += 1;
                }
                let at = file_at + out.len() as u64;
                rewrite.records.push((
                    h.seq,
                    RecordLocation {
                        segment: index,
                        offset: at,
                    },
                    h.payload_dropped(),
                ));
                let mut head = [0u8; RECORD_HEADER_LEN];
                h.encode(inner.group_id, index, &payload, &mut head);
                out.extend_from_slice(&head);
                out.extend_from_slice(&payload);
                if out.len() >= REWRITE_BUFFER_BYTES {
                    file.write_all_at(&out, file_at)
                        .map_err(|e| JournalError::io("write", &tmp, e))?;
                    file_at += out.len() as u64;
                    out.clear();
                }
            }
            file.write_all_at(&out, file_at)
                .map_err(|e| JournalError::io("write", &tmp, e))?;
            file_at += out.len() as u64;
            file.sync_data()
                .map_err(|e| JournalError::io("fdatasync", &tmp, e))?;
            rewrite.bytes_after = file_at;
            Ok::<_, JournalError>((rewrite, header))
        })();
        let (rewrite, header) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        drop(file);
        let path = segment_path(&inner.dir, index);
        std::fs::rename(&tmp, &path).map_err(|e| JournalError::io("rename", &tmp, e))?;
        inner
            .env
            .sync_dir(&inner.dir)
            .map_err(|e| JournalError::io("fsync dir", &inner.dir, e))?;
        let file = inner
            .env
            .open_rw(&path)
            .map_err(|e| JournalError::io("open", &path, e))?;
        let new = Arc::new(Segment::from_file(file, &header, rewrite.bytes_after));
        {
            let mut segs = inner.segments.write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = segs.iter_mut().find(|s| s.index == index) {
                *slot = new;
            }
        }
        // The records moved: so do the time marks, in memory and beside the segment.
        let moved: Vec<(u64, u64)> = rewrite
            .records
            .iter()
            .map(|(seq, location, _)| (*seq, location.offset))
            .collect();
        let mut times = inner.times();
        times.relocate(index, &moved);
        match times.segment(index) {
            Some(marks) => crate::time_index::store(
                &inner.dir,
                inner.group_id,
                header.first_seq,
                rewrite.bytes_after,
                marks,
            ),
            None => crate::time_index::remove(&inner.dir, index),
        }
        Ok(Some(rewrite))
    }

    /// The index and last seq of every sealed segment (all but the active one), oldest
    /// first: what consolidation may rewrite.
    pub fn sealed_segments(&self) -> Vec<(u64, Seq)> {
        let segs = self.inner().segments();
        segs.windows(2)
            .map(|w| (w[0].index, Seq(w[1].first_seq.saturating_sub(1))))
            .collect()
    }
}

fn next(
    scanner: &mut Scanner,
    segment: &Segment,
    limit: u64,
    payload: Payload,
) -> Result<Option<crate::scan::Scanned>, JournalError> {
    scanner
        .next(segment.file(), limit, payload)
        .map_err(|e| match e {
            ScanError::Corrupt { offset, what } => {
                JournalError::corruption(segment.path(), offset, what)
            }
            ScanError::Io { error, .. } => JournalError::io("read", segment.path(), error),
        })
}

/// A record as `drop_payload` sees it: the header's fields, no payload.
fn header_record(h: &RecordHeader) -> Record {
    Record {
        seq: Seq(h.seq),
        timestamp: cdp_types::TimestampNs(h.timestamp_ns),
        kind: h.kind,
        volume: h.volume,
        source_seq: h.source_seq,
        offset: h.offset,
        length: h.length,
        payload: bytes::Bytes::new(),
        payload_dropped: h.payload_dropped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JournalConfig, RecordIn};
    use bytes::Bytes;

    fn small_segments() -> JournalConfig {
        JournalConfig {
            segment_bytes_max: crate::limits::SEGMENT_BYTES_MIN,
            compress_writes: false,
        }
    }

    /// Dropped payloads are gone, kept ones read back byte for byte at their new
    /// locations, seqs and times stay, the segment shrinks, and a reopen sees the same.
    #[test]
    fn rewrite_drops_payloads_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), 5, small_segments()).unwrap();
        let mut expected = Vec::new();
        for i in 0..600u64 {
            let payload = Bytes::from(vec![(i % 251) as u8 + 1; 4096]);
            let seq = j
                .append(&[RecordIn::write(1, i * 4096, payload.clone())])
                .unwrap();
            expected.push((seq, payload));
        }
        j.append(&[RecordIn::bookmark("b")]).unwrap();
        j.sync().unwrap();
        let sealed = j.sealed_segments();
        assert!(sealed.len() >= 2, "{sealed:?}");
        let (index, last) = sealed[0];
        let before = j.size_bytes();
        let rewrite = j
            .consolidate_segment(index, &mut |r| r.seq.0 % 2 == 0)
            .unwrap()
            .unwrap();
        assert!(rewrite.dropped > 0);
        assert!(rewrite.bytes_after < rewrite.bytes_before);
        assert_eq!(
            j.size_bytes(),
            before - (rewrite.bytes_before - rewrite.bytes_after)
        );
        for &(seq, location, dropped) in &rewrite.records {
            assert_eq!(dropped, seq % 2 == 0 && seq <= last.0);
            let read = j.read_at(location, Seq(seq));
            if dropped {
                assert!(read.unwrap_err().to_string().contains("consolidation"));
            } else {
                assert_eq!(read.unwrap().payload, expected[seq as usize - 1].1);
            }
        }
        // A second pass with the same decision has nothing left to do.
        assert!(j
            .consolidate_segment(index, &mut |r| r.seq.0 % 2 == 0)
            .unwrap()
            .is_none());
        drop(j);
        let (j, _) = Journal::open(dir.path(), 5, small_segments()).unwrap();
        let mut n = 0;
        for r in j.read_from(Seq(1)).unwrap() {
            let r = r.unwrap();
            n += 1;
            if r.kind != RecordKind::Write {
                continue;
            }
            let (seq, payload) = &expected[r.seq.0 as usize - 1];
            assert_eq!(r.seq, *seq);
            if r.payload_dropped {
                assert!(r.seq.0 <= last.0 && r.seq.0 % 2 == 0);
                assert!(r.payload.is_empty());
                assert_eq!(r.length, 4096);
            } else {
                assert_eq!(&r.payload, payload);
            }
        }
        assert_eq!(n, 601);
        let report = crate::inspect(j.dir()).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// The active segment is never rewritten, and a leftover rewrite is removed at open.
    #[test]
    fn active_segment_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), 5, small_segments()).unwrap();
        j.append(&[RecordIn::write(1, 0, Bytes::from(vec![1u8; 4096]))])
            .unwrap();
        let active = j.inner().segments()[0].index;
        assert!(j
            .consolidate_segment(active, &mut |_| true)
            .unwrap()
            .is_none());
        let journal_dir = j.dir().to_path_buf();
        drop(j);
        let leftover = consolidating_path(&journal_dir, active);
        std::fs::write(&leftover, b"half a rewrite").unwrap();
        let (j, _) = Journal::open(dir.path(), 5, small_segments()).unwrap();
        assert!(!leftover.exists());
        assert_eq!(j.last_seq(), Seq(1));
    }

    /// `restart_at` drops the history and continues at the given seq, across a reopen.
    #[test]
    fn restart_continues_at_a_later_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), 5, small_segments()).unwrap();
        for i in 0..300u64 {
            j.append(&[RecordIn::write(1, i * 4096, Bytes::from(vec![1u8; 4096]))])
                .unwrap();
        }
        assert!(j.restart_at(Seq(10)).is_err());
        j.restart_at(Seq(1001)).unwrap();
        assert_eq!(
            (j.first_seq(), j.last_seq(), j.durable_seq()),
            (Seq(1001), Seq(1000), Seq(1000))
        );
        let seq = j
            .append(&[RecordIn::write(1, 0, Bytes::from(vec![2u8; 4096]))])
            .unwrap();
        assert_eq!(seq, Seq(1001));
        j.sync().unwrap();
        drop(j);
        let (j, _) = Journal::open(dir.path(), 5, small_segments()).unwrap();
        assert_eq!((j.first_seq(), j.last_seq()), (Seq(1001), Seq(1001)));
        let r: Vec<_> = j
            .read_from(Seq(1))
            .unwrap()
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(r, vec![Seq(1001)]);
    }
}
