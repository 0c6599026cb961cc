//! The splitter's control socket: one JSON request per line in, one JSON response per line out.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::config::SplitVolumeConfig;
use crate::served_volumes::ServedVolumes;
use crate::split_link::{ResyncMethod, ResyncReason, SplitLink, VolumeState};

/// Control connections served at once.
const CONTROL_CONNECTIONS_MAX: usize = 16;

/// A request to the splitter.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Copy every region of a volume into the journal again; with `verify`, only the
    /// regions whose checksum differs from the replica's.
    Resync {
        volume: String,
        #[serde(default)]
        verify: bool,
    },
    /// Serve a new volume (an NBD export and its split link), now and after restarts. The
    /// appliance must know the volume already; answered once it welcomed it.
    VolumeAdd {
        name: String,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    /// Stop serving a volume, now and after restarts. Refused while hosts are attached
    /// unless `force`.
    VolumeRemove {
        name: String,
        #[serde(default)]
        force: bool,
    },
}

/// What the control socket reports on.
pub struct Control {
    /// The served volumes; their registry counts the hosts attached to each.
    pub volumes: Arc<ServedVolumes>,
    /// Where hosts reach the volumes (`unix:PATH`, `HOST:PORT`), so tools can find them.
    pub nbd_endpoints: Vec<String>,
}

pub async fn serve_control(listener: UnixListener, control: Arc<Control>) {
    cdp_link::control_socket::serve(
        listener,
        CONTROL_CONNECTIONS_MAX,
        move |request: Request| {
            let control = Arc::clone(&control);
            async move {
                match request {
                    Request::VolumeAdd {
                        name,
                        path,
                        read_only,
                    } => {
                        let config = SplitVolumeConfig {
                            name,
                            path,
                            read_only,
                            dirty_bitmap: None,
                        };
                        let served = control.volumes.add(config).await?;
                        Ok(serde_json::json!({
                            "added": served.config.name,
                            "state": control.volume_state(&served.link),
                        }))
                    }
                    Request::VolumeRemove { name, force } => {
                        control.volumes.remove(&name, force).await
                    }
                    request => answer(&control, request),
                }
            }
        },
    )
    .await
}

impl Control {
    fn volume_state(&self, link: &SplitLink) -> VolumeState {
        let mut state = link.state();
        state.nbd_clients = self.volumes.registry.clients(&state.name).unwrap_or(0);
        state
    }
}

fn answer(control: &Control, request: Request) -> Result<serde_json::Value, String> {
    let value = match request {
        Request::Status => {
            let volumes: Vec<VolumeState> = control
                .volumes
                .list()
                .iter()
                .map(|v| control.volume_state(&v.link))
                .collect();
            serde_json::json!({ "volumes": volumes, "nbd": control.nbd_endpoints })
        }
        Request::Resync { volume, verify } => {
            let served = control.volumes.get(&volume).ok_or_else(|| {
                format!(
                    "no volume {volume:?} on this splitter (it serves: {})",
                    control.volumes.names()
                )
            })?;
            let link = &served.link;
            let method = if verify {
                ResyncMethod::Verify
            } else {
                ResyncMethod::Copy
            };
            link.request_resync(ResyncReason::Full, method);
            tracing::info!(volume = %volume, ?method, "full resync requested");
            serde_json::json!({ "volume": volume, "state": control.volume_state(link) })
        }
        Request::VolumeAdd { .. } | Request::VolumeRemove { .. } => {
            return Err("volume changes are answered by serve_control".into())
        }
    };
    Ok(value)
}
