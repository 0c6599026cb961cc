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
    let archiver = Archiver::new(target(&adir), group(), UploadLimits::default());
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
    let archiver = Archiver::new(target(&adir), group(), UploadLimits::default());
    rt.block_on(archiver.archive_sealed(&jdir.join("journal"), &sealed[..1]))
        .expect("pass");
    for (group_id, archiver_id) in [(GROUP_ID + 1, 7), (GROUP_ID, 8)] {
        let other = Archiver::new(
            target(&adir),
            ArchiveGroup {
                group_id,
                archiver_id,
                ..group()
            },
            UploadLimits::default(),
        );
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

/// A single-node Garage on loopback (ports from `base`), set up as
/// `../shared/tools/garage/README.md` says; killed on drop.
struct Garage {
    bin: std::path::PathBuf,
    conf: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Garage {
    fn garage(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.conf.with_extension("log")).expect("log");
        self.child = Some(
            std::process::Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .arg("server")
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start garage"),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ok = std::process::Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .arg("status")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "garage did not answer status"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

fn garage_bin() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("CDP_GARAGE") {
        return Some(p.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    })
}

/// Real S3: archive to a single-node Garage, kill Garage during a pass (the pass fails after
/// its retries, the archive stays whole), restart it, resume, verify, and restore from
/// Garage alone at bookmarks and times with the journal deleted.
#[test]
fn garage_archive_survives_a_restart_and_restores() {
    let Some(bin) = garage_bin() else {
        eprintln!(
            "SKIP: no garage binary (set CDP_GARAGE or put garage on PATH; .ci/run installs it)"
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let base = 14900 + (std::process::id() % 50) as u16 * 4;
    let dir = tmp.path().join("garage");
    std::fs::create_dir_all(&dir).expect("dir");
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let conf = dir.join("g.toml");
    std::fs::write(
        &conf,
        format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            d = dir.display(),
            rpc = base,
            s3 = base + 1,
            admin = base + 2
        ),
    )
    .expect("conf");
    let mut g = Garage {
        bin,
        conf,
        child: None,
    };
    g.start();
    let node = g.garage(&["node", "id", "-q"]);
    let node = node.trim().split('@').next().expect("node id").to_string();
    g.garage(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
    g.garage(&["layout", "apply", "--version", "1"]);
    let key = g.garage(&["key", "create", "cdp"]);
    let field = |name: &str| {
        key.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {key}"))
    };
    let (key_id, secret_key) = (field("Key ID"), field("Secret key"));
    g.garage(&["bucket", "create", "archive"]);
    g.garage(&[
        "bucket", "allow", "--read", "--write", "--owner", "archive", "--key", "cdp",
    ]);
    let s3 = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{}", base + 1)),
        region: Some("garage".into()),
        access_key_id: Some(key_id),
        secret_access_key: Some(secret_key),
    };
    let open = || ArchiveTarget::open("s3://archive/cdp", &s3).expect("s3 target");

    let jdir = tmp.path().join("group");
    let run = write_history(&jdir, 3, 400);
    let sealed: Vec<u64> = run.journal.sealed_segments().iter().map(|s| s.0).collect();
    let rt = rt();
    let limits = UploadLimits {
        retries: 2,
        backoff: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let archiver = Archiver::new(open(), group(), limits);
    let jd = jdir.join("journal");
    let first = rt
        .block_on(archiver.archive_sealed(&jd, &sealed[..2]))
        .expect("pass 1");
    assert_eq!(first.generation, 1);
    // Garage down: the pass fails (after its retries), writing no manifest.
    g.kill();
    let err = rt.block_on(archiver.archive_sealed(&jd, &sealed));
    assert!(err.is_err(), "a pass with the store down cannot succeed");
    g.start();
    // The store may need a moment after its restart: retry the pass until it succeeds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let second = loop {
        match rt.block_on(archiver.archive_sealed(&jd, &sealed)) {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no resume after restart: {e}"
                );
            }
        }
    };
    assert_eq!(second.generation, 2, "the failed pass took no generation");
    assert_eq!(
        second.archived_seq,
        run.journal.sealed_segments().last().expect("seg").1 .0
    );
    drop(run.journal);
    std::fs::remove_dir_all(&jdir).expect("delete journal");
    let t = open();
    let report = rt.block_on(verify(&t)).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.segments, sealed.len() as u64);
    let mut bookmarks = 0;
    for (name, want) in &run.at_bookmark {
        if bookmarks == 3 {
            break;
        }
        let out = tmp.path().join(format!("r-{name}"));
        if rt
            .block_on(restore(&t, "g1", &Point::parse(name), &out, |_, _| {}))
            .is_ok()
        {
            check_restored(&out, want, name);
            bookmarks += 1;
        }
    }
    assert_eq!(bookmarks, 3, "three bookmarks restored from Garage");
    let mut times = 0;
    for (seq, ts, want) in run
        .at_seq
        .iter()
        .filter(|s| s.0 <= second.archived_seq)
        .take(2)
    {
        let out = tmp.path().join(format!("r-t-{seq}"));
        let r = rt
            .block_on(restore(&t, "g1", &Point::Time(*ts), &out, |_, _| {}))
            .expect("restore at time");
        assert_eq!(r.seq, *seq);
        check_restored(&out, want, &format!("time {ts}"));
        times += 1;
    }
    assert_eq!(times, 2, "two times restored from Garage");
}
