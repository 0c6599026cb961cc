//! The control socket: one JSON request per line in, one JSON response per line out.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::group::{Group, GroupStatus};
use crate::limits::{CONTROL_CONNECTIONS_MAX, CONTROL_REQUEST_BYTES_MAX};

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ApplianceStatus {
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Response {
    Status(ApplianceStatus),
    Error { error: String },
}

pub async fn serve_control(listener: UnixListener, groups: Arc<Vec<Arc<Group>>>) {
    let limit = Arc::new(Semaphore::new(CONTROL_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                continue;
            }
        };
        let groups = Arc::clone(&groups);
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &groups).await {
                tracing::debug!("control connection: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_one(stream: UnixStream, groups: &[Arc<Group>]) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(CONTROL_REQUEST_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = if line.len() > CONTROL_REQUEST_BYTES_MAX {
            Response::Error {
                error: format!("request longer than {CONTROL_REQUEST_BYTES_MAX} bytes"),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Status) => Response::Status(status(groups)),
                Err(e) => Response::Error {
                    error: format!("bad request: {e}"),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if matches!(response, Response::Error { .. }) {
            return Ok(());
        }
    }
}

pub fn status(groups: &[Arc<Group>]) -> ApplianceStatus {
    ApplianceStatus {
        groups: groups.iter().map(|g| g.status()).collect(),
    }
}

/// Sends one request to an appliance's control socket and returns the raw JSON answer.
pub async fn request(control: &Path, request: &Request) -> std::io::Result<serde_json::Value> {
    let stream = UnixStream::connect(control).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the appliance at {}: {e} (is it running?)",
                control.display()
            ),
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut body = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    let mut line = Vec::new();
    BufReader::new(read)
        .take(64 * 1024 * 1024)
        .read_until(b'\n', &mut line)
        .await?;
    let value: serde_json::Value = serde_json::from_slice(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer from appliance: {e}"),
        )
    })?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        return Err(std::io::Error::other(format!("appliance: {error}")));
    }
    Ok(value)
}
