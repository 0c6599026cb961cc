//! Encodes and decodes a sealed segment's time marks file (`{index:016x}.tix`); nothing else
//! lives here. The file is a cache of what the segment's record headers say: a stale, torn
//! or damaged one is detected here or by `time_index` and rebuilt from the segment.
//!
//! The same file also serves as the *tail checkpoint* of the active segment: written after
//! an fdatasync, it says that the segment's first `segment bytes` are whole records ending
//! with record `last seq` at `last record offset`, so recovery scans only what follows.
//!
//! All integers are fixed-width little-endian. Version 1 layout: an 80-byte header, then
//! `mark_count` marks of 24 bytes, then a CRC32 (crc32fast) of every byte before it.
//!
//! | offset | size | field                                                   |
//! |-------:|-----:|---------------------------------------------------------|
//! |      0 |    8 | magic `b"CDPJTIX\0"`                                    |
//! |      8 |    2 | version (`1`)                                           |
//! |     10 |    2 | header length (`64`)                                    |
//! |     12 |    4 | reserved, zero                                          |
//! |     16 |    8 | group id                                                |
//! |     24 |    8 | segment index                                           |
//! |     32 |    8 | first seq of the segment                                |
//! |     40 |    8 | last seq of the segment                                 |
//! |     48 |    8 | segment bytes (file length when the marks were taken)   |
//! |     56 |    8 | last record offset (where record `last seq` starts)     |
//! |     64 |    8 | last record's timestamp, ns                             |
//! |     72 |    4 | mark count                                              |
//! |     76 |    4 | reserved, zero                                          |
//! |     80 |   24 | per mark: seq, timestamp ns, byte offset in the segment |
//! |    end |    4 | CRC32 of all bytes before it                            |

use crate::format::{Corrupt, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// First bytes of every time marks file.
pub const TIME_MARKS_MAGIC: [u8; 8] = *b"CDPJTIX\0";
/// The only version so far.
pub const TIME_MARKS_VERSION: u16 = 1;
const HEADER_LEN: usize = 80;
const MARK_LEN: usize = 24;

/// One sampled record: its seq, its timestamp and where its header starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    pub timestamp_ns: u64,
    pub offset: u64,
}

/// The marks of one sealed segment, and what they were taken from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeMarks {
    pub group_id: u64,
    pub segment_index: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub segment_bytes: u64,
    pub last_record_offset: u64,
    pub last_timestamp_ns: u64,
    pub marks: Vec<Mark>,
}

impl TimeMarks {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.marks.len() * MARK_LEN + 4);
        b.extend_from_slice(&TIME_MARKS_MAGIC);
        b.extend_from_slice(&TIME_MARKS_VERSION.to_le_bytes());
        b.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for v in [
            self.group_id,
            self.segment_index,
            self.first_seq,
            self.last_seq,
            self.segment_bytes,
            self.last_record_offset,
            self.last_timestamp_ns,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.marks.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for m in &self.marks {
            b.extend_from_slice(&m.seq.to_le_bytes());
            b.extend_from_slice(&m.timestamp_ns.to_le_bytes());
            b.extend_from_slice(&m.offset.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a whole file: length, magic, CRC before any field is trusted,
    /// version, and that the marks are ordered and inside the segment they claim.
    pub fn decode(b: &[u8]) -> Result<TimeMarks, Corrupt> {
        let bad = |what: String| Err(Corrupt(what));
        if b.len() < HEADER_LEN + 4 {
            return bad(format!("short time marks file: {} bytes", b.len()));
        }
        if b[0..8] != TIME_MARKS_MAGIC {
            return bad("bad time marks magic".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32_at(crc, 0) {
            return bad("time marks CRC mismatch".into());
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != TIME_MARKS_VERSION {
            return bad(format!("unknown time marks version {version}"));
        }
        if u16::from_le_bytes([b[10], b[11]]) as usize != HEADER_LEN {
            return bad("time marks header length".into());
        }
        let count = u32_at(b, 72) as usize;
        if body.len() != HEADER_LEN + count * MARK_LEN {
            return bad(format!(
                "{count} time marks do not fit a {}-byte file",
                b.len()
            ));
        }
        let t = TimeMarks {
            group_id: u64_at(b, 16),
            segment_index: u64_at(b, 24),
            first_seq: u64_at(b, 32),
            last_seq: u64_at(b, 40),
            segment_bytes: u64_at(b, 48),
            last_record_offset: u64_at(b, 56),
            last_timestamp_ns: u64_at(b, 64),
            marks: (0..count)
                .map(|i| {
                    let at = HEADER_LEN + i * MARK_LEN;
                    Mark {
                        seq: u64_at(b, at),
                        timestamp_ns: u64_at(b, at + 8),
                        offset: u64_at(b, at + 16),
                    }
                })
                .collect(),
        };
        if t.first_seq == 0 || t.last_seq < t.first_seq {
            return bad(format!(
                "time marks cover seqs {}..={}",
                t.first_seq, t.last_seq
            ));
        }
        // The first record of a segment is always a mark: lookups rely on it.
        let Some(first) = t.marks.first() else {
            return bad("time marks file without marks".into());
        };
        if first.seq != t.first_seq || first.offset != SEGMENT_HEADER_LEN as u64 {
            return bad("first time mark is not the segment's first record".into());
        }
        for w in t.marks.windows(2) {
            if w[1].seq <= w[0].seq
                || w[1].timestamp_ns < w[0].timestamp_ns
                || w[1].offset < w[0].offset + RECORD_HEADER_LEN as u64
            {
                return bad(format!("time marks out of order at seq {}", w[1].seq));
            }
        }
        let last = t.marks[t.marks.len() - 1];
        if last.seq > t.last_seq
            || last.offset > t.last_record_offset
            || last.timestamp_ns > t.last_timestamp_ns
            || t.last_record_offset + RECORD_HEADER_LEN as u64 > t.segment_bytes
        {
            return bad("time mark past the end of its segment".into());
        }
        Ok(t)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TimeMarks {
        TimeMarks {
            group_id: 0x1122,
            segment_index: 3,
            first_seq: 10,
            last_seq: 20,
            segment_bytes: 4096,
            last_record_offset: 2048,
            last_timestamp_ns: 9,
            marks: vec![
                Mark {
                    seq: 10,
                    timestamp_ns: 5,
                    offset: 64,
                },
                Mark {
                    seq: 15,
                    timestamp_ns: 7,
                    offset: 1024,
                },
            ],
        }
    }

    /// Goal: version 1 never changes. Method: the encoding of a fixed value, byte for byte.
    #[test]
    fn golden_bytes_v1() {
        let b = sample().encode();
        let mut want = Vec::new();
        want.extend_from_slice(b"CDPJTIX\0\x01\x00\x50\x00\0\0\0\0");
        for v in [0x1122u64, 3, 10, 20, 4096, 2048, 9] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        for v in [10u64, 5, 64, 15, 7, 1024] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(b, want);
        assert_eq!(TimeMarks::decode(&b), Ok(sample()));
    }

    /// Goal: any damage is refused, never misread. Method: flip every byte and cut every
    /// length; each must fail to decode.
    #[test]
    fn every_damage_is_refused() {
        let b = sample().encode();
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(TimeMarks::decode(&d).is_err(), "flipped byte {i} accepted");
        }
        for len in 0..b.len() {
            assert!(
                TimeMarks::decode(&b[..len]).is_err(),
                "cut at {len} accepted"
            );
        }
    }
}
