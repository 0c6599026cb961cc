//! Alerts: each configured target (a command, or a webhook URL) gets the events of the
//! classes it names, as JSON (on the command's stdin, or as the POST body), in order, with a
//! timeout per attempt and retries with doubling backoff.
//!
//! Each target has its own thread fed by a bounded queue: `send` never waits, so an alert
//! that hangs or fails never holds anything that recorded the event. A full queue drops the
//! event for that target with an error logged (the event log still has it). A retried
//! webhook may receive an event twice if its answer was lost; `X-Cdp-Event-Id` (the event's
//! `id`) lets it drop the duplicate.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Events waiting per target before new ones are dropped for it.
pub const ALERT_QUEUE_MAX: usize = 1024;
/// The first retry waits this long, each next one twice as long, up to `ALERT_BACKOFF_MAX`.
pub const ALERT_BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const ALERT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bytes of a webhook's answer read (its status line is all that counts).
const WEBHOOK_ANSWER_BYTES_MAX: usize = 4096;

/// One `[[alert]]` of a config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Event classes sent to this target; `["*"]` (the default) sends every class.
    #[serde(default = "all_classes")]
    pub events: Vec<String>,
    /// A program and its arguments, run once per event with the event as JSON on stdin;
    /// exit status 0 is delivery. Exactly one of `command` and `webhook`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `http://HOST:PORT/PATH`: the event is POSTed as JSON; a 2xx answer is delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Milliseconds one attempt may take (connect, send and answer; or the command's run).
    /// Default 5000, 100..=600000.
    #[serde(default = "timeout_default")]
    pub timeout_ms: u64,
    /// Attempts after the first before the event is given up for this target (logged).
    /// Default 5, at most 20.
    #[serde(default = "retries_default")]
    pub retries: u32,
}

fn all_classes() -> Vec<String> {
    vec!["*".to_string()]
}

fn timeout_default() -> u64 {
    5000
}

fn retries_default() -> u32 {
    5
}

/// Why an alert's config is unusable, or why one delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The `[[alert]]` entry can never work; the message names the key.
    #[error("{0}")]
    Config(String),
    /// One attempt to run the command or post the webhook failed (it is retried).
    #[error("{0}")]
    Delivery(String),
}

/// Delivery steps report their failures as text; `?` makes them `Delivery`.
impl From<String> for AlertError {
    fn from(message: String) -> AlertError {
        AlertError::Delivery(message)
    }
}

/// A checked `AlertConfig`.
#[derive(Clone, Debug)]
enum Target {
    Command(Vec<String>),
    Webhook {
        host: String,
        authority: String,
        path: String,
    },
}

impl AlertConfig {
    /// Rejects a target that can never work; clamps timeout and retries.
    pub fn sanitize(mut self) -> Result<AlertConfig, AlertError> {
        self.target()?;
        if self.events.is_empty() {
            return Err(AlertError::Config(
                "[[alert]] events is empty: name classes or \"*\"".into(),
            ));
        }
        self.timeout_ms = self.timeout_ms.clamp(100, 600_000);
        self.retries = self.retries.min(20);
        Ok(self)
    }

    fn target(&self) -> Result<Target, AlertError> {
        match (&self.command, &self.webhook) {
            (Some(argv), None) if !argv.is_empty() && !argv[0].is_empty() => {
                Ok(Target::Command(argv.clone()))
            }
            (Some(_), None) => Err(AlertError::Config("[[alert]] command is empty".into())),
            (None, Some(url)) => {
                let rest = url.strip_prefix("http://").ok_or_else(|| {
                    AlertError::Config(format!(
                        "[[alert]] webhook {url:?}: only http://HOST:PORT/PATH is supported"
                    ))
                })?;
                let (authority, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, "/"),
                };
                if authority.is_empty() {
                    return Err(AlertError::Config(format!(
                        "[[alert]] webhook {url:?} has no host"
                    )));
                }
                let host = if authority.contains(':') {
                    authority.to_string()
                } else {
                    format!("{authority}:80")
                };
                Ok(Target::Webhook {
                    host,
                    authority: authority.to_string(),
                    path: path.to_string(),
                })
            }
            _ => Err(AlertError::Config(
                "[[alert]] needs exactly one of command and webhook".into(),
            )),
        }
    }

    fn wants(&self, class: &str) -> bool {
        self.events.iter().any(|c| c == "*" || c == class)
    }

    fn describe(&self) -> String {
        match (&self.command, &self.webhook) {
            (Some(argv), _) => format!("command {}", argv.join(" ")),
            (_, Some(url)) => format!("webhook {url}"),
            _ => "alert".into(),
        }
    }
}

struct Running {
    config: AlertConfig,
    queue: SyncSender<Event>,
}

/// The alert targets of one process.
pub struct Alerts {
    targets: Vec<Running>,
}

impl Alerts {
    pub fn none() -> Alerts {
        Alerts {
            targets: Vec::new(),
        }
    }

    /// Starts one delivery thread per target. The configs must be sanitized.
    pub fn start(configs: &[AlertConfig]) -> Alerts {
        let mut targets = Vec::new();
        for config in configs {
            let Ok(target) = config.target() else {
                continue;
            };
            let (queue, events) = sync_channel::<Event>(ALERT_QUEUE_MAX);
            let worker = config.clone();
            let spawned = std::thread::Builder::new()
                .name("cdp-alert".into())
                .spawn(move || {
                    for event in events {
                        deliver(&worker, &target, &event);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("alert {}: cannot start its thread: {e}", config.describe());
                continue;
            }
            targets.push(Running {
                config: config.clone(),
                queue,
            });
        }
        Alerts { targets }
    }

    /// Queues `event` for every target that wants its class; never waits.
    pub fn send(&self, event: &Event) {
        for t in self.targets.iter().filter(|t| t.config.wants(&event.class)) {
            match t.queue.try_send(event.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => tracing::error!(
                    event = %event.id,
                    "alert {}: {ALERT_QUEUE_MAX} events waiting; this one is dropped for it",
                    t.config.describe()
                ),
                Err(TrySendError::Disconnected(_)) => {
                    tracing::error!(event = %event.id, "alert {}: its thread ended", t.config.describe())
                }
            }
        }
    }
}

fn deliver(config: &AlertConfig, target: &Target, event: &Event) {
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(event = %event.id, "alert: encoding failed: {e}");
            return;
        }
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let mut backoff = ALERT_BACKOFF_FIRST;
    for attempt in 0..=config.retries {
        let result = match target {
            Target::Command(argv) => run_command(argv, event, &body, timeout),
            Target::Webhook {
                host,
                authority,
                path,
            } => post(host, authority, path, &event.id, &body, timeout),
        };
        match result {
            Ok(()) => {
                tracing::debug!(event = %event.id, "alert {} delivered", config.describe());
                return;
            }
            Err(e) if attempt < config.retries => {
                tracing::warn!(
                    event = %event.id,
                    "alert {} failed (attempt {}), retrying in {backoff:?}: {e}",
                    config.describe(),
                    attempt + 1
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(ALERT_BACKOFF_MAX);
            }
            Err(e) => tracing::error!(
                event = %event.id,
                "alert {} failed {} times, given up: {e}",
                config.describe(),
                attempt + 1
            ),
        }
    }
}

fn run_command(
    argv: &[String],
    event: &Event,
    body: &[u8],
    timeout: Duration,
) -> Result<(), AlertError> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("CDP_EVENT_CLASS", &event.class)
        .env("CDP_EVENT_ID", &event.id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its stdin is fine: a broken pipe is not a failure.
        let _ = stdin.write_all(body);
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(AlertError::Delivery(format!(
                    "{} exited with {status}",
                    argv[0]
                )))
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(AlertError::Delivery(format!(
                    "{} still running after {timeout:?}; killed",
                    argv[0]
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(AlertError::Delivery(format!(
                    "waiting for {}: {e}",
                    argv[0]
                )))
            }
        }
    }
}

fn post(
    host: &str,
    authority: &str,
    path: &str,
    id: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(), AlertError> {
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {host}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{host}: {e}"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Cdp-Event-Id: {id}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| format!("sending to {host}: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.contains(&b'\n') && answer.len() < WEBHOOK_ANSWER_BYTES_MAX {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(AlertError::Delivery(format!(
                    "reading {host}'s answer: {e}"
                )))
            }
        }
    }
    let line = String::from_utf8_lossy(&answer);
    let status = line.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if (200..300).contains(&s) => Ok(()),
        Some(s) => Err(AlertError::Delivery(format!("{host} answered {s}"))),
        None => Err(AlertError::Delivery(format!(
            "{host} sent no HTTP status line"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked() {
        let parse = |text: &str| toml::from_str::<AlertConfig>(text).map_err(|e| e.to_string());
        let ok = parse("webhook = \"http://127.0.0.1:9/hook\"")
            .unwrap()
            .sanitize()
            .unwrap();
        assert_eq!(ok.events, vec!["*"]);
        assert!(ok.wants("fenced"));
        for bad in [
            "webhook = \"https://x/\"",
            "webhook = \"http:///x\"",
            "command = []",
            "command = [\"a\"]\nwebhook = \"http://x/\"",
            "timeout_ms = 5",
            "command = [\"a\"]\nevents = []",
        ] {
            assert!(
                parse(bad)
                    .and_then(|c| c.sanitize().map_err(|e| e.to_string()))
                    .is_err(),
                "{bad}"
            );
        }
        let clamped = parse("command = [\"true\"]\ntimeout_ms = 1\nretries = 99")
            .unwrap()
            .sanitize()
            .unwrap();
        assert_eq!((clamped.timeout_ms, clamped.retries), (100, 20));
    }
}
