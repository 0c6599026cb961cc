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

/// Serves `listener` until accepting fails for good: each line is parsed as `R` and answered
/// with what `handler` returns. At most `connections_max` connections are served at once.
pub async fn serve<R, H, Fut>(listener: UnixListener, connections_max: usize, handler: H)
where
    R: DeserializeOwned + Send + 'static,
    H: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
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

async fn serve_one<R, H, Fut>(stream: UnixStream, handler: &H) -> std::io::Result<()>
where
    R: DeserializeOwned,
    H: Fn(R) -> Fut,
    Fut: Future<Output = Result<serde_json::Value, String>>,
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
        let answer = if line.len() > REQUEST_BYTES_MAX {
            Err(format!("request longer than {REQUEST_BYTES_MAX} bytes"))
        } else {
            match serde_json::from_slice::<R>(&line) {
                Ok(request) => handler(request).await,
                Err(e) => Err(format!("bad request: {e}")),
            }
        };
        let failed = answer.is_err();
        let value = answer.unwrap_or_else(|error| serde_json::json!({ "error": error }));
        let mut out = serde_json::to_vec(&value).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if failed {
            return Ok(());
        }
    }
}
