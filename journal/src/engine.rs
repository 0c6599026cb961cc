//! The journal of one consistency group: append, group-committed sync, and the state
//! readers share. Files are handled by `segment`, bytes by `format`, opening by `recover`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use cdp_types::{Seq, TimestampNs};

use crate::config::JournalConfig;
use crate::env::{DirLock, Env};
use crate::error::JournalError;
use crate::format::{RecordHeader, RECORD_FLAG_ZSTD, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::group_commit::{CommitError, GroupCommit};
use crate::limits::{
    BATCH_BYTES_MAX, BATCH_RECORDS_MAX, COMPRESS_LEVEL, COMPRESS_PAYLOAD_BYTES_MIN,
    PAYLOAD_COPY_BYTES_MAX, SCRATCH_BYTES_RETAINED_MAX, TAIL_CHECKPOINT_BYTES,
};
use crate::reader::JournalReader;
use crate::record::RecordKind;
use crate::record::{Record, RecordIn, RecordLocation};
use crate::recover::{self, RecoveryReport, FIRST_SEGMENT_INDEX};
use crate::segment::Segment;
use crate::time_index::{self, TimeIndex};

/// Name of the directory, inside the directory given to `open`, holding the segments.
pub const JOURNAL_DIR_NAME: &str = "journal";
/// Lock file inside the journal directory.
const LOCK_FILE_NAME: &str = "LOCK";

/// An open journal. `Send + Sync`: share it as `Arc<Journal>`; appends are serialized by
/// an internal mutex, syncs are group-committed, readers run without blocking appends.
pub struct Journal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.inner.dir)
            .field("group_id", &self.inner.group_id)
            .field("last_seq", &self.inner.last_seq())
            .field("durable_seq", &self.inner.commit.durable())
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) group_id: u64,
    config: JournalConfig,
    pub(crate) env: Env,
    writer: Mutex<Writer>,
    /// Every segment, in index order; the last one is being appended to. Retention
    /// removes segments from the front; appends add them at the back.
    pub(crate) segments: RwLock<Vec<Arc<Segment>>>,
    /// Held by the one retention pass that may run at a time (see `retention.rs`).
    pub(crate) release: Mutex<()>,
    /// Sampled seq/time marks of every segment (`time_index.rs`). Lock order: after
    /// `writer` and after `segments`, never held while taking either.
    pub(crate) times: Mutex<TimeIndex>,
    /// Segment index and length of the last tail checkpoint written.
    tail_checkpoint: Mutex<(u64, u64)>,
    commit: GroupCommit,
    /// Highest seq whose append has returned; readers and `sync` targets use it.
    last_seq: AtomicU64,
    /// Write payload bytes appended since open: as the host wrote them, and as stored.
    write_logical_bytes: AtomicU64,
    write_stored_bytes: AtomicU64,
    _lock: DirLock,
}

/// State only the appender touches, behind `Inner::writer`.
struct Writer {
    active: Arc<Segment>,
    next_seq: u64,
    last_timestamp_ns: u64,
    /// Record headers (and small payloads) of the batch being written, reused.
    scratch: Vec<u8>,
    /// How the batch's bytes are laid out: scratch ranges and big payloads, reused.
    plan: Vec<Piece>,
}

/// One contiguous piece of a batch write.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Scratch { start: usize, end: usize },
    Payload { record: usize },
}

impl Inner {
    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        // A panic under the writer lock (an assert) leaves the journal in an unknown
        // state: fence, so nothing more is appended or acknowledged until reopen.
        self.writer.lock().unwrap_or_else(|e| {
            self.commit.fence();
            e.into_inner()
        })
    }

    pub(crate) fn segments(&self) -> RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The segment holding `seq` (the last one whose first seq is ≤ `seq`), or the first.
    pub(crate) fn segment_for(&self, seq: u64) -> Arc<Segment> {
        let segs = self.segments();
        let i = segs.partition_point(|s| s.first_seq <= seq);
        segs[i.saturating_sub(1)].clone()
    }

    /// The marks of `active`'s first `written` bytes if a tail checkpoint is due (at least
    /// `TAIL_CHECKPOINT_BYTES` since the last one). Called under the writer lock, so the
    /// active segment's marks end exactly at `written`.
    fn tail_due(&self, active: &Segment, written: u64) -> Option<(time_index::SegmentMarks, u64)> {
        let mut last = self
            .tail_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let since = if last.0 == active.index { last.1 } else { 0 };
        if written < since + TAIL_CHECKPOINT_BYTES {
            return None;
        }
        let marks = self.times().segment(active.index)?.prefix(written);
        *last = (active.index, written);
        Some((marks, written))
    }

    pub(crate) fn times(&self) -> MutexGuard<'_, TimeIndex> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The segment with index `index`, if it is still kept.
    pub(crate) fn segment_by_index(&self, index: u64) -> Option<Arc<Segment>> {
        let segs = self.segments();
        let i = segs.partition_point(|s| s.index < index);
        segs.get(i).filter(|s| s.index == index).cloned()
    }

    /// The segment after `index`, if it exists yet.
    pub(crate) fn segment_after(&self, index: u64) -> Option<Arc<Segment>> {
        let segs = self.segments();
        let i = segs.partition_point(|s| s.index <= index);
        segs.get(i).cloned()
    }

    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Seals the active segment and starts the next. The sealed segment is fdatasynced
    /// first so `sync` only ever needs to fdatasync the active one.
    fn roll(&self, w: &mut Writer) -> Result<(), JournalError> {
        if let Err(e) = w.active.sync() {
            // Never retry fsync: the page cache may have dropped the failed pages.
            self.commit.fence();
            return Err(e);
        }
        let index = w.active.index + 1;
        let seg = Segment::create(
            &self.env,
            &self.dir,
            self.group_id,
            index,
            w.next_seq,
            TimestampNs::now().0,
        )?;
        if let Err(e) = self.env.sync_dir(&self.dir) {
            self.commit.fence();
            return Err(JournalError::io("fsync dir", &self.dir, e));
        }
        let seg = Arc::new(seg);
        self.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(seg.clone());
        // The sealed segment's marks go beside it, so the next open need not scan it.
        if let Some(marks) = self.times().segment(w.active.index) {
            time_index::store(
                &self.dir,
                self.group_id,
                w.active.first_seq,
                w.active.written(),
                marks,
            );
        }
        w.active = seg;
        tracing::debug!(index, first_seq = w.next_seq, "journal segment started");
        Ok(())
    }
}

impl Journal {
    /// Opens the journal of `group_id` under `dir/journal`, creating it if absent and
    /// recovering it (cutting a torn tail) otherwise.
    pub fn open(
        dir: &Path,
        group_id: u64,
        config: JournalConfig,
    ) -> Result<(Journal, RecoveryReport), JournalError> {
        Journal::open_with_env(dir, group_id, config, Env::new())
    }

    /// `open` with an explicit file-system seam (fault injection in tests).
    pub fn open_with_env(
        dir: &Path,
        group_id: u64,
        mut config: JournalConfig,
        env: Env,
    ) -> Result<(Journal, RecoveryReport), JournalError> {
        config.sanitize()?;
        let jdir = dir.join(JOURNAL_DIR_NAME);
        if !jdir.is_dir() {
            fs::create_dir_all(&jdir).map_err(|e| JournalError::io("mkdir", &jdir, e))?;
            env.sync_dir(dir)
                .map_err(|e| JournalError::io("fsync dir", dir, e))?;
        }
        let lock_path = jdir.join(LOCK_FILE_NAME);
        let lock = DirLock::acquire(&lock_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                JournalError::InvalidArgument(format!("journal {} is already open", jdir.display()))
            } else {
                JournalError::io("lock", &lock_path, e)
            }
        })?;

        let recovered = recover::recover(&env, &jdir, group_id)?;
        let mut report = recovered.report;
        let mut segments: Vec<Arc<Segment>> =
            recovered.segments.into_iter().map(Arc::new).collect();
        if segments.is_empty() {
            let seg = Segment::create(
                &env,
                &jdir,
                group_id,
                FIRST_SEGMENT_INDEX,
                recovered.next_seq,
                TimestampNs::now().0,
            )?;
            env.sync_dir(&jdir)
                .map_err(|e| JournalError::io("fsync dir", &jdir, e))?;
            segments.push(Arc::new(seg));
            report.segments = 1;
            report.last_seq = Seq(recovered.next_seq - 1);
        }
        let active = segments[segments.len() - 1].clone();
        let last_seq = recovered.next_seq - 1;
        let times = open_time_index(&jdir, group_id, &segments, recovered.last_marks)?;
        // The journal does not know its group; its directory (groups/NAME/journal) names it.
        // A clean open is the caller's to announce with the group's name (debug here).
        if report.tail_cut.is_some() {
            tracing::warn!(dir = %jdir.display(), "journal recovered with a cut tail: {report}");
        } else {
            tracing::debug!(dir = %jdir.display(), "journal opened: {report}");
        }
        let inner = Inner {
            dir: jdir,
            group_id,
            config,
            env,
            writer: Mutex::new(Writer {
                active,
                next_seq: recovered.next_seq,
                last_timestamp_ns: recovered.last_timestamp_ns,
                scratch: Vec::new(),
                plan: Vec::new(),
            }),
            segments: RwLock::new(segments),
            release: Mutex::new(()),
            times: Mutex::new(times),
            tail_checkpoint: Mutex::new((0, 0)),
            // Recovery fdatasynced the last segment, so all it found is durable.
            commit: GroupCommit::new(last_seq),
            last_seq: AtomicU64::new(last_seq),
            write_logical_bytes: AtomicU64::new(0),
            write_stored_bytes: AtomicU64::new(0),
            _lock: lock,
        };
        Ok((
            Journal {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// Appends `records` in order (to the page cache; call `sync` for durability) and
    /// returns the seq of the last one; an empty slice returns the current `last_seq`.
    /// All records of one call share a timestamp; timestamps never go backwards.
    ///
    /// On error no record of the batch is visible, unless the journal is fenced (then it
    /// must be reopened, and recovery shows which records reached the disk).
    pub fn append(&self, records: &[RecordIn]) -> Result<Seq, JournalError> {
        self.append_inner(records, None)
    }

    /// `append`, also returning where each record was written (same order as `records`),
    /// so an index can later read single records with `read_at`.
    pub fn append_located(
        &self,
        records: &[RecordIn],
        locations: &mut Vec<RecordLocation>,
    ) -> Result<Seq, JournalError> {
        locations.clear();
        self.append_inner(records, Some(locations))
    }

    /// Appends records another journal already numbered and stamped (remote replication),
    /// so points, bookmarks and times mean the same at both sites: `records[i]` gets seq
    /// `first_seq + i` and time `timestamps_ns[i]`. `first_seq` must be this journal's next
    /// seq and the times must not go backwards (also not before this journal's last record);
    /// otherwise `InvalidArgument` and nothing is appended. Locations as in `append_located`.
    pub fn append_replicated_located(
        &self,
        records: &[RecordIn],
        first_seq: Seq,
        timestamps_ns: &[u64],
        locations: &mut Vec<RecordLocation>,
    ) -> Result<Seq, JournalError> {
        if timestamps_ns.len() != records.len() {
            return Err(JournalError::InvalidArgument(format!(
                "{} records but {} timestamps",
                records.len(),
                timestamps_ns.len()
            )));
        }
        if timestamps_ns.windows(2).any(|w| w[1] < w[0]) {
            return Err(JournalError::InvalidArgument(
                "replicated timestamps go backwards".into(),
            ));
        }
        locations.clear();
        self.append_inner_stamped(
            records,
            Some(locations),
            Stamps::Given {
                first_seq: first_seq.0,
                timestamps_ns,
            },
        )
    }

    fn append_inner(
        &self,
        records: &[RecordIn],
        locations: Option<&mut Vec<RecordLocation>>,
    ) -> Result<Seq, JournalError> {
        self.append_inner_stamped(records, locations, Stamps::Now)
    }

    fn append_inner_stamped(
        &self,
        records: &[RecordIn],
        mut locations: Option<&mut Vec<RecordLocation>>,
        stamps: Stamps<'_>,
    ) -> Result<Seq, JournalError> {
        if records.len() > BATCH_RECORDS_MAX {
            return Err(JournalError::InvalidArgument(format!(
                "batch of {} records exceeds {BATCH_RECORDS_MAX}",
                records.len()
            )));
        }
        let mut batch_bytes = 0u64;
        for r in records {
            r.validate()?;
            batch_bytes += RECORD_HEADER_LEN as u64 + r.payload.len() as u64;
        }
        if batch_bytes > BATCH_BYTES_MAX {
            return Err(JournalError::InvalidArgument(format!(
                "batch of {batch_bytes} bytes exceeds {BATCH_BYTES_MAX}"
            )));
        }

        let inner = &*self.inner;
        // Compress before taking the append lock, so concurrent appenders compress in
        // parallel and the lock is held only for the write.
        let stored: Vec<Stored> = records
            .iter()
            .map(|r| Stored::of(r, inner.config.compress_writes))
            .collect();
        let mut guard = inner.lock_writer();
        let w = &mut *guard;
        if inner.commit.is_fenced() {
            return Err(JournalError::Fenced);
        }
        if records.is_empty() {
            return Ok(Seq(w.next_seq - 1));
        }
        let timestamps = match stamps {
            Stamps::Now => {
                let now = TimestampNs::now().0.max(w.last_timestamp_ns);
                w.last_timestamp_ns = now;
                Timestamps::Shared(now)
            }
            Stamps::Given {
                first_seq,
                timestamps_ns,
            } => {
                if first_seq != w.next_seq {
                    return Err(JournalError::InvalidArgument(format!(
                        "replicated records start at seq {first_seq}, the journal's next seq is {}",
                        w.next_seq
                    )));
                }
                // Checked non-empty and non-decreasing by the caller.
                if timestamps_ns[0] < w.last_timestamp_ns {
                    return Err(JournalError::InvalidArgument(format!(
                        "replicated seq {first_seq} is stamped {} ns, before the journal's last record ({} ns)",
                        timestamps_ns[0], w.last_timestamp_ns
                    )));
                }
                w.last_timestamp_ns = timestamps_ns[timestamps_ns.len() - 1];
                Timestamps::PerRecord(timestamps_ns)
            }
        };
        let segment_max = inner.config.segment_bytes_max;

        // The batch is written in parts, one per segment it lands in; usually one part.
        let mut first = 0;
        let mut parts = 0;
        while first < records.len() {
            let seg = w.active.clone();
            let start = seg.written();
            let mut end = start;
            let mut last = first;
            while last < records.len() {
                let size = RECORD_HEADER_LEN as u64 + stored[last].payload.len() as u64;
                // A segment always takes at least one record, however big.
                if end + size > segment_max && end > SEGMENT_HEADER_LEN as u64 {
                    break;
                }
                end += size;
                last += 1;
            }
            if last == first {
                if let Err(e) = inner.roll(w) {
                    if parts > 0 {
                        // Part of this batch is already in an earlier segment.
                        inner.commit.fence();
                    }
                    return Err(e);
                }
                continue;
            }
            encode_part(
                w,
                inner.group_id,
                &seg,
                records,
                &stored,
                first,
                last,
                timestamps,
            );
            let bufs: Vec<&[u8]> = w
                .plan
                .iter()
                .map(|p| match *p {
                    Piece::Scratch { start, end } => &w.scratch[start..end],
                    Piece::Payload { record } => &stored[record].payload[..],
                })
                .collect();
            if let Err(failure) = seg.append(&bufs, end - start) {
                if !failure.undone || parts > 0 {
                    tracing::error!(error = %failure.error, "journal append failed and could not be undone; fencing");
                    inner.commit.fence();
                } else {
                    tracing::warn!(error = %failure.error, "journal append failed; truncated back");
                }
                return Err(failure.error);
            }
            if w.scratch.capacity() > SCRATCH_BYTES_RETAINED_MAX {
                // One huge batch of small records should not pin its buffer forever.
                w.scratch = Vec::new();
            }
            {
                let mut times = inner.times();
                let mut at = start;
                for (k, s) in stored[first..last].iter().enumerate() {
                    let len = RECORD_HEADER_LEN as u64 + s.payload.len() as u64;
                    let seq = w.next_seq + k as u64;
                    times.note(seg.index, seq, timestamps.of(first + k), at, len);
                    at += len;
                }
            }
            if let Some(locations) = locations.as_deref_mut() {
                let mut at = start;
                for s in &stored[first..last] {
                    locations.push(RecordLocation {
                        segment: seg.index,
                        offset: at,
                    });
                    at += RECORD_HEADER_LEN as u64 + s.payload.len() as u64;
                }
            }
            w.next_seq += (last - first) as u64;
            inner.last_seq.store(w.next_seq - 1, Ordering::Release);
            for (r, s) in records[first..last].iter().zip(&stored[first..last]) {
                if r.kind == RecordKind::Write {
                    inner
                        .write_logical_bytes
                        .fetch_add(r.length, Ordering::Relaxed);
                    inner
                        .write_stored_bytes
                        .fetch_add(s.payload.len() as u64, Ordering::Relaxed);
                }
            }
            parts += 1;
            first = last;
        }
        Ok(Seq(w.next_seq - 1))
    }

    /// Group commit: returns `Ok(s)` once every record appended before this call is
    /// durable, with `s` ≥ their seqs. Concurrent callers share one fdatasync. A failed
    /// fdatasync fences the journal: this and every later call fails until reopen.
    pub fn sync(&self) -> Result<Seq, JournalError> {
        let inner = &*self.inner;
        let target = inner.last_seq();
        let result = inner.commit.commit(target, || {
            // Snapshot under the writer lock: every seq ≤ `seq` is in `active` or in an
            // earlier, already fdatasynced segment.
            let (active, seq, tail) = {
                let w = inner.lock_writer();
                let written = w.active.written();
                (
                    w.active.clone(),
                    w.next_seq - 1,
                    inner.tail_due(&w.active, written),
                )
            };
            active.sync()?;
            // Everything in `tail` is durable now: let the next open start after it.
            if let Some(marks) = tail {
                time_index::store(
                    &inner.dir,
                    inner.group_id,
                    active.first_seq,
                    marks.1,
                    &marks.0,
                );
            }
            Ok(seq)
        });
        match result {
            Ok(durable) => Ok(Seq(durable)),
            Err(CommitError::Failed(e)) => {
                tracing::error!(error = %e, "journal fdatasync failed; fencing");
                Err(e)
            }
            Err(CommitError::Fenced) => Err(JournalError::Fenced),
        }
    }

    /// Drops the whole history and continues at `next_seq` (≥ the next seq): every segment
    /// is deleted, oldest first with a directory fsync after each, then an empty segment
    /// starting at `next_seq` is created. For a remote copy resynchronised by regions,
    /// whose replica now holds the state at `next_seq - 1`. A crash midway leaves a suffix
    /// of the old segments, or none (a fresh journal): either way the history reads shorter,
    /// never wrong, and the caller redoes the resync.
    pub fn restart_at(&self, next_seq: Seq) -> Result<(), JournalError> {
        self.restart(next_seq, false)
    }

    /// `restart_at` that may also go back below the next seq: for a copy that diverged from
    /// its new primary and is resynchronised to the primary's `next_seq - 1` (reprotect).
    /// Its own records past that are deliberately dropped (the caller kept them as an
    /// image first); no reader may still hold any (the caller checked no image is open).
    pub fn restart_discarding(&self, next_seq: Seq) -> Result<(), JournalError> {
        self.restart(next_seq, true)
    }

    fn restart(&self, next_seq: Seq, discarding: bool) -> Result<(), JournalError> {
        if next_seq.0 == 0 {
            return Err(JournalError::InvalidArgument("restart at seq 0".into()));
        }
        let inner = &*self.inner;
        let _no_release = inner.release.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = inner.lock_writer();
        if next_seq.0 < w.next_seq && !discarding {
            return Err(JournalError::InvalidArgument(format!(
                "restart at seq {next_seq} would reuse seqs (next is {})",
                w.next_seq
            )));
        }
        let old: Vec<Arc<Segment>> = inner.segments().clone();
        inner.times().clear();
        for seg in &old {
            time_index::remove(&inner.dir, seg.index);
            inner
                .env
                .remove_file(seg.path())
                .map_err(|e| JournalError::io("remove", seg.path(), e))?;
            inner
                .env
                .sync_dir(&inner.dir)
                .map_err(|e| JournalError::io("fsync dir", &inner.dir, e))?;
        }
        let index = w.active.index + 1;
        let seg = Arc::new(Segment::create(
            &inner.env,
            &inner.dir,
            inner.group_id,
            index,
            next_seq.0,
            TimestampNs::now().0,
        )?);
        inner
            .env
            .sync_dir(&inner.dir)
            .map_err(|e| JournalError::io("fsync dir", &inner.dir, e))?;
        *inner.segments.write().unwrap_or_else(|e| e.into_inner()) = vec![seg.clone()];
        w.active = seg;
        w.next_seq = next_seq.0;
        inner.last_seq.store(next_seq.0 - 1, Ordering::Release);
        inner.commit.reset_durable(next_seq.0 - 1);
        Ok(())
    }

    /// Seals the active segment now if it holds at least one record, and starts the next;
    /// returns whether it sealed. The archiver calls it so that the records of a quiet
    /// journal reach the archive within its `seal_after_s` instead of waiting for a full
    /// segment. The sealed segment is fdatasynced, as on every roll.
    pub fn seal_active(&self) -> Result<bool, JournalError> {
        let inner = &*self.inner;
        if inner.commit.is_fenced() {
            return Err(JournalError::Fenced);
        }
        let mut w = inner.lock_writer();
        if w.next_seq == w.active.first_seq {
            return Ok(false);
        }
        inner.roll(&mut w)?;
        Ok(true)
    }

    /// Write payload bytes appended since open: `(logical, stored)`, i.e. as written by
    /// the host and as stored after compression.
    pub fn write_bytes_since_open(&self) -> (u64, u64) {
        (
            self.inner.write_logical_bytes.load(Ordering::Relaxed),
            self.inner.write_stored_bytes.load(Ordering::Relaxed),
        )
    }

    /// Seq of the last appended record (0 if none ever).
    pub fn last_seq(&self) -> Seq {
        Seq(self.inner.last_seq())
    }

    /// Highest seq known durable.
    pub fn durable_seq(&self) -> Seq {
        Seq(self.inner.commit.durable())
    }

    /// Seq of the oldest record kept (or that the next record will get, if there are
    /// none). Records `first_seq..=last_seq` are readable.
    pub fn first_seq(&self) -> Seq {
        Seq(self.inner.segments()[0].first_seq)
    }

    /// Bytes in all segment files (headers included), as far as appends have returned.
    pub fn size_bytes(&self) -> u64 {
        self.inner.segments().iter().map(|s| s.written()).sum()
    }

    /// The first seq of every segment, oldest first; lets a caller scan the journal
    /// backwards a segment at a time.
    pub fn segment_first_seqs(&self) -> Vec<Seq> {
        self.inner
            .segments()
            .iter()
            .map(|s| Seq(s.first_seq))
            .collect()
    }

    pub fn segment_count(&self) -> usize {
        self.inner.segments().len()
    }

    /// Whether a failed fsync or an undoable append fenced the journal.
    pub fn is_fenced(&self) -> bool {
        self.inner.commit.is_fenced()
    }

    /// The directory holding the segment files (`dir/journal`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn group_id(&self) -> u64 {
        self.inner.group_id
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    pub(crate) fn inner_arc(&self) -> Arc<Inner> {
        Arc::clone(&self.inner)
    }

    /// Reads records with seq ≥ `seq` in order, CRC-checked, from the segment files.
    /// The iterator yields what has been appended when `next` is called; it returns
    /// `None` when it catches up and may yield more after later appends. A reader keeps
    /// the journal's files (and its directory lock) open until it is dropped.
    pub fn read_from(&self, seq: Seq) -> Result<JournalReader, JournalError> {
        Ok(JournalReader::new(self.inner.clone(), seq.0.max(1)))
    }

    /// Like `read_from`, but every record except a Bookmark comes back with an empty payload
    /// (`length` still says how many bytes a change covers) and compressed payloads are not
    /// decompressed; Bookmark records keep theirs. Every record is still CRC-checked. For
    /// scans of the whole journal that need seqs, times and bookmarks (bookmark index,
    /// timeline, point-in-time lookup).
    pub fn read_headers_from(&self, seq: Seq) -> Result<JournalReader, JournalError> {
        Ok(JournalReader::new_headers_only(
            self.inner.clone(),
            seq.0.max(1),
        ))
    }

    /// Reads the one record `seq` at `location` (from `append_located` or
    /// `JournalReader::last_location`), CRC-checked and decompressed. Fails if retention
    /// released its segment or the bytes there are not that record.
    pub fn read_at(&self, location: RecordLocation, seq: Seq) -> Result<Record, JournalError> {
        let (segment, sealed) = self.located_segment(location, seq)?;
        crate::reader::read_one(
            &segment,
            self.inner.group_id,
            location.offset,
            seq.0,
            sealed,
        )
    }

    /// Copies part of record `seq`'s payload (from byte `from`) into `dst`, CRC-checked
    /// like `read_at`; for small reads of sealed segments without allocating.
    pub fn read_payload_into(
        &self,
        location: RecordLocation,
        seq: Seq,
        from: usize,
        dst: &mut [u8],
    ) -> Result<(), JournalError> {
        let (segment, sealed) = self.located_segment(location, seq)?;
        crate::reader::payload_into(
            &segment,
            self.inner.group_id,
            location.offset,
            seq.0,
            sealed,
            from,
            dst,
        )
    }

    /// The segment `location` names, and whether it is sealed (a later segment exists, so it
    /// is never appended to or cut again).
    fn located_segment(
        &self,
        location: RecordLocation,
        seq: Seq,
    ) -> Result<(Arc<Segment>, bool), JournalError> {
        let segs = self.inner.segments();
        let i = segs.partition_point(|s| s.index < location.segment);
        match segs.get(i) {
            Some(s) if s.index == location.segment => Ok((s.clone(), i + 1 < segs.len())),
            _ => Err(JournalError::InvalidArgument(format!(
                "seq {seq} was released by retention (segment {} is gone)",
                location.segment
            ))),
        }
    }
}

/// The time index at open: each sealed segment's marks from its marks file (or a scan of
/// it when the file is missing or does not match), the last segment's from recovery's scan.
fn open_time_index(
    dir: &Path,
    group_id: u64,
    segments: &[Arc<Segment>],
    last_marks: time_index::SegmentMarks,
) -> Result<TimeIndex, JournalError> {
    time_index::remove_orphans(dir, segments)?;
    let mut times = TimeIndex::default();
    let mut scanned = 0;
    for pair in segments.windows(2) {
        let (marks, from_file) =
            time_index::load_sealed(dir, group_id, &pair[0], pair[1].first_seq - 1)?;
        scanned += usize::from(!from_file);
        times.push(marks);
    }
    if scanned > 0 {
        tracing::info!(dir = %dir.display(), scanned, "time marks rebuilt by scanning sealed segments");
    }
    // The active segment's marks file, if any, is its tail checkpoint (recovery checked it
    // or ignored it); the next checkpoint or roll replaces it.
    times.push(last_marks);
    Ok(times)
}

/// Who numbers and stamps an append: the journal (now), or another journal (replication).
#[derive(Clone, Copy)]
enum Stamps<'a> {
    Now,
    Given {
        first_seq: u64,
        timestamps_ns: &'a [u64],
    },
}

/// The time each record of a batch gets: one for the whole call, or one per record.
#[derive(Clone, Copy)]
enum Timestamps<'a> {
    Shared(u64),
    PerRecord(&'a [u64]),
}

impl Timestamps<'_> {
    fn of(self, record: usize) -> u64 {
        match self {
            Timestamps::Shared(t) => t,
            Timestamps::PerRecord(all) => all[record],
        }
    }
}

/// A record's payload as it goes to disk, and its flags.
struct Stored {
    flags: u8,
    payload: bytes::Bytes,
}

impl Stored {
    /// Compresses a write's payload when allowed and when that saves at least 1/16.
    fn of(r: &RecordIn, compress: bool) -> Stored {
        let plain = || Stored {
            flags: 0,
            payload: r.payload.clone(),
        };
        if !compress || r.kind != RecordKind::Write || r.payload.len() < COMPRESS_PAYLOAD_BYTES_MIN
        {
            return plain();
        }
        match zstd::bulk::compress(&r.payload, COMPRESS_LEVEL) {
            Ok(z) if z.len() < r.payload.len() - r.payload.len() / 16 => Stored {
                flags: RECORD_FLAG_ZSTD,
                payload: bytes::Bytes::from(z),
            },
            // Incompressible, or zstd refused (out of memory): store as written.
            _ => plain(),
        }
    }
}

/// Encodes records `first..last` for `seg` into the writer's scratch buffer and plan.
#[allow(clippy::too_many_arguments)]
fn encode_part(
    w: &mut Writer,
    group_id: u64,
    seg: &Segment,
    records: &[RecordIn],
    stored: &[Stored],
    first: usize,
    last: usize,
    timestamps: Timestamps<'_>,
) {
    w.scratch.clear();
    w.plan.clear();
    let mut piece_start = 0;
    for (k, r) in records.iter().enumerate().take(last).skip(first) {
        let payload = &stored[k].payload;
        let mut header = RecordHeader {
            kind: r.kind,
            flags: stored[k].flags,
            volume: r.volume,
            seq: w.next_seq + (k - first) as u64,
            timestamp_ns: timestamps.of(k),
            offset: r.offset,
            length: r.length,
            source_seq: r.source_seq,
            payload_len: payload.len() as u32,
            crc: 0,
        };
        let mut out = [0u8; RECORD_HEADER_LEN];
        header.encode(group_id, seg.index, payload, &mut out);
        // Paired assertion: what we write must decode to what we meant.
        debug_assert_eq!(RecordHeader::decode(&out).ok(), Some(header));
        w.scratch.extend_from_slice(&out);
        if payload.len() <= PAYLOAD_COPY_BYTES_MAX {
            w.scratch.extend_from_slice(payload);
        } else {
            w.plan.push(Piece::Scratch {
                start: piece_start,
                end: w.scratch.len(),
            });
            w.plan.push(Piece::Payload { record: k });
            piece_start = w.scratch.len();
        }
    }
    if piece_start < w.scratch.len() {
        w.plan.push(Piece::Scratch {
            start: piece_start,
            end: w.scratch.len(),
        });
    }
}
