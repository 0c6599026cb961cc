//! Error answers: a message for people and a code a client can act on.

use serde::{Deserialize, Serialize};

/// What kind of failure an answer reports, so a client can act on it (the `cdp` command maps
/// each to its own exit status) without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was understood but failed.
    Failed,
    /// The request names a group, volume, bookmark, image or point that does not exist.
    NotFound,
    /// The request was refused because doing it would be unsafe (a point that is not
    /// recoverable, a volume still connected, ...).
    Refused,
    /// The request could not be parsed.
    BadRequest,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Failed => "failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Refused => "refused",
            ErrorCode::BadRequest => "bad_request",
        }
    }
}

/// `{"code": CODE, "error": MESSAGE}`: the answer to a failed request. (Fields in the order
/// every other answer has its keys in, sorted, so the bytes on the wire stay as they were.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// Left out by processes older than the codes; read as `Failed` then.
    #[serde(default = "failed")]
    pub code: ErrorCode,
    pub error: String,
}

fn failed() -> ErrorCode {
    ErrorCode::Failed
}
