//! A latency histogram of atomics: observing is three relaxed adds, never a lock, so it can sit
//! on the host's write path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets in seconds, from 25 µs (a page-cache write over a unix socket)
/// to 10 s (a link stalled past its deadline); anything slower lands in `+Inf`.
pub const LATENCY_BUCKETS_S: [f64; 17] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Counts per bucket (not cumulative), the sum of all observations and their count.
#[derive(Debug)]
pub struct LatencyHistogram {
    /// One slot per bound in `LATENCY_BUCKETS_S`, then the overflow (`+Inf`) slot.
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram as one scrape encodes it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of the observations in seconds.
    pub sum: f64,
    pub count: u64,
    /// (upper bound in seconds, observations in this bucket only); the last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS_S.partition_point(|&bound| bound < seconds);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now. The count is the sum of the buckets read, so `_count` always equals
    /// the `+Inf` bucket even while observations race the read.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut count = 0u64;
        for (i, slot) in self.buckets.iter().enumerate() {
            let n = slot.load(Ordering::Relaxed);
            count = count.saturating_add(n);
            let bound = LATENCY_BUCKETS_S.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        HistogramSnapshot {
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each observation lands in the first bucket whose bound is at or above it; a bound is
    /// inclusive (Prometheus's `le`), and past the last bound is +Inf.
    #[test]
    fn observations_land_in_their_buckets() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(25));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.000_025, 2));
        let bucket_5ms = s.buckets.iter().find(|(b, _)| *b == 0.005).unwrap();
        assert_eq!(bucket_5ms.1, 1);
        assert_eq!(*s.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert!((s.sum - 60.003_035).abs() < 1e-9, "sum {}", s.sum);
    }
}
