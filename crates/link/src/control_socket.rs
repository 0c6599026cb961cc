//! JSON-lines control sockets (appliance and splitter): one request per line in, one answer
//! per line out; a bad or failed request is answered with `{"error": ...}` and ends its
//! connection, never the process.

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Longest request line; longer ones are refused without being parsed.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// What kind of failure an answer reports: defined with the rest of the protocol.
pub use cdp_control::ErrorCode;

/// A failed request: its code and the message for people.
#[derive(Debug, Clone)]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ControlError {
        ControlError {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ControlError {
        ControlError::new(ErrorCode::NotFound, message)
    }

    pub fn refused(message: impl Into<String>) -> ControlError {
        ControlError::new(ErrorCode::Refused, message)
    }
}

impl From<String> for ControlError {
    fn from(message: String) -> ControlError {
        ControlError::new(ErrorCode::Failed, message)
    }
}

impl From<&str> for ControlError {
    fn from(message: &str) -> ControlError {
        ControlError::new(ErrorCode::Failed, message)
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Serves `listener` until accepting fails for good: each line is parsed as `R` and answered
/// with what `handler` returns. At most `connections_max` connections are served at once.
pub async fn serve<R, H, Fut, E>(listener: UnixListener, connections_max: usize, handler: H)
where
    R: DeserializeOwned + Send + 'static,
    H: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, E>> + Send + 'static,
    E: Into<ControlError> + 'static,
{
    let handler = Arc::new(handler);
    let limit = Arc::new(Semaphore::new(connections_max));
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
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, handler.as_ref()).await {
                tracing::debug!("control connection: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_one<R, H, Fut, E>(stream: UnixStream, handler: &H) -> std::io::Result<()>
where
    R: DeserializeOwned,
    H: Fn(R) -> Fut,
    Fut: Future<Output = Result<serde_json::Value, E>>,
    E: Into<ControlError>,
{
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(REQUEST_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let answer: Result<serde_json::Value, ControlError> = if line.len() > REQUEST_BYTES_MAX {
            Err(ControlError::new(
                ErrorCode::BadRequest,
                format!("request longer than {REQUEST_BYTES_MAX} bytes"),
            ))
        } else {
            match serde_json::from_slice::<R>(&line) {
                Ok(request) => handler(request).await.map_err(Into::into),
                Err(e) => Err(ControlError::new(
                    ErrorCode::BadRequest,
                    format!("bad request: {e}"),
                )),
            }
        };
        let failed = answer.is_err();
        let mut out = match answer {
            Ok(value) => serde_json::to_vec(&value),
            Err(error) => serde_json::to_vec(&cdp_control::ErrorAnswer {
                error: error.message,
                code: error.code,
            }),
        }
        .map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if failed {
            return Ok(());
        }
    }
}
