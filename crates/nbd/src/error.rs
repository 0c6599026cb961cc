//! The crate's error type: what can end a connection, a listener or a registry call.

/// Errors from the NBD server. Every peer-caused variant ends only the connection it
/// happened on; the accept loop and other clients carry on.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something the protocol forbids (bad magic, unknown client flags,
    /// an oversized payload we cannot skip); the connection is dropped.
    #[error("NBD peer broke the protocol: {0}")]
    Protocol(String),
    /// The client did not finish the handshake within `ServerConfig::handshake_timeout`.
    #[error("NBD handshake timed out after {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have; the spec leaves no way to
    /// answer but closing.
    #[error("NBD export {0:?} does not exist")]
    UnknownExport(String),
    /// `ExportRegistry::add` with a name already in use.
    #[error("NBD export {0:?} already exists")]
    DuplicateExport(String),
    /// An export name the protocol cannot carry (empty, too long, or containing NUL).
    #[error("invalid NBD export name {0:?}: {1}")]
    InvalidExportName(String, &'static str),
}
