//! The web timeline: a page (HTML and JS embedded in the binary) showing every group's
//! journal window, bookmarks, unrecoverable spans, open images and remote copy, fed by JSON
//! endpoints that answer through the control socket's own code (`control::answer`).
//!
//! The HTTP side is the least a browser needs: one request per connection, bounded head,
//! body, time and connections. Reads are always served; the three changing requests
//! (bookmark, image open, image release) only with `web_admin = true` and the configured
//! bearer token: 403 when the page is read-only, 401 without the right token. Config
//! `sanitize` keeps the listener on loopback (no TLS here) and the token mandatory for admin.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use cdp_control::{Consistency, ErrorCode, Request};
use cdp_link::control_socket::ControlError;
use cdp_types::TimestampNs;

use crate::group_registry::Groups;
use crate::image::Images;
use crate::limits::{
    WEB_BODY_BYTES_MAX, WEB_CONNECTIONS_MAX, WEB_HEAD_BYTES_MAX, WEB_HISTORY_SAMPLES_MAX,
    WEB_IO_TIMEOUT,
};

const INDEX_HTML: &str = include_str!("web/index.html");
const TIMELINE_JS: &str = include_str!("web/timeline.js");

/// How the page may be used.
#[derive(Clone)]
pub struct WebSettings {
    /// Changing requests are served (with the token).
    pub admin: bool,
    /// The bearer token changing requests must carry; always set when `admin` is.
    pub token: Option<String>,
}

/// One point of a group's small charts.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryPoint {
    pub t_ns: u64,
    /// The remote copy's lag (shipping to it); 0 without one.
    pub lag_seconds: f64,
    /// Host bytes journaled per second since the previous point.
    pub write_bytes_per_s: f64,
    /// Journal bytes over its capacity (0..1, above 1 when over capacity).
    pub journal_fill: f64,
}

/// Per group, the last hour of chart points and the byte counter the rate is taken from.
#[derive(Default)]
struct History {
    groups: BTreeMap<String, (u64, VecDeque<HistoryPoint>)>,
}

struct Web {
    groups: Arc<Groups>,
    images: Arc<Images>,
    settings: WebSettings,
    history: Mutex<History>,
}

/// Binds `listen` and serves the page until the returned task is aborted.
pub async fn start(
    listen: SocketAddr,
    settings: WebSettings,
    groups: Arc<Groups>,
    images: Arc<Images>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tracing::info!(web = %bound, admin = settings.admin, "web timeline served at http://{bound}/");
    let web = Arc::new(Web {
        groups,
        images,
        settings,
        history: Mutex::new(History::default()),
    });
    Ok(tokio::spawn(run(listener, web)))
}

async fn run(listener: TcpListener, web: Arc<Web>) {
    let sampling = Arc::clone(&web);
    let sampler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let web = Arc::clone(&sampling);
            // Group status takes the history index mutex for a copy of a few counters:
            // blocking pool, once a second, whatever the page's refresh rate.
            if let Err(e) = tokio::task::spawn_blocking(move || web.sample()).await {
                tracing::warn!("web history sample failed: {e}");
            }
        }
    });
    let limit = Arc::new(Semaphore::new(WEB_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let web = Arc::clone(&web);
                tokio::spawn(async move {
                    if tokio::time::timeout(WEB_IO_TIMEOUT, serve_one(stream, &web))
                        .await
                        .is_err()
                    {
                        tracing::debug!("web client too slow");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("web accept failed: {e}");
                // EMFILE and friends: back off instead of spinning on the error.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    sampler.abort();
}

impl Web {
    fn sample(&self) {
        let now = TimestampNs::now().0;
        let status = crate::control::status(&self.groups.list());
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history
            .groups
            .retain(|name, _| status.groups.iter().any(|g| &g.name == name));
        for g in status.groups {
            let lag_seconds = g.remote.as_ref().map_or(0.0, |r| r.lag_seconds);
            let journal_fill = if g.journal_capacity_bytes == 0 {
                0.0
            } else {
                g.journal_bytes as f64 / g.journal_capacity_bytes as f64
            };
            let (bytes_before, points) = history.groups.entry(g.name.clone()).or_default();
            let write_bytes_per_s = match points.back() {
                Some(last) if now > last.t_ns => {
                    g.journal_write_logical_bytes.saturating_sub(*bytes_before) as f64
                        / ((now - last.t_ns) as f64 / 1e9)
                }
                _ => 0.0,
            };
            *bytes_before = g.journal_write_logical_bytes;
            points.push_back(HistoryPoint {
                t_ns: now,
                lag_seconds,
                write_bytes_per_s,
                journal_fill,
            });
            if points.len() > WEB_HISTORY_SAMPLES_MAX {
                points.pop_front();
            }
        }
    }

    fn history_of(&self, group: &str) -> Vec<HistoryPoint> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history
            .groups
            .get(group)
            .map(|(_, points)| points.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `GET /api/groups`: per group its status, timeline, images and chart history.
    async fn overview(&self) -> Result<serde_json::Value, ControlError> {
        let status = crate::control::answer(&self.groups, &self.images, Request::Status).await?;
        let status: cdp_control::ApplianceStatus =
            serde_json::from_value(status).map_err(|e| ControlError::from(e.to_string()))?;
        let mut groups = Vec::new();
        for g in status.groups {
            let group = Some(g.name.clone());
            let (timeline, timeline_error) = match crate::control::answer(
                &self.groups,
                &self.images,
                Request::Timeline {
                    group: group.clone(),
                },
            )
            .await
            {
                Ok(t) => (t, None),
                Err(e) => (serde_json::Value::Null, Some(e.message)),
            };
            let images =
                crate::control::answer(&self.groups, &self.images, Request::ImageList { group })
                    .await?;
            groups.push(serde_json::json!({
                "history": self.history_of(&g.name),
                "status": g,
                "timeline": timeline,
                "timeline_error": timeline_error,
                "images": images["images"],
            }));
        }
        Ok(serde_json::json!({
            "admin": self.settings.admin,
            "now_ns": TimestampNs::now().0,
            "groups": groups,
        }))
    }

    /// A changing request, after the token was checked.
    async fn change(&self, path: &str, body: &[u8]) -> Result<serde_json::Value, ControlError> {
        let bad = |e: serde_json::Error| {
            ControlError::new(ErrorCode::BadRequest, format!("request body: {e}"))
        };
        let request = match path {
            "/api/bookmark" => {
                let b: BookmarkBody = serde_json::from_slice(body).map_err(bad)?;
                Request::BookmarkCreate {
                    group: b.group,
                    name: b.name,
                    consistency: Consistency::Crash,
                    freeze_window_ms: 0,
                    deadline_ms: None,
                    keep: b.keep,
                    wait_recoverable_ms: None,
                }
            }
            "/api/image" => {
                let b: ImageBody = serde_json::from_slice(body).map_err(bad)?;
                Request::ImageAccess {
                    group: b.group,
                    at: b.at,
                    writable: false,
                    logged: false,
                }
            }
            "/api/image/release" => {
                let b: ReleaseBody = serde_json::from_slice(body).map_err(bad)?;
                Request::ImageRelease { id: b.id }
            }
            _ => return Err(ControlError::not_found(format!("no such endpoint {path}"))),
        };
        crate::control::answer(&self.groups, &self.images, request).await
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BookmarkBody {
    #[serde(default)]
    group: Option<String>,
    name: String,
    #[serde(default)]
    keep: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageBody {
    #[serde(default)]
    group: Option<String>,
    at: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    id: String,
}

/// A parsed request: method, path without query, bearer token if any, body.
struct HttpRequest {
    method: String,
    path: String,
    bearer: Option<String>,
    body: Vec<u8>,
}

struct HttpResponse {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl HttpResponse {
    fn json(status: u16, value: &serde_json::Value) -> HttpResponse {
        HttpResponse {
            status,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }
    fn error(status: u16, message: impl Into<String>) -> HttpResponse {
        HttpResponse::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

async fn serve_one(mut stream: TcpStream, web: &Web) {
    let response = match read_request(&mut stream).await {
        Ok(request) => route(web, request).await,
        Err(Some(response)) => response,
        Err(None) => return,
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let extra = match response.status {
        401 => "WWW-Authenticate: Bearer realm=\"cdp\"\r\n",
        405 => "Allow: GET, HEAD, POST\r\n",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n{extra}\r\n",
        response.status,
        response.content_type,
        response.body.len(),
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.write_all(&response.body).await;
    let _ = stream.shutdown().await;
}

/// Reads one request; `Err(Some)` is the answer to a malformed one, `Err(None)` a client gone.
async fn read_request(stream: &mut TcpStream) -> Result<HttpRequest, Option<HttpResponse>> {
    let mut data = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if data.len() >= WEB_HEAD_BYTES_MAX {
            return Err(Some(HttpResponse::error(431, "request head too large")));
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let mut body = data.split_off(head_end);
    let Ok(head) = std::str::from_utf8(&data) else {
        return Err(Some(HttpResponse::error(400, "request head is not UTF-8")));
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Some(HttpResponse::error(400, "malformed request line")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Some(HttpResponse::error(400, "only HTTP/1.x is served")));
    }
    let mut content_length = 0usize;
    let mut bearer = None;
    for header in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = header.split_once(':') else {
            return Err(Some(HttpResponse::error(400, "malformed header line")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = match value.parse() {
                Ok(n) => n,
                Err(_) => return Err(Some(HttpResponse::error(400, "bad Content-Length"))),
            };
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Some(HttpResponse::error(
                400,
                "chunked bodies are not accepted; send Content-Length",
            )));
        } else if name.eq_ignore_ascii_case("authorization") {
            bearer = value.strip_prefix("Bearer ").map(|t| t.trim().to_string());
        }
    }
    if content_length > WEB_BODY_BYTES_MAX {
        return Err(Some(HttpResponse::error(
            413,
            format!("request body over {WEB_BODY_BYTES_MAX} bytes"),
        )));
    }
    while body.len() < content_length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    body.truncate(content_length);
    Ok(HttpRequest {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or(target).to_string(),
        bearer,
        body,
    })
}

/// Compares without stopping at the first difference, so timing does not leak a prefix.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

async fn route(web: &Web, request: HttpRequest) -> HttpResponse {
    let page = |content_type: &'static str, body: &str| HttpResponse {
        status: 200,
        content_type,
        body: body.as_bytes().to_vec(),
    };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET" | "HEAD", "/" | "/index.html") => page("text/html; charset=utf-8", INDEX_HTML),
        ("GET" | "HEAD", "/timeline.js") => {
            page("application/javascript; charset=utf-8", TIMELINE_JS)
        }
        ("GET" | "HEAD", "/api/groups") => match web.overview().await {
            Ok(v) => HttpResponse::json(200, &v),
            Err(e) => control_error(e),
        },
        ("POST", path @ ("/api/bookmark" | "/api/image" | "/api/image/release")) => {
            if !web.settings.admin {
                return HttpResponse::error(
                    403,
                    "the web timeline is read-only (set web_admin = true and web_token)",
                );
            }
            let authorised = match (&request.bearer, &web.settings.token) {
                (Some(given), Some(expected)) => same_token(given, expected),
                _ => false,
            };
            if !authorised {
                tracing::warn!(path, "web request refused: missing or wrong bearer token");
                return HttpResponse::error(401, "a valid bearer token is required");
            }
            match web.change(path, &request.body).await {
                Ok(v) => HttpResponse::json(200, &v),
                Err(e) => control_error(e),
            }
        }
        (_, "/" | "/index.html" | "/timeline.js" | "/api/groups") => {
            HttpResponse::error(405, "only GET and HEAD are served here")
        }
        (_, "/api/bookmark" | "/api/image" | "/api/image/release") => {
            HttpResponse::error(405, "only POST is served here")
        }
        _ => HttpResponse::error(404, format!("no page {}", request.path)),
    }
}

fn control_error(e: ControlError) -> HttpResponse {
    let status = match e.code {
        ErrorCode::BadRequest => 400,
        ErrorCode::NotFound => 404,
        ErrorCode::Refused => 409,
        ErrorCode::Failed => 500,
    };
    HttpResponse::error(status, e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token comparison accepts only the exact token.
    #[test]
    fn token_compare() {
        assert!(same_token("abcdefghijklmnop", "abcdefghijklmnop"));
        assert!(!same_token("abcdefghijklmno", "abcdefghijklmnop"));
        assert!(!same_token("abcdefghijklmnopq", "abcdefghijklmnop"));
        assert!(!same_token("abcdefghijklmnoX", "abcdefghijklmnop"));
        assert!(!same_token("", "abcdefghijklmnop"));
    }
}
