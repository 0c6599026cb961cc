//! The splitter's control socket: one JSON request per line in, one JSON response per line out.

use std::sync::Arc;

use cdp_control::{SplitterResyncing, SplitterStatus, SplitterVolumeAdded};
use cdp_link::control_socket::ControlError;
use tokio::net::UnixListener;

use crate::config::SplitVolumeConfig;
use crate::served_volumes::ServedVolumes;
use crate::split_link::{ResyncMethod, ResyncReason, SplitLink, VolumeState};

/// Control connections served at once.
const CONTROL_CONNECTIONS_MAX: usize = 16;

/// The requests this socket answers, and the answers, are the control protocol's.
pub use cdp_control::SplitterRequest as Request;

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
                        to_json(&SplitterVolumeAdded {
                            added: served.config.name.clone(),
                            state: control.volume_state(&served.link),
                        })
                    }
                    Request::VolumeRemove { name, force } => {
                        to_json(&control.volumes.remove(&name, force).await?)
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
        state.nbd_clients = Some(self.volumes.registry.clients(&state.name).unwrap_or(0));
        state
    }
}

fn answer(control: &Control, request: Request) -> Result<serde_json::Value, ControlError> {
    let value = match request {
        Request::Status => {
            let volumes: Vec<VolumeState> = control
                .volumes
                .list()
                .iter()
                .map(|v| control.volume_state(&v.link))
                .collect();
            to_json(&SplitterStatus {
                volumes,
                nbd: control.nbd_endpoints.clone(),
            })?
        }
        Request::Resync { volume, verify } => {
            let served = control.volumes.get(&volume).ok_or_else(|| {
                ControlError::not_found(format!(
                    "no volume {volume:?} on this splitter (it serves: {})",
                    control.volumes.names()
                ))
            })?;
            let link = &served.link;
            let method = if verify {
                ResyncMethod::Verify
            } else {
                ResyncMethod::Copy
            };
            link.request_resync(ResyncReason::Full, method);
            tracing::info!(volume = %volume, %method, "full resync requested");
            let state = control.volume_state(link);
            to_json(&SplitterResyncing { volume, state })?
        }
        Request::VolumeAdd { .. } | Request::VolumeRemove { .. } => {
            return Err(ControlError::from(
                "volume changes are answered by serve_control",
            ))
        }
    };
    Ok(value)
}

fn to_json(answer: &impl serde::Serialize) -> Result<serde_json::Value, ControlError> {
    serde_json::to_value(answer)
        .map_err(|e| ControlError::from(format!("encoding the answer: {e}")))
}
