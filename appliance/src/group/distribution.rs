//! The distribution thread: applies durable records to the replicas in order, behind the
//! host, after saving the before-images of the blocks it overwrites to the undo stream.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cdp_journal::{Record, RecordIn, RecordKind};
use cdp_types::Seq;

use super::{Group, GroupVolume};
use crate::error::ApplianceError;
use crate::history::{UndoRef, BLOCK_BYTES};
use crate::limits::{
    DISTRIBUTION_BATCH_BYTES_MAX, DISTRIBUTION_BATCH_RECORDS_MAX,
    DISTRIBUTION_CHECKPOINT_BYTES_MAX, DISTRIBUTION_HOST_QUIET, DISTRIBUTION_QUIET_CHECK_RECORDS,
    UNDO_CHUNK_BYTES_MAX,
};

impl Group {
    /// Makes everything appended so far durable and waits until distribution applied it.
    pub(crate) fn distribute_everything(&self, timeout: Duration) -> Result<(), ApplianceError> {
        let target = self.journal.last_seq();
        if self.journal.durable_seq() < target {
            self.journal.sync()?;
        }
        self.wait_for_distribution(
            Instant::now() + timeout,
            |mark| mark.distributed >= target,
            |mark| {
                format!(
                    "distribution did not reach seq {target} within {} s (it is at {})",
                    timeout.as_secs(),
                    mark.distributed
                )
            },
        )
    }

    /// Makes distribution run now rather than wait for a pause in host writes.
    /// It stays urgent until the replica holds everything appended now, even when that
    /// takes several passes (a journal sync between them): a waiter urges once.
    pub fn urge_distribution(&self) {
        self.urgent_through
            .fetch_max(self.journal.last_seq().0, Ordering::Relaxed);
        let _ = self.distribution_wake.try_send(());
    }

    pub(super) fn distribute_loop(&self, wake: mpsc::Receiver<()>) {
        lower_thread_priority();
        let mut behind_since: Option<Instant> = None;
        loop {
            // A rollback may have moved the replica back: always start from its state.
            let distributed = self.distributed_seq();
            // `distributed` is always checkpointed here (distribute_through ends with one).
            self.retain(distributed);
            let stopping = self.stop_distribution.load(Ordering::Relaxed);
            let urgent_through = self.urgent_through.load(Ordering::Relaxed);
            let mut target = self.journal.durable_seq();
            if let Some(hold) = *self.hold.lock() {
                target = target.min(hold);
            }
            if target > distributed {
                // Replica writes compete with the host for the disk, not only the CPU, so
                // distribution waits for a pause in host writes, unless it has been behind
                // for too long, the appliance is stopping, or images wait for the replica.
                let since = *behind_since.get_or_insert_with(Instant::now);
                let urgent = stopping
                    || since.elapsed() >= self.distribution_delay_max
                    || urgent_through > distributed.0;
                if !urgent && !self.host_quiet() {
                    let _ = wake.recv_timeout(DISTRIBUTION_HOST_QUIET);
                    continue;
                }
                if let Err(e) = self.distribute_through(target, urgent) {
                    self.fail(format!("distribution failed: {e}"));
                    return;
                }
                if self.distributed_seq() >= target {
                    behind_since = None;
                }
                continue;
            }
            behind_since = None;
            if stopping {
                return;
            }
            self.consolidate_if_due();
            let _ = wake.recv_timeout(Duration::from_secs(1));
        }
    }

    /// True when no host change was appended for `DISTRIBUTION_HOST_QUIET`.
    pub(super) fn host_quiet(&self) -> bool {
        let last = self.last_append_ns.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_nanos() as u64;
        now.saturating_sub(last) >= DISTRIBUTION_HOST_QUIET.as_nanos() as u64
    }

    /// Applies durable records up to `target` to the replicas, checkpointing as it goes.
    /// Before a batch overwrites replica blocks, their old contents go to the undo stream and
    /// that is made durable, so every point the journal holds stays readable. Unless
    /// `urgent`, it stops early (after a checkpoint) when the host starts writing again.
    pub(super) fn distribute_through(
        &self,
        target: Seq,
        urgent: bool,
    ) -> Result<(), ApplianceError> {
        let _writer = self.replica_writer.lock();
        let from = self.distributed_seq();
        let volumes = self.volumes();
        let by_id: BTreeMap<u32, &GroupVolume> =
            volumes.iter().map(|v| (v.id, v.as_ref())).collect();
        // Records below this already have their before-image; the last one captured is
        // captured again, because a crash may have cut its capture short (first capture
        // wins, see `history.rs`).
        let captured_through = self.history.lock().undo_captured_through();
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
                self.retain(self.distributed_seq());
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
    pub(super) fn apply_batch(
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
        let mut state = self.replica_state.write();
        for record in &batch.records {
            bytes += apply(by_id, record)?;
            if record.source_seq != 0 && record.kind.change_kind().is_some() {
                let mut seqs = self.distributed_source_seqs.lock();
                let e = seqs.entry(record.volume).or_default();
                *e = (*e).max(record.source_seq);
            }
        }
        state.seq = last;
        if last >= state.exact_from {
            state.exact = true;
        }
        self.distribution.set(state.mark());
        drop(state);
        *batch = Batch::default();
        Ok(bytes)
    }

    /// Appends the replica's current contents of the blocks `record` will change to the undo
    /// stream (not yet synced) and indexes them. Ranges without data become payload-less
    /// zero records, so discards and initial zeroing cost no undo space.
    pub(super) fn capture_undo(
        &self,
        volume: &GroupVolume,
        record: &Record,
    ) -> Result<(), ApplianceError> {
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

    pub(super) fn append_undo(&self, records: &mut Vec<RecordIn>) -> Result<(), ApplianceError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut history = self.history.lock();
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

    pub(super) fn checkpoint(&self) -> Result<(), ApplianceError> {
        for v in self.volumes() {
            v.replica.sync_data()?;
        }
        self.state.store_distributed(self.distributed_seq())
    }
}

/// The volume a record changes, or `None` for markers and records that cannot apply
/// (unknown volume, past its end: logged, skipped).
pub(super) fn target_volume<'a>(
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
pub(super) fn apply(
    by_id: &BTreeMap<u32, &GroupVolume>,
    record: &Record,
) -> Result<u64, ApplianceError> {
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
pub(super) struct Batch {
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

/// Distribution must not steal the host's share of the machine: it runs under SCHED_IDLE,
/// so it only gets CPU time no host-facing thread wants. Where that is refused, nice 19.
pub(super) fn lower_thread_priority() {
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
