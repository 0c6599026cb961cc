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
    /// A file the appliance wrote fails its checks (a state file's magic, kind, length, CRC
    /// or body; the undo stream's continuity): nothing in a configuration can fix it.
    #[error("{path} is corrupt: {what}")]
    Corruption { path: String, what: String },
    /// The group stopped accepting work after a failed fsync or distribution error (never
    /// retried); a restart rereads the disk.
    #[error("{0}")]
    Fenced(String),
    /// No such group, volume or point.
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts the group's state or role (open images, a remote copy, a
    /// removed volume, a point not kept): asking again unchanged gets the same answer.
    #[error("{0}")]
    Refused(String),
    /// A bound was reached or a wait ran out; the same request may succeed later.
    #[error("{0}")]
    Busy(String),
    /// The replication link failed or its peer broke the protocol; the link ends.
    #[error("replication link: {0}")]
    Link(#[from] cdp_link::LinkError),
}

impl ApplianceError {
    /// The same error with `what` said first; the variant a caller acts on is kept.
    pub fn context(self, what: &str) -> ApplianceError {
        use ApplianceError::*;
        match self {
            Config(m) => Config(format!("{what}: {m}")),
            Fenced(m) => Fenced(format!("{what}: {m}")),
            NotFound(m) => NotFound(format!("{what}: {m}")),
            Refused(m) => Refused(format!("{what}: {m}")),
            Busy(m) => Busy(format!("{what}: {m}")),
            Corruption { path, what: w } => Corruption {
                path,
                what: format!("{what}: {w}"),
            },
            Io(e) => Io(std::io::Error::new(e.kind(), format!("{what}: {e}"))),
            // These keep their own error for callers that match on it.
            Journal(e) => Journal(e),
            Link(e) => Link(e),
        }
    }
}

/// Callers not yet typed (control handlers, link server) still pass messages on as
/// strings; the message is the error's display, unchanged.
impl From<ApplianceError> for String {
    fn from(e: ApplianceError) -> String {
        e.to_string()
    }
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

/// A control-socket answer keeps the kind a client acts on (`cdp` exit statuses): not
/// found, refused, or a plain failure.
impl From<ApplianceError> for cdp_link::control_socket::ControlError {
    fn from(e: ApplianceError) -> Self {
        use cdp_link::control_socket::ControlError;
        match e {
            ApplianceError::NotFound(m) => ControlError::not_found(m),
            ApplianceError::Refused(m) => ControlError::refused(m),
            other => ControlError::from(other.to_string()),
        }
    }
}
