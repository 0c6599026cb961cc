//! The time index against the scans it replaces: `last_at_or_before` must give exactly the
//! seq and stamp that a full header scan gives (and the old two-segment scan), for every
//! time around every record, across reopen, retention, consolidation, and with marks files
//! that are missing, damaged, stale or lying.

mod common;

use std::fs;
use std::path::Path;

use cdp_journal::time_marks::TimeMarks;
use cdp_journal::{time_marks_path, Journal, RecordKind};
use cdp_types::{Seq, TimestampNs};
use common::*;
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;

/// The oracle: every (seq, stamp) read back with a full header scan.
fn stamps(j: &Journal) -> Vec<(u64, u64)> {
    j.read_headers_from(j.first_seq())
        .expect("read")
        .map(|r| r.map(|r| (r.seq.0, r.timestamp.0)).expect("record"))
        .collect()
}

/// The definition: the last record stamped ≤ t.
fn by_full_scan(all: &[(u64, u64)], t: u64) -> Option<(Seq, TimestampNs)> {
    all.iter()
        .take_while(|(_, ts)| *ts <= t)
        .last()
        .map(|&(s, ts)| (Seq(s), TimestampNs(ts)))
}

/// The scan `point::resolve_time` did before the index: start one segment before the last
/// one created at or before `t` and read headers until a later stamp. Valid only for
/// journals stamped by `append` (segment creation times come from the same clock).
fn by_old_scan(j: &Journal, t: u64) -> Option<(Seq, TimestampNs)> {
    let segments = j.segment_infos();
    let k = segments
        .iter()
        .rposition(|s| s.created_ns <= t)
        .unwrap_or(0);
    let start = segments
        .get(k.saturating_sub(1))
        .map_or(j.first_seq().0, |s| s.first_seq);
    let mut found = None;
    for r in j.read_headers_from(Seq(start)).expect("read") {
        let r = r.expect("record");
        if r.timestamp.0 > t {
            break;
        }
        found = Some((r.seq, r.timestamp));
    }
    found
}

/// Every time that can change the answer: each stamp, one before and one after, and the
/// extremes.
fn probe_times(all: &[(u64, u64)]) -> Vec<u64> {
    let mut v = vec![0, u64::MAX];
    for &(_, ts) in all {
        v.extend([ts.saturating_sub(1), ts, ts.saturating_add(1)]);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn check_against_full_scan(j: &Journal) {
    let all = stamps(j);
    for t in probe_times(&all) {
        let got = j.last_at_or_before(TimestampNs(t)).expect("lookup");
        assert_eq!(got, by_full_scan(&all, t), "time {t}");
    }
}

/// Appends `batches` batches of `per` small records with stamps rising by `step` ns per
/// batch (so many records share a stamp), replicated-style so the test owns the clock.
fn append_stamped(j: &Journal, batches: u64, per: u64, step: u64, payload_len: usize) {
    let mut locations = Vec::new();
    // The test's clock: the last record's stamp (the journal refuses earlier ones).
    let mut clock = j
        .read_headers_from(Seq(j.last_seq().0.max(1)))
        .expect("read")
        .last()
        .map_or(1_000_000, |r| r.expect("record").timestamp.0);
    for _ in 0..batches {
        let next = j.last_seq().0 + 1;
        let recs: Vec<_> = (0..per)
            .map(|i| record(RecordKind::Write, next + i, payload_len))
            .collect();
        clock += step;
        let ts = vec![clock; per as usize];
        j.append_replicated_located(&recs, Seq(next), &ts, &mut locations)
            .expect("append");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Goal: the index answers exactly what a full scan answers, for random batch sizes,
    /// payload sizes and stamp steps (0 makes long runs of one stamp), on a journal of
    /// many small segments, before and after a reopen (marks from files then).
    #[test]
    fn equals_the_full_scan(
        batches in proptest::collection::vec((1u64..300, 0usize..6000, 0u64..3), 1..12),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        {
            let j = open(tmp.path(), MIB);
            for &(per, len, step) in &batches {
                append_stamped(&j, 1, per, step, len);
                append_stamped(&j, 3, per / 3 + 1, step + 1, len / 4);
            }
            check_against_full_scan(&j);
        }
        let j = open(tmp.path(), MIB);
        check_against_full_scan(&j);
        // And appends after the reopen extend the index.
        append_stamped(&j, 5, 100, 1, 10);
        check_against_full_scan(&j);
    }
}

/// Goal: on a journal stamped by the real clock, the index gives the same answers as the
/// old two-segment scan it replaces (and as the full scan). Method: batches appended with
/// `append` across many segments, probes around every stamp.
#[test]
fn equals_the_old_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let j = open(tmp.path(), MIB);
    for i in 0..400u64 {
        let recs: Vec<_> = (0..(i % 7 + 1))
            .map(|k| record(RecordKind::Write, i * 10 + k, 700 + (i as usize % 5) * 1000))
            .collect();
        j.append(&recs).expect("append");
    }
    assert!(j.segment_count() > 3, "{} segments", j.segment_count());
    let all = stamps(&j);
    for t in probe_times(&all) {
        let got = j.last_at_or_before(TimestampNs(t)).expect("lookup");
        assert_eq!(got, by_full_scan(&all, t), "time {t} against the full scan");
        if t != u64::MAX {
            assert_eq!(got, by_old_scan(&j, t), "time {t} against the old scan");
        }
    }
}

fn sealed_indexes(j: &Journal) -> Vec<u64> {
    let infos = j.segment_infos();
    infos[..infos.len() - 1].iter().map(|s| s.index).collect()
}

fn jdir(dir: &Path) -> std::path::PathBuf {
    dir.join("journal")
}

/// Goal (rule 4): a missing, torn, damaged, foreign or stale marks file is detected and
/// the segment is scanned instead, with the same answers; the file is then written again.
/// Method: five kinds of damage to five sealed segments' files, reopen, compare with the
/// full scan, and check each file decodes again and describes its own segment.
#[test]
fn damaged_marks_files_fall_back_to_scanning() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let j = open(tmp.path(), MIB);
        append_stamped(&j, 120, 200, 3, 300);
        assert!(j.segment_count() >= 7, "{} segments", j.segment_count());
    }
    let dir = jdir(tmp.path());
    let sealed = {
        let j = open(tmp.path(), MIB);
        sealed_indexes(&j)
    };
    for &i in &sealed {
        assert!(time_marks_path(&dir, i).is_file(), "segment {i} has marks");
    }
    let path = |k: usize| time_marks_path(&dir, sealed[k]);
    // 0: missing. 1: a flipped byte (CRC). 2: torn. 3: another segment's file.
    // 4: valid CRC, but taken when the segment was shorter (stale length).
    fs::remove_file(path(0)).unwrap();
    let mut b = fs::read(path(1)).unwrap();
    b[70] ^= 1;
    fs::write(path(1), b).unwrap();
    let b = fs::read(path(2)).unwrap();
    fs::write(path(2), &b[..b.len() / 2]).unwrap();
    fs::copy(path(4), path(3)).unwrap();
    let mut t = TimeMarks::decode(&fs::read(path(4)).unwrap()).unwrap();
    t.segment_bytes -= 1;
    fs::write(path(4), t.encode()).unwrap();

    let j = open(tmp.path(), MIB);
    check_against_full_scan(&j);
    let infos = j.segment_infos();
    for (k, index) in sealed.iter().enumerate().take(5) {
        let t = TimeMarks::decode(&fs::read(path(k)).unwrap()).expect("rewritten");
        let info = infos.iter().find(|s| s.index == *index).unwrap();
        assert_eq!(t.segment_index, info.index);
        assert_eq!(t.first_seq, info.first_seq);
        assert_eq!(t.segment_bytes, info.bytes);
    }
    // The active segment never has a marks file.
    assert!(!time_marks_path(&dir, infos[infos.len() - 1].index).exists());
}

/// Goal: a marks file that passes every check but names the wrong records (a lie the CRC
/// cannot catch) still gives the right answers: the lookup finds that the bytes at a mark
/// are not its record and scans the segment. Method: shift every mark but the first by one
/// seq, re-encode with a valid CRC, reopen, compare with the full scan; the file is left as
/// written (it was loaded, not rebuilt).
#[test]
fn lying_marks_are_caught_at_lookup() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let j = open(tmp.path(), MIB);
        append_stamped(&j, 30, 300, 2, 200);
    }
    let dir = jdir(tmp.path());
    let sealed = sealed_indexes(&open(tmp.path(), MIB));
    let path = time_marks_path(&dir, sealed[1]);
    let mut t = TimeMarks::decode(&fs::read(&path).unwrap()).unwrap();
    assert!(t.marks.len() > 2);
    for m in &mut t.marks[1..] {
        m.seq += 1;
    }
    let lie = t.encode();
    fs::write(&path, &lie).unwrap();
    let j = open(tmp.path(), MIB);
    check_against_full_scan(&j);
    assert_eq!(fs::read(&path).unwrap(), lie, "the file was used as it was");
}

/// Goal: retention and consolidation keep the index right: released segments leave it
/// (and their files go), rewritten segments' marks follow their records. Method: release
/// the first segments, consolidate the next ones dropping every payload, compare with the
/// full scan before and after a reopen.
#[test]
fn retention_and_consolidation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = jdir(tmp.path());
    let j = open(tmp.path(), MIB);
    append_stamped(&j, 40, 200, 5, 900);
    let sealed = sealed_indexes(&j);
    assert!(sealed.len() >= 6);
    let through = j.segment_infos()[2].first_seq - 1;
    j.release_through(Seq(through)).expect("release");
    assert!(!time_marks_path(&dir, sealed[0]).exists());
    assert!(!time_marks_path(&dir, sealed[1]).exists());
    check_against_full_scan(&j);
    for &i in &sealed[2..5] {
        let rewrite = j
            .consolidate_segment(i, &mut |_| true)
            .expect("consolidate");
        assert!(rewrite.is_some(), "segment {i} rewritten");
    }
    check_against_full_scan(&j);
    drop(j);
    let j = open(tmp.path(), MIB);
    check_against_full_scan(&j);
    let marks = TimeMarks::decode(&fs::read(time_marks_path(&dir, sealed[3])).unwrap())
        .expect("marks of a rewritten segment");
    let info = j
        .segment_infos()
        .into_iter()
        .find(|s| s.index == sealed[3])
        .unwrap();
    assert_eq!(marks.segment_bytes, info.bytes);
}

/// A journal of one big active segment: `mib` MiB of 4 KiB writes, a sync after every
/// 4 MiB (so tail checkpoints are written), then `unsynced` more records without a sync.
fn one_big_segment(dir: &Path, mib: u64, unsynced: u64) -> u64 {
    let j = open(dir, 256 * MIB);
    let per_sync = 4 * MIB / 4096;
    for k in 0..mib / 4 {
        let recs: Vec<_> = (0..per_sync)
            .map(|i| record(RecordKind::Write, k * per_sync + i, 4096))
            .collect();
        for chunk in recs.chunks(256) {
            j.append(chunk).expect("append");
        }
        j.sync().expect("sync");
    }
    for i in 0..unsynced {
        j.append(&[record(RecordKind::Write, 1_000_000 + i, 4096)])
            .expect("append");
    }
    assert_eq!(j.segment_count(), 1);
    j.last_seq().0
}

fn active_marks_path(dir: &Path) -> std::path::PathBuf {
    time_marks_path(&jdir(dir), 1)
}

/// Goal: with a tail checkpoint, opening reads only the end of the last segment, and finds
/// exactly the records a full scan finds. Method: 80 MiB in one segment, synced every
/// 4 MiB, 300 records unsynced; reopen and compare the report, the records and lookups.
#[test]
fn tail_checkpoint_bounds_the_open_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let last = one_big_segment(tmp.path(), 80, 300);
    assert!(active_marks_path(tmp.path()).is_file());
    let (j, report) = Journal::open(tmp.path(), 77, config(256 * MIB)).expect("open");
    assert_eq!(report.last_seq, Seq(last));
    assert_eq!(report.truncated_bytes, 0);
    let bound = cdp_journal::limits::TAIL_CHECKPOINT_BYTES + 8 * MIB;
    assert!(
        report.scanned_bytes < bound,
        "scanned {} bytes of an 80 MiB segment",
        report.scanned_bytes
    );
    let all = stamps(&j);
    assert_eq!(all.len() as u64, last);
    check_against_full_scan(&j);
    // Appends continue at the right seq with stamps not going back.
    let next = j
        .append(&[record(RecordKind::Zero, 5, 4096)])
        .expect("append");
    assert_eq!(next, Seq(last + 1));
    check_against_full_scan(&j);
}

/// Goal (rule 4): a tail checkpoint that is damaged, or valid by its CRC but wrong (its
/// last record not where it says, or its end not a record boundary), is never trusted:
/// the whole segment is scanned and nothing is cut. Method: three such files in turn,
/// each followed by a reopen that must find every record and cut nothing.
#[test]
fn bad_tail_checkpoints_are_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let last = one_big_segment(tmp.path(), 40, 10);
    let path = active_marks_path(tmp.path());
    let good = fs::read(&path).unwrap();
    let t = TimeMarks::decode(&good).unwrap();
    let mut flipped = good.clone();
    flipped[90] ^= 4;
    let mut off_by_one_record = t.clone();
    off_by_one_record.last_record_offset -= 4096 + 64;
    let mut mid_record = t.clone();
    mid_record.segment_bytes -= 100;
    mid_record.last_record_offset -= 100;
    let mut past_the_end = t.clone();
    past_the_end.segment_bytes = 1 << 40;
    for (what, bytes) in [
        ("flipped", flipped),
        ("off by one record", off_by_one_record.encode()),
        ("mid record", mid_record.encode()),
        ("past the end", past_the_end.encode()),
    ] {
        fs::write(&path, bytes).unwrap();
        let seg_len = fs::metadata(jdir(tmp.path()).join("0000000000000001.seg"))
            .unwrap()
            .len();
        let (j, report) = Journal::open(tmp.path(), 77, config(256 * MIB)).expect("open");
        assert_eq!(report.last_seq, Seq(last), "{what}");
        assert_eq!(report.truncated_bytes, 0, "{what}");
        assert_eq!(report.scanned_bytes, seg_len - 64, "{what}: a full scan");
        assert_eq!(stamps(&j).len() as u64, last, "{what}");
    }
}

/// Goal: a torn write after the checkpoint is still cut, exactly where a full scan would
/// cut it. Method: tear the last record in half, reopen, compare with the records before.
#[test]
fn torn_tail_after_a_checkpoint_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let last = one_big_segment(tmp.path(), 40, 10);
    let seg = jdir(tmp.path()).join("0000000000000001.seg");
    let len = fs::metadata(&seg).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 2000).unwrap();
    drop(f);
    let (j, report) = Journal::open(tmp.path(), 77, config(256 * MIB)).expect("open");
    assert_eq!(report.last_seq, Seq(last - 1));
    assert_eq!(report.truncated_bytes, 4096 + 64 - 2000);
    assert!(report.tail_cut.is_some());
    assert_eq!(stamps(&j).len() as u64, last - 1);
    check_against_full_scan(&j);
}

/// Goal: damage in a sealed segment whose marks file is missing does not stop the open (as
/// before the index existed): times before the damage resolve, a lookup that has to read
/// the damaged record reports `Corruption`. Method: flip a payload byte in the middle of
/// the second segment, remove its marks file, reopen, probe times on both sides.
#[test]
fn damaged_sealed_segment_without_marks_still_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let all = {
        let j = open(tmp.path(), MIB);
        append_stamped(&j, 40, 100, 2, 500);
        assert!(j.segment_count() >= 3, "{} segments", j.segment_count());
        stamps(&j)
    };
    let dir = jdir(tmp.path());
    let seg = dir.join("0000000000000002.seg");
    let mut b = fs::read(&seg).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x10;
    fs::write(&seg, &b).unwrap();
    fs::remove_file(time_marks_path(&dir, 2)).unwrap();
    let (j, _) = Journal::open(tmp.path(), 77, config(MIB)).expect("open despite the damage");
    let first = all[0].1;
    assert_eq!(
        j.last_at_or_before(TimestampNs(first))
            .expect("before the damage"),
        by_full_scan(&all, first)
    );
    let last = all[all.len() - 1].1;
    assert!(
        !time_marks_path(&dir, 2).exists(),
        "no marks file for a damaged segment"
    );
    // A time inside segment 2, after the damage, must read the damaged record.
    let infos = j.segment_infos();
    let in_two = all
        .iter()
        .find(|(s, _)| *s >= infos[1].first_seq + (infos[2].first_seq - infos[1].first_seq) * 3 / 4)
        .unwrap()
        .1;
    let got = j.last_at_or_before(TimestampNs(in_two));
    assert!(
        matches!(got, Err(cdp_journal::JournalError::Corruption { .. })),
        "{got:?}"
    );
    // After the damaged segment, marks from the other files answer directly.
    assert_eq!(
        j.last_at_or_before(TimestampNs(last)).expect("after"),
        by_full_scan(&all, last)
    );
}
