//! Decides per batch whether the shipper deduplicates it: always with `dedup = true`, except for a while after data in which no block repeated.
//!
//! Dedup costs a CRC and a copy per 4 KiB block at the sender and a copy more at the
//! receiver; on data that never repeats (random, encrypted, already-unique) that is pure
//! cost. So once `JUDGED_BLOCKS` whole blocks were deduplicated and fewer than
//! `HIT_FRACTION_MIN` of them were zero or references, the next `SKIP_BATCHES` batches go as
//! plain version 1 frames (which leave both ends' windows untouched, so they stay in
//! lockstep), then dedup is tried again.

use cdp_link::replication::DedupCounts;

/// Whole blocks a judgement needs: 8 MiB of writes, one full batch.
const JUDGED_BLOCKS: u64 = 2048;
/// Below this fraction of zero or referenced blocks, dedup is not worth its cost.
const HIT_FRACTION_MIN: f64 = 0.01;
/// Batches sent plain after a judgement found nothing to deduplicate.
const SKIP_BATCHES: u32 = 8;

pub struct DedupPolicy {
    enabled: bool,
    blocks: u64,
    hits: u64,
    skip_left: u32,
}

impl DedupPolicy {
    pub fn new(enabled: bool) -> DedupPolicy {
        DedupPolicy {
            enabled,
            blocks: 0,
            hits: 0,
            skip_left: 0,
        }
    }

    /// Whether the next batch is deduplicated.
    pub fn use_dedup(&self) -> bool {
        self.enabled && self.skip_left == 0
    }

    /// Learns from a batch just sent (`deduplicated`: as a version 2 batch, with `counts`).
    pub fn observe(&mut self, deduplicated: bool, counts: DedupCounts) {
        if !deduplicated {
            self.skip_left = self.skip_left.saturating_sub(1);
            return;
        }
        self.blocks += counts.literal_blocks + counts.zero_blocks + counts.reference_blocks;
        self.hits += counts.zero_blocks + counts.reference_blocks;
        if self.blocks < JUDGED_BLOCKS {
            return;
        }
        if (self.hits as f64) < self.blocks as f64 * HIT_FRACTION_MIN {
            self.skip_left = SKIP_BATCHES;
        }
        self.blocks = 0;
        self.hits = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(literal: u64, reference: u64) -> DedupCounts {
        DedupCounts {
            literal_blocks: literal,
            zero_blocks: 0,
            reference_blocks: reference,
        }
    }

    #[test]
    fn unique_data_pauses_dedup_and_repeats_keep_it() {
        let mut p = DedupPolicy::new(true);
        // Unique blocks, but not yet enough to judge.
        p.observe(true, counts(1000, 0));
        assert!(p.use_dedup());
        p.observe(true, counts(1048, 0));
        assert!(!p.use_dedup());
        for _ in 0..SKIP_BATCHES {
            assert!(!p.use_dedup());
            p.observe(false, DedupCounts::default());
        }
        assert!(p.use_dedup());
        // A few percent of repeats keeps dedup on.
        p.observe(true, counts(2000, 48));
        assert!(p.use_dedup());
        assert!(!DedupPolicy::new(false).use_dedup());
    }
}
