//! The witness crate's errors: what a caller (the CLI, the keeper, the appliance) can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// A file or socket operation failed; `what` names the object and the operation.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A stored file failed a check (magic, version, length, CRC): never a config error.
    #[error("{} is corrupt: {reason}", path.display())]
    Corruption { path: PathBuf, reason: String },
    /// The configuration or a command-line value is unusable.
    #[error("witness configuration: {0}")]
    Config(String),
    /// A peer sent something that is not this protocol (or not this version of it).
    #[error("witness protocol: {0}")]
    Protocol(String),
    /// Another witness process holds the data directory.
    #[error("{} is in use by another witness (pid {pid})", path.display())]
    Locked { path: PathBuf, pid: String },
    /// A thread panicked while holding the grants; the witness stops serving.
    #[error("the grants lock was poisoned by a panicking thread")]
    Poisoned,
    /// The witness did not answer within the request's deadline.
    #[error("witness at {addr} did not answer within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u64 },
}

impl WitnessError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> WitnessError {
        WitnessError::Io {
            what: what.into(),
            source,
        }
    }
}
