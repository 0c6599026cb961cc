//! The shipper's recent lag as one sample per second in a bounded window, so `cdp status` can report the p99 and the maximum lag, not only the current one.
//!
//! The shipper measures the lag (age of the oldest record the remote has not acknowledged)
//! about once a second; each measurement lands in the slot of its second, which keeps the
//! largest value seen in that second. A second in which the shipper measured nothing (it was
//! blocked in a write) has no slot: the next measurement carries the grown lag, so the
//! maximum is never missed, only its timing. Time is passed in, so it is tested without
//! sleeping.

use std::collections::VecDeque;
use std::time::Instant;

/// Seconds of history the window covers: five minutes, so the p99 leaves out the worst three
/// seconds and one spike does not define it.
pub const LAG_WINDOW_SECONDS: u64 = 300;

/// The p99 and maximum of the samples in the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LagSummary {
    pub p99_ns: u64,
    pub max_ns: u64,
    /// How many seconds have a sample (at most `LAG_WINDOW_SECONDS`).
    pub samples: u64,
}

/// Per-second lag samples of the last `LAG_WINDOW_SECONDS`.
pub struct LagWindow {
    started: Instant,
    /// (seconds since `started`, the largest lag measured in that second), oldest first;
    /// at most `LAG_WINDOW_SECONDS` entries.
    samples: VecDeque<(u64, u64)>,
}

impl LagWindow {
    pub fn new(now: Instant) -> LagWindow {
        LagWindow {
            started: now,
            samples: VecDeque::new(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs()
    }

    /// Notes a lag measured at `now`.
    pub fn record(&mut self, now: Instant, lag_ns: u64) {
        let second = self.second(now);
        match self.samples.back_mut() {
            Some((s, lag)) if *s == second => *lag = (*lag).max(lag_ns),
            _ => self.samples.push_back((second, lag_ns)),
        }
        self.forget_before(second);
    }

    /// Drops the samples that left the window ending at `second`.
    fn forget_before(&mut self, second: u64) {
        while self
            .samples
            .front()
            .is_some_and(|&(s, _)| s + LAG_WINDOW_SECONDS <= second)
        {
            self.samples.pop_front();
        }
    }

    /// The p99 (nearest rank) and the maximum over the samples of the window ending at `now`.
    pub fn summary(&self, now: Instant) -> LagSummary {
        let second = self.second(now);
        let mut lags: Vec<u64> = self
            .samples
            .iter()
            .filter(|&&(s, _)| s + LAG_WINDOW_SECONDS > second)
            .map(|&(_, lag)| lag)
            .collect();
        if lags.is_empty() {
            return LagSummary::default();
        }
        lags.sort_unstable();
        // Nearest rank: the smallest sample with at least 99 % of the samples at or below it.
        let rank = (lags.len() * 99).div_ceil(100);
        LagSummary {
            p99_ns: lags[rank.saturating_sub(1)],
            max_ns: lags[lags.len() - 1],
            samples: lags.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    #[test]
    fn empty_window_reports_zero() {
        let t0 = Instant::now();
        let w = LagWindow::new(t0);
        assert_eq!(w.summary(t0), LagSummary::default());
    }

    #[test]
    fn one_sample_per_second_keeps_the_largest() {
        let t0 = Instant::now();
        let mut w = LagWindow::new(t0);
        w.record(t0, 5 * MS);
        w.record(t0 + Duration::from_millis(250), 40 * MS);
        w.record(t0 + Duration::from_millis(750), 10 * MS);
        w.record(t0 + Duration::from_millis(1100), 7 * MS);
        let s = w.summary(t0 + Duration::from_millis(1200));
        assert_eq!(s.samples, 2);
        assert_eq!(s.max_ns, 40 * MS);
    }

    #[test]
    fn p99_leaves_out_the_worst_percent() {
        let t0 = Instant::now();
        let mut w = LagWindow::new(t0);
        // 300 seconds: 297 at 1..=297 ms, three spikes of 10 s.
        for i in 0..300u64 {
            let lag = if i % 100 == 50 {
                10_000 * MS
            } else {
                (i + 1) * MS
            };
            w.record(t0 + Duration::from_secs(i), lag);
        }
        let s = w.summary(t0 + Duration::from_secs(299));
        assert_eq!(s.samples, 300);
        assert_eq!(s.max_ns, 10_000 * MS);
        // Rank 297 of 300 sorted: the largest ordinary sample (300 ms, second 299).
        assert_eq!(s.p99_ns, 300 * MS);
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = Instant::now();
        let mut w = LagWindow::new(t0);
        w.record(t0, 60_000 * MS);
        for i in 1..=LAG_WINDOW_SECONDS {
            w.record(t0 + Duration::from_secs(i), MS);
        }
        let s = w.summary(t0 + Duration::from_secs(LAG_WINDOW_SECONDS));
        assert_eq!(s.samples, LAG_WINDOW_SECONDS);
        assert_eq!(
            s.max_ns, MS,
            "the spike at second 0 is older than the window"
        );
        assert!(w.samples.len() as u64 <= LAG_WINDOW_SECONDS);
        // Without new samples the window empties as time passes.
        let later = w.summary(t0 + Duration::from_secs(3 * LAG_WINDOW_SECONDS));
        assert_eq!(later, LagSummary::default());
    }

    #[test]
    fn a_silent_stretch_is_no_samples() {
        let t0 = Instant::now();
        let mut w = LagWindow::new(t0);
        w.record(t0, MS);
        // The shipper was blocked for 20 s; its next measurement carries the grown lag.
        w.record(t0 + Duration::from_secs(20), 20_000 * MS);
        let s = w.summary(t0 + Duration::from_secs(20));
        assert_eq!(s.samples, 2);
        assert_eq!(s.max_ns, 20_000 * MS);
        assert_eq!(s.p99_ns, 20_000 * MS);
    }
}
