//! Retention against a model: releasing whole segments from the front, reading and
//! appending afterwards, reopening a journal whose first segment index is not 1, and a
//! crash between two unlinks (a missing prefix).

mod common;

use std::fs;

use cdp_journal::{inspect, Journal, RecordKind, RetentionPolicy};
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

fn disk_bytes(dir: &std::path::Path) -> u64 {
    seg_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// Checks `first..=last` of the model read back byte for byte (model[i] has seq i+1).
fn check_tail(j: &Journal, model: &[cdp_journal::RecordIn]) {
    let first = j.first_seq().0;
    let mut reader = j.read_from(j.first_seq()).unwrap();
    for seq in first..=model.len() as u64 {
        let got = reader.next().expect("record").expect("readable");
        let want = &model[(seq - 1) as usize];
        assert_eq!(got.seq, Seq(seq));
        assert_eq!(got.source_seq, want.source_seq);
        assert!(got.payload == want.payload, "payload of seq {seq}");
    }
    assert!(reader.next().is_none());
}

/// Releasing through a seq deletes exactly the whole segments at or below it, never the
/// active one; reads from the new first seq and reopen still work, appends continue.
#[test]
fn release_then_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    let j = open(tmp.path(), MIB);
    for i in 0..40u64 {
        let r = record(RecordKind::Write, i + 1, 200 * 1024);
        j.append(std::slice::from_ref(&r)).unwrap();
        model.push(r);
    }
    j.sync().unwrap();
    let firsts = j.segment_first_seqs();
    assert!(firsts.len() >= 5, "{firsts:?}");
    // Through a seq inside segment 3: segments 1 and 2 go, 3 stays.
    let through = Seq(firsts[2].0 + 1);
    let released = j.release_through(through).unwrap();
    assert_eq!(released.segments, 2);
    assert_eq!(j.first_seq(), firsts[2]);
    assert_eq!(released.first_seq, firsts[2]);
    assert_eq!(j.size_bytes(), disk_bytes(tmp.path()));
    check_tail(&j, &model);
    // Reading from a released seq starts at the first kept one (clamped), as before.
    assert_eq!(j.read_from(Seq(1)).unwrap().next_seq(), firsts[2]);
    // Everything: only the active segment remains.
    let released = j.release_through(j.last_seq()).unwrap();
    assert_eq!(j.segment_count(), 1);
    assert!(released.segments >= 2);
    check_tail(&j, &model);
    drop(j);

    let j = open(tmp.path(), MIB);
    assert_eq!(j.first_seq(), *firsts.last().unwrap());
    assert_eq!(j.last_seq(), Seq(40));
    check_tail(&j, &model);
    for i in 40..60u64 {
        let r = record(RecordKind::Write, i + 1, 200 * 1024);
        j.append(std::slice::from_ref(&r)).unwrap();
        model.push(r);
    }
    j.sync().unwrap();
    check_tail(&j, &model);
    drop(j);
    let report = inspect(tmp.path()).unwrap();
    assert!(report.is_clean(), "{:?}", report.damage);
    assert_eq!(report.last_seq, Seq(60));
}

/// A crash after some unlinks of a release leaves a missing prefix; it reopens cleanly.
/// A gap in the middle is still reported as damage.
#[test]
fn missing_prefix_reopens_gap_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    {
        let j = open(tmp.path(), MIB);
        for i in 0..30u64 {
            let r = record(RecordKind::Write, i + 1, 300 * 1024);
            j.append(std::slice::from_ref(&r)).unwrap();
            model.push(r);
        }
        j.sync().unwrap();
    }
    let files = seg_files(tmp.path());
    assert!(files.len() >= 5);
    fs::remove_file(&files[0]).unwrap();
    fs::remove_file(&files[1]).unwrap();
    {
        let j = open(tmp.path(), MIB);
        check_tail(&j, &model);
        assert!(inspect(tmp.path()).unwrap().is_clean());
    }
    fs::remove_file(&files[3]).unwrap();
    assert!(Journal::open(tmp.path(), 77, config(MIB)).is_err());
    assert!(!inspect(tmp.path()).unwrap().is_clean());
}

/// A reader created before a release that overtook it gets a clear error, not garbage.
#[test]
fn reader_behind_release_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let j = open(tmp.path(), MIB);
    for i in 0..20u64 {
        j.append(&[record(RecordKind::Write, i + 1, 300 * 1024)])
            .unwrap();
    }
    let mut reader = j.read_from(Seq(1)).unwrap();
    j.release_through(Seq(10)).unwrap();
    assert!(j.first_seq() > Seq(1));
    let err = reader.next().unwrap().unwrap_err();
    assert!(err.to_string().contains("released"), "{err}");
}

/// First record timestamp follows the first kept segment.
#[test]
fn first_record_timestamp() {
    let tmp = tempfile::tempdir().unwrap();
    let j = open(tmp.path(), MIB);
    assert_eq!(j.first_record_timestamp().unwrap(), None);
    j.append(&[record(RecordKind::Write, 1, 4096)]).unwrap();
    let first = j.read_from(Seq(1)).unwrap().next().unwrap().unwrap();
    assert_eq!(j.first_record_timestamp().unwrap(), Some(first.timestamp.0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Random appends interleaved with retention passes: the journal never drops a record
    /// above `safe` or the active segment, stays within capacity plus one segment when
    /// everything is safe, and always reads back the model's tail and reopens to it.
    #[test]
    fn model_with_retention(
        ops in proptest::collection::vec((1usize..6, 1u64..400_000, any::<bool>()), 1..40),
        capacity_mib in 2u64..6,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut model = Vec::new();
        let policy = RetentionPolicy { capacity_bytes: capacity_mib * MIB, window_ns: None };
        let mut j = open(tmp.path(), MIB);
        for (n, (count, len, all_safe)) in ops.iter().enumerate() {
            for k in 0..*count {
                let r = record(RecordKind::Write, (n * 10 + k) as u64 + 1, *len as usize);
                j.append(std::slice::from_ref(&r)).unwrap();
                model.push(r);
            }
            j.sync().unwrap();
            let safe = if *all_safe { j.last_seq() } else { Seq(j.last_seq().0 / 2) };
            let plan = j.retention_plan(&policy, safe, 0);
            if let Some(through) = plan.through {
                prop_assert!(through <= safe);
                let released = j.release_through(through).unwrap();
                prop_assert_eq!(released.segments, plan.segments);
                prop_assert_eq!(released.bytes, plan.bytes);
                // Exactly the records through `through` went, nothing above `safe`.
                prop_assert_eq!(released.first_seq, Seq(through.0 + 1));
            }
            if *all_safe {
                prop_assert!(j.size_bytes() <= policy.capacity_bytes + MIB + 400_000);
            }
            prop_assert_eq!(j.size_bytes(), disk_bytes(tmp.path()));
            check_tail(&j, &model);
            if n % 7 == 6 {
                drop(j);
                j = open(tmp.path(), MIB);
                check_tail(&j, &model);
            }
        }
    }
}

/// `seal_active` seals a segment holding records (it then reads back and survives reopen,
/// and the next record starts the new active segment) and does nothing to an empty one.
#[test]
fn seal_active_seals_only_a_segment_with_records() {
    let tmp = tempfile::tempdir().unwrap();
    let j = open(tmp.path(), 8 * MIB);
    assert!(!j.seal_active().unwrap(), "an empty active segment stays");
    let mut model = Vec::new();
    for i in 0..3u64 {
        let r = record(RecordKind::Write, i + 1, 4096);
        j.append(std::slice::from_ref(&r)).unwrap();
        model.push(r);
    }
    assert!(j.seal_active().unwrap());
    assert_eq!(j.sealed_segments(), vec![(1, Seq(3))]);
    assert!(!j.seal_active().unwrap(), "the new active segment is empty");
    let r = record(RecordKind::Write, 4, 4096);
    j.append(std::slice::from_ref(&r)).unwrap();
    model.push(r);
    j.sync().unwrap();
    assert_eq!(j.segment_first_seqs(), vec![Seq(1), Seq(4)]);
    drop(j);
    let j = open(tmp.path(), 8 * MIB);
    assert_eq!(j.sealed_segments(), vec![(1, Seq(3))]);
    check_tail(&j, &model);
}
