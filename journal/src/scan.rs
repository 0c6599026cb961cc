//! Sequential, CRC-checked reading of the records in one segment through a read-ahead
//! buffer; shared by recovery, readers and `inspect` so all three agree on what is valid.

use std::io;

use bytes::Bytes;

use crate::env::EnvFile;
use crate::format::{RecordHeader, RECORD_HEADER_LEN};
use crate::limits::READ_AHEAD_BYTES;

/// Whether a scan hands back payloads or only checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    Skip,
    /// Keep payloads of records with seq ≥ this; skip (but still check) earlier ones.
    KeepFrom(u64),
}

impl Payload {
    fn keep(self, seq: u64) -> bool {
        match self {
            Payload::Skip => false,
            Payload::KeepFrom(from) => seq >= from,
        }
    }
}

/// One record found by a scan.
#[derive(Debug)]
pub struct Scanned {
    pub offset: u64,
    pub header: RecordHeader,
    pub payload: Bytes,
}

/// Why a scan stopped before `limit`.
#[derive(Debug)]
pub enum ScanError {
    /// The bytes at `offset` are not a valid record.
    Corrupt { offset: u64, what: String },
    /// Reading failed; nothing is known about the bytes.
    Io { offset: u64, error: io::Error },
}

/// A cursor over one segment's records.
pub struct Scanner {
    group_id: u64,
    segment_index: u64,
    buf: Vec<u8>,
    buf_at: u64,
    buf_len: usize,
    pos: u64,
}

impl Scanner {
    pub fn new(group_id: u64, segment_index: u64, pos: u64) -> Scanner {
        Scanner {
            group_id,
            segment_index,
            buf: Vec::new(),
            buf_at: 0,
            buf_len: 0,
            pos,
        }
    }

    /// Moves to another segment (or another position) and drops buffered bytes.
    pub fn reset(&mut self, segment_index: u64, pos: u64) {
        self.segment_index = segment_index;
        self.pos = pos;
        self.buf_len = 0;
    }

    /// Offset of the next record to read: the end of the last good one.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Makes `[at, at + len)` buffered (len ≤ buffer size, at + len ≤ limit) and
    /// returns it. Reads never go past `limit`, so bytes an appender is still writing
    /// are never cached.
    fn fill(
        &mut self,
        file: &EnvFile,
        at: u64,
        len: usize,
        limit: u64,
    ) -> Result<&[u8], ScanError> {
        let end = at + len as u64;
        let cached = at >= self.buf_at && end <= self.buf_at + self.buf_len as u64;
        if !cached {
            if self.buf.is_empty() {
                self.buf = vec![0; READ_AHEAD_BYTES];
            }
            let want = (limit - at).min(READ_AHEAD_BYTES as u64) as usize;
            self.buf_len = 0;
            let got = file
                .read_at(&mut self.buf[..want], at)
                .map_err(|error| ScanError::Io { offset: at, error })?;
            self.buf_at = at;
            self.buf_len = got;
            if got < len {
                return Err(ScanError::Corrupt {
                    offset: at,
                    what: format!("file ends {got} bytes into a {len}-byte read"),
                });
            }
        }
        let from = (at - self.buf_at) as usize;
        Ok(&self.buf[from..from + len])
    }

    /// Reads and checks the next record. `Ok(None)` means the scan reached `limit`
    /// exactly, at a record boundary.
    pub fn next(
        &mut self,
        file: &EnvFile,
        limit: u64,
        payload: Payload,
    ) -> Result<Option<Scanned>, ScanError> {
        let at = self.pos;
        if at >= limit {
            return Ok(None);
        }
        let corrupt = |offset, what: String| ScanError::Corrupt { offset, what };
        if limit - at < RECORD_HEADER_LEN as u64 {
            return Err(corrupt(
                at,
                format!("{} trailing bytes, less than a record header", limit - at),
            ));
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        head.copy_from_slice(self.fill(file, at, RECORD_HEADER_LEN, limit)?);
        let header = RecordHeader::decode(&head).map_err(|c| corrupt(at, c.0))?;
        let total = header.encoded_len();
        if limit - at < total {
            return Err(corrupt(
                at,
                format!(
                    "record of {total} bytes runs past the end ({} bytes left)",
                    limit - at
                ),
            ));
        }
        let (group_id, segment_index) = (self.group_id, self.segment_index);
        let len = header.payload_len as usize;
        let payload_at = at + RECORD_HEADER_LEN as u64;
        let bytes = if len + RECORD_HEADER_LEN <= READ_AHEAD_BYTES {
            let slice = self.fill(file, payload_at, len, limit)?;
            header
                .verify(&head, group_id, segment_index, slice)
                .map_err(|c| corrupt(at, c.0))?;
            if payload.keep(header.seq) {
                Bytes::copy_from_slice(slice)
            } else {
                Bytes::new()
            }
        } else {
            // Big payloads bypass the buffer: one read straight into their own memory.
            // `len` was bounded by `RecordHeader::decode` before this allocation.
            let mut v = vec![0u8; len];
            let got = file
                .read_at(&mut v, payload_at)
                .map_err(|error| ScanError::Io { offset: at, error })?;
            if got < len {
                return Err(corrupt(at, "file ends inside a record payload".into()));
            }
            header
                .verify(&head, group_id, segment_index, &v)
                .map_err(|c| corrupt(at, c.0))?;
            if payload.keep(header.seq) {
                Bytes::from(v)
            } else {
                Bytes::new()
            }
        };
        self.pos = at + total;
        Ok(Some(Scanned {
            offset: at,
            header,
            payload: bytes,
        }))
    }
}
