//! The splitter's control socket: one JSON request per line in, one JSON response per line out.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::split_link::{ResyncReason, SplitLink, VolumeState};

/// Control connections served at once.
const CONTROL_CONNECTIONS_MAX: usize = 16;
/// Longest request line.
const CONTROL_REQUEST_BYTES_MAX: usize = 64 * 1024;

/// A request to the splitter.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Copy every region of a volume into the journal again.
    Resync {
        volume: String,
    },
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Response {
    Status { volumes: Vec<VolumeState> },
    Resync { volume: String, state: VolumeState },
    Error { error: String },
}

pub async fn serve_control(listener: UnixListener, links: Arc<BTreeMap<String, Arc<SplitLink>>>) {
    let limit = Arc::new(Semaphore::new(CONTROL_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("splitter control accept failed: {e}");
                continue;
            }
        };
        let links = Arc::clone(&links);
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &links).await {
                tracing::debug!("splitter control connection: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_one(
    stream: UnixStream,
    links: &BTreeMap<String, Arc<SplitLink>>,
) -> std::io::Result<()> {
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
                Ok(Request::Status) => Response::Status {
                    volumes: links.values().map(|l| l.state()).collect(),
                },
                Ok(Request::Resync { volume }) => match links.get(&volume) {
                    Some(link) => {
                        link.request_full_resync(ResyncReason::Full);
                        tracing::info!(volume = %volume, "full resync requested");
                        Response::Resync {
                            volume,
                            state: link.state(),
                        }
                    }
                    None => Response::Error {
                        error: format!(
                            "no volume {volume:?} on this splitter (it serves: {})",
                            links.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    },
                },
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
