//! Errors on the split link; each one ends the connection it happened on.

/// What went wrong on a link connection.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("link frame corrupt: {0}")]
    Corrupt(String),
    #[error("link protocol version {theirs} is not supported (this build speaks {ours})")]
    Version { theirs: u16, ours: u16 },
    #[error("link peer broke the protocol: {0}")]
    Protocol(String),
    #[error("link peer refused: {0}")]
    Refused(String),
    #[error("link closed by peer")]
    Closed,
}
