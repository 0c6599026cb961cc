//! Archive a real journal to a `file://` archive and restore from the archive alone, at
//! bookmarks, seqs and times, against a model of every volume; refusals and damage.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use cdp_archive::{
    restore, verify, ArchiveError, ArchiveGroup, ArchiveTarget, Archiver, Point, S3Settings,
    UploadLimits, VolumeEntry,
};
use cdp_journal::{Journal, JournalConfig, RecordIn, RecordKind};
use rand::{Rng, SeedableRng};

const VOLUME_BYTES: u64 = 4 << 20;
const GROUP_ID: u64 = 0x5eed_0001;

struct Model {
    volumes: HashMap<u32, Vec<u8>>,
}

impl Model {
    fn apply(&mut self, r: &RecordIn) {
        let v = self.volumes.get_mut(&r.volume).expect("volume");
        let (a, b) = (r.offset as usize, (r.offset + r.length) as usize);
        match r.kind {
            RecordKind::Write => v[a..b].copy_from_slice(&r.payload),
            RecordKind::Zero | RecordKind::Trim => v[a..b].fill(0),
            _ => {}
        }
    }
}

fn group() -> ArchiveGroup {
    ArchiveGroup {
        name: "g1".into(),
        group_id: GROUP_ID,
        archiver_id: 7,
        volumes: vec![
            VolumeEntry {
                id: 1,
                name: "disk-a".into(),
                size_bytes: VOLUME_BYTES,
            },
            VolumeEntry {
                id: 2,
                name: "disk-b".into(),
                size_bytes: VOLUME_BYTES,
            },
        ],
    }
}

fn target(dir: &Path) -> ArchiveTarget {
    let url = format!("file://{}", dir.display());
    ArchiveTarget::open(&url, &S3Settings::default()).expect("open target")
}

/// Appends seeded writes, zeroes and bookmarks; returns the snapshots taken at each
/// bookmark and at some seqs, with their times.
struct Run {
    journal: Journal,
    at_bookmark: Vec<(String, HashMap<u32, Vec<u8>>)>,
    at_seq: Vec<(u64, u64, HashMap<u32, Vec<u8>>)>,
}

fn write_history(dir: &Path, seed: u64, batches: usize) -> Run {
    // Uncompressed journal payloads, so the archive's own zstd has something to save.
    let config = JournalConfig {
        segment_bytes_max: 1 << 20,
        compress_writes: false,
    };
    let (journal, _) = Journal::open(dir, GROUP_ID, config).expect("open journal");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = Model {
        volumes: [
            (1, vec![0u8; VOLUME_BYTES as usize]),
            (2, vec![0u8; VOLUME_BYTES as usize]),
        ]
        .into_iter()
        .collect(),
    };
    let mut run = Run {
        journal,
        at_bookmark: Vec::new(),
        at_seq: Vec::new(),
    };
    for batch in 0..batches {
        let mut recs = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            let volume = rng.gen_range(1..=2u32);
            let len = rng.gen_range(1..=16u64) * 4096;
            let offset = rng.gen_range(0..(VOLUME_BYTES - len) / 4096) * 4096;
            let r = if rng.gen_bool(0.1) {
                RecordIn::range(RecordKind::Zero, volume, offset, len)
            } else {
                // Half compressible, half random: the archive's zstd sees both.
                let mut data = vec![(batch % 251) as u8; len as usize];
                rng.fill(&mut data[..len as usize / 2]);
                RecordIn::write(volume, offset, Bytes::from(data))
            };
            model.apply(&r);
            recs.push(r);
        }
        let last = run.journal.append(&recs).expect("append");
        if batch % 37 == 5 {
            let name = format!("bm-{batch}");
            run.journal
                .append(&[RecordIn::bookmark(&name)])
                .expect("bookmark");
            run.at_bookmark.push((name, model.volumes.clone()));
        }
        if batch % 53 == 11 {
            let ts = run
                .journal
                .read_headers_from(last)
                .expect("read")
                .next()
                .expect("record")
                .expect("ok")
                .timestamp
                .0;
            run.at_seq.push((last.0, ts, model.volumes.clone()));
        }
    }
    run.journal.sync().expect("sync");
    run
}

fn check_restored(dir: &Path, want: &HashMap<u32, Vec<u8>>, what: &str) {
    for (id, name) in [(1u32, "disk-a"), (2, "disk-b")] {
        let got = std::fs::read(dir.join(format!("{name}.img"))).expect("restored file");
        assert!(
            got == want[&id],
            "{what}: volume {name} differs from the model"
        );
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn archive_and_restore_at_bookmarks_seqs_and_times() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (jdir, adir) = (tmp.path().join("group"), tmp.path().join("archive"));
    let run = write_history(&jdir, 1, 400);
    let rt = rt();
    let archiver = Archiver {
        target: target(&adir),
        group: group(),
        limits: UploadLimits::default(),
    };
    let sealed: Vec<u64> = run.journal.sealed_segments().iter().map(|s| s.0).collect();
    assert!(
        sealed.len() >= 4,
        "the history spans several segments: {sealed:?}"
    );
    // Two passes: the second continues the first's chain in a new generation.
    let half = sealed.len() / 2;
    let first = rt
        .block_on(archiver.archive_sealed(&jdir.join("journal"), &sealed[..half]))
        .expect("pass 1");
    let second = rt
        .block_on(archiver.archive_sealed(&jdir.join("journal"), &sealed))
        .expect("pass 2");
    assert_eq!((first.generation, second.generation), (1, 2));
    assert_eq!(
        first.segments_uploaded + second.segments_uploaded,
        sealed.len() as u64
    );
    assert!(
        second.stored_bytes < second.raw_bytes,
        "zstd saved nothing: {second:?}"
    );
    let again = rt
        .block_on(archiver.archive_sealed(&jdir.join("journal"), &sealed))
        .expect("pass 3");
    assert_eq!(
        (again.generation, again.segments_uploaded),
        (2, 0),
        "nothing new, no new generation"
    );

    // Restore from the archive alone: the journal is gone.
    let archived_seq = second.archived_seq;
    drop(run.journal);
    std::fs::remove_dir_all(&jdir).expect("delete journal");
    let t = target(&adir);
    let mut checked = 0;
    for (name, want) in &run.at_bookmark {
        let out = tmp.path().join(format!("r-{name}"));
        let mut progress = Vec::new();
        let r = rt.block_on(restore(&t, "g1", &Point::parse(name), &out, |f, total| {
            progress.push((f, total))
        }));
        match r {
            Ok(_) => {
                check_restored(&out, want, name);
                assert!(!progress.is_empty() && progress.windows(2).all(|w| w[0].0 < w[1].0));
                checked += 1;
            }
            Err(ArchiveError::NotRecoverable(..)) => {} // in the active segment: not archived
            Err(e) => panic!("{name}: {e}"),
        }
    }
    assert!(
        checked >= 3,
        "at least three bookmarks restored, got {checked}"
    );
    let mut times = 0;
    for (seq, ts, want) in &run.at_seq {
        if *seq > archived_seq {
            continue;
        }
        let out = tmp.path().join(format!("r-seq-{seq}"));
        rt.block_on(restore(&t, "g1", &Point::Seq(*seq), &out, |_, _| {}))
            .expect("restore at seq");
        check_restored(&out, want, &format!("seq {seq}"));
        // The same point by its time (writes of one append share a stamp; the batch's
        // last record is the last one at that stamp).
        let out = tmp.path().join(format!("r-time-{seq}"));
        let r = rt
            .block_on(restore(&t, "g1", &Point::Time(*ts), &out, |_, _| {}))
            .expect("restore at time");
        assert_eq!(r.seq, *seq, "the time resolves to the batch's last record");
        check_restored(&out, want, &format!("time {ts}"));
        times += 1;
    }
    assert!(times >= 2, "two times restored, got {times}");
    let report = rt.block_on(verify(&t)).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.segments, sealed.len() as u64);
    // A point past the archive is refused, not guessed.
    let err = rt.block_on(restore(
        &t,
        "g1",
        &Point::Seq(archived_seq + 1),
        &tmp.path().join("x"),
        |_, _| {},
    ));
    assert!(
        matches!(err, Err(ArchiveError::NotRecoverable(..))),
        "{err:?}"
    );
}

#[test]
fn a_second_appliance_on_the_prefix_is_refused_and_damage_is_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (jdir, adir) = (tmp.path().join("group"), tmp.path().join("archive"));
    let run = write_history(&jdir, 2, 150);
    let rt = rt();
    let sealed: Vec<u64> = run.journal.sealed_segments().iter().map(|s| s.0).collect();
    let archiver = Archiver {
        target: target(&adir),
        group: group(),
        limits: UploadLimits::default(),
    };
    rt.block_on(archiver.archive_sealed(&jdir.join("journal"), &sealed[..1]))
        .expect("pass");
    for (group_id, archiver_id) in [(GROUP_ID + 1, 7), (GROUP_ID, 8)] {
        let other = Archiver {
            target: target(&adir),
            group: ArchiveGroup {
                group_id,
                archiver_id,
                ..group()
            },
            limits: UploadLimits::default(),
        };
        let err = rt.block_on(other.archive_sealed(&jdir.join("journal"), &sealed));
        assert!(
            matches!(err, Err(ArchiveError::OwnedByOther { .. })),
            "{err:?}"
        );
    }
    // An upload cut short before its manifest: an object no manifest names. Verify is
    // clean (it names the orphan) and the next pass overwrites it.
    let orphan = adir
        .join("g1/segments")
        .join(format!("{:016x}.seg.zst", sealed[1]));
    std::fs::write(&orphan, b"half an upload").expect("orphan");
    let t = target(&adir);
    let report = rt.block_on(verify(&t)).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.unreferenced.len(), 1);
    rt.block_on(archiver.archive_sealed(&jdir.join("journal"), &sealed))
        .expect("resume");
    let report = rt.block_on(verify(&t)).expect("verify");
    assert!(
        report.problems.is_empty() && report.unreferenced.is_empty(),
        "{report:?}"
    );
    // A flipped byte in an archived segment is found by verify and refused by restore.
    let victim = adir
        .join("g1/segments")
        .join(format!("{:016x}.seg.zst", sealed[0]));
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, &bytes).expect("write");
    let report = rt.block_on(verify(&t)).expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let err = rt.block_on(restore(
        &t,
        "g1",
        &Point::Latest,
        &tmp.path().join("r"),
        |_, _| {},
    ));
    assert!(matches!(err, Err(ArchiveError::Damaged { .. })), "{err:?}");
}
