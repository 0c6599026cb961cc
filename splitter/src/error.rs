//! The splitter's errors.

/// What can stop the splitter or one of its volumes.
#[derive(Debug, thiserror::Error)]
pub enum SplitterError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD server: {0}")]
    Nbd(String),
    #[error("appliance refused volume {volume}: {reason}")]
    Refused { volume: String, reason: String },
    #[error("volume {volume}: {what}")]
    Volume { volume: String, what: String },
}
