//! The appliance's errors.

/// What can stop the appliance or one of its groups.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("journal: {0}")]
    Journal(#[from] cdp_journal::JournalError),
    #[error("state file {path}: {what}")]
    State { path: String, what: String },
}
