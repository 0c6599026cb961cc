//! A minimal HTTP/1.1 responder for `GET /metrics`: one request per connection, bounded in
//! size, time and connections, answered from a handler that never blocks.
//!
//! A web framework would bring a router, middleware and a second async stack for one
//! read-only path; this is the part of HTTP a scraper uses. Anything else is answered with
//! a status code (400 malformed, 404 unknown path, 405 not GET/HEAD, 431 head too large) and
//! the connection closed, so a garbage client costs one short-lived task.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Bytes of request head read before answering 431.
pub const HTTP_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const HTTP_CONNECTIONS_MAX: usize = 16;
/// A client must send its whole request head, and take the answer, within this.
pub const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler answers.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

/// Answers a GET for a path (query string removed).
pub trait Handler: Send + Sync + 'static {
    fn get(&self, path: &str) -> Response;
}

/// Serves until the listener fails or the task is dropped.
pub async fn serve(listener: TcpListener, handler: Arc<dyn Handler>) {
    let limit = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    if let Err(e) =
                        tokio::time::timeout(HTTP_IO_TIMEOUT, answer(stream, &*handler)).await
                    {
                        tracing::debug!("metrics client too slow: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                // EMFILE and friends: back off instead of spinning on the error.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, handler: &dyn Handler) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() >= HTTP_HEAD_BYTES_MAX {
            break false;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let (response, send_body) = if !complete {
        (Response::text(431, "request head too large\n"), true)
    } else {
        route(&head, handler)
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let header = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        response.status,
        response.content_type,
        response.body.len(),
        if response.status == 405 { "Allow: GET, HEAD\r\n" } else { "" },
    );
    if stream.write_all(header.as_bytes()).await.is_err() {
        return;
    }
    if send_body {
        let _ = stream.write_all(&response.body).await;
    }
    let _ = stream.shutdown().await;
}

/// The response, and whether to send its body (not for HEAD).
fn route(head: &[u8], handler: &dyn Handler) -> (Response, bool) {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return (Response::text(400, "request line is not UTF-8\n"), true);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Response::text(400, "malformed request line\n"), true);
    };
    if !version.starts_with("HTTP/1.") {
        return (Response::text(400, "only HTTP/1.x is served\n"), true);
    }
    let send_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return (Response::text(405, "only GET and HEAD are served\n"), true),
    };
    let path = target.split('?').next().unwrap_or(target);
    (handler.get(path), send_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Handler for Fixed {
        fn get(&self, path: &str) -> Response {
            match path {
                "/metrics" => Response::text(200, "x 1\n"),
                _ => Response::text(404, "no\n"),
            }
        }
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The responder answers GET and HEAD on a known path, and a status code for an unknown
    /// path, another method, a malformed line and an oversized head; it keeps serving after each.
    #[tokio::test]
    async fn answers_and_refuses() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Fixed)));
        let ok = exchange(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Length: 4\r\n") && ok.ends_with("\r\n\r\nx 1\n"),
            "{ok}"
        );
        let head = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n").await;
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let missing = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"),
            "{post}"
        );
        let garbage = exchange(addr, b"\x00\x01garbage\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', HTTP_HEAD_BYTES_MAX));
        let big = exchange(addr, &big).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        let again = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    }
}
