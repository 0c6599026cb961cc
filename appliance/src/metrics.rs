//! The appliance's `GET /metrics`: per group the journal, distribution, undo stream, images,
//! consolidation, fencing and remote replication, from a snapshot a sampler takes once a
//! second.
//!
//! `Group::status` and `Group::journal_bytes_after` hold the history index mutex (which
//! appends hold across the journal append) for a copy of a few counters. The sampler calls
//! them once a second on the blocking pool, whatever the scrape rate; a scrape only clones
//! the latest snapshot (`Arc`) under the metrics' own mutex, so scraping never waits for, or
//! delays, an append.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use cdp_metrics::{Exposition, Handler, Labels, Response};
use cdp_types::{Seq, TimestampNs};
use tokio::net::TcpListener;

use crate::group::GroupStatus;
use crate::group_registry::Groups;
use crate::image::Images;

/// Samples of `(last_seq, time)` kept per group to date the oldest undistributed record:
/// one an interval, an hour's worth.
const SEQ_TIMES_MAX: usize = 3600;

/// One group at one sample.
#[derive(Clone, Debug)]
pub struct GroupSample {
    pub status: GroupStatus,
    pub images_open: usize,
    /// The open images: id, seq, the point as named.
    pub images: Vec<(String, u64, String)>,
    /// Timestamp of the oldest journal record (the oldest point is just before it).
    pub oldest_record_ns: Option<u64>,
    /// Journal bytes after the distributed seq.
    pub distribution_lag_bytes: u64,
    /// Age of the oldest record not yet on the replica, to the sample interval.
    pub distribution_lag_seconds: f64,
    /// A failed sync (or an undoable append) fenced the group: appends are refused.
    pub fenced: bool,
}

/// Every group at one instant.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub taken_ns: u64,
    pub groups: Vec<GroupSample>,
}

/// Takes samples; keeps what dating the distribution lag needs between them.
pub struct Sampler {
    groups: Arc<Groups>,
    images: Arc<Images>,
    /// Per group, `(last_seq, ns)` at each past sample, oldest first.
    seq_times: BTreeMap<String, VecDeque<(u64, u64)>>,
}

impl Sampler {
    pub fn new(groups: Arc<Groups>, images: Arc<Images>) -> Sampler {
        Sampler {
            groups,
            images,
            seq_times: BTreeMap::new(),
        }
    }

    /// One sample of every group. Blocking: reads one record header per group.
    pub fn sample(&mut self) -> Sample {
        let now = TimestampNs::now().0;
        let images = self.images.list(None);
        let mut groups = Vec::new();
        let mut names = Vec::new();
        for group in self.groups.list() {
            let status = group.status();
            let times = self.seq_times.entry(group.name.clone()).or_default();
            times.push_back((status.last_seq, now));
            if times.len() > SEQ_TIMES_MAX {
                times.pop_front();
            }
            // The record after the distributed seq existed at the first sample whose
            // last_seq passed it (appended in the interval before that sample).
            let distribution_lag_seconds = if status.distributed_seq >= status.last_seq {
                0.0
            } else {
                let since = times
                    .iter()
                    .find(|(last, _)| *last > status.distributed_seq)
                    .map_or(now, |(_, t)| *t);
                now.saturating_sub(since) as f64 / 1e9
            };
            let oldest_record_ns = group
                .journal()
                .first_record_timestamp()
                .unwrap_or_else(|e| {
                    tracing::debug!(group = %group.name, "metrics: oldest record: {e}");
                    None
                });
            groups.push(GroupSample {
                images_open: images.iter().filter(|i| i.group == group.name).count(),
                images: images
                    .iter()
                    .filter(|i| i.group == group.name)
                    .map(|i| (i.id.clone(), i.seq, i.point.clone()))
                    .collect(),
                oldest_record_ns,
                distribution_lag_bytes: group.journal_bytes_after(Seq(status.distributed_seq)),
                distribution_lag_seconds,
                fenced: status.failure.is_some() || group.journal().is_fenced(),
                status,
            });
            names.push(group.name.clone());
        }
        self.seq_times.retain(|name, _| names.contains(name));
        Sample {
            taken_ns: now,
            groups,
        }
    }
}

/// What scrapes read.
struct ApplianceMetrics {
    site: String,
    latest: Mutex<Arc<Sample>>,
}

/// Takes a first sample and then one a second, each handed to `observe` (the event log's
/// state-change detector) on the blocking pool; with `listen`, binds it and serves
/// `/metrics`. Runs until the returned task is aborted.
pub async fn start(
    listen: Option<SocketAddr>,
    site: String,
    mut sampler: Sampler,
    mut observe: impl FnMut(&Sample) + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = match listen {
        Some(listen) => Some(TcpListener::bind(listen).await?),
        None => None,
    };
    let (sampler, first) = tokio::task::spawn_blocking(move || {
        let first = sampler.sample();
        (sampler, first)
    })
    .await
    .map_err(std::io::Error::other)?;
    observe(&first);
    let metrics = Arc::new(ApplianceMetrics {
        site,
        latest: Mutex::new(Arc::new(first)),
    });
    if let Some(listener) = &listener {
        let bound = listener.local_addr()?;
        tracing::info!(metrics = %bound, "metrics served at http://{bound}/metrics");
    }
    Ok(tokio::spawn(run(listener, metrics, sampler, observe)))
}

async fn run(
    listener: Option<TcpListener>,
    metrics: Arc<ApplianceMetrics>,
    sampler: Sampler,
    observe: impl FnMut(&Sample) + Send + 'static,
) {
    let _stop_serving = listener.map(|listener| {
        AbortOnDrop(tokio::spawn(cdp_metrics::serve(
            listener,
            Arc::clone(&metrics) as Arc<dyn Handler>,
        )))
    });
    let state = Arc::new(Mutex::new((sampler, observe)));
    let mut tick = tokio::time::interval(cdp_metrics::SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let state = Arc::clone(&state);
        let taken = tokio::task::spawn_blocking(move || {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let (sampler, observe) = &mut *guard;
            let sample = sampler.sample();
            observe(&sample);
            sample
        })
        .await;
        match taken {
            Ok(sample) => {
                *metrics.latest.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(sample)
            }
            Err(e) => tracing::warn!("metrics sample failed: {e}"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Handler for ApplianceMetrics {
    fn get(&self, path: &str) -> Response {
        if path != "/metrics" {
            return Response::text(404, "the appliance serves /metrics only\n");
        }
        let latest = Arc::clone(&self.latest.lock().unwrap_or_else(|p| p.into_inner()));
        match exposition(&self.site, &latest).encode() {
            Ok(text) => Response {
                status: 200,
                content_type: cdp_metrics::exposition::CONTENT_TYPE,
                body: text.into_bytes(),
            },
            Err(e) => Response::text(500, format!("encoding metrics failed: {e}\n")),
        }
    }
}

fn with(labels: &Labels, key: &str, value: &str) -> Labels {
    let mut l = labels.clone();
    l.push((key.into(), value.into()));
    l
}

/// The families of one sample.
pub fn exposition(site: &str, sample: &Sample) -> Exposition {
    let mut e = Exposition::new();
    e.info(
        "cdp_build",
        "The cdp build serving these metrics (constant 1).",
        vec![
            ("version".into(), env!("CARGO_PKG_VERSION").into()),
            ("role".into(), "appliance".into()),
            ("site".into(), site.into()),
        ],
    );
    for g in &sample.groups {
        let s = &g.status;
        let l: Labels = vec![
            ("site".into(), site.into()),
            ("group".into(), s.name.clone()),
        ];
        e.gauge(
            "cdp_journal_bytes",
            "Bytes in the journal's segment files.",
            &l,
            s.journal_bytes as f64,
        );
        e.gauge(
            "cdp_journal_capacity_bytes",
            "Journal size above which retention releases the oldest segments.",
            &l,
            s.journal_capacity_bytes as f64,
        );
        e.gauge(
            "cdp_journal_segments",
            "Segment files in the journal.",
            &l,
            s.journal_segments as f64,
        );
        e.gauge(
            "cdp_journal_first_seq",
            "Seq of the oldest record kept.",
            &l,
            s.first_seq as f64,
        );
        e.gauge(
            "cdp_journal_last_seq",
            "Seq of the last record appended.",
            &l,
            s.last_seq as f64,
        );
        e.gauge(
            "cdp_journal_durable_seq",
            "Highest seq synced to disk.",
            &l,
            s.durable_seq as f64,
        );
        e.gauge(
            "cdp_journal_distributed_seq",
            "Highest seq applied to the replica.",
            &l,
            s.distributed_seq as f64,
        );
        e.gauge(
            "cdp_journal_oldest_point_seq",
            "The oldest point an image can be opened at.",
            &l,
            s.oldest_point_seq as f64,
        );
        let age = g
            .oldest_record_ns
            .map_or(0.0, |t| sample.taken_ns.saturating_sub(t) as f64 / 1e9);
        e.gauge(
            "cdp_journal_oldest_point_age_seconds",
            "Age of the oldest recoverable point (0 with an empty journal).",
            &l,
            age,
        );
        e.flag(
            "cdp_journal_over_capacity",
            "1 while the journal is over capacity and nothing may be released yet.",
            &l,
            s.journal_over_capacity,
        );
        e.flag(
            "cdp_journal_throttling",
            "1 while host writes are held because the journal is full (policy throttle).",
            &l,
            s.journal_throttling,
        );
        e.counter(
            "cdp_journal_write_logical_bytes",
            "Write payload bytes journaled since start, as hosts wrote them.",
            &l,
            s.journal_write_logical_bytes,
        );
        e.counter(
            "cdp_journal_write_stored_bytes",
            "Write payload bytes journaled since start, as stored (after compression).",
            &l,
            s.journal_write_stored_bytes,
        );
        e.gauge(
            "cdp_distribution_lag_records",
            "Records journaled but not yet applied to the replica.",
            &l,
            s.lag_records as f64,
        );
        e.gauge(
            "cdp_distribution_lag_bytes",
            "Journal bytes not yet applied to the replica.",
            &l,
            g.distribution_lag_bytes as f64,
        );
        e.gauge(
            "cdp_distribution_lag_seconds",
            "Age of the oldest record not yet applied to the replica (to about a second).",
            &l,
            g.distribution_lag_seconds,
        );
        e.gauge(
            "cdp_undo_bytes",
            "Bytes in the undo stream (replica before-images).",
            &l,
            s.undo_bytes as f64,
        );
        e.gauge(
            "cdp_images_open",
            "Point-in-time images open.",
            &l,
            g.images_open as f64,
        );
        e.flag(
            "cdp_group_fenced",
            "1 once a failed sync fenced the group (appends refused until restart).",
            &l,
            g.fenced,
        );
        e.flag(
            "cdp_group_remote_copy",
            "1 for the remote copy of another appliance's group.",
            &l,
            s.source == crate::config::GroupSource::Remote,
        );
        let (runs, freed, kept) = s.consolidation.as_ref().map_or((0, 0, 0), |c| {
            (c.passes, c.bytes_freed_total, c.kept_points)
        });
        e.counter(
            "cdp_consolidation_runs",
            "Consolidation passes since start.",
            &l,
            runs,
        );
        e.counter(
            "cdp_consolidation_freed_bytes",
            "Bytes consolidation freed since start.",
            &l,
            freed,
        );
        e.gauge(
            "cdp_consolidation_kept_points",
            "Points consolidation keeps.",
            &l,
            kept as f64,
        );
        for v in &s.volumes {
            let lv = with(&l, "volume", &v.name);
            e.flag("cdp_volume_connected", "1 while the volume's splitter is connected (the appliance's side of the split link).", &lv, v.connected);
            e.gauge(
                "cdp_volume_size_bytes",
                "The volume's size.",
                &lv,
                v.size as f64,
            );
            e.gauge(
                "cdp_volume_source_seq",
                "Highest splitter source_seq journaled for the volume.",
                &lv,
                v.last_source_seq as f64,
            );
        }
        if let Some(r) = &s.remote {
            let lp = with(&l, "peer", &r.endpoint);
            e.flag(
                "cdp_replication_connected",
                "1 while the link to the remote copy is up.",
                &lp,
                r.connected,
            );
            e.gauge(
                "cdp_replication_shipped_seq",
                "Highest seq the remote copy acknowledged.",
                &lp,
                r.shipped_seq as f64,
            );
            e.gauge(
                "cdp_replication_lag_records",
                "Records the remote copy lacks.",
                &lp,
                r.lag_records as f64,
            );
            e.gauge(
                "cdp_replication_lag_bytes",
                "Journal bytes the remote copy lacks.",
                &lp,
                r.lag_bytes as f64,
            );
            e.gauge(
                "cdp_replication_lag_seconds",
                "Age of the oldest record the remote copy has not made durable.",
                &lp,
                r.lag_seconds,
            );
            e.gauge(
                "cdp_replication_lag_p99_seconds",
                "99th percentile of the lag over the last lag window.",
                &lp,
                r.lag_p99_ms as f64 / 1e3,
            );
            e.gauge(
                "cdp_replication_lag_max_seconds",
                "Largest lag over the last lag window.",
                &lp,
                r.lag_max_ms as f64 / 1e3,
            );
            e.gauge(
                "cdp_replication_rpo_seconds",
                "The configured recovery point objective.",
                &lp,
                r.rpo_s as f64,
            );
            e.flag(
                "cdp_replication_rpo_exceeded",
                "1 while the lag exceeds the RPO (time or bytes).",
                &lp,
                r.rpo_exceeded,
            );
            e.flag(
                "cdp_replication_rpo_throttling",
                "1 while host writes are held to keep the RPO.",
                &lp,
                r.rpo_throttling,
            );
            e.flag(
                "cdp_replication_sync_active",
                "1 while writes wait for the remote copy (sync mode).",
                &lp,
                r.sync_active,
            );
            e.counter(
                "cdp_replication_raw_bytes",
                "Batch bytes before dedup and compression.",
                &lp,
                r.wire_raw_bytes,
            );
            e.counter(
                "cdp_replication_dedup_bytes",
                "Batch bytes after dedup, before compression.",
                &lp,
                r.wire_dedup_bytes,
            );
            e.counter(
                "cdp_replication_wire_bytes",
                "Batch bytes sent on the wire (after dedup and zstd).",
                &lp,
                r.wire_bytes,
            );
            e.gauge(
                "cdp_replication_wire_rate_bytes_per_second",
                "Measured wire rate.",
                &lp,
                r.wire_rate_bytes_per_s as f64,
            );
            for (kind, n) in [
                ("literal", r.dedup_literal_blocks),
                ("zero", r.dedup_zero_blocks),
                ("reference", r.dedup_reference_blocks),
            ] {
                e.counter(
                    "cdp_replication_dedup_blocks",
                    "Whole 4 KiB blocks sent, by how (literal, zero, reference).",
                    &with(&lp, "kind", kind),
                    n,
                );
            }
        }
        if let Some(r) = &s.replication_source {
            let lp = with(&l, "peer", r.peer.as_deref().unwrap_or(""));
            e.flag(
                "cdp_replication_source_connected",
                "1 while the source appliance's link to this remote copy is up.",
                &lp,
                r.connected,
            );
            e.gauge(
                "cdp_replication_received_seq",
                "Highest seq received and made durable from the source.",
                &lp,
                r.last_received_seq as f64,
            );
        }
        if let Some(a) = &s.archive {
            e.gauge(
                "cdp_archive_lag_seconds",
                "Age of the oldest durable record the archive on object storage lacks (0 when caught up).",
                &l,
                a.lag_seconds,
            );
            e.gauge(
                "cdp_archive_lag_records",
                "Durable journal records the archive lacks.",
                &l,
                a.lag_records as f64,
            );
            e.gauge(
                "cdp_archive_lag_segments",
                "Journal segments holding records the archive lacks.",
                &l,
                a.lag_segments as f64,
            );
            e.gauge(
                "cdp_archive_archived_seq",
                "Highest seq the archive's newest manifest names.",
                &l,
                a.archived_seq as f64,
            );
            e.counter(
                "cdp_archive_uploaded_stored_bytes",
                "Bytes uploaded to the archive since start (after zstd).",
                &l,
                a.uploaded_stored_bytes,
            );
            e.flag(
                "cdp_archive_failing",
                "1 while the last archive pass failed.",
                &l,
                a.last_error.is_some(),
            );
        }
    }
    e
}
