//! A consistency group at the appliance: one journal, its append, sync and distribution threads.
//!
//! Link connections append their changes to the group's journal directly, in batches; the
//! journal's append lock defines the group's write order. Flush requests go to the sync
//! thread, whose one fsync serves every flush queued meanwhile (group commit). The
//! distribution thread applies durable records to the replicas in order, behind the host,
//! under SCHED_IDLE, and after each checkpoint runs one retention pass: the oldest journal
//! segments the replica already holds are released once the journal exceeds its capacity or
//! its time window.

mod consolidate;
mod recoverable;
mod region_resync;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cdp_journal::{
    Journal, JournalConfig, Record, RecordIn, RecordKind, RecordLocation, RetentionPolicy,
};
use cdp_types::{BlockFile, Seq, TimestampNs};
use serde::Serialize;
use tokio::sync::watch;

use crate::bookmark::{Bookmark, BookmarkIndex, BookmarkPayload};
use crate::config::{GroupConfig, JournalFullPolicy, VolumeConfig};
use crate::distribution_state;
use crate::error::ApplianceError;
use crate::group_meta::GroupMeta;
use crate::history::{BlockPlan, History, HistoryStats, RedoRef, UndoRef, BLOCK_BYTES};
use crate::limits::{
    DISTRIBUTION_BATCH_BYTES_MAX, DISTRIBUTION_BATCH_RECORDS_MAX,
    DISTRIBUTION_CHECKPOINT_BYTES_MAX, DISTRIBUTION_HOST_QUIET, DISTRIBUTION_QUIET_CHECK_RECORDS,
    PARALLEL_ASSEMBLY_BLOCKS_MIN, SYNC_REQUESTS_MAX, UNDO_CHUNK_BYTES_MAX,
};
use crate::record_cache::{RecordCache, Stream};
use crate::resync_span::{ResyncSpan, ResyncSpans};

pub use consolidate::{ConsolidationReport, ConsolidationStatus};

/// Progress reported back to one split-link connection; cumulative, so no queue is needed
/// (except in sync mode, see `remote_pending`).
pub struct ConnectionProgress {
    /// Highest source_seq appended to the local journal.
    pub acked: watch::Sender<u64>,
    /// Highest source_seq a local journal sync covered after the splitter's Flush.
    pub durable: watch::Sender<u64>,
    /// Sync mode only: (last journal seq, last source_seq) of each appended batch whose Ack
    /// still waits for the remote copy, oldest first. The journal interleaves the group's
    /// volumes, so a connection's source_seq maps to a journal seq only through this list.
    /// At most `SYNC_ACKS_PENDING_MAX` entries: past that, a batch joins the newest entry
    /// (its changes are then acknowledged a little later, never earlier).
    pub remote_pending: Mutex<std::collections::VecDeque<(u64, u64)>>,
}

impl ConnectionProgress {
    pub fn new(start: u64) -> Arc<ConnectionProgress> {
        Arc::new(ConnectionProgress {
            acked: watch::Sender::new(start),
            durable: watch::Sender::new(0),
            remote_pending: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Sync mode: notes that changes through `source_seq` are at journal seq ≤ `journal_seq`
    /// and must wait for the remote copy before their Ack.
    pub fn note_remote_pending(&self, journal_seq: u64, source_seq: u64) {
        let mut q = lock(&self.remote_pending);
        if q.len() >= crate::limits::SYNC_ACKS_PENDING_MAX {
            if let Some(back) = q.back_mut() {
                *back = (journal_seq, source_seq);
                return;
            }
        }
        q.push_back((journal_seq, source_seq));
    }

    /// Sync mode: the highest source_seq whose batch the remote copy holds once it
    /// acknowledged `shipped`, dropping those entries; `None` if no entry is covered yet.
    pub fn remote_covered(&self, shipped: u64) -> Option<u64> {
        let mut q = lock(&self.remote_pending);
        let mut covered = None;
        while let Some(&(journal_seq, source_seq)) = q.front() {
            if journal_seq > shipped {
                break;
            }
            covered = Some(source_seq);
            q.pop_front();
        }
        covered
    }
}

/// A flush waiting for the next journal sync.
struct SyncRequest {
    source_seq: u64,
    progress: Arc<ConnectionProgress>,
}

/// One volume of the group as the appliance sees it.
pub struct GroupVolume {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub replica_path: PathBuf,
    replica: BlockFile,
    /// A splitter is connected for this volume (at most one at a time).
    pub connected: AtomicBool,
    /// Highest splitter source_seq in the journal for this volume.
    pub last_source_seq: AtomicU64,
    /// Removed from the group at runtime: appends for it are refused from then on.
    pub removed: AtomicBool,
    /// Which connection holds the volume, and since when none does (`volume_link.rs`).
    pub link: crate::volume_link::VolumeLink,
}

/// Status of a group, as `cdp status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub journal_bytes: u64,
    pub journal_segments: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub distributed_seq: u64,
    pub lag_records: u64,
    /// Retention releases the oldest segments above this size.
    pub journal_capacity_bytes: u64,
    /// The journal is above its capacity and nothing more may be released yet because
    /// distribution to the replica is behind. The host is not stopped (future policy).
    pub journal_over_capacity: bool,
    /// What a full journal does to the host (`release` or `throttle`).
    pub journal_full_policy: JournalFullPolicy,
    /// Host writes are being held because the journal is full (policy `throttle`).
    pub journal_throttling: bool,
    /// The time window, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_retention_s: Option<u64>,
    /// Timestamp of the oldest record kept (ns since the Unix epoch), shown when a time
    /// window is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_timestamp_ns: Option<u64>,
    /// Write payload bytes journaled since the appliance started, as the host wrote them
    /// and as stored after compression, and their ratio (logical / stored, 1.0 if none).
    pub journal_write_logical_bytes: u64,
    pub journal_write_stored_bytes: u64,
    pub journal_compression_ratio: f64,
    pub failure: Option<String>,
    /// The undo stream: before-images distribution saved, which let images and rollback
    /// reach points older than the replica.
    pub undo_bytes: u64,
    /// The oldest point an image can be opened at.
    pub oldest_point_seq: u64,
    /// A logged image holds the replica at this seq; distribution waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_held_at: Option<u64>,
    pub history: HistoryStats,
    /// The consolidation policy and what its passes did, if the group has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<consolidate::ConsolidationStatus>,
    pub volumes: Vec<VolumeStatus>,
    /// `local`, or `remote` for the remote copy of another appliance's group.
    pub source: crate::config::GroupSource,
    /// Shipping to the remote copy, for a group with `[group.remote]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::replication::RemoteStatus>,
    /// Receiving from the source, for a remote copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_source: Option<crate::replication::ReceivingStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub replica: String,
    pub connected: bool,
    pub last_source_seq: u64,
}

pub struct Group {
    pub name: String,
    journal: Arc<Journal>,
    /// Changes at runtime (`cdp volume add/remove`); readers take a snapshot.
    volumes: RwLock<BTreeMap<String, Arc<GroupVolume>>>,
    sync_tx: Mutex<Option<mpsc::SyncSender<SyncRequest>>>,
    distributed: AtomicU64,
    retention: RetentionPolicy,
    journal_full_policy: JournalFullPolicy,
    /// Open images or the remote copy keep the journal over capacity (logged once per
    /// episode; the host is not throttled for them).
    held_by_images: AtomicBool,
    /// Set by the last retention pass; a warning is logged once per episode.
    over_capacity: AtomicBool,
    /// Per volume id, the highest source_seq among distributed (hence durable) records.
    /// Written to `source_seqs.state` before segments are released, so a reconnecting
    /// splitter is told the right resume point even when its last change was released.
    distributed_source_seqs: Mutex<BTreeMap<u32, u64>>,
    /// The group directory, which holds its state files.
    dir: PathBuf,
    failure: watch::Sender<Option<String>>,
    stop_distribution: AtomicBool,
    /// Longest distribution waits for the host to pause before it runs regardless.
    distribution_delay_max: Duration,
    /// When the last host change was appended, in ns since `epoch`.
    last_append_ns: AtomicU64,
    epoch: Instant,
    /// Bookmarks in the journal, rebuilt by a scan at open (see `bookmark.rs`).
    bookmarks: BookmarkIndex,
    resync_spans: ResyncSpans,
    distribution_wake: mpsc::SyncSender<()>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Before-images of replica blocks, saved by distribution before it overwrites them.
    undo: Arc<Journal>,
    /// Block index over journal and undo stream (see `history.rs`). Appends hold it across
    /// the journal append, so once a seq is visible every lower change is indexed.
    history: Mutex<History>,
    /// What the replica holds. Image reads share it; distribution and rollback take it
    /// exclusively while they change the replica.
    replica_state: RwLock<ReplicaState>,
    /// The undo stream started here: points below were never given before-images.
    undo_floor: u64,
    /// Points that open images read: retention never releases records they need.
    pins: Mutex<BTreeMap<u64, Seq>>,
    next_pin: AtomicU64,
    /// While a logged image holds the replica, distribution stops at this seq.
    hold: Mutex<Option<Seq>>,
    /// Images wait for the replica: distribution runs without waiting for a host pause.
    urgent: AtomicBool,
    /// Held by whoever writes the replica in bulk: a distribution pass or a rollback.
    replica_writer: Mutex<()>,
    /// Undo records applied by the rollback running now, and how many it needs.
    rollback_progress: (AtomicU64, AtomicU64),
    record_cache: RecordCache,
    state_path: PathBuf,
    /// Remote replication role and progress (`replication/`).
    replication: crate::replication::GroupReplication,
    /// `[group.consolidation]`, if the group has a policy (`consolidate.rs`).
    consolidation: Option<crate::consolidation::ConsolidationConfig>,
    /// Points consolidation kept: at or below its `through`, other points are refused.
    consolidation_state: RwLock<crate::consolidation::ConsolidationState>,
    /// Held by a consolidation pass, and by rollback and retention, which must not move
    /// history under it.
    consolidation_pass: Mutex<()>,
    consolidation_stats: Mutex<consolidate::PassStats>,
    /// Image reads hold it shared from planning to reading; consolidation exclusively while
    /// it moves records to their rewritten segments.
    relocation: RwLock<()>,
}

/// The replica's state as image reads see it.
#[derive(Clone, Copy, Debug)]
struct ReplicaState {
    /// The replica holds exactly the group's state after this seq...
    seq: Seq,
    /// ...unless false: after a crash it may also hold some later records (applied after
    /// the last checkpoint) until distribution passes `exact_from` again.
    exact: bool,
    exact_from: Seq,
}

impl Group {
    /// Opens (or creates) the group's journal and replicas and starts its threads.
    pub fn open(
        data_dir: &Path,
        config: &GroupConfig,
        journal_config: JournalConfig,
        sync_interval: Duration,
        distribution_delay_max: Duration,
    ) -> Result<Arc<Group>, ApplianceError> {
        Group::open_with_env(
            data_dir,
            config,
            journal_config,
            sync_interval,
            distribution_delay_max,
            cdp_journal::env::Env::new(),
        )
    }

    /// `open` with the journal's and the undo stream's files behind `env`, the file-system
    /// seam a simulation injects crashes through (`tests/sim.rs`). Replicas and small state
    /// files do not go through it.
    pub fn open_with_env(
        data_dir: &Path,
        config: &GroupConfig,
        mut journal_config: JournalConfig,
        sync_interval: Duration,
        distribution_delay_max: Duration,
        env: cdp_journal::env::Env,
    ) -> Result<Arc<Group>, ApplianceError> {
        let dir = data_dir.join("groups").join(&config.name);
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = config.volume.iter().map(|v| v.name.clone()).collect();
        let meta = GroupMeta::load_or_create(&dir, &config.name, &names)?;
        journal_config.compress_writes = config.journal_compress;
        let (journal, report) = Journal::open_with_env(
            &dir.join("journal"),
            meta.group_id,
            journal_config.clone(),
            env.clone(),
        )?;
        tracing::info!(group = %config.name, "journal opened: {report}");
        let journal = Arc::new(journal);
        let dist_path = dir.join("distribution.state");
        let distributed = distribution_state::load(&dist_path)?;
        let undo_floor = load_or_create_undo_floor(&dir, distributed)?;
        let mut undo_config = journal_config.clone();
        // Uncompressed: image reads of old points decompress one record per block otherwise,
        // which measured at a fifth of the replica's read rate. Zeroes and holes already
        // cost nothing (payload-less records).
        undo_config.compress_writes = false;
        let (undo, undo_report) = Journal::open_with_env(
            &dir.join("undo"),
            meta.group_id ^ UNDO_STREAM_ID_SALT,
            undo_config,
            env,
        )?;
        tracing::info!(group = %config.name, "undo stream opened: {undo_report}");
        let undo = Arc::new(undo);
        let history = rebuild_history(&journal, &undo)?;
        let consolidation_state = crate::consolidation::ConsolidationState::load(&dir)?;
        let mut exact_from = Seq(history.undo_captured_through());
        // A resynchronisation by regions cut short: the replica is a mix, no image reads it.
        if Group::resync_marker_at_open(&dir, journal.first_seq())? {
            exact_from = Seq(u64::MAX);
        }
        tracing::info!(group = %config.name, "history index rebuilt: {}", history.stats());

        let mut volumes = BTreeMap::new();
        for v in &config.volume {
            let id = meta.volumes.get(&v.name).copied().ok_or_else(|| {
                ApplianceError::Config(format!("volume {} has no id in group.state", v.name))
            })?;
            volumes.insert(v.name.clone(), Arc::new(open_volume(v, id)?));
        }
        let released_source_seqs = crate::state_file::load_source_seqs(&dir)?;
        recover_last_source_seqs(&journal, &volumes)?;
        let bookmarks = BookmarkIndex::rebuild(&journal)?;
        let resync_spans = ResyncSpans::rebuild(&journal)?;
        // Everything recovered is durable, so it seeds the distributed maxima too.
        let mut distributed_source_seqs = BTreeMap::new();
        for v in volumes.values() {
            let released = released_source_seqs.get(&v.id).copied().unwrap_or(0);
            let seq = v
                .last_source_seq
                .fetch_max(released, Ordering::Relaxed)
                .max(released);
            distributed_source_seqs.insert(v.id, seq);
        }
        let retention = RetentionPolicy {
            capacity_bytes: config.journal_capacity_bytes,
            window_ns: config
                .journal_retention_s
                .map(|s| s.saturating_mul(1_000_000_000)),
        };

        let (sync_tx, sync_rx) = mpsc::sync_channel(SYNC_REQUESTS_MAX);
        let (wake_tx, wake_rx) = mpsc::sync_channel(1);
        let group = Arc::new(Group {
            name: config.name.clone(),
            journal,
            volumes: RwLock::new(volumes),
            sync_tx: Mutex::new(Some(sync_tx)),
            distributed: AtomicU64::new(distributed.0),
            retention,
            journal_full_policy: config.journal_full_policy,
            held_by_images: AtomicBool::new(false),
            over_capacity: AtomicBool::new(false),
            distributed_source_seqs: Mutex::new(distributed_source_seqs),
            dir: dir.clone(),
            failure: watch::Sender::new(None),
            stop_distribution: AtomicBool::new(false),
            distribution_delay_max,
            last_append_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            bookmarks,
            resync_spans,
            distribution_wake: wake_tx,
            threads: Mutex::new(Vec::new()),
            undo,
            history: Mutex::new(history),
            replica_state: RwLock::new(ReplicaState {
                seq: distributed,
                exact: distributed >= exact_from,
                exact_from,
            }),
            undo_floor,
            pins: Mutex::new(Group::replication_pins(config)),
            next_pin: AtomicU64::new(1),
            hold: Mutex::new(None),
            urgent: AtomicBool::new(false),
            replica_writer: Mutex::new(()),
            rollback_progress: (AtomicU64::new(0), AtomicU64::new(0)),
            record_cache: RecordCache::default(),
            state_path: dist_path.clone(),
            replication: crate::replication::GroupReplication::new(config),
            consolidation: config.consolidation.clone(),
            consolidation_state: RwLock::new(consolidation_state),
            consolidation_pass: Mutex::new(()),
            consolidation_stats: Mutex::new(consolidate::PassStats::new()),
            relocation: RwLock::new(()),
        });
        let mut threads = Vec::new();
        let g = Arc::clone(&group);
        threads.push(spawn_named(format!("sync-{}", config.name), move || {
            g.sync_loop(sync_rx, sync_interval)
        })?);
        let g = Arc::clone(&group);
        threads.push(spawn_named(
            format!("distribute-{}", config.name),
            move || g.distribute_loop(wake_rx),
        )?);
        *group.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
        Ok(group)
    }

    pub fn volume(&self, name: &str) -> Option<Arc<GroupVolume>> {
        self.read_volumes().get(name).cloned()
    }

    fn read_volumes(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<GroupVolume>>> {
        // Every change is one map call, so a poisoned lock still guards a consistent map.
        self.volumes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a volume to the running group (`cdp volume add`). It gets a new id in
    /// `group.state`, or its old one if it belonged to the group before: ids are never reused,
    /// and the journal may still hold its records, so its resume point is recovered as at
    /// start-up. Reads the journal backwards: call from a blocking thread.
    pub fn add_volume(&self, config: &VolumeConfig) -> Result<Arc<GroupVolume>, ApplianceError> {
        let already = || {
            ApplianceError::Refused(format!(
                "group {} already has a volume {:?}",
                self.name, config.name
            ))
        };
        if self.read_volumes().contains_key(&config.name) {
            return Err(already());
        }
        let meta =
            GroupMeta::load_or_create(&self.dir, &self.name, std::slice::from_ref(&config.name))?;
        let id =
            meta.volumes
                .get(&config.name)
                .copied()
                .ok_or_else(|| ApplianceError::Corruption {
                    path: self.dir.join("group.state").display().to_string(),
                    what: format!("volume {} has no id", config.name),
                })?;
        let volume = Arc::new(open_volume(config, id)?);
        let single = BTreeMap::from([(config.name.clone(), Arc::clone(&volume))]);
        recover_last_source_seqs(&self.journal, &single)?;
        let released = crate::state_file::load_source_seqs(&self.dir)?
            .get(&id)
            .copied()
            .unwrap_or(0);
        let resume = volume
            .last_source_seq
            .fetch_max(released, Ordering::Relaxed)
            .max(released);
        {
            let mut seqs = lock(&self.distributed_source_seqs);
            let e = seqs.entry(id).or_default();
            *e = (*e).max(resume);
        }
        let mut volumes = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        if volumes.contains_key(&config.name) {
            return Err(already());
        }
        volumes.insert(config.name.clone(), Arc::clone(&volume));
        drop(volumes);
        tracing::info!(group = %self.name, volume = %config.name, id, size = config.size, replica = %config.replica.display(), "volume added");
        Ok(volume)
    }

    /// Removes a volume from the running group (`cdp volume remove`). Refused while its
    /// splitter is connected unless `force`. Its records stay in the journal (retention
    /// releases them as any others) and its replica file is kept: first distribution applies
    /// everything journaled for it, so the replica ends equal to what production held at the
    /// last journaled change. Waits for distribution: call from a blocking thread.
    pub fn remove_volume(
        &self,
        name: &str,
        force: bool,
    ) -> Result<Arc<GroupVolume>, ApplianceError> {
        let volume = self.volume(name).ok_or_else(|| {
            ApplianceError::NotFound(format!(
                "group {} has no volume {name:?} (it has: {})",
                self.name,
                {
                    let names: Vec<String> = self.read_volumes().keys().cloned().collect();
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                }
            ))
        })?;
        // `cdp volume remove` stops the splitter's side first; its connection closes a
        // moment later, so give it that moment before refusing.
        let deadline = Instant::now() + VOLUME_REMOVE_DISCONNECT_WAIT;
        while !force && volume.connected.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if volume.connected.load(Ordering::Relaxed) && !force {
            return Err(ApplianceError::Refused(format!(
                "volume {name:?} still has a connected splitter; remove it from the splitter \
                 first (cdp volume remove does) or use --force"
            )));
        }
        if let Some(held) = *lock(&self.hold) {
            return Err(ApplianceError::Refused(format!(
                "a logged image holds group {}'s replicas at seq {held}; release it first, \
                 so the replica of {name:?} can receive its last changes",
                self.name
            )));
        }
        volume.removed.store(true, Ordering::Relaxed);
        if let Err(e) = self.distribute_everything(VOLUME_REMOVE_DISTRIBUTION_WAIT) {
            volume.removed.store(false, Ordering::Relaxed);
            return Err(e.context(&format!("volume {name:?} not removed")));
        }
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        tracing::info!(group = %self.name, volume = %name, replica = %volume.replica_path.display(), "volume removed; its journal records and replica are kept");
        Ok(volume)
    }

    /// Makes everything appended so far durable and waits until distribution applied it.
    fn distribute_everything(&self, timeout: Duration) -> Result<(), ApplianceError> {
        let target = self.journal.last_seq();
        if self.journal.durable_seq() < target {
            self.journal.sync()?;
        }
        let deadline = Instant::now() + timeout;
        while self.distributed_seq() < target {
            if let Some(failure) = self.failure.borrow().clone() {
                return Err(ApplianceError::Fenced(failure));
            }
            if Instant::now() >= deadline {
                return Err(ApplianceError::Busy(format!(
                    "distribution did not reach seq {target} within {} s (it is at {})",
                    timeout.as_secs(),
                    self.distributed_seq()
                )));
            }
            self.urge_distribution();
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    /// Appends a batch of one volume's changes, in order, and records the last source_seq;
    /// returns the journal seq of the last change. A failure fences the group: nothing after
    /// it is acknowledged.
    pub fn append(
        &self,
        volume: &GroupVolume,
        changes: &[RecordIn],
    ) -> Result<Seq, ApplianceError> {
        if let Some(failure) = self.failure.borrow().clone() {
            return Err(ApplianceError::Fenced(failure));
        }
        if volume.removed.load(Ordering::Relaxed) {
            return Err(ApplianceError::Refused(format!(
                "volume {} was removed from group {}",
                volume.name, self.name
            )));
        }
        self.last_append_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut history = lock(&self.history);
        let mut locations = Vec::with_capacity(changes.len());
        let last = match self.journal.append_located(changes, &mut locations) {
            Ok(last) => {
                let first = last.0 + 1 - locations.len() as u64;
                for (i, (c, location)) in changes.iter().zip(&locations).enumerate() {
                    history.note_redo(first + i as u64, redo_ref(c, *location));
                }
                drop(history);
                self.resync_spans.note_batch(changes, last);
                last
            }
            Err(e) => {
                drop(history);
                let what = format!("journal append failed: {e}");
                self.fail(what.clone());
                return Err(ApplianceError::Fenced(what));
            }
        };
        if let Some(last) = changes.iter().map(|c| c.source_seq).max() {
            volume.last_source_seq.fetch_max(last, Ordering::Relaxed);
        }
        // Sync mode ships appended records at once: the host waits for the round trip.
        if let Some(shipping) = self.replication.shipping.as_ref() {
            if shipping.tracks_remote_acks() {
                shipping.wake_shipper();
            }
        }
        Ok(last)
    }

    /// The resync span a recovery point (record `seq`, stamped `timestamp_ns`) falls into,
    /// with the volume's name.
    pub fn resync_span_containing(
        &self,
        seq: u64,
        timestamp_ns: u64,
    ) -> Option<(String, ResyncSpan)> {
        let span = self.resync_spans.containing(seq, timestamp_ns)?;
        Some((self.volume_name(span.volume), span))
    }

    fn volume_name(&self, id: u32) -> String {
        self.read_volumes()
            .values()
            .find(|v| v.id == id)
            .map_or_else(|| format!("volume id {id}"), |v| v.name.clone())
    }

    /// The next `ResyncStart` of `volume` follows marking that began at `since_ns`.
    pub fn note_marking_since(&self, volume: u32, since_ns: u64) {
        self.resync_spans.note_marking_since(volume, since_ns);
    }

    /// Every resync span still known, oldest first, with its volume's name.
    pub fn resync_spans(&self) -> Vec<(String, ResyncSpan)> {
        self.resync_spans
            .list()
            .into_iter()
            .map(|s| (self.volume_name(s.volume), s))
            .collect()
    }

    /// Volumes no splitter connection holds, with the moment since when (ns since the
    /// Unix epoch): their splitters may be marking, so points from then on may lack writes
    /// acknowledged to their hosts (DESIGN.md rule 7).
    pub fn volumes_down(&self) -> Vec<(String, u64)> {
        // A remote copy has no splitters: replication brings the source's recoverable points.
        if self.refuse_local_changes_at_remote_copy().is_err() {
            return Vec::new();
        }
        self.volumes()
            .iter()
            .filter_map(|v| v.link.down_since_ns().map(|since| (v.name.clone(), since)))
            .collect()
    }

    /// Why a point taken now would not be recoverable, if it would not be: a volume of the
    /// group has no split link (its splitter may be marking) or is resynchronising.
    pub fn not_recoverable_now(&self) -> Option<String> {
        if let Some((name, since)) = self.volumes_down().into_iter().next() {
            return Some(format!(
                "volume {name:?} has no connected splitter since {}: its splitter may be in \
                 marking mode, acknowledging host writes the journal does not have",
                crate::point::format_time(since)
            ));
        }
        self.resync_spans.open().map(|span| {
            format!(
                "volume {} is resynchronising (since seq {}): the journal lacks regions of it \
                 until the resync ends",
                self.volume_name(span.volume),
                span.start
            )
        })
    }

    /// Asks the sync thread to make everything appended so far durable, then raise
    /// `progress.durable` to `source_seq`.
    pub fn request_sync(
        &self,
        source_seq: u64,
        progress: &Arc<ConnectionProgress>,
    ) -> Result<(), String> {
        let sync_tx = self.sync_tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sync_tx) = sync_tx.as_ref() else {
            return Err("group is stopping".into());
        };
        sync_tx
            .try_send(SyncRequest {
                source_seq,
                progress: Arc::clone(progress),
            })
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => {
                    format!("more than {SYNC_REQUESTS_MAX} flushes outstanding")
                }
                mpsc::TrySendError::Disconnected(_) => "group is stopping".into(),
            })
    }

    /// Takes a bookmark after every write already acknowledged to a host and makes it
    /// durable; refused once `append_deadline` has passed. Blocks on an fsync: call from a
    /// blocking thread.
    pub fn create_bookmark(
        &self,
        payload: BookmarkPayload,
        append_deadline: Option<Instant>,
    ) -> Result<Bookmark, String> {
        if let Some(failure) = self.failure.borrow().clone() {
            return Err(failure);
        }
        self.refuse_local_changes_at_remote_copy()?;
        self.bookmarks
            .create(&self.journal, payload, append_deadline, |what| {
                self.fail(what)
            })
    }

    /// The bookmarks still in the journal, oldest first.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        let mut list = self.bookmarks.list(&self.journal);
        let state = self
            .consolidation_state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        for b in &mut list {
            b.consolidated = !state.is_kept(b.seq);
        }
        list
    }

    /// The group's journal, for read-only scans (point lookup, timeline).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn status(&self) -> GroupStatus {
        let last = self.journal.last_seq().0;
        let distributed = self.distributed.load(Ordering::Relaxed);
        let first_timestamp_ns = match self.retention.window_ns {
            Some(_) => self.journal.first_record_timestamp().unwrap_or_else(|e| {
                tracing::warn!(group = %self.name, "reading the oldest journal record: {e}");
                None
            }),
            None => None,
        };
        let (logical, stored) = self.journal.write_bytes_since_open();
        GroupStatus {
            name: self.name.clone(),
            journal_bytes: self.journal.size_bytes(),
            journal_segments: self.journal.segment_count(),
            first_seq: self.journal.first_seq().0,
            last_seq: last,
            durable_seq: self.journal.durable_seq().0,
            distributed_seq: distributed,
            lag_records: last.saturating_sub(distributed),
            journal_capacity_bytes: self.retention.capacity_bytes,
            journal_over_capacity: self.over_capacity.load(Ordering::Relaxed),
            journal_full_policy: self.journal_full_policy,
            journal_throttling: self.over_capacity.load(Ordering::Relaxed)
                && self.journal_full_policy == JournalFullPolicy::Throttle,
            journal_retention_s: self.retention.window_ns.map(|w| w / 1_000_000_000),
            first_timestamp_ns,
            journal_write_logical_bytes: logical,
            journal_write_stored_bytes: stored,
            journal_compression_ratio: if stored == 0 {
                1.0
            } else {
                logical as f64 / stored as f64
            },
            failure: self.failure.borrow().clone(),
            undo_bytes: self.undo.size_bytes(),
            oldest_point_seq: self.oldest_point().0,
            replica_held_at: lock(&self.hold).map(|s| s.0),
            history: lock(&self.history).stats(),
            consolidation: self.consolidation_status(),
            volumes: self
                .read_volumes()
                .values()
                .map(|v| VolumeStatus {
                    name: v.name.clone(),
                    size: v.size,
                    replica: v.replica_path.display().to_string(),
                    connected: v.connected.load(Ordering::Relaxed),
                    last_source_seq: v.last_source_seq.load(Ordering::Relaxed),
                })
                .collect(),
            source: self.replication.source,
            remote: self
                .replication
                .shipping
                .as_ref()
                .map(|shipping| shipping.status(last)),
            replication_source: (self.replication.source == crate::config::GroupSource::Remote)
                .then(|| {
                    self.replication
                        .receiving
                        .status(self.journal.durable_seq().0)
                }),
        }
    }

    /// Stops the sync thread after a final sync, then lets distribution catch up and checkpoint.
    /// Link connections must be closed first.
    pub fn stop(&self) {
        self.sync_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut threads = threads.into_iter();
        if let Some(sync) = threads.next() {
            let _ = sync.join();
        }
        self.stop_distribution.store(true, Ordering::Relaxed);
        let _ = self.distribution_wake.try_send(());
        for t in threads {
            let _ = t.join();
        }
    }

    /// The oldest point an image can show: retention released what lies below, and the
    /// undo stream holds nothing older than its floor.
    pub fn oldest_point(&self) -> Seq {
        let oldest = self
            .undo_floor
            .max(self.journal.first_seq().0.saturating_sub(1));
        // Consolidation may have dropped that point: the oldest kept one is the oldest.
        let state = self
            .consolidation_state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if state.is_kept(oldest) {
            return Seq(oldest);
        }
        Seq(state
            .kept
            .range(oldest..)
            .next()
            .copied()
            .unwrap_or(state.consolidated_below))
    }

    /// Keeps retention away from what an image at `at` reads; refuses points outside the
    /// window. Returns the pin to give back to `unpin`.
    pub fn pin_point(&self, at: Seq) -> Result<u64, ApplianceError> {
        let mut pins = lock(&self.pins);
        self.check_recoverable(at).map_err(|e| match e.code {
            cdp_link::control_socket::ErrorCode::NotFound => ApplianceError::NotFound(e.message),
            _ => ApplianceError::Refused(e.message),
        })?;
        let id = self.next_pin.fetch_add(1, Ordering::Relaxed);
        pins.insert(id, at);
        Ok(id)
    }

    pub fn unpin(&self, pin: u64) {
        lock(&self.pins).remove(&pin);
    }

    /// Waits until the replica is exact again after a restart (distribution re-applies the
    /// records after the last checkpoint), asking distribution to hurry.
    pub fn wait_replica_exact(&self, timeout: Duration) -> Result<(), ApplianceError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = *self.replica_state.read().unwrap_or_else(|p| p.into_inner());
            if state.exact {
                return Ok(());
            }
            if let Some(f) = self.failure.borrow().clone() {
                return Err(ApplianceError::Fenced(f));
            }
            if Instant::now() >= deadline {
                return Err(ApplianceError::Busy(format!(
                    "the replica is still catching up after a restart (at seq {} of {}); try again shortly",
                    state.seq, state.exact_from
                )));
            }
            self.urgent.store(true, Ordering::Relaxed);
            let _ = self.distribution_wake.try_send(());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads `buf.len()` bytes of `volume` at `offset` as they were at point `at`, which
    /// the caller has pinned. Blocks on disk reads: call from a blocking thread.
    pub fn read_at_point(
        &self,
        volume: &GroupVolume,
        at: Seq,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ApplianceError> {
        let _locations_stay = self.relocation.read().unwrap_or_else(|p| p.into_inner());
        let state = self.replica_state.read().unwrap_or_else(|p| p.into_inner());
        if !state.exact {
            return Err(ApplianceError::Busy(
                "the replica is catching up after a restart; images are readable once it has"
                    .into(),
            ));
        }
        let distributed = state.seq.0;
        let end = offset + buf.len() as u64;
        if buf.is_empty() {
            return Ok(());
        }
        let first_block = offset / BLOCK_BYTES;
        let plans: Vec<BlockPlan> = {
            let history = lock(&self.history);
            (first_block..=(end - 1) / BLOCK_BYTES)
                .map(|b| history.plan(volume.id, b, at.0, distributed))
                .collect()
        };
        // Blocks assembled from journal or undo records cost a record read each; a request
        // with many of them is split in two halves read in parallel.
        let assembled = plans.iter().filter(|p| !p.is_replica_only()).count();
        if assembled >= PARALLEL_ASSEMBLY_BLOCKS_MIN {
            let mid_block = first_block + plans.len() as u64 / 2;
            let split = (mid_block * BLOCK_BYTES - offset) as usize;
            let (head, tail) = buf.split_at_mut(split);
            let (head_plans, tail_plans) = plans.split_at(plans.len() / 2);
            return std::thread::scope(|scope| {
                let tail_done = scope.spawn(|| {
                    self.fill_from_plans(volume, tail_plans, mid_block * BLOCK_BYTES, tail)
                });
                let head_done = self.fill_from_plans(volume, head_plans, offset, head);
                let tail_done = tail_done.join().unwrap_or_else(|_| {
                    Err(ApplianceError::Io(std::io::Error::other(
                        "an image read thread panicked",
                    )))
                });
                head_done.and(tail_done)
            });
        }
        self.fill_from_plans(volume, &plans, offset, buf)
    }

    /// Fills `buf` (volume bytes from `offset`) following `plans`, one per block from the
    /// block holding `offset`.
    fn fill_from_plans(
        &self,
        volume: &GroupVolume,
        plans: &[BlockPlan],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ApplianceError> {
        let first_block = offset / BLOCK_BYTES;
        let end = offset + buf.len() as u64;
        let plan_of = |pos: u64| &plans[(pos / BLOCK_BYTES - first_block) as usize];
        let mut pos = offset;
        let mut block_buf = vec![0u8; BLOCK_BYTES as usize];
        while pos < end {
            let block = pos / BLOCK_BYTES;
            let plan = plan_of(pos);
            if plan.is_replica_only() {
                // Read a run of blocks the replica alone holds in one go.
                let mut run_end = ((block + 1) * BLOCK_BYTES).min(end);
                while run_end < end && plan_of(run_end).is_replica_only() {
                    run_end = (run_end + BLOCK_BYTES).min(end);
                }
                volume.replica.read_into(
                    pos,
                    &mut buf[(pos - offset) as usize..(run_end - offset) as usize],
                )?;
                pos = run_end;
                continue;
            }
            let block_start = block * BLOCK_BYTES;
            let block_len = BLOCK_BYTES.min(volume.size - block_start) as usize;
            let block_buf = &mut block_buf[..block_len];
            self.assemble_block(volume, block_start, plan, block_buf)?;
            let to = ((block + 1) * BLOCK_BYTES).min(end);
            buf[(pos - offset) as usize..(to - offset) as usize].copy_from_slice(
                &block_buf[(pos - block_start) as usize..(to - block_start) as usize],
            );
            pos = to;
        }
        Ok(())
    }

    fn assemble_block(
        &self,
        volume: &GroupVolume,
        start: u64,
        plan: &BlockPlan,
        buf: &mut [u8],
    ) -> Result<(), ApplianceError> {
        match plan {
            BlockPlan::Undo { undo_seq, undo } => {
                if undo.zero {
                    buf.fill(0);
                } else {
                    let from = (start - undo.offset) as usize;
                    self.copy_payload(
                        Stream::Undo,
                        *undo_seq,
                        undo.location,
                        undo.length,
                        from,
                        buf,
                    )?;
                }
            }
            BlockPlan::Layers {
                from_replica,
                layers,
            } => {
                if *from_replica {
                    volume.replica.read_into(start, buf)?;
                } else {
                    buf.fill(0);
                }
                for (seq, r) in layers {
                    let end = start + buf.len() as u64;
                    let from = r.offset.max(start);
                    let to = (r.offset + r.length).min(end);
                    if from >= to {
                        continue;
                    }
                    let dst = &mut buf[(from - start) as usize..(to - start) as usize];
                    if r.kind == RecordKind::Write {
                        let at = (from - r.offset) as usize;
                        self.copy_payload(Stream::Redo, *seq, r.location, r.length, at, dst)?;
                    } else {
                        // Trims and zeroes read as zeroes.
                        dst.fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes of a record's payload from byte `from`. A record no bigger
    /// than a block is read straight into `dst` (from the segment's map when sealed); a
    /// bigger one is read whole, once, and kept in the cache for its other blocks.
    fn copy_payload(
        &self,
        stream: Stream,
        seq: u64,
        location: RecordLocation,
        length: u64,
        from: usize,
        dst: &mut [u8],
    ) -> Result<(), ApplianceError> {
        if length <= BLOCK_BYTES {
            let journal = match stream {
                Stream::Redo => &self.journal,
                Stream::Undo => &self.undo,
            };
            return Ok(journal.read_payload_into(location, Seq(seq), from, dst)?);
        }
        let payload = self.payload(stream, seq, location)?;
        let src = payload.get(from..from + dst.len()).ok_or_else(|| {
            ApplianceError::Io(std::io::Error::other(format!(
                "record {seq} holds {} payload bytes, {} wanted from {from}",
                payload.len(),
                dst.len()
            )))
        })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn payload(
        &self,
        stream: Stream,
        seq: u64,
        location: RecordLocation,
    ) -> Result<bytes::Bytes, ApplianceError> {
        if let Some(p) = self.record_cache.get(stream, seq) {
            return Ok(p);
        }
        let journal = match stream {
            Stream::Redo => &self.journal,
            Stream::Undo => &self.undo,
        };
        let payload = journal.read_at(location, Seq(seq))?.payload;
        self.record_cache.insert(stream, seq, payload.clone());
        Ok(payload)
    }

    /// Holds the replica at `at` for logged access: distribution stops there, and a replica
    /// already past it is rolled back with the undo stream (progress: `rollback_progress`).
    /// Blocks until done: call from a blocking thread.
    pub fn hold_replica(&self, at: Seq) -> Result<(), String> {
        {
            let mut hold = lock(&self.hold);
            if let Some(held) = *hold {
                return Err(format!(
                    "a logged image already holds this group's replica at seq {held}; release it first"
                ));
            }
            *hold = Some(at);
        }
        // Typed inside; `image.rs` (its caller) still passes messages on as strings.
        let result = self.roll_replica_to(at).map_err(String::from);
        if result.is_err() {
            self.release_replica();
        }
        result
    }

    /// Lets distribution carry the replica forward again after logged access.
    pub fn release_replica(&self) {
        *lock(&self.hold) = None;
        self.urgent.store(true, Ordering::Relaxed);
        let _ = self.distribution_wake.try_send(());
    }

    /// Undo records applied by the running rollback, of how many.
    pub fn rollback_progress(&self) -> (u64, u64) {
        (
            self.rollback_progress.0.load(Ordering::Relaxed),
            self.rollback_progress.1.load(Ordering::Relaxed),
        )
    }

    fn roll_replica_to(&self, at: Seq) -> Result<(), ApplianceError> {
        self.wait_replica_exact(Duration::from_secs(600))?;
        // A replica behind the point first catches up to it (distribution stops there).
        while Seq(self.distributed.load(Ordering::Relaxed)) < at {
            if let Some(f) = self.failure.borrow().clone() {
                return Err(ApplianceError::Fenced(f));
            }
            if self.journal.durable_seq() < at {
                self.journal.sync()?;
            }
            self.urgent.store(true, Ordering::Relaxed);
            let _ = self.distribution_wake.try_send(());
            std::thread::sleep(Duration::from_millis(10));
        }
        let _no_consolidation = lock(&self.consolidation_pass);
        let _writer = lock(&self.replica_writer);
        let distributed = self.distributed.load(Ordering::Relaxed);
        if distributed <= at.0 {
            return Ok(());
        }
        // In consolidated history the replica is exact only at kept points (dropped
        // before-images are skipped), so image reads see it only there.
        let consolidated = self
            .consolidation_state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Checkpoint the target first: if the appliance dies mid-rollback, it restarts
        // distribution from `at`, which rewrites every block the rollback may have touched.
        distribution_state::store(&self.state_path, at)?;
        let undos: Vec<(u64, UndoRef)> = {
            let history = lock(&self.history);
            let mut v = Vec::new();
            let mut u = history.undo_next();
            while u > 0 {
                u -= 1;
                let Some(r) = history.undo_ref(u) else { break };
                if r.redo_seq <= at.0 {
                    break;
                }
                if r.redo_seq <= distributed {
                    v.push((u, r));
                }
            }
            v
        };
        self.rollback_progress.0.store(0, Ordering::Relaxed);
        self.rollback_progress
            .1
            .store(undos.len() as u64, Ordering::Relaxed);
        let volumes = self.volumes();
        let by_id: BTreeMap<u32, &GroupVolume> =
            volumes.iter().map(|v| (v.id, v.as_ref())).collect();
        tracing::info!(group = %self.name, from = distributed, to = %at, records = undos.len(), "rolling the replica back");
        // Newest first; a redo record's before-images restore the state just before it, so
        // the replica is exact at `redo_seq - 1` after each record's group.
        let mut i = 0;
        let mut held = None;
        while i < undos.len() {
            let redo_seq = undos[i].1.redo_seq;
            let mut state = held.take().unwrap_or_else(|| {
                self.replica_state
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
            });
            while i < undos.len() && undos[i].1.redo_seq == redo_seq {
                let (undo_seq, r) = undos[i];
                if r.dropped {
                    // No kept point needs it: a later (older) before-image of the same
                    // blocks is applied before the replica is shown again.
                    i += 1;
                    self.rollback_progress.0.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(volume) = by_id.get(&r.volume) else {
                    // Only a volume removed from the group has no entry (ids are never
                    // reused); its replica is no longer the group's to roll.
                    tracing::debug!(
                        undo_seq,
                        volume = r.volume,
                        "undo record of a removed volume skipped"
                    );
                    i += 1;
                    self.rollback_progress.0.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let applied = if r.zero {
                    volume.replica.zero(r.offset, r.length, true)
                } else {
                    self.payload(Stream::Undo, undo_seq, r.location)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|p| volume.replica.write_at(r.offset, &p))
                };
                applied.map_err(|e| {
                    ApplianceError::from(e).context(&format!("rolling back seq {redo_seq}"))
                })?;
                i += 1;
                self.rollback_progress.0.fetch_add(1, Ordering::Relaxed);
            }
            if consolidated.is_kept(redo_seq - 1) {
                state.seq = Seq(redo_seq - 1);
                self.distributed.store(redo_seq - 1, Ordering::Relaxed);
            } else {
                held = Some(state);
            }
        }
        let mut state = held.unwrap_or_else(|| {
            self.replica_state
                .write()
                .unwrap_or_else(|p| p.into_inner())
        });
        state.seq = at;
        self.distributed.store(at.0, Ordering::Relaxed);
        drop(state);
        self.checkpoint()?;
        tracing::info!(group = %self.name, at = %at, "replica rolled back");
        Ok(())
    }

    /// The group's volumes now, by name (a snapshot: volumes may be added or removed).
    pub fn volumes(&self) -> Vec<Arc<GroupVolume>> {
        self.read_volumes().values().cloned().collect()
    }

    /// The journal-full policy, applied before each append from a split link: over
    /// capacity, distribution runs at once so retention can release the oldest history;
    /// under `throttle` the caller must also hold the host's writes (returns true) until
    /// this returns false.
    pub fn journal_full_hold(&self) -> bool {
        // Async replication with `throttle_on_rpo`: the remote copy is further behind than
        // its RPO while the link is up, so the host waits for shipping to catch up.
        if let Some(s) = self
            .replication
            .shipping
            .as_ref()
            .filter(|s| s.rpo_regulated())
        {
            // The byte target is checked on every append, not only at the shipper's
            // once-a-second measurement, so the backlog never grows far past it.
            let shipped = Seq(s.shipped_seq.load(Ordering::Relaxed));
            if s.rpo_throttling()
                || s.config
                    .rpo_bytes
                    .is_some_and(|b| self.journal_bytes_after(shipped) > b)
            {
                return true;
            }
        }
        if !self.over_capacity.load(Ordering::Relaxed) {
            return false;
        }
        self.urge_distribution();
        self.journal_full_policy == JournalFullPolicy::Throttle
    }

    /// Journal bytes holding records after `seq` (what a remote copy at `seq` lacks), to
    /// record precision where the index knows the next change's place, else by segment.
    pub fn journal_bytes_after(&self, seq: Seq) -> u64 {
        let infos = self.journal.segment_infos();
        let next = seq.0 + 1;
        let i = infos
            .partition_point(|s| s.first_seq <= next)
            .saturating_sub(1);
        let Some(holding) = infos.get(i) else {
            return 0;
        };
        let later: u64 = infos[i + 1..].iter().map(|s| s.bytes).sum();
        let in_holding = {
            let history = lock(&self.history);
            (next..next.saturating_add(RPO_BYTES_LOOKAHEAD_RECORDS))
                .find_map(|s| history.redo_ref(s))
                .filter(|r| r.location.segment == holding.index)
                .map_or(holding.bytes, |r| {
                    holding.bytes.saturating_sub(r.location.offset)
                })
        };
        if seq.0 >= self.journal.last_seq().0 {
            return 0;
        }
        in_holding + later
    }

    /// Seq of the last record appended to the journal.
    pub fn last_seq(&self) -> Seq {
        self.journal.last_seq()
    }

    /// The replica holds every record up to this seq.
    pub fn distributed_seq(&self) -> Seq {
        Seq(self.distributed.load(Ordering::Relaxed))
    }

    /// Makes distribution run now rather than wait for a pause in host writes.
    pub fn urge_distribution(&self) {
        self.urgent.store(true, Ordering::Relaxed);
        let _ = self.distribution_wake.try_send(());
    }

    /// Reads the replica's current bytes (no point in time: what distribution has applied).
    pub fn read_replica(
        &self,
        volume: &GroupVolume,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ApplianceError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > volume.size) {
            return Err(ApplianceError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at {offset} is past the end of volume {} ({} bytes)",
                    buf.len(),
                    volume.name,
                    volume.size
                ),
            )));
        }
        volume.replica.read_into(offset, buf)?;
        Ok(())
    }

    fn fail(&self, what: String) {
        tracing::error!(group = %self.name, "group fenced: {what}");
        self.failure.send_replace(Some(what));
    }

    fn sync_loop(&self, rx: mpsc::Receiver<SyncRequest>, interval: Duration) {
        let mut requests = Vec::new();
        loop {
            let stopping = match rx.recv_timeout(interval) {
                Ok(r) => {
                    requests.push(r);
                    requests.extend(rx.try_iter());
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            };
            if self.failure.borrow().is_some() {
                requests.clear();
                if stopping {
                    return;
                }
                continue;
            }
            if !requests.is_empty() || self.journal.durable_seq() < self.journal.last_seq() {
                match self.journal.sync() {
                    Ok(_) => {
                        for r in requests.drain(..) {
                            cdp_link::watermark::raise(&r.progress.durable, r.source_seq);
                        }
                        let _ = self.distribution_wake.try_send(());
                    }
                    Err(e) => {
                        // Never retry a failed fsync: the page cache can no longer be trusted.
                        self.fail(format!("journal sync failed: {e}"));
                        requests.clear();
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    fn distribute_loop(&self, wake: mpsc::Receiver<()>) {
        lower_thread_priority();
        let mut behind_since: Option<Instant> = None;
        loop {
            // A rollback may have moved the replica back: always start from its state.
            let distributed = Seq(self.distributed.load(Ordering::Relaxed));
            // `distributed` is always checkpointed here (distribute_through ends with one).
            self.retain(distributed);
            let stopping = self.stop_distribution.load(Ordering::Relaxed);
            let mut target = self.journal.durable_seq();
            if let Some(hold) = *lock(&self.hold) {
                target = target.min(hold);
            }
            if target > distributed {
                // Replica writes compete with the host for the disk, not only the CPU, so
                // distribution waits for a pause in host writes, unless it has been behind
                // for too long, the appliance is stopping, or images wait for the replica.
                let since = *behind_since.get_or_insert_with(Instant::now);
                let urgent = stopping
                    || since.elapsed() >= self.distribution_delay_max
                    || self.urgent.load(Ordering::Relaxed);
                if !urgent && !self.host_quiet() {
                    let _ = wake.recv_timeout(DISTRIBUTION_HOST_QUIET);
                    continue;
                }
                if let Err(e) = self.distribute_through(target, urgent) {
                    self.fail(format!("distribution failed: {e}"));
                    return;
                }
                if Seq(self.distributed.load(Ordering::Relaxed)) >= target {
                    behind_since = None;
                    self.urgent.store(false, Ordering::Relaxed);
                }
                continue;
            }
            behind_since = None;
            self.urgent.store(false, Ordering::Relaxed);
            if stopping {
                return;
            }
            self.consolidate_if_due();
            let _ = wake.recv_timeout(Duration::from_secs(1));
        }
    }

    /// True when no host change was appended for `DISTRIBUTION_HOST_QUIET`.
    fn host_quiet(&self) -> bool {
        let last = self.last_append_ns.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_nanos() as u64;
        now.saturating_sub(last) >= DISTRIBUTION_HOST_QUIET.as_nanos() as u64
    }

    /// Applies durable records up to `target` to the replicas, checkpointing as it goes.
    /// Before a batch overwrites replica blocks, their old contents go to the undo stream and
    /// that is made durable, so every point the journal holds stays readable. Unless
    /// `urgent`, it stops early (after a checkpoint) when the host starts writing again.
    fn distribute_through(&self, target: Seq, urgent: bool) -> Result<(), ApplianceError> {
        let _writer = lock(&self.replica_writer);
        let from = Seq(self.distributed.load(Ordering::Relaxed));
        let volumes = self.volumes();
        let by_id: BTreeMap<u32, &GroupVolume> =
            volumes.iter().map(|v| (v.id, v.as_ref())).collect();
        // Records below this already have their before-image; the last one captured is
        // captured again, because a crash may have cut its capture short (first capture
        // wins, see `history.rs`).
        let captured_through = lock(&self.history).undo_captured_through();
        let mut batch = Batch::default();
        let mut since_checkpoint = 0u64;
        for record in self.journal.read_from(from.next())? {
            let record = record?;
            if record.seq > target {
                break;
            }
            if let Some(volume) = target_volume(&by_id, &record) {
                if batch.overlaps(&record)
                    || batch.bytes >= DISTRIBUTION_BATCH_BYTES_MAX
                    || batch.records.len() >= DISTRIBUTION_BATCH_RECORDS_MAX
                {
                    since_checkpoint += self.apply_batch(&by_id, &mut batch)?;
                }
                if record.seq.0 >= captured_through && record.seq.0 > self.undo_floor {
                    self.capture_undo(volume, &record)?;
                    batch.captured = true;
                }
                batch.bytes += record.length;
            }
            let seq = record.seq;
            batch.records.push(record);
            if since_checkpoint >= DISTRIBUTION_CHECKPOINT_BYTES_MAX {
                self.checkpoint()?;
                since_checkpoint = 0;
                self.retain(Seq(self.distributed.load(Ordering::Relaxed)));
            }
            if seq >= target {
                break;
            }
            if !urgent
                && seq.0.is_multiple_of(DISTRIBUTION_QUIET_CHECK_RECORDS)
                && !self.host_quiet()
            {
                break;
            }
        }
        self.apply_batch(&by_id, &mut batch)?;
        self.checkpoint()
    }

    /// Makes the batch's before-images durable, then applies its records to the replicas.
    fn apply_batch(
        &self,
        by_id: &BTreeMap<u32, &GroupVolume>,
        batch: &mut Batch,
    ) -> Result<u64, ApplianceError> {
        let Some(last) = batch.records.last().map(|r| r.seq) else {
            return Ok(0);
        };
        if batch.captured {
            self.undo.sync()?;
        }
        let mut bytes = 0;
        let mut state = self
            .replica_state
            .write()
            .unwrap_or_else(|p| p.into_inner());
        for record in &batch.records {
            bytes += apply(by_id, record)?;
            if record.source_seq != 0 && record.kind.change_kind().is_some() {
                let mut seqs = lock(&self.distributed_source_seqs);
                let e = seqs.entry(record.volume).or_default();
                *e = (*e).max(record.source_seq);
            }
        }
        state.seq = last;
        if last >= state.exact_from {
            state.exact = true;
        }
        self.distributed.store(last.0, Ordering::Relaxed);
        drop(state);
        *batch = Batch::default();
        Ok(bytes)
    }

    /// Appends the replica's current contents of the blocks `record` will change to the undo
    /// stream (not yet synced) and indexes them. Ranges without data become payload-less
    /// zero records, so discards and initial zeroing cost no undo space.
    fn capture_undo(&self, volume: &GroupVolume, record: &Record) -> Result<(), ApplianceError> {
        let start = record.offset / BLOCK_BYTES * BLOCK_BYTES;
        let end = (record.offset + record.length)
            .div_ceil(BLOCK_BYTES)
            .saturating_mul(BLOCK_BYTES)
            .min(volume.size);
        let mut at = start;
        let mut pending: Vec<RecordIn> = Vec::new();
        let mut pending_bytes = 0u64;
        while at < end {
            let len = (end - at).min(UNDO_CHUNK_BYTES_MAX);
            let has_data = volume.replica.next_data(at)?.is_some_and(|d| d < at + len);
            let before = if has_data {
                let bytes = volume.replica.read_at(at, len as usize)?;
                if bytes.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(bytes)
                }
            } else {
                None
            };
            let r = match before {
                Some(bytes) => RecordIn::write(volume.id, at, bytes),
                None => RecordIn::range(RecordKind::Zero, volume.id, at, len),
            };
            pending_bytes += r.payload.len() as u64;
            pending.push(r.with_source_seq(record.seq.0));
            if pending_bytes >= UNDO_CHUNK_BYTES_MAX * 8 {
                self.append_undo(&mut pending)?;
                pending_bytes = 0;
            }
            at += len;
        }
        self.append_undo(&mut pending)
    }

    fn append_undo(&self, records: &mut Vec<RecordIn>) -> Result<(), ApplianceError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut history = lock(&self.history);
        let mut locations = Vec::with_capacity(records.len());
        let last = self.undo.append_located(records, &mut locations)?;
        let first = last.0 + 1 - locations.len() as u64;
        for (i, (r, location)) in records.iter().zip(&locations).enumerate() {
            let undo = UndoRef::new(
                *location,
                r.kind,
                r.volume,
                r.offset,
                r.length,
                r.source_seq,
            );
            history.note_undo(first + i as u64, undo)?;
        }
        records.clear();
        Ok(())
    }

    /// One retention pass: releases the oldest journal segments whose records are all at
    /// or below `checkpointed` (durably in the replica) while the journal is over capacity or
    /// they are older than the window. Failures are logged, never fatal: an unreleased
    /// segment only costs disk space.
    fn retain(&self, checkpointed: Seq) {
        // A consolidation pass is moving history; the next pass of retention runs soon.
        let Ok(_no_consolidation) = self.consolidation_pass.try_lock() else {
            return;
        };
        // The undo stream shares the group's capacity with the journal.
        let policy = RetentionPolicy {
            capacity_bytes: self
                .retention
                .capacity_bytes
                .saturating_sub(self.undo.size_bytes()),
            window_ns: self.retention.window_ns,
        };
        // Open images read the records just above their point, and the remote copy still
        // needs what it has not acknowledged: release nothing at or above either, unless the
        // remote copy is configured to be resynchronised by regions instead.
        let pins = lock(&self.pins);
        let release_unshipped = self.replication.shipping.as_ref().is_some_and(|s| {
            s.config.unshipped_history == crate::config::UnshippedHistory::Release
        });
        let pinned = pins
            .iter()
            .filter(|(&id, _)| !(release_unshipped && id == REMOTE_COPY_PIN))
            .map(|(_, &p)| p)
            .min();
        let remote_acked = pins.get(&REMOTE_COPY_PIN).copied();
        let remote_holds = pins
            .get(&REMOTE_COPY_PIN)
            .is_some_and(|&p| Some(p) == pinned);
        let releasable = pinned.map_or(checkpointed, |p| p.min(checkpointed));
        let plan = self
            .journal
            .retention_plan(&policy, releasable, TimestampNs::now().0);
        if let Some(through) = plan.through {
            if let Err(e) = self.persist_source_seqs() {
                tracing::warn!(group = %self.name, "journal retention postponed: {e}");
                return;
            }
            match self.journal.release_through(through) {
                Ok(r) => tracing::info!(
                    group = %self.name,
                    segments = r.segments,
                    bytes = r.bytes,
                    first_seq = %r.first_seq,
                    journal_bytes = self.journal.size_bytes(),
                    "journal segments released"
                ),
                Err(e) => tracing::warn!(group = %self.name, "journal retention failed: {e}"),
            }
            self.release_undo();
            if let Some(acked) = remote_acked.filter(|a| through > *a) {
                tracing::warn!(
                    group = %self.name,
                    remote_acknowledged = %acked,
                    released_through = %through,
                    "journal over capacity: released history the remote copy has not received \
                     (unshipped_history = \"release\"); it will be resynchronised by regions"
                );
            }
        }
        drop(pins);
        // Over capacity only because an open image holds history is not distribution's
        // fault: the host is not held for it (the image's owner is told in the log).
        let distribution_behind = plan.over_capacity
            && (pinned.is_none_or(|p| p >= checkpointed)
                || self
                    .journal
                    .retention_plan(&policy, checkpointed, TimestampNs::now().0)
                    .over_capacity);
        let held_by_images = plan.over_capacity && !distribution_behind;
        if held_by_images && !self.held_by_images.swap(true, Ordering::Relaxed) {
            if remote_holds {
                tracing::warn!(
                    group = %self.name,
                    pinned = ?pinned,
                    "journal over capacity: the remote copy has not acknowledged its oldest \
                     history, which is kept until shipping catches up"
                );
            } else {
                tracing::warn!(
                    group = %self.name,
                    pinned = ?pinned,
                    "journal over capacity while open images hold its oldest history; release them"
                );
            }
        } else if !held_by_images {
            self.held_by_images.store(false, Ordering::Relaxed);
        }
        let was_over = self
            .over_capacity
            .swap(distribution_behind, Ordering::Relaxed);
        if distribution_behind && !was_over {
            tracing::warn!(
                group = %self.name,
                journal_bytes = self.journal.size_bytes(),
                capacity = self.retention.capacity_bytes,
                distributed = %checkpointed,
                policy = ?self.journal_full_policy,
                "journal over capacity: distribution is behind, nothing more can be released \
                 yet; distribution runs now{}",
                if self.journal_full_policy == JournalFullPolicy::Throttle {
                    " and host writes are held until the journal is back within capacity"
                } else {
                    ""
                }
            );
        } else if was_over && !distribution_behind {
            tracing::info!(group = %self.name, "journal back within capacity");
        }
    }

    /// Stores the distributed source_seq maxima (atomically: temp file, fsync, rename).
    fn persist_source_seqs(&self) -> Result<(), ApplianceError> {
        let seqs = self
            .distributed_source_seqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(crate::state_file::store_source_seqs(&self.dir, &seqs)?)
    }

    /// Drops index entries and undo segments for history retention released.
    fn release_undo(&self) {
        let first = self.journal.first_seq().0;
        let through = {
            let mut history = lock(&self.history);
            history.release_redo_before(first);
            history.undo_release_point(first.saturating_sub(1))
        };
        let Some(through) = through else { return };
        match self.undo.release_through(Seq(through)) {
            Ok(r) => {
                lock(&self.history).release_undo_before(self.undo.first_seq().0);
                if r.segments > 0 {
                    tracing::info!(group = %self.name, segments = r.segments, bytes = r.bytes, "undo segments released");
                }
            }
            Err(e) => tracing::warn!(group = %self.name, "undo stream retention failed: {e}"),
        }
    }

    fn checkpoint(&self) -> Result<(), ApplianceError> {
        for v in self.volumes() {
            v.replica.sync_data()?;
        }
        distribution_state::store(
            &self.state_path,
            Seq(self.distributed.load(Ordering::Relaxed)),
        )
    }

    // --- remote replication ---

    /// Retention pins for a group that ships to a remote copy: from open on, nothing the
    /// remote has not acknowledged may be released (the shipper moves the pin as acks come).
    fn replication_pins(config: &GroupConfig) -> BTreeMap<u64, Seq> {
        let mut pins = BTreeMap::new();
        if config.remote.is_some() {
            pins.insert(REMOTE_COPY_PIN, Seq::ZERO);
        }
        pins
    }

    /// Lets retention release records up to `acked` (durable at the remote copy), no more.
    pub fn release_for_remote_copy_through(&self, acked: Seq) {
        lock(&self.pins).insert(REMOTE_COPY_PIN, acked);
    }

    pub fn replication(&self) -> &crate::replication::GroupReplication {
        &self.replication
    }

    /// The id binding this group's journal records (sent in the replication Hello).
    pub fn group_id(&self) -> u64 {
        self.journal.group_id()
    }

    /// A remote copy takes records only from its replication link (rule 6: one writable copy).
    pub fn refuse_local_changes_at_remote_copy(&self) -> Result<(), String> {
        if self.replication.source == crate::config::GroupSource::Remote {
            return Err(format!(
                "group {} is the remote copy of another appliance's group (source = \"remote\"); \
                 it takes changes only from its replication link",
                self.name
            ));
        }
        Ok(())
    }

    /// Appends records shipped from the source group with their original seqs and times,
    /// indexing them like `append` (history for images, resync spans, bookmarks). A record
    /// that does not continue the journal is the peer's error and changes nothing; an I/O
    /// failure fences the group.
    pub fn append_replicated(
        &self,
        records: &[RecordIn],
        first_seq: Seq,
        timestamps_ns: &[u64],
    ) -> Result<Seq, ApplianceError> {
        if let Some(failure) = self.failure.borrow().clone() {
            return Err(ApplianceError::Fenced(failure));
        }
        self.last_append_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut history = lock(&self.history);
        let mut locations = Vec::with_capacity(records.len());
        let last = match self.journal.append_replicated_located(
            records,
            first_seq,
            timestamps_ns,
            &mut locations,
        ) {
            Ok(last) => last,
            Err(cdp_journal::JournalError::InvalidArgument(what)) => {
                return Err(ApplianceError::Refused(what))
            }
            Err(e) => {
                drop(history);
                let what = format!("journal append failed: {e}");
                self.fail(what.clone());
                return Err(ApplianceError::Fenced(what));
            }
        };
        for (i, (r, location)) in records.iter().zip(&locations).enumerate() {
            history.note_redo(first_seq.0 + i as u64, redo_ref(r, *location));
        }
        drop(history);
        self.resync_spans.note_batch(records, last);
        let by_id: BTreeMap<u32, Arc<GroupVolume>> =
            self.volumes().into_iter().map(|v| (v.id, v)).collect();
        for (i, r) in records.iter().enumerate() {
            if r.kind == RecordKind::Bookmark {
                self.bookmarks.note_replicated(
                    Seq(first_seq.0 + i as u64),
                    timestamps_ns[i],
                    &r.payload,
                );
            } else if let Some(v) = by_id.get(&r.volume) {
                // Kept for a later failover: a splitter attaching here resumes from it.
                v.last_source_seq.fetch_max(r.source_seq, Ordering::Relaxed);
            }
        }
        Ok(last)
    }

    /// Makes every replicated record durable (group commit) and lets distribution apply
    /// them. A failure fences the group (never retry an fsync). Blocks: call from a thread.
    pub fn sync_replicated(&self) -> Result<Seq, ApplianceError> {
        match self.journal.sync() {
            Ok(seq) => {
                let _ = self.distribution_wake.try_send(());
                Ok(seq)
            }
            Err(e) => {
                let what = format!("journal sync failed: {e}");
                self.fail(what.clone());
                Err(ApplianceError::Fenced(what))
            }
        }
    }
    // --- end remote replication ---
}

/// The volume a record changes, or `None` for markers and records that cannot apply
/// (unknown volume, past its end: logged, skipped).
fn target_volume<'a>(
    by_id: &BTreeMap<u32, &'a GroupVolume>,
    record: &Record,
) -> Option<&'a GroupVolume> {
    record.kind.change_kind()?;
    let Some(volume) = by_id.get(&record.volume) else {
        tracing::warn!(seq = %record.seq, volume = record.volume, "record for an unknown volume skipped");
        return None;
    };
    let end = record.offset.checked_add(record.length);
    if end.is_none_or(|e| e > volume.size) {
        tracing::error!(seq = %record.seq, volume = %volume.name, "record past the end of the volume skipped");
        return None;
    }
    Some(volume)
}

/// Applies one journal record to its replica; returns the bytes it touched.
fn apply(by_id: &BTreeMap<u32, &GroupVolume>, record: &Record) -> Result<u64, ApplianceError> {
    let Some(volume) = target_volume(by_id, record) else {
        return Ok(0);
    };
    if record.payload_dropped {
        // Consolidated history: a later record of the same blocks, replayed before any
        // kept point, holds the bytes that matter (`consolidation.rs`).
        return Ok(0);
    }
    match record.kind {
        RecordKind::Write => volume.replica.write_at(record.offset, &record.payload)?,
        RecordKind::Trim => volume.replica.trim(record.offset, record.length)?,
        RecordKind::Zero => volume.replica.zero(record.offset, record.length, false)?,
        // Markers change no volume bytes.
        RecordKind::Bookmark | RecordKind::ResyncStart | RecordKind::ResyncEnd => return Ok(0),
    }
    Ok(record.length)
}

/// Records read for distribution whose before-images are captured and which are applied
/// to the replica together, after one undo sync.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    bytes: u64,
    /// Some record's before-image was appended to the undo stream.
    captured: bool,
}

impl Batch {
    /// A record touching blocks an earlier record of the batch changes must wait: its
    /// before-image has to be read after that record is applied.
    fn overlaps(&self, record: &Record) -> bool {
        let start = record.offset / BLOCK_BYTES;
        let end = (record.offset + record.length).div_ceil(BLOCK_BYTES);
        self.records.iter().any(|r| {
            r.volume == record.volume
                && r.kind.change_kind().is_some()
                && r.offset / BLOCK_BYTES < end
                && start < (r.offset + r.length).div_ceil(BLOCK_BYTES)
        })
    }
}

fn redo_ref(c: &RecordIn, location: RecordLocation) -> Option<RedoRef> {
    RedoRef::new(location, c.kind, c.volume, c.offset, c.length)
}

/// The retention pin id the remote-copy shipper holds (image pins count from 1).
const REMOTE_COPY_PIN: u64 = 0;
/// `journal_bytes_after` looks this far for the next record the index places.
const RPO_BYTES_LOOKAHEAD_RECORDS: u64 = 64;

/// Distinguishes a group's undo stream from its journal in the records' CRCs, so one can
/// never be read as the other.
const UNDO_STREAM_ID_SALT: u64 = 0x554e_444f_5354_524d; // "UNDOSTRM"

/// The seq the undo stream started at (`undo_floor.state`). Points below it have no
/// before-images (the group was distributed before the stream existed).
fn load_or_create_undo_floor(dir: &Path, distributed: Seq) -> Result<u64, ApplianceError> {
    match crate::state_file::load_undo_floor(dir)? {
        Some(floor) => Ok(floor),
        None => {
            crate::state_file::store_undo_floor(dir, distributed.0)?;
            Ok(distributed.0)
        }
    }
}

/// Reads the headers of the journal and the undo stream back into a block index.
fn rebuild_history(journal: &Journal, undo: &Journal) -> Result<History, ApplianceError> {
    let mut history = History::new(journal.first_seq().0, undo.first_seq().0);
    let mut reader = journal.read_headers_from(journal.first_seq())?;
    while let Some(r) = reader.next() {
        let r = r?;
        let Some(location) = reader.last_location() else {
            continue;
        };
        let redo = RedoRef::new(location, r.kind, r.volume, r.offset, r.length)
            .filter(|_| !r.payload_dropped);
        history.note_redo(r.seq.0, redo);
    }
    let mut reader = undo.read_headers_from(undo.first_seq())?;
    while let Some(r) = reader.next() {
        let r = r?;
        let Some(location) = reader.last_location() else {
            continue;
        };
        let mut undo = UndoRef::new(location, r.kind, r.volume, r.offset, r.length, r.source_seq);
        undo.dropped = r.payload_dropped;
        history.note_undo(r.seq.0, undo)?;
    }
    Ok(history)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn open_volume(v: &VolumeConfig, id: u32) -> Result<GroupVolume, ApplianceError> {
    let replica = BlockFile::create_sparse(&v.replica, v.size).map_err(|e| {
        ApplianceError::Config(format!(
            "volume {}: replica {}: {e}",
            v.name,
            v.replica.display()
        ))
    })?;
    if replica.size() < v.size {
        return Err(ApplianceError::Config(format!(
            "volume {}: replica {} holds {} bytes, the volume has {}",
            v.name,
            v.replica.display(),
            replica.size(),
            v.size
        )));
    }
    Ok(GroupVolume {
        id,
        name: v.name.clone(),
        size: v.size,
        replica_path: v.replica.clone(),
        replica,
        connected: AtomicBool::new(false),
        last_source_seq: AtomicU64::new(0),
        removed: AtomicBool::new(false),
        link: crate::volume_link::VolumeLink::default(),
    })
}

/// How long removing a volume waits for distribution to apply its last changes.
const VOLUME_REMOVE_DISTRIBUTION_WAIT: Duration = Duration::from_secs(60);

/// How long removing a volume waits for its splitter's connection to close.
const VOLUME_REMOVE_DISCONNECT_WAIT: Duration = Duration::from_secs(3);

/// Finds each volume's last splitter source_seq by reading the journal backwards in
/// segment-sized steps, so a restarted splitter link resumes without gaps or duplicates.
fn recover_last_source_seqs(
    journal: &Journal,
    volumes: &BTreeMap<String, Arc<GroupVolume>>,
) -> Result<(), ApplianceError> {
    let mut by_id: BTreeMap<u32, &GroupVolume> =
        volumes.values().map(|v| (v.id, v.as_ref())).collect();
    for start in journal.segment_first_seqs().into_iter().rev() {
        if by_id.is_empty() {
            break;
        }
        let mut found: BTreeMap<u32, u64> = BTreeMap::new();
        for record in journal.read_from(start)? {
            let record = record?;
            if by_id.contains_key(&record.volume) && record.source_seq != 0 {
                let e = found.entry(record.volume).or_default();
                *e = (*e).max(record.source_seq);
            }
        }
        for (id, seq) in found {
            if let Some(v) = by_id.remove(&id) {
                v.last_source_seq.store(seq, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn spawn_named(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, ApplianceError> {
    Ok(std::thread::Builder::new().name(name).spawn(f)?)
}

/// Distribution must not steal the host's share of the machine: it runs under SCHED_IDLE,
/// so it only gets CPU time no host-facing thread wants. Where that is refused, nice 19.
fn lower_thread_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 means the calling thread; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        // SAFETY: gettid and setpriority take no pointers; on Linux PRIO_PROCESS with a
        // thread id changes only this thread.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
}
