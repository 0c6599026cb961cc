//! What a split link reports: the volume's protection state, and its resync's progress and
//! summary.

use std::time::Instant;

/// Why regions are being copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResyncReason {
    /// Regions marked by crashes or marking mode.
    #[default]
    Dirty,
    /// First protection of this volume by this splitter: everything is copied.
    Initial,
    /// An administrator asked for a full resync.
    Full,
}

impl std::fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResyncReason::Dirty => "dirty",
            ResyncReason::Initial => "initial",
            ResyncReason::Full => "full",
        })
    }
}

/// How a resync decides which regions to copy, what it did, and a volume's state: defined by
/// the control protocol, which reports them.
pub use cdp_control::{ResyncMethod, ResyncState, ResyncSummary, VolumeState};

#[derive(Default)]
pub(super) struct ResyncProgress {
    pub(super) reason: ResyncReason,
    pub(super) method: ResyncMethod,
    pub(super) started: Option<Instant>,
    pub(super) total_bytes: u64,
    /// Bytes settled: found equal by verification, or copied.
    pub(super) done_bytes: u64,
    /// Bytes whose checksums were compared with the replica's.
    pub(super) verified_bytes: u64,
    /// Payload bytes this resync copied into the journal.
    pub(super) copied_bytes: u64,
    /// The totals of the last resync that completed, kept for `cdp volume resync`'s summary.
    pub(super) last: Option<ResyncSummary>,
}

impl ResyncProgress {
    pub(super) fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            100.0
        } else {
            100.0 * self.done_bytes as f64 / self.total_bytes as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_settled_bytes_and_an_empty_resync_is_done() {
        let mut progress = ResyncProgress::default();
        assert_eq!(progress.percent(), 100.0);
        progress.total_bytes = 4 << 20;
        progress.done_bytes = 1 << 20;
        assert_eq!(progress.percent(), 25.0);
    }
}
