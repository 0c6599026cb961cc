//! zstd-compressed write payloads: round trip against a model with compressible,
//! incompressible and tiny payloads, reopen, the space saved, turning compression off, and
//! damage inside a compressed payload found by readers and `inspect`.

mod common;

use std::fs;

use bytes::Bytes;
use cdp_journal::{inspect, Journal, JournalConfig, RecordIn};
use cdp_types::Seq;
use common::*;

const MIB: u64 = 1024 * 1024;

/// Compressible data: a few distinct bytes in runs, like a filesystem's metadata or zeros.
fn compressible(seed: u64, len: usize) -> Bytes {
    let noise = payload(seed, len / 64 + 1);
    Bytes::from((0..len).map(|i| noise[i / 64] & 0x3).collect::<Vec<u8>>())
}

fn model_records() -> Vec<RecordIn> {
    let mut v = Vec::new();
    for i in 0..60u64 {
        let p = match i % 4 {
            0 => compressible(i, 256 * 1024),
            1 => payload(i, 64 * 1024), // incompressible: stored as is
            2 => Bytes::from(vec![0u8; 4 << 20]), // zeros: tiny when compressed
            _ => compressible(i, 100),  // below the minimum: stored as is
        };
        v.push(RecordIn::write(1, i * 4096, p).with_source_seq(i + 1));
    }
    v
}

fn read_all(j: &Journal, model: &[RecordIn]) {
    let mut reader = j.read_from(Seq(1)).unwrap();
    for (i, want) in model.iter().enumerate() {
        let got = reader.next().expect("record").expect("readable");
        assert_eq!(got.seq, Seq(i as u64 + 1));
        assert_eq!(got.length, want.length);
        assert!(got.payload == want.payload, "payload of seq {}", i + 1);
    }
    assert!(reader.next().is_none());
}

/// Compressed and plain payloads read back byte for byte, before and after reopen, and the
/// journal stores far fewer bytes than were written.
#[test]
fn round_trip_and_savings() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_records();
    let logical: u64 = model.iter().map(|r| r.length).sum();
    {
        let j = open(tmp.path(), 4 * MIB);
        for chunk in model.chunks(7) {
            j.append(chunk).unwrap();
        }
        j.sync().unwrap();
        let (l, stored) = j.write_bytes_since_open();
        assert_eq!(l, logical);
        assert!(stored * 4 < logical, "stored {stored} of {logical}");
        read_all(&j, &model);
        assert!(j.size_bytes() < logical / 4);
    }
    let j = open(tmp.path(), 4 * MIB);
    read_all(&j, &model);
    assert_eq!(j.write_bytes_since_open(), (0, 0));
    drop(j);
    let report = inspect(tmp.path()).unwrap();
    assert!(report.is_clean(), "{:?}", report.damage);
    assert_eq!(report.records, model.len() as u64);
}

/// With compression off every payload is stored as written; a journal mixing both reads.
#[test]
fn off_and_mixed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_records();
    let off = JournalConfig {
        compress_writes: false,
        ..config(64 * MIB)
    };
    {
        let (j, _) = Journal::open(tmp.path(), 77, off.clone()).unwrap();
        j.append(&model[..30]).unwrap();
        let (l, s) = j.write_bytes_since_open();
        assert_eq!(l, s);
    }
    {
        let j = open(tmp.path(), 64 * MIB);
        j.append(&model[30..]).unwrap();
        read_all(&j, &model);
    }
    let (j, _) = Journal::open(tmp.path(), 77, off).unwrap();
    read_all(&j, &model);
}

/// A flipped byte inside a compressed payload is a CRC error at that record, for readers
/// and for `inspect`, never garbage handed to the caller.
#[test]
fn damage_in_compressed_payload() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<RecordIn> = (0..4u64)
        .map(|i| RecordIn::write(1, 0, compressible(i, 1 << 20)))
        .collect();
    {
        let j = open(tmp.path(), 64 * MIB);
        j.append(&records).unwrap();
        j.sync().unwrap();
    }
    let seg = tmp.path().join("journal").join("0000000000000001.seg");
    let mut bytes = fs::read(&seg).unwrap();
    // Second record: after the segment header, the first record's header and payload.
    let first_len = u32::from_le_bytes(bytes[64 + 56..64 + 60].try_into().unwrap()) as usize;
    let second = 64 + 64 + first_len;
    assert!(bytes[64 + 5] & 1 == 1, "first record is compressed");
    bytes[second + 64 + 3] ^= 0x40;
    fs::write(&seg, &bytes).unwrap();
    let report = inspect(tmp.path()).unwrap();
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    assert_eq!(report.damage[0].offset, second as u64);
}

/// A headers-only reader returns every record's seq, kind and length but no write payload
/// (compressed or not), and bookmark payloads whole. Method: append the model with bookmarks
/// between batches across several segments, then compare the headers-only scan with the
/// model record by record.
#[test]
fn headers_only_reader_keeps_bookmarks_and_drops_write_payloads() {
    let tmp = tempfile::tempdir().unwrap();
    let j = open(tmp.path(), MIB);
    let mut model = Vec::new();
    for (n, chunk) in model_records().chunks(7).enumerate() {
        j.append(chunk).unwrap();
        model.extend_from_slice(chunk);
        // Incompressible, so the journal rolls over to new segments.
        let w = RecordIn::write(2, 0, payload(1000 + n as u64, 512 * 1024));
        j.append(std::slice::from_ref(&w)).unwrap();
        model.push(w);
        let b = RecordIn::bookmark(&format!("b{n}"));
        j.append(std::slice::from_ref(&b)).unwrap();
        model.push(b);
    }
    assert!(j.segment_count() > 1, "the model must span segments");
    let mut reader = j.read_headers_from(Seq(1)).unwrap();
    for (i, want) in model.iter().enumerate() {
        let got = reader.next().expect("record").expect("readable");
        assert_eq!(got.seq, Seq(i as u64 + 1));
        assert_eq!(got.kind, want.kind);
        assert_eq!(got.length, want.length);
        if want.kind == cdp_journal::RecordKind::Bookmark {
            assert_eq!(
                got.payload,
                want.payload,
                "bookmark payload of seq {}",
                i + 1
            );
        } else {
            assert!(
                got.payload.is_empty(),
                "write payload of seq {} kept",
                i + 1
            );
        }
    }
    assert!(reader.next().is_none());
}
