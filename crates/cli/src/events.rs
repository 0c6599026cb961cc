//! `cdp events`: the appliance's and the splitter's event logs merged in time order, as a
//! table or JSON lines, optionally only since a time and following new events.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use cdp_metrics::event_log::{self, Event};
use clap::Args;

use crate::output::{CliError, ErrorKind};

/// How often `--follow` looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Data directory of `cdp up` or of an instance (or env CDP_DIR).
    #[arg(long, env = "CDP_DIR", default_value = "cdp-data")]
    dir: PathBuf,
    /// The appliance's event log. Default: DIR/appliance/events.jsonl.
    #[arg(long)]
    appliance_log: Option<PathBuf>,
    /// The splitter's event log. Default: DIR/splitter-events.jsonl.
    #[arg(long)]
    splitter_log: Option<PathBuf>,
    /// Only events at or after T: an RFC 3339 time (2026-01-02T03:04:05Z) or a duration
    /// ago (90s, 10m, 2h, 7d).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Keep printing events as they are recorded, until interrupted.
    #[arg(long)]
    follow: bool,
}

/// `--since`: ns since the Unix epoch.
fn parse_since(text: &str, now_ns: u64) -> anyhow::Result<u64> {
    let units = [("s", 1u64), ("m", 60), ("h", 3600), ("d", 86_400)];
    for (suffix, seconds) in units {
        if let Some(n) = text
            .strip_suffix(suffix)
            .and_then(|n| n.parse::<u64>().ok())
        {
            return Ok(
                now_ns.saturating_sub(n.saturating_mul(seconds).saturating_mul(1_000_000_000))
            );
        }
    }
    cdp_types::rfc3339::parse_time(text).map_err(|e| {
        CliError::new(
            ErrorKind::Usage,
            format!("--since {text:?}: expected an RFC 3339 time or a duration such as 10m ({e})"),
        )
        .into()
    })
}

/// One log being read from an offset on.
struct Tail {
    path: PathBuf,
    offset: u64,
    last_seq: u64,
}

impl Tail {
    /// Events appended since the last call. A log that shrank was rotated: read it whole
    /// again, skipping what was already seen (by seq).
    fn new_events(&mut self) -> Vec<Event> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            self.offset = 0;
        }
        let mut text = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut text).is_err()
        {
            return Vec::new();
        }
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.offset += whole as u64;
        let mut events = Vec::new();
        for line in text[..whole].split(|&b| b == b'\n') {
            if let Ok(e) = serde_json::from_slice::<Event>(line) {
                if e.seq > self.last_seq {
                    self.last_seq = e.seq;
                    events.push(e);
                }
            }
        }
        events
    }
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let logs = [
        args.appliance_log
            .unwrap_or_else(|| args.dir.join("appliance").join("events.jsonl")),
        args.splitter_log
            .unwrap_or_else(|| args.dir.join("splitter-events.jsonl")),
    ];
    if !logs.iter().any(|p| p.exists()) {
        return Err(CliError::new(
            ErrorKind::NotFound,
            format!(
                "no event log at {} or {} (pass --dir, --appliance-log or --splitter-log)",
                logs[0].display(),
                logs[1].display()
            ),
        )
        .into());
    }
    let since = match &args.since {
        Some(t) => parse_since(t, event_log::now_ns())?,
        None => 0,
    };
    let mut events: Vec<Event> = Vec::new();
    let mut tails = Vec::new();
    for path in &logs {
        let past = event_log::read(path);
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        tails.push(Tail {
            path: path.clone(),
            offset: size,
            last_seq: past.last().map_or(0, |e| e.seq),
        });
        events.extend(past);
    }
    print_events(events, since);
    if !args.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_POLL);
        let fresh: Vec<Event> = tails.iter_mut().flat_map(Tail::new_events).collect();
        print_events(fresh, since);
    }
}

fn print_events(mut events: Vec<Event>, since: u64) {
    events.retain(|e| e.time_ns >= since);
    events.sort_by_key(|e| (e.time_ns, e.role.clone(), e.seq));
    for e in events {
        if crate::output::json() {
            match serde_json::to_string(&e) {
                Ok(line) => crate::out!("{line}"),
                Err(err) => eprintln!("cdp events: {err}"),
            }
        } else {
            crate::out!("{}", line(&e));
        }
    }
}

fn line(e: &Event) -> String {
    let place = match (&e.group, &e.volume) {
        (Some(g), Some(v)) => format!("{g}/{v}"),
        (Some(g), None) => g.clone(),
        (None, Some(v)) => v.clone(),
        (None, None) => "-".into(),
    };
    format!(
        "{}  {:<9} {:<24} {:<16} {}",
        e.time, e.role, e.class, place, e.detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_times() {
        let now = 10_000 * 1_000_000_000;
        assert_eq!(parse_since("90s", now).unwrap(), now - 90 * 1_000_000_000);
        assert_eq!(parse_since("2h", now).unwrap(), now - 7200 * 1_000_000_000);
        assert_eq!(
            parse_since("1970-01-01T00:00:01Z", now).unwrap(),
            1_000_000_000
        );
        assert!(parse_since("yesterday", now).is_err());
    }
}
