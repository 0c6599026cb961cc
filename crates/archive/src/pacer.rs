//! The upload bandwidth limit: each object reserves its transfer time on one schedule before
//! it is sent, so the long-run rate of stored bytes stays within `bytes_per_s` whatever the
//! parallelism. Time is passed in, so the arithmetic is tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest an idle pacer lets a burst run ahead of the schedule: an object that arrives
/// after a quiet spell is not made to wait for the time the quiet spell wasted.
const BURST: Duration = Duration::from_millis(100);

pub(crate) struct Pacer {
    bytes_per_s: Option<u64>,
    /// When the bytes reserved so far have been paid for.
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    pub(crate) fn new(bytes_per_s: Option<u64>) -> Pacer {
        Pacer {
            bytes_per_s: bytes_per_s.filter(|&b| b > 0),
            next_free: Mutex::new(None),
        }
    }

    /// Reserves `bytes` on the schedule; returns the instant they may be sent at.
    pub(crate) fn reserve(&self, bytes: u64, now: Instant) -> Instant {
        let Some(rate) = self.bytes_per_s else {
            return now;
        };
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let floor = now.checked_sub(BURST).unwrap_or(now);
        let start = next.map_or(now, |n| n.max(floor));
        *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
        start.max(now)
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn pace(&self, bytes: u64) {
        let at = self.reserve(bytes, Instant::now());
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten 1 MB objects at 1 MB/s start a second apart (the first at once), however many
    /// ask together; without a limit every object goes at once.
    #[test]
    fn objects_are_spaced_by_their_size_over_the_rate() {
        let t0 = Instant::now();
        let p = Pacer::new(Some(1_000_000));
        let starts: Vec<Duration> = (0..10)
            .map(|_| p.reserve(1_000_000, t0).duration_since(t0))
            .collect();
        for (i, s) in starts.iter().enumerate() {
            assert_eq!(s.as_millis(), i as u128 * 1000, "object {i}");
        }
        // After a long quiet spell the schedule restarts near now, not in the past.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(p.reserve(1_000_000, later), later);
        let unlimited = Pacer::new(None);
        assert_eq!(unlimited.reserve(1 << 30, t0), t0);
    }
}
