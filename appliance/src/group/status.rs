//! The group's status, as `cdp status` shows it.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{consolidate, Group};
use crate::config::JournalFullPolicy;
use crate::history::HistoryStats;

impl Group {
    pub fn status(&self) -> GroupStatus {
        let last = self.journal.last_seq().0;
        let distributed = self.distributed_seq().0;
        let first_timestamp_ns = match self.retention.window_ns {
            Some(_) => self.journal.first_record_timestamp().unwrap_or_else(|e| {
                tracing::warn!(group = %self.name, "reading the oldest journal record: {e}");
                None
            }),
            None => None,
        };
        let (logical, stored) = self.journal.write_bytes_since_open();
        // One lock at a time: guards in the struct expression below would all live until
        // its end, nesting `History` around `ConsolidationState` against the lock order.
        let replica_held_at = self.hold.lock().map(|s| s.0);
        let history = self.history.lock().stats();
        let consolidation = self.consolidation_status();
        let volumes = self
            .read_volumes()
            .values()
            .map(|v| VolumeStatus {
                name: v.name.clone(),
                size: v.size,
                replica: v.replica_path.display().to_string(),
                connected: v.connected.get(),
                last_source_seq: v.last_source_seq.load(Ordering::Relaxed),
            })
            .collect();
        GroupStatus {
            name: self.name.clone(),
            journal_bytes: self.journal.size_bytes(),
            journal_segments: self.journal.segment_count(),
            first_seq: self.journal.first_seq().0,
            last_seq: last,
            durable_seq: self.journal.durable_seq().0,
            distributed_seq: distributed,
            lag_records: last.saturating_sub(distributed),
            journal_capacity_bytes: self.retention.capacity_bytes,
            journal_over_capacity: *self.over_capacity.borrow(),
            journal_full_policy: self.journal_full_policy,
            journal_throttling: *self.over_capacity.borrow()
                && self.journal_full_policy == JournalFullPolicy::Throttle,
            journal_retention_s: self.retention.window_ns.map(|w| w / 1_000_000_000),
            first_timestamp_ns,
            journal_write_logical_bytes: logical,
            journal_write_stored_bytes: stored,
            journal_compression_ratio: if stored == 0 {
                1.0
            } else {
                logical as f64 / stored as f64
            },
            failure: self.failure.borrow().clone(),
            undo_bytes: self.undo.size_bytes(),
            oldest_point_seq: self.oldest_point().0,
            replica_held_at,
            history,
            consolidation,
            volumes,
            source: self.replication.source,
            remote: self
                .replication
                .shipping
                .as_ref()
                .map(|shipping| shipping.status(last)),
            replication_source: (!self.role.is_primary()).then(|| {
                self.replication
                    .receiving
                    .status(self.journal.durable_seq().0)
            }),
            role: Some(self.role.status()),
            archive: self.archive.as_ref().map(|a| a.status(&self.journal)),
        }
    }
}

/// Status of a group, as `cdp status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub journal_bytes: u64,
    pub journal_segments: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub distributed_seq: u64,
    pub lag_records: u64,
    /// Retention releases the oldest segments above this size.
    pub journal_capacity_bytes: u64,
    /// The journal is above its capacity and nothing more may be released yet because
    /// distribution to the replica is behind. The host is not stopped (future policy).
    pub journal_over_capacity: bool,
    /// What a full journal does to the host (`release` or `throttle`).
    pub journal_full_policy: JournalFullPolicy,
    /// Host writes are being held because the journal is full (policy `throttle`).
    pub journal_throttling: bool,
    /// The time window, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_retention_s: Option<u64>,
    /// Timestamp of the oldest record kept (ns since the Unix epoch), shown when a time
    /// window is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_timestamp_ns: Option<u64>,
    /// Write payload bytes journaled since the appliance started, as the host wrote them
    /// and as stored after compression, and their ratio (logical / stored, 1.0 if none).
    pub journal_write_logical_bytes: u64,
    pub journal_write_stored_bytes: u64,
    pub journal_compression_ratio: f64,
    pub failure: Option<String>,
    /// The undo stream: before-images distribution saved, which let images and rollback
    /// reach points older than the replica.
    pub undo_bytes: u64,
    /// The oldest point an image can be opened at.
    pub oldest_point_seq: u64,
    /// A logged image holds the replica at this seq; distribution waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_held_at: Option<u64>,
    pub history: HistoryStats,
    /// The consolidation policy and what its passes did, if the group has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<consolidate::ConsolidationStatus>,
    pub volumes: Vec<VolumeStatus>,
    /// `local`, or `remote` for the remote copy of another appliance's group.
    pub source: crate::config::GroupSource,
    /// Shipping to the remote copy, for a group with `[group.remote]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::replication::state::RemoteStatus>,
    /// Receiving from the source, for a remote copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_source: Option<crate::replication::state::ReceivingStatus>,
    pub role: Option<cdp_control::RoleStatus>,
    /// The archive on object storage, for a group with `[group.archive]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<crate::archiver::state::ArchiveStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub replica: String,
    pub connected: bool,
    pub last_source_seq: u64,
}

/// A volume's status as the control protocol defines it.
impl From<VolumeStatus> for cdp_control::VolumeStatus {
    fn from(volume: VolumeStatus) -> Self {
        let VolumeStatus {
            name,
            size,
            replica,
            connected,
            last_source_seq,
        } = volume;
        cdp_control::VolumeStatus {
            name,
            size,
            replica,
            connected,
            last_source_seq,
        }
    }
}
