//! The appliance: journals split changes in write order and distributes them to the replicas.

pub mod archiver;
pub mod bookmark;
pub mod config;
pub mod connection_progress;
pub mod consolidation;
pub mod control;
pub mod distribution_state;
pub mod error;
pub mod events;
pub mod failover;
pub mod group;
pub mod group_meta;
pub mod group_registry;
pub mod history;
pub mod image;
pub mod limits;
pub mod link_server;
pub mod managed_groups;
pub mod metrics;
pub mod point;
pub mod record_cache;
pub mod replica_verify;
pub mod replication;
pub mod resync_span;
pub mod role;

pub mod state_file;
pub mod timeline;
pub mod volume_link;
pub mod watermark;
pub mod web;

use std::future::Future;
use std::sync::Arc;

use cdp_link::codec::{bind_unix, LinkListener};
use cdp_types::Endpoint;
use image::Images;
use tokio::sync::Semaphore;

pub use config::ApplianceConfig;
pub use error::ApplianceError;
use group_registry::Groups;
use limits::LINK_CONNECTIONS_MAX;

/// Runs the appliance until `shutdown` completes.
pub async fn run(
    config: ApplianceConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApplianceError> {
    run_with_ready(config, shutdown, || {}).await
}

/// `run`, calling `ready` once every listener (split link, control, images) is bound and
/// served: the moment a service manager may start what depends on the appliance.
pub async fn run_with_ready(
    config: ApplianceConfig,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce() + Send,
) -> Result<(), ApplianceError> {
    std::fs::create_dir_all(&config.data_dir)?;
    // appliance.toml's groups with the ones created and changed at runtime (managed.toml).
    let groups = Arc::new(Groups::open(&config)?);
    // The event log first: replication records its refusals in it.
    let site = config
        .site
        .clone()
        .unwrap_or_else(cdp_metrics::default_site);
    let events_path = config.events_log_path();
    let event_log = Arc::new(
        cdp_metrics::event_log::EventLog::open(
            &events_path,
            "appliance",
            &site,
            config.events_log_bytes_max,
            cdp_metrics::alert::Alerts::start(&config.alert),
        )
        .map_err(|e| {
            ApplianceError::Io(std::io::Error::new(
                e.kind(),
                format!("event log {}: {e}", events_path.display()),
            ))
        })?,
    );
    event_log.record(
        "started",
        Default::default(),
        format!("appliance {} started", env!("CARGO_PKG_VERSION")),
    );
    // --- remote replication: groups opened at start only; runtime-created ones do not ship yet.
    let replication =
        replication::Replication::start(&config, &groups.list(), Arc::clone(&event_log))?;

    // --- archive: one thread per group with [group.archive], opened at start only.
    let archivers = archiver::Archivers::start(&groups.list())?;
    let control_path = config.control_path();
    let control = bind_unix(&control_path)?;
    cdp_link::socket_access::restrict_control_socket(
        &control_path,
        config.control_socket_group.as_deref(),
    )?;
    let link = LinkListener::bind(&config.link_listen).await?;
    tracing::info!(link = %config.link_listen, control = %control_path.display(), "appliance ready");

    // Images are served by our own NBD server, beside (never instead of) protection.
    let image_exports = cdp_nbd::ExportRegistry::new();
    let image_endpoint = config.image_nbd();
    let image_server = Arc::new(cdp_nbd::Server::new(
        image_exports.clone(),
        cdp_nbd::ServerConfig::default(),
    ));
    let (image_stop_tx, image_stop_rx) = tokio::sync::watch::channel(false);
    let mut image_stop = image_stop_rx.clone();
    let image_stopped = async move {
        let _ = image_stop.wait_for(|s| *s).await;
    };
    let image_task = match &image_endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            let server = Arc::clone(&image_server);
            tokio::spawn(async move { server.serve_unix(listener, image_stopped).await })
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let server = Arc::clone(&image_server);
            tokio::spawn(async move { server.serve_tcp(listener, image_stopped).await })
        }
    };
    let images = Arc::new(Images::new(
        image_exports,
        image_endpoint.to_string(),
        config.data_dir.join("scratch"),
    ));
    tracing::info!(images = %image_endpoint, "image exports served");

    let control_task = tokio::spawn(control::serve_control(
        control,
        Arc::clone(&groups),
        Arc::clone(&images),
    ));
    // --- metrics and the event log: one sampler a second feeds both.
    if let Some(listen) = config.metrics_listen.filter(|l| !l.ip().is_loopback()) {
        tracing::warn!(metrics = %listen, "metrics served off loopback, without authentication");
    }
    let mut detector = events::Detector::new(Arc::clone(&event_log));
    let sampler = metrics::Sampler::new(Arc::clone(&groups), Arc::clone(&images));
    let _metrics = AbortOnDrop(
        metrics::start(config.metrics_listen, site, sampler, move |s| {
            detector.observe(s)
        })
        .await
        .map_err(|e| ApplianceError::Config(format!("metrics_listen: {e}")))?,
    );
    // --- the web timeline: off unless web_listen is set (loopback only, see config).
    let _web = match config.web_listen {
        Some(listen) => Some(AbortOnDrop(
            web::start(
                listen,
                web::WebSettings {
                    admin: config.web_admin,
                    token: config.web_token.clone(),
                },
                Arc::clone(&groups),
                Arc::clone(&images),
            )
            .await
            .map_err(|e| ApplianceError::Config(format!("web_listen {listen}: {e}")))?,
        )),
        None => None,
    };
    let link_deadline = std::time::Duration::from_millis(config.link_deadline_ms);
    let mut links = tokio::task::JoinSet::new();
    let limit = Arc::new(Semaphore::new(LINK_CONNECTIONS_MAX));
    ready();
    tokio::pin!(shutdown);
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        tokio::select! {
            () = &mut shutdown => break,
            accepted = link.accept() => match accepted {
                Ok(stream) => {
                    let groups = Arc::clone(&groups);
                    links.spawn(async move {
                        link_server::serve_link(groups, stream, link_deadline).await;
                        drop(permit);
                    });
                }
                Err(e) => tracing::warn!("split link accept failed: {e}"),
            },
            Some(_) = links.join_next(), if !links.is_empty() => {}
        }
    }
    tracing::info!("appliance stopping");
    links.shutdown().await;
    control_task.abort();
    images.release_all();
    let _ = image_stop_tx.send(true);
    let _ = image_task.await;
    if let Endpoint::Unix(path) = &image_endpoint {
        let _ = std::fs::remove_file(path);
    }
    // --- remote replication: stop before the groups, so no append races their stop.
    tokio::task::spawn_blocking(move || replication.stop())
        .await
        .map_err(|e| ApplianceError::Io(std::io::Error::other(e.to_string())))?;
    tokio::task::spawn_blocking(move || archivers.stop())
        .await
        .map_err(|e| ApplianceError::Io(std::io::Error::other(e.to_string())))?;
    let groups_to_stop = Arc::clone(&groups);
    tokio::task::spawn_blocking(move || groups_to_stop.stop_all())
        .await
        .map_err(|e| ApplianceError::Io(std::io::Error::other(e.to_string())))?;
    if let config::ApplianceConfig {
        link_listen: cdp_types::Endpoint::Unix(path),
        ..
    } = &config
    {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(&control_path);
    event_log.record("stopped", Default::default(), "appliance stopped cleanly");
    tracing::info!("appliance stopped");
    Ok(())
}

/// Stops a background task when the appliance's run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
