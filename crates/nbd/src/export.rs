//! The backend seam: what an NBD export provides to the protocol core.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// What an export supports; the server turns these into NBD transmission flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportFeatures {
    /// Writes, trims and zeroes are answered with EPERM (NBD_FLAG_READ_ONLY).
    pub read_only: bool,
    /// NBD_FLAG_SEND_FLUSH.
    pub can_flush: bool,
    /// NBD_FLAG_SEND_FUA.
    pub can_fua: bool,
    /// NBD_FLAG_SEND_TRIM.
    pub can_trim: bool,
    /// NBD_FLAG_SEND_WRITE_ZEROES.
    pub can_write_zeroes: bool,
    /// NBD_FLAG_CAN_MULTI_CONN: a flush on one connection covers writes completed on all.
    pub can_multi_conn: bool,
}

/// Why an export refused or failed a request; maps onto NBD error codes.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// NBD_EIO.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// NBD_EPERM: the export (or this copy) is not writable now.
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    /// NBD_ENOSPC.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// NBD_EINVAL.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// NBD_ENOTSUP: only for a WRITE_ZEROES with FAST_ZERO that would not be fast.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// NBD_ESHUTDOWN: the server is going away; the client should disconnect.
    #[error("shutting down")]
    Shutdown,
}

/// A run of bytes with one status, as a metadata context reports it. For `base:allocation`
/// `flags` holds `NBD_STATE_HOLE` and `NBD_STATE_ZERO`; other contexts define their own bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// A metadata context an export offers besides `base:allocation` (for instance the
/// extents that changed since a point). Resolved once, during the handshake.
#[async_trait]
pub trait MetaContext: Send + Sync + 'static {
    /// The context's full name, as sent back in `NBD_REP_META_CONTEXT`.
    fn name(&self) -> &str;
    /// Consecutive extents from `offset`, covering at most `length` bytes and at least one
    /// byte. The core validates bounds first, as for `Export`.
    async fn extents(&self, offset: u64, length: u32) -> Result<Vec<Extent>, ExportError>;
}

/// A block device served over NBD. The protocol core validates every request
/// (bounds, flags, read-only) before calling these, so an implementation may assume
/// `offset + length <= size()` and that writes are only called when `!read_only`.
#[async_trait]
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; constant while any connection is open.
    fn size(&self) -> u64;
    fn features(&self) -> ExportFeatures;
    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ExportError>;
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError>;
    async fn flush(&self) -> Result<(), ExportError>;
    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ExportError>;
    /// `may_trim` is false when the client set NBD_CMD_FLAG_NO_HOLE.
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError>;

    /// WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO: zero the range only if that is much faster
    /// than writing zeroes (a hole punched, an unwritten extent, a device offload), else
    /// fail at once with `ExportError::NotSupported`, the range untouched; the client then
    /// writes the zeroes itself, or skips pre-zeroing. The default is never fast.
    async fn write_zeroes_fast(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), ExportError> {
        let _ = (offset, length, fua, may_trim);
        Err(ExportError::NotSupported(
            "zeroing is no faster than writing on this export".into(),
        ))
    }

    /// NBD_CMD_CACHE: the client will read `[offset, offset + length)` soon. A hint; the
    /// default does nothing (and succeeds, as the spec allows).
    async fn cache(&self, offset: u64, length: u32) -> Result<(), ExportError> {
        let _ = (offset, length);
        Ok(())
    }

    /// `base:allocation` of `[offset, offset + length)`: consecutive extents from `offset`,
    /// covering at least one byte and at most `length`. `None` means the export cannot
    /// tell cheaply; the core then reports data and reads without holes. An extent flagged
    /// `NBD_STATE_ZERO` must read as zeroes: sparse reads send it as a hole unread.
    async fn allocation(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Option<Vec<Extent>>, ExportError> {
        let _ = (offset, length);
        Ok(None)
    }

    /// Resolves a metadata context query other than `base:`; `None` if this export has no
    /// such context. Called during the handshake, so it must not block for long.
    fn meta_context(&self, query: &str) -> Option<Arc<dyn MetaContext>> {
        let _ = query;
        None
    }
}
