//! A client for the JSON-lines control sockets of the appliance and the splitter.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// Longest answer accepted from a control socket.
const ANSWER_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Sends one request and returns the answer; an `{"error": ...}` answer becomes an error.
pub fn request(
    socket: &Path,
    role: &str,
    request: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the {role} at {} (is it running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = Vec::new();
    BufReader::new(std::io::Read::take(stream, ANSWER_BYTES_MAX)).read_until(b'\n', &mut answer)?;
    let value: serde_json::Value = serde_json::from_slice(&answer)
        .with_context(|| format!("bad answer from the {role} at {}", socket.display()))?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        bail!("{role}: {error}");
    }
    Ok(value)
}
