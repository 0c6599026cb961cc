//! The splitter's control socket: one JSON request per line in, one JSON response per line out.

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_nbd::ExportRegistry;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

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
}

/// What the control socket reports on.
pub struct Control {
    pub links: BTreeMap<String, Arc<SplitLink>>,
    /// The NBD server's exports, for the number of hosts attached to each volume.
    pub registry: ExportRegistry,
    /// Where hosts reach the volumes (`unix:PATH`, `HOST:PORT`), so tools can find them.
    pub nbd_endpoints: Vec<String>,
}

pub async fn serve_control(listener: UnixListener, control: Arc<Control>) {
    cdp_link::control_socket::serve(
        listener,
        CONTROL_CONNECTIONS_MAX,
        move |request: Request| {
            let control = Arc::clone(&control);
            async move { answer(&control, request) }
        },
    )
    .await
}

impl Control {
    fn volume_state(&self, link: &SplitLink) -> VolumeState {
        let mut state = link.state();
        state.nbd_clients = self.registry.clients(&state.name).unwrap_or(0);
        state
    }
}

fn answer(control: &Control, request: Request) -> Result<serde_json::Value, String> {
    let links = &control.links;
    let value = match request {
        Request::Status => {
            let volumes: Vec<VolumeState> =
                links.values().map(|l| control.volume_state(l)).collect();
            serde_json::json!({ "volumes": volumes, "nbd": control.nbd_endpoints })
        }
        Request::Resync { volume, verify } => {
            let link = links.get(&volume).ok_or_else(|| {
                format!(
                    "no volume {volume:?} on this splitter (it serves: {})",
                    links.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            let method = if verify {
                ResyncMethod::Verify
            } else {
                ResyncMethod::Copy
            };
            link.request_resync(ResyncReason::Full, method);
            tracing::info!(volume = %volume, ?method, "full resync requested");
            serde_json::json!({ "volume": volume, "state": control.volume_state(link) })
        }
    };
    Ok(value)
}
