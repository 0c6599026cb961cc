//! Bookmarks: named points in a group's journal. The payload format of a Bookmark record,
//! the name rules, taking a bookmark, and the in-memory index rebuilt from the journal.
//!
//! Payload of a `RecordKind::Bookmark` record, version 1 (little-endian):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `CDPB` |
//! | 4 | 1 | version = 1 |
//! | 5 | 1 | consistency: 1 crash, 2 application |
//! | 6 | 2 | name length in bytes (1..=128) |
//! | 8 | 4 | freeze window in ms: quiesce start to the bookmark request (0 for crash) |
//! | 12 | n | name (printable ASCII, see `validate_name`) |
//!
//! Version 2 (written only for bookmarks marked to keep, so version-1 readers still read
//! every other bookmark) inserts 4 bytes before the name: byte 12 holds flags (bit 0: keep
//! this point through consolidation), bytes 13..16 are zero, and the name starts at 16.
//!
//! A released version never changes (golden bytes in the tests); a new field means a new
//! version. Bookmarks live only in the journal: when retention releases a segment, the
//! bookmarks in it go with it, which is right, because the point they name can no longer be
//! recovered.

use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use cdp_journal::{Journal, JournalError, Record, RecordIn, RecordKind};
use cdp_types::Seq;

use crate::error::ApplianceError;
use cdp_types::rfc3339::format_time;

pub const PAYLOAD_MAGIC: [u8; 4] = *b"CDPB";
pub const PAYLOAD_VERSION: u8 = 1;
const PAYLOAD_HEADER_LEN: usize = 12;
/// Version 2: adds the flags word.
pub const PAYLOAD_VERSION_FLAGS: u8 = 2;
const PAYLOAD_V2_HEADER_LEN: usize = 16;
/// Flag: consolidation keeps this bookmark's point.
const FLAG_KEEP: u8 = 0x01;

/// How consistent the image at a bookmark is (defined by the control protocol).
pub use cdp_control::{Bookmark, Consistency};

/// A bookmark record's code for `consistency`.
fn consistency_code(consistency: Consistency) -> u8 {
    match consistency {
        Consistency::Crash => 1,
        Consistency::Application => 2,
    }
}

fn consistency_from_code(code: u8) -> Option<Consistency> {
    match code {
        1 => Some(Consistency::Crash),
        2 => Some(Consistency::Application),
        _ => None,
    }
}

/// What a bookmark record's payload says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BookmarkPayload {
    pub name: String,
    pub consistency: Consistency,
    pub freeze_window_ms: u32,
    /// Consolidation keeps this point (`cdp bookmark create --keep`).
    pub keep: bool,
}

impl BookmarkPayload {
    /// Encodes the payload; the name must have passed `validate_name`.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut out = Vec::with_capacity(PAYLOAD_HEADER_LEN + name.len());
        out.extend_from_slice(&PAYLOAD_MAGIC);
        out.push(if self.keep {
            PAYLOAD_VERSION_FLAGS
        } else {
            PAYLOAD_VERSION
        });
        out.push(consistency_code(self.consistency));
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.freeze_window_ms.to_le_bytes());
        if self.keep {
            out.extend_from_slice(&[FLAG_KEEP, 0, 0, 0]);
        }
        out.extend_from_slice(name);
        out
    }

    /// Decodes a payload read from the journal; refuses anything malformed.
    pub fn decode(b: &[u8]) -> Result<BookmarkPayload, ApplianceError> {
        if b.len() < PAYLOAD_HEADER_LEN {
            return Err(corrupt(format!(
                "bookmark payload of {} bytes is too short",
                b.len()
            )));
        }
        if b[0..4] != PAYLOAD_MAGIC {
            return Err(corrupt("bookmark payload has a bad magic".into()));
        }
        let (header_len, keep) = match b[4] {
            PAYLOAD_VERSION => (PAYLOAD_HEADER_LEN, false),
            PAYLOAD_VERSION_FLAGS => {
                let flags = b
                    .get(PAYLOAD_HEADER_LEN..PAYLOAD_V2_HEADER_LEN)
                    .ok_or_else(|| corrupt("bookmark payload of version 2 is too short".into()))?;
                if flags[0] & !FLAG_KEEP != 0 || flags[1..] != [0, 0, 0] {
                    return Err(corrupt(format!(
                        "bookmark payload flags {flags:?} are unknown"
                    )));
                }
                (PAYLOAD_V2_HEADER_LEN, flags[0] & FLAG_KEEP != 0)
            }
            v => return Err(corrupt(format!("bookmark payload version {v} is unknown"))),
        };
        let consistency = consistency_from_code(b[5])
            .ok_or_else(|| corrupt(format!("bookmark consistency {} is unknown", b[5])))?;
        let name_len = u16::from_le_bytes([b[6], b[7]]) as usize;
        let freeze_window_ms = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if b.len() != header_len + name_len {
            return Err(corrupt(format!(
                "bookmark payload of {} bytes, its name length says {name_len}",
                b.len()
            )));
        }
        let name = std::str::from_utf8(&b[header_len..])
            .map_err(|_| corrupt("bookmark name is not UTF-8".into()))?;
        validate_name(name).map_err(|e| corrupt(e.to_string()))?;
        Ok(BookmarkPayload {
            name: name.to_string(),
            consistency,
            freeze_window_ms,
            keep,
        })
    }
}

/// A bookmark record that fails its checks.
fn corrupt(what: String) -> ApplianceError {
    ApplianceError::Corruption {
        path: "bookmark record".into(),
        what,
    }
}

/// The rules for bookmark names, shared with the CLI (which checks them before freezing an
/// application for a bookmark that would be refused).
pub use cdp_control::{
    validate_bookmark_name as validate_name, validate_new_bookmark_name as validate_new_name,
};

/// The group's bookmarks in seq order, kept in memory and rebuilt from the journal at start.
pub struct BookmarkIndex {
    /// Held across a bookmark's append and sync, so a name check and its record are one step.
    list: Mutex<Vec<Bookmark>>,
}

impl BookmarkIndex {
    /// Scans the journal for bookmark records (headers only: write payloads are CRC-checked
    /// but never decompressed or kept).
    pub fn rebuild(journal: &Journal) -> Result<BookmarkIndex, JournalError> {
        let mut index = BookmarkIndex::empty();
        for record in journal.read_headers_from(journal.first_seq())? {
            index.note_rebuilt(&record?);
        }
        Ok(index)
    }

    /// No bookmarks yet: filled by `note_rebuilt` from a header pass over the journal.
    pub fn empty() -> BookmarkIndex {
        BookmarkIndex {
            list: Mutex::new(Vec::new()),
        }
    }

    /// Adds `record` if it is a bookmark, read back at open in seq order (by `rebuild`, or
    /// by the one header pass `Group::open` shares among its start-up indexes).
    pub fn note_rebuilt(&mut self, record: &Record) {
        if record.kind != RecordKind::Bookmark {
            return;
        }
        let list = self.list.get_mut().unwrap_or_else(|p| p.into_inner());
        {
            match BookmarkPayload::decode(&record.payload) {
                Ok(p) => list.push(Bookmark {
                    name: p.name,
                    seq: record.seq.0,
                    timestamp_ns: record.timestamp.0,
                    time: format_time(record.timestamp.0),
                    consistency: p.consistency,
                    freeze_window_ms: p.freeze_window_ms,
                    keep: p.keep,
                    consolidated: false,
                }),
                // A bookmark record this version cannot read names no point we can show;
                // skipping it loses nothing of the volume's data.
                Err(e) => tracing::warn!(seq = %record.seq, "bookmark record skipped: {e}"),
            }
        }
    }

    /// Forgets every bookmark (the history was restarted after a resynchronisation).
    pub fn clear(&self) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The bookmarks still recoverable (seq ≥ the journal's first seq), in seq order.
    pub fn list(&self, journal: &Journal) -> Vec<Bookmark> {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut list, journal.first_seq());
        list.clone()
    }

    pub fn find(&self, journal: &Journal, name: &str) -> Option<Bookmark> {
        self.list(journal).into_iter().find(|b| b.name == name)
    }

    /// Learns a bookmark record appended by remote replication (it arrived in order with the
    /// writes, already numbered and stamped at the source). An unreadable payload is logged
    /// and skipped, as at rebuild.
    pub fn note_replicated(&self, seq: Seq, timestamp_ns: u64, payload: &[u8]) {
        match BookmarkPayload::decode(payload) {
            Ok(p) => self
                .list
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Bookmark {
                    name: p.name,
                    seq: seq.0,
                    timestamp_ns,
                    time: format_time(timestamp_ns),
                    consistency: p.consistency,
                    freeze_window_ms: p.freeze_window_ms,
                    keep: p.keep,
                    consolidated: false,
                }),
            Err(e) => tracing::warn!(%seq, "replicated bookmark record skipped: {e}"),
        }
    }

    /// Appends a bookmark record after every record already appended (the journal's append
    /// lock is the group's write order, and a host write is acknowledged only after its
    /// append returned, so every acknowledged write precedes the bookmark), syncs the journal
    /// so the bookmark is durable, and returns it. `on_journal_failure` is called with the
    /// error when the journal append or sync fails (the group fences itself). Past
    /// `append_deadline` nothing is appended: an application-consistent bookmark must land
    /// while the application is still quiesced, and the CLI thaws once its timeout passes.
    pub fn create(
        &self,
        journal: &Journal,
        payload: BookmarkPayload,
        append_deadline: Option<Instant>,
        on_journal_failure: impl Fn(String),
    ) -> Result<Bookmark, ApplianceError> {
        validate_new_name(&payload.name).map_err(|e| ApplianceError::Refused(e.to_string()))?;
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if append_deadline.is_some_and(|d| Instant::now() > d) {
            return Err(ApplianceError::Busy(
                "the request's deadline passed before the bookmark could be appended; no \
                 bookmark was taken"
                    .into(),
            ));
        }
        prune(&mut list, journal.first_seq());
        if list.iter().any(|b| b.name == payload.name) {
            return Err(ApplianceError::Refused(format!(
                "a bookmark named {:?} already exists in this group",
                payload.name
            )));
        }
        let record = RecordIn {
            kind: RecordKind::Bookmark,
            volume: 0,
            source_seq: 0,
            offset: 0,
            length: 0,
            payload: Bytes::from(payload.encode()),
        };
        let seq = journal.append(&[record]).map_err(|e| {
            let what = format!("journal append failed: {e}");
            on_journal_failure(what.clone());
            ApplianceError::Fenced(what)
        })?;
        journal.sync().map_err(|e| {
            // Never retry a failed fsync: the caller fences the group.
            let what = format!("journal sync failed: {e}");
            on_journal_failure(what.clone());
            ApplianceError::Fenced(what)
        })?;
        let timestamp_ns = record_timestamp(journal, seq)?;
        let bookmark = Bookmark {
            name: payload.name,
            seq: seq.0,
            timestamp_ns,
            time: format_time(timestamp_ns),
            consistency: payload.consistency,
            freeze_window_ms: payload.freeze_window_ms,
            keep: payload.keep,
            consolidated: false,
        };
        list.push(bookmark.clone());
        Ok(bookmark)
    }
}

fn prune(list: &mut Vec<Bookmark>, first: Seq) {
    list.retain(|b| b.seq >= first.0);
}

/// The timestamp of the record at `seq` (one header read).
pub fn record_timestamp(journal: &Journal, seq: Seq) -> Result<u64, ApplianceError> {
    let mut reader = journal.read_headers_from(seq)?;
    match reader.next() {
        Some(Ok(r)) if r.seq == seq => Ok(r.timestamp.0),
        Some(Ok(r)) => Err(ApplianceError::NotFound(format!(
            "seq {seq} not found (read seq {})",
            r.seq
        ))),
        Some(Err(e)) => Err(e.into()),
        None => Err(ApplianceError::NotFound(format!("seq {seq} not found"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the version 1 payload never changes. Method: encode a fixed bookmark and compare
    /// with bytes written out by hand from the table in the module comment; decode them back.
    #[test]
    fn payload_golden_bytes() {
        let p = BookmarkPayload {
            name: "pre-upgrade".into(),
            consistency: Consistency::Application,
            freeze_window_ms: 0x0102_0304,
            keep: false,
        };
        let golden: Vec<u8> = [
            &b"CDPB"[..],
            &[1, 2],
            &[11, 0],
            &[0x04, 0x03, 0x02, 0x01],
            b"pre-upgrade",
        ]
        .concat();
        assert_eq!(p.encode(), golden);
        assert_eq!(BookmarkPayload::decode(&golden).expect("decodes"), p);
        let crash = BookmarkPayload {
            name: "x".into(),
            consistency: Consistency::Crash,
            freeze_window_ms: 0,
            keep: false,
        };
        assert_eq!(
            crash.encode(),
            b"CDPB\x01\x01\x01\x00\x00\x00\x00\x00x".to_vec()
        );
    }

    /// Goal: malformed payloads are refused, never misread. Method: damage each field of a
    /// good payload in turn and expect an error.
    #[test]
    fn payload_rejects_damage() {
        let good = BookmarkPayload {
            name: "b1".into(),
            consistency: Consistency::Crash,
            freeze_window_ms: 0,
            keep: false,
        }
        .encode();
        let damaged = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        for bad in [
            good[..11].to_vec(),
            damaged(0, b'X'),
            damaged(4, 2),
            damaged(5, 3),
            damaged(6, 3),
            damaged(12, b':'),
            [&good[..], b"z"].concat(),
        ] {
            assert!(BookmarkPayload::decode(&bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Goal: names that could be misread as another point form or break output are refused.
    /// Method: a table of names and the expected verdict.
    #[test]
    fn name_rules() {
        for ok in [
            "b1",
            "pre upgrade",
            "nightly-2026.11.23",
            "a",
            &"x".repeat(128),
        ] {
            assert!(validate_name(ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            &"x".repeat(129),
            "seq:4",
            "2026-11-23T00:10:00Z",
            "-5m",
            " lead",
            "1234",
            "tab\there",
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        // New bookmarks may not contain spaces; old ones still decode.
        assert!(validate_new_name("pre upgrade").is_err());
        assert!(validate_new_name("pre-upgrade").is_ok());
    }

    fn payload(name: &str) -> BookmarkPayload {
        BookmarkPayload {
            name: name.into(),
            consistency: Consistency::Crash,
            freeze_window_ms: 0,
            keep: false,
        }
    }

    /// Goal: the index is what the journal holds: duplicates refused, a passed deadline
    /// appends nothing, a reopen rebuilds the same list, and bookmarks in released segments
    /// disappear. Method: a tempdir journal with 1 MiB segments, bookmarks between big
    /// writes; the oracle is the list of names taken and the seqs `append` returned.
    #[test]
    fn index_follows_the_journal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = cdp_journal::JournalConfig {
            segment_bytes_max: 1024 * 1024,
            compress_writes: false,
        };
        let block = Bytes::from(vec![7u8; 700 * 1024]);
        let taken = {
            let (journal, _) = Journal::open(tmp.path(), 9, config.clone()).expect("open");
            let index = BookmarkIndex::rebuild(&journal).expect("index");
            let mut taken = Vec::new();
            for name in ["a", "b", "c"] {
                let w = journal
                    .append(&[RecordIn::write(1, 0, block.clone())])
                    .expect("write");
                let b = index
                    .create(&journal, payload(name), None, |_| {})
                    .expect("bookmark");
                assert_eq!(b.seq, w.0 + 1, "right after the write");
                taken.push(b);
            }
            let dup = index.create(&journal, payload("b"), None, |_| {});
            let dup = dup.expect_err("duplicate");
            assert!(matches!(&dup, ApplianceError::Refused(m) if m.contains("already exists")));
            let late = index.create(&journal, payload("d"), Some(Instant::now()), |_| {});
            let late = late.expect_err("deadline");
            assert!(matches!(&late, ApplianceError::Busy(m) if m.contains("deadline")));
            assert_eq!(
                journal.last_seq().0,
                6,
                "nothing appended for refused bookmarks"
            );
            assert_eq!(index.list(&journal), taken);
            taken
        };
        let (journal, _) = Journal::open(tmp.path(), 9, config).expect("reopen");
        let index = BookmarkIndex::rebuild(&journal).expect("rebuild");
        assert_eq!(index.list(&journal), taken, "rebuilt from the journal");
        // Release the segments holding "a" (seq 2); later ones stay.
        journal.release_through(Seq(2)).expect("release");
        assert!(journal.first_seq().0 > 2, "segment of `a` released");
        let names: Vec<String> = index.list(&journal).into_iter().map(|b| b.name).collect();
        let expected: Vec<String> = taken
            .iter()
            .filter(|b| b.seq >= journal.first_seq().0)
            .map(|b| b.name.clone())
            .collect();
        assert_eq!(names, expected);
        assert!(!names.contains(&"a".to_string()));
        assert!(
            index.create(&journal, payload("a"), None, |_| {}).is_ok(),
            "name free again"
        );
    }

    /// Version 2 carries the keep flag; version 1 payloads read as not kept; unknown
    /// flags are refused.
    #[test]
    fn keep_flag_is_version_2() {
        let p = BookmarkPayload {
            name: "quarter-end".into(),
            consistency: Consistency::Crash,
            freeze_window_ms: 0,
            keep: true,
        };
        let b = p.encode();
        assert_eq!(b[4], PAYLOAD_VERSION_FLAGS);
        assert_eq!(&b[12..16], &[1, 0, 0, 0]);
        assert_eq!(BookmarkPayload::decode(&b).unwrap(), p);
        let v1 = BookmarkPayload {
            keep: false,
            ..p.clone()
        }
        .encode();
        assert_eq!(v1[4], PAYLOAD_VERSION);
        assert!(!BookmarkPayload::decode(&v1).unwrap().keep);
        let mut bad = b.clone();
        bad[12] = 0x02;
        assert!(BookmarkPayload::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("flags"));
        assert!(BookmarkPayload::decode(&b[..14]).is_err());
    }
}
