//! One recorded state change and where it happened: what the event log stores and the
//! alerts deliver.

use serde::{Deserialize, Serialize};

/// One state change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `ROLE-SEQ`, unique per log.
    pub id: String,
    pub seq: u64,
    /// When the change was seen, ns since the Unix epoch, and the same in RFC 3339 (UTC).
    pub time_ns: u64,
    pub time: String,
    /// The process that saw it: `appliance` or `splitter`.
    pub role: String,
    pub site: String,
    /// What happened: `marking_entered`, `rpo_exceeded`, ... (docs/cli.md lists them).
    pub class: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    pub detail: String,
}

/// Where an event happened.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope<'a> {
    pub group: Option<&'a str>,
    pub volume: Option<&'a str>,
}
