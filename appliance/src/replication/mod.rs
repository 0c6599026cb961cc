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

pub mod state;

pub use state::{GroupReplication, ReceivingState, ReceivingStatus, RemoteStatus, ShippingState};

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
        events: std::sync::Arc<cdp_metrics::event_log::EventLog>,
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
                events,
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
