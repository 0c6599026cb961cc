//! Offline validation of a journal directory: every record's CRC and seq continuity
//! across segments, with the exact file and byte offset of any damage. Changes nothing.

use std::path::{Path, PathBuf};

use cdp_types::Seq;

use crate::engine::JOURNAL_DIR_NAME;
use crate::env::Env;
use crate::error::JournalError;
use crate::format::SEGMENT_HEADER_LEN;
use crate::recover::{list_segments, read_header};
use crate::scan::{Payload, ScanError, Scanner};

/// One segment as `inspect` found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentReport {
    pub path: PathBuf,
    pub index: u64,
    /// First seq according to the header (0 if the header is unreadable).
    pub first_seq: Seq,
    /// Valid records before any damage.
    pub records: u64,
    /// File size.
    pub bytes: u64,
}

/// A place where the journal is not what was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

/// What `inspect` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InspectReport {
    pub group_id: Option<u64>,
    pub segments: Vec<SegmentReport>,
    /// Valid records in all segments.
    pub records: u64,
    /// Of those, writes whose payload consolidation dropped (their headers remain).
    pub payloads_dropped: u64,
    /// First seq of the first segment (0 if none).
    pub first_seq: Seq,
    /// Seq of the last valid record (or `first_seq - 1`).
    pub last_seq: Seq,
    /// Every damaged place, in file order. A torn tail (which `open` would cut) is
    /// reported here too.
    pub damage: Vec<Damage>,
}

impl InspectReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Validates the journal under `dir` (the directory given to `Journal::open`; a
/// directory that directly holds segment files works too). I/O errors are returned;
/// damage is listed in the report.
pub fn inspect(dir: &Path) -> Result<InspectReport, JournalError> {
    let nested = dir.join(JOURNAL_DIR_NAME);
    let jdir = if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    };
    let env = Env::new();
    let found = list_segments(&jdir)?;
    let mut report = InspectReport::default();
    // The seq the next segment must start at, when known (unknown after damage).
    let mut expected: Option<u64> = None;
    let mut prev_index: Option<u64> = None;
    for (index, path) in &found {
        if let Some(p) = prev_index {
            if *index != p + 1 {
                report.damage.push(Damage {
                    path: path.clone(),
                    offset: 0,
                    what: format!("segment index gap: {index} follows {p}"),
                });
                expected = None;
            }
        }
        prev_index = Some(*index);
        let file = env
            .open_ro(path)
            .map_err(|e| JournalError::io("open", path, e))?;
        let bytes = file.size().map_err(|e| JournalError::io("stat", path, e))?;
        let mut seg = SegmentReport {
            path: path.clone(),
            index: *index,
            first_seq: Seq(0),
            records: 0,
            bytes,
        };
        let header = match read_header(&file, *index, report.group_id) {
            Ok(h) => h,
            Err(JournalError::Corruption { offset, what, .. }) => {
                report.damage.push(Damage {
                    path: path.clone(),
                    offset,
                    what,
                });
                report.segments.push(seg);
                expected = None;
                continue;
            }
            Err(e) => return Err(e),
        };
        report.group_id.get_or_insert(header.group_id);
        seg.first_seq = Seq(header.first_seq);
        if report.segments.is_empty() {
            report.first_seq = Seq(header.first_seq);
        }
        if let Some(e) = expected {
            if header.first_seq != e {
                report.damage.push(Damage {
                    path: path.clone(),
                    offset: 0,
                    what: format!(
                        "segment starts at seq {} but the previous one ended at {}",
                        header.first_seq,
                        e - 1
                    ),
                });
            }
        }
        let mut scanner = Scanner::new(header.group_id, *index, SEGMENT_HEADER_LEN as u64);
        let mut next_seq = header.first_seq;
        expected = loop {
            match scanner.next(&file, bytes, Payload::Skip) {
                Ok(None) => break Some(next_seq),
                Ok(Some(r)) if r.header.seq != next_seq => {
                    report.damage.push(Damage {
                        path: path.clone(),
                        offset: r.offset,
                        what: format!("record seq {} where {next_seq} was expected", r.header.seq),
                    });
                    break None;
                }
                Ok(Some(r)) => {
                    next_seq += 1;
                    seg.records += 1;
                    report.payloads_dropped += r.header.payload_dropped() as u64;
                }
                Err(ScanError::Corrupt { offset, what }) => {
                    report.damage.push(Damage {
                        path: path.clone(),
                        offset,
                        what,
                    });
                    break None;
                }
                Err(ScanError::Io { error, .. }) => {
                    return Err(JournalError::io("read", path, error));
                }
            }
        };
        report.records += seg.records;
        if seg.records > 0 || report.last_seq.0 < header.first_seq.saturating_sub(1) {
            report.last_seq = Seq(next_seq - 1);
        }
        report.segments.push(seg);
    }
    Ok(report)
}
