//! The answer to the appliance's `status`: every group with its journal, replica, remote
//! replication and volumes, and the settings it names.

use serde::{Deserialize, Serialize};

/// The answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplianceStatus {
    pub groups: Vec<GroupStatus>,
}

/// Status of a group, as `cdp status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// distribution to the replica is behind.
    pub journal_over_capacity: bool,
    /// What a full journal does to the host (`release` or `throttle`).
    pub journal_full_policy: JournalFullPolicy,
    /// Host writes are being held because the journal is full (policy `throttle`).
    pub journal_throttling: bool,
    /// The time window, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_retention_s: Option<u64>,
    /// Timestamp of the oldest record kept (ns since the Unix epoch), shown when a time
    /// window is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_held_at: Option<u64>,
    pub history: HistoryStats,
    /// The consolidation policy and what its passes did, if the group has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<ConsolidationStatus>,
    pub volumes: Vec<VolumeStatus>,
    /// `local`, or `remote` for the remote copy of another appliance's group.
    pub source: GroupSource,
    /// Shipping to the remote copy, for a group with `[group.remote]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteStatus>,
    /// Receiving from the source, for a remote copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_source: Option<ReceivingStatus>,
    /// This copy's role, generation history and what it knows of its peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::RoleStatus>,
    /// The archive on object storage, for a group with `[group.archive]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
}

/// `groups[].archive`: how far the group's archive on object storage is behind its journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArchiveStatus {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub url: String,
    /// Every record up to here is in the archive, named by its newest manifest.
    pub archived_seq: u64,
    /// False until the archiver read the archive's manifest once since the appliance
    /// started (`archived_seq` is then 0 and the lag counts the whole journal).
    pub archived_known: bool,
    /// The newest manifest generation written or read.
    pub generation: u64,
    /// Durable journal records not yet archived, and the journal segments holding them
    /// (the active one included: it is sealed after `seal_after_s`).
    pub lag_records: u64,
    pub lag_segments: u64,
    /// Age of the oldest durable record not yet archived; 0 when caught up.
    pub lag_seconds: f64,
    /// Since the appliance started: segments uploaded, their journal bytes and the bytes
    /// stored (after zstd).
    pub uploaded_segments: u64,
    pub uploaded_raw_bytes: u64,
    pub uploaded_stored_bytes: u64,
    /// The last pass failed (store down, refused prefix, ...) with this error; cleared by
    /// the next pass that succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `release_unarchived`: local retention may release history the archive lacks.
    pub release_unarchived: bool,
}

/// One volume of a group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub replica: String,
    pub connected: bool,
    pub last_source_seq: u64,
}

/// Entry counts of a group's block index, for status and the memory limit's arithmetic.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct HistoryStats {
    pub redo_records: u64,
    pub undo_records: u64,
    pub index_entries: u64,
}

/// For log lines: `120 redo records, 80 undo records, 200 index entries`.
impl std::fmt::Display for HistoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} redo records, {} undo records, {} index entries",
            self.redo_records, self.undo_records, self.index_entries
        )
    }
}

/// What one consolidation pass did (also the answer to `cdp journal consolidate`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConsolidationReport {
    /// Points at or below this seq are recoverable only if kept.
    pub through_seq: u64,
    pub kept_points: usize,
    pub segments_rewritten: usize,
    pub payloads_dropped: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub bytes_freed: u64,
    pub millis: u64,
    /// Why nothing was consolidated, if nothing was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nothing_because: Option<String>,
}

/// Consolidation in `cdp status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConsolidationStatus {
    pub keep_all_s: u64,
    /// (one point every N seconds, for M seconds), youngest tier first.
    pub tiers: Vec<(u64, u64)>,
    pub through_seq: u64,
    pub kept_points: usize,
    pub passes: u64,
    pub bytes_freed_total: u64,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<ConsolidationReport>,
}

/// Where a group's writes come from (`[[group]] source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSource {
    #[default]
    Local,
    Remote,
}

/// What a full journal does to the host (`[[group]] journal_full_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalFullPolicy {
    #[default]
    Release,
    Throttle,
}

impl std::fmt::Display for JournalFullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JournalFullPolicy::Release => "release",
            JournalFullPolicy::Throttle => "throttle",
        })
    }
}

/// When a host write to a shipping group is acknowledged (`[group.remote] mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    #[default]
    Async,
    Sync,
    Dynamic,
}

/// `[group.remote] compress_level`: a fixed zstd level (0 = off) or `"adaptive"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompressLevel {
    Fixed(i32),
    #[default]
    Adaptive,
}

impl Serialize for CompressLevel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CompressLevel::Fixed(level) => s.serialize_i32(*level),
            CompressLevel::Adaptive => s.serialize_str("adaptive"),
        }
    }
}

impl<'de> Deserialize<'de> for CompressLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LevelVisitor;
        impl serde::de::Visitor<'_> for LevelVisitor {
            type Value = CompressLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a zstd level (0 = off, 1..=19) or \"adaptive\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CompressLevel, E> {
                // Out-of-range levels are clamped (with a warning) by the config's sanitize.
                Ok(CompressLevel::Fixed(
                    v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
                ))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CompressLevel, E> {
                Ok(CompressLevel::Fixed(v.min(i32::MAX as u64) as i32))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CompressLevel, E> {
                match v {
                    "adaptive" => Ok(CompressLevel::Adaptive),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(LevelVisitor)
    }
}

/// `groups[].remote`, for a group that ships to a remote copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteStatus {
    pub endpoint: String,
    /// The link is mutual TLS (false: plaintext, as configured explicitly).
    pub tls: bool,
    pub connected: bool,
    /// Every record up to here is durable at the remote.
    pub shipped_seq: u64,
    /// False until the remote answered once since this appliance started (`shipped_seq`
    /// is then 0 and the lag counts the whole journal).
    pub shipped_known: bool,
    pub lag_records: u64,
    /// Age of the oldest record the remote does not have yet; 0 when caught up.
    pub lag_seconds: f64,
    /// The 99th percentile and the maximum of the lag over the last `lag_window_s` seconds
    /// the shipper measured (one sample per second, the largest of that second): how far
    /// behind the remote copy ran recently, which the current `lag_seconds` alone does not
    /// tell.
    pub lag_p99_ms: u64,
    pub lag_max_ms: u64,
    pub lag_window_s: u64,
    pub rpo_s: u64,
    pub rpo_exceeded: bool,
    /// Journal bytes the remote does not have yet, and the RPO in bytes if set.
    pub lag_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_bytes: Option<u64>,
    /// `throttle_on_rpo`, and whether host writes are held for it right now.
    pub throttle_on_rpo: bool,
    /// The last resynchronisation by regions since start (history released before it was
    /// shipped), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_region_resync: Option<RegionResyncReport>,
    pub rpo_throttling: bool,
    /// The setting: a zstd level or `"adaptive"`.
    pub compress_level: CompressLevel,
    /// The level the last batch went out with (0: uncompressed).
    pub compress_level_now: i32,
    /// `async`, `sync` or `dynamic` (`[group.remote] mode`).
    pub mode: ReplicationMode,
    /// Host writes wait for the remote copy right now (sync, or dynamic while synchronous).
    pub sync_active: bool,
    /// Sync mode: host writes have been waiting for the remote copy for more than a second.
    pub sync_waiting: bool,
    /// The configured wire bandwidth limit, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Measured wire bytes per second over the last ~5 s.
    pub wire_rate_bytes_per_s: u64,
    /// Batch bytes shipped since start: records as they are, after dedup, and on the wire
    /// (after compression); `wire_compression_ratio` is raw / wire (both together),
    /// `dedup_ratio` raw / dedup, `zstd_ratio` dedup / wire.
    pub wire_raw_bytes: u64,
    pub wire_dedup_bytes: u64,
    pub wire_bytes: u64,
    pub wire_compression_ratio: f64,
    /// `[group.remote] dedup`.
    pub dedup: bool,
    pub dedup_ratio: f64,
    pub zstd_ratio: f64,
    /// Whole 4 KiB blocks of writes shipped since start as bytes, as zero tags, as references.
    pub dedup_literal_blocks: u64,
    pub dedup_zero_blocks: u64,
    pub dedup_reference_blocks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What the last resynchronisation by regions did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RegionResyncReport {
    /// The remote held the journal up to here...
    pub remote_had_through_seq: u64,
    /// ...but this journal had released everything before this seq.
    pub journal_first_seq: u64,
    /// The point both copies hold afterwards.
    pub through_seq: u64,
    pub regions_compared: u64,
    pub regions_sent: u64,
    pub bytes_sent: u64,
    pub millis: u64,
}

/// `groups[].replication_source`, for a remote copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReceivingStatus {
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The last record received (and durable) here, with the source's seq numbering.
    pub last_received_seq: u64,
}
