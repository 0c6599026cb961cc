//! A consistency group at the appliance: one journal, its append, sync and distribution threads.
//!
//! Link connections hand changes to the group's append thread through one bounded queue; the
//! order in which they enter that queue is the group's write order. The append thread writes
//! batches to the journal and acknowledges them; flush requests go on to the sync thread, whose
//! one fsync serves every flush queued meanwhile (group commit). The distribution thread applies
//! durable records to the replicas in order, behind the host, at lower CPU priority.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use cdp_journal::{Journal, JournalConfig, Record, RecordIn, RecordKind};
use cdp_types::{BlockFile, Seq};
use crossbeam::channel;
use serde::Serialize;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{GroupConfig, VolumeConfig};
use crate::distribution_state;
use crate::error::ApplianceError;
use crate::group_meta::GroupMeta;
use crate::limits::{
    APPEND_BATCH_BYTES_MAX, APPEND_BATCH_ITEMS_MAX, APPEND_QUEUE_BYTES_MAX, APPEND_QUEUE_ITEMS_MAX,
    DISTRIBUTION_CHECKPOINT_BYTES_MAX,
};

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

fn raise(w: &watch::Sender<u64>, to: u64) {
    w.send_if_modified(|v| {
        let newer = to > *v;
        if newer {
            *v = to;
        }
        newer
    });
}

/// A change or flush travelling from a link connection to the append thread.
pub enum AppendItem {
    Change {
        volume: Arc<GroupVolume>,
        source_seq: u64,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: Bytes,
        progress: Arc<ConnectionProgress>,
        _permit: OwnedSemaphorePermit,
    },
    Flush {
        source_seq: u64,
        progress: Arc<ConnectionProgress>,
    },
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
    append_tx: Mutex<Option<mpsc::Sender<AppendItem>>>,
    append_window: Arc<Semaphore>,
    distributed: AtomicU64,
    failure: watch::Sender<Option<String>>,
    stop_distribution: AtomicBool,
    distribution_wake: channel::Sender<()>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Group {
    /// Opens (or creates) the group's journal and replicas and starts its threads.
    pub fn open(
        data_dir: &Path,
        config: &GroupConfig,
        journal_config: JournalConfig,
        sync_interval: Duration,
    ) -> Result<Arc<Group>, ApplianceError> {
        let dir = data_dir.join("groups").join(&config.name);
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = config.volume.iter().map(|v| v.name.clone()).collect();
        let meta = GroupMeta::load_or_create(&dir, &config.name, &names)?;
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
        recover_last_source_seqs(&journal, &volumes)?;

        let dist_path = dir.join("distribution.state");
        let distributed = distribution_state::load(&dist_path)?;
        let (append_tx, append_rx) = mpsc::channel(APPEND_QUEUE_ITEMS_MAX);
        let (sync_tx, sync_rx) = channel::bounded(APPEND_QUEUE_ITEMS_MAX);
        let (wake_tx, wake_rx) = channel::bounded(1);
        let group = Arc::new(Group {
            name: config.name.clone(),
            journal,
            volumes,
            append_tx: Mutex::new(Some(append_tx)),
            append_window: Arc::new(Semaphore::new(APPEND_QUEUE_BYTES_MAX)),
            distributed: AtomicU64::new(distributed.0),
            failure: watch::Sender::new(None),
            stop_distribution: AtomicBool::new(false),
            distribution_wake: wake_tx,
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let g = Arc::clone(&group);
        threads.push(spawn_named(format!("append-{}", config.name), move || {
            g.append_loop(append_rx, sync_tx)
        })?);
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

    /// Room in the append queue for a change of `bytes`; link readers wait here when it is full.
    pub async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let cost = bytes.clamp(1, APPEND_QUEUE_BYTES_MAX) as u32;
        match Arc::clone(&self.append_window)
            .acquire_many_owned(cost)
            .await
        {
            Ok(p) => p,
            Err(_) => unreachable!("append window is never closed"),
        }
    }

    /// The sender into the append queue, or None once the group is stopping.
    pub fn append_sender(&self) -> Option<mpsc::Sender<AppendItem>> {
        self.append_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn status(&self) -> GroupStatus {
        let last = self.journal.last_seq().0;
        let distributed = self.distributed.load(Ordering::Relaxed);
        GroupStatus {
            name: self.name.clone(),
            journal_bytes: self.journal.size_bytes(),
            journal_segments: self.journal.segment_count(),
            first_seq: self.journal.first_seq().0,
            last_seq: last,
            durable_seq: self.journal.durable_seq().0,
            distributed_seq: distributed,
            lag_records: last.saturating_sub(distributed),
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

    /// Stops accepting changes, drains the queue, syncs the journal, checkpoints distribution.
    pub fn stop(&self) {
        self.append_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut threads = threads.into_iter();
        // The append thread ends when every sender is gone; link connections drop theirs on shutdown.
        for t in threads.by_ref().take(2) {
            let _ = t.join();
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

    fn append_loop(
        &self,
        mut rx: mpsc::Receiver<AppendItem>,
        sync_tx: channel::Sender<SyncRequest>,
    ) {
        let mut items: Vec<AppendItem> = Vec::with_capacity(APPEND_BATCH_ITEMS_MAX);
        let mut records: Vec<RecordIn> = Vec::with_capacity(APPEND_BATCH_ITEMS_MAX);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = item_bytes(&first);
            items.push(first);
            while items.len() < APPEND_BATCH_ITEMS_MAX && bytes < APPEND_BATCH_BYTES_MAX {
                match rx.try_recv() {
                    Ok(item) => {
                        bytes += item_bytes(&item);
                        items.push(item);
                    }
                    Err(_) => break,
                }
            }
            if self.failure.borrow().is_some() {
                // Fenced: nothing more is acknowledged; connections are being closed.
                items.clear();
                continue;
            }
            records.clear();
            for item in &items {
                if let AppendItem::Change {
                    volume,
                    source_seq,
                    kind,
                    offset,
                    length,
                    payload,
                    ..
                } = item
                {
                    records.push(RecordIn {
                        kind: *kind,
                        volume: volume.id,
                        source_seq: *source_seq,
                        offset: *offset,
                        length: *length,
                        payload: payload.clone(),
                    });
                }
            }
            if !records.is_empty() {
                if let Err(e) = self.journal.append(&records) {
                    self.fail(format!("journal append failed: {e}"));
                    items.clear();
                    continue;
                }
            }
            for item in items.drain(..) {
                match item {
                    AppendItem::Change {
                        volume,
                        source_seq,
                        progress,
                        ..
                    } => {
                        volume
                            .last_source_seq
                            .fetch_max(source_seq, Ordering::Relaxed);
                        raise(&progress.acked, source_seq);
                    }
                    AppendItem::Flush {
                        source_seq,
                        progress,
                    } => {
                        if sync_tx
                            .send(SyncRequest {
                                source_seq,
                                progress,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
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
                            raise(&r.progress.durable, r.source_seq);
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
        loop {
            let target = self.journal.durable_seq();
            if target > distributed {
                match self.distribute_through(distributed, target, state_path) {
                    Ok(seq) => distributed = seq,
                    Err(e) => {
                        self.fail(format!("distribution failed: {e}"));
                        return;
                    }
                }
                continue;
            }
            if self.stop_distribution.load(Ordering::Relaxed) {
                return;
            }
            let _ = wake.recv_timeout(Duration::from_secs(1));
        }
    }

    /// Applies durable records after `from` up to `target` to the replicas, checkpointing as it goes.
    fn distribute_through(
        &self,
        from: Seq,
        target: Seq,
        state_path: &Path,
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
            done = record.seq;
            self.distributed.store(done.0, Ordering::Relaxed);
            if since_checkpoint >= DISTRIBUTION_CHECKPOINT_BYTES_MAX {
                self.checkpoint(done, state_path)?;
                since_checkpoint = 0;
            }
            if self.stop_distribution.load(Ordering::Relaxed) && done >= target {
                break;
            }
        }
        self.checkpoint(done, state_path)?;
        Ok(done)
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
        RecordKind::Bookmark => return Ok(0),
    }
    Ok(record.length)
}

fn item_bytes(item: &AppendItem) -> usize {
    match item {
        AppendItem::Change { payload, .. } => payload.len() + 64,
        AppendItem::Flush { .. } => 0,
    }
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

/// Distribution must not steal the host's share of the machine: run it at nice 10.
fn lower_thread_priority() {
    // SAFETY: gettid and setpriority take no pointers; on Linux PRIO_PROCESS with a thread id
    // changes only this thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
