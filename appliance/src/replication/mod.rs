//! Remote replication: a local group ships its journal to a remote appliance's group of the same name.
//!
//! `shipper.rs` runs at the local site (one thread per group with `[group.remote]`),
//! `receiver.rs` at the remote site (one listener, one thread per replication link). The
//! wire format is `cdp_link::replication`. This module holds the per-group state both sides
//! share with `cdp status`. `bandwidth.rs` is the shipper's bandwidth limit, `lag_window.rs`
//! its recent lag (p99 and max) for status. `tls.rs` authenticates and encrypts the link
//! (mutual TLS), `link_stream.rs` splits a link into a read and a write half.
//! `compression.rs` picks each batch's zstd level (fixed or adaptive), `dedup_policy.rs`
//! whether it is deduplicated.
//!
//! Sync mode (`mode = "sync"`, and `dynamic` while `sync_active`) gates the split link's acks
//! on `ShippingState::shipped`, a watch every split-link connection of the group subscribes
//! to (`link_server.rs`).

pub mod bandwidth;
pub mod compression;
pub mod dedup_policy;
pub mod lag_window;
pub mod link_stream;
pub mod receiver;
pub mod region_resync;
pub mod shipper;
pub mod tls;
mod tls_error;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::{CompressLevel, GroupConfig, GroupSource, RemoteConfig, ReplicationMode};

/// A group's replication role and progress, kept in its `Group`.
pub struct GroupReplication {
    pub source: GroupSource,
    /// Local groups with `[group.remote]`: the shipper's progress.
    pub shipping: Option<ShippingState>,
    /// Remote groups: the receiver's progress.
    pub receiving: ReceivingState,
}

impl GroupReplication {
    pub fn new(config: &GroupConfig) -> GroupReplication {
        GroupReplication {
            source: config.source,
            shipping: config.remote.clone().map(ShippingState::new),
            receiving: ReceivingState::default(),
        }
    }
}

/// What the shipper publishes; atomics, so status never waits for the shipper.
pub struct ShippingState {
    pub config: RemoteConfig,
    pub connected: AtomicBool,
    /// The remote acknowledged every record up to here as durable. 0 until the first
    /// Welcome (the local appliance does not persist it: the remote tells on connect).
    pub shipped_seq: AtomicU64,
    /// The remote's answer was known at least once since start.
    pub shipped_known: AtomicBool,
    /// Age in ns of the oldest record not yet acknowledged (0 when caught up), updated by
    /// the shipper about once a second.
    pub lag_ns: AtomicU64,
    /// `lag_ns` as measured, one sample per second over the last few minutes, for the p99
    /// and max lag in status.
    pub lag_window: Mutex<lag_window::LagWindow>,
    pub rpo_exceeded: AtomicBool,
    /// Journal bytes not yet durable at the remote, updated with `lag_ns`.
    pub lag_bytes: AtomicU64,
    /// The last resynchronisation by regions, if one ran since start.
    pub last_region_resync: Mutex<Option<region_resync::RegionResyncReport>>,
    /// Batch bytes since start: records as they are (`raw_bytes`), after dedup
    /// (`dedup_bytes`), and the frames on the wire after compression (`wire_bytes`).
    pub raw_bytes: AtomicU64,
    pub dedup_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    /// Whole 4 KiB blocks of writes since start: sent as bytes, as zero tags, as references.
    pub dedup_literal_blocks: AtomicU64,
    pub dedup_zero_blocks: AtomicU64,
    pub dedup_reference_blocks: AtomicU64,
    /// The zstd level of the last batch (0: it went uncompressed).
    pub compress_level_now: AtomicI32,
    /// Why the last connection attempt or link failed, for status.
    pub last_error: Mutex<Option<String>>,
    /// `shipped_seq` as a watch, for split-link connections in sync mode: their acks wait
    /// for it to cover their changes' journal seqs. Only ever raised.
    pub shipped: watch::Sender<u64>,
    /// Sync mode (or dynamic while synchronous): the oldest change the remote copy lacks
    /// has waited longer than `SYNC_WAIT_WARN`, so host writes are waiting for it.
    pub sync_waiting: AtomicBool,
    /// Host Acks wait for the remote: always in sync mode, never in async mode, and in
    /// dynamic mode until host writes waited `sync_wait_ms_max` (then again once the remote
    /// kept up for `DYNAMIC_SYNC_RETURN`).
    pub sync_active: AtomicBool,
    /// Wire bytes per second over the last few seconds (`bandwidth::RateMeter`).
    pub wire_rate_bytes_per_s: AtomicU64,
    /// The shipper thread, unparked on each append in sync mode so records leave at once.
    /// Set once when the shipper starts (one shipper per group for the appliance's life).
    pub shipper_thread: std::sync::OnceLock<std::thread::Thread>,
}

impl ShippingState {
    fn new(config: RemoteConfig) -> ShippingState {
        let sync_active = config.mode != ReplicationMode::Async;
        ShippingState {
            config,
            connected: AtomicBool::new(false),
            shipped_seq: AtomicU64::new(0),
            shipped_known: AtomicBool::new(false),
            lag_ns: AtomicU64::new(0),
            lag_window: Mutex::new(lag_window::LagWindow::new(std::time::Instant::now())),
            rpo_exceeded: AtomicBool::new(false),
            lag_bytes: AtomicU64::new(0),
            last_region_resync: Mutex::new(None),
            raw_bytes: AtomicU64::new(0),
            dedup_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            dedup_literal_blocks: AtomicU64::new(0),
            dedup_zero_blocks: AtomicU64::new(0),
            dedup_reference_blocks: AtomicU64::new(0),
            compress_level_now: AtomicI32::new(0),
            last_error: Mutex::new(None),
            shipped: watch::Sender::new(0),
            sync_waiting: AtomicBool::new(false),
            sync_active: AtomicBool::new(sync_active),
            wire_rate_bytes_per_s: AtomicU64::new(0),
            shipper_thread: std::sync::OnceLock::new(),
        }
    }

    /// Records that the remote copy holds every record up to `seq` durably.
    pub fn set_shipped(&self, seq: u64) {
        self.shipped_seq.store(seq, Ordering::Relaxed);
        cdp_link::watermark::raise(&self.shipped, seq);
    }

    /// Sync or dynamic mode: split-link connections track which changes the remote holds,
    /// and the shipper ships appended records at once.
    pub fn tracks_remote_acks(&self) -> bool {
        self.config.mode != ReplicationMode::Async
    }

    /// Host Acks wait for the remote right now (sync mode, or dynamic mode while synchronous).
    pub fn is_sync_active(&self) -> bool {
        self.sync_active.load(Ordering::Relaxed)
    }

    /// Dynamic mode: switches between waiting for the remote and not. Wakes every split-link
    /// sender (through `shipped`, which they all watch) so Acks held for the remote are
    /// released at once when falling back to async.
    pub fn set_sync_active(&self, active: bool) {
        self.sync_active.store(active, Ordering::Relaxed);
        self.shipped.send_modify(|_| ());
    }

    /// Tells the shipper new records were appended (sync mode ships them at once). Cheap: an
    /// unpark is an atomic swap, and a futex wake only when the shipper sleeps.
    pub fn wake_shipper(&self) {
        if let Some(t) = self.shipper_thread.get() {
            t.unpark();
        }
    }

    /// Publishes the lag the shipper just measured: the current figure and the window's
    /// sample.
    /// Async RPO regulation: the host's writes wait while this is true (`throttle_on_rpo`,
    /// the RPO exceeded, the link up, the group not synchronous already).
    pub fn rpo_throttling(&self) -> bool {
        self.rpo_regulated() && self.rpo_exceeded.load(Ordering::Relaxed)
    }

    /// `throttle_on_rpo` applies now: set, the group asynchronous, the link up.
    pub fn rpo_regulated(&self) -> bool {
        self.config.throttle_on_rpo
            && !self.is_sync_active()
            && self.connected.load(Ordering::Relaxed)
    }

    pub fn record_lag(&self, lag_ns: u64) {
        self.lag_ns.store(lag_ns, Ordering::Relaxed);
        self.lag_window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(std::time::Instant::now(), lag_ns);
    }

    /// Status as `cdp status --json` shows it under `groups[].remote`.
    pub fn status(&self, last_seq: u64) -> RemoteStatus {
        let shipped = self.shipped_seq.load(Ordering::Relaxed);
        let recent_lag = self
            .lag_window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .summary(std::time::Instant::now());
        let raw = self.raw_bytes.load(Ordering::Relaxed);
        let dedup = self.dedup_bytes.load(Ordering::Relaxed);
        let wire = self.wire_bytes.load(Ordering::Relaxed);
        let ratio = |before: u64, after: u64| {
            if after == 0 {
                1.0
            } else {
                before as f64 / after as f64
            }
        };
        RemoteStatus {
            endpoint: self.config.endpoint.clone(),
            tls: self.config.tls.is_some(),
            connected: self.connected.load(Ordering::Relaxed),
            shipped_seq: shipped,
            shipped_known: self.shipped_known.load(Ordering::Relaxed),
            lag_records: last_seq.saturating_sub(shipped),
            lag_seconds: self.lag_ns.load(Ordering::Relaxed) as f64 / 1e9,
            lag_p99_ms: recent_lag.p99_ns / 1_000_000,
            lag_max_ms: recent_lag.max_ns / 1_000_000,
            lag_window_s: recent_lag.samples,
            rpo_s: self.config.rpo_s,
            rpo_exceeded: self.rpo_exceeded.load(Ordering::Relaxed),
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            rpo_bytes: self.config.rpo_bytes,
            throttle_on_rpo: self.config.throttle_on_rpo,
            last_region_resync: self
                .last_region_resync
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            rpo_throttling: self.rpo_throttling(),
            compress_level: self.config.compress_level,
            mode: self.config.mode,
            sync_waiting: self.sync_waiting.load(Ordering::Relaxed),
            sync_active: self.is_sync_active(),
            bandwidth_bytes_per_s: self.config.bandwidth_bytes_per_s,
            wire_rate_bytes_per_s: self.wire_rate_bytes_per_s.load(Ordering::Relaxed),
            wire_raw_bytes: raw,
            wire_dedup_bytes: dedup,
            wire_bytes: wire,
            wire_compression_ratio: ratio(raw, wire),
            dedup: self.config.dedup,
            dedup_ratio: ratio(raw, dedup),
            zstd_ratio: ratio(dedup, wire),
            dedup_literal_blocks: self.dedup_literal_blocks.load(Ordering::Relaxed),
            dedup_zero_blocks: self.dedup_zero_blocks.load(Ordering::Relaxed),
            dedup_reference_blocks: self.dedup_reference_blocks.load(Ordering::Relaxed),
            compress_level_now: self.compress_level_now.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// What the receiver publishes for a remote group.
#[derive(Default)]
pub struct ReceivingState {
    pub connected: AtomicBool,
    /// The source's address of the current (or last) link.
    pub peer: Mutex<Option<String>>,
    /// The current link's socket, so a newer link from the same source can close it.
    pub link: Mutex<Option<std::net::TcpStream>>,
}

/// `groups[].remote` in `cdp status --json`, for a group that ships.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteStatus {
    pub endpoint: String,
    /// The link is mutual TLS (false: plaintext, as configured explicitly).
    pub tls: bool,
    pub connected: bool,
    /// Every record up to here is durable at the remote.
    pub shipped_seq: u64,
    /// False until the remote answered once since this appliance started (`shipped_seq`
    /// is then 0 and the lag counts the whole journal).
    pub shipped_known: bool,
    pub lag_records: u64,
    /// Age of the oldest record the remote does not have yet; 0 when caught up.
    pub lag_seconds: f64,
    /// The 99th percentile and the maximum of the lag over the last `lag_window_s` seconds
    /// the shipper measured (one sample per second, the largest of that second; at most
    /// `lag_window::LAG_WINDOW_SECONDS`): how far behind the remote copy ran recently,
    /// which the current `lag_seconds` alone does not tell.
    pub lag_p99_ms: u64,
    pub lag_max_ms: u64,
    pub lag_window_s: u64,
    pub rpo_s: u64,
    pub rpo_exceeded: bool,
    /// Journal bytes the remote does not have yet, and the RPO in bytes if set.
    pub lag_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo_bytes: Option<u64>,
    /// `throttle_on_rpo`, and whether host writes are held for it right now.
    pub throttle_on_rpo: bool,
    /// The last resynchronisation by regions since start (history released before it was
    /// shipped), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_region_resync: Option<region_resync::RegionResyncReport>,
    pub rpo_throttling: bool,
    /// The setting: a zstd level or `"adaptive"`.
    pub compress_level: CompressLevel,
    /// The level the last batch went out with (0: uncompressed).
    pub compress_level_now: i32,
    /// `async`, `sync` or `dynamic` (`[group.remote] mode`).
    pub mode: ReplicationMode,
    /// Host writes wait for the remote copy right now (sync, or dynamic while synchronous).
    pub sync_active: bool,
    /// Sync mode: host writes have been waiting for the remote copy for more than a second.
    pub sync_waiting: bool,
    /// The configured wire bandwidth limit, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Measured wire bytes per second over the last ~5 s.
    pub wire_rate_bytes_per_s: u64,
    /// Batch bytes shipped since start: records as they are, after dedup, and on the wire
    /// (after compression); `wire_compression_ratio` is raw / wire (both together),
    /// `dedup_ratio` raw / dedup, `zstd_ratio` dedup / wire.
    pub wire_raw_bytes: u64,
    pub wire_dedup_bytes: u64,
    pub wire_bytes: u64,
    pub wire_compression_ratio: f64,
    /// `[group.remote] dedup`.
    pub dedup: bool,
    pub dedup_ratio: f64,
    pub zstd_ratio: f64,
    /// Whole 4 KiB blocks of writes shipped since start as bytes, as zero tags, as references.
    pub dedup_literal_blocks: u64,
    pub dedup_zero_blocks: u64,
    pub dedup_reference_blocks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `groups[].replication_source` for a remote copy.
#[derive(Clone, Debug, Serialize)]
pub struct ReceivingStatus {
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The last record received (and durable) here, with the source's seq numbering.
    pub last_received_seq: u64,
}

impl ReceivingState {
    pub fn status(&self, durable_seq: u64) -> ReceivingStatus {
        ReceivingStatus {
            connected: self.connected.load(Ordering::Relaxed),
            peer: self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            last_received_seq: durable_seq,
        }
    }
}

/// Replication threads of one appliance: the shippers of its local groups and the receiver
/// of its remote copies.
pub struct Replication {
    shippers: Vec<shipper::Shipper>,
    receiver: Option<receiver::Receiver>,
}

impl Replication {
    /// Starts a shipper per group with `[group.remote]` and, with `replication_listen`, the
    /// receiver for the remote copies among `groups`.
    pub fn start(
        config: &crate::config::ApplianceConfig,
        groups: &[std::sync::Arc<crate::group::Group>],
    ) -> Result<Replication, crate::error::ApplianceError> {
        // Every certificate and key is loaded before any thread starts, so a bad file stops
        // the appliance at start, named, rather than failing each connection later.
        let server_security = match &config.replication_tls {
            Some(files) if config.replication_listen.is_some() => Some(tls::load_server(files)?),
            _ => None,
        };
        let mut client_security = Vec::new();
        for g in groups {
            if let Some(shipping) = g.replication().shipping.as_ref() {
                let remote = &shipping.config;
                let security = match &remote.tls {
                    Some(files) => tls::ClientSecurity::Tls(tls::ClientTls::load(
                        &g.name,
                        &remote.endpoint,
                        files,
                    )?),
                    None => tls::ClientSecurity::Plaintext,
                };
                client_security.push((std::sync::Arc::clone(g), security));
            }
        }
        let deadline = std::time::Duration::from_millis(config.replication_deadline_ms);
        let receiver = match config.replication_listen {
            Some(listen) => Some(receiver::Receiver::start(
                listen,
                &config.data_dir,
                groups.to_vec(),
                server_security,
                deadline,
            )?),
            None => None,
        };
        let mut shippers = Vec::new();
        for (g, security) in client_security {
            shippers.push(shipper::Shipper::start(g, security, deadline)?);
        }
        Ok(Replication { shippers, receiver })
    }

    /// Stops shipping and receiving; blocks until the threads are gone.
    pub fn stop(self) {
        for s in self.shippers {
            s.stop();
        }
        if let Some(r) = self.receiver {
            r.stop();
        }
    }
}
