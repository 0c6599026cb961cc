//! The replication link's bandwidth limit (a token bucket) and its measured wire rate.
//!
//! The shipper asks the bucket before each batch write how long to wait so that the bytes on
//! the wire (after compression) stay within `bandwidth_bytes_per_s`. The bucket is paid
//! *before* sending: a batch waits until the bucket holds its whole size (or is full, for a
//! batch bigger than the bucket, which then leaves it empty), so the long-run rate never
//! exceeds the limit and the only burst is the bucket's capacity, `BURST` of traffic.
//! Time is passed in, so the arithmetic is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The bucket's capacity in seconds of traffic: the burst a link idle for a while may send
/// at full speed. Small, so a run of a few seconds stays within 10 % of the limit.
const BURST: Duration = Duration::from_millis(100);

/// A token bucket over wire bytes.
pub struct TokenBucket {
    bytes_per_s: u64,
    capacity: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket for `bytes_per_s` (> 0).
    pub fn new(bytes_per_s: u64, now: Instant) -> TokenBucket {
        let bytes_per_s = bytes_per_s.max(1);
        let capacity = (bytes_per_s as f64 * BURST.as_secs_f64()).max(1.0);
        TokenBucket {
            bytes_per_s,
            capacity,
            tokens: capacity,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.bytes_per_s as f64).min(self.capacity);
        self.refilled_at = now;
    }

    /// How long to wait before `bytes` may be sent; zero means now, and the bytes are then
    /// taken from the bucket. Callers wait and ask again (the wait may be cut short by a stop).
    pub fn delay_for(&mut self, bytes: usize, now: Instant) -> Duration {
        self.refill(now);
        // A batch larger than the bucket waits for a full bucket and then overdraws it: the
        // deficit is paid by the next batch's wait, so the rate still holds.
        let need = (bytes as f64).min(self.capacity);
        if self.tokens >= need {
            self.tokens -= bytes as f64;
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.tokens) / self.bytes_per_s as f64)
    }
}

/// Wire bytes per second over the last `WINDOW`, from samples taken about once a second.
pub struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

/// The span the measured rate covers: long enough to smooth batch-sized steps.
const WINDOW: Duration = Duration::from_secs(5);
/// Samples kept; the window needs about one a second (bounded whatever the caller does).
const SAMPLES_MAX: usize = 64;

impl Default for RateMeter {
    fn default() -> RateMeter {
        RateMeter {
            samples: VecDeque::with_capacity(SAMPLES_MAX),
        }
    }
}

impl RateMeter {
    /// Records the byte counter's value at `now`; returns the rate over the window so far.
    pub fn sample(&mut self, now: Instant, total_bytes: u64) -> u64 {
        if self.samples.len() == SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples.push_back((now, total_bytes));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= WINDOW)
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
                (b1.saturating_sub(b0) as f64 / (t1 - t0).as_secs_f64()) as u64
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates sending `batch`-byte batches for `seconds` through the bucket; returns the
    /// bytes sent.
    fn simulate(limit: u64, batch: usize, seconds: u64) -> u64 {
        let start = Instant::now();
        let mut now = start;
        let mut bucket = TokenBucket::new(limit, now);
        let mut sent = 0u64;
        let end = start + Duration::from_secs(seconds);
        loop {
            let wait = bucket.delay_for(batch, now);
            if wait.is_zero() {
                sent += batch as u64;
                continue;
            }
            now += wait;
            if now > end {
                return sent;
            }
        }
    }

    #[test]
    fn small_batches_hold_the_rate() {
        let limit = 8 << 20;
        let sent = simulate(limit, 64 * 1024, 10);
        let rate = sent as f64 / 10.0;
        assert!((rate - limit as f64).abs() < limit as f64 * 0.02, "{rate}");
    }

    #[test]
    fn batches_bigger_than_the_bucket_hold_the_rate() {
        let limit = 1 << 20;
        let sent = simulate(limit, 4 << 20, 40);
        let rate = sent as f64 / 40.0;
        assert!(rate <= limit as f64 * 1.1, "{rate}");
        assert!(rate >= limit as f64 * 0.85, "{rate}");
    }

    #[test]
    fn meter_measures_over_its_window() {
        let start = Instant::now();
        let mut m = RateMeter::default();
        assert_eq!(m.sample(start, 0), 0);
        let mut rate = 0;
        for s in 1..=20u64 {
            rate = m.sample(start + Duration::from_secs(s), s * 1000);
        }
        assert_eq!(rate, 1000);
        assert!(m.samples.len() <= 7);
    }
}
