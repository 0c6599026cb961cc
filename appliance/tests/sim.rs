//! Seeded simulation of a group (in the style of TigerBeetle's VOPR): one SplitMix64 stream
//! per seed drives host changes on two volumes, flushes, bookmarks, distribution and
//! retention timing, and crashes, against a real `Group` (journal, undo stream, replica,
//! distribution thread) whose journal and undo stream sit behind the file-system seam
//! (`cdp_journal::env`). After every crash and reopen it checks rule 4 (every record a
//! flush acknowledged is in the journal, byte for byte, and the journal holds nothing the
//! host did not send) and rule 3 (images at a sample of points, bookmarks, the oldest and
//! the newest point equal the model's bytes exactly). A failure prints its seed.
//!
//! Fault model. A crash is a process death followed by a power loss of the journal's and
//! the undo stream's page cache:
//! - one of the next few writes through the seam is torn (`Fault::Crash`: a prefix of it
//!   reaches the file), and from the crash on every create, write, sync, truncate and remove
//!   through the seam fails with EIO, so the "dead" group can make nothing more durable;
//! - then every journal and undo file is cut back to a random length between what its last
//!   successful fdatasync covered and its current size, and sometimes a few bytes in that
//!   unsynced stretch are scribbled over (a torn sector).
//!
//! Not modelled: replica files and the group's small state files (`distribution.state` and
//! the rest) do not go through the seam, so their writes survive a crash whole, as with a
//! process crash whose page cache outlives it; a new file's directory entry is never lost.
//! Thread interleaving is the operating system's: a seed replays the same operations and
//! fault positions, not the same schedule.
//!
//! `CDP_SIM_SEEDS=N` runs N seeds (default 200) from `CDP_SIM_SEED_BASE` (default 0);
//! `CDP_SIM_SEED=S` replays one seed.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_appliance::bookmark::{BookmarkPayload, Consistency};
use cdp_appliance::config::GroupConfig;
use cdp_appliance::group::Group;
use cdp_journal::env::{Env, Fault, FaultPoint, Faults};
use cdp_journal::{JournalConfig, RecordIn, RecordKind};
use cdp_types::Seq;

/// Small, and not a multiple of the index's 4 KiB block.
const VOLUME_BYTES: u64 = 256 * 1024 + 512;
const VOLUMES: [&str; 2] = ["v0", "v1"];
/// Operations per seed before the final crash.
const OPS_PER_SEED: u64 = 40;
/// Two 1 MiB segments' worth: whole-volume writes make retention release history.
const CAPACITY_BYTES: u64 = 2 << 20;
const WAIT_MAX: Duration = Duration::from_secs(60);

/// The seed's single source of decisions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn payload(rng: &mut SplitMix64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// What the journal holds at each seq, as the host sent it.
#[derive(Clone)]
enum Entry {
    Change(usize, RecordIn),
    Bookmark,
}

#[derive(Default)]
struct Model {
    entries: BTreeMap<u64, Entry>,
}

impl Model {
    /// The volumes after exactly the changes up to `seq`.
    fn at(&self, seq: u64) -> Vec<Vec<u8>> {
        let mut volumes = vec![vec![0u8; VOLUME_BYTES as usize]; VOLUMES.len()];
        for (_, e) in self.entries.range(..=seq) {
            if let Entry::Change(v, r) = e {
                let range = r.offset as usize..(r.offset + r.length) as usize;
                match r.kind {
                    RecordKind::Write => volumes[*v][range].copy_from_slice(&r.payload),
                    _ => volumes[*v][range].fill(0),
                }
            }
        }
        volumes
    }
}

/// Figures over all seeds.
#[derive(Default)]
struct Stats {
    seeds: AtomicU64,
    ops: AtomicU64,
    crashes: AtomicU64,
    torn_writes: AtomicU64,
    files_cut: AtomicU64,
    flushes: AtomicU64,
    records_checked: AtomicU64,
    images_checked: AtomicU64,
    replica_checks: AtomicU64,
    /// Points chosen for a check that retention released before the check could pin them.
    points_released: AtomicU64,
    seeds_with_retention: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn group_config(dir: &Path, compress: bool) -> GroupConfig {
    let mut text = format!(
        "name = \"g\"\njournal_capacity_bytes = {CAPACITY_BYTES}\njournal_compress = {compress}\n"
    );
    for name in VOLUMES {
        text += &format!(
            "[[volume]]\nname = \"{name}\"\nsize = {VOLUME_BYTES}\nreplica = {:?}\n",
            dir.join(format!("{name}.replica"))
        );
    }
    toml::from_str(&text).expect("group config")
}

struct Sim<'a> {
    rng: SplitMix64,
    dir: &'a Path,
    compress: bool,
    /// Zero: distribution runs as soon as records are durable; an hour: only when urged or
    /// when the host pauses.
    distribution_delay: Duration,
    group: Option<Arc<Group>>,
    faults: Arc<Faults>,
    model: Model,
    /// The seq the next record appended will get.
    next_seq: u64,
    /// The highest seq a flush (or bookmark) acknowledged as durable.
    flushed: u64,
    bookmarks: Vec<u64>,
    stats: &'a Stats,
}

impl<'a> Sim<'a> {
    fn new(seed: u64, dir: &'a Path, stats: &'a Stats) -> Result<Sim<'a>, String> {
        let mut rng = SplitMix64(seed);
        let compress = rng.chance(50);
        let distribution_delay = if rng.chance(50) {
            Duration::ZERO
        } else {
            Duration::from_secs(3600)
        };
        let mut sim = Sim {
            rng,
            dir,
            compress,
            distribution_delay,
            group: None,
            faults: Faults::new(),
            model: Model::default(),
            next_seq: 1,
            flushed: 0,
            bookmarks: Vec::new(),
            stats,
        };
        sim.open()?;
        Ok(sim)
    }

    fn group(&self) -> &Arc<Group> {
        self.group.as_ref().expect("group open")
    }

    /// A fresh process: a new fault plan over the same files.
    fn open(&mut self) -> Result<(), String> {
        self.faults = Faults::new();
        let journal = JournalConfig {
            segment_bytes_max: 1 << 20,
            ..Default::default()
        };
        // Syncs happen only when the seed flushes (or a bookmark or a stop asks for one).
        let group = Group::open_with_env(
            self.dir,
            &group_config(self.dir, self.compress),
            journal,
            Duration::from_secs(3600),
            self.distribution_delay,
            Env::with_faults(self.faults.clone()),
        )
        .map_err(|e| format!("open group: {e}"))?;
        self.group = Some(group);
        Ok(())
    }

    fn random_change(&mut self) -> (usize, RecordIn) {
        let volume = self.rng.below(VOLUMES.len() as u64) as usize;
        let id = self.group().volume(VOLUMES[volume]).expect("volume").id;
        let (offset, length) = if self.rng.chance(8) {
            (0, VOLUME_BYTES)
        } else {
            let offset = if self.rng.chance(50) {
                self.rng.below(VOLUME_BYTES / 4096) * 4096
            } else {
                self.rng.below(VOLUME_BYTES)
            };
            let length = if self.rng.chance(80) {
                1 + self.rng.below(12 * 1024)
            } else {
                1 + self.rng.below(80 * 1024)
            };
            (offset, length.min(VOLUME_BYTES - offset))
        };
        let kind = match self.rng.below(8) {
            0 => RecordKind::Trim,
            1 => RecordKind::Zero,
            _ => RecordKind::Write,
        };
        let record = match kind {
            RecordKind::Write => {
                RecordIn::write(id, offset, payload(&mut self.rng, length as usize))
            }
            kind => RecordIn::range(kind, id, offset, length),
        };
        (volume, record)
    }

    /// Appends a batch of one to three changes of one volume; an error is returned as is
    /// (after a crash it is expected), with the batch kept in the model as in flight.
    fn append(&mut self) -> Result<(), String> {
        let (volume, first) = self.random_change();
        let mut batch = vec![first];
        for _ in 0..self.rng.below(3) {
            let (v, r) = self.random_change();
            if v == volume {
                batch.push(r);
            }
        }
        // In flight from here: a crash may keep any whole prefix of the batch.
        for (i, r) in batch.iter().enumerate() {
            self.model
                .entries
                .insert(self.next_seq + i as u64, Entry::Change(volume, r.clone()));
        }
        let want_last = self.next_seq + batch.len() as u64 - 1;
        self.next_seq = want_last + 1;
        let v = self.group().volume(VOLUMES[volume]).expect("volume");
        let last = self
            .group()
            .append(&v, &batch)
            .map_err(|e| format!("append: {e}"))?;
        if last.0 != want_last {
            return Err(format!(
                "append returned seq {last}, the model expected {want_last}"
            ));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        let durable = self
            .group()
            .journal()
            .sync()
            .map_err(|e| format!("flush: {e}"))?;
        if durable.0 != self.next_seq - 1 {
            return Err(format!(
                "flush made seq {durable} durable, {} were appended",
                self.next_seq - 1
            ));
        }
        self.flushed = durable.0;
        add(&self.stats.flushes, 1);
        Ok(())
    }

    fn bookmark(&mut self) -> Result<(), String> {
        let b = self
            .group()
            .create_bookmark(
                BookmarkPayload {
                    name: format!("bm{}", self.bookmarks.len()),
                    consistency: Consistency::Crash,
                    freeze_window_ms: 0,
                    keep: false,
                },
                None,
            )
            .map_err(|e| format!("bookmark: {e}"))?;
        if b.seq != self.next_seq {
            return Err(format!(
                "bookmark at seq {}, the model expected {}",
                b.seq, self.next_seq
            ));
        }
        self.model.entries.insert(b.seq, Entry::Bookmark);
        self.next_seq += 1;
        // A bookmark is durable when created, and so is everything before it.
        self.flushed = b.seq;
        self.bookmarks.push(b.seq);
        Ok(())
    }

    /// Lets distribution catch up with what is durable, then checks the replica files
    /// against the model at the distributed seq.
    fn distribute(&mut self) -> Result<(), String> {
        let group = Arc::clone(self.group());
        let durable = group.journal().durable_seq();
        let deadline = Instant::now() + WAIT_MAX;
        group.urge_distribution();
        while group.distributed_seq() < durable {
            if Instant::now() > deadline {
                return Err(format!(
                    "distribution stuck at seq {} of {durable}",
                    group.distributed_seq()
                ));
            }
            if let Some(f) = group.failure().borrow().clone() {
                return Err(format!("group failed: {f}"));
            }
            group.urge_distribution();
            std::thread::sleep(Duration::from_millis(1));
        }
        // Nothing more is durable (only the seed syncs), so the replica stays put.
        let at = group.distributed_seq().0;
        let want = self.model.at(at);
        for (i, name) in VOLUMES.iter().enumerate() {
            let v = group.volume(name).expect("volume");
            let mut got = vec![0u8; VOLUME_BYTES as usize];
            group
                .read_replica(&v, 0, &mut got)
                .map_err(|e| format!("read replica: {e}"))?;
            if let Some(off) = first_difference(&got, &want[i]) {
                return Err(format!(
                    "replica {name} differs from the model at seq {at}, first at byte {off}"
                ));
            }
        }
        add(&self.stats.replica_checks, 1);
        Ok(())
    }

    /// Rule 3: the image at `at` equals the model, read whole and at a random window.
    fn check_image(&mut self, at: u64) -> Result<(), String> {
        let group = Arc::clone(self.group());
        let pin = match group.pin_point(Seq(at)) {
            Ok(pin) => pin,
            // Retention ran between choosing the point and pinning it.
            Err(_) if Seq(at) < group.oldest_point() => {
                add(&self.stats.points_released, 1);
                return Ok(());
            }
            Err(e) => return Err(format!("pin seq {at}: {e}")),
        };
        let want = self.model.at(at);
        let result = (|| {
            for (i, name) in VOLUMES.iter().enumerate() {
                let v = group.volume(name).expect("volume");
                let mut got = vec![0u8; VOLUME_BYTES as usize];
                group
                    .read_at_point(&v, Seq(at), 0, &mut got)
                    .map_err(|e| format!("read seq {at}: {e}"))?;
                if let Some(off) = first_difference(&got, &want[i]) {
                    return Err(format!(
                        "rule 3: image at seq {at}, volume {name}: first difference at byte {off}"
                    ));
                }
                let offset = self.rng.below(VOLUME_BYTES);
                let len = 1 + self.rng.below((VOLUME_BYTES - offset).min(40_000));
                let mut piece = vec![0u8; len as usize];
                group
                    .read_at_point(&v, Seq(at), offset, &mut piece)
                    .map_err(|e| format!("read seq {at}: {e}"))?;
                let want_piece = &want[i][offset as usize..(offset + len) as usize];
                if let Some(off) = first_difference(&piece, want_piece) {
                    return Err(format!(
                        "rule 3: image at seq {at}, volume {name}, {len} bytes read at \
                         {offset}: first difference at byte {}",
                        offset as usize + off
                    ));
                }
            }
            Ok(())
        })();
        group.unpin(pin);
        add(&self.stats.images_checked, 1);
        result
    }

    /// Images at the oldest and newest point, every bookmark still in the window, and a few
    /// seqs between.
    fn check_images(&mut self) -> Result<(), String> {
        let group = Arc::clone(self.group());
        group
            .wait_replica_exact(WAIT_MAX)
            .map_err(|e| format!("replica not exact: {e}"))?;
        let oldest = group.oldest_point().0;
        let last = group.last_seq().0;
        let mut points = vec![oldest, last];
        points.extend(
            self.bookmarks
                .iter()
                .copied()
                .filter(|&b| b >= oldest && b <= last),
        );
        for _ in 0..3 {
            points.push(oldest + self.rng.below(last - oldest + 1));
        }
        points.sort_unstable();
        points.dedup();
        for at in points {
            self.check_image(at)?;
        }
        Ok(())
    }

    /// A process crash with a torn in-flight write, a power loss of unsynced journal and
    /// undo bytes, and a restart; then the checks of rules 4 and 3.
    fn crash(&mut self) -> Result<(), String> {
        add(&self.stats.crashes, 1);
        let bytes = self.rng.below(64 * 1024) as usize;
        self.faults
            .arm_after(FaultPoint::Write, self.rng.below(3), Fault::Crash { bytes });
        if self.rng.chance(50) {
            // The torn write may be distribution's capture of before-images.
            self.group().urge_distribution();
        }
        for _ in 0..self.rng.below(4) {
            if self.append().is_err() {
                break;
            }
        }
        if self.faults.crashed() {
            add(&self.stats.torn_writes, 1);
        }
        self.faults.crash_now();
        let group = self.group.take().expect("group open");
        group.stop();
        drop(group);
        self.lose_unsynced(&self.dir.join("groups"))?;
        self.open()?;
        self.check_journal()?;
        self.check_images()
    }

    /// Cuts every file that went through the seam back to a random length no shorter than
    /// what its last fdatasync covered, sometimes scribbling over the unsynced bytes kept.
    fn lose_unsynced(&mut self, dir: &Path) -> Result<(), String> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| format!("read dir {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        // A fixed order, so the seed decides the same cuts.
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
            if meta.is_dir() {
                self.lose_unsynced(&path)?;
                continue;
            }
            let Some(synced) = self.faults.synced_len(&meta) else {
                continue;
            };
            let size = meta.len();
            if size <= synced {
                continue;
            }
            let keep = synced + self.rng.below(size - synced + 1);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            file.set_len(keep).map_err(|e| e.to_string())?;
            if keep > synced && self.rng.chance(30) {
                let at = synced + self.rng.below(keep - synced);
                let len = (1 + self.rng.below(64)).min(keep - at);
                let junk = payload(&mut self.rng, len as usize);
                file.write_all_at(&junk, at).map_err(|e| e.to_string())?;
            }
            add(&self.stats.files_cut, 1);
        }
        Ok(())
    }

    /// Rule 4 after a reopen: every flushed record is there, byte for byte; whatever else
    /// survived is a prefix of what was in flight, exactly as sent.
    fn check_journal(&mut self) -> Result<(), String> {
        let group = Arc::clone(self.group());
        let journal = group.journal();
        let last = journal.last_seq().0;
        if last < self.flushed {
            return Err(format!(
                "rule 4: a flush acknowledged seq {}, the reopened journal ends at {last}",
                self.flushed
            ));
        }
        if last >= self.next_seq {
            return Err(format!(
                "the journal ends at seq {last}, only {} were appended",
                self.next_seq - 1
            ));
        }
        // What did not survive was never acknowledged durable.
        self.model.entries.retain(|&s, _| s <= last);
        self.bookmarks.retain(|&s| s <= last);
        self.next_seq = last + 1;
        self.flushed = last;
        let first = journal.first_seq().0;
        let mut n = 0u64;
        for record in journal.read_from(Seq(first)).map_err(|e| e.to_string())? {
            let record = record.map_err(|e| format!("rule 4: read journal: {e}"))?;
            let seq = record.seq.0;
            match self.model.entries.get(&seq) {
                Some(Entry::Change(_, want)) => {
                    let same = record.kind == want.kind
                        && record.volume == want.volume
                        && record.offset == want.offset
                        && record.length == want.length
                        && record.payload == want.payload;
                    if !same {
                        return Err(format!(
                            "rule 4: journal record {seq} differs from the one sent"
                        ));
                    }
                }
                Some(Entry::Bookmark) if record.kind == RecordKind::Bookmark => {}
                _ => {
                    return Err(format!(
                        "journal record {seq} ({:?}) was never sent",
                        record.kind
                    ))
                }
            }
            n += 1;
        }
        if n != last + 1 - first {
            return Err(format!(
                "journal read {n} records from seq {first} to {last}"
            ));
        }
        add(&self.stats.records_checked, n);
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        for _ in 0..OPS_PER_SEED {
            add(&self.stats.ops, 1);
            match self.rng.below(100) {
                0..=49 => self.append()?,
                50..=61 => self.flush()?,
                62..=71 => self.distribute()?,
                72..=75 => self.bookmark()?,
                76..=83 => self.check_images()?,
                _ => self.crash()?,
            }
        }
        self.crash()?;
        if self.group().journal().first_seq().0 > 1 {
            add(&self.stats.seeds_with_retention, 1);
        }
        self.group().stop();
        Ok(())
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn run_seed(seed: u64, stats: &Stats) -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut sim = Sim::new(seed, tmp.path(), stats)?;
    let result = sim.run();
    if let Some(g) = sim.group.take() {
        g.stop();
    }
    add(&stats.seeds, 1);
    result
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

/// Runs the seeds on two threads; the first failure stops the run and names its seed.
#[test]
fn simulated_crashes_keep_rules_3_and_4() {
    let seeds: Vec<u64> = match env_u64("CDP_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("CDP_SIM_SEED_BASE").unwrap_or(0);
            (base..base + env_u64("CDP_SIM_SEEDS").unwrap_or(200)).collect()
        }
    };
    let stats = Stats::default();
    let next = AtomicU64::new(0);
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                if !failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty()
                {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&seed) = seeds.get(i) else { return };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_seed(seed, &stats)
                }))
                .unwrap_or_else(|_| Err("panicked".into()));
                if let Err(e) = outcome {
                    eprintln!("sim: seed {seed} failed: {e}\nsim: replay with CDP_SIM_SEED={seed}");
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((seed, e));
                }
            });
        }
    });
    let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "sim: {} seeds in {:.1} s: {} ops, {} crashes ({} with a torn in-flight write, {} \
         files cut), {} flushes; checks: {} journal records (rule 4), {} images (rule 3), {} \
         replica comparisons; {} seeds released history by retention ({} sampled points \
         released before they were pinned)",
        s(&stats.seeds),
        started.elapsed().as_secs_f64(),
        s(&stats.ops),
        s(&stats.crashes),
        s(&stats.torn_writes),
        s(&stats.files_cut),
        s(&stats.flushes),
        s(&stats.records_checked),
        s(&stats.images_checked),
        s(&stats.replica_checks),
        s(&stats.seeds_with_retention),
        s(&stats.points_released),
    );
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some((seed, e)) = failures.first() {
        panic!("seed {seed}: {e} (replay: CDP_SIM_SEED={seed} cargo test --release -p cdp-appliance --test sim)");
    }
}
