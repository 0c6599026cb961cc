//! A client for the JSON-lines control sockets of the appliance and the splitter. Every
//! request has a deadline, and every failure says which process it concerns and what kind
//! of failure it is (`CliError`), so the command exits with the documented status.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::output::{CliError, ErrorKind};

/// Longest answer accepted from a control socket.
const ANSWER_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// How long a request may take unless its command says otherwise. Overridden by
/// `CDP_TIMEOUT_S`.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// The default deadline, or `CDP_TIMEOUT_S` seconds when that is set.
pub fn default_timeout() -> Duration {
    std::env::var("CDP_TIMEOUT_S")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(REQUEST_TIMEOUT_DEFAULT, Duration::from_secs)
}

/// Sends one request and returns the answer, within the default deadline; an
/// `{"error": ...}` answer becomes an error of the answer's kind.
pub fn request(
    socket: &Path,
    role: &str,
    request: &impl Serialize,
) -> anyhow::Result<serde_json::Value> {
    request_within(socket, role, request, default_timeout())
}

/// `request` with its own deadline, for requests that legitimately take long.
pub fn request_within(
    socket: &Path,
    role: &str,
    request: &impl Serialize,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut stream = connect(socket, role)?;
    let timed_out = || {
        CliError::new(
            ErrorKind::Unreachable,
            format!(
                "the {role} at {} did not answer within {} s (raise the limit with \
                 CDP_TIMEOUT_S=SECONDS if it is busy)",
                socket.display(),
                timeout.as_secs()
            ),
        )
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
        _ => CliError::new(
            ErrorKind::Unreachable,
            format!("sending to the {role} at {}: {e}", socket.display()),
        ),
    })?;
    let mut answer = Vec::new();
    BufReader::new(std::io::Read::take(stream, ANSWER_BYTES_MAX))
        .read_until(b'\n', &mut answer)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
            _ => CliError::new(
                ErrorKind::Unreachable,
                format!("reading the {role}'s answer at {}: {e}", socket.display()),
            ),
        })?;
    if answer.is_empty() {
        return Err(CliError::new(
            ErrorKind::Unreachable,
            format!(
                "the {role} at {} closed the connection without answering",
                socket.display()
            ),
        )
        .into());
    }
    let value: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| {
        CliError::new(
            ErrorKind::Failed,
            format!("bad answer from the {role} at {}: {e}", socket.display()),
        )
    })?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        let kind = match value.get("code").and_then(|c| c.as_str()) {
            Some("not_found") => ErrorKind::NotFound,
            Some("refused") => ErrorKind::Refused,
            Some("bad_request") => ErrorKind::Usage,
            _ => ErrorKind::Failed,
        };
        return Err(CliError::new(kind, format!("{role}: {error}")).into());
    }
    Ok(value)
}

/// Connects, with a hint that follows from the actual error.
fn connect(socket: &Path, role: &str) -> Result<UnixStream, CliError> {
    UnixStream::connect(socket).map_err(|e| {
        let at = socket.display();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => CliError::new(
                ErrorKind::Failed,
                format!(
                    "permission denied opening the {role}'s control socket {at}: it is \
                     accessible only to the user that runs the {role}; run cdp as that user \
                     (or root)"
                ),
            ),
            std::io::ErrorKind::NotFound => CliError::new(
                ErrorKind::Unreachable,
                format!(
                    "cannot reach the {role}: {at} does not exist (is it running? start it \
                     with `cdp up --dir DIR` or `cdp {role} --config FILE`, or point at its \
                     socket with --control/--dir)"
                ),
            ),
            std::io::ErrorKind::ConnectionRefused => CliError::new(
                ErrorKind::Unreachable,
                format!("cannot reach the {role} at {at}: nothing accepts there (is it running?)"),
            ),
            _ => CliError::new(
                ErrorKind::Unreachable,
                format!("cannot reach the {role} at {at}: {e}"),
            ),
        }
    })
}

/// A request to the appliance, within the default deadline.
pub fn appliance(
    socket: &Path,
    request: &cdp_appliance::control::Request,
) -> anyhow::Result<serde_json::Value> {
    self::request(socket, "appliance", request)
}
