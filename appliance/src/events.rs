//! The appliance's state changes for the event log: each metrics sample is compared with the
//! one before, and every change (a splitter lost, the journal over capacity, the RPO
//! exceeded, a group fenced, a consolidation pass, an image opened, ...) becomes one event.
//!
//! Sampling once a second means a change undone within the same second (a link that drops
//! and returns at once) may be missed; what lasts is always seen, in order, within about a
//! second. Each event class, what it means, and its detail are listed in docs/cli.md.

use std::collections::BTreeSet;
use std::sync::Arc;

use cdp_metrics::event_log::{EventLog, Scope};

use crate::metrics::{GroupSample, Sample};

/// Compares samples and records what changed.
pub struct Detector {
    log: Arc<EventLog>,
    previous: Option<Sample>,
}

impl Detector {
    pub fn new(log: Arc<EventLog>) -> Detector {
        Detector {
            log,
            previous: None,
        }
    }

    pub fn observe(&mut self, sample: &Sample) {
        for g in &sample.groups {
            let before = self
                .previous
                .as_ref()
                .and_then(|p| p.groups.iter().find(|b| b.status.name == g.status.name));
            self.group(before, g);
        }
        self.previous = Some(sample.clone());
    }

    fn group(&self, before: Option<&GroupSample>, now: &GroupSample) {
        let s = &now.status;
        let group = Some(s.name.as_str());
        let scope = Scope {
            group,
            volume: None,
        };
        let log = &self.log;
        // A state absent before (first sample, new group) counts as the healthy one.
        let was = |f: fn(&GroupSample) -> bool| before.is_some_and(f);
        for v in &s.volumes {
            let was_connected = before.is_some_and(|b| {
                b.status
                    .volumes
                    .iter()
                    .any(|bv| bv.name == v.name && bv.connected)
            });
            let volume = Scope {
                group,
                volume: Some(&v.name),
            };
            if v.connected && !was_connected {
                log.record(
                    "splitter_connected",
                    volume,
                    format!("the splitter of volume {} connected", v.name),
                );
            } else if !v.connected && was_connected {
                log.record("splitter_disconnected", volume, format!("the splitter of volume {} is gone; its writes since then are not journaled until it resyncs", v.name));
            }
        }
        if now.fenced && !was(|b| b.fenced) {
            let why = s
                .failure
                .clone()
                .unwrap_or_else(|| "the journal is fenced".into());
            log.record(
                "fenced",
                scope,
                format!("group fenced, appends refused until restart: {why}"),
            );
        }
        // Over capacity whatever the cause: distribution behind (status says so), or history
        // kept for the remote copy or open images (retention may not release it).
        let over = |g: &GroupSample| g.status.journal_bytes > g.status.journal_capacity_bytes;
        if over(now) && !was(over) {
            let why = if s.journal_over_capacity {
                "distribution to the replica is behind"
            } else {
                "history is kept for the remote copy or open images"
            };
            log.record(
                "journal_over_capacity",
                scope,
                format!(
                    "journal at {} bytes, over its capacity of {} bytes: {why}",
                    s.journal_bytes, s.journal_capacity_bytes
                ),
            );
        } else if !over(now) && was(over) {
            log.record(
                "journal_within_capacity",
                scope,
                format!(
                    "journal back within capacity ({} of {} bytes)",
                    s.journal_bytes, s.journal_capacity_bytes
                ),
            );
        }
        if s.journal_throttling && !was(|b| b.status.journal_throttling) {
            log.record(
                "journal_throttling_started",
                scope,
                "journal full: host writes are held (journal_full_policy = throttle)",
            );
        } else if !s.journal_throttling && was(|b| b.status.journal_throttling) {
            log.record(
                "journal_throttling_stopped",
                scope,
                "journal has room: host writes go on",
            );
        }
        let passes = |g: &GroupSample| g.status.consolidation.as_ref().map_or(0, |c| c.passes);
        if before.is_some_and(|b| passes(now) > passes(b)) {
            let freed = s
                .consolidation
                .as_ref()
                .and_then(|c| c.last.as_ref())
                .map(|r| format!("{r:?}"));
            log.record(
                "consolidation",
                scope,
                format!(
                    "consolidation pass {} done{}",
                    passes(now),
                    freed.map(|f| format!(": {f}")).unwrap_or_default()
                ),
            );
        }
        let ids = |g: &GroupSample| {
            g.images
                .iter()
                .map(|i| i.0.clone())
                .collect::<BTreeSet<_>>()
        };
        let had = before.map(ids).unwrap_or_default();
        for (id, seq, point) in &now.images {
            if !had.contains(id) {
                log.record(
                    "image_opened",
                    scope,
                    format!("image {id} opened at {point} (seq {seq})"),
                );
            }
        }
        let has = ids(now);
        for (id, seq, point) in before.map(|b| b.images.clone()).unwrap_or_default() {
            if !has.contains(&id) {
                log.record(
                    "image_released",
                    scope,
                    format!("image {id} at {point} (seq {seq}) released"),
                );
            }
        }
        if let Some(r) = &s.remote {
            let before = before.and_then(|b| b.status.remote.as_ref());
            let peer = &r.endpoint;
            if r.connected && !before.is_some_and(|b| b.connected) {
                log.record(
                    "replication_up",
                    scope,
                    format!("replication link to {peer} up"),
                );
            } else if !r.connected && before.is_some_and(|b| b.connected) {
                log.record("replication_down", scope, format!("replication link to {peer} down; the journal keeps what the remote copy lacks"));
            }
            if r.rpo_exceeded && !before.is_some_and(|b| b.rpo_exceeded) {
                log.record(
                    "rpo_exceeded",
                    scope,
                    format!(
                        "remote copy {peer} lags {:.1} s / {} bytes, over the RPO of {} s",
                        r.lag_seconds, r.lag_bytes, r.rpo_s
                    ),
                );
            } else if !r.rpo_exceeded && before.is_some_and(|b| b.rpo_exceeded) {
                log.record(
                    "rpo_recovered",
                    scope,
                    format!(
                        "remote copy {peer} back within the RPO ({:.1} s lag)",
                        r.lag_seconds
                    ),
                );
            }
            if let Some(error) = &r.last_error {
                if before.is_none_or(|b| b.last_error.as_ref() != Some(error)) {
                    let lower = error.to_lowercase();
                    let class = if lower.contains("certificate") || lower.contains("tls") {
                        "tls_refused"
                    } else {
                        "replication_error"
                    };
                    log.record(class, scope, format!("replication to {peer}: {error}"));
                }
            }
        }
        if let Some(r) = &s.replication_source {
            let before = before.and_then(|b| b.status.replication_source.as_ref());
            let peer = r.peer.as_deref().unwrap_or("the source");
            if r.connected && !before.is_some_and(|b| b.connected) {
                log.record(
                    "replication_source_up",
                    scope,
                    format!("replication from {peer} connected"),
                );
            } else if !r.connected && before.is_some_and(|b| b.connected) {
                log.record(
                    "replication_source_down",
                    scope,
                    format!("replication from {peer} disconnected"),
                );
            }
        }
    }
}
