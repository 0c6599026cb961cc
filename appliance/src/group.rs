//! A consistency group at the appliance: one journal, its append, sync and distribution threads.
//!
//! Link connections append their changes to the group's journal directly, in batches; the
//! journal's append lock defines the group's write order. Flush requests go to the sync
//! thread, whose one fsync serves every flush queued meanwhile (group commit). The
//! distribution thread applies durable records to the replicas in order, behind the host,
//! under SCHED_IDLE, and after each checkpoint runs one retention pass: the oldest journal
//! segments the replica already holds are released once the journal exceeds its capacity or
//! its time window.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cdp_journal::{Journal, JournalConfig, Record, RecordIn, RecordKind, RetentionPolicy};
use cdp_types::{BlockFile, Seq, TimestampNs};
use crossbeam::channel;
use serde::Serialize;
use tokio::sync::watch;

use crate::bookmark::{Bookmark, BookmarkIndex, BookmarkPayload};
use crate::config::{GroupConfig, VolumeConfig};
use crate::distribution_state;
use crate::error::ApplianceError;
use crate::group_meta::GroupMeta;
use crate::limits::{
    DISTRIBUTION_CHECKPOINT_BYTES_MAX, DISTRIBUTION_HOST_QUIET, DISTRIBUTION_QUIET_CHECK_RECORDS,
    SYNC_REQUESTS_MAX,
};
use crate::resync_span::{ResyncSpan, ResyncSpans};

/// Progress reported back to one split-link connection; cumulative, so no queue is needed.
pub struct ConnectionProgress {
    pub acked: watch::Sender<u64>,
    pub durable: watch::Sender<u64>,
}

impl ConnectionProgress {
    pub fn new(start: u64) -> Arc<ConnectionProgress> {
        Arc::new(ConnectionProgress {
            acked: watch::Sender::new(start),
            durable: watch::Sender::new(0),
        })
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
    pub volumes: Vec<VolumeStatus>,
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
    volumes: BTreeMap<String, Arc<GroupVolume>>,
    sync_tx: Mutex<Option<channel::Sender<SyncRequest>>>,
    distributed: AtomicU64,
    retention: RetentionPolicy,
    /// Set by the last retention pass; a warning is logged once per episode.
    over_capacity: AtomicBool,
    /// Per volume id, the highest source_seq among distributed (hence durable) records.
    /// Written to `SOURCE_SEQS_FILE` before segments are released, so a reconnecting
    /// splitter is told the right resume point even when its last change was released.
    distributed_source_seqs: Mutex<BTreeMap<u32, u64>>,
    source_seqs_path: PathBuf,
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
    distribution_wake: channel::Sender<()>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Group {
    /// Opens (or creates) the group's journal and replicas and starts its threads.
    pub fn open(
        data_dir: &Path,
        config: &GroupConfig,
        mut journal_config: JournalConfig,
        sync_interval: Duration,
        distribution_delay_max: Duration,
    ) -> Result<Arc<Group>, ApplianceError> {
        let dir = data_dir.join("groups").join(&config.name);
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = config.volume.iter().map(|v| v.name.clone()).collect();
        let meta = GroupMeta::load_or_create(&dir, &config.name, &names)?;
        journal_config.compress_writes = config.journal_compress;
        let (journal, report) = Journal::open(&dir.join("journal"), meta.group_id, journal_config)?;
        tracing::info!(group = %config.name, ?report, "journal opened");
        let journal = Arc::new(journal);

        let mut volumes = BTreeMap::new();
        for v in &config.volume {
            let id = meta.volumes.get(&v.name).copied().ok_or_else(|| {
                ApplianceError::Config(format!("volume {} has no id in group.json", v.name))
            })?;
            volumes.insert(v.name.clone(), Arc::new(open_volume(v, id)?));
        }
        let source_seqs_path = dir.join(SOURCE_SEQS_FILE);
        let released_source_seqs = load_source_seqs(&source_seqs_path)?;
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

        let dist_path = dir.join("distribution.state");
        let distributed = distribution_state::load(&dist_path)?;
        let (sync_tx, sync_rx) = channel::bounded(SYNC_REQUESTS_MAX);
        let (wake_tx, wake_rx) = channel::bounded(1);
        let group = Arc::new(Group {
            name: config.name.clone(),
            journal,
            volumes,
            sync_tx: Mutex::new(Some(sync_tx)),
            distributed: AtomicU64::new(distributed.0),
            retention,
            over_capacity: AtomicBool::new(false),
            distributed_source_seqs: Mutex::new(distributed_source_seqs),
            source_seqs_path,
            failure: watch::Sender::new(None),
            stop_distribution: AtomicBool::new(false),
            distribution_delay_max,
            last_append_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            bookmarks,
            resync_spans,
            distribution_wake: wake_tx,
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let g = Arc::clone(&group);
        threads.push(spawn_named(format!("sync-{}", config.name), move || {
            g.sync_loop(sync_rx, sync_interval)
        })?);
        let g = Arc::clone(&group);
        threads.push(spawn_named(
            format!("distribute-{}", config.name),
            move || g.distribute_loop(wake_rx, &dist_path),
        )?);
        *group.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
        Ok(group)
    }

    pub fn volume(&self, name: &str) -> Option<&Arc<GroupVolume>> {
        self.volumes.get(name)
    }

    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    /// Appends a batch of one volume's changes, in order, and records the last source_seq.
    /// A failure fences the group: nothing after it is acknowledged.
    pub fn append(&self, volume: &GroupVolume, changes: &[RecordIn]) -> Result<(), String> {
        if let Some(failure) = self.failure.borrow().clone() {
            return Err(failure);
        }
        self.last_append_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match self.journal.append(changes) {
            Ok(last) => self.resync_spans.note_batch(changes, last),
            Err(e) => {
                let what = format!("journal append failed: {e}");
                self.fail(what.clone());
                return Err(what);
            }
        }
        if let Some(last) = changes.iter().map(|c| c.source_seq).max() {
            volume.last_source_seq.fetch_max(last, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The resync span a recovery point falls into, with the volume's name.
    pub fn resync_span_containing(&self, seq: u64) -> Option<(String, ResyncSpan)> {
        let span = self.resync_spans.containing(seq)?;
        let name = self
            .volumes
            .values()
            .find(|v| v.id == span.volume)
            .map_or_else(|| format!("volume id {}", span.volume), |v| v.name.clone());
        Some((name, span))
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
                channel::TrySendError::Full(_) => {
                    format!("more than {SYNC_REQUESTS_MAX} flushes outstanding")
                }
                channel::TrySendError::Disconnected(_) => "group is stopping".into(),
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
        self.bookmarks
            .create(&self.journal, payload, append_deadline, |what| {
                self.fail(what)
            })
    }

    /// The bookmarks still in the journal, oldest first.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        self.bookmarks.list(&self.journal)
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
            volumes: self
                .volumes
                .values()
                .map(|v| VolumeStatus {
                    name: v.name.clone(),
                    size: v.size,
                    replica: v.replica_path.display().to_string(),
                    connected: v.connected.load(Ordering::Relaxed),
                    last_source_seq: v.last_source_seq.load(Ordering::Relaxed),
                })
                .collect(),
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

    fn fail(&self, what: String) {
        tracing::error!(group = %self.name, "group fenced: {what}");
        self.failure.send_replace(Some(what));
    }

    fn sync_loop(&self, rx: channel::Receiver<SyncRequest>, interval: Duration) {
        let mut requests = Vec::new();
        loop {
            let stopping = match rx.recv_timeout(interval) {
                Ok(r) => {
                    requests.push(r);
                    requests.extend(rx.try_iter());
                    false
                }
                Err(channel::RecvTimeoutError::Timeout) => false,
                Err(channel::RecvTimeoutError::Disconnected) => true,
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

    fn distribute_loop(&self, wake: channel::Receiver<()>, state_path: &Path) {
        lower_thread_priority();
        let mut distributed = Seq(self.distributed.load(Ordering::Relaxed));
        let mut behind_since: Option<Instant> = None;
        loop {
            // `distributed` is always checkpointed here (distribute_through ends with one).
            self.retain(distributed);
            let stopping = self.stop_distribution.load(Ordering::Relaxed);
            let target = self.journal.durable_seq();
            if target > distributed {
                // Replica writes compete with the host for the disk, not only the CPU, so
                // distribution waits for a pause in host writes, unless it has been behind
                // for too long or the appliance is stopping.
                let since = *behind_since.get_or_insert_with(Instant::now);
                let urgent = stopping || since.elapsed() >= self.distribution_delay_max;
                if !urgent && !self.host_quiet() {
                    let _ = wake.recv_timeout(DISTRIBUTION_HOST_QUIET);
                    continue;
                }
                match self.distribute_through(distributed, target, state_path, urgent) {
                    Ok(seq) => distributed = seq,
                    Err(e) => {
                        self.fail(format!("distribution failed: {e}"));
                        return;
                    }
                }
                if distributed >= target {
                    behind_since = None;
                }
                continue;
            }
            behind_since = None;
            if stopping {
                return;
            }
            let _ = wake.recv_timeout(Duration::from_secs(1));
        }
    }

    /// True when no host change was appended for `DISTRIBUTION_HOST_QUIET`.
    fn host_quiet(&self) -> bool {
        let last = self.last_append_ns.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_nanos() as u64;
        now.saturating_sub(last) >= DISTRIBUTION_HOST_QUIET.as_nanos() as u64
    }

    /// Applies durable records after `from` up to `target` to the replicas, checkpointing as it goes.
    /// Unless `urgent`, it stops early (after a checkpoint) when the host starts writing again.
    fn distribute_through(
        &self,
        from: Seq,
        target: Seq,
        state_path: &Path,
        urgent: bool,
    ) -> Result<Seq, ApplianceError> {
        let by_id: BTreeMap<u32, &GroupVolume> =
            self.volumes.values().map(|v| (v.id, v.as_ref())).collect();
        let mut done = from;
        let mut since_checkpoint = 0u64;
        for record in self.journal.read_from(from.next())? {
            let record = record?;
            if record.seq > target {
                break;
            }
            since_checkpoint += apply(&by_id, &record)?;
            if record.source_seq != 0 {
                let mut seqs = self
                    .distributed_source_seqs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let e = seqs.entry(record.volume).or_default();
                *e = (*e).max(record.source_seq);
            }
            done = record.seq;
            self.distributed.store(done.0, Ordering::Relaxed);
            if since_checkpoint >= DISTRIBUTION_CHECKPOINT_BYTES_MAX {
                self.checkpoint(done, state_path)?;
                since_checkpoint = 0;
                self.retain(done);
            }
            if done >= target {
                break;
            }
            if !urgent
                && done.0.is_multiple_of(DISTRIBUTION_QUIET_CHECK_RECORDS)
                && !self.host_quiet()
            {
                break;
            }
        }
        self.checkpoint(done, state_path)?;
        Ok(done)
    }

    /// One retention pass: releases the oldest journal segments whose records are all at
    /// or below `checkpointed` (durably in the replica) while the journal is over capacity or
    /// they are older than the window. Failures are logged, never fatal: an unreleased
    /// segment only costs disk space.
    fn retain(&self, checkpointed: Seq) {
        let plan = self
            .journal
            .retention_plan(&self.retention, checkpointed, TimestampNs::now().0);
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
        }
        let was_over = self
            .over_capacity
            .swap(plan.over_capacity, Ordering::Relaxed);
        if plan.over_capacity && !was_over {
            tracing::warn!(
                group = %self.name,
                journal_bytes = self.journal.size_bytes(),
                capacity = self.retention.capacity_bytes,
                distributed = %checkpointed,
                "journal over capacity: distribution is behind, nothing more can be released yet"
            );
        } else if was_over && !plan.over_capacity {
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
        let text = serde_json::to_vec(&seqs).map_err(std::io::Error::other)?;
        crate::group_meta::write_atomically(&self.source_seqs_path, &text)
    }

    fn checkpoint(&self, distributed: Seq, state_path: &Path) -> Result<(), ApplianceError> {
        for v in self.volumes.values() {
            v.replica.sync_data()?;
        }
        distribution_state::store(state_path, distributed)
    }
}

/// Applies one journal record to its replica; returns the bytes it touched.
fn apply(by_id: &BTreeMap<u32, &GroupVolume>, record: &Record) -> Result<u64, ApplianceError> {
    let Some(volume) = by_id.get(&record.volume) else {
        tracing::warn!(seq = %record.seq, volume = record.volume, "record for an unknown volume skipped");
        return Ok(0);
    };
    let end = record.offset.checked_add(record.length);
    if end.is_none_or(|e| e > volume.size) {
        tracing::error!(seq = %record.seq, volume = %volume.name, "record past the end of the volume skipped");
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
    })
}

/// File in the group directory: per volume id, the highest source_seq that retention may
/// have released from the journal (JSON object).
const SOURCE_SEQS_FILE: &str = "source_seqs.json";

/// Reads `SOURCE_SEQS_FILE`; absent means nothing was ever released.
fn load_source_seqs(path: &Path) -> Result<BTreeMap<u32, u64>, ApplianceError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| ApplianceError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

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
