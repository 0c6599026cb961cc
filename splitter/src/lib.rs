//! The write splitter: serves production volumes over NBD and mirrors every change to the appliance.

pub mod config;
pub mod control;
pub mod dirty_bitmap;
pub mod error;
pub mod limits;
pub mod split_export;
pub mod split_link;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cdp_nbd::{ExportRegistry, Server, ServerConfig};
use cdp_types::BlockFile;
use tokio::sync::watch;

pub use config::{SplitVolumeConfig, SplitterConfig};
pub use error::SplitterError;
use split_export::SplitExport;
use split_link::SplitLink;

/// How long a clean stop waits for the appliance to make the last changes durable.
const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the splitter until `shutdown` completes.
pub async fn run(
    config: SplitterConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SplitterError> {
    let registry = ExportRegistry::new();
    let mut volumes = Vec::new();
    for v in &config.volume {
        let production =
            Arc::new(
                BlockFile::open(&v.path, v.read_only).map_err(|e| SplitterError::Volume {
                    volume: v.name.clone(),
                    what: e.to_string(),
                })?,
            );
        if production.size() == 0 {
            return Err(SplitterError::Volume {
                volume: v.name.clone(),
                what: format!("{} is empty (0 bytes)", v.path.display()),
            });
        }
        let bitmap_path = v.dirty_bitmap_path()?;
        let (bitmap, opened) = dirty_bitmap::DirtyBitmap::open(&bitmap_path, production.size())
            .map_err(|e| SplitterError::Volume {
                volume: v.name.clone(),
                what: e.to_string(),
            })?;
        if let dirty_bitmap::Opened::Existing { dirty_regions } = &opened {
            let dirty_regions = *dirty_regions;
            if dirty_regions > 0 {
                tracing::warn!(
                    volume = %v.name,
                    dirty_regions,
                    dirty_bytes = dirty_regions * bitmap.region_bytes(),
                    "volume was not cleanly in sync at the last stop; these regions will be resynchronised"
                );
            }
        }
        let link = SplitLink::start(
            &v.name,
            Arc::clone(&production),
            config.appliance.clone(),
            bitmap,
            config.on_appliance_loss,
        );
        if opened == dirty_bitmap::Opened::Created {
            // Never protected by this splitter: the replica cannot be assumed to match, so
            // everything is copied once (holes and zeroes cost no payload).
            link.request_full_resync(split_link::ResyncReason::Initial);
        }
        let export = SplitExport::new(Arc::clone(&production), Arc::clone(&link), v.read_only);
        registry
            .add(
                &v.name,
                &format!("cdp protected volume {}", v.name),
                Arc::new(export),
            )
            .map_err(|e| SplitterError::Nbd(e.to_string()))?;
        volumes.push((v.name.clone(), production, link));
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    for (name, _, link) in &volumes {
        if !link.is_connected() {
            tracing::info!(volume = %name, appliance = %config.appliance, "waiting for the appliance");
        }
        tokio::select! {
            ready = link.wait_ready() => ready.map_err(|reason| SplitterError::Refused {
                volume: name.clone(),
                reason,
            })?,
            () = &mut shutdown => return Ok(()),
        }
    }

    let server = Arc::new(Server::new(
        registry,
        ServerConfig {
            handshake_timeout: Duration::from_secs(config.handshake_timeout_s),
            ..ServerConfig::default()
        },
    ));
    let mut tasks = tokio::task::JoinSet::new();
    let mut nbd_endpoints = Vec::new();
    if let Some(path) = &config.nbd_unix {
        let listener = cdp_link::codec::bind_unix(path)?;
        tracing::info!("NBD listening on unix:{}", path.display());
        nbd_endpoints.push(format!("unix:{}", path.display()));
        let server = Arc::clone(&server);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { server.serve_unix(listener, stop).await });
    }
    if let Some(addr) = &config.nbd_tcp {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!("NBD listening on {local}");
        // The bound address, not the configured one: port 0 picks a free port.
        nbd_endpoints.push(local.to_string());
        let server = Arc::clone(&server);
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { server.serve_tcp(listener, stop).await });
    }
    if let Some(path) = &config.control {
        let listener = cdp_link::codec::bind_unix(path)?;
        let control = control::Control {
            links: volumes
                .iter()
                .map(|(name, _, link)| (name.clone(), Arc::clone(link)))
                .collect(),
            registry: server.registry().clone(),
            nbd_endpoints,
        };
        tasks.spawn(async move {
            control::serve_control(listener, Arc::new(control)).await;
            Ok(())
        });
    }
    tracing::info!(volumes = volumes.len(), "splitter ready");

    tokio::select! {
        () = &mut shutdown => {}
        Some(done) = tasks.join_next() => {
            if let Ok(Err(e)) = done {
                tracing::error!("NBD listener failed: {e}");
            }
        }
    }
    let _ = stop_tx.send(true);
    for (name, production, link) in &volumes {
        let last = link.last_seq();
        if let Err(e) = production.sync_data() {
            tracing::error!(volume = %name, "final production sync failed: {e}");
        }
        if tokio::time::timeout(STOP_FLUSH_TIMEOUT, link.wait_durable(last))
            .await
            .is_err()
        {
            tracing::warn!(volume = %name, last, "appliance did not confirm the last changes before stop");
        }
        if let Err(e) = link.sync_bitmap() {
            tracing::error!(volume = %name, "dirty bitmap sync failed: {e}");
        }
    }
    tasks.shutdown().await;
    tracing::info!("splitter stopped");
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
