//! Errors of the archive: the store, the objects' integrity, and the refusals.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("bad archive URL {url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {what}")]
    Io { path: String, what: String },
    #[error("archived object {key} is damaged: {what}")]
    Damaged { key: String, what: String },
    #[error("segment {index} of the local journal is damaged at byte {offset}: {what}")]
    LocalSegmentDamaged {
        index: u64,
        offset: u64,
        what: String,
    },
    #[error("the archive at {prefix} belongs to group id {found:#x} (archiver {found_archiver:#x}), not to this group {ours:#x} (archiver {ours_archiver:#x}): two appliances on one prefix are refused")]
    OwnedByOther {
        prefix: String,
        found: u64,
        ours: u64,
        found_archiver: u64,
        ours_archiver: u64,
    },
    #[error("the archive has no group {0}")]
    NoGroup(String),
    #[error("point {0} is not recoverable from the archive: {1}")]
    NotRecoverable(String, String),
    #[error("manifest generation {0} already exists (another archiver wrote it)")]
    GenerationTaken(u64),
}

impl ArchiveError {
    pub(crate) fn damaged(key: &str, what: impl Into<String>) -> ArchiveError {
        ArchiveError::Damaged {
            key: key.to_string(),
            what: what.into(),
        }
    }
}
