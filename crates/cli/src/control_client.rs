//! A client for the JSON-lines control sockets of the appliance and the splitter. Every
//! request has a deadline, and every failure says which process it concerns and what kind
//! of failure it is (`CliError`), so the command exits with the documented status. Requests
//! and answers are `cdp_control`'s types: the caller names the answer it expects, and an
//! answer that does not fit it is an error, never a silent default.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use cdp_control::{ErrorAnswer, ErrorCode};
use serde::de::DeserializeOwned;
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
pub fn request<A: DeserializeOwned>(
    socket: &Path,
    role: &str,
    request: &impl Serialize,
) -> anyhow::Result<A> {
    request_within(socket, role, request, default_timeout())
}

/// `request` with its own deadline, for requests that legitimately take long.
pub fn request_within<A: DeserializeOwned>(
    socket: &Path,
    role: &str,
    request: &impl Serialize,
    timeout: Duration,
) -> anyhow::Result<A> {
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
    // Only a failed request is answered with an `error` field.
    if let Ok(failed) = serde_json::from_slice::<ErrorAnswer>(&answer) {
        let kind = match failed.code {
            ErrorCode::NotFound => ErrorKind::NotFound,
            ErrorCode::Refused => ErrorKind::Refused,
            ErrorCode::BadRequest => ErrorKind::Usage,
            ErrorCode::Failed => ErrorKind::Failed,
        };
        return Err(CliError::new(kind, format!("{role}: {}", failed.error)).into());
    }
    serde_json::from_slice(&answer).map_err(|e| {
        CliError::new(
            ErrorKind::Failed,
            format!("bad answer from the {role} at {}: {e}", socket.display()),
        )
        .into()
    })
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
pub fn appliance<A: DeserializeOwned>(
    socket: &Path,
    request: &cdp_control::Request,
) -> anyhow::Result<A> {
    self::request(socket, "appliance", request)
}

/// A request to the splitter, within the default deadline.
pub fn splitter<A: DeserializeOwned>(
    socket: &Path,
    request: &cdp_control::SplitterRequest,
) -> anyhow::Result<A> {
    self::request(socket, "splitter", request)
}
