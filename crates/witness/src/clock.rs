//! The lease clock: CLOCK_BOOTTIME in nanoseconds, monotonic and counting time the machine
//! was suspended, so a holder whose host slept does not believe it held its lease meanwhile
//! (CLOCK_MONOTONIC, behind `std::time::Instant`, stops during suspend: the unsafe direction
//! for a holder). Never compared with another machine's clock: only differences are used.

use std::time::{Duration, Instant};

/// An instant on this machine's boot clock, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(pub u64);

impl Stamp {
    /// Now, on the boot clock.
    pub fn now() -> Stamp {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the pointer it is given.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        // CLOCK_BOOTTIME exists on every Linux since 2.6.39; failing here is a broken platform.
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        Stamp(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    pub fn plus(self, d: Duration) -> Stamp {
        Stamp(self.0.saturating_add(d.as_nanos() as u64))
    }

    /// `self - earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// The same instant as a `std::time::Instant`, by the offset between the two clocks now.
    /// If the machine suspends before that moment, the `Instant` (which stops during suspend)
    /// is reached later than the stamp: fine for display and timers, but a check that must be
    /// safe compares `Stamp`s (as `LeaseKeeper::holds_lease` does).
    pub fn to_instant(self) -> Instant {
        let (now_stamp, now_instant) = (Stamp::now(), Instant::now());
        if self >= now_stamp {
            now_instant + self.since(now_stamp)
        } else {
            now_instant
                .checked_sub(now_stamp.since(self))
                .unwrap_or(now_instant)
        }
    }
}
