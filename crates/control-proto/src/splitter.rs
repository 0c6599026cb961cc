//! The splitter's answers: each volume's protection state and resync progress.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How a resync decides which regions to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncMethod {
    /// Copy every pending region.
    #[default]
    Copy,
    /// Compare each pending region's checksum with the replica's; copy only those that differ.
    Verify,
}

impl std::fmt::Display for ResyncMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResyncMethod::Copy => "copy",
            ResyncMethod::Verify => "verify",
        })
    }
}

/// What a completed resync did, from the finished operation itself (not a progress sample).
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// A volume's protection state, as `cdp status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marking_since_ns: Option<u64>,
    /// Hosts attached over NBD (connections in the transmission phase); filled in by the
    /// control socket, which knows the NBD server. Left out by splitters that predate it.
    #[serde(default)]
    pub nbd_clients: Option<usize>,
}

/// A resync's progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// The answer to the splitter's `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitterStatus {
    pub volumes: Vec<VolumeState>,
    /// Where hosts reach the volumes (`unix:PATH`, `HOST:PORT`).
    pub nbd: Vec<String>,
}

/// The answer to the splitter's `resync`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitterResyncing {
    pub volume: String,
    pub state: VolumeState,
}

/// The answer to the splitter's `volume_add`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitterVolumeAdded {
    pub added: String,
    pub state: VolumeState,
}

/// The answer to the splitter's `volume_remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitterVolumeRemoved {
    pub removed: String,
    pub hosts_attached: usize,
    /// The appliance confirmed the volume's last changes before the link ended; if not,
    /// they stay marked in the dirty bitmap.
    pub last_changes_journaled: bool,
    pub production: PathBuf,
}
