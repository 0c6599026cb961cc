//! Remote replication: a local group ships its journal to a remote appliance's group of the same name.
//!
//! `shipper.rs` runs at the local site (one thread per group with `[group.remote]`),
//! `receiver.rs` at the remote site (one listener, one thread per replication link). The
//! wire format is `cdp_link::replication`. This module holds the per-group state both sides
//! share with `cdp status`.

pub mod receiver;
pub mod shipper;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::{GroupConfig, GroupSource, RemoteConfig};

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
}

impl ShippingState {
    fn new(config: RemoteConfig) -> ShippingState {
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
