//! The journal's one error type: each variant is something a caller can act on.

use std::io;
use std::path::PathBuf;

/// Errors returned by every journal operation.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The operating system refused a file operation (ENOSPC, EIO, permissions...).
    /// After a failed append the journal truncated back to its last good record.
    #[error("journal I/O error: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Bytes on disk are not what the journal wrote. `offset` is the byte offset in
    /// `path` where the damage starts.
    #[error("journal corruption in {path} at byte {offset}: {what}")]
    Corruption {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// An fsync failed (or an append could not be undone), so the page cache can no longer
    /// be trusted. Every later append and sync fails until the journal is reopened.
    #[error("journal is fenced after a failed write or fsync; reopen it to recover")]
    Fenced,
    /// The caller passed something the journal cannot store.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reserved for retention: the journal has no room for more records.
    #[error("journal is full")]
    Full,
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corruption(
        path: impl Into<PathBuf>,
        offset: u64,
        what: impl Into<String>,
    ) -> Self {
        JournalError::Corruption {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }
}
