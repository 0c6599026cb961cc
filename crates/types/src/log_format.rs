//! `log_format`, a key of both `appliance.toml` and `splitter.toml`: how a process writes its
//! log lines, readable text for people (default) or one JSON object per line for collectors.

use serde::{Deserialize, Serialize};

/// See the module comment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `2026-12-03T07:46:16Z  INFO target: message key=value ...`.
    #[default]
    Text,
    /// `{"timestamp":...,"level":"INFO","fields":{"message":...,"group":...},...}` per line.
    Json,
}
