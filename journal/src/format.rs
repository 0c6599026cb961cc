//! Encodes and decodes segment and record headers; nothing else lives here.
//!
//! All integers are fixed-width little-endian. Version 1 layout (version 2 is the same
//! except that record flag bit 0 may be set, see `RECORD_FLAG_ZSTD`; version 3, written
//! only by consolidation, also allows flag bit 1, see `RECORD_FLAG_PAYLOAD_DROPPED`):
//!
//! Segment header, 64 bytes, at offset 0 of every segment file:
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! |      0 |    8 | magic `b"CDPJSEG\0"`                               |
//! |      8 |    2 | version (`1`)                                      |
//! |     10 |    2 | header length (`64`)                               |
//! |     12 |    4 | reserved, zero                                     |
//! |     16 |    8 | group id                                           |
//! |     24 |    8 | segment index (also in the file name)              |
//! |     32 |    8 | first seq: the seq the segment's first record has  |
//! |     40 |    8 | created, ns since the Unix epoch                   |
//! |     48 |   12 | reserved, zero                                     |
//! |     60 |    4 | CRC32 (crc32fast) of bytes 0..60                   |
//!
//! Records follow back to back, each a 64-byte header and then `payload_len` bytes:
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! |      0 |    4 | magic `0x5243_4A43` (bytes `"CJCR"`)               |
//! |      4 |    1 | kind: 1 Write, 2 Trim, 3 Zero, 4 Bookmark, 5 Resync|
//! |        |      | Start, 6 ResyncEnd                                 |
//! |      5 |    1 | flags: zero in version 1; bit 0 (v2) zstd payload; |
//! |        |      | bit 1 (v3) payload dropped by consolidation        |
//! |      6 |    2 | reserved, zero                                     |
//! |      8 |    4 | volume id                                          |
//! |     12 |    4 | reserved, zero                                     |
//! |     16 |    8 | seq                                                |
//! |     24 |    8 | timestamp, ns since the Unix epoch                 |
//! |     32 |    8 | offset in the volume, bytes                        |
//! |     40 |    8 | length, bytes (= payload_len for an uncompressed   |
//! |        |      | Write; the decompressed size for a zstd one)       |
//! |     48 |    8 | source seq: the splitter's per-volume change       |
//! |        |      | number (0 when the record has no source)           |
//! |     56 |    4 | payload_len                                        |
//! |     60 |    4 | CRC32 of bytes 0..60, group id (u64 LE), segment   |
//! |        |      | index (u64 LE) and the payload                     |
//!
//! The record CRC mixes in the group id and segment index (raft-engine's V2 idea), so a
//! record copied into another group's journal or left over in a reused file fails its
//! check even though its own bytes are intact. The seq inside the header is covered too,
//! and readers check that seqs are contiguous.

use std::fmt;

use crate::limits::{BOOKMARK_NAME_BYTES_MAX, RECORD_PAYLOAD_BYTES_MAX, WRITE_PAYLOAD_BYTES_MAX};
use crate::record::RecordKind;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CDPJSEG\0";
/// Encoded size of a segment header; records start at this offset.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// First four bytes of every record header.
pub const RECORD_MAGIC: u32 = 0x5243_4A43;
/// Encoded size of a record header.
pub const RECORD_HEADER_LEN: usize = 64;

const SEGMENT_CRC_AT: usize = SEGMENT_HEADER_LEN - 4;
const RECORD_CRC_AT: usize = RECORD_HEADER_LEN - 4;

/// Record flag: the payload of this Write is one zstd frame that decompresses to exactly
/// `length` bytes (and `payload_len < length`). Defined from version 2 on; version 1
/// readers refuse version 2 segments by their header, so they never misread such records.
pub const RECORD_FLAG_ZSTD: u8 = 0x01;
/// Record flag: consolidation dropped this Write's payload (`payload_len` is 0, `length`
/// still says how many bytes the write covered) because no kept point needs it. The header
/// stays, so seqs, times and bookmarks stay contiguous and resolvable. Defined from
/// version 3 on, which only consolidated segments carry.
pub const RECORD_FLAG_PAYLOAD_DROPPED: u8 = 0x02;
/// Every flag this code understands.
const RECORD_FLAGS_KNOWN: u8 = RECORD_FLAG_ZSTD | RECORD_FLAG_PAYLOAD_DROPPED;

/// Format versions this code can read. Never change a released version: add the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Version {
    V1 = 1,
    /// Adds `RECORD_FLAG_ZSTD`.
    V2 = 2,
    /// Adds `RECORD_FLAG_PAYLOAD_DROPPED`; written by consolidation only, so journals that
    /// were never consolidated stay readable by version-2 code.
    V3 = 3,
}

impl Version {
    /// The version new segments are written with.
    pub const CURRENT: Version = Version::V2;

    fn from_u16(v: u16) -> Option<Version> {
        match v {
            1 => Some(Version::V1),
            2 => Some(Version::V2),
            3 => Some(Version::V3),
            _ => None,
        }
    }
}

/// Why some bytes are not a valid header. The caller adds the file and offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corrupt(pub String);

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn corrupt<T>(what: impl Into<String>) -> Result<T, Corrupt> {
    Err(Corrupt(what.into()))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The header at the start of each segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: Version,
    pub group_id: u64,
    pub segment_index: u64,
    pub first_seq: u64,
    pub created_ns: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&(self.version as u16).to_le_bytes());
        b[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        b[16..24].copy_from_slice(&self.group_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.segment_index.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_ns.to_le_bytes());
        let crc = crc32fast::hash(&b[..SEGMENT_CRC_AT]);
        b[SEGMENT_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a segment header. Checks run cheapest first, and the CRC
    /// before any field is trusted.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, Corrupt> {
        if b.len() < SEGMENT_HEADER_LEN {
            return corrupt(format!("short segment header: {} bytes", b.len()));
        }
        let b = &b[..SEGMENT_HEADER_LEN];
        if b[0..8] != SEGMENT_MAGIC {
            return corrupt("bad segment magic");
        }
        let crc = u32_at(b, SEGMENT_CRC_AT);
        if crc32fast::hash(&b[..SEGMENT_CRC_AT]) != crc {
            return corrupt("segment header CRC mismatch");
        }
        let version = match Version::from_u16(u16_at(b, 8)) {
            Some(v) => v,
            None => return corrupt(format!("unknown segment version {}", u16_at(b, 8))),
        };
        if u16_at(b, 10) as usize != SEGMENT_HEADER_LEN {
            return corrupt(format!("segment header length {}", u16_at(b, 10)));
        }
        if !all_zero(&b[12..16]) || !all_zero(&b[48..60]) {
            return corrupt("segment header reserved bytes are not zero");
        }
        let first_seq = u64_at(b, 32);
        if first_seq == 0 {
            return corrupt("segment first seq is 0");
        }
        Ok(SegmentHeader {
            version,
            group_id: u64_at(b, 16),
            segment_index: u64_at(b, 24),
            first_seq,
            created_ns: u64_at(b, 40),
        })
    }
}

fn kind_code(kind: RecordKind) -> u8 {
    match kind {
        RecordKind::Write => 1,
        RecordKind::Trim => 2,
        RecordKind::Zero => 3,
        RecordKind::Bookmark => 4,
        RecordKind::ResyncStart => 5,
        RecordKind::ResyncEnd => 6,
    }
}

fn kind_from_code(code: u8) -> Option<RecordKind> {
    match code {
        1 => Some(RecordKind::Write),
        2 => Some(RecordKind::Trim),
        3 => Some(RecordKind::Zero),
        4 => Some(RecordKind::Bookmark),
        5 => Some(RecordKind::ResyncStart),
        6 => Some(RecordKind::ResyncEnd),
        _ => None,
    }
}

/// The fixed part of a record. `crc` is filled in by `encode` and checked by `verify`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    /// `RECORD_FLAG_*` bits.
    pub flags: u8,
    pub volume: u32,
    pub seq: u64,
    pub timestamp_ns: u64,
    pub offset: u64,
    pub length: u64,
    /// The splitter's per-volume sequence number of this change; lets a reconnecting
    /// splitter resume without gaps or duplicates.
    pub source_seq: u64,
    pub payload_len: u32,
    pub crc: u32,
}

/// CRC of a record: its header bytes before the CRC field, its container, its payload.
pub fn record_crc(head: &[u8], group_id: u64, segment_index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..RECORD_CRC_AT]);
    h.update(&group_id.to_le_bytes());
    h.update(&segment_index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

impl RecordHeader {
    /// Writes the header into `out` with its CRC computed over `payload` and the
    /// container; sets `self.crc` to match.
    pub fn encode(
        &mut self,
        group_id: u64,
        segment_index: u64,
        payload: &[u8],
        out: &mut [u8; RECORD_HEADER_LEN],
    ) {
        debug_assert_eq!(payload.len(), self.payload_len as usize);
        out.fill(0);
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4] = kind_code(self.kind);
        out[5] = self.flags;
        out[8..12].copy_from_slice(&self.volume.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        out[32..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..48].copy_from_slice(&self.length.to_le_bytes());
        out[48..56].copy_from_slice(&self.source_seq.to_le_bytes());
        out[56..60].copy_from_slice(&self.payload_len.to_le_bytes());
        self.crc = record_crc(out, group_id, segment_index, payload);
        out[RECORD_CRC_AT..].copy_from_slice(&self.crc.to_le_bytes());
    }

    /// Decodes a record header and checks everything that can be checked without the
    /// payload, including that `payload_len` is sane, so callers may allocate it.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, Corrupt> {
        if b.len() < RECORD_HEADER_LEN {
            return corrupt(format!("short record header: {} bytes", b.len()));
        }
        if u32_at(b, 0) != RECORD_MAGIC {
            return corrupt("bad record magic");
        }
        let kind = match kind_from_code(b[4]) {
            Some(k) => k,
            None => return corrupt(format!("unknown record kind {}", b[4])),
        };
        if b[5] & !RECORD_FLAGS_KNOWN != 0 {
            return corrupt(format!("unknown record flags {:#x}", b[5]));
        }
        if !all_zero(&b[6..8]) || !all_zero(&b[12..16]) {
            return corrupt("record reserved bytes are not zero");
        }
        let h = RecordHeader {
            kind,
            flags: b[5],
            volume: u32_at(b, 8),
            seq: u64_at(b, 16),
            timestamp_ns: u64_at(b, 24),
            offset: u64_at(b, 32),
            length: u64_at(b, 40),
            source_seq: u64_at(b, 48),
            payload_len: u32_at(b, 56),
            crc: u32_at(b, RECORD_CRC_AT),
        };
        let payload_len = h.payload_len as u64;
        if payload_len > RECORD_PAYLOAD_BYTES_MAX {
            return corrupt(format!("absurd record payload length {payload_len}"));
        }
        if h.seq == 0 {
            return corrupt("record seq is 0");
        }
        if h.offset.checked_add(h.length).is_none() {
            return corrupt("record offset + length overflows");
        }
        let zstd = h.flags & RECORD_FLAG_ZSTD != 0;
        if h.flags & RECORD_FLAG_PAYLOAD_DROPPED != 0 {
            if kind != RecordKind::Write || zstd || payload_len != 0 {
                return corrupt(
                    "a record with a dropped payload must be an uncompressed write with no payload",
                );
            }
            if h.length > WRITE_PAYLOAD_BYTES_MAX {
                return corrupt("consolidated write record has a bad length");
            }
            return Ok(h);
        }
        match kind {
            RecordKind::Write
                if zstd
                    && (payload_len == 0
                        || payload_len >= h.length
                        || h.length > WRITE_PAYLOAD_BYTES_MAX) =>
            {
                return corrupt("compressed write record has a bad length");
            }
            RecordKind::Write if !zstd && h.length != payload_len => {
                return corrupt("write record length differs from payload length");
            }
            RecordKind::Trim
            | RecordKind::Zero
            | RecordKind::Bookmark
            | RecordKind::ResyncStart
            | RecordKind::ResyncEnd
                if zstd =>
            {
                return corrupt("only write records may be compressed");
            }
            RecordKind::Trim | RecordKind::Zero if payload_len != 0 => {
                return corrupt("trim/zero record carries a payload");
            }
            RecordKind::Bookmark
                if h.volume != 0
                    || h.offset != 0
                    || h.length != 0
                    || payload_len > BOOKMARK_NAME_BYTES_MAX =>
            {
                return corrupt("malformed bookmark record");
            }
            RecordKind::ResyncStart | RecordKind::ResyncEnd
                if h.offset != 0 || h.length != 0 || payload_len != 0 =>
            {
                return corrupt("malformed resync marker");
            }
            _ => {}
        }
        Ok(h)
    }

    /// Checks the CRC of a decoded header against its raw bytes, container and payload.
    pub fn verify(
        &self,
        head: &[u8],
        group_id: u64,
        segment_index: u64,
        payload: &[u8],
    ) -> Result<(), Corrupt> {
        if payload.len() != self.payload_len as usize {
            return corrupt("short record payload");
        }
        if record_crc(head, group_id, segment_index, payload) != self.crc {
            return corrupt("record CRC mismatch");
        }
        Ok(())
    }

    /// Consolidation dropped this record's payload.
    pub fn payload_dropped(&self) -> bool {
        self.flags & RECORD_FLAG_PAYLOAD_DROPPED != 0
    }

    /// Bytes the record occupies in its segment.
    pub fn encoded_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.payload_len as u64
    }
}

// The limits' relations to the header sizes, checked here so limits.rs stays a leaf.
const _: () =
    assert!(crate::limits::SEGMENT_BYTES_MIN > (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64);
const _: () = assert!(
    crate::limits::BATCH_BYTES_MAX
        >= crate::limits::WRITE_PAYLOAD_BYTES_MAX + RECORD_HEADER_LEN as u64
);
const _: () = assert!(crate::limits::READ_AHEAD_BYTES >= RECORD_HEADER_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_segment() -> SegmentHeader {
        SegmentHeader {
            version: Version::V1,
            group_id: 0x0102_0304_0506_0708,
            segment_index: 3,
            first_seq: 42,
            created_ns: 1_700_000_000_000_000_000,
        }
    }

    fn sample_record() -> (RecordHeader, &'static [u8]) {
        let payload: &[u8] = b"hello";
        let h = RecordHeader {
            kind: RecordKind::Write,
            flags: 0,
            volume: 7,
            seq: 42,
            timestamp_ns: 1_700_000_000_000_000_001,
            offset: 4096,
            length: 5,
            source_seq: 9,
            payload_len: 5,
            crc: 0,
        };
        (h, payload)
    }

    /// Golden bytes for version 1 (computed independently with Python's struct and
    /// zlib.crc32): these must never change, or old journals stop reading.
    #[test]
    fn golden_v1() {
        let seg = sample_segment().encode();
        let seg_expected: [u8; 64] = [
            0x43, 0x44, 0x50, 0x4a, 0x53, 0x45, 0x47, 0x00, 0x01, 0x00, 0x40, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0x03, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x2a, 0x36, 0xfe, 0x9c, 0x97, 0x17, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x25, 0xb6, 0x5e, 0xb4,
        ];
        assert_eq!(seg[..60], seg_expected[..60], "segment header fields");
        assert_eq!(seg[60..], seg_expected[60..], "segment header crc");

        let (mut h, payload) = sample_record();
        let mut rec = [0u8; RECORD_HEADER_LEN];
        h.encode(0x0102_0304_0506_0708, 3, payload, &mut rec);
        let rec_expected: [u8; 64] = [
            0x43, 0x4a, 0x43, 0x52, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x2a, 0x36,
            0xfe, 0x9c, 0x97, 0x17, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x05, 0x00, 0x00, 0x00, 0x56, 0x25, 0x44, 0x26,
        ];
        assert_eq!(rec[..60], rec_expected[..60], "record header fields");
        assert_eq!(rec[60..], rec_expected[60..], "record header crc");
    }

    /// Encoding then decoding gives back the same header, and the CRC verifies.
    #[test]
    fn round_trip() {
        let s = sample_segment();
        assert_eq!(SegmentHeader::decode(&s.encode()).unwrap(), s);
        for kind in [
            RecordKind::Write,
            RecordKind::Trim,
            RecordKind::Zero,
            RecordKind::Bookmark,
        ] {
            let (mut h, payload) = sample_record();
            h.kind = kind;
            let payload: &[u8] = match kind {
                RecordKind::Write | RecordKind::Bookmark => payload,
                _ => b"",
            };
            h.payload_len = payload.len() as u32;
            if kind == RecordKind::Bookmark {
                h.volume = 0;
                h.offset = 0;
                h.length = 0;
            }
            let mut b = [0u8; RECORD_HEADER_LEN];
            h.encode(9, 1, payload, &mut b);
            let d = RecordHeader::decode(&b).unwrap();
            assert_eq!(d, h);
            d.verify(&b, 9, 1, payload).unwrap();
        }
    }

    /// Version 2 segments decode; a compressed write needs a payload shorter than its
    /// length, and only writes may be compressed.
    #[test]
    fn version_2_and_zstd_flag() {
        let mut s = sample_segment();
        s.version = Version::V2;
        assert_eq!(SegmentHeader::decode(&s.encode()).unwrap(), s);
        let (mut h, payload) = sample_record();
        h.flags = RECORD_FLAG_ZSTD;
        h.length = 4096;
        let mut r = [0u8; RECORD_HEADER_LEN];
        h.encode(1, 2, payload, &mut r);
        let d = RecordHeader::decode(&r).unwrap();
        assert_eq!(d, h);
        d.verify(&r, 1, 2, payload).unwrap();
        h.length = 5;
        h.encode(1, 2, payload, &mut r);
        assert!(RecordHeader::decode(&r).is_err());
        h.kind = RecordKind::Bookmark;
        h.volume = 0;
        h.offset = 0;
        h.length = 0;
        h.encode(1, 2, payload, &mut r);
        assert!(RecordHeader::decode(&r).is_err());
        r[5] = 0x04;
        assert!(RecordHeader::decode(&r).unwrap_err().0.contains("flags"));
    }

    /// A dropped payload is only valid on an uncompressed, payload-less write; version 3
    /// segment headers decode.
    #[test]
    fn dropped_payload_flag() {
        let mut s = sample_segment();
        s.version = Version::V3;
        assert_eq!(SegmentHeader::decode(&s.encode()).unwrap(), s);
        let (mut h, _) = sample_record();
        h.flags = RECORD_FLAG_PAYLOAD_DROPPED;
        h.payload_len = 0;
        h.length = 4096;
        let mut r = [0u8; RECORD_HEADER_LEN];
        h.encode(1, 2, b"", &mut r);
        let d = RecordHeader::decode(&r).unwrap();
        assert!(d.payload_dropped());
        d.verify(&r, 1, 2, b"").unwrap();
        h.payload_len = 5;
        h.encode(1, 2, b"hello", &mut r);
        assert!(RecordHeader::decode(&r).unwrap_err().0.contains("dropped"));
        h.payload_len = 0;
        h.flags = RECORD_FLAG_PAYLOAD_DROPPED | RECORD_FLAG_ZSTD;
        h.encode(1, 2, b"", &mut r);
        assert!(RecordHeader::decode(&r).is_err());
        h.flags = RECORD_FLAG_PAYLOAD_DROPPED;
        h.kind = RecordKind::Trim;
        h.encode(1, 2, b"", &mut r);
        assert!(RecordHeader::decode(&r).is_err());
    }

    /// Every single-bit flip in a record or segment header is caught by decode or verify.
    #[test]
    fn bit_flips_are_caught() {
        let s = sample_segment().encode();
        for i in 0..s.len() * 8 {
            let mut b = s;
            b[i / 8] ^= 1 << (i % 8);
            assert!(SegmentHeader::decode(&b).is_err(), "segment bit {i}");
        }
        let (mut h, payload) = sample_record();
        let mut r = [0u8; RECORD_HEADER_LEN];
        h.encode(1, 2, payload, &mut r);
        for i in 0..r.len() * 8 {
            let mut b = r;
            b[i / 8] ^= 1 << (i % 8);
            let ok = RecordHeader::decode(&b).and_then(|d| d.verify(&b, 1, 2, payload));
            assert!(ok.is_err(), "record bit {i}");
        }
    }

    /// The container is bound into the CRC: the same bytes in another group or segment fail.
    #[test]
    fn crc_binds_container() {
        let (mut h, payload) = sample_record();
        let mut r = [0u8; RECORD_HEADER_LEN];
        h.encode(1, 2, payload, &mut r);
        let d = RecordHeader::decode(&r).unwrap();
        assert!(d.verify(&r, 1, 2, payload).is_ok());
        assert!(d.verify(&r, 2, 2, payload).is_err());
        assert!(d.verify(&r, 1, 3, payload).is_err());
        assert!(d.verify(&r, 1, 2, b"hellp").is_err());
    }

    /// Short buffers, unknown versions and absurd lengths are corruption, never a panic.
    #[test]
    fn rejects_bad_input() {
        assert!(SegmentHeader::decode(&[0u8; 10]).is_err());
        assert!(RecordHeader::decode(&[0u8; 10]).is_err());
        let mut s = sample_segment().encode();
        s[8] = 4;
        let crc = crc32fast::hash(&s[..60]);
        s[60..].copy_from_slice(&crc.to_le_bytes());
        assert!(SegmentHeader::decode(&s).unwrap_err().0.contains("version"));
        let (mut h, _) = sample_record();
        h.kind = RecordKind::Trim;
        h.payload_len = 0;
        let mut r = [0u8; RECORD_HEADER_LEN];
        h.encode(1, 2, b"", &mut r);
        r[56..60].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RecordHeader::decode(&r).unwrap_err().0.contains("absurd"));
    }
}
