//! A group's consolidation pass: decides the kept points of its old history under its
//! policy (`consolidation.rs`), records them, then rewrites old journal and undo segments
//! without the payloads no kept point needs and moves the block index to the new files.
//!
//! Only history that can never be read any other way is touched: at or below the replica's
//! checkpoint (distribution after a crash replays from there), below every open image's and
//! the remote copy's pin, and older than the policy's `keep_all_s`. The kept points are
//! stored before any file changes, so a crash mid-pass never lets a dropped point be opened.

use std::collections::BTreeSet;
use std::time::Instant;

use cdp_journal::{RecordKind, SegmentRewrite};
use cdp_types::{Seq, TimestampNs};

use super::Group;
use crate::consolidation::{kept_points, needed_payloads, ConsolidationState, PointRecord};
use crate::error::ApplianceError;

/// What one pass did (the answer to `cdp journal consolidate`) and consolidation in `cdp
/// status`: defined by the control protocol.
pub use cdp_control::{ConsolidationReport, ConsolidationStatus};

/// Counters of the passes since start.
pub(super) struct PassStats {
    pub passes: u64,
    pub bytes_freed_total: u64,
    pub last: Option<ConsolidationReport>,
    pub last_run: Option<Instant>,
}

impl PassStats {
    /// The first automatic pass runs one interval after start, not during recovery.
    pub(super) fn new() -> PassStats {
        PassStats {
            passes: 0,
            bytes_freed_total: 0,
            last: None,
            last_run: Some(Instant::now()),
        }
    }
}

impl Group {
    /// Whether point `at` can still be shown exactly, or why not.
    pub(super) fn check_not_consolidated(&self, at: Seq) -> Result<(), ApplianceError> {
        // Read before the state's lock: `oldest_point` takes it too.
        let oldest = self.oldest_point().0;
        let state = self.consolidation_state.read();
        if state.is_kept(at.0) {
            return Ok(());
        }
        let (below, above) = state.neighbours(at.0);
        // A kept point that retention released since is no suggestion.
        let below = below.filter(|&b| b >= oldest);
        let name = |s: Option<u64>| s.map_or("none".to_string(), |s| format!("seq:{s}"));
        Err(ApplianceError::Refused(format!(
            "seq {at} was consolidated away (the group's consolidation policy keeps only some \
             points of history older than keep_all_s); the nearest kept points are {} and {} \
             (see `cdp timeline`)",
            name(below),
            name(above)
        )))
    }

    /// The points consolidation kept so far.
    pub fn consolidation_state(&self) -> ConsolidationState {
        self.consolidation_state.read().clone()
    }

    /// Consolidation in `cdp status`, if the group has a policy.
    pub fn consolidation_status(&self) -> Option<ConsolidationStatus> {
        let config = self.consolidation.as_ref()?;
        // Read before the state's lock: `oldest_point` takes it too.
        let oldest = self.oldest_point().0;
        let state = self.consolidation_state.read();
        let stats = self.consolidation_stats.lock();
        Some(ConsolidationStatus {
            keep_all_s: config.keep_all_s,
            tiers: config.tier.iter().map(|t| (t.every_s, t.for_s)).collect(),
            through_seq: state.consolidated_below.saturating_sub(1),
            kept_points: state.kept.range(oldest..).count(),
            passes: stats.passes,
            bytes_freed_total: stats.bytes_freed_total,
            running: self.consolidation_pass.try_lock().is_none(),
            last: stats.last.clone(),
        })
    }

    /// Runs a pass if the policy's interval has passed since the last (distribution thread).
    pub(super) fn consolidate_if_due(&self) {
        let Some(config) = &self.consolidation else {
            return;
        };
        let due = self
            .consolidation_stats
            .lock()
            .last_run
            .is_none_or(|t| t.elapsed().as_secs() >= config.interval_s);
        if due {
            if let Err(e) = self.consolidate() {
                tracing::warn!(group = %self.name, "consolidation failed: {e}");
            }
        }
    }

    /// One consolidation pass now. Blocks on file work: call from a blocking thread.
    pub fn consolidate(&self) -> Result<ConsolidationReport, ApplianceError> {
        let Some(config) = self.consolidation.clone() else {
            return Err(ApplianceError::Refused(format!(
                "group {:?} has no consolidation policy ([group.consolidation] in the appliance config)",
                self.name
            )));
        };
        let _pass = self.consolidation_pass.lock();
        let started = Instant::now();
        self.consolidation_stats.lock().last_run = Some(started);
        let mut report = self.consolidate_locked(&config)?;
        report.millis = started.elapsed().as_millis() as u64;
        let mut stats = self.consolidation_stats.lock();
        stats.passes += 1;
        stats.bytes_freed_total += report.bytes_freed;
        stats.last = Some(report.clone());
        if report.segments_rewritten > 0 {
            tracing::info!(
                group = %self.name,
                through = report.through_seq,
                kept_points = report.kept_points,
                segments = report.segments_rewritten,
                payloads_dropped = report.payloads_dropped,
                bytes_freed = report.bytes_freed,
                millis = report.millis,
                "history consolidated"
            );
        }
        Ok(report)
    }

    fn consolidate_locked(
        &self,
        config: &crate::consolidation::ConsolidationConfig,
    ) -> Result<ConsolidationReport, ApplianceError> {
        let mut report = ConsolidationReport::default();
        // Distribution replays from the checkpoint after a crash, so nothing above it may lose
        // a payload; open images and the remote copy read above their pins.
        let checkpointed = self.state.distributed()?.0.min(self.distributed_seq().0);
        let pinned = self.pins.lock().values().min().map_or(u64::MAX, |p| p.0);
        let now = TimestampNs::now().0;
        let cutoff_ns = now.saturating_sub(config.keep_all_s.saturating_mul(1_000_000_000));
        let bound = checkpointed.min(pinned).min(self.journal.durable_seq().0);
        let first = self.journal.first_seq().0;
        let mut records = Vec::new();
        let reader = self.journal.read_headers_from(Seq(first))?;
        for r in reader {
            let r = r?;
            if r.seq.0 > bound || r.timestamp.0 > cutoff_ns {
                break;
            }
            records.push(PointRecord {
                seq: r.seq.0,
                timestamp_ns: r.timestamp.0,
                kind: r.kind,
                volume: r.volume,
                offset: r.offset,
                length: r.length,
            });
        }
        let Some(through) = records.last().map(|r| r.seq) else {
            report.nothing_because = Some(format!(
                "no history is both older than keep_all_s ({} s) and distributed, unpinned and \
                 unshipped (bound seq {bound})",
                config.keep_all_s
            ));
            report.through_seq = self.consolidation_state_through();
            return Ok(report);
        };
        let oldest = self.oldest_point().0;
        let prev = self.consolidation_state.read().clone();
        let keep_bookmarks: BTreeSet<u64> = self
            .bookmarks()
            .into_iter()
            .filter(|b| b.keep)
            .map(|b| b.seq)
            .collect();
        let region: Vec<PointRecord> = records.iter().copied().filter(|r| r.seq > oldest).collect();
        let kept = kept_points(
            config,
            &region,
            oldest,
            through,
            now,
            &keep_bookmarks,
            &prev,
        );
        let mut state = ConsolidationState {
            consolidated_below: prev.consolidated_below.max(through + 1),
            kept: prev.kept.range(through + 1..).copied().collect(),
        };
        state.kept.extend(kept.iter().copied());
        state.prune_below(oldest);
        self.state.store_consolidation(&state)?;
        *self.consolidation_state.write() = state.clone();
        report.through_seq = state.consolidated_below.saturating_sub(1);
        report.kept_points = state.kept.range(oldest..).count();

        let needed = needed_payloads(&records, &kept);
        for (index, last) in self.journal.sealed_segments() {
            if last.0 > through {
                break;
            }
            let rewrite = self
                .journal
                .consolidate_segment(index, &mut |r| {
                    r.kind == RecordKind::Write && !needed.redo.contains(&r.seq.0)
                })
                .inspect_err(|e| {
                    tracing::error!(group = %self.name, "consolidating journal segment {index}: {e}")
                })?;
            if let Some(rewrite) = rewrite {
                self.moved(&rewrite, false);
                add_rewrite(&mut report, &rewrite);
            }
        }
        for (index, last_undo) in self.undo.sealed_segments() {
            let serves = self
                .history
                .lock()
                .undo_ref(last_undo.0)
                .map(|u| u.redo_seq);
            match serves {
                Some(redo_seq) if redo_seq <= through => {}
                Some(_) => break,
                // Released from the index already: retention will delete the file.
                None => continue,
            }
            let rewrite = self
                .undo
                .consolidate_segment(index, &mut |r| {
                    r.kind == RecordKind::Write && !needed.undo.contains(&r.source_seq)
                })
                .inspect_err(|e| {
                    tracing::error!(group = %self.name, "consolidating undo segment {index}: {e}")
                })?;
            if let Some(rewrite) = rewrite {
                self.moved(&rewrite, true);
                add_rewrite(&mut report, &rewrite);
            }
        }
        Ok(report)
    }

    fn consolidation_state_through(&self) -> u64 {
        self.consolidation_state
            .read()
            .consolidated_below
            .saturating_sub(1)
    }

    /// Points the block index at a rewritten segment's records. Image reads hold
    /// `relocation` from plan to read, so none reads an old location in the new file.
    fn moved(&self, rewrite: &SegmentRewrite, undo: bool) {
        let _readers_out = self.relocation.write();
        let mut history = self.history.lock();
        for &(seq, location, dropped) in &rewrite.records {
            if undo {
                history.relocate_undo(seq, location, dropped);
            } else {
                history.relocate_redo(seq, location, dropped);
            }
        }
    }
}

/// Counts one rewritten segment in a pass's report.
fn add_rewrite(report: &mut ConsolidationReport, rewrite: &SegmentRewrite) {
    report.segments_rewritten += 1;
    report.payloads_dropped += rewrite.dropped;
    report.bytes_before += rewrite.bytes_before;
    report.bytes_after += rewrite.bytes_after;
    report.bytes_freed += rewrite.bytes_before.saturating_sub(rewrite.bytes_after);
}
