//! Resync: copies regions marked in the dirty bitmap from production into the journal, between
//! `ResyncStart` and `ResyncEnd` markers, in order with host writes.

use std::sync::atomic::Ordering;
use std::time::Instant;

use cdp_link::Message;
use cdp_types::BlockFile;

use super::queue::Queue;
use super::seeding::{ChecksumReplies, VerifyStop};
use super::status::{ResyncMethod, ResyncReason, ResyncSummary};
use super::SplitLink;
use crate::limits::{RESYNC_REPORT_INTERVAL, RESYNC_ZERO_RUN_BYTES_MAX};

impl SplitLink {
    /// Marks every region for resync (first-time initialization or `cdp volume resync`) and
    /// wakes the resync task. A first initialization verifies instead of copying when the
    /// appliance says the replica holds data (see `resync`).
    pub fn request_full_resync(&self, why: ResyncReason) {
        self.request_resync(why, ResyncMethod::Copy);
    }

    /// Marks every region for a resync by `method` and wakes the resync task. A resync
    /// already running keeps its method for the regions it has not reached.
    pub fn request_resync(&self, why: ResyncReason, method: ResyncMethod) {
        // Reason and method first: the resync task may start as soon as regions are pending.
        {
            let mut progress = self.lock_progress();
            progress.reason = why;
            progress.method = method;
        }
        let mut queue = self.lock_queue();
        for region in 0..queue.bitmap.regions() {
            queue.bitmap.set(region);
            queue.resync_pending.insert(region);
        }
        drop(queue);
        self.resync_wake.notify_one();
    }

    /// Copies every region marked for resync from production into the journal, in order with
    /// host writes (each copy is taken under the queue lock). Holes and all-zero regions go
    /// as Zero changes without payload, consecutive ones merged. Stops if the link drops.
    /// When verifying, regions whose checksum equals the replica's are dropped first.
    pub(super) async fn resync(&self, replies: &mut ChecksumReplies) {
        let (total, region_bytes, incomplete) = {
            let queue = self.lock_queue();
            (
                queue.resync_pending.len() as u64,
                queue.bitmap.region_bytes(),
                queue.resync_incomplete,
            )
        };
        if total == 0 && !incomplete {
            return;
        }
        let (reason, method) = {
            let mut progress = self.lock_progress();
            progress.total_bytes = total * region_bytes;
            progress.done_bytes = 0;
            progress.verified_bytes = 0;
            progress.copied_bytes = 0;
            progress.started = Some(Instant::now());
            // First protection of a volume whose replica already holds data: it was most
            // likely seeded by other means (a copy of the disk), so only differences travel.
            if progress.reason == ResyncReason::Initial
                && self.replica_holds_data.load(Ordering::Relaxed)
            {
                progress.method = ResyncMethod::Verify;
            }
            (progress.reason, progress.method)
        };
        let before = self.resync_copied_bytes();
        tracing::info!(
            volume = %self.volume,
            regions = total,
            bytes = total * region_bytes,
            %reason,
            %method,
            "resync started"
        );
        let mut last_report = Instant::now();
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                return;
            }
            queue.push_resync_start();
        }
        self.wake_sender.notify_one();
        if method == ResyncMethod::Verify {
            match self.verify_pending(region_bytes, replies).await {
                Ok(()) => {}
                Err(VerifyStop::LinkLost) => {
                    tracing::warn!(volume = %self.volume, "resync verification interrupted by link loss");
                    return;
                }
                Err(VerifyStop::Unusable(why)) => {
                    tracing::warn!(volume = %self.volume, "resync verification stopped: {why}; copying the remaining regions");
                }
            }
        }
        loop {
            let permit = self.reserve(region_bytes as usize).await;
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                tracing::warn!(volume = %self.volume, remaining = queue.resync_pending.len(), "resync interrupted by link loss");
                return;
            }
            let Some(region) = queue.resync_pending.pop_first() else {
                break;
            };
            let offset = region * region_bytes;
            let length = region_bytes.min(self.size - offset);
            let (change, end_region, copied) = match resync_change(
                &self.production,
                &mut queue,
                region,
                region_bytes,
            ) {
                Ok(found) => found,
                Err(e) => {
                    queue.resync_pending.insert(region);
                    tracing::error!(volume = %self.volume, region, "resync read failed: {e}; will retry on the next connection");
                    return;
                }
            };
            queue.touched.extend(region..end_region);
            queue.push(change, None, region..end_region, Some(permit));
            drop(queue);
            self.wake_sender.notify_one();
            self.resync_copied_bytes
                .fetch_add(copied, Ordering::Relaxed);
            let done = (end_region - region - 1) * region_bytes + length;
            {
                let mut progress = self.lock_progress();
                progress.done_bytes += done;
                progress.copied_bytes += copied;
            }
            if last_report.elapsed() >= RESYNC_REPORT_INTERVAL {
                last_report = Instant::now();
                let p = self.lock_progress();
                tracing::info!(volume = %self.volume, "resync {:.1}% ({} of {} bytes)", p.percent(), p.done_bytes, p.total_bytes);
            }
        }
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                // The ResyncStart went out on a connection that is gone: the next one
                // brackets again, so the appliance's span is closed by a ResyncEnd.
                queue.resync_incomplete = true;
                tracing::warn!(volume = %self.volume, "resync end interrupted by link loss");
                return;
            }
            queue.push_resync_end();
        }
        self.wake_sender.notify_one();
        // One critical section: `state()` must never see the resync ended (no `started`)
        // without its summary (`last`).
        let copied_bytes = self.resync_copied_bytes() - before;
        let mut progress = self.lock_progress();
        let seconds = progress
            .started
            .take()
            .map_or(0.0, |s| s.elapsed().as_secs_f64());
        let verified_bytes = progress.verified_bytes;
        progress.last = Some(ResyncSummary {
            method,
            total_bytes: total * region_bytes,
            verified_bytes,
            copied_bytes,
            seconds,
            completed_ns: cdp_types::TimestampNs::now().0,
        });
        tracing::info!(
            volume = %self.volume,
            regions = total,
            verified_bytes,
            copied_bytes,
            seconds,
            %reason,
            %method,
            "resync complete"
        );
        progress.reason = ResyncReason::Dirty;
        progress.method = ResyncMethod::Copy;
    }
}

/// The change that brings the journal's copy of `region` (already popped) up to date:
/// a Write of its bytes, or a Zero covering it and any directly following pending regions
/// that are holes too. Returns the change, the end region and the payload bytes.
#[allow(clippy::type_complexity)]
fn resync_change(
    production: &BlockFile,
    queue: &mut Queue,
    region: u64,
    region_bytes: u64,
) -> std::io::Result<(Box<dyn FnOnce(u64) -> Message + Send>, u64, u64)> {
    let size = production.size();
    let offset = region * region_bytes;
    let length = region_bytes.min(size - offset);
    let data_at = production.next_data(offset)?;
    let zero_run = |queue: &mut Queue, hole_end: u64| {
        let mut end = offset + length;
        while end < hole_end.min(size)
            && end - offset < RESYNC_ZERO_RUN_BYTES_MAX
            && queue.resync_pending.first() == Some(&(end / region_bytes))
        {
            let next_len = region_bytes.min(size - end);
            if end + next_len > hole_end {
                break;
            }
            queue.resync_pending.pop_first();
            end += next_len;
        }
        end
    };
    if data_at.is_some_and(|d| d >= offset + length) {
        let end = zero_run(queue, data_at.unwrap_or(offset + length));
        let end_region = end.div_ceil(region_bytes);
        return Ok((
            Box::new(move |source_seq| Message::Zero {
                source_seq,
                offset,
                length: end - offset,
            }),
            end_region,
            0,
        ));
    }
    let data = production.read_at(offset, length as usize)?;
    if data.iter().all(|b| *b == 0) {
        return Ok((
            Box::new(move |source_seq| Message::Zero {
                source_seq,
                offset,
                length,
            }),
            region + 1,
            0,
        ));
    }
    Ok((
        Box::new(move |source_seq| Message::Write {
            source_seq,
            offset,
            data,
        }),
        region + 1,
        length,
    ))
}

/// A resync's markers sit in the change stream like changes, queued under the queue lock so
/// each stands exactly between the changes before and after it.
impl Queue {
    /// Queues the `ResyncStart`, carrying when marking began (0: not since this process
    /// started); this resync's markers are not lost yet.
    pub(super) fn push_resync_start(&mut self) -> u64 {
        let marking_since_ns = self.marking_since_ns.unwrap_or(0);
        self.resync_incomplete = false;
        self.push(
            move |source_seq| Message::ResyncStart {
                source_seq,
                marking_since_ns,
            },
            None,
            0..0,
            None,
        )
    }

    /// Queues the `ResyncEnd`; the volume resyncs until the journal acknowledges it.
    pub(super) fn push_resync_end(&mut self) -> u64 {
        let end = self.push(
            |source_seq| Message::ResyncEnd { source_seq },
            None,
            0..0,
            None,
        );
        self.resync_end_unacked = Some(end);
        end
    }
}

#[cfg(test)]
mod tests {
    use super::super::queue::testing::{queue, seqs, submit, REGION};
    use super::*;

    /// A queue whose link was lost at `lost_ns` with one change unacknowledged (so the
    /// episode marked a region), and which then reconnected to a journal holding nothing.
    fn marked_and_reconnected(lost_ns: u64) -> (tempfile::TempDir, Queue) {
        let (dir, mut q) = queue(4);
        submit(&mut q, REGION, 4096).expect("queued");
        q.start_marking(lost_ns);
        q.welcome(0);
        (dir, q)
    }

    /// Stands in for the copy loop: every pending region is copied as one change.
    fn copy_pending(q: &mut Queue) {
        while let Some(region) = q.resync_pending.pop_first() {
            q.touched.push(region);
            q.push(
                |source_seq| Message::Zero {
                    source_seq,
                    offset: region * REGION,
                    length: REGION,
                },
                None,
                region..region + 1,
                None,
            );
        }
    }

    /// A production file of `regions` bitmap regions plus `tail` bytes, sparse except where
    /// `data` puts bytes: (offset, bytes).
    fn production(
        dir: &tempfile::TempDir,
        regions: u64,
        tail: u64,
        data: &[(u64, &[u8])],
    ) -> BlockFile {
        let path = dir.path().join("production.img");
        let file = BlockFile::create_sparse(&path, regions * REGION + tail).expect("production");
        for (offset, bytes) in data {
            file.write_at(*offset, bytes).expect("production write");
        }
        file
    }

    /// Runs `resync_change` over every pending region as the copy loop does, and returns the
    /// changes it queued as (kind, offset, length) plus the bytes copied.
    fn copy_all(production: &BlockFile, q: &mut Queue) -> (Vec<(&'static str, u64, u64)>, u64) {
        let mut changes = Vec::new();
        let mut copied_total = 0;
        while let Some(region) = q.resync_pending.pop_first() {
            let (change, end_region, copied) =
                resync_change(production, q, region, REGION).expect("production read");
            assert!(end_region > region, "every change covers its region");
            copied_total += copied;
            changes.push(match change(0) {
                Message::Write { offset, data, .. } => ("write", offset, data.len() as u64),
                Message::Zero { offset, length, .. } => ("zero", offset, length),
                other => panic!("unexpected {other:?}"),
            });
        }
        (changes, copied_total)
    }

    #[test]
    fn resync_copies_data_regions_and_merges_pending_holes_into_one_zero() {
        // Regions 0 and 5 hold data, 1..=3 are holes, 4 holds written zeroes; 4 is not
        // pending, so the hole run 1..=3 must stop before it and never swallow region 5.
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = production(
            &dir,
            6,
            0,
            &[
                (100, &[1u8; 10]),
                (4 * REGION, &[0u8; 4096]),
                (5 * REGION, &[5u8; 8]),
            ],
        );
        let (_bitmap_dir, mut q) = queue(6);
        q.resync_pending.extend([0, 1, 2, 3, 5]);
        let (changes, copied) = copy_all(&file, &mut q);
        assert_eq!(
            changes,
            vec![
                ("write", 0, REGION),
                ("zero", REGION, 3 * REGION),
                ("write", 5 * REGION, REGION),
            ]
        );
        assert_eq!(copied, 2 * REGION, "holes travel without payload");
    }

    #[test]
    fn resync_sends_a_region_of_written_zeroes_as_zero_and_cuts_the_last_region() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = production(
            &dir,
            2,
            4096,
            &[(0, &[0u8; 4096]), (2 * REGION, &[9u8; 4096])],
        );
        let (_bitmap_dir, mut q) = queue(3);
        q.resync_pending.extend([0, 2]);
        let (changes, copied) = copy_all(&file, &mut q);
        assert_eq!(
            changes,
            vec![("zero", 0, REGION), ("write", 2 * REGION, 4096)],
            "the last region is as long as the volume leaves it"
        );
        assert_eq!(copied, 4096);
    }

    #[test]
    fn a_hole_run_stops_at_the_first_region_not_pending() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = production(&dir, 8, 0, &[]);
        let (_bitmap_dir, mut q) = queue(8);
        q.resync_pending.extend([0, 1, 2, 4, 5, 7]);
        let (changes, _) = copy_all(&file, &mut q);
        assert_eq!(
            changes,
            vec![
                ("zero", 0, 3 * REGION),
                ("zero", 4 * REGION, 2 * REGION),
                ("zero", 7 * REGION, REGION),
            ]
        );
    }

    #[test]
    fn marking_since_is_set_at_link_loss() {
        let (_dir, mut q) = queue(4);
        submit(&mut q, 0, 4096).expect("queued");
        assert_eq!(q.marking_since_ns, None);
        q.start_marking(100);
        assert_eq!(q.marking_since_ns, Some(100));
        assert_eq!(q.link_lost_ns, Some(100));
    }

    #[test]
    fn marking_since_is_kept_across_reconnects_until_the_resync_ends() {
        let (_dir, mut q) = marked_and_reconnected(100);
        assert_eq!(q.marking_since_ns, Some(100), "regions still to copy");
        // Lost again before the resync began: the span still starts at the first loss.
        q.start_marking(200);
        q.welcome(0);
        assert_eq!(q.marking_since_ns, Some(100));
        // The resync's start carries it to the appliance.
        let start = q.push_resync_start();
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        assert_eq!(
            batch,
            vec![Message::ResyncStart {
                source_seq: start,
                marking_since_ns: 100
            }]
        );
        // Everything but the ResyncEnd is journaled when the link is lost again: no region
        // is pending, yet the span has no end, so the episode is kept for the next resync.
        copy_pending(&mut q);
        let end = q.push_resync_end();
        q.ack(end - 1);
        assert_eq!(q.marking_since_ns, Some(100));
        q.start_marking(300);
        q.welcome(end - 1);
        assert!(q.resync_pending.is_empty());
        assert!(q.resync_incomplete);
        assert_eq!(q.marking_since_ns, Some(100));
    }

    #[test]
    fn a_reconnect_that_finds_nothing_marked_forgets_the_episode() {
        let (_dir, mut q) = queue(4);
        // Lost with nothing unacknowledged, and no host write while marking.
        q.start_marking(100);
        assert_eq!(q.marking_since_ns, Some(100));
        q.welcome(0);
        assert_eq!(q.marking_since_ns, None);
        // The next episode's span starts at its own loss.
        submit(&mut q, 0, 4096).expect("queued");
        q.start_marking(500);
        assert_eq!(q.marking_since_ns, Some(500));
    }

    #[test]
    fn marking_since_is_reset_when_the_resync_end_is_acknowledged() {
        let (_dir, mut q) = marked_and_reconnected(100);
        let start = q.push_resync_start();
        copy_pending(&mut q);
        let end = q.push_resync_end();
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        assert_eq!(seqs(&batch), (start..=end).collect::<Vec<_>>());
        q.ack(end - 1);
        assert_eq!(q.marking_since_ns, Some(100), "ResyncEnd not journaled yet");
        assert_eq!(q.resync_end_unacked, Some(end));
        q.ack(end);
        assert_eq!(q.marking_since_ns, None);
        assert_eq!(q.resync_end_unacked, None);
        // Its copies are journaled: the regions are clean again.
        assert!(!q.bitmap.is_set(1));
    }

    #[test]
    fn a_welcome_past_the_resync_end_ends_the_episode() {
        // Block policy: the link broke after the ResyncEnd was sent; the next Welcome says
        // the journal has it, which acknowledges it.
        let (_dir, mut q) = marked_and_reconnected(100);
        q.push_resync_start();
        copy_pending(&mut q);
        let end = q.push_resync_end();
        q.welcome(end);
        assert_eq!(q.marking_since_ns, None);
        assert_eq!(q.resync_end_unacked, None);
    }
}
