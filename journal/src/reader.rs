//! Reading records back in seq order from the segment files, across segment boundaries,
//! concurrently with appends.

use std::sync::Arc;

use cdp_types::{Seq, TimestampNs};

use crate::engine::Inner;
use crate::error::JournalError;
use crate::format::{
    Corrupt, RecordHeader, RECORD_FLAG_ZSTD, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::record::{Record, RecordKind, RecordLocation};
use crate::scan::{Payload, ScanError, Scanner};
use crate::segment::Segment;

/// Iterator over records with seq ≥ a start, in order. Each `next` sees every append
/// that returned before it; at the end it returns `None` and may yield more later.
/// After an error it returns `None` for good.
pub struct JournalReader {
    inner: Arc<Inner>,
    segment: Option<Arc<Segment>>,
    scanner: Scanner,
    next_seq: u64,
    failed: bool,
    /// Headers only: payloads other than bookmarks are dropped undecompressed (see
    /// `Journal::read_headers_from`).
    headers_only: bool,
    /// Where the record last returned was read from.
    last_location: Option<RecordLocation>,
}

impl JournalReader {
    pub(crate) fn new(inner: Arc<Inner>, seq: u64) -> JournalReader {
        let first = inner.segments()[0].first_seq;
        let group_id = inner.group_id;
        JournalReader {
            inner,
            segment: None,
            scanner: Scanner::new(group_id, 0, SEGMENT_HEADER_LEN as u64),
            next_seq: seq.max(first),
            failed: false,
            headers_only: false,
            last_location: None,
        }
    }

    /// A reader that still CRC-checks every record but returns every record except a
    /// Bookmark with an empty payload (never decompressed) and Bookmark records whole; for scans that
    /// need only seqs, times, lengths and bookmarks.
    pub(crate) fn new_headers_only(inner: Arc<Inner>, seq: u64) -> JournalReader {
        let mut r = JournalReader::new(inner, seq);
        r.headers_only = true;
        r
    }

    /// A headers-only reader (as `new_headers_only`) starting at record `seq`, which a time
    /// mark says begins at `offset` of `segment`: no scan from the segment's start. If the
    /// bytes there are not record `seq`, the first `next` returns `Corruption`.
    pub(crate) fn headers_at(
        inner: Arc<Inner>,
        segment: Arc<Segment>,
        offset: u64,
        seq: u64,
    ) -> JournalReader {
        let mut r = JournalReader::new_headers_only(inner, seq);
        r.next_seq = seq;
        r.scanner.reset(segment.index, offset);
        r.segment = Some(segment);
        r
    }

    /// Where the record `next` last returned lies, for `Journal::read_at`.
    pub fn last_location(&self) -> Option<RecordLocation> {
        self.last_location
    }

    /// The seq the next record returned will have.
    pub fn next_seq(&self) -> Seq {
        Seq(self.next_seq)
    }

    fn fail(&mut self, e: JournalError) -> Option<Result<Record, JournalError>> {
        self.failed = true;
        Some(Err(e))
    }
}

impl Iterator for JournalReader {
    type Item = Result<Record, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let seg = match &self.segment {
                Some(s) => s.clone(),
                None => {
                    let s = self.inner.segment_for(self.next_seq);
                    if s.first_seq > self.next_seq {
                        // Retention released this seq after the reader was created.
                        let what = format!(
                            "seq {} was released by retention; the journal starts at seq {}",
                            self.next_seq, s.first_seq
                        );
                        return self.fail(JournalError::InvalidArgument(what));
                    }
                    self.scanner.reset(s.index, SEGMENT_HEADER_LEN as u64);
                    self.segment = Some(s.clone());
                    s
                }
            };
            let limit = seg.written();
            if self.scanner.pos() >= limit {
                let next = self.inner.segment_after(seg.index)?;
                // The writer publishes everything in a segment before starting the next,
                // so once the next exists this segment's length is final; recheck it.
                if seg.written() > self.scanner.pos() {
                    continue;
                }
                if next.first_seq > self.next_seq {
                    let what = format!(
                        "segment starts at seq {} but seq {} was expected",
                        next.first_seq, self.next_seq
                    );
                    return self.fail(JournalError::corruption(next.path(), 0, what));
                }
                self.scanner.reset(next.index, SEGMENT_HEADER_LEN as u64);
                self.segment = Some(next);
                continue;
            }
            match self
                .scanner
                .next(seg.file(), limit, Payload::KeepFrom(self.next_seq))
            {
                Ok(None) => continue,
                Ok(Some(r)) => {
                    let h = r.header;
                    if h.seq < self.next_seq {
                        continue;
                    }
                    if h.seq != self.next_seq {
                        let what =
                            format!("record seq {} where {} was expected", h.seq, self.next_seq);
                        return self.fail(JournalError::corruption(seg.path(), r.offset, what));
                    }
                    self.next_seq += 1;
                    self.last_location = Some(RecordLocation {
                        segment: seg.index,
                        offset: r.offset,
                    });
                    let payload = if self.headers_only && h.kind != RecordKind::Bookmark {
                        bytes::Bytes::new()
                    } else if h.flags & RECORD_FLAG_ZSTD != 0 {
                        match decompress(&r.payload, h.length) {
                            Ok(p) => p,
                            Err(what) => {
                                return self.fail(JournalError::corruption(
                                    seg.path(),
                                    r.offset,
                                    what.0,
                                ));
                            }
                        }
                    } else {
                        r.payload
                    };
                    return Some(Ok(to_record(&h, payload)));
                }
                Err(ScanError::Corrupt { offset, what }) => {
                    return self.fail(JournalError::corruption(seg.path(), offset, what));
                }
                Err(ScanError::Io { error, .. }) => {
                    return self.fail(JournalError::io("read", seg.path(), error));
                }
            }
        }
    }
}

fn to_record(h: &RecordHeader, payload: bytes::Bytes) -> Record {
    Record {
        seq: Seq(h.seq),
        timestamp: TimestampNs(h.timestamp_ns),
        kind: h.kind,
        volume: h.volume,
        source_seq: h.source_seq,
        offset: h.offset,
        length: h.length,
        payload,
        payload_dropped: h.payload_dropped(),
    }
}

/// What `read_one` reads in its first pread: a header and a 4 KiB payload, the commonest
/// record; bigger ones take a second read.
const SINGLE_READ_BYTES: u64 = 4096 + RECORD_HEADER_LEN as u64;

/// Reads the single record `seq` at `offset` of `segment` with exact-size reads (no
/// read-ahead: callers jump around), checking its CRC and decompressing its payload.
pub(crate) fn read_one(
    segment: &Segment,
    group_id: u64,
    offset: u64,
    seq: u64,
    sealed: bool,
) -> Result<Record, JournalError> {
    let corrupt = |what: String| JournalError::corruption(segment.path(), offset, what);
    let limit = segment.written();
    if offset.saturating_add(RECORD_HEADER_LEN as u64) > limit {
        return Err(corrupt(format!(
            "no record of seq {seq} here: the segment ends at {limit}"
        )));
    }
    if sealed {
        if let Some(bytes) = segment.sealed_bytes() {
            return read_mapped(segment, bytes, group_id, offset, seq);
        }
    }
    // One read covers the header and a small record's payload; a bigger payload takes a
    // second read of exactly its size.
    let first_len = (limit - offset).min(SINGLE_READ_BYTES) as usize;
    let mut first = vec![0u8; first_len];
    read_exact_at(segment, &mut first, offset)?;
    let mut head = [0u8; RECORD_HEADER_LEN];
    head.copy_from_slice(&first[..RECORD_HEADER_LEN]);
    let h = RecordHeader::decode(&head).map_err(|c| corrupt(c.0))?;
    if h.seq != seq {
        return Err(corrupt(format!(
            "record seq {} where {seq} was expected",
            h.seq
        )));
    }
    if h.payload_dropped() {
        return Err(payload_dropped(seq));
    }
    if offset + h.encoded_len() > limit {
        return Err(corrupt("record runs past the end of the segment".into()));
    }
    // `payload_len` was bounded by `RecordHeader::decode` before this allocation.
    let payload_len = h.payload_len as usize;
    let payload = if RECORD_HEADER_LEN + payload_len <= first.len() {
        bytes::Bytes::from(first).slice(RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len)
    } else {
        let mut payload = vec![0u8; payload_len];
        read_exact_at(segment, &mut payload, offset + RECORD_HEADER_LEN as u64)?;
        bytes::Bytes::from(payload)
    };
    h.verify(&head, group_id, segment.index, &payload)
        .map_err(|c| corrupt(c.0))?;
    let payload = if h.flags & RECORD_FLAG_ZSTD != 0 {
        decompress(&payload, h.length).map_err(|c| corrupt(c.0))?
    } else {
        payload
    };
    Ok(to_record(&h, payload))
}

/// `read_one` from a sealed segment's map: the same checks, no system call.
fn read_mapped(
    segment: &Segment,
    bytes: &[u8],
    group_id: u64,
    offset: u64,
    seq: u64,
) -> Result<Record, JournalError> {
    let (h, payload) = checked_in_map(segment, bytes, group_id, offset, seq)?;
    let payload = if h.flags & RECORD_FLAG_ZSTD != 0 {
        decompress(payload, h.length)
            .map_err(|what| JournalError::corruption(segment.path(), offset, what.0))?
    } else {
        bytes::Bytes::copy_from_slice(payload)
    };
    Ok(to_record(&h, payload))
}

/// The header and (stored) payload of record `seq` at `offset` of a mapped segment, CRC
/// checked.
fn checked_in_map<'a>(
    segment: &Segment,
    bytes: &'a [u8],
    group_id: u64,
    offset: u64,
    seq: u64,
) -> Result<(RecordHeader, &'a [u8]), JournalError> {
    let corrupt = |what: String| JournalError::corruption(segment.path(), offset, what);
    let at = offset as usize;
    let head: [u8; RECORD_HEADER_LEN] = bytes
        .get(at..at + RECORD_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| corrupt("record header past the end of the segment".into()))?;
    let h = RecordHeader::decode(&head).map_err(|c| corrupt(c.0))?;
    if h.seq != seq {
        return Err(corrupt(format!(
            "record seq {} where {seq} was expected",
            h.seq
        )));
    }
    if h.payload_dropped() {
        return Err(payload_dropped(seq));
    }
    let payload_at = at + RECORD_HEADER_LEN;
    let payload = bytes
        .get(payload_at..payload_at + h.payload_len as usize)
        .ok_or_else(|| corrupt("record runs past the end of the segment".into()))?;
    h.verify(&head, group_id, segment.index, payload)
        .map_err(|c| corrupt(c.0))?;
    Ok((h, payload))
}

/// Copies `dst.len()` bytes of record `seq`'s payload, from byte `from` of it, into `dst`:
/// for a sealed, uncompressed record straight from the map (no allocation), otherwise
/// through `read_one`.
pub(crate) fn payload_into(
    segment: &Segment,
    group_id: u64,
    offset: u64,
    seq: u64,
    sealed: bool,
    from: usize,
    dst: &mut [u8],
) -> Result<(), JournalError> {
    let short = |len: usize| {
        JournalError::InvalidArgument(format!(
            "record {seq} holds {len} payload bytes, {} wanted from {from}",
            dst.len()
        ))
    };
    if sealed {
        if let Some(bytes) = segment.sealed_bytes() {
            let (h, payload) = checked_in_map(segment, bytes, group_id, offset, seq)?;
            if h.flags & RECORD_FLAG_ZSTD == 0 {
                let src = payload
                    .get(from..from + dst.len())
                    .ok_or_else(|| short(payload.len()))?;
                dst.copy_from_slice(src);
                return Ok(());
            }
        }
    }
    let record = read_one(segment, group_id, offset, seq, sealed)?;
    let src = record
        .payload
        .get(from..from + dst.len())
        .ok_or_else(|| short(record.payload.len()))?;
    dst.copy_from_slice(src);
    Ok(())
}

/// A single-record read of a record whose payload consolidation dropped: the caller asked
/// for bytes no kept point needs, which is a bug or a point that is no longer kept.
fn payload_dropped(seq: u64) -> JournalError {
    JournalError::InvalidArgument(format!(
        "record {seq}'s payload was dropped by consolidation (no kept point needs it)"
    ))
}

fn read_exact_at(segment: &Segment, buf: &mut [u8], at: u64) -> Result<(), JournalError> {
    let got = segment
        .file()
        .read_at(buf, at)
        .map_err(|e| JournalError::io("read", segment.path(), e))?;
    if got < buf.len() {
        return Err(JournalError::corruption(
            segment.path(),
            at,
            format!("file ends {got} bytes into a {}-byte read", buf.len()),
        ));
    }
    Ok(())
}

/// Decompresses a zstd write payload that must come out at exactly `length` bytes (≤ the
/// write limit, checked when the header was decoded, so this allocation is bounded).
fn decompress(payload: &[u8], length: u64) -> Result<bytes::Bytes, Corrupt> {
    match zstd::bulk::decompress(payload, length as usize) {
        Ok(v) if v.len() as u64 == length => Ok(bytes::Bytes::from(v)),
        Ok(v) => Err(Corrupt(format!(
            "compressed payload holds {} bytes, the record says {length}",
            v.len()
        ))),
        Err(e) => Err(Corrupt(format!(
            "compressed payload does not decompress: {e}"
        ))),
    }
}
