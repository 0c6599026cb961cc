//! The witness protocol: one JSON object per line each way over TCP, one reply per request,
//! in order. Every request carries `"v": 1`; a witness refuses another version with
//! `bad_request` and closes, so a future version is never misread.
//!
//! Requests (`op`): `acquire`, `renew`, `release` (`group`, `site`, `generation`, and for the
//! first two `duration_ms`) and `query` (`group`). Example:
//! `{"v":1,"op":"acquire","group":"g1","site":"site-a","generation":3,"duration_ms":6000}`.
//!
//! Replies: `{"result":"granted","generation":3,"duration_ms":6000,"margin":{"drift_ppm":
//! 10000,"fixed_ms":100}}`; `{"result":"refused","reason":"held_by_other","holder":"site-b",
//! "generation":4,"retry_after_ms":1234,"message":"..."}` (reasons below);
//! `{"result":"released"}`; `{"result":"lease","holder":..,"generation":..,
//! "remaining_ms":..,"restart_hold_ms":..}` for `query`. A reply never carries a wall-clock
//! time: durations only, measured on the witness's clock.
//!
//! A line longer than `LINE_BYTES_MAX` or not this format closes the connection after a
//! `bad_request` reply; nothing else about the witness changes.

use serde::{Deserialize, Serialize};

use crate::error::WitnessError;
use crate::lease_rule::Margin;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A request as sent: the version beside the request's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Take the group's lease (or extend it if this site already holds it at this generation,
    /// or move it to a higher generation).
    Acquire {
        group: String,
        site: String,
        generation: u64,
        duration_ms: u64,
    },
    /// Extend a lease this site holds at exactly this generation; never takes it from another.
    Renew {
        group: String,
        site: String,
        generation: u64,
        duration_ms: u64,
    },
    /// Give the lease up now (the holder has already stopped believing it holds it).
    Release {
        group: String,
        site: String,
        generation: u64,
    },
    /// The witness's view of a group's lease.
    Query { group: String },
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// Another site holds the lease (or may still: the witness's deadline has not passed).
    HeldByOther,
    /// The group's lease moved to a higher generation than the request's.
    StaleGeneration,
    /// A renewal or release from a site that does not hold the lease at that generation.
    NotHolder,
    /// The witness restarted and keeps the lease of its previous holder for one full lease.
    RestartHold,
    /// The request is malformed or outside the witness's limits.
    BadRequest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Granted {
        generation: u64,
        duration_ms: u64,
        /// The margin the witness applies; the holder uses the larger of it and its own.
        margin: Margin,
    },
    Refused {
        reason: RefuseReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<String>,
        /// The group's current generation at the witness.
        #[serde(default)]
        generation: u64,
        /// When asking again may succeed (0: not by waiting).
        #[serde(default)]
        retry_after_ms: u64,
        message: String,
    },
    Released,
    Lease {
        holder: Option<String>,
        generation: u64,
        /// How long the witness still keeps the lease from other sites.
        remaining_ms: u64,
        /// How long the restart hold still lasts (0 when none).
        restart_hold_ms: u64,
    },
}

/// Encodes one request line (with its newline).
pub fn encode_request(request: &Request) -> String {
    let envelope = Envelope {
        v: PROTOCOL_VERSION,
        request: request.clone(),
    };
    // A struct of strings and integers always serializes.
    let mut line = serde_json::to_string(&envelope).expect("request serializes");
    line.push('\n');
    line
}

/// Encodes one reply line (with its newline).
pub fn encode_reply(reply: &Reply) -> String {
    let mut line = serde_json::to_string(reply).expect("reply serializes");
    line.push('\n');
    line
}

/// Decodes one request line; `Protocol`'s message is the `bad_request` reply's.
pub fn decode_request(line: &[u8]) -> Result<Request, WitnessError> {
    let bad = WitnessError::Protocol;
    let mut value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".to_string()))?;
    match object.remove("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(bad(format!(
                "protocol version {v} is not {PROTOCOL_VERSION}"
            )))
        }
        None => return Err(bad("no protocol version \"v\"".into())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("not a witness request: {e}")))
}

/// Decodes one reply line.
pub fn decode_reply(line: &[u8]) -> Result<Reply, WitnessError> {
    serde_json::from_slice(line)
        .map_err(|e| WitnessError::Protocol(format!("not a witness reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_lines() {
        let r = Request::Acquire {
            group: "g1".into(),
            site: "a".into(),
            generation: 3,
            duration_ms: 6000,
        };
        let line = encode_request(&r);
        assert_eq!(
            line,
            "{\"v\":1,\"op\":\"acquire\",\"group\":\"g1\",\"site\":\"a\",\"generation\":3,\"duration_ms\":6000}\n"
        );
        assert_eq!(decode_request(line.trim_end().as_bytes()).ok(), Some(r));
        let granted = Reply::Granted {
            generation: 3,
            duration_ms: 6000,
            margin: Margin::default(),
        };
        let line = encode_reply(&granted);
        assert_eq!(
            line,
            "{\"result\":\"granted\",\"generation\":3,\"duration_ms\":6000,\"margin\":{\"drift_ppm\":10000,\"fixed_ms\":100}}\n"
        );
        assert_eq!(decode_reply(line.as_bytes()).ok(), Some(granted));
    }

    #[test]
    fn bad_lines_are_refused() {
        for bad in [
            &b"garbage"[..],
            b"{\"op\":\"query\",\"group\":\"g\"}",
            b"{\"v\":2,\"op\":\"query\",\"group\":\"g\"}",
            b"{\"v\":1,\"op\":\"steal\",\"group\":\"g\"}",
            b"{\"v\":1,\"op\":\"acquire\",\"group\":\"g\"}",
            b"{\"v\":1,\"op\":\"query\",\"group\":\"g\",\"extra\":1}",
        ] {
            assert!(
                decode_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
