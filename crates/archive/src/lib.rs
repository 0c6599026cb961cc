//! The archive of a group's journal on object storage (S3-compatible or a local directory):
//! verified, zstd-compressed sealed segments and one manifest per archive generation, and
//! restore, list and verify from the archive alone (no appliance, no local journal).
//!
//! Layout under the URL's prefix, per group name:
//! `GROUP/segments/{index:016x}.seg.zst` (one sealed segment, zstd) and
//! `GROUP/manifests/{generation:016x}.json` (the whole archive's index, written only after
//! every object it names was uploaded and read back). See ARCHITECTURE.md, "Archive".

mod error;
mod manifest;
mod pacer;
mod restore;
mod segment;
mod target;
mod upload;

pub use error::ArchiveError;
pub use manifest::{
    manifest_key, segment_key, ArchivedBookmark, ArchivedSegment, Manifest, VolumeEntry,
    MANIFEST_FORMAT,
};
pub use restore::{
    list_groups, load_latest_manifest, resolve_point, restore, verify, Point, RestoreReport, Stop,
    VerifyReport,
};
pub use segment::{scan_segment, verify_segment, SegmentDamage, SegmentRecord, SegmentSummary};
pub use target::{ArchiveTarget, S3Settings};
pub use upload::{archiver_id, sealed_in_dir, ArchiveGroup, Archiver, UploadLimits, UploadReport};
