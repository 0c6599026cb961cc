//! Reads of a volume as it was at a point: each block from the replica, the undo stream or
//! journal records, as the block index plans it.

use cdp_journal::{RecordKind, RecordLocation};
use cdp_types::Seq;

use super::{Group, GroupVolume};
use crate::error::ApplianceError;
use crate::history::{BlockPlan, BLOCK_BYTES};
use crate::limits::{ALLOCATION_BLOCKS_MAX, PARALLEL_ASSEMBLY_BLOCKS_MIN};
use crate::record_cache::Stream;

impl Group {
    /// Which blocks of `[offset, offset + length)` of `volume` differ between points `a`
    /// and `b` (either order), as runs of (length, changed): a block changed when a record
    /// between the two touched it, from the block index alone. Refused when the index no
    /// longer holds every record after the earlier point. At most `ALLOCATION_BLOCKS_MAX`
    /// blocks, like `allocation_at_point`; the client asks again for the rest.
    pub fn changed_between(
        &self,
        volume: &GroupVolume,
        a: Seq,
        b: Seq,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(u64, bool)>, ApplianceError> {
        let (after, through) = (a.0.min(b.0), a.0.max(b.0));
        let end = query_end(offset, length, volume.size);
        let history = self.history.lock();
        if after.saturating_add(1) < history.redo_first() {
            return Err(ApplianceError::NotFound(format!(
                "seq {after} is older than the journal's index (first seq {}); its changes \
                 are gone",
                history.redo_first()
            )));
        }
        Ok(block_runs(offset, end, |block| {
            history.changed(volume.id, block, after, through)
        }))
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
        let _locations_stay = self.relocation.read();
        let state = self.replica_state.read();
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
            let history = self.history.lock();
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

    /// How `length` bytes of `volume` from `offset` are allocated at point `at`, as
    /// consecutive runs of (bytes, reads as zeroes), for NBD's `base:allocation`. Zero where
    /// the index alone shows it (a before-image of zeroes, zero or trim records covering the
    /// block, a replica hole under no later write); data elsewhere, zeroes included. Reads
    /// no payload. At most `runs_max` runs and `ALLOCATION_BLOCKS_MAX` blocks: the runs may
    /// end early, and the caller asks again from there.
    pub fn allocation_at_point(
        &self,
        volume: &GroupVolume,
        at: Seq,
        offset: u64,
        length: u64,
        runs_max: usize,
    ) -> Result<Vec<(u64, bool)>, ApplianceError> {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Source {
            Zero,
            Data,
            /// The replica's bytes as they are: its holes are zero.
            Replica,
        }
        let end = offset.saturating_add(length).min(volume.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let _locations_stay = self.relocation.read();
        let state = self.replica_state.read();
        if !state.exact {
            return Err(ApplianceError::Busy(
                "the replica is catching up after a restart; images are readable once it has"
                    .into(),
            ));
        }
        let distributed = state.seq.0;
        let first_block = offset / BLOCK_BYTES;
        let last_block = ((end - 1) / BLOCK_BYTES).min(first_block + ALLOCATION_BLOCKS_MAX - 1);
        let end = end.min((last_block + 1) * BLOCK_BYTES);
        let sources: Vec<Source> = {
            let history = self.history.lock();
            (first_block..=last_block)
                .map(|b| match history.plan(volume.id, b, at.0, distributed) {
                    BlockPlan::Undo { undo, .. } if undo.zero => Source::Zero,
                    BlockPlan::Undo { .. } => Source::Data,
                    BlockPlan::Layers { layers, .. }
                        if layers.iter().any(|(_, r)| r.kind == RecordKind::Write) =>
                    {
                        Source::Data
                    }
                    // Only zero and trim layers: zeroes over zeroes, or over the replica.
                    BlockPlan::Layers {
                        from_replica: false,
                        ..
                    } => Source::Zero,
                    BlockPlan::Layers { layers, .. } if layers.is_empty() => Source::Replica,
                    // Zeroes over part of the replica's block: data unless it is a hole.
                    BlockPlan::Layers { .. } => Source::Replica,
                })
                .collect()
        };
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let push = |runs: &mut Vec<(u64, bool)>, len: u64, zero: bool| match runs.last_mut() {
            Some(last) if last.1 == zero => last.0 += len,
            _ => runs.push((len, zero)),
        };
        let mut pos = offset;
        let mut i = 0;
        while pos < end && runs.len() < runs_max {
            let source = sources[i];
            let mut j = i + 1;
            while j < sources.len() && sources[j] == source {
                j += 1;
            }
            let run_end = ((first_block + j as u64) * BLOCK_BYTES).min(end);
            match source {
                Source::Zero => push(&mut runs, run_end - pos, true),
                Source::Data => push(&mut runs, run_end - pos, false),
                Source::Replica => {
                    match volume.replica.allocation(
                        pos,
                        run_end - pos,
                        runs_max.saturating_sub(runs.len()).max(1),
                    )? {
                        Some(found) => {
                            let mut covered = 0;
                            for (len, hole) in found {
                                push(&mut runs, len, hole);
                                covered += len;
                            }
                            if covered < run_end - pos {
                                // The replica's runs stopped early: so do ours.
                                return Ok(runs);
                            }
                        }
                        None => push(&mut runs, run_end - pos, false),
                    }
                }
            }
            pos = run_end;
            i = j;
        }
        Ok(runs)
    }

    /// Fills `buf` (volume bytes from `offset`) following `plans`, one per block from the
    /// block holding `offset`.
    pub(super) fn fill_from_plans(
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

    pub(super) fn assemble_block(
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
    pub(super) fn copy_payload(
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

    pub(super) fn payload(
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
}

/// Where a change query from `offset` ends: cut to `ALLOCATION_BLOCKS_MAX` blocks and the
/// volume's size.
fn query_end(offset: u64, length: u64, size: u64) -> u64 {
    let cap = (offset / BLOCK_BYTES + ALLOCATION_BLOCKS_MAX) * BLOCK_BYTES;
    offset.saturating_add(length).min(size).min(cap)
}

/// Runs of (length, flag) over `[offset, end)`, one flag per block from `flag_of(block)`.
fn block_runs(offset: u64, end: u64, mut flag_of: impl FnMut(u64) -> bool) -> Vec<(u64, bool)> {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let block = pos / BLOCK_BYTES;
        let to = ((block + 1) * BLOCK_BYTES).min(end);
        let flag = flag_of(block);
        match runs.last_mut() {
            Some((len, f)) if *f == flag => *len += to - pos,
            _ => runs.push((to - pos, flag)),
        }
        pos = to;
    }
    runs
}
