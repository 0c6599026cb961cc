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

/// How a resync decides which regions to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncMethod {
    /// Copy every pending region.
    #[default]
    Copy,
    /// Compare each pending region's checksum with the replica's; copy only those that differ.
    Verify,
}

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

/// What a completed resync did, from the finished operation itself (not a progress sample).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ResyncSummary {
    pub method: ResyncMethod,
    pub total_bytes: u64,
    /// Bytes compared with the replica by checksum (verify only).
    pub verified_bytes: u64,
    /// Payload bytes the resync copied into the journal.
    pub copied_bytes: u64,
    pub seconds: f64,
    /// When it completed, ns since the Unix epoch.
    pub completed_ns: u64,
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

/// A volume's protection state, as `cdp status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VolumeState {
    pub name: String,
    /// protecting, marking, resyncing, initializing or connecting.
    pub state: String,
    pub on_appliance_loss: String,
    /// Bytes of regions waiting for a resync copy.
    pub dirty_bytes: u64,
    /// Payload bytes copied by resyncs since the splitter started.
    pub resync_copied_bytes: u64,
    pub resync: Option<ResyncState>,
    /// The last completed resync's totals.
    pub last_resync: Option<ResyncSummary>,
    /// When the splitter began marking what is still to be resynchronised (ns since the
    /// Unix epoch); points of the group from then until the resync's end are not recoverable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marking_since_ns: Option<u64>,
    /// Hosts attached over NBD (connections in the transmission phase); filled in by the
    /// control socket, which knows the NBD server.
    pub nbd_clients: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ResyncState {
    /// copy, or verify (compare checksums with the replica, copy only what differs).
    pub method: ResyncMethod,
    pub total_bytes: u64,
    /// Bytes settled: found equal to the replica, or copied (zero runs count without payload).
    pub done_bytes: u64,
    /// Bytes compared with the replica by checksum (verify only).
    pub verified_bytes: u64,
    /// Payload bytes this resync copied into the journal.
    pub copied_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_s: u64,
    pub seconds_left: Option<u64>,
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
