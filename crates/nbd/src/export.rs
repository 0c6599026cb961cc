//! The backend seam: what an NBD export provides to the protocol core.

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
    /// NBD_ESHUTDOWN: the server is going away; the client should disconnect.
    #[error("shutting down")]
    Shutdown,
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
}
