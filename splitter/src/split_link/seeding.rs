//! Verified seeding: compares production's region checksums with the replica's, asked over
//! the link, so the resync copies only the regions that differ.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use cdp_link::checksum::{region_checksum, RegionChecksum};
use cdp_link::limits::{
    CHECKSUM_REGION_BYTES_MAX, CHECKSUM_REGION_BYTES_MIN, CHECKSUM_REQUESTS_IN_FLIGHT_MAX,
};
use cdp_link::Message;
use cdp_types::BlockFile;
use tokio::sync::mpsc;

use super::queue::Queue;
use super::SplitLink;
use crate::limits::RESYNC_REPORT_INTERVAL;
use crate::limits::{VERIFY_REGION_BYTES, VERIFY_REQUEST_REGIONS_MAX, VERIFY_RETRIES_MAX};

/// The checksum answers of one connection, and how many requests still await theirs.
pub(super) struct ChecksumReplies {
    pub(super) answers: mpsc::Receiver<Message>,
    pub(super) outstanding: usize,
}

/// A checksum request sent and waiting for its answer.
struct ChecksumInFlight {
    /// First checksum region (index by the verify region size) and how many.
    first: u64,
    count: u64,
    production: Vec<RegionChecksum>,
}

/// Why verification stopped before deciding every region.
pub(super) enum VerifyStop {
    /// The link broke; the regions stay pending for the next connection.
    LinkLost,
    /// Verification cannot be used (a bad answer, a production read error); the remaining
    /// regions are copied instead.
    Unusable(String),
}

impl SplitLink {
    /// Verified seeding: compares the checksum of every checksum region holding pending
    /// regions with the replica's, and drops the pending regions of those that are equal, so
    /// the copy that follows moves only what differs.
    pub(super) async fn verify_pending(
        &self,
        bitmap_region_bytes: u64,
        replies: &mut ChecksumReplies,
    ) -> Result<(), VerifyStop> {
        // Both powers of two, so the larger is a whole number of bitmap regions.
        let checksum_region_bytes = VERIFY_REGION_BYTES.max(bitmap_region_bytes);
        if checksum_region_bytes > u64::from(CHECKSUM_REGION_BYTES_MAX)
            || checksum_region_bytes < u64::from(CHECKSUM_REGION_BYTES_MIN)
        {
            return Err(VerifyStop::Unusable(format!(
                "bitmap regions of {bitmap_region_bytes} bytes cannot be verified"
            )));
        }
        // Answers to requests of a verify abandoned earlier on this connection come first.
        while replies.outstanding > 0 {
            replies.answers.recv().await.ok_or(VerifyStop::LinkLost)?;
            replies.outstanding -= 1;
        }
        let per_checksum = checksum_region_bytes / bitmap_region_bytes;
        let mut todo: Vec<u64> = {
            let mut queue = self.lock_queue();
            queue.verify_watch.clear();
            queue.verify_region_bytes = checksum_region_bytes;
            let mut todo: Vec<u64> = queue
                .resync_pending
                .iter()
                .map(|r| r / per_checksum)
                .collect();
            todo.dedup();
            todo
        };
        let mut round = 0;
        let result = loop {
            let may_retry = round < VERIFY_RETRIES_MAX;
            match self
                .verify_round(&todo, checksum_region_bytes, may_retry, replies)
                .await
            {
                Ok(retry) if retry.is_empty() => break Ok(()),
                Ok(retry) => {
                    tracing::debug!(volume = %self.volume, regions = retry.len(), "verifying regions written during the comparison again");
                    todo = retry;
                    round += 1;
                }
                Err(stop) => break Err(stop),
            }
        };
        let mut queue = self.lock_queue();
        queue.verify_watch.clear();
        queue.verify_region_bytes = 0;
        result
    }

    /// One pass over `todo` (checksum region indexes, ascending), with up to
    /// CHECKSUM_REQUESTS_IN_FLIGHT_MAX requests in flight. Returns the regions to verify again.
    async fn verify_round(
        &self,
        todo: &[u64],
        checksum_region_bytes: u64,
        may_retry: bool,
        replies: &mut ChecksumReplies,
    ) -> Result<Vec<u64>, VerifyStop> {
        let mut runs = contiguous_runs(todo, VERIFY_REQUEST_REGIONS_MAX).into_iter();
        let mut in_flight: VecDeque<ChecksumInFlight> = VecDeque::new();
        let mut retry = Vec::new();
        let mut last_report = Instant::now();
        loop {
            while in_flight.len() < CHECKSUM_REQUESTS_IN_FLIGHT_MAX {
                let Some((first, count)) = runs.next() else {
                    break;
                };
                in_flight.push_back(
                    self.ask_checksums(first, count, checksum_region_bytes)
                        .await?,
                );
                replies.outstanding += 1;
            }
            let Some(asked) = in_flight.pop_front() else {
                return Ok(retry);
            };
            let answer = replies.answers.recv().await.ok_or(VerifyStop::LinkLost)?;
            replies.outstanding -= 1;
            let sums = match answer {
                Message::Checksums {
                    offset,
                    region_bytes,
                    sums,
                } if offset == asked.first * checksum_region_bytes
                    && u64::from(region_bytes) == checksum_region_bytes
                    && sums.len() as u64 == asked.count =>
                {
                    sums
                }
                other => {
                    let answered = match &other {
                        Message::Checksums {
                            offset,
                            region_bytes,
                            sums,
                        } => format!(
                            "{} checksums of {region_bytes}-byte regions at {offset}",
                            sums.len()
                        ),
                        other => other.name().to_string(),
                    };
                    return Err(VerifyStop::Unusable(format!(
                        "the appliance answered checksums for {} regions at {} with {answered}",
                        asked.count,
                        asked.first * checksum_region_bytes
                    )));
                }
            };
            self.settle_compared(&asked, &sums, checksum_region_bytes, may_retry, &mut retry);
            if last_report.elapsed() >= RESYNC_REPORT_INTERVAL {
                last_report = Instant::now();
                let p = self.lock_progress();
                tracing::info!(volume = %self.volume, "resync verify {:.1}% ({} bytes compared, {} equal or copied of {})", p.percent(), p.verified_bytes, p.done_bytes, p.total_bytes);
            }
        }
    }

    /// Starts watching `count` checksum regions from `first` for host writes, checksums them
    /// in production (blocking pool) and queues the request for the replica's checksums.
    async fn ask_checksums(
        &self,
        first: u64,
        count: u64,
        checksum_region_bytes: u64,
    ) -> Result<ChecksumInFlight, VerifyStop> {
        let offset = first * checksum_region_bytes;
        let length = (count * checksum_region_bytes).min(self.size - offset);
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                return Err(VerifyStop::LinkLost);
            }
            // Watch before hashing: a write landing while production is read must be seen.
            for region in first..first + count {
                queue.verify_watch.insert(region, false);
            }
        }
        let production = Arc::clone(&self.production);
        let sums = tokio::task::spawn_blocking(move || {
            production_checksums(&production, offset, length, checksum_region_bytes)
        })
        .await
        .map_err(|e| VerifyStop::Unusable(format!("checksum task failed: {e}")))?
        .map_err(|e| VerifyStop::Unusable(format!("production read at {offset}: {e}")))?;
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                return Err(VerifyStop::LinkLost);
            }
            let after = queue.last_seq;
            queue.checksum_requests.push_back((
                after,
                Message::ChecksumRequest {
                    offset,
                    length,
                    // Bounded by CHECKSUM_REGION_BYTES_MAX in verify_pending.
                    region_bytes: checksum_region_bytes as u32,
                },
            ));
        }
        self.wake_sender.notify_one();
        Ok(ChecksumInFlight {
            first,
            count,
            production: sums,
        })
    }

    /// Settles one compared request in the queue and counts the bytes decided.
    fn settle_compared(
        &self,
        asked: &ChecksumInFlight,
        replica: &[RegionChecksum],
        checksum_region_bytes: u64,
        may_retry: bool,
        retry: &mut Vec<u64>,
    ) {
        let (equal_bytes, verified_bytes) = self.lock_queue().settle_compared(
            self.size,
            asked,
            replica,
            checksum_region_bytes,
            may_retry,
            retry,
        );
        let mut progress = self.lock_progress();
        progress.done_bytes += equal_bytes;
        progress.verified_bytes += verified_bytes;
    }
}

impl Queue {
    /// Decides each compared checksum region of a volume of `size` bytes: equal ones leave
    /// the pending set (their bits clear once the journal has everything queued meanwhile);
    /// differing ones stay pending for the copy, or go back to `retry` when the host wrote to
    /// them during the comparison. Returns the bytes found equal and the bytes compared.
    fn settle_compared(
        &mut self,
        size: u64,
        asked: &ChecksumInFlight,
        replica: &[RegionChecksum],
        checksum_region_bytes: u64,
        may_retry: bool,
        retry: &mut Vec<u64>,
    ) -> (u64, u64) {
        let mut equal_bytes = 0;
        let mut verified_bytes = 0;
        let bitmap_region_bytes = self.bitmap.region_bytes();
        let bitmap_regions = self.bitmap.regions();
        // Both powers of two (see `verify_pending`): whole bitmap regions per checksum.
        let per_checksum = checksum_region_bytes / bitmap_region_bytes;
        for (i, (ours, theirs)) in asked.production.iter().zip(replica).enumerate() {
            let region = asked.first + i as u64;
            let written = self.verify_watch.remove(&region).unwrap_or(false);
            if ours != theirs && written && may_retry {
                retry.push(region);
                continue;
            }
            let start = region * checksum_region_bytes;
            verified_bytes += checksum_region_bytes.min(size - start);
            if ours != theirs {
                continue;
            }
            let first = region * per_checksum;
            for bit in first..(first + per_checksum).min(bitmap_regions) {
                if self.resync_pending.remove(&bit) {
                    self.touched.push(bit);
                    equal_bytes += bitmap_region_bytes.min(size - bit * bitmap_region_bytes);
                }
            }
        }
        self.clear_settled_regions();
        (equal_bytes, verified_bytes)
    }
}

/// Checksums production's regions of `region_bytes` in `offset..offset + length` (the last
/// may be short). Holes are not read: their checksum is that of zeroes.
fn production_checksums(
    production: &BlockFile,
    offset: u64,
    length: u64,
    region_bytes: u64,
) -> std::io::Result<Vec<RegionChecksum>> {
    let end = offset + length;
    let mut sums = Vec::with_capacity(length.div_ceil(region_bytes) as usize);
    let mut zeroes: Option<(usize, RegionChecksum)> = None;
    let mut at = offset;
    while at < end {
        let len = region_bytes.min(end - at);
        let hole = production.next_data(at)?.is_some_and(|d| d >= at + len);
        if hole {
            let sum = match zeroes {
                Some((n, sum)) if n == len as usize => sum,
                _ => {
                    let sum = region_checksum(&vec![0u8; len as usize]);
                    zeroes = Some((len as usize, sum));
                    sum
                }
            };
            sums.push(sum);
        } else {
            sums.push(region_checksum(&production.read_at(at, len as usize)?));
        }
        at += len;
    }
    Ok(sums)
}

/// Splits ascending indexes into runs of consecutive ones, each at most `run_max` long:
/// (first, count).
fn contiguous_runs(indexes: &[u64], run_max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &i in indexes {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == i && *count < run_max => *count += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::super::queue::testing::{queue, submit, REGION};
    use super::*;

    #[test]
    fn production_checksums_cover_holes_data_and_a_short_last_region() {
        // Holes are not read but must checksum like the zeroes they read as, and the last
        // region, cut by the volume's end, must checksum its own length only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        let region = 64 * 1024u64;
        let size = 2 * region + 4096;
        {
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(size).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 100], region + 5).unwrap();
        }
        let production = BlockFile::open(&path, true).unwrap();
        let sums = production_checksums(&production, 0, size, region).unwrap();
        let mut data = vec![0u8; region as usize];
        data[5..105].fill(7);
        assert_eq!(
            sums,
            vec![
                region_checksum(&vec![0u8; region as usize]),
                region_checksum(&data),
                region_checksum(&[0u8; 4096]),
            ]
        );
    }

    /// One request over checksum regions `first..first + sums.len()` whose production
    /// checksums are `sums`.
    fn asked(first: u64, sums: &[RegionChecksum]) -> ChecksumInFlight {
        ChecksumInFlight {
            first,
            count: sums.len() as u64,
            production: sums.to_vec(),
        }
    }

    #[test]
    fn equal_checksum_regions_leave_the_resync_and_differing_ones_stay() {
        // Checksum regions of 2 bitmap regions over a 4-region volume: region 0 (bits 0, 1)
        // equals the replica, region 1 (bits 2, 3) differs. Only bits 2 and 3 are copied.
        let (_dir, mut q) = queue(4);
        for bit in 0..4 {
            q.bitmap.set(bit);
            q.resync_pending.insert(bit);
        }
        let (a, b) = (region_checksum(b"a"), region_checksum(b"b"));
        let mut retry = Vec::new();
        let (equal, verified) = q.settle_compared(
            4 * REGION,
            &asked(0, &[a, a]),
            &[a, b],
            2 * REGION,
            true,
            &mut retry,
        );
        assert_eq!((equal, verified), (2 * REGION, 4 * REGION));
        assert!(retry.is_empty());
        assert_eq!(
            q.resync_pending.iter().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Nothing is unacknowledged, so the equal regions are clean at once.
        assert!(!q.bitmap.is_set(0) && !q.bitmap.is_set(1));
        assert!(q.bitmap.is_set(2) && q.bitmap.is_set(3));
    }

    #[test]
    fn a_region_the_host_wrote_during_the_comparison_is_compared_again() {
        let (_dir, mut q) = queue(4);
        for bit in 0..4 {
            q.bitmap.set(bit);
            q.resync_pending.insert(bit);
        }
        q.verify_region_bytes = 2 * REGION;
        q.verify_watch.insert(0, false);
        q.verify_watch.insert(1, false);
        // A host write to bit 3 lands while production is hashed: checksum region 1's
        // comparison says nothing about the bytes now in production.
        submit(&mut q, 3 * REGION, 4096).expect("queued");
        let (a, b) = (region_checksum(b"a"), region_checksum(b"b"));
        let mut retry = Vec::new();
        q.settle_compared(
            4 * REGION,
            &asked(0, &[a, a]),
            &[a, b],
            2 * REGION,
            true,
            &mut retry,
        );
        assert_eq!(retry, vec![1]);
        assert_eq!(
            q.resync_pending.iter().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Region 0 left the resync but its bits stay until the write queued meanwhile is
        // journaled: a crash now must still resync them.
        assert!(q.bitmap.is_set(0) && q.bitmap.is_set(1));
        q.ack(1);
        assert!(!q.bitmap.is_set(0) && !q.bitmap.is_set(1));
        assert!(q.bitmap.is_set(3), "still pending");
        // Without retries left, a differing region simply stays pending for the copy.
        let mut retry = Vec::new();
        q.verify_watch.insert(1, true);
        q.settle_compared(
            4 * REGION,
            &asked(1, &[a]),
            &[b],
            2 * REGION,
            false,
            &mut retry,
        );
        assert!(retry.is_empty());
        assert_eq!(
            q.resync_pending.iter().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_maximum() {
        assert_eq!(contiguous_runs(&[], 4), vec![]);
        assert_eq!(
            contiguous_runs(&[0, 1, 2, 5, 6, 7, 8, 9, 10], 4),
            vec![(0, 3), (5, 4), (9, 2)]
        );
    }
}
