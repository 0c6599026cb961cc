//! Opening an existing journal: find the segments, validate their headers and chaining,
//! scan the last segment record by record (from its tail checkpoint, if it has a valid one:
//! see `time_index.rs`), and cut a torn tail so appends can resume.
//!
//! Why only the last segment is scanned: a segment is fdatasynced before the next one is
//! created, so only the last segment can hold a torn write. Earlier segments get header
//! and chaining checks here; their records are CRC-checked by every reader and by
//! `inspect`, which reports damage as `Corruption` with file and offset, never skipping it.
//! A bad record in the last segment is treated as a torn tail (raft-engine's
//! `TolerateTailCorruption`), because after power loss the pages of an unsynced write may
//! reach the disk in any order: everything from the first bad record on is cut and the cut
//! is reported.

use std::fs;
use std::path::{Path, PathBuf};

use cdp_types::Seq;

use crate::env::{Env, EnvFile};
use crate::error::JournalError;
use crate::format::{SegmentHeader, SEGMENT_HEADER_LEN};
use crate::scan::{Payload, ScanError, Scanner};
use crate::segment::{parse_segment_name, Segment};
use crate::time_index::SegmentMarks;

/// Suffix of a segment's rewrite in progress (`consolidate.rs`); never a segment name,
/// removed at open.
pub const CONSOLIDATING_SUFFIX: &str = ".consolidating";

/// Removes rewrites a crash left behind (their segments are intact).
pub(crate) fn remove_leftovers(dir: &Path) -> Result<usize, JournalError> {
    let mut removed = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| JournalError::io("read_dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read_dir", dir, e))?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.ends_with(CONSOLIDATING_SUFFIX))
        {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| JournalError::io("remove", &path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The index of the first segment of a new journal. After retention released the oldest
/// segments the first one left has a higher index; recovery only requires the indexes it
/// finds to be contiguous (a crash mid-release leaves a shorter but contiguous run).
pub const FIRST_SEGMENT_INDEX: u64 = 1;

/// Where recovery cut the journal, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailCut {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

/// What `Journal::open` found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the journal after recovery.
    pub segments: usize,
    /// Records in the journal after recovery (`last_seq - first_seq + 1`).
    pub records: u64,
    /// Bytes cut from the tail: a torn record and whatever followed it, plus any
    /// half-created segment file that was removed.
    pub truncated_bytes: u64,
    /// The last record's seq, or `first_seq - 1` if there are none.
    pub last_seq: Seq,
    /// Where a torn tail was cut, if anything was.
    pub tail_cut: Option<TailCut>,
    /// Segment files removed because their header was never completely written.
    pub removed_segments: usize,
    /// Bytes of the last segment that recovery read record by record: all of it, or only
    /// what follows a valid tail checkpoint.
    pub scanned_bytes: u64,
}

/// One line for people, e.g. `3 segments, 1200 records, last seq 1200, 8192 bytes cut at
/// /d/journal/00000003.seg offset 4096 (bad record CRC)`; log lines use this, not `Debug`.
impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} segment{}, {} record{}, last seq {}",
            self.segments,
            plural(self.segments as u64),
            self.records,
            plural(self.records),
            self.last_seq
        )?;
        if self.truncated_bytes > 0 {
            write!(f, ", {} bytes cut", self.truncated_bytes)?;
        }
        if let Some(cut) = &self.tail_cut {
            write!(
                f,
                " at {} offset {} ({})",
                cut.path.display(),
                cut.offset,
                cut.what
            )?;
        }
        if self.removed_segments > 0 {
            write!(
                f,
                ", {} half-created segments removed",
                self.removed_segments
            )?;
        }
        Ok(())
    }
}

/// The outcome of recovery, ready for the engine.
pub struct Recovered {
    /// Every segment in index order; the last one is the one to append to. Empty for a
    /// brand-new journal.
    pub segments: Vec<Segment>,
    /// The seq the next appended record gets.
    pub next_seq: u64,
    /// Timestamp of the last record found, so timestamps stay monotonic across a restart
    /// even if the wall clock went back.
    pub last_timestamp_ns: u64,
    /// Time marks of the last segment's records, taken by the scan that checked them.
    pub last_marks: SegmentMarks,
    pub report: RecoveryReport,
}

/// Segment files in `dir`, sorted by index.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let entries = fs::read_dir(dir).map_err(|e| JournalError::io("read_dir", dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| JournalError::io("read_dir", dir, e))?;
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(parse_segment_name) {
            found.push((index, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Reads and checks the header of a segment file that belongs to `group_id` and carries
/// `index` in its name.
pub fn read_header(
    file: &EnvFile,
    index: u64,
    group_id: Option<u64>,
) -> Result<SegmentHeader, JournalError> {
    let path = file.path();
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    let got = file
        .read_at(&mut head, 0)
        .map_err(|e| JournalError::io("read header", path, e))?;
    let h =
        SegmentHeader::decode(&head[..got]).map_err(|c| JournalError::corruption(path, 0, c.0))?;
    if h.segment_index != index {
        return Err(JournalError::corruption(
            path,
            0,
            format!(
                "header says segment {} but the name says {index}",
                h.segment_index
            ),
        ));
    }
    if let Some(group_id) = group_id {
        if h.group_id != group_id {
            return Err(JournalError::corruption(
                path,
                0,
                format!("segment belongs to group {} not {group_id}", h.group_id),
            ));
        }
    }
    Ok(h)
}

fn check_contiguous(found: &[(u64, PathBuf)]) -> Result<(), JournalError> {
    for pair in found.windows(2) {
        if pair[1].0 != pair[0].0 + 1 {
            return Err(JournalError::corruption(
                &pair[1].1,
                0,
                format!("segment index gap: {} follows {}", pair[1].0, pair[0].0),
            ));
        }
    }
    Ok(())
}

/// Recovers the journal in `dir` (which exists and is locked by the caller).
pub fn recover(env: &Env, dir: &Path, group_id: u64) -> Result<Recovered, JournalError> {
    remove_leftovers(dir)?;
    let mut found = list_segments(dir)?;
    check_contiguous(&found)?;
    let mut report = RecoveryReport::default();

    // A crash while a new segment was being created can leave a file whose header is
    // missing or incomplete. Headers are fdatasynced before any record goes in, so such a
    // file holds no record and is removed. A bad header on a longer file is corruption.
    let (last_file, last_header) = loop {
        let Some((index, path)) = found.last().cloned() else {
            break (None, None);
        };
        let file = env
            .open_rw(&path)
            .map_err(|e| JournalError::io("open", &path, e))?;
        let len = file
            .size()
            .map_err(|e| JournalError::io("stat", &path, e))?;
        match read_header(&file, index, Some(group_id)) {
            Ok(h) => break (Some(file), Some(h)),
            Err(JournalError::Corruption { what, .. })
                if len <= SEGMENT_HEADER_LEN as u64
                    && (found.len() > 1 || index == FIRST_SEGMENT_INDEX) =>
            {
                tracing::warn!(path = %path.display(), %what, "removing half-created journal segment");
                env.remove_file(&path)
                    .map_err(|e| JournalError::io("remove", &path, e))?;
                env.sync_dir(dir)
                    .map_err(|e| JournalError::io("fsync dir", dir, e))?;
                report.removed_segments += 1;
                report.truncated_bytes += len;
                report.tail_cut = Some(TailCut {
                    path: path.clone(),
                    offset: 0,
                    what,
                });
                found.pop();
            }
            Err(e) => return Err(e),
        }
    };
    let (Some(last_file), Some(last_header)) = (last_file, last_header) else {
        return Ok(Recovered {
            segments: Vec::new(),
            next_seq: 1,
            last_timestamp_ns: 0,
            last_marks: SegmentMarks::default(),
            report,
        });
    };

    // Earlier segments: header, group, index and strictly increasing first seqs.
    let mut segments = Vec::with_capacity(found.len());
    let mut prev_first = 0u64;
    for (index, path) in &found[..found.len() - 1] {
        let file = env
            .open_ro(path)
            .map_err(|e| JournalError::io("open", path, e))?;
        let h = read_header(&file, *index, Some(group_id))?;
        if h.first_seq <= prev_first {
            return Err(JournalError::corruption(
                path,
                0,
                format!("first seq {} does not follow {prev_first}", h.first_seq),
            ));
        }
        prev_first = h.first_seq;
        let len = file.size().map_err(|e| JournalError::io("stat", path, e))?;
        segments.push(Segment::from_file(file, &h, len));
    }
    let last_path = last_file.path().to_path_buf();
    if last_header.first_seq <= prev_first {
        return Err(JournalError::corruption(
            &last_path,
            0,
            format!(
                "first seq {} does not follow {prev_first}",
                last_header.first_seq
            ),
        ));
    }

    // The last segment: every record, cut at the first bad one.
    let len = last_file
        .size()
        .map_err(|e| JournalError::io("stat", &last_path, e))?;
    // A tail checkpoint (`time_index.rs`) lets the scan start where the last fdatasync
    // before it ended: only what follows can be torn.
    let tail = crate::time_index::load_tail(
        dir,
        group_id,
        last_header.segment_index,
        last_header.first_seq,
        &last_file,
        len,
    );
    let (start, mut next_seq, mut last_timestamp_ns, mut last_marks) = match tail {
        Some(t) => (t.offset, t.next_seq, t.last_timestamp_ns, t.marks),
        None => {
            let mut marks = SegmentMarks::default();
            marks.index = last_header.segment_index;
            (SEGMENT_HEADER_LEN as u64, last_header.first_seq, 0, marks)
        }
    };
    let mut scanner = Scanner::new(group_id, last_header.segment_index, start);
    let cut = loop {
        match scanner.next(&last_file, len, Payload::Skip) {
            Ok(None) => break None,
            Ok(Some(r)) => {
                if r.header.seq != next_seq {
                    // A record with a good CRC but the wrong seq cannot come from a torn
                    // write; refuse to guess.
                    return Err(JournalError::corruption(
                        &last_path,
                        r.offset,
                        format!("record seq {} where {next_seq} was expected", r.header.seq),
                    ));
                }
                next_seq += 1;
                last_timestamp_ns = r.header.timestamp_ns;
                last_marks.note(
                    r.header.seq,
                    r.header.timestamp_ns,
                    r.offset,
                    r.header.encoded_len(),
                );
            }
            Err(ScanError::Corrupt { offset, what }) => break Some((offset, what)),
            Err(ScanError::Io { offset, error }) => {
                tracing::error!(offset, "journal read failed during recovery");
                return Err(JournalError::io("read", &last_path, error));
            }
        }
    };
    if let Some((offset, what)) = cut {
        tracing::warn!(
            path = %last_path.display(),
            offset,
            cut_bytes = len - offset,
            %what,
            "cutting torn journal tail"
        );
        last_file
            .truncate(offset)
            .map_err(|e| JournalError::io("truncate", &last_path, e))?;
        report.truncated_bytes += len - offset;
        report.tail_cut = Some(TailCut {
            path: last_path.clone(),
            offset,
            what,
        });
    }
    report.scanned_bytes = scanner.pos().min(len) - start;
    // The previous process may have died before syncing; make what we found durable so
    // `durable_seq` can start at `last_seq`.
    last_file
        .sync_data()
        .map_err(|e| JournalError::io("fdatasync", &last_path, e))?;
    segments.push(Segment::from_file(last_file, &last_header, scanner.pos()));

    let first_seq = segments[0].first_seq;
    report.segments = segments.len();
    report.last_seq = Seq(next_seq - 1);
    report.records = next_seq - first_seq;
    Ok(Recovered {
        segments,
        next_seq,
        last_timestamp_ns,
        last_marks,
        report,
    })
}
