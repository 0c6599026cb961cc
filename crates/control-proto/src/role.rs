//! Roles and generations of a group's copies as `cdp status` and `cdp failover` show them.
//!
//! Each copy of a group is `primary` (hosts write through its splitters) or `secondary`
//! (fed by replication). Every promotion starts a new generation; a copy keeps the list of
//! generations it knows, each with the first seq written in it and the site that held it.
//! Two copies compare their lists when their replication link connects (see
//! `HistoryComparison`): the appliance's `role.rs` decides, this crate only names the result.

use serde::{Deserialize, Serialize};

/// What hosts may do with a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyRole {
    /// Hosts write through this copy's splitters; it ships to its peer.
    Primary,
    /// Fed only by replication; splitters are refused.
    Secondary,
}

impl std::fmt::Display for CopyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyRole::Primary => "primary",
            CopyRole::Secondary => "secondary",
        })
    }
}

/// One generation: the copy at `site` was primary from `first_seq` on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationEntry {
    pub generation: u64,
    pub first_seq: u64,
    pub site: String,
}

/// What a copy learnt comparing its generation history with its peer's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum HistoryComparison {
    /// Same history, and this copy holds everything the other one has.
    UpToDate,
    /// Same lineage; this copy lacks records the other has (normal shipping fills them).
    Behind,
    /// Same lineage; the other copy lacks records this one has.
    Ahead,
    /// Split brain: both copies hold different records from `seq` on. Never resolved
    /// silently: `cdp reprotect` (or an administrator) decides which side's writes stay.
    Diverged { seq: u64, reason: String },
}

/// The last role change of this copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// `planned`, `unplanned` or `demoted`.
    pub kind: String,
    /// The generation that began (or, when demoted, the peer's new generation).
    pub generation: u64,
    /// The first seq of that generation.
    pub first_seq: u64,
    /// When it happened, ns since the Unix epoch.
    pub at_ns: u64,
    /// Host-visible pause of a planned failover (drain to promoted), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Unplanned failover: what this copy never received from the old primary, as far as
    /// it knows (`first_seq..=last_seq` may be unknown: `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<LostRange>,
}

/// Records an unplanned failover left behind at the old primary, as far as the new one
/// knows: from `first_seq` on, up to `last_seq` when the old primary ever told it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    pub first_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Timestamp of the last record received (ns since the Unix epoch): host writes after
    /// it may be lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ns: Option<u64>,
}

/// `groups[].role` of `cdp status --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleStatus {
    pub role: CopyRole,
    /// This copy's site id (`site` in appliance.toml, or the group id in hex).
    pub site: String,
    /// The newest generation this copy knows.
    pub generation: u64,
    pub history: Vec<GenerationEntry>,
    /// The peer's role and generation as last seen on the replication link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_role: Option<CopyRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_generation: Option<u64>,
    /// The last comparison with the peer's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<HistoryComparison>,
    /// A divergence seen since this copy's last role change (kept until reprotect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,
    /// A planned failover is draining this copy now: host writes wait.
    #[serde(default)]
    pub draining: bool,
    /// `none`, `hook` or `witness`.
    pub fencing: String,
}

/// The answer to `Request::Failover`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedOver {
    pub group: String,
    pub planned: bool,
    /// The copy that is primary now (site id) and its generation.
    pub primary_site: String,
    pub generation: u64,
    /// The first seq of the new generation.
    pub first_seq: u64,
    /// Planned: from the drain's start to the peer's promotion, ms (hosts waited this long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<LostRange>,
    /// The production volumes written at the promoted copy: (volume, path). Start a
    /// splitter on them to serve hosts.
    #[serde(default)]
    pub production: Vec<(String, std::path::PathBuf)>,
}

/// The answer to `Request::Reprotect`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reprotected {
    pub group: String,
    /// The seq from which this copy's records differed from the primary's.
    pub divergence_seq: u64,
    /// Where this copy's writes since the divergence were kept: one image file per volume
    /// (this copy as it was at `diverged_last_seq`). None with `--force`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_image_dir: Option<std::path::PathBuf>,
    pub diverged_last_seq: u64,
}
