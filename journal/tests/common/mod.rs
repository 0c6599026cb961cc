//! Test helpers shared by the journal's integration tests: payload generation and the
//! model (the list of records the test appended) that every read is compared against.
#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use cdp_journal::{Journal, JournalConfig, RecordIn, RecordKind};
use cdp_types::Seq;

/// Deterministic pseudo-random bytes, fast enough for megabytes per test case.
pub fn payload(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// A record of `kind` with generated content; `seed` picks everything.
pub fn record(kind: RecordKind, seed: u64, len: usize) -> RecordIn {
    let volume = (seed % 7) as u32;
    let offset = (seed % 1000) * 512;
    match kind {
        RecordKind::Write => {
            RecordIn::write(volume, offset, payload(seed, len)).with_source_seq(seed)
        }
        RecordKind::Trim | RecordKind::Zero => {
            RecordIn::range(kind, volume, offset, len as u64).with_source_seq(seed)
        }
        RecordKind::Bookmark => RecordIn::bookmark(&format!("bm-{seed}")),
        RecordKind::ResyncStart | RecordKind::ResyncEnd => {
            RecordIn::resync_marker(kind, volume, seed)
        }
    }
}

pub fn config(segment_bytes_max: u64) -> JournalConfig {
    JournalConfig {
        segment_bytes_max,
        ..JournalConfig::default()
    }
}

pub fn open(dir: &Path, segment_bytes_max: u64) -> Journal {
    Journal::open(dir, 77, config(segment_bytes_max))
        .expect("open journal")
        .0
}

/// Encoded size of a record in a segment.
pub fn encoded_len(r: &RecordIn) -> u64 {
    cdp_journal::format::RECORD_HEADER_LEN as u64 + r.payload.len() as u64
}

/// Checks that `read_from(from)` yields exactly `model[from-1..]` (model[i] has seq i+1),
/// byte for byte, with non-decreasing timestamps.
pub fn check_read(j: &Journal, model: &[RecordIn], from: u64) {
    let mut reader = j.read_from(Seq(from)).expect("read_from");
    let start = from.max(1);
    let mut last_ts = 0;
    for (i, want) in model.iter().enumerate().skip((start - 1) as usize) {
        let got = reader
            .next()
            .unwrap_or_else(|| panic!("missing seq {}", i + 1))
            .unwrap_or_else(|e| panic!("seq {}: {e}", i + 1));
        assert_eq!(got.seq, Seq(i as u64 + 1));
        assert_eq!(got.kind, want.kind, "kind of seq {}", i + 1);
        assert_eq!(got.volume, want.volume, "volume of seq {}", i + 1);
        assert_eq!(
            got.source_seq,
            want.source_seq,
            "source_seq of seq {}",
            i + 1
        );
        assert_eq!(got.offset, want.offset, "offset of seq {}", i + 1);
        assert_eq!(got.length, want.length, "length of seq {}", i + 1);
        assert!(got.payload == want.payload, "payload of seq {}", i + 1);
        assert!(got.timestamp.0 >= last_ts, "timestamps go backwards");
        last_ts = got.timestamp.0;
    }
    assert!(reader.next().is_none(), "records after the model's end");
}
