//! Fault-injection tests (`--features failpoints`): each injects a fault through the
//! `Env` seam, checks the journal's reaction, then reopens with a clean `Env` and checks
//! that every record `sync` acknowledged is present, byte for byte, against the model.
#![cfg(feature = "failpoints")]

mod common;

use std::path::Path;
use std::sync::Arc;

use cdp_journal::env::{Env, Fault, FaultPoint, Faults};
use cdp_journal::{Journal, JournalError, RecordIn, RecordKind};
use cdp_types::Seq;
use common::*;

const MIB: u64 = 1024 * 1024;

fn open_faulty(dir: &Path, segment_bytes_max: u64) -> (Journal, Arc<Faults>) {
    let faults = Faults::new();
    let (j, _) = Journal::open_with_env(
        dir,
        77,
        config(segment_bytes_max),
        Env::with_faults(faults.clone()),
    )
    .unwrap();
    (j, faults)
}

fn batch(seed: u64, n: u64, len: usize) -> Vec<RecordIn> {
    (0..n)
        .map(|k| record(RecordKind::Write, seed * 1000 + k, len))
        .collect()
}

/// Appends and syncs a few batches, returning the model.
fn prefix(j: &Journal) -> Vec<RecordIn> {
    let mut model = Vec::new();
    for b in 0..3 {
        let recs = batch(b, 4, 700 + b as usize * 5000);
        j.append(&recs).unwrap();
        model.extend(recs);
    }
    assert_eq!(j.sync().unwrap(), Seq(model.len() as u64));
    model
}

/// A failed fdatasync fences the journal: the syncer gets the I/O error, every later
/// append and sync gets `Fenced` and no fsync is retried; after reopen every record
/// acknowledged by an earlier sync is present.
#[test]
fn fsync_failure_fences() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, faults) = open_faulty(tmp.path(), MIB);
    let model = prefix(&j);
    j.append(&batch(9, 2, 100)).unwrap();
    faults.arm(FaultPoint::Sync, Fault::Error(libc::EIO));
    assert!(matches!(j.sync(), Err(JournalError::Io { .. })));
    let syncs = faults.hits(FaultPoint::Sync);
    assert!(j.is_fenced());
    assert!(matches!(j.sync(), Err(JournalError::Fenced)));
    assert!(matches!(
        j.append(&batch(10, 1, 10)),
        Err(JournalError::Fenced)
    ));
    assert_eq!(faults.hits(FaultPoint::Sync), syncs, "fsync was retried");
    assert_eq!(j.durable_seq(), Seq(model.len() as u64));
    drop(j);
    let j = open(tmp.path(), MIB);
    // The unsynced batch may or may not be there; the acknowledged ones must be.
    assert!(j.last_seq() >= Seq(model.len() as u64));
    let all: Vec<_> = j.read_from(Seq(1)).unwrap().map(|r| r.unwrap()).collect();
    for (i, want) in model.iter().enumerate() {
        assert!(all[i].payload == want.payload);
    }
}

/// A short write (disk full midway) or ENOSPC fails the append, truncates back so no
/// partial record stays, and leaves the journal usable; after reopen the journal holds
/// exactly the successful appends.
#[test]
fn short_write_and_enospc_are_undone() {
    for fault in [
        Fault::ShortWrite {
            bytes: 30,
            errno: libc::ENOSPC,
        },
        Fault::ShortWrite {
            bytes: 5000,
            errno: libc::ENOSPC,
        },
        Fault::Error(libc::ENOSPC),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (j, faults) = open_faulty(tmp.path(), MIB);
        let mut model = prefix(&j);
        let size = j.size_bytes();
        faults.arm(FaultPoint::Write, fault);
        assert!(matches!(
            j.append(&batch(20, 3, 3000)),
            Err(JournalError::Io { .. })
        ));
        assert!(!j.is_fenced());
        assert_eq!(j.last_seq(), Seq(model.len() as u64));
        assert_eq!(j.size_bytes(), size);
        let seg = cdp_journal::segment_path(j.dir(), 1);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), size, "{fault:?}");
        let recs = batch(21, 2, 100);
        assert_eq!(j.append(&recs).unwrap(), Seq(model.len() as u64 + 2));
        model.extend(recs);
        j.sync().unwrap();
        check_read(&j, &model, 1);
        drop(j);
        let (j, report) = Journal::open(tmp.path(), 77, config(MIB)).unwrap();
        assert_eq!(report.truncated_bytes, 0);
        check_read(&j, &model, 1);
    }
}

/// If the partial write cannot be truncated away, the journal fences; reopen cuts the
/// torn bytes and keeps every acknowledged record.
#[test]
fn undo_failure_fences_and_recovery_cuts() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, faults) = open_faulty(tmp.path(), MIB);
    let model = prefix(&j);
    faults.arm(
        FaultPoint::Write,
        Fault::ShortWrite {
            bytes: 100,
            errno: libc::EIO,
        },
    );
    faults.arm(FaultPoint::Truncate, Fault::Error(libc::EIO));
    assert!(j.append(&batch(30, 2, 500)).is_err());
    assert!(j.is_fenced());
    assert!(matches!(j.sync(), Err(JournalError::Fenced)));
    drop(j);
    let (j, report) = Journal::open(tmp.path(), 77, config(MIB)).unwrap();
    assert_eq!(report.truncated_bytes, 100);
    check_read(&j, &model, 1);
}

/// A crash in the middle of a batch write (the process dies after `bytes` reached the
/// file) leaves a torn tail at every prefix length; reopen cuts the torn record and keeps
/// every synced record plus the crashed batch's records that reached the file whole.
#[test]
fn crash_mid_write_leaves_cuttable_tail() {
    let recs = batch(40, 3, 900);
    let batch_bytes: u64 = recs.iter().map(encoded_len).sum();
    for bytes in (0..batch_bytes as usize).step_by(37) {
        let tmp = tempfile::tempdir().unwrap();
        let (j, faults) = open_faulty(tmp.path(), MIB);
        let model = prefix(&j);
        faults.arm(FaultPoint::Write, Fault::Crash { bytes });
        assert!(j.append(&recs).is_err());
        assert!(faults.crashed());
        assert!(j.is_fenced());
        drop(j);
        // Records of the crashed batch that reached the file whole are valid (never
        // acknowledged, but harmless); the torn one and anything after it is cut.
        let mut model = model;
        let mut whole = 0u64;
        for r in &recs {
            if whole + encoded_len(r) > bytes as u64 {
                break;
            }
            whole += encoded_len(r);
            model.push(r.clone());
        }
        let (j, report) = Journal::open(tmp.path(), 77, config(MIB)).unwrap();
        assert_eq!(report.truncated_bytes, bytes as u64 - whole);
        assert_eq!(report.last_seq, Seq(model.len() as u64));
        check_read(&j, &model, 1);
    }
}

/// Rollover faults: a failed segment create fails the append without fencing and a later
/// append succeeds; a failed fdatasync of the sealed segment fences.
#[test]
fn rollover_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let (j, faults) = open_faulty(tmp.path(), MIB);
    let mut model = Vec::new();
    // Fill the first segment nearly full.
    for b in 0..15 {
        let recs = batch(50 + b, 1, 64 * 1024);
        j.append(&recs).unwrap();
        model.extend(recs);
    }
    assert_eq!(j.segment_count(), 1);
    let next = batch(70, 2, 64 * 1024);
    faults.arm(FaultPoint::Create, Fault::Error(libc::ENOSPC));
    assert!(matches!(j.append(&next), Err(JournalError::Io { .. })));
    assert!(!j.is_fenced());
    assert_eq!(j.last_seq(), Seq(model.len() as u64));
    j.append(&next).unwrap();
    model.extend(next);
    assert_eq!(j.segment_count(), 2);
    j.sync().unwrap();
    check_read(&j, &model, 1);

    // Now the sealed segment's fdatasync at the next rollover fails.
    for b in 0..20 {
        let recs = batch(80 + b, 1, 64 * 1024);
        faults.arm(FaultPoint::Sync, Fault::Error(libc::EIO));
        match j.append(&recs) {
            Ok(_) => {
                faults.clear();
                model.extend(recs);
            }
            Err(JournalError::Io { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(j.is_fenced());
    assert!(matches!(j.sync(), Err(JournalError::Fenced)));
    drop(j);
    let j = open(tmp.path(), MIB);
    check_read(&j, &model, 1);
}
