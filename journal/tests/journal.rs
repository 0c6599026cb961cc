//! End-to-end journal tests against a model: round trips, rollovers, random workloads,
//! torn tails at every byte, garbage, corruption found by `inspect`, and concurrency.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use cdp_journal::{inspect, Journal, JournalError, RecordIn, RecordKind};
use cdp_types::Seq;
use common::*;
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;

fn seg_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Every record kind and payload size class (empty, copied, vectored, bigger than the
/// read-ahead buffer) survives append, sync, read and reopen byte for byte.
#[test]
fn round_trip_all_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    {
        let (j, report) = Journal::open(tmp.path(), 77, config(64 * MIB)).unwrap();
        assert_eq!(report.last_seq, Seq(0));
        assert_eq!(j.first_seq(), Seq(1));
        assert_eq!(j.last_seq(), Seq(0));
        let batch = vec![
            record(RecordKind::Write, 1, 0),
            record(RecordKind::Write, 2, 512),
            record(RecordKind::Write, 3, 4096),
            record(RecordKind::Write, 4, 4097),
            record(RecordKind::Trim, 5, 1 << 20),
            record(RecordKind::Zero, 6, 4096),
            record(RecordKind::Bookmark, 7, 0),
            record(RecordKind::Write, 8, 1 << 20),
            record(RecordKind::Write, 9, 300_000),
        ];
        assert_eq!(j.append(&batch).unwrap(), Seq(9));
        model.extend(batch);
        assert_eq!(j.append(&[]).unwrap(), Seq(9));
        assert_eq!(j.sync().unwrap(), Seq(9));
        assert_eq!(j.durable_seq(), Seq(9));
        check_read(&j, &model, 1);
        check_read(&j, &model, 5);
        check_read(&j, &model, 10);
        let one = vec![record(RecordKind::Write, 10, 100)];
        assert_eq!(j.append(&one).unwrap(), Seq(10));
        model.extend(one);
        let expected: u64 = 64 + model.iter().map(encoded_len).sum::<u64>();
        assert_eq!(j.size_bytes(), expected);
        assert_eq!(j.segment_count(), 1);
    }
    let (j, report) = Journal::open(tmp.path(), 77, config(64 * MIB)).unwrap();
    assert_eq!(report.last_seq, Seq(10));
    assert_eq!(report.records, 10);
    assert_eq!(report.truncated_bytes, 0);
    assert!(report.tail_cut.is_none());
    assert_eq!(j.durable_seq(), Seq(10));
    check_read(&j, &model, 0);
    let more = vec![record(RecordKind::Zero, 11, 8)];
    assert_eq!(j.append(&more).unwrap(), Seq(11));
    model.extend(more);
    check_read(&j, &model, 1);
    let ins = inspect(tmp.path()).unwrap();
    assert!(ins.is_clean(), "{:?}", ins.damage);
    assert_eq!(ins.records, 11);
    assert_eq!(ins.last_seq, Seq(11));
}

/// Small segments roll over; records spanning many segments read back from any seq,
/// and `inspect` agrees on counts.
#[test]
fn rollover_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    {
        let j = open(tmp.path(), MIB);
        for b in 0..40u64 {
            let batch: Vec<_> = (0..4)
                .map(|k| record(RecordKind::Write, b * 4 + k, 30_000 + (k as usize) * 1000))
                .collect();
            j.append(&batch).unwrap();
            model.extend(batch);
            if b % 7 == 0 {
                j.sync().unwrap();
            }
        }
        // One record larger than a segment gets a segment of its own.
        let big = vec![record(RecordKind::Write, 999, 2 * MIB as usize)];
        j.append(&big).unwrap();
        model.extend(big);
        assert!(j.segment_count() >= 5, "{} segments", j.segment_count());
        for from in [1, 2, 33, 34, 80, 160, 161, 162] {
            check_read(&j, &model, from);
        }
    }
    let j = open(tmp.path(), MIB);
    for from in (1..=model.len() as u64 + 1).step_by(13) {
        check_read(&j, &model, from);
    }
    let ins = inspect(tmp.path()).unwrap();
    assert!(ins.is_clean(), "{:?}", ins.damage);
    assert_eq!(ins.records, model.len() as u64);
    assert_eq!(ins.segments.len(), j.segment_count());
    for pair in ins.segments.windows(2) {
        assert_eq!(pair[0].first_seq.0 + pair[0].records, pair[1].first_seq.0);
    }
}

#[derive(Clone, Debug)]
struct Spec {
    kind: RecordKind,
    len: usize,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    let kind = prop_oneof![
        6 => Just(RecordKind::Write),
        1 => Just(RecordKind::Trim),
        1 => Just(RecordKind::Zero),
        1 => Just(RecordKind::Bookmark),
        1 => Just(RecordKind::ResyncStart),
        1 => Just(RecordKind::ResyncEnd),
    ];
    let len = prop_oneof![
        4 => 0usize..5000,
        2 => 5000usize..70_000,
        1 => 70_000usize..400_000,
    ];
    (kind, len, any::<u64>()).prop_map(|(kind, len, seed)| Spec { kind, len, seed })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random batches of every kind with random small segment sizes (forcing rollovers),
    /// optionally reopened midway, read back from random seqs exactly as the model says.
    #[test]
    fn random_workload_matches_model(
        segment_bytes in MIB..3 * MIB,
        batches in prop::collection::vec(prop::collection::vec(spec(), 0..12), 1..30),
        reopen_at in any::<prop::sample::Index>(),
        froms in prop::collection::vec(any::<prop::sample::Index>(), 3),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut model: Vec<RecordIn> = Vec::new();
        let reopen_at = reopen_at.index(batches.len());
        let mut j = open(tmp.path(), segment_bytes);
        for (bi, batch) in batches.iter().enumerate() {
            if bi == reopen_at {
                drop(j);
                j = open(tmp.path(), segment_bytes);
            }
            let records: Vec<_> = batch.iter().map(|s| record(s.kind, s.seed, s.len)).collect();
            let last = j.append(&records).unwrap();
            model.extend(records);
            prop_assert_eq!(last, Seq(model.len() as u64));
            if bi % 3 == 0 {
                prop_assert!(j.sync().unwrap() >= last);
            }
        }
        drop(j);
        let (j, report) = Journal::open(tmp.path(), 77, config(segment_bytes)).unwrap();
        prop_assert_eq!(report.last_seq, Seq(model.len() as u64));
        prop_assert_eq!(report.truncated_bytes, 0);
        for f in froms {
            check_read(&j, &model, f.index(model.len() + 2) as u64);
        }
        let ins = inspect(tmp.path()).unwrap();
        prop_assert!(ins.is_clean());
        prop_assert_eq!(ins.records, model.len() as u64);
    }
}

/// Builds a one-segment journal of `n` small records and returns (dir, model, bytes of
/// the segment file, offset where each record starts).
fn small_journal(n: u64) -> (tempfile::TempDir, Vec<RecordIn>, Vec<u8>, Vec<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    {
        let j = open(tmp.path(), MIB);
        for i in 0..n {
            let kind = [RecordKind::Write, RecordKind::Trim, RecordKind::Bookmark][i as usize % 3];
            let r = vec![record(kind, i, 40 + i as usize)];
            j.append(&r).unwrap();
            model.extend(r);
        }
        j.sync().unwrap();
    }
    let files = seg_files(tmp.path());
    assert_eq!(files.len(), 1);
    let bytes = fs::read(&files[0]).unwrap();
    let mut starts = Vec::new();
    let mut at = 64;
    for r in &model {
        starts.push(at);
        at += encoded_len(r);
    }
    assert_eq!(at, bytes.len() as u64);
    (tmp, model, bytes, starts)
}

/// A torn tail at every byte offset inside the last two records, either missing (file
/// cut short) or zero-filled (size persisted, data not): reopen cuts exactly the torn
/// record, keeps everything before it, and appends continue after the cut.
#[test]
fn torn_tail_at_every_offset_is_cut() {
    let (tmp, model, bytes, starts) = small_journal(6);
    let seg = seg_files(tmp.path())[0].clone();
    let from = starts[starts.len() - 2];
    for cut in from..bytes.len() as u64 {
        for zero_fill in [false, true] {
            let mut torn = bytes[..cut as usize].to_vec();
            if zero_fill {
                torn.resize(bytes.len(), 0);
            }
            fs::write(&seg, &torn).unwrap();
            // Records that end at or before the cut survive; the one it tears does not.
            let kept = starts
                .iter()
                .zip(&model)
                .filter(|(&s, r)| s + encoded_len(r) <= cut)
                .count();
            let (j, report) = Journal::open(tmp.path(), 77, config(MIB)).unwrap();
            assert_eq!(
                report.last_seq,
                Seq(kept as u64),
                "cut {cut} zero {zero_fill}"
            );
            let good_end = starts.get(kept).copied().unwrap_or(bytes.len() as u64);
            assert_eq!(report.truncated_bytes, torn.len() as u64 - good_end);
            if report.truncated_bytes > 0 {
                let tc = report.tail_cut.clone().unwrap();
                assert_eq!(tc.offset, good_end);
                assert_eq!(tc.path, seg);
            }
            check_read(&j, &model[..kept], 1);
            let mut m = model[..kept].to_vec();
            let r = vec![record(RecordKind::Write, 1000 + cut, 33)];
            j.append(&r).unwrap();
            m.extend(r);
            drop(j);
            let j = open(tmp.path(), MIB);
            check_read(&j, &m, 1);
        }
    }
}

/// Garbage after the last record (random bytes, or a plausible header with a bad CRC)
/// is cut on reopen and the records before it are intact.
#[test]
fn garbage_tail_is_cut() {
    let (tmp, model, bytes, _) = small_journal(5);
    let seg = seg_files(tmp.path())[0].clone();
    let mut fake_header = bytes[64..64 + cdp_journal::format::RECORD_HEADER_LEN].to_vec();
    fake_header[16] ^= 0x55;
    for garbage in [payload(5, 1), payload(6, 1000), Bytes::from(fake_header)] {
        fs::write(&seg, &bytes).unwrap();
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&garbage)
            .unwrap();
        let (j, report) = Journal::open(tmp.path(), 77, config(MIB)).unwrap();
        assert_eq!(report.truncated_bytes, garbage.len() as u64);
        assert_eq!(report.last_seq, Seq(5));
        check_read(&j, &model, 1);
        assert_eq!(fs::metadata(&seg).unwrap().len(), bytes.len() as u64);
    }
}

/// A corrupted byte in a middle segment is reported by `inspect` with the exact file and
/// the offset of the damaged record, and a reader crossing it gets the same Corruption.
#[test]
fn middle_segment_corruption_is_located() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    {
        let j = open(tmp.path(), MIB);
        for i in 0..120u64 {
            let r = vec![record(RecordKind::Write, i, 40_000)];
            j.append(&r).unwrap();
            model.extend(r);
        }
        j.sync().unwrap();
        assert!(j.segment_count() >= 3);
    }
    let before = inspect(tmp.path()).unwrap();
    assert!(before.is_clean());
    let mid = &before.segments[1];
    // Damage the 5th record of the middle segment, in its payload.
    let rec_off = 64 + 4 * encoded_len(&model[0]);
    let byte_off = rec_off + cdp_journal::format::RECORD_HEADER_LEN as u64 + 1234;
    let mut bytes = fs::read(&mid.path).unwrap();
    bytes[byte_off as usize] ^= 0x01;
    fs::write(&mid.path, &bytes).unwrap();

    let after = inspect(tmp.path()).unwrap();
    assert_eq!(after.damage.len(), 1, "{:?}", after.damage);
    assert_eq!(after.damage[0].path, mid.path);
    assert_eq!(after.damage[0].offset, rec_off);
    assert!(after.damage[0].what.contains("CRC"));

    // Open only scans the last segment, so it succeeds; reading across the damage fails
    // loudly at the same place instead of skipping records.
    let j = open(tmp.path(), MIB);
    let bad_seq = mid.first_seq.0 + 4;
    let mut reader = j.read_from(Seq(1)).unwrap();
    for s in 1..bad_seq {
        assert_eq!(reader.next().unwrap().unwrap().seq, Seq(s));
    }
    match reader.next() {
        Some(Err(JournalError::Corruption { path, offset, .. })) => {
            assert_eq!(path, mid.path);
            assert_eq!(offset, rec_off);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(reader.next().is_none());
    // Reading after the damaged segment still works.
    check_read(&j, &model, before.segments[2].first_seq.0);
}

/// A damaged segment header in an earlier segment makes open fail with its location.
#[test]
fn corrupt_earlier_header_fails_open() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let j = open(tmp.path(), MIB);
        for i in 0..60u64 {
            j.append(&[record(RecordKind::Write, i, 40_000)]).unwrap();
        }
        j.sync().unwrap();
    }
    let first = seg_files(tmp.path())[0].clone();
    let mut bytes = fs::read(&first).unwrap();
    bytes[20] ^= 0xff;
    fs::write(&first, &bytes).unwrap();
    match Journal::open(tmp.path(), 77, config(MIB)) {
        Err(JournalError::Corruption { path, offset, .. }) => {
            assert_eq!(path, first);
            assert_eq!(offset, 0);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

/// A crash while creating a new segment leaves an empty or half-written header file; open
/// removes it and appends continue in the previous segment.
#[test]
fn half_created_segment_is_removed() {
    for len in [0usize, 10, 63, 64] {
        let (tmp, model, _, _) = small_journal(4);
        let next = tmp.path().join("journal").join(format!("{:016x}.seg", 2));
        let mut junk = vec![0u8; len];
        if len >= 8 {
            junk[..8].copy_from_slice(b"CDPJSEG\0");
        }
        fs::write(&next, &junk).unwrap();
        let (j, report) = Journal::open(tmp.path(), 77, config(MIB)).unwrap();
        assert_eq!(report.removed_segments, 1, "len {len}");
        assert_eq!(report.truncated_bytes, len as u64);
        assert!(!next.exists());
        check_read(&j, &model, 1);
        j.append(&[record(RecordKind::Zero, 1, 1)]).unwrap();
        assert_eq!(j.last_seq(), Seq(5));
    }
}

/// A journal of another group, a second open of the same journal, and bad records are
/// refused with clear errors and change nothing.
#[test]
fn bad_input_is_refused() {
    let (tmp, model, _, _) = small_journal(3);
    assert!(matches!(
        Journal::open(tmp.path(), 78, config(MIB)),
        Err(JournalError::Corruption { .. })
    ));
    let j = open(tmp.path(), MIB);
    assert!(matches!(
        Journal::open(tmp.path(), 77, config(MIB)),
        Err(JournalError::InvalidArgument(_))
    ));
    let bad = [
        RecordIn {
            kind: RecordKind::Write,
            volume: 1,
            source_seq: 0,
            offset: 0,
            length: 5,
            payload: Bytes::from_static(b"abc"),
        },
        RecordIn::range(RecordKind::Trim, 1, u64::MAX, 2),
        RecordIn {
            kind: RecordKind::Zero,
            volume: 1,
            source_seq: 0,
            offset: 0,
            length: 3,
            payload: Bytes::from_static(b"abc"),
        },
        RecordIn {
            kind: RecordKind::Bookmark,
            volume: 1,
            source_seq: 0,
            offset: 0,
            length: 0,
            payload: Bytes::from_static(b"x"),
        },
        RecordIn::write(1, 0, Bytes::from(vec![0u8; 32 * 1024 * 1024 + 1])),
    ];
    for b in bad {
        let batch = vec![record(RecordKind::Write, 1, 10), b];
        assert!(matches!(
            j.append(&batch),
            Err(JournalError::InvalidArgument(_))
        ));
    }
    assert_eq!(j.last_seq(), Seq(3));
    check_read(&j, &model, 1);
}

/// Several appenders and syncers share the journal: every sync covers the caller's own
/// appends, each thread's records stay in its order, a tailing reader sees contiguous
/// seqs while appends run, and everything is there after reopen.
#[test]
fn concurrent_appenders_syncers_and_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let j = Arc::new(open(tmp.path(), MIB));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (j, done) = (j.clone(), done.clone());
        thread::spawn(move || {
            let mut r = j.read_from(Seq(1)).unwrap();
            let mut next = 1u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                for rec in r.by_ref() {
                    assert_eq!(rec.unwrap().seq, Seq(next));
                    next += 1;
                }
                if finished {
                    return next - 1;
                }
                thread::yield_now();
            }
        })
    };
    let threads = 4u32;
    let per_thread = 150u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let j = j.clone();
            thread::spawn(move || {
                for i in 0..per_thread {
                    let rec = RecordIn::write(
                        t,
                        i * 512,
                        payload(t as u64 * 100_000 + i, 512 + (i as usize % 5) * 3000),
                    );
                    let seq = j.append(&[rec]).unwrap();
                    if i % 3 == 0 {
                        let durable = j.sync().unwrap();
                        assert!(durable >= seq);
                        assert!(j.durable_seq() >= seq);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let total = threads as u64 * per_thread;
    assert_eq!(reader.join().unwrap(), total);
    assert_eq!(j.last_seq(), Seq(total));
    assert!(j.sync().unwrap() >= Seq(total));
    drop(j);
    let j = open(tmp.path(), MIB);
    let mut next_offset = vec![0u64; threads as usize];
    let mut n = 0;
    for rec in j.read_from(Seq(1)).unwrap() {
        let rec = rec.unwrap();
        let t = rec.volume as usize;
        assert_eq!(rec.offset, next_offset[t]);
        let i = rec.offset / 512;
        assert!(rec.payload == payload(t as u64 * 100_000 + i, 512 + (i as usize % 5) * 3000));
        next_offset[t] += 512;
        n += 1;
    }
    assert_eq!(n, total);
}

/// Locations from `append_located` and from a reader agree, and `read_at` returns exactly
/// the record appended there, across segment boundaries and compression; a wrong seq or a
/// released segment is an error, not wrong bytes.
#[test]
fn located_records_read_back_singly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = cdp_journal::JournalConfig {
        segment_bytes_max: MIB,
        ..Default::default()
    };
    config.compress_writes = true;
    let (j, _) = Journal::open(tmp.path(), 11, config).unwrap();
    let mut model = Vec::new();
    let mut located = Vec::new();
    let mut locations = Vec::new();
    for b in 0..30u64 {
        let batch: Vec<_> = (0..3)
            .map(|k| {
                let kind = if k == 2 {
                    RecordKind::Zero
                } else {
                    RecordKind::Write
                };
                record(kind, b * 3 + k, 20_000 + (k as usize) * 4096)
            })
            .collect();
        j.append_located(&batch, &mut locations).unwrap();
        assert_eq!(locations.len(), batch.len());
        located.extend(locations.iter().copied());
        model.extend(batch);
    }
    assert!(j.segment_count() > 1);
    let mut reader = j.read_headers_from(Seq(1)).unwrap();
    for (i, want) in model.iter().enumerate() {
        let seq = Seq(i as u64 + 1);
        let r = reader.next().unwrap().unwrap();
        assert_eq!(r.seq, seq);
        assert_eq!(reader.last_location(), Some(located[i]));
        let got = j.read_at(located[i], seq).unwrap();
        assert_eq!(
            (got.kind, got.volume, got.offset, got.length),
            (want.kind, want.volume, want.offset, want.length)
        );
        assert_eq!(got.payload, want.payload, "seq {seq}");
    }
    assert!(
        j.read_at(located[3], Seq(5)).is_err(),
        "wrong seq must fail"
    );
    let mut gone = located[0];
    gone.segment += 1_000;
    assert!(
        j.read_at(gone, Seq(1)).is_err(),
        "missing segment must fail"
    );
}
