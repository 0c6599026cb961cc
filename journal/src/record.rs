//! The records a caller appends and reads back, independent of how they are encoded.

use bytes::Bytes;
use cdp_types::{ChangeKind, Seq, TimestampNs};

use crate::error::JournalError;
use crate::limits::{BOOKMARK_NAME_BYTES_MAX, WRITE_PAYLOAD_BYTES_MAX};

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// `length` bytes written at `offset`; the payload holds them.
    Write,
    /// Range discarded; no payload.
    Trim,
    /// Range set to zeroes; no payload.
    Zero,
    /// A named point in the journal; payload is the name, volume/offset/length are 0.
    Bookmark,
    /// A volume's resync begins: until the matching `ResyncEnd`, the journal lacks regions
    /// production has, so points in between are not consistent. No payload, offset, length.
    ResyncStart,
    /// The volume's resync is complete; the journal is consistent with production again.
    ResyncEnd,
}

impl From<ChangeKind> for RecordKind {
    fn from(kind: ChangeKind) -> Self {
        match kind {
            ChangeKind::Write => RecordKind::Write,
            ChangeKind::Trim => RecordKind::Trim,
            ChangeKind::Zero => RecordKind::Zero,
        }
    }
}

impl RecordKind {
    /// The volume change this record makes, or `None` for a bookmark.
    pub fn change_kind(self) -> Option<ChangeKind> {
        match self {
            RecordKind::Write => Some(ChangeKind::Write),
            RecordKind::Trim => Some(ChangeKind::Trim),
            RecordKind::Zero => Some(ChangeKind::Zero),
            RecordKind::Bookmark | RecordKind::ResyncStart | RecordKind::ResyncEnd => None,
        }
    }
}

/// A record as the caller hands it to `Journal::append`; the journal assigns seq and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordIn {
    pub kind: RecordKind,
    pub volume: u32,
    /// The splitter's per-volume change number, or 0 for records without one (bookmarks).
    pub source_seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: Bytes,
}

impl RecordIn {
    /// A write of `payload` at `offset`.
    pub fn write(volume: u32, offset: u64, payload: Bytes) -> Self {
        RecordIn {
            kind: RecordKind::Write,
            volume,
            source_seq: 0,
            offset,
            length: payload.len() as u64,
            payload,
        }
    }

    /// A trim or zero of `length` bytes at `offset`.
    pub fn range(kind: RecordKind, volume: u32, offset: u64, length: u64) -> Self {
        RecordIn {
            kind,
            volume,
            source_seq: 0,
            offset,
            length,
            payload: Bytes::new(),
        }
    }

    /// The same record carrying the splitter's change number.
    pub fn with_source_seq(mut self, source_seq: u64) -> Self {
        self.source_seq = source_seq;
        self
    }

    /// A resync marker (`ResyncStart` or `ResyncEnd`) of one volume.
    pub fn resync_marker(kind: RecordKind, volume: u32, source_seq: u64) -> Self {
        debug_assert!(matches!(
            kind,
            RecordKind::ResyncStart | RecordKind::ResyncEnd
        ));
        RecordIn {
            kind,
            volume,
            source_seq,
            offset: 0,
            length: 0,
            payload: Bytes::new(),
        }
    }

    /// A bookmark named `name`.
    pub fn bookmark(name: &str) -> Self {
        RecordIn {
            kind: RecordKind::Bookmark,
            volume: 0,
            source_seq: 0,
            offset: 0,
            length: 0,
            payload: Bytes::copy_from_slice(name.as_bytes()),
        }
    }

    /// Checks the record against the format's rules before anything is written, so a bad
    /// record is refused at the boundary instead of producing an unreadable journal.
    pub(crate) fn validate(&self) -> Result<(), JournalError> {
        let bad = |why: String| Err(JournalError::InvalidArgument(why));
        let payload_len = self.payload.len() as u64;
        if self.offset.checked_add(self.length).is_none() {
            return bad(format!(
                "offset {} + length {} overflows",
                self.offset, self.length
            ));
        }
        match self.kind {
            RecordKind::Write => {
                if self.length != payload_len {
                    return bad(format!(
                        "write length {} != payload length {payload_len}",
                        self.length
                    ));
                }
                if payload_len > WRITE_PAYLOAD_BYTES_MAX {
                    return bad(format!(
                        "write payload {payload_len} bytes exceeds {WRITE_PAYLOAD_BYTES_MAX}"
                    ));
                }
            }
            RecordKind::Trim | RecordKind::Zero => {
                if payload_len != 0 {
                    return bad(format!("{:?} record carries a payload", self.kind));
                }
            }
            RecordKind::ResyncStart | RecordKind::ResyncEnd => {
                if self.offset != 0 || self.length != 0 || payload_len != 0 {
                    return bad("resync markers carry no range and no payload".into());
                }
            }
            RecordKind::Bookmark => {
                if self.volume != 0 || self.offset != 0 || self.length != 0 {
                    return bad("bookmark volume, offset and length must be 0".into());
                }
                if payload_len > BOOKMARK_NAME_BYTES_MAX {
                    return bad(format!(
                        "bookmark name {payload_len} bytes exceeds {BOOKMARK_NAME_BYTES_MAX}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A record read back from the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    pub timestamp: TimestampNs,
    pub kind: RecordKind,
    pub volume: u32,
    pub source_seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: Bytes,
    /// Consolidation dropped this Write's payload (`payload` is empty): no kept point
    /// needs its bytes. Readers of payloads skip or refuse such records.
    pub payload_dropped: bool,
}

/// Where a record lies: its segment's index and its byte offset in that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordLocation {
    pub segment: u64,
    pub offset: u64,
}
