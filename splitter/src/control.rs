//! The splitter's control socket: one JSON request per line in, one JSON response per line out.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::split_link::{ResyncReason, SplitLink, VolumeState};

/// Control connections served at once.
const CONTROL_CONNECTIONS_MAX: usize = 16;

/// A request to the splitter.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Copy every region of a volume into the journal again.
    Resync {
        volume: String,
    },
}

pub async fn serve_control(listener: UnixListener, links: Arc<BTreeMap<String, Arc<SplitLink>>>) {
    cdp_link::control_socket::serve(
        listener,
        CONTROL_CONNECTIONS_MAX,
        move |request: Request| {
            let links = Arc::clone(&links);
            async move { answer(&links, request) }
        },
    )
    .await
}

fn answer(
    links: &BTreeMap<String, Arc<SplitLink>>,
    request: Request,
) -> Result<serde_json::Value, String> {
    let value = match request {
        Request::Status => {
            let volumes: Vec<VolumeState> = links.values().map(|l| l.state()).collect();
            serde_json::json!({ "volumes": volumes })
        }
        Request::Resync { volume } => {
            let link = links.get(&volume).ok_or_else(|| {
                format!(
                    "no volume {volume:?} on this splitter (it serves: {})",
                    links.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            link.request_full_resync(ResyncReason::Full);
            tracing::info!(volume = %volume, "full resync requested");
            serde_json::json!({ "volume": volume, "state": link.state() })
        }
    };
    Ok(value)
}
