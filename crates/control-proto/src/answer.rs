//! The appliance's answers other than `status`: bookmarks, points, the timeline,
//! consolidation, images, groups and volumes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::request::Consistency;
use crate::status::{ConsolidationReport, GroupStatus, VolumeStatus};

/// One bookmark of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bookmark {
    pub name: String,
    pub seq: u64,
    pub timestamp_ns: u64,
    /// `timestamp_ns` as RFC 3339 UTC with milliseconds.
    pub time: String,
    pub consistency: Consistency,
    pub freeze_window_ms: u32,
    /// Kept through consolidation.
    pub keep: bool,
    /// Consolidation dropped this point (it was not marked to keep): it can no longer be
    /// opened.
    pub consolidated: bool,
}

/// The answer to `bookmark_create`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BookmarkCreated {
    pub group: String,
    pub bookmark: Bookmark,
}

/// The answer to `bookmark_list`: the group's bookmarks in seq order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BookmarkListed {
    pub group: String,
    pub bookmarks: Vec<Bookmark>,
}

/// A resolved point: the seq of a record and its timestamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedPoint {
    pub seq: u64,
    pub timestamp_ns: u64,
    pub time: String,
    /// The bookmark the point names, if it was named by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmark: Option<String>,
}

/// The answer to `point_resolve`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PointResolved {
    pub group: String,
    /// The point as asked for.
    pub point: String,
    pub resolved: ResolvedPoint,
}

/// Changes journaled in one time bucket of the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityBucket {
    pub start_ns: u64,
    pub start: String,
    /// Write, trim and zero records (bookmarks are listed separately, markers not counted).
    pub records: u64,
    /// Bytes those records change on the volumes (as the host wrote them).
    pub bytes: u64,
}

/// One end of the recoverable window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowEnd {
    pub seq: u64,
    pub timestamp_ns: u64,
    pub time: String,
}

/// The answer to `timeline`: the recoverable window, its bookmarks, and write activity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timeline {
    pub group: String,
    /// Oldest recoverable point; `None` while the journal holds no record.
    pub first: Option<WindowEnd>,
    pub last: Option<WindowEnd>,
    pub bookmarks: Vec<Bookmark>,
    pub bucket_s: u64,
    /// Buckets with activity, oldest first (empty buckets are left out).
    pub activity: Vec<ActivityBucket>,
    /// History consolidation thinned out, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidated: Option<ConsolidatedHistory>,
    /// Stretches of the window that are not recoverable points: a volume was marking or
    /// resynchronising.
    pub not_recoverable: Vec<NotRecoverable>,
}

/// A stretch of history that is not offered for recovery (DESIGN.md rule 7).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NotRecoverable {
    pub volume: String,
    /// `resync` (after `from_seq`), `marking` (stamped at or after `from_ns` too), or
    /// `no_splitter` (no connection since `from_ns`; its splitter may be marking).
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_time: Option<String>,
    /// The first recoverable seq again; `None` while still going on.
    pub until_seq: Option<u64>,
}

/// Below `below_seq` only the `kept` points can be opened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConsolidatedHistory {
    pub below_seq: u64,
    pub kept: Vec<WindowEnd>,
}

/// The answer to `journal_consolidate`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JournalConsolidated {
    pub group: String,
    pub consolidation: ConsolidationReport,
}

/// How an image is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMode {
    /// Assembled from journal, undo stream and replica; instant.
    Virtual,
    /// The replica rolled back to the point.
    Logged,
}

impl ImageMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageMode::Virtual => "virtual",
            ImageMode::Logged => "logged",
        }
    }
}

/// Whether an image can be read yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Logged access: the replica is not at the point yet.
    RollingBack,
    Ready,
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::RollingBack => "rolling_back",
            ImageState::Ready => "ready",
            ImageState::Failed => "failed",
        }
    }
}

/// An open image, as `cdp image list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: String,
    pub group: String,
    pub seq: u64,
    pub time_ns: u64,
    pub time: String,
    /// The point as the administrator named it.
    pub point: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmark: Option<String>,
    pub writable: bool,
    pub mode: ImageMode,
    pub state: ImageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Rollback progress in undo records (done, needed), for logged images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<(u64, u64)>,
    pub opened_ns: u64,
    /// Where the exports are served (`unix:PATH` or `HOST:PORT`).
    pub nbd: String,
    pub exports: Vec<ImageExport>,
}

/// One volume of an image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageExport {
    pub volume: String,
    /// NBD export name.
    pub export: String,
    pub size: u64,
}

/// The answer to `image_access`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageAccessed {
    pub image: ImageInfo,
}

/// The answer to `image_list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageListed {
    pub images: Vec<ImageInfo>,
}

/// The answer to `image_release`: the image as it was.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageReleased {
    pub released: ImageInfo,
}

/// Where a group's definition lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupOrigin {
    /// A `[[group]]` of `appliance.toml`.
    #[serde(rename = "appliance.toml")]
    ApplianceToml,
    /// Made by `cdp group create`, kept in `managed.toml`.
    #[serde(rename = "runtime")]
    Runtime,
}

impl GroupOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupOrigin::ApplianceToml => "appliance.toml",
            GroupOrigin::Runtime => "runtime",
        }
    }
}

/// One group as `cdp group list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupSummary {
    pub name: String,
    pub origin: GroupOrigin,
    pub journal_capacity_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_retention_s: Option<u64>,
    pub journal_bytes: u64,
    pub last_seq: u64,
    /// The oldest point an image can be opened at, and the time of the oldest record kept.
    pub oldest_point_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_timestamp_ns: Option<u64>,
    pub volumes: Vec<VolumeStatus>,
}

/// The answer to `group_create`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupCreated {
    pub created: String,
    pub status: GroupStatus,
}

/// The answer to `group_list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupListed {
    pub groups: Vec<GroupSummary>,
}

/// The answer to the appliance's `volume_add`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeAdded {
    pub group: String,
    pub added: String,
    pub volume_id: u32,
    pub size: u64,
    pub replica: PathBuf,
}

/// The answer to the appliance's `volume_remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeRemoved {
    pub group: String,
    pub removed: String,
    pub replica_kept: PathBuf,
}
