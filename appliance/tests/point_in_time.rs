//! Model-based property test of point-in-time images: random writes, trims, zeroes and
//! bookmarks on two volumes of a real group (journal, undo stream, distribution thread),
//! logged rollbacks to random points, restarts, consolidation passes that keep only some
//! points; every image that opens and every rolled-back replica is compared byte for byte
//! with the model, and kept points must open.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_appliance::bookmark::{BookmarkPayload, Consistency};
use cdp_appliance::config::GroupConfig;
use cdp_appliance::group::Group;
use cdp_journal::{JournalConfig, RecordIn, RecordKind};
use cdp_types::Seq;
use proptest::prelude::*;

/// Not a multiple of the index's 4 KiB block, and above its 256 KiB fine-record limit.
const VOLUME_BYTES: u64 = 640 * 1024 + 512;
const VOLUMES: [&str; 2] = ["v0", "v1"];

#[derive(Clone, Debug)]
enum Op {
    Change {
        volume: usize,
        kind: RecordKind,
        offset: u64,
        length: u64,
        seed: u64,
    },
    /// A bookmark, marked to keep through consolidation or not.
    Bookmark(bool),
    /// A consolidation pass (policy: one point per second, nothing young kept).
    Consolidate,
    /// Logged access: hold the replica at this fraction of the journal, check it, release.
    RollTo(f64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let change = (
        0..VOLUMES.len(),
        prop_oneof![
            6 => Just(RecordKind::Write),
            1 => Just(RecordKind::Trim),
            1 => Just(RecordKind::Zero)
        ],
        0..VOLUME_BYTES,
        prop_oneof![4 => 1u64..9000, 1 => 1u64..300_000],
        any::<u64>(),
    )
        .prop_map(|(volume, kind, offset, length, seed)| Op::Change {
            volume,
            kind,
            offset,
            length: length.min(VOLUME_BYTES - offset),
            seed,
        });
    prop_oneof![
        12 => change,
        2 => any::<bool>().prop_map(Op::Bookmark),
        1 => Just(Op::Consolidate),
        1 => (0.0f64..1.0).prop_map(Op::RollTo),
        1 => Just(Op::Restart),
    ]
}

fn payload(seed: u64, len: usize) -> Bytes {
    let mut x = seed | 1;
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

/// Every change journaled, with its seq: the volumes at point T are these replayed to T.
#[derive(Default)]
struct Model {
    changes: Vec<(u64, usize, RecordIn)>,
}

impl Model {
    fn at(&self, seq: u64) -> Vec<Vec<u8>> {
        let mut volumes = vec![vec![0u8; VOLUME_BYTES as usize]; VOLUMES.len()];
        for (s, v, r) in &self.changes {
            if *s > seq {
                break;
            }
            let range = r.offset as usize..(r.offset + r.length) as usize;
            match r.kind {
                RecordKind::Write => volumes[*v][range].copy_from_slice(&r.payload),
                _ => volumes[*v][range].fill(0),
            }
        }
        volumes
    }
}

/// From TOML, so every setting not named here takes its documented default.
fn group_config(dir: &Path, compress: bool) -> GroupConfig {
    let mut text = format!(
        "name = \"g\"\njournal_capacity_bytes = {}\njournal_compress = {compress}\n",
        1u64 << 30
    );
    // Every point older than 0 s is consolidated to one per second when a pass runs; the
    // automatic pass is an hour away, so only `Op::Consolidate` runs one.
    text += "[consolidation]\nkeep_all_s = 0\ninterval_s = 3600\n[[consolidation.tier]]\nevery_s = 1\nfor_s = 1\n";
    for name in VOLUMES {
        text += &format!(
            "[[volume]]\nname = \"{name}\"\nsize = {VOLUME_BYTES}\nreplica = {:?}\n",
            dir.join(format!("{name}.replica"))
        );
    }
    toml::from_str(&text).expect("group config")
}

fn open(dir: &Path, compress: bool) -> Arc<Group> {
    let journal = JournalConfig {
        segment_bytes_max: 1 << 20,
        ..Default::default()
    };
    Group::open(
        dir,
        &group_config(dir, compress),
        journal,
        Duration::from_millis(1),
        Duration::ZERO,
    )
    .expect("open group")
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Checks the image at `at` against the model. A point consolidation dropped is refused
/// (and reported as `Ok(false)`) unless `must_open`.
fn check_image_if_kept(
    group: &Group,
    model: &Model,
    at: u64,
    must_open: bool,
) -> Result<bool, TestCaseError> {
    match group.pin_point(Seq(at)) {
        Ok(pin) => {
            group.unpin(pin);
            check_image(group, model, at)?;
            Ok(true)
        }
        Err(e) if !must_open && e.to_string().contains("consolidated away") => Ok(false),
        Err(e) => Err(TestCaseError::fail(format!("pin seq {at}: {e}"))),
    }
}

fn check_image(group: &Group, model: &Model, at: u64) -> Result<(), TestCaseError> {
    let pin = group
        .pin_point(Seq(at))
        .map_err(|e| TestCaseError::fail(format!("pin seq {at}: {e}")))?;
    let want = model.at(at);
    for (i, name) in VOLUMES.iter().enumerate() {
        let volume = group.volume(name).expect("volume");
        let mut got = vec![0u8; VOLUME_BYTES as usize];
        // Odd-sized reads at odd offsets, as clients issue them.
        let mut pos = 0usize;
        let mut step = 3000usize;
        while pos < got.len() {
            let end = (pos + step).min(got.len());
            group
                .read_at_point(&volume, Seq(at), pos as u64, &mut got[pos..end])
                .map_err(|e| TestCaseError::fail(format!("read seq {at}: {e}")))?;
            pos = end;
            step = step * 7 % 70_001 + 1;
        }
        // And the whole volume in one read, which may be split across threads.
        let mut whole = vec![0u8; VOLUME_BYTES as usize];
        group
            .read_at_point(&volume, Seq(at), 0, &mut whole)
            .map_err(|e| TestCaseError::fail(format!("read seq {at}: {e}")))?;
        for (how, got) in [("in pieces", &got), ("whole", &whole)] {
            if let Some(off) = first_difference(got, &want[i]) {
                group.unpin(pin);
                return Err(TestCaseError::fail(format!(
                    "image at seq {at}, volume {name}, read {how}: first difference at byte {off}"
                )));
            }
        }
    }
    group.unpin(pin);
    Ok(())
}

fn check_replicas(dir: &Path, model: &Model, at: u64, what: &str) -> Result<(), TestCaseError> {
    let want = model.at(at);
    for (i, name) in VOLUMES.iter().enumerate() {
        let got = std::fs::read(dir.join(format!("{name}.replica"))).expect("read replica");
        if let Some(off) = first_difference(&got[..VOLUME_BYTES as usize], &want[i]) {
            return Err(TestCaseError::fail(format!(
                "{what}: replica {name} differs from seq {at} at byte {off}"
            )));
        }
    }
    Ok(())
}

fn wait_distributed(group: &Group) {
    let deadline = Instant::now() + Duration::from_secs(30);
    group.urge_distribution();
    while group.distributed_seq() < group.last_seq() {
        assert!(Instant::now() < deadline, "distribution did not catch up");
        group.urge_distribution();
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn run(ops: Vec<Op>, points: Vec<f64>, compress: bool) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut group = open(dir, compress);
    let mut model = Model::default();
    let mut bookmarks = Vec::new();
    let mut kept_bookmarks = Vec::new();
    for op in ops {
        match op {
            Op::Change {
                volume,
                kind,
                offset,
                length,
                seed,
            } => {
                let v = group.volume(VOLUMES[volume]).expect("volume");
                let record = match kind {
                    RecordKind::Write => {
                        RecordIn::write(v.id, offset, payload(seed, length as usize))
                    }
                    kind => RecordIn::range(kind, v.id, offset, length),
                };
                group
                    .append(&v, std::slice::from_ref(&record))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.changes.push((group.last_seq().0, volume, record));
            }
            Op::Bookmark(keep) => {
                let name = format!("bm{}", bookmarks.len());
                let b = group
                    .create_bookmark(
                        BookmarkPayload {
                            name,
                            consistency: Consistency::Crash,
                            freeze_window_ms: 0,
                            keep,
                        },
                        None,
                    )
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                bookmarks.push(b.seq);
                if keep {
                    kept_bookmarks.push(b.seq);
                }
            }
            Op::Consolidate => {
                // Whole-volume writes seal the journal's segment (only sealed ones are
                // rewritten) and hide most earlier bytes, so some payloads can go.
                for (i, name) in VOLUMES.iter().enumerate() {
                    let v = group.volume(name).expect("volume");
                    let seed = model.changes.len() as u64 * 7919 + i as u64;
                    let record = RecordIn::write(v.id, 0, payload(seed, VOLUME_BYTES as usize));
                    group
                        .append(&v, std::slice::from_ref(&record))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model.changes.push((group.last_seq().0, i, record));
                }
                wait_distributed(&group);
                let before = group.status();
                let report = group
                    .consolidate()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let after = group.status();
                prop_assert_eq!(
                    before.journal_bytes + before.undo_bytes - report.bytes_freed,
                    after.journal_bytes + after.undo_bytes
                );
                // Every kept bookmark and the oldest point still open, exactly.
                for &at in kept_bookmarks.iter().chain([&group.oldest_point().0]) {
                    check_image_if_kept(&group, &model, at, true)?;
                }
            }
            Op::RollTo(fraction) => {
                let last = group.last_seq().0;
                let at = (fraction * last as f64) as u64;
                // Logged access goes through the same refusal as any image.
                let Ok(pin) = group.pin_point(Seq(at)) else {
                    continue;
                };
                group.unpin(pin);
                group
                    .hold_replica(Seq(at))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_replicas(dir, &model, at, "logged access")?;
                check_image(&group, &model, at)?;
                // Later points now lay journal records over the rolled-back replica; in
                // consolidated history only the kept records are left to do it.
                for &later in bookmarks.iter().filter(|&&b| b > at) {
                    check_image_if_kept(&group, &model, later, kept_bookmarks.contains(&later))?;
                }
                group.release_replica();
            }
            Op::Restart => {
                group.stop();
                drop(group);
                group = open(dir, compress);
            }
        }
    }
    let last = group.last_seq().0;
    for at in bookmarks
        .iter()
        .copied()
        .chain(points.iter().map(|f| (f * last as f64) as u64))
        .chain([0, last])
    {
        let must_open = kept_bookmarks.contains(&at) || at == last;
        check_image_if_kept(&group, &model, at, must_open)?;
    }
    check_image(&group, &model, group.oldest_point().0)?;
    // Rolled back and carried forward again, the replica ends as production.
    wait_distributed(&group);
    check_replicas(dir, &model, last, "after distribution")?;
    for at in [0, last / 2, last] {
        check_image_if_kept(&group, &model, at, at == last)?;
    }
    group.stop();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn images_equal_the_model_at_every_point(
        ops in proptest::collection::vec(op(), 1..50),
        points in proptest::collection::vec(0.0f64..=1.0, 1..6),
        compress in any::<bool>(),
    ) {
        run(ops, points, compress)?;
    }
}

/// A point older than the journal's window, or past its end, is refused with a reason.
#[test]
fn points_outside_the_window_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let group = open(tmp.path(), false);
    let v = group.volume("v0").expect("volume");
    group
        .append(&v, &[RecordIn::write(v.id, 0, payload(1, 4096))])
        .expect("append");
    let err = group
        .pin_point(Seq(5))
        .expect_err("past the end")
        .to_string();
    assert!(err.contains("past the journal's last record"), "{err}");
    group.stop();
}
