//! The lease rule: the two deadlines and the margin between them, on each side's own clock.
//!
//! Let `D` be the lease duration, `ρ` the largest rate at which any clock involved may run
//! fast or slow against real time (`drift_ppm`), and `f` a fixed term (`margin_fixed_ms`).
//! The margin is `m = ρ·D + f`.
//! - The **holder** stamps `sent` on its clock *before* it sends a request, and after a grant
//!   believes it holds the lease until `sent + D - m` on its clock.
//! - The **witness** stamps `granted` on its clock when it decides, and grants the group to
//!   another site only after `granted + D + m` on its clock (and after a restart, only after
//!   `start + D + m` for every grant it had persisted).
//!
//! Why the two never overlap, in real time `t`: the request is sent before the witness
//! decides, so `t(sent) ≤ t(granted)`. A clock within `ρ` of real time measures a local
//! interval `L` in a real interval between `L/(1+ρ)` and `L/(1-ρ)`. The holder's belief ends
//! by `t(sent) + (D - m)/(1-ρ)`; the witness's next grant comes at the earliest at
//! `t(granted) + (D + m)/(1+ρ)`. With `m = ρD + f`: `(D - ρD - f)/(1-ρ) = D - f/(1-ρ)` and
//! `(D + ρD + f)/(1+ρ) = D + f/(1+ρ)`, so between the end of the old holder's belief and
//! the new holder's first grant lie at least `f/(1-ρ) + f/(1+ρ) ≥ 2f` of real time. That gap
//! is what covers a write the old holder checked the lease for just before its end and
//! acknowledged a moment later: the fixed term bounds that check-to-acknowledgement time
//! (and the new holder only believes after it *received* the grant, later still).

use std::time::Duration;

use crate::error::WitnessError;
use crate::limits::DRIFT_PPM_MAX;

/// How far two clocks may disagree over a lease: `duration × drift_ppm / 10⁶ + fixed_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Margin {
    /// Largest drift of any clock against real time, parts per million (default 10 000 = 1 %,
    /// a hundred times what NTP-less quartz does, so a VM clock being slewed stays inside).
    pub drift_ppm: u64,
    /// Fixed term in milliseconds (default 100): bounds the time between a holder's lease
    /// check and the acknowledgement it allows, and the scheduling delay of either side.
    pub fixed_ms: u64,
}

impl Default for Margin {
    fn default() -> Margin {
        Margin {
            drift_ppm: 10_000,
            fixed_ms: 100,
        }
    }
}

impl Margin {
    /// Refuses a margin no clock could honour.
    pub fn check(&self) -> Result<(), WitnessError> {
        if self.drift_ppm > DRIFT_PPM_MAX {
            return Err(WitnessError::Config(format!(
                "drift_ppm = {} is above {DRIFT_PPM_MAX} (10 %)",
                self.drift_ppm
            )));
        }
        Ok(())
    }

    /// The margin for a lease of `duration`.
    pub fn for_duration(&self, duration: Duration) -> Duration {
        let drift_ns = (duration.as_nanos() as u64).saturating_mul(self.drift_ppm) / 1_000_000;
        Duration::from_nanos(drift_ns) + Duration::from_millis(self.fixed_ms)
    }

    /// The larger of two margins, term by term (the keeper applies the witness's margin if
    /// it is larger than its own).
    pub fn max(self, other: Margin) -> Margin {
        Margin {
            drift_ppm: self.drift_ppm.max(other.drift_ppm),
            fixed_ms: self.fixed_ms.max(other.fixed_ms),
        }
    }

    /// How long after `sent` the holder may believe (`D - m`), or `None` if the margin eats
    /// the whole lease (such a grant gives no lease at all).
    pub fn holder_validity(&self, duration: Duration) -> Option<Duration> {
        duration
            .checked_sub(self.for_duration(duration))
            .filter(|d| !d.is_zero())
    }

    /// How long after `granted` the witness keeps the lease from other sites (`D + m`).
    pub fn witness_exclusion(&self, duration: Duration) -> Duration {
        duration + self.for_duration(duration)
    }
}

#[cfg(test)]
mod tests {
    //! The rule against simulated clocks: real time in nanoseconds, each side's clock a rate
    //! within ±ρ (and changing between intervals), message delays, and the holder's
    //! check-to-acknowledgement time up to the fixed term. The property: the old holder's
    //! last acknowledged write (real time) precedes the new holder's first belief.
    use super::*;
    use proptest::prelude::*;

    /// Real nanoseconds for a clock running at `rate_ppm` offset from 1 to measure `local`.
    fn real_for_local(local: Duration, rate_ppm: i64) -> f64 {
        local.as_nanos() as f64 / (1.0 + rate_ppm as f64 / 1e6)
    }

    #[test]
    fn margin_is_drift_share_plus_fixed() {
        let m = Margin::default();
        assert_eq!(
            m.for_duration(Duration::from_secs(10)),
            Duration::from_millis(200)
        );
        assert_eq!(
            m.holder_validity(Duration::from_secs(10)),
            Some(Duration::from_millis(9800))
        );
        assert_eq!(
            m.witness_exclusion(Duration::from_secs(10)),
            Duration::from_millis(10200)
        );
        assert_eq!(m.holder_validity(Duration::from_millis(100)), None);
    }

    #[test]
    fn margin_without_drift_allowance_overlaps() {
        // The counter-check: with no drift term, a holder clock 1 % slow and a witness clock
        // 1 % fast overlap by about 2 % of the lease minus the fixed gap.
        let m = Margin {
            drift_ppm: 0,
            fixed_ms: 10,
        };
        let d = Duration::from_secs(10);
        let holder_end = real_for_local(m.holder_validity(d).unwrap(), -10_000);
        let witness_next = real_for_local(m.witness_exclusion(d), 10_000);
        assert!(holder_end > witness_next, "{holder_end} <= {witness_next}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn no_overlap_under_drift(
            duration_ms in 500u64..600_000,
            drift_ppm in 0u64..=100_000,
            fixed_ms in 1u64..1000,
            holder_rate_share in -1.0f64..=1.0,
            witness_rate_share in -1.0f64..=1.0,
            request_delay_us in 0u64..5_000_000,
            ack_share in 0.0f64..=1.0,
        ) {
            let m = Margin { drift_ppm, fixed_ms };
            let d = Duration::from_millis(duration_ms);
            let Some(validity) = m.holder_validity(d) else { return Ok(()); };
            let holder_rate = (holder_rate_share * drift_ppm as f64) as i64;
            let witness_rate = (witness_rate_share * drift_ppm as f64) as i64;
            // Real times, ns: the holder sends at 0, the witness decides after the delay.
            let sent = 0.0;
            let granted = request_delay_us as f64 * 1000.0;
            let holder_end = sent + real_for_local(validity, holder_rate);
            // A write checked at the last instant of belief is acknowledged up to the fixed
            // term later (on the holder's clock).
            let ack = holder_end
                + real_for_local(Duration::from_millis(fixed_ms).mul_f64(ack_share), holder_rate);
            let next_grant = granted + real_for_local(m.witness_exclusion(d), witness_rate);
            prop_assert!(ack < next_grant, "ack {ack} >= next grant {next_grant}");
        }
    }
}
