//! The time index: sampled (seq, timestamp, offset) marks of every segment, so "the last
//! record stamped at or before T" costs a binary search and a scan of at most
//! `TIME_MARK_RECORDS` records (or `TIME_MARK_BYTES`), whatever the journal's length.
//!
//! Marks are taken as records are appended (and by recovery's scan of the last segment).
//! When a segment is sealed its marks are written beside it as `{index:016x}.tix`
//! (`time_marks.rs`), so opening a journal reads one small file per sealed segment instead of
//! every header. The file is a cache: it is written without fsync (a crash can lose or tear
//! it), and at open one that fails its CRC, names another segment, another seq range or
//! another segment length is ignored, the segment's headers are scanned instead and the file
//! is written again. A mark whose offset no longer holds its seq (a segment rewritten
//! underneath) makes the lookup fall back to scanning that segment from its start.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cdp_types::{Seq, TimestampNs};

use crate::engine::Journal;
use crate::env::EnvFile;
use crate::error::JournalError;
use crate::format::SEGMENT_HEADER_LEN;
use crate::limits::{TIME_MARK_BYTES, TIME_MARK_RECORDS};
use crate::reader::JournalReader;
use crate::scan::{Payload, ScanError, Scanner};
use crate::segment::{Segment, SEGMENT_SUFFIX};
pub use crate::time_marks::{Mark, TimeMarks};

/// File-name suffix of a sealed segment's time marks.
pub const TIME_MARKS_SUFFIX: &str = ".tix";

/// The marks file of segment `index` in `dir`: the segment's name with `.tix`.
pub fn time_marks_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:016x}{TIME_MARKS_SUFFIX}"))
}

/// The marks of one segment, and the counters that decide the next mark.
#[derive(Clone, Debug, Default)]
pub(crate) struct SegmentMarks {
    pub index: u64,
    pub marks: Vec<Mark>,
    /// Records and bytes since the last mark.
    since_records: u64,
    since_bytes: u64,
    /// The last record noted: its seq, offset and stamp.
    pub last_seq: u64,
    pub last_offset: u64,
    pub last_timestamp_ns: u64,
}

impl SegmentMarks {
    fn from_file(t: TimeMarks) -> SegmentMarks {
        SegmentMarks {
            index: t.segment_index,
            marks: t.marks,
            since_records: 0,
            since_bytes: 0,
            last_seq: t.last_seq,
            last_offset: t.last_record_offset,
            last_timestamp_ns: t.last_timestamp_ns,
        }
    }

    /// The marks of the records before byte `end` (a tail checkpoint's prefix).
    pub fn prefix(&self, end: u64) -> SegmentMarks {
        let n = self.marks.partition_point(|m| m.offset < end);
        SegmentMarks {
            marks: self.marks[..n].to_vec(),
            ..self.clone()
        }
    }

    fn new(index: u64) -> SegmentMarks {
        SegmentMarks {
            index,
            ..SegmentMarks::default()
        }
    }

    /// Notes record `seq` (stamped `timestamp_ns`, `len` bytes with its header, at
    /// `offset`); the first record of a segment is always a mark.
    pub fn note(&mut self, seq: u64, timestamp_ns: u64, offset: u64, len: u64) {
        if self.marks.is_empty()
            || self.since_records >= TIME_MARK_RECORDS
            || self.since_bytes >= TIME_MARK_BYTES
        {
            self.marks.push(Mark {
                seq,
                timestamp_ns,
                offset,
            });
            self.since_records = 0;
            self.since_bytes = 0;
        }
        self.since_records += 1;
        self.since_bytes += len;
        self.last_seq = seq;
        self.last_offset = offset;
        self.last_timestamp_ns = timestamp_ns;
    }
}

/// Every segment's marks, oldest segment first. Segments without records have no entry.
#[derive(Debug, Default)]
pub(crate) struct TimeIndex {
    segments: VecDeque<SegmentMarks>,
}

impl TimeIndex {
    /// Adds a segment's marks at the back (open, in index order).
    pub fn push(&mut self, marks: SegmentMarks) {
        if !marks.marks.is_empty() {
            self.segments.push_back(marks);
        }
    }

    /// Notes an appended record of segment `index` (the active one).
    pub fn note(&mut self, index: u64, seq: u64, timestamp_ns: u64, offset: u64, len: u64) {
        if self.segments.back().is_none_or(|s| s.index != index) {
            self.segments.push_back(SegmentMarks::new(index));
        }
        if let Some(s) = self.segments.back_mut() {
            s.note(seq, timestamp_ns, offset, len);
        }
    }

    /// The marks of segment `index`, to persist when it is sealed.
    pub fn segment(&self, index: u64) -> Option<&SegmentMarks> {
        self.segments.iter().find(|s| s.index == index)
    }

    /// Forgets segments with an index below `first_index` (released by retention).
    pub fn release_before(&mut self, first_index: u64) {
        while self.segments.front().is_some_and(|s| s.index < first_index) {
            self.segments.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.segments.clear();
    }

    /// Consolidation moved the records of segment `index`: `moved` lists each record's seq
    /// and new offset, ascending by seq.
    pub fn relocate(&mut self, index: u64, moved: &[(u64, u64)]) {
        let Some(s) = self.segments.iter_mut().find(|s| s.index == index) else {
            return;
        };
        for m in &mut s.marks {
            if let Ok(i) = moved.binary_search_by_key(&m.seq, |&(seq, _)| seq) {
                m.offset = moved[i].1;
            }
        }
    }

    /// The last mark stamped at or before `t`, with its segment index; `None` if the
    /// journal's first record is later than `t` (or there are no records).
    pub fn locate(&self, t: u64) -> Option<(u64, Mark)> {
        // Segments and marks are ordered by seq, and stamps never decrease with seq.
        let k = self
            .segments
            .partition_point(|s| s.marks[0].timestamp_ns <= t);
        let s = self.segments.get(k.checked_sub(1)?)?;
        let i = s.marks.partition_point(|m| m.timestamp_ns <= t);
        Some((s.index, s.marks[i.checked_sub(1)?]))
    }

    /// Marks held, for tests and the memory arithmetic.
    #[cfg(test)]
    pub fn mark_count(&self) -> usize {
        self.segments.iter().map(|s| s.marks.len()).sum()
    }
}

/// Writes the marks of a sealed segment beside it (temp file, rename; no fsync: the file
/// is a cache checked at open). Failures are logged, never returned: without the file the
/// next open scans the segment.
pub(crate) fn store(
    dir: &Path,
    group_id: u64,
    first_seq: u64,
    segment_bytes: u64,
    s: &SegmentMarks,
) {
    let t = TimeMarks {
        group_id,
        segment_index: s.index,
        first_seq,
        last_seq: s.last_seq,
        segment_bytes,
        last_record_offset: s.last_offset,
        last_timestamp_ns: s.last_timestamp_ns,
        marks: s.marks.clone(),
    };
    let path = time_marks_path(dir, s.index);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = std::fs::write(&tmp, t.encode()).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), "writing a segment's time marks failed (the next open scans the segment): {e}");
    }
}

/// Removes segment `index`'s marks file, if any (the segment is gone or active again).
pub(crate) fn remove(dir: &Path, index: u64) {
    let path = time_marks_path(dir, index);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), "removing stale time marks failed: {e}"),
    }
}

/// The marks of sealed segment `segment` whose last record is `last_seq`: from its marks
/// file if that is valid for exactly this segment, otherwise by scanning its headers (and
/// the file is written again). Returns whether the file was used.
pub(crate) fn load_sealed(
    dir: &Path,
    group_id: u64,
    segment: &Segment,
    last_seq: u64,
) -> Result<(SegmentMarks, bool), JournalError> {
    let path = time_marks_path(dir, segment.index);
    let written = segment.written();
    let checked = match std::fs::read(&path) {
        Ok(bytes) => match TimeMarks::decode(&bytes) {
            Ok(t)
                if t.group_id == group_id
                    && t.segment_index == segment.index
                    && t.first_seq == segment.first_seq
                    && t.last_seq == last_seq
                    && t.segment_bytes == written =>
            {
                Some(t)
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "time marks describe another segment or length; scanning the segment");
                None
            }
            Err(c) => {
                tracing::warn!(path = %path.display(), "time marks damaged ({c}); scanning the segment");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "reading time marks failed ({e}); scanning the segment");
            None
        }
    };
    if let Some(t) = checked {
        return Ok((SegmentMarks::from_file(t), true));
    }
    let (marks, damage) = scan_segment(group_id, segment.index, segment.file(), written);
    let damage = damage.or_else(|| {
        (marks.last_seq != last_seq).then(|| {
            JournalError::corruption(
                segment.path(),
                0,
                format!(
                    "segment ends at seq {} but the next segment starts at {}",
                    marks.last_seq,
                    last_seq + 1
                ),
            )
        })
    });
    match damage {
        // As before the time index existed, damage in a sealed segment does not stop the
        // open: the marks before it are kept, and readers (a lookup that reaches it
        // included) report it where they meet it. No marks file is written for it.
        Some(e) => tracing::warn!("indexing a sealed segment by time stopped: {e}"),
        None => store(dir, group_id, segment.first_seq, written, &marks),
    }
    Ok((marks, false))
}

/// Where recovery may start scanning the last segment: a tail checkpoint's end, the seq and
/// stamp of the record before it, and the marks of the records before it.
pub(crate) struct TailStart {
    pub offset: u64,
    pub next_seq: u64,
    pub last_timestamp_ns: u64,
    pub marks: SegmentMarks,
}

/// The tail checkpoint of the last segment `file` (header `first_seq`, `len` bytes), if its
/// marks file is one for exactly this segment, not longer than the file, and the record it
/// names as the last one is there, whole and CRC-valid, ending exactly at the checkpoint (so
/// the checkpoint's end is a record boundary and everything before it was fdatasynced when
/// the file was written). Otherwise `None`, and recovery scans the whole segment.
pub(crate) fn load_tail(
    dir: &Path,
    group_id: u64,
    index: u64,
    first_seq: u64,
    file: &EnvFile,
    len: u64,
) -> Option<TailStart> {
    let path = time_marks_path(dir, index);
    let bytes = std::fs::read(&path).ok()?;
    let t = match TimeMarks::decode(&bytes) {
        Ok(t) => t,
        Err(c) => {
            tracing::warn!(path = %path.display(), "tail checkpoint damaged ({c}); scanning the whole segment");
            return None;
        }
    };
    if t.group_id != group_id
        || t.segment_index != index
        || t.first_seq != first_seq
        || t.segment_bytes > len
    {
        tracing::warn!(path = %path.display(), "tail checkpoint describes another segment; scanning the whole segment");
        return None;
    }
    let mut scanner = Scanner::new(group_id, index, t.last_record_offset);
    let last = scanner.next(file, t.segment_bytes, Payload::Skip);
    let verified = matches!(&last, Ok(Some(r))
        if r.header.seq == t.last_seq
            && r.header.timestamp_ns == t.last_timestamp_ns
            && scanner.pos() == t.segment_bytes);
    if !verified {
        tracing::warn!(path = %path.display(), "tail checkpoint does not match the segment's records; scanning the whole segment");
        return None;
    }
    Some(TailStart {
        offset: t.segment_bytes,
        next_seq: t.last_seq + 1,
        last_timestamp_ns: t.last_timestamp_ns,
        marks: SegmentMarks::from_file(t),
    })
}

/// Marks of a segment by reading every record header (CRC-checked), and the damage that
/// stopped the scan early, if any.
fn scan_segment(
    group_id: u64,
    index: u64,
    file: &EnvFile,
    limit: u64,
) -> (SegmentMarks, Option<JournalError>) {
    let mut marks = SegmentMarks::new(index);
    let mut scanner = Scanner::new(group_id, index, SEGMENT_HEADER_LEN as u64);
    loop {
        match scanner.next(file, limit, Payload::Skip) {
            Ok(None) => return (marks, None),
            Ok(Some(r)) => marks.note(
                r.header.seq,
                r.header.timestamp_ns,
                r.offset,
                r.header.encoded_len(),
            ),
            Err(ScanError::Corrupt { offset, what }) => {
                return (
                    marks,
                    Some(JournalError::corruption(file.path(), offset, what)),
                )
            }
            Err(ScanError::Io { error, .. }) => {
                return (marks, Some(JournalError::io("read", file.path(), error)))
            }
        }
    }
}

/// Removes marks files whose segment does not exist (released, or cut at open).
pub(crate) fn remove_orphans(dir: &Path, segments: &[Arc<Segment>]) -> Result<(), JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|e| JournalError::io("read_dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read_dir", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let index = name
            .strip_suffix(TIME_MARKS_SUFFIX)
            .map(|hex| format!("{hex}{SEGMENT_SUFFIX}"))
            .and_then(|seg| crate::segment::parse_segment_name(&seg));
        let leftover_tmp = name.ends_with(".tix.tmp");
        let orphan = index.is_some_and(|i| segments.binary_search_by_key(&i, |s| s.index).is_err());
        if leftover_tmp || orphan {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

impl Journal {
    /// The last record stamped at or before `t`: its seq and timestamp, or `None` if every
    /// kept record is later (or there are none). Costs a binary search over the time
    /// index and a header scan of at most `TIME_MARK_RECORDS` records or `TIME_MARK_BYTES`,
    /// whatever the journal's length.
    pub fn last_at_or_before(
        &self,
        t: TimestampNs,
    ) -> Result<Option<(Seq, TimestampNs)>, JournalError> {
        let inner = self.inner();
        let located = inner.times().locate(t.0);
        let Some((index, mark)) = located else {
            return Ok(None);
        };
        let Some(segment) = inner.segment_by_index(index) else {
            // Released between the lookup and now: the answer is in a later segment.
            return self.last_at_or_before_from(Seq(self.first_seq().0), t);
        };
        let reader =
            JournalReader::headers_at(self.inner_arc(), segment.clone(), mark.offset, mark.seq);
        match scan_until(reader, t.0) {
            Ok(found) => Ok(found),
            // A mark that no longer names its record (the segment was rewritten under the
            // index): the same answer from the segment's start.
            Err(JournalError::Corruption { .. }) => {
                tracing::warn!(
                    segment = index,
                    seq = mark.seq,
                    "time mark is stale; scanning the segment"
                );
                self.last_at_or_before_from(Seq(segment.first_seq), t)
            }
            Err(e) => Err(e),
        }
    }

    /// `last_at_or_before` by reading headers from `start` on.
    fn last_at_or_before_from(
        &self,
        start: Seq,
        t: TimestampNs,
    ) -> Result<Option<(Seq, TimestampNs)>, JournalError> {
        scan_until(self.read_headers_from(start)?, t.0)
    }
}

/// The last record of `reader` stamped ≤ `t`, stopping at the first later one.
fn scan_until(reader: JournalReader, t: u64) -> Result<Option<(Seq, TimestampNs)>, JournalError> {
    let mut found = None;
    for record in reader {
        let record = record?;
        if record.timestamp.0 > t {
            break;
        }
        found = Some((record.seq, record.timestamp));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: marks are taken at the first record of each segment and then every
    /// `TIME_MARK_RECORDS` records; `locate` finds the last mark at or before a time.
    #[test]
    fn marks_and_locate() {
        let mut ix = TimeIndex::default();
        for seq in 1..=1000u64 {
            let seg = if seq <= 600 { 1 } else { 2 };
            ix.note(seg, seq, seq * 10, seq * 100, 100);
        }
        let per = TIME_MARK_RECORDS;
        assert_eq!(
            ix.mark_count() as u64,
            600_u64.div_ceil(per) + 400_u64.div_ceil(per)
        );
        assert_eq!(ix.locate(9), None);
        assert_eq!(ix.locate(10).map(|(s, m)| (s, m.seq)), Some((1, 1)));
        assert_eq!(
            ix.locate(6009).map(|(s, m)| m.seq <= 600 && s == 1),
            Some(true)
        );
        assert_eq!(ix.locate(6010).map(|(s, m)| (s, m.seq)), Some((2, 601)));
        ix.release_before(2);
        assert_eq!(ix.locate(6009), None);
    }
}
