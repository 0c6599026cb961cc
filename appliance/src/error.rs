//! The appliance's errors.

use crate::state_file::StateFileError;

/// What can stop the appliance or one of its groups.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("journal: {0}")]
    Journal(#[from] cdp_journal::JournalError),
    /// A state file the appliance wrote fails its checks (magic, kind, length, CRC, body):
    /// nothing in a configuration can fix it.
    #[error("state file {path} is corrupt: {what}")]
    Corruption { path: String, what: String },
}

impl From<StateFileError> for ApplianceError {
    fn from(e: StateFileError) -> Self {
        match e {
            StateFileError::Corruption { path, what } => ApplianceError::Corruption { path, what },
            StateFileError::Io { path, source } => ApplianceError::Io(std::io::Error::new(
                source.kind(),
                format!("{path}: {source}"),
            )),
        }
    }
}
