//! The splitter's `GET /metrics`: host I/O per volume (read live from `HostIo`'s atomics) and
//! each split link's state, from a snapshot a sampler refreshes once a second.
//!
//! `SplitLink::state` takes the volume's queue lock, the lock host writes are ordered under;
//! the sampler takes it once a second whatever the scrape rate, and a scrape only clones the
//! latest snapshot (`Arc`) under the metrics' own mutex.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use cdp_metrics::{Exposition, Handler, Labels, Response};
use tokio::net::TcpListener;

use crate::metered_export::HostIo;
use crate::served_volumes::ServedVolumes;
use crate::split_link::VolumeState;

/// The states a split link can be in, each a series of `cdp_split_link_state`.
const LINK_STATES: [&str; 5] = [
    "protecting",
    "marking",
    "resyncing",
    "initializing",
    "connecting",
];

/// One volume at one sample.
#[derive(Clone)]
pub struct VolumeSample {
    pub state: VolumeState,
    pub connected: bool,
    pub last_source_seq: u64,
    pub host_io: Arc<HostIo>,
}

struct SplitterMetrics {
    site: String,
    latest: Mutex<Arc<Vec<VolumeSample>>>,
}

/// Samples every volume once a second, hands each sample to `observe` (the event log's
/// detector) on the blocking pool, and with `listen` serves `/metrics`; until the returned
/// task is aborted.
pub async fn start(
    listen: Option<SocketAddr>,
    site: String,
    volumes: Arc<ServedVolumes>,
    mut observe: impl FnMut(&[VolumeSample]) + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = match listen {
        Some(listen) => Some(TcpListener::bind(listen).await?),
        None => None,
    };
    let first = sample(&volumes);
    observe(&first);
    let metrics = Arc::new(SplitterMetrics {
        site,
        latest: Mutex::new(Arc::new(first)),
    });
    if let Some(listener) = &listener {
        let bound = listener.local_addr()?;
        tracing::info!(metrics = %bound, "metrics served at http://{bound}/metrics");
    }
    let observe = Arc::new(Mutex::new(observe));
    Ok(tokio::spawn(async move {
        let _serving = listener.map(|listener| {
            AbortOnDrop(tokio::spawn(cdp_metrics::serve(
                listener,
                Arc::clone(&metrics) as Arc<dyn Handler>,
            )))
        });
        let mut tick = tokio::time::interval(cdp_metrics::SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let fresh = Arc::new(sample(&volumes));
            *metrics.latest.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
            let observe = Arc::clone(&observe);
            // The event log fsyncs: off the runtime's threads.
            let observed = tokio::task::spawn_blocking(move || {
                (observe.lock().unwrap_or_else(|p| p.into_inner()))(&fresh)
            })
            .await;
            if let Err(e) = observed {
                tracing::warn!("event detection failed: {e}");
            }
        }
    }))
}

/// Ends the HTTP task with the sampler's.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn sample(volumes: &ServedVolumes) -> Vec<VolumeSample> {
    volumes
        .list()
        .iter()
        .map(|v| {
            let mut state = v.link.state();
            state.nbd_clients = volumes.registry.clients(&state.name);
            VolumeSample {
                state,
                connected: v.link.is_connected(),
                last_source_seq: v.link.last_seq(),
                host_io: Arc::clone(&v.host_io),
            }
        })
        .collect()
}

impl Handler for SplitterMetrics {
    fn get(&self, path: &str) -> Response {
        if path != "/metrics" {
            return Response::text(404, "the splitter serves /metrics only\n");
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

fn exposition(site: &str, volumes: &[VolumeSample]) -> Exposition {
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = Exposition::new();
    e.info(
        "cdp_build",
        "The cdp build serving these metrics (constant 1).",
        vec![
            ("version".into(), env!("CARGO_PKG_VERSION").into()),
            ("role".into(), "splitter".into()),
            ("site".into(), site.into()),
        ],
    );
    for v in volumes {
        let s = &v.state;
        let l: Labels = vec![
            ("site".into(), site.into()),
            ("volume".into(), s.name.clone()),
        ];
        let io = &v.host_io;
        e.counter(
            "cdp_host_reads",
            "NBD reads answered by the splitter.",
            &l,
            io.reads.load(Relaxed),
        );
        e.counter(
            "cdp_host_read_bytes",
            "Bytes read by hosts.",
            &l,
            io.read_bytes.load(Relaxed),
        );
        e.counter(
            "cdp_host_writes",
            "NBD writes answered by the splitter.",
            &l,
            io.writes.load(Relaxed),
        );
        e.counter(
            "cdp_host_write_bytes",
            "Bytes hosts wrote (acknowledged writes).",
            &l,
            io.write_bytes.load(Relaxed),
        );
        e.counter(
            "cdp_host_trims",
            "NBD trims answered.",
            &l,
            io.trims.load(Relaxed),
        );
        e.counter(
            "cdp_host_zeroes",
            "NBD write-zeroes answered.",
            &l,
            io.zeroes.load(Relaxed),
        );
        e.counter(
            "cdp_host_flushes",
            "NBD flushes answered.",
            &l,
            io.flushes.load(Relaxed),
        );
        e.counter(
            "cdp_host_errors",
            "Host requests answered with an error.",
            &l,
            io.errors.load(Relaxed),
        );
        e.histogram(
            "cdp_host_write_duration_seconds",
            "Time from a host write's arrival to its acknowledgement (production and journal).",
            &l,
            io.write_latency.snapshot(),
        );
        e.histogram(
            "cdp_host_flush_duration_seconds",
            "Time to make a host flush durable (production fdatasync and journal sync).",
            &l,
            io.flush_latency.snapshot(),
        );
        e.gauge(
            "cdp_host_clients",
            "Hosts attached over NBD.",
            &l,
            s.nbd_clients.unwrap_or(0) as f64,
        );
        for state in LINK_STATES {
            let mut ls = l.clone();
            ls.push(("state".into(), state.into()));
            e.flag(
                "cdp_split_link_state",
                "1 for the split link's current protection state (protecting, marking, resyncing, initializing, connecting).",
                &ls,
                s.state == state,
            );
        }
        e.flag(
            "cdp_split_link_connected",
            "1 while the split link to the appliance is up.",
            &l,
            v.connected,
        );
        e.gauge(
            "cdp_split_link_source_seq",
            "The last source_seq given to a change of this volume.",
            &l,
            v.last_source_seq as f64,
        );
        e.flag(
            "cdp_marking",
            "1 while the volume is in marking mode (appliance lost, dirty regions recorded).",
            &l,
            s.state == "marking",
        );
        e.gauge(
            "cdp_marking_dirty_bytes",
            "Bytes of regions waiting for a resync copy.",
            &l,
            s.dirty_bytes as f64,
        );
        e.counter(
            "cdp_resync_copied_bytes",
            "Payload bytes resyncs copied into the journal.",
            &l,
            s.resync_copied_bytes,
        );
        let (total, done) = s
            .resync
            .as_ref()
            .map(|r| (r.total_bytes, r.done_bytes))
            .unwrap_or((0, 0));
        e.flag(
            "cdp_resync_active",
            "1 while a resync of the volume runs.",
            &l,
            s.resync.is_some(),
        );
        e.gauge(
            "cdp_resync_total_bytes",
            "Bytes the running resync covers (0 when none runs).",
            &l,
            total as f64,
        );
        e.gauge(
            "cdp_resync_done_bytes",
            "Bytes the running resync has settled.",
            &l,
            done as f64,
        );
        e.gauge("cdp_marking_since_timestamp_seconds", "When marking began for what is still to be resynchronised (Unix time; 0 when protecting).", &l, s.marking_since_ns.unwrap_or(0) as f64 / 1e9);
    }
    e
}
