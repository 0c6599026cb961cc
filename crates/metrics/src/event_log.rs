//! The event log: state changes (marking, resync, RPO, journal fill, fencing, images, links)
//! appended durably as JSON lines, bounded in size, read back by `cdp events`.
//!
//! Layout: `PATH` holds the newest events, one JSON object per line, each line written and
//! fdatasynced before the event is handed to the alerts; when `PATH` would pass
//! `bytes_max`, it is renamed to `PATH.1` (replacing the previous one, directory fsynced)
//! and a new `PATH` started, so the log takes at most about twice `bytes_max`. A crash can
//! leave a torn last line; opening cuts it, and readers skip any line that does not parse.
//! `seq` grows by one per event across restarts (continued from the newest line at open),
//! so `(role, seq)` names an event; alert receivers may use `id` to drop a retried duplicate.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::alert::Alerts;
/// An event and its scope: their own module, shared with the alerts.
pub use crate::event::{Event, Scope};

/// Default `events_log_bytes_max`.
pub const EVENTS_LOG_BYTES_DEFAULT: u64 = 4 << 20;
/// The smallest log accepted: a few hundred events.
pub const EVENTS_LOG_BYTES_MIN: u64 = 64 << 10;
/// Longest detail text kept per event; longer ones are cut.
pub const EVENT_DETAIL_BYTES_MAX: usize = 1024;

struct Writer {
    file: File,
    bytes: u64,
    next_seq: u64,
}

/// An open event log; `record` appends.
pub struct EventLog {
    path: PathBuf,
    role: String,
    site: String,
    bytes_max: u64,
    writer: Mutex<Writer>,
    alerts: Alerts,
}

impl EventLog {
    /// Opens (or creates) the log at `path`, cutting a torn last line.
    pub fn open(
        path: &Path,
        role: &str,
        site: &str,
        bytes_max: u64,
        alerts: Alerts,
    ) -> std::io::Result<EventLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let text = std::fs::read(path)?;
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(log = %path.display(), cut = text.len() - whole, "event log: torn last line cut");
            file.set_len(whole as u64)?;
            file.sync_data()?;
        }
        file.seek(SeekFrom::End(0))?;
        let last_seq = read_file(path)
            .last()
            .map(|e| e.seq)
            .or_else(|| read_file(&rotated(path)).last().map(|e| e.seq))
            .unwrap_or(0);
        Ok(EventLog {
            path: path.to_path_buf(),
            role: role.to_string(),
            site: site.to_string(),
            bytes_max: bytes_max.max(EVENTS_LOG_BYTES_MIN),
            writer: Mutex::new(Writer {
                file,
                bytes: whole as u64,
                next_seq: last_seq + 1,
            }),
            alerts,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event durably, logs it, and queues it for the alerts (never waits for
    /// them). A write error is logged: the event log must not stop the process.
    pub fn record(
        &self,
        class: &str,
        scope: Scope<'_>,
        detail: impl Into<String>,
    ) -> Option<Event> {
        let mut detail = detail.into();
        if detail.len() > EVENT_DETAIL_BYTES_MAX {
            let mut cut = EVENT_DETAIL_BYTES_MAX;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let time_ns = now_ns();
        let event = Event {
            id: format!("{}-{}", self.role, w.next_seq),
            seq: w.next_seq,
            time_ns,
            time: format_rfc3339(time_ns),
            role: self.role.clone(),
            site: self.site.clone(),
            class: class.to_string(),
            group: scope.group.map(str::to_string),
            volume: scope.volume.map(str::to_string),
            detail,
        };
        let mut line = match serde_json::to_string(&event) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("event log: encoding {class}: {e}");
                return None;
            }
        };
        line.push('\n');
        if let Err(e) = self.append(&mut w, line.as_bytes()) {
            tracing::error!(log = %self.path.display(), "event log: writing {class} failed: {e}");
            return None;
        }
        w.next_seq += 1;
        drop(w);
        tracing::info!(
            class = %event.class,
            group = event.group.as_deref().unwrap_or(""),
            volume = event.volume.as_deref().unwrap_or(""),
            "event: {}",
            event.detail
        );
        self.alerts.send(&event);
        Some(event)
    }

    fn append(&self, w: &mut Writer, line: &[u8]) -> std::io::Result<()> {
        if w.bytes > 0 && w.bytes + line.len() as u64 > self.bytes_max {
            std::fs::rename(&self.path, rotated(&self.path))?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            w.file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&self.path)?;
            w.bytes = 0;
        }
        w.file.write_all(line)?;
        w.file.sync_data()?;
        w.bytes += line.len() as u64;
        Ok(())
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Every event in the log at `path` (the rotated part first), oldest first.
pub fn read(path: &Path) -> Vec<Event> {
    let mut events = read_file(&rotated(path));
    events.extend(read_file(path));
    events
}

fn read_file(path: &Path) -> Vec<Event> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect()
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `ns` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let millis = (ns / 1_000_000) % 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_709_210_096_789_000_000),
            "2024-02-29T12:34:56.789Z"
        );
    }

    /// Events survive reopening with their seqs continued; a torn last line is cut; the log
    /// rotates once over its bound and keeps the previous part readable.
    #[test]
    fn log_survives_reopen_cuts_torn_tail_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "appliance", "s", 0, Alerts::none()).unwrap();
        log.record(
            "fenced",
            Scope {
                group: Some("g"),
                volume: None,
            },
            "sync failed",
        );
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":\"torn")
            .unwrap();
        let log = EventLog::open(&path, "appliance", "s", 0, Alerts::none()).unwrap();
        let e = log.record("link_up", Scope::default(), "x").unwrap();
        assert_eq!(e.seq, 2);
        let events = read(&path);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(events[0].group.as_deref(), Some("g"));
        // The minimum bound holds a few hundred events; write past it.
        let detail = "d".repeat(EVENT_DETAIL_BYTES_MAX * 2);
        for _ in 0..(EVENTS_LOG_BYTES_MIN / 1000 + 5) {
            log.record("link_down", Scope::default(), detail.clone());
        }
        assert!(rotated(&path).exists());
        let events = read(&path);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert_eq!(*seqs.last().unwrap(), EVENTS_LOG_BYTES_MIN / 1000 + 7);
        assert!(std::fs::metadata(&path).unwrap().len() <= EVENTS_LOG_BYTES_MIN);
        assert!(events
            .iter()
            .all(|e| e.detail.len() <= EVENT_DETAIL_BYTES_MAX));
    }
}
