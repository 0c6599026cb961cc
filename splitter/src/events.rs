//! The splitter's state changes for the event log: each sample of its volumes is compared
//! with the one before; the split link going down or up, marking entered or left, and a
//! resync started or finished each become one event.
//!
//! Sampled once a second: a resync that starts and ends between two samples is still
//! reported (its completed summary is new), as started and finished.

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_metrics::event_log::{EventLog, Scope};

use crate::metrics::VolumeSample;

struct Seen {
    connected: bool,
    marking: bool,
    resyncing: bool,
    last_resync_ns: Option<u64>,
}

/// Compares samples and records what changed.
pub struct Detector {
    log: Arc<EventLog>,
    seen: BTreeMap<String, Seen>,
}

impl Detector {
    pub fn new(log: Arc<EventLog>) -> Detector {
        Detector {
            log,
            seen: BTreeMap::new(),
        }
    }

    pub fn observe(&mut self, volumes: &[VolumeSample]) {
        for v in volumes {
            let s = &v.state;
            let scope = Scope {
                group: None,
                volume: Some(&s.name),
            };
            let now = Seen {
                connected: v.connected,
                marking: s.state == "marking",
                resyncing: s.resync.is_some(),
                last_resync_ns: s.last_resync.as_ref().map(|r| r.completed_ns),
            };
            let before = self.seen.get(&s.name);
            let log = &self.log;
            if now.connected && !before.is_some_and(|b| b.connected) {
                log.record(
                    "link_up",
                    scope,
                    format!("split link of volume {} up", s.name),
                );
            } else if !now.connected && before.is_some_and(|b| b.connected) {
                log.record(
                    "link_down",
                    scope,
                    format!(
                        "split link of volume {} down (policy {})",
                        s.name, s.on_appliance_loss
                    ),
                );
            }
            if now.marking && !before.is_some_and(|b| b.marking) {
                log.record("marking_entered", scope, format!("volume {} is marking: the host is served, changed regions are recorded for a resync", s.name));
            }
            let finished = now.last_resync_ns.is_some()
                && now.last_resync_ns != before.and_then(|b| b.last_resync_ns);
            let started = now.resyncing && !before.is_some_and(|b| b.resyncing);
            let was_resyncing = before.is_some_and(|b| b.resyncing);
            if started || (finished && !was_resyncing && !now.resyncing) {
                let what = s.resync.as_ref().map_or_else(
                    || "a short resync (begun and done between two samples)".to_string(),
                    |r| format!("{} of {} bytes", r.method, r.total_bytes),
                );
                log.record(
                    "resync_started",
                    scope,
                    format!("volume {}: resync started: {what}", s.name),
                );
            }
            if finished {
                if let Some(r) = &s.last_resync {
                    log.record(
                        "resync_finished",
                        scope,
                        format!(
                            "volume {}: resync finished: {}, {} bytes, {} copied, {:.1} s",
                            s.name, r.method, r.total_bytes, r.copied_bytes, r.seconds
                        ),
                    );
                }
            }
            if !now.marking && before.is_some_and(|b| b.marking) {
                log.record(
                    "marking_left",
                    scope,
                    format!("volume {} left marking (now {})", s.name, s.state),
                );
            }
            self.seen.insert(s.name.clone(), now);
        }
    }
}
