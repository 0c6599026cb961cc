//! Remote replication: a local group ships its journal to a remote appliance's group of the same name.
//!
//! `shipper.rs` runs at the local site (one thread per group with `[group.remote]`),
//! `receiver.rs` at the remote site (one listener, one thread per replication link). The
//! wire format is `cdp_link::replication`. This module holds the per-group state both sides
//! share with `cdp status`. `bandwidth.rs` is the shipper's bandwidth limit.
//!
//! Sync mode (`mode = "sync"`, and `dynamic` while `sync_active`) gates the split link's acks
//! on `ShippingState::shipped`, a watch every split-link connection of the group subscribes
//! to (`link_server.rs`).

pub mod bandwidth;
pub mod receiver;
pub mod shipper;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
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
    pub rpo_exceeded: AtomicBool,
    /// Batch bytes before and after compression, since start.
    pub raw_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
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
            rpo_exceeded: AtomicBool::new(false),
            raw_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
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

    /// Status as `cdp status --json` shows it under `groups[].remote`.
    pub fn status(&self, last_seq: u64) -> RemoteStatus {
        let shipped = self.shipped_seq.load(Ordering::Relaxed);
        let raw = self.raw_bytes.load(Ordering::Relaxed);
        let wire = self.wire_bytes.load(Ordering::Relaxed);
        RemoteStatus {
            endpoint: self.config.endpoint.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            shipped_seq: shipped,
            shipped_known: self.shipped_known.load(Ordering::Relaxed),
            lag_records: last_seq.saturating_sub(shipped),
            lag_seconds: self.lag_ns.load(Ordering::Relaxed) as f64 / 1e9,
            rpo_s: self.config.rpo_s,
            rpo_exceeded: self.rpo_exceeded.load(Ordering::Relaxed),
            compress_level: self.config.compress_level,
            mode: self.config.mode,
            sync_waiting: self.sync_waiting.load(Ordering::Relaxed),
            sync_active: self.is_sync_active(),
            bandwidth_bytes_per_s: self.config.bandwidth_bytes_per_s,
            wire_rate_bytes_per_s: self.wire_rate_bytes_per_s.load(Ordering::Relaxed),
            wire_raw_bytes: raw,
            wire_bytes: wire,
            wire_compression_ratio: if wire == 0 {
                1.0
            } else {
                raw as f64 / wire as f64
            },
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
    pub connected: bool,
    /// Every record up to here is durable at the remote.
    pub shipped_seq: u64,
    /// False until the remote answered once since this appliance started (`shipped_seq`
    /// is then 0 and the lag counts the whole journal).
    pub shipped_known: bool,
    pub lag_records: u64,
    /// Age of the oldest record the remote does not have yet; 0 when caught up.
    pub lag_seconds: f64,
    pub rpo_s: u64,
    pub rpo_exceeded: bool,
    pub compress_level: i32,
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
    /// Batch bytes shipped since start before compression, on the wire, and their ratio.
    pub wire_raw_bytes: u64,
    pub wire_bytes: u64,
    pub wire_compression_ratio: f64,
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
        let receiver = match config.replication_listen {
            Some(listen) => Some(receiver::Receiver::start(
                listen,
                &config.data_dir,
                groups.to_vec(),
            )?),
            None => None,
        };
        let mut shippers = Vec::new();
        for g in groups {
            if g.replication().shipping.is_some() {
                shippers.push(shipper::Shipper::start(std::sync::Arc::clone(g))?);
            }
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
