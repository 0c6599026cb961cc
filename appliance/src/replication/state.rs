//! The per-group replication state both sides share with the group and `cdp status`: the
//! role, the shipper's progress and settings, the receiver's link. It imports nothing of the
//! group, so the group holds it without importing the replication threads that use the
//! group (`shipper.rs`, `receiver.rs`, `region_resync.rs`).

pub use cdp_control::{ReceivingStatus, RegionResyncReport, RemoteStatus};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

use crate::config::{GroupConfig, GroupSource, RemoteConfig, ReplicationMode};

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
    pub lag_window: Mutex<super::lag_window::LagWindow>,
    pub rpo_exceeded: AtomicBool,
    /// Journal bytes not yet durable at the remote, updated with `lag_ns`.
    pub lag_bytes: AtomicU64,
    /// The last resynchronisation by regions, if one ran since start.
    pub last_region_resync: Mutex<Option<RegionResyncReport>>,
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
    /// Wire bytes per second over the last few seconds (`super::bandwidth::RateMeter`).
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
            lag_window: Mutex::new(super::lag_window::LagWindow::new(std::time::Instant::now())),
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

    /// The link came up or went down: wakes whoever waits on the RPO regulation (it applies
    /// only while the link is up).
    pub fn set_connected(&self, connected: bool) {
        if self.connected.swap(connected, Ordering::Relaxed) != connected {
            self.shipped.send_modify(|_| ());
        }
    }

    /// The last RPO measurement: over target or not. Returns the previous state; a change
    /// wakes split links holding host writes for `throttle_on_rpo`.
    pub fn set_rpo_exceeded(&self, exceeded: bool) -> bool {
        let was = self.rpo_exceeded.swap(exceeded, Ordering::Relaxed);
        if was != exceeded {
            self.shipped.send_modify(|_| ());
        }
        was
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
    /// A link is up; a newer link waits on it to take over (`receiver.rs`).
    pub connected: crate::watermark::Watermark<bool>,
    /// The source's address of the current (or last) link.
    pub peer: Mutex<Option<String>>,
    /// The current link's socket, so a newer link from the same source can close it.
    pub link: Mutex<Option<std::net::TcpStream>>,
}

impl ReceivingState {
    pub fn status(&self, durable_seq: u64) -> ReceivingStatus {
        ReceivingStatus {
            connected: self.connected.get(),
            peer: self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            last_received_seq: durable_seq,
        }
    }
}
