//! The write splitter: serves production volumes over NBD and mirrors every change to the appliance.

pub mod config;
pub mod control;
pub mod dirty_bitmap;
pub mod error;
pub mod events;
pub mod limits;
pub mod metered_export;
pub mod metrics;
pub mod served_volumes;
pub mod split_export;
pub mod split_link;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cdp_nbd::{ExportRegistry, Server, ServerConfig};
use tokio::sync::watch;

use config::ManagedVolumes;
pub use config::{SplitVolumeConfig, SplitterConfig};
pub use error::SplitterError;
use served_volumes::ServedVolumes;

/// How long a clean stop waits for the appliance to make the last changes durable.
const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the splitter until `shutdown` completes.
pub async fn run(
    config: SplitterConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SplitterError> {
    run_with_ready(config, shutdown, || {}).await
}

/// `run`, calling `ready` once every volume is connected and every NBD listener and the
/// control socket are served: the moment hosts may attach.
pub async fn run_with_ready(
    config: SplitterConfig,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce() + Send,
) -> Result<(), SplitterError> {
    let managed_path = config.managed_volumes_path();
    let managed = match &managed_path {
        Some(path) => ManagedVolumes::load(path)?,
        None => ManagedVolumes::default(),
    };
    let volume_configs = managed.apply(&config.volume)?;
    let served = Arc::new(ServedVolumes::new(
        ExportRegistry::new(),
        config.appliance.clone(),
        config.on_appliance_loss,
        config.link_window_bytes,
        Duration::from_millis(config.link_deadline_ms),
        managed_path,
        managed,
    ));
    for v in &volume_configs {
        served.start(v)?;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    for volume in served.list() {
        let (name, link) = (&volume.config.name, &volume.link);
        if !link.is_connected() {
            tracing::info!(volume = %name, appliance = %config.appliance, "waiting for the appliance");
        }
        tokio::select! {
            ready = link.wait_ready() => ready?,
            () = &mut shutdown => return Ok(()),
        }
    }

    let server = Arc::new(Server::new(
        served.registry.clone(),
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
        cdp_link::socket_access::restrict_control_socket(
            path,
            config.control_socket_group.as_deref(),
        )?;
        let control = control::Control {
            volumes: Arc::clone(&served),
            nbd_endpoints,
        };
        tasks.spawn(async move {
            control::serve_control(listener, Arc::new(control)).await;
            Ok(())
        });
    }
    // --- metrics and the event log: one sampler a second feeds both.
    if let Some(listen) = config.metrics_listen.filter(|l| !l.ip().is_loopback()) {
        tracing::warn!(metrics = %listen, "metrics served off loopback, without authentication");
    }
    let site = config
        .site
        .clone()
        .unwrap_or_else(cdp_metrics::default_site);
    let event_log = match config.events_log_path() {
        Some(path) => Some(Arc::new(
            cdp_metrics::event_log::EventLog::open(
                &path,
                "splitter",
                &site,
                config.events_log_bytes_max,
                cdp_metrics::alert::Alerts::start(&config.alert),
            )
            .map_err(|e| SplitterError::Config(format!("event log {}: {e}", path.display())))?,
        )),
        None => None,
    };
    if let Some(log) = &event_log {
        log.record(
            "started",
            Default::default(),
            format!("splitter {} started", env!("CARGO_PKG_VERSION")),
        );
    }
    let mut detector = event_log.clone().map(events::Detector::new);
    let _metrics = AbortOnDrop(
        metrics::start(config.metrics_listen, site, Arc::clone(&served), move |s| {
            if let Some(d) = &mut detector {
                d.observe(s);
            }
        })
        .await
        .map_err(|e| SplitterError::Config(format!("metrics_listen: {e}")))?,
    );
    tracing::info!(volumes = served.list().len(), "splitter ready");
    ready();

    tokio::select! {
        () = &mut shutdown => {}
        Some(done) = tasks.join_next() => {
            if let Ok(Err(e)) = done {
                tracing::error!("NBD listener failed: {e}");
            }
        }
    }
    let _ = stop_tx.send(true);
    for volume in served.list() {
        let (name, production, link) = (&volume.config.name, &volume.production, &volume.link);
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
    if let Some(log) = &event_log {
        log.record("stopped", Default::default(), "splitter stopped cleanly");
    }
    tracing::info!("splitter stopped");
    Ok(())
}

/// Stops a background task when the splitter's run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
