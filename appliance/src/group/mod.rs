//! A consistency group at the appliance: a small coordinator of parts around one journal.
//!
//! Link connections append their changes to the group's journal directly, in batches; the
//! journal's append lock defines the group's write order. Flush requests go to the sync
//! thread, whose one fsync serves every flush queued meanwhile (group commit). The
//! distribution thread applies durable records to the replicas in order, behind the host,
//! under SCHED_IDLE, and after each checkpoint runs one retention pass: the oldest journal
//! segments the replica already holds are released once the journal exceeds its capacity or
//! its time window.
//!
//! The parts, one file each: `append.rs` (host and replicated appends, one indexing and
//! fencing path), `sync.rs` (the sync thread), `distribution.rs` (the distribution thread
//! and undo capture), `retention.rs` (retention, pins), `replica.rs` (the replica's state,
//! holds and rollback), `point_read.rs` (reads at a point in time), `volumes.rs` (volumes
//! added and removed at runtime), `markers.rs` (bookmarks, resync spans, recoverability
//! now), `status.rs`, `state.rs` (the group's persistent small state), and the older
//! `consolidate.rs`, `recoverable.rs` and `region_resync.rs`. This file holds the `Group`
//! struct, `open` and `stop`.

mod append;
mod consolidate;
mod distribution;
mod lock_order;
mod markers;
mod point_read;
mod recoverable;
mod region_resync;
mod replica;
mod retention;
mod state;
mod status;
mod sync;
#[cfg(test)]
mod tests;
mod volumes;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cdp_journal::{Journal, JournalConfig, RetentionPolicy};
use cdp_types::Seq;
use tokio::sync::watch;

use crate::bookmark::BookmarkIndex;
use crate::config::{GroupConfig, JournalFullPolicy};
use crate::error::ApplianceError;
use crate::history::{History, RedoRef, UndoRef};
use crate::limits::SYNC_REQUESTS_MAX;
use crate::record_cache::RecordCache;
use crate::resync_span::ResyncSpans;
use crate::watermark::Watermark;

pub use crate::connection_progress::ConnectionProgress;
pub use consolidate::{ConsolidationReport, ConsolidationStatus};
use lock_order::{Rank, RankedMutex, RankedRwLock};
pub use replica::DistributionMark;
use replica::ReplicaState;
use state::GroupState;
pub use status::{GroupStatus, VolumeStatus};
use sync::SyncRequest;
use volumes::open_volumes;
pub use volumes::GroupVolume;

pub struct Group {
    pub name: String,
    journal: Arc<Journal>,
    /// Changes at runtime (`cdp volume add/remove`); readers take a snapshot.
    volumes: RankedRwLock<BTreeMap<String, Arc<GroupVolume>>>,
    sync_tx: RankedMutex<Option<mpsc::SyncSender<SyncRequest>>>,
    /// Distribution's progress: the replica's `ReplicaState` as waiters see it, set with it.
    distribution: Watermark<DistributionMark>,
    retention: RetentionPolicy,
    journal_full_policy: JournalFullPolicy,
    /// Open images or the remote copy keep the journal over capacity (logged once per
    /// episode; the host is not throttled for them).
    held_by_images: AtomicBool,
    /// Set by the last retention pass; a warning is logged once per episode. A watch, so
    /// split links holding host writes under `throttle` wake when it clears.
    over_capacity: watch::Sender<bool>,
    /// Per volume id, the highest source_seq among distributed (hence durable) records.
    /// Written to `source_seqs.state` before segments are released, so a reconnecting
    /// splitter is told the right resume point even when its last change was released.
    distributed_source_seqs: RankedMutex<BTreeMap<u32, u64>>,
    /// The group's small state files (`state.rs`).
    state: GroupState,
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
    threads: RankedMutex<Vec<JoinHandle<()>>>,
    /// Before-images of replica blocks, saved by distribution before it overwrites them.
    undo: Arc<Journal>,
    /// Block index over journal and undo stream (see `history.rs`). Appends hold it across
    /// the journal append, so once a seq is visible every lower change is indexed.
    history: RankedMutex<History>,
    /// What the replica holds. Image reads share it; distribution and rollback take it
    /// exclusively while they change the replica.
    replica_state: RankedRwLock<ReplicaState>,
    /// The undo stream started here: points below were never given before-images.
    undo_floor: u64,
    /// Points that open images read: retention never releases records they need.
    pins: RankedMutex<BTreeMap<u64, Seq>>,
    next_pin: AtomicU64,
    /// While a logged image holds the replica, distribution stops at this seq.
    hold: RankedMutex<Option<Seq>>,
    /// Distribution runs without waiting for a pause in host writes until the replica
    /// reaches this seq (someone waits for the replica: a checksum, an image, a full journal).
    urgent_through: AtomicU64,
    /// Held by whoever writes the replica in bulk: a distribution pass or a rollback.
    replica_writer: RankedMutex<()>,
    /// Undo records applied by the rollback running now, and how many it needs.
    rollback_progress: (AtomicU64, AtomicU64),
    record_cache: RecordCache,
    /// Remote replication role and progress (`replication/`).
    replication: crate::replication::state::GroupReplication,
    /// Primary or secondary, the generation history, a planned failover's drain.
    role: crate::role::GroupRole,
    /// `[[group.volume]] production` of each volume that has one.
    production_paths: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// `[group.consolidation]`, if the group has a policy (`consolidate.rs`).
    consolidation: Option<crate::consolidation::ConsolidationConfig>,
    /// Points consolidation kept: at or below its `through`, other points are refused.
    consolidation_state: RankedRwLock<crate::consolidation::ConsolidationState>,
    /// Held by a consolidation pass, and by rollback and retention, which must not move
    /// history under it.
    consolidation_pass: RankedMutex<()>,
    consolidation_stats: RankedMutex<consolidate::PassStats>,
    /// Image reads hold it shared from planning to reading; consolidation exclusively while
    /// it moves records to their rewritten segments.
    relocation: RankedRwLock<()>,
    /// `[group.archive]` and the archiver's progress, if the group is archived.
    archive: Option<Arc<crate::archiver::state::GroupArchive>>,
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
        let state = GroupState::open(data_dir.join("groups").join(&config.name))?;
        let dir = state.dir();
        let names: Vec<String> = config.volume.iter().map(|v| v.name.clone()).collect();
        let meta = state.meta(&config.name, &names)?;
        journal_config.compress_writes = config.journal_compress;
        let (journal, report) = Journal::open_with_env(
            &dir.join("journal"),
            meta.group_id,
            journal_config.clone(),
            env.clone(),
        )?;
        tracing::info!(group = %config.name, "journal opened: {report}");
        let journal = Arc::new(journal);
        let distributed = state.distributed()?;
        let undo_floor = state.undo_floor_or_create(distributed)?;
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
        let (history, bookmarks, resync_spans) = rebuild_indexes(&journal, &undo)?;
        let consolidation_state = state.consolidation()?;
        let mut exact_from = Seq(history.undo_captured_through());
        // A resynchronisation by regions cut short: the replica is a mix, no image reads it.
        if Group::resync_marker_at_open(&state, journal.first_seq())? {
            exact_from = Seq(u64::MAX);
        }
        tracing::info!(group = %config.name, "history index rebuilt: {}", history.stats());

        let (volumes, distributed_source_seqs) = open_volumes(config, &meta, &journal, &state)?;
        let retention = RetentionPolicy {
            capacity_bytes: config.journal_capacity_bytes,
            window_ns: config
                .journal_retention_s
                .map(|s| s.saturating_mul(1_000_000_000)),
        };

        let replica_state = ReplicaState {
            seq: distributed,
            exact: distributed >= exact_from,
            exact_from,
        };
        let site = config
            .site
            .clone()
            .unwrap_or_else(|| format!("{:016x}", meta.group_id));
        let role = crate::role::GroupRole::open(
            dir,
            config.source == crate::config::GroupSource::Local,
            &site,
            "none",
        )?;
        let (sync_tx, sync_rx) = mpsc::sync_channel(SYNC_REQUESTS_MAX);
        let (wake_tx, wake_rx) = mpsc::sync_channel(1);
        let group = Arc::new(Group {
            name: config.name.clone(),
            journal,
            volumes: RankedRwLock::new(Rank::Volumes, volumes),
            sync_tx: RankedMutex::new(Rank::SyncTx, Some(sync_tx)),
            retention,
            journal_full_policy: config.journal_full_policy,
            held_by_images: AtomicBool::new(false),
            over_capacity: watch::Sender::new(false),
            distributed_source_seqs: RankedMutex::new(
                Rank::DistributedSourceSeqs,
                distributed_source_seqs,
            ),
            failure: watch::Sender::new(None),
            stop_distribution: AtomicBool::new(false),
            distribution_delay_max,
            last_append_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            bookmarks,
            resync_spans,
            distribution_wake: wake_tx,
            threads: RankedMutex::new(Rank::Threads, Vec::new()),
            undo,
            history: RankedMutex::new(Rank::History, history),
            replica_state: RankedRwLock::new(Rank::ReplicaState, replica_state),
            distribution: Watermark::new(replica_state.mark()),
            undo_floor,
            pins: RankedMutex::new(Rank::Pins, Group::replication_pins(config)),
            next_pin: AtomicU64::new(1),
            hold: RankedMutex::new(Rank::Hold, None),
            urgent_through: AtomicU64::new(0),
            replica_writer: RankedMutex::new(Rank::ReplicaWriter, ()),
            rollback_progress: (AtomicU64::new(0), AtomicU64::new(0)),
            record_cache: RecordCache::default(),
            state,
            replication: crate::replication::state::GroupReplication::new(config),
            role,
            production_paths: config
                .volume
                .iter()
                .filter_map(|v| v.production.clone().map(|p| (v.name.clone(), p)))
                .collect(),
            consolidation: config.consolidation.clone(),
            consolidation_state: RankedRwLock::new(Rank::ConsolidationState, consolidation_state),
            consolidation_pass: RankedMutex::new(Rank::ConsolidationPass, ()),
            consolidation_stats: RankedMutex::new(
                Rank::ConsolidationStats,
                consolidate::PassStats::new(),
            ),
            relocation: RankedRwLock::new(Rank::Relocation, ()),
            archive: config
                .archive
                .clone()
                .map(|c| Arc::new(crate::archiver::state::GroupArchive::new(c))),
        });
        group.start_threads(sync_rx, wake_rx, sync_interval)?;
        Ok(group)
    }

    /// Starts the sync and distribution threads.
    fn start_threads(
        self: &Arc<Group>,
        sync_rx: mpsc::Receiver<SyncRequest>,
        wake_rx: mpsc::Receiver<()>,
        sync_interval: Duration,
    ) -> Result<(), ApplianceError> {
        let mut threads = Vec::new();
        let g = Arc::clone(self);
        threads.push(spawn_named(format!("sync-{}", self.name), move || {
            g.sync_loop(sync_rx, sync_interval)
        })?);
        let g = Arc::clone(self);
        threads.push(spawn_named(
            format!("distribute-{}", self.name),
            move || g.distribute_loop(wake_rx),
        )?);
        *self.threads.lock() = threads;
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Option<Arc<GroupVolume>> {
        self.read_volumes().get(name).cloned()
    }

    pub(super) fn read_volumes(
        &self,
    ) -> lock_order::ReadGuard<'_, BTreeMap<String, Arc<GroupVolume>>> {
        self.volumes.read()
    }

    /// The group's volumes now, by name (a snapshot: volumes may be added or removed).
    pub fn volumes(&self) -> Vec<Arc<GroupVolume>> {
        self.read_volumes().values().cloned().collect()
    }

    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    pub(super) fn fail(&self, what: String) {
        tracing::error!(group = %self.name, "group fenced: {what}");
        self.failure.send_replace(Some(what));
        // Waiters for distribution recheck and see the failure.
        self.distribution.bump();
    }

    /// The group's journal, for read-only scans (point lookup, timeline).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Stops the sync thread after a final sync, then lets distribution catch up and checkpoint.
    /// Link connections must be closed first.
    pub fn stop(&self) {
        self.sync_tx.lock().take();
        let threads = std::mem::take(&mut *self.threads.lock());
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

    /// Seq of the last record appended to the journal.
    pub fn last_seq(&self) -> Seq {
        self.journal.last_seq()
    }

    /// The replica holds every record up to this seq.
    pub fn distributed_seq(&self) -> Seq {
        self.distribution.get().distributed
    }

    /// The id binding this group's journal records (sent in the replication Hello).
    pub fn group_id(&self) -> u64 {
        self.journal.group_id()
    }

    /// `[group.archive]` and its progress (the archiver thread updates it).
    pub fn archive(&self) -> Option<&Arc<crate::archiver::state::GroupArchive>> {
        self.archive.as_ref()
    }

    /// The group's directory (`DATA_DIR/groups/NAME`).
    pub fn state_dir(&self) -> &Path {
        self.state.dir()
    }

    pub fn replication(&self) -> &crate::replication::state::GroupReplication {
        &self.replication
    }

    /// A remote copy takes records only from its replication link (rule 6: one writable copy).
    pub fn refuse_local_changes_at_remote_copy(&self) -> Result<(), ApplianceError> {
        if !self.role.is_primary() {
            let facts = self.role.facts();
            let primary = facts
                .history
                .last()
                .map(|e| {
                    format!(
                        " (generation {} is primary at site {:?})",
                        e.generation, e.site
                    )
                })
                .unwrap_or_default();
            return Err(ApplianceError::Refused(format!(
                "group {} is a secondary copy here{primary}; it takes changes only from its \
                 replication link (cdp failover makes it primary)",
                self.name
            )));
        }
        Ok(())
    }

    /// This copy's role, generation history and planned failover drain.
    pub fn role(&self) -> &crate::role::GroupRole {
        &self.role
    }

    /// The production volume this site's splitter serves for `volume` once this copy is
    /// promoted (`[[group.volume]] production`).
    pub fn production_path(&self, volume: &str) -> Option<std::path::PathBuf> {
        self.production_paths.get(volume).cloned()
    }

    /// The timestamp of record `seq`, if the journal still holds it.
    pub fn timestamp_of(&self, seq: u64) -> Option<u64> {
        if seq == 0 || seq < self.journal.first_seq().0 {
            return None;
        }
        crate::bookmark::record_timestamp(&self.journal, Seq(seq)).ok()
    }

    /// The group's directory (`DATA_DIR/groups/NAME`).
    pub fn dir(&self) -> &Path {
        self.state.dir()
    }
}

/// Distinguishes a group's undo stream from its journal in the records' CRCs, so one can
/// never be read as the other.
pub(super) const UNDO_STREAM_ID_SALT: u64 = 0x554e_444f_5354_524d; // "UNDOSTRM"

/// The start-up indexes from one header pass over the journal (one per index measured at
/// about a third of the restart time each): the block index (with the undo stream's
/// headers), the bookmarks and the resync spans.
pub(super) fn rebuild_indexes(
    journal: &Journal,
    undo: &Journal,
) -> Result<(History, BookmarkIndex, ResyncSpans), ApplianceError> {
    let mut history = History::new(journal.first_seq().0, undo.first_seq().0);
    let mut bookmarks = BookmarkIndex::empty();
    let resync_spans = ResyncSpans::default();
    let mut reader = journal.read_headers_from(journal.first_seq())?;
    while let Some(r) = reader.next() {
        let r = r?;
        resync_spans.note(r.kind, r.volume, r.seq.0);
        bookmarks.note_rebuilt(&r);
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
    Ok((history, bookmarks, resync_spans))
}

pub(super) fn spawn_named(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, ApplianceError> {
    Ok(std::thread::Builder::new().name(name).spawn(f)?)
}
