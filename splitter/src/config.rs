//! The splitter's TOML configuration.

use std::path::{Path, PathBuf};

use cdp_types::{validate_name, Endpoint};
use serde::{Deserialize, Serialize};

use crate::error::SplitterError;

/// Default NBD handshake limit: generous, because a guest VM may open its end of the socket
/// many seconds after connecting.
pub const HANDSHAKE_TIMEOUT_S_DEFAULT: u64 = 60;

/// `splitter.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitterConfig {
    /// Where the appliance accepts split links: `unix:PATH` or `HOST:PORT`.
    pub appliance: Endpoint,
    /// Log lines as readable `text` (default) or `json`, one object per line.
    #[serde(default)]
    pub log_format: cdp_types::LogFormat,
    /// NBD over a unix socket at this path. Optional.
    #[serde(default)]
    pub nbd_unix: Option<PathBuf>,
    /// NBD over TCP, for example `127.0.0.1:10809`. Optional; at least one listener is required.
    #[serde(default)]
    pub nbd_tcp: Option<String>,
    /// Unix socket for `cdp status` and `cdp volume resync`. Optional.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Also let this group (name or gid) use the control socket: it becomes 0660 and
    /// group-owned. Default: owner only (0600).
    #[serde(default)]
    pub control_socket_group: Option<String>,
    /// Seconds a client may take to finish the NBD handshake. Default 60, minimum 1.
    #[serde(default = "handshake_timeout_default")]
    pub handshake_timeout_s: u64,
    /// What happens to host writes while the appliance is unreachable: `mark` (default)
    /// keeps serving them and records the changed regions in the dirty bitmap for a resync;
    /// `block` holds them until the appliance is back.
    #[serde(default)]
    pub on_appliance_loss: OnApplianceLoss,
    /// Bytes of host changes per volume sent to the appliance but not yet acknowledged by
    /// it (the splitter's memory for them). Host writes wait when it is full: this is how
    /// far the host can run ahead while the appliance holds its acknowledgements (journal
    /// full with `throttle`, remote RPO with `throttle_on_rpo`, sync replication). Default
    /// and maximum 256 MiB, minimum 8 MiB.
    #[serde(default = "link_window_bytes_default")]
    pub link_window_bytes: usize,
    /// Milliseconds the split link may pass no bytes at all from the appliance (heartbeats
    /// included, sent every quarter of this) before the splitter drops the connection and
    /// goes to marking (`mark`) or holds host writes (`block`); also bounds a connect and
    /// the wait for the appliance's Welcome. Default 5000, 200..=600000.
    #[serde(default = "link_deadline_ms_default")]
    pub link_deadline_ms: u64,
    /// Where volumes added or removed at runtime (`cdp volume add/remove`) are kept, so a
    /// restart serves the same volumes. Default: `managed-volumes.toml` beside the control
    /// socket; without either, volumes cannot be managed at runtime.
    #[serde(default)]
    pub managed_volumes: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://ADDR/metrics`, for example `127.0.0.1:9722`.
    /// Default: none (off; `cdp up` turns it on on loopback). An address off loopback is
    /// served with a warning: the metrics name volumes and carry no authentication.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The `site` label of every metric and event. Default: the host's name.
    #[serde(default)]
    pub site: Option<String>,
    /// The event log (`cdp events`): state changes as JSON lines. Default
    /// `splitter-events.jsonl` beside the control socket; without either, no event log.
    #[serde(default)]
    pub events_log: Option<PathBuf>,
    /// Bytes the event log may take before its older half is dropped (it keeps up to about
    /// twice this). Default 4 MiB, minimum 64 KiB.
    #[serde(default = "events_log_bytes_default")]
    pub events_log_bytes_max: u64,
    /// One NBD export per protected volume.
    #[serde(default)]
    pub volume: Vec<SplitVolumeConfig>,
    /// Alert targets: each `[[alert]]` names event classes and a command or webhook.
    #[serde(default)]
    pub alert: Vec<cdp_metrics::alert::AlertConfig>,
}

fn events_log_bytes_default() -> u64 {
    cdp_metrics::event_log::EVENTS_LOG_BYTES_DEFAULT
}

/// The policy for host writes while the split link is down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnApplianceLoss {
    #[default]
    Mark,
    Block,
}

fn link_window_bytes_default() -> usize {
    crate::limits::UNACKED_BYTES_MAX
}

fn link_deadline_ms_default() -> u64 {
    cdp_link::limits::LINK_DEADLINE_MS_DEFAULT
}

fn handshake_timeout_default() -> u64 {
    HANDSHAKE_TIMEOUT_S_DEFAULT
}

/// One protected volume served by this splitter.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitVolumeConfig {
    /// Volume name; also the NBD export name and the name the appliance knows it by.
    pub name: String,
    /// The production volume: an existing regular file or block device.
    pub path: PathBuf,
    /// Serve the export read-only (writes are answered with EPERM). Default false.
    #[serde(default)]
    pub read_only: bool,
    /// The persistent dirty bitmap. Default: `PATH.cdp-dirty` beside a regular-file volume;
    /// required for a block device.
    #[serde(default)]
    pub dirty_bitmap: Option<PathBuf>,
}

impl SplitVolumeConfig {
    /// Where this volume's dirty bitmap lives.
    pub fn dirty_bitmap_path(&self) -> Result<PathBuf, SplitterError> {
        if let Some(path) = &self.dirty_bitmap {
            return Ok(path.clone());
        }
        let is_file = std::fs::metadata(&self.path)
            .map(|m| m.is_file())
            .unwrap_or(false);
        if !is_file {
            return Err(SplitterError::Config(format!(
                "volume {:?}: {} is not a regular file; set dirty_bitmap = \"PATH\" for it",
                self.name,
                self.path.display()
            )));
        }
        let mut name = self.path.clone().into_os_string();
        name.push(".cdp-dirty");
        Ok(PathBuf::from(name))
    }
}

/// Volumes changed at runtime, stored in the `managed_volumes` file and applied over
/// `splitter.toml` at start: removals first, then additions.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedVolumes {
    /// Names of `splitter.toml` volumes removed at runtime.
    #[serde(default)]
    pub volume_removed: Vec<String>,
    /// Volumes added at runtime.
    #[serde(default)]
    pub volume: Vec<SplitVolumeConfig>,
}

impl ManagedVolumes {
    /// Reads the file; a missing file means nothing was changed at runtime.
    pub fn load(path: &Path) -> Result<ManagedVolumes, SplitterError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| SplitterError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ManagedVolumes::default()),
            Err(e) => Err(SplitterError::Config(format!("{}: {e}", path.display()))),
        }
    }

    /// Replaces the file atomically (temporary file, fsync, rename, directory fsync), so a
    /// crash leaves the old or the new list.
    pub fn store(&self, path: &Path) -> Result<(), SplitterError> {
        let text = toml::to_string(self)
            .map_err(|e| SplitterError::Config(format!("encoding {}: {e}", path.display())))?;
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            SplitterError::Io(std::io::Error::new(
                e.kind(),
                format!("writing {}: {e}", path.display()),
            ))
        })
    }

    /// The volumes to serve: `splitter.toml`'s without the removed ones, then the added ones.
    pub fn apply(
        &self,
        configured: &[SplitVolumeConfig],
    ) -> Result<Vec<SplitVolumeConfig>, SplitterError> {
        let mut volumes: Vec<SplitVolumeConfig> = configured
            .iter()
            .filter(|v| !self.volume_removed.contains(&v.name))
            .cloned()
            .collect();
        for v in &self.volume {
            validate_name(&v.name).map_err(|e| SplitterError::Config(e.to_string()))?;
            if volumes.iter().any(|c| c.name == v.name) {
                return Err(SplitterError::Config(format!(
                    "volume {:?} is both in splitter.toml and added at runtime; remove one",
                    v.name
                )));
            }
            volumes.push(v.clone());
        }
        Ok(volumes)
    }
}

impl SplitterConfig {
    /// The event log's file, if any.
    pub fn events_log_path(&self) -> Option<PathBuf> {
        self.events_log.clone().or_else(|| {
            let control = self.control.as_ref()?;
            Some(control.with_file_name("splitter-events.jsonl"))
        })
    }

    /// The file runtime volume changes are kept in, if any.
    pub fn managed_volumes_path(&self) -> Option<PathBuf> {
        self.managed_volumes.clone().or_else(|| {
            let control = self.control.as_ref()?;
            Some(control.with_file_name("managed-volumes.toml"))
        })
    }

    pub fn from_toml(text: &str) -> Result<SplitterConfig, SplitterError> {
        let config: SplitterConfig =
            toml::from_str(text).map_err(|e| SplitterError::Config(e.to_string()))?;
        config.sanitize()
    }

    /// Rejects contradictions; clamps soft mistakes with a warning.
    pub fn sanitize(mut self) -> Result<SplitterConfig, SplitterError> {
        self.alert = std::mem::take(&mut self.alert)
            .into_iter()
            .map(|a| {
                a.sanitize()
                    .map_err(|e| SplitterError::Config(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let window = self.link_window_bytes.clamp(
            crate::limits::UNACKED_BYTES_MIN,
            crate::limits::UNACKED_BYTES_MAX,
        );
        if window != self.link_window_bytes {
            tracing::warn!(
                "link_window_bytes = {} is outside {}..={}; using {window}",
                self.link_window_bytes,
                crate::limits::UNACKED_BYTES_MIN,
                crate::limits::UNACKED_BYTES_MAX
            );
            self.link_window_bytes = window;
        }
        let deadline = self.link_deadline_ms.clamp(
            cdp_link::limits::LINK_DEADLINE_MS_MIN,
            cdp_link::limits::LINK_DEADLINE_MS_MAX,
        );
        if deadline != self.link_deadline_ms {
            tracing::warn!(
                "link_deadline_ms = {} is outside {}..={}; using {deadline}",
                self.link_deadline_ms,
                cdp_link::limits::LINK_DEADLINE_MS_MIN,
                cdp_link::limits::LINK_DEADLINE_MS_MAX
            );
            self.link_deadline_ms = deadline;
        }
        if self.nbd_unix.is_none() && self.nbd_tcp.is_none() {
            return Err(SplitterError::Config(
                "no NBD listener: set nbd_unix and/or nbd_tcp".into(),
            ));
        }
        if self.volume.is_empty() && self.managed_volumes_path().is_none() {
            return Err(SplitterError::Config(
                "no [[volume]] configured and no control socket to add one: nothing to serve"
                    .into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volume {
            validate_name(&v.name).map_err(|e| SplitterError::Config(e.to_string()))?;
            if !seen.insert(v.name.clone()) {
                return Err(SplitterError::Config(format!(
                    "volume {:?} is configured twice",
                    v.name
                )));
            }
        }
        if self.handshake_timeout_s == 0 {
            tracing::warn!("handshake_timeout_s = 0 is unusable; using 1");
            self.handshake_timeout_s = 1;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_contradictions() {
        let ok = SplitterConfig::from_toml(
            "appliance = \"unix:/tmp/l.sock\"\nnbd_unix = \"/tmp/n.sock\"\n[[volume]]\nname = \"vol0\"\npath = \"/tmp/p.img\"\n",
        )
        .unwrap();
        assert_eq!(ok.handshake_timeout_s, 60);
        assert!(!ok.volume[0].read_only);
        assert_eq!(ok.on_appliance_loss, OnApplianceLoss::Mark);
        let block = SplitterConfig::from_toml(
            "appliance = \"unix:/l\"\nnbd_unix = \"/n\"\non_appliance_loss = \"block\"\n[[volume]]\nname = \"a\"\npath = \"/p\"\n",
        )
        .unwrap();
        assert_eq!(block.on_appliance_loss, OnApplianceLoss::Block);
        let none = SplitterConfig::from_toml(
            "appliance = \"unix:/tmp/l.sock\"\n[[volume]]\nname = \"vol0\"\npath = \"/p\"\n",
        );
        assert!(none.is_err());
        let dup = SplitterConfig::from_toml(
            "appliance = \"unix:/l\"\nnbd_unix = \"/n\"\n[[volume]]\nname = \"a\"\npath = \"/p\"\n[[volume]]\nname = \"a\"\npath = \"/q\"\n",
        );
        assert!(dup.is_err());
        let typo = SplitterConfig::from_toml("appliance = \"unix:/l\"\nnbd_unixx = \"/n\"\n");
        assert!(typo.is_err());
    }

    #[test]
    fn runtime_volume_changes_apply_over_the_config() {
        let config = SplitterConfig::from_toml(
            "appliance = \"unix:/l\"\ncontrol = \"/s/splitter.ctl\"\n[[volume]]\nname = \"a\"\npath = \"/p\"\n",
        );
        // No NBD listener: refused whatever the volumes.
        assert!(config.is_err());
        let config = SplitterConfig::from_toml(
            "appliance = \"unix:/l\"\nnbd_unix = \"/n\"\ncontrol = \"/s/splitter.ctl\"\n[[volume]]\nname = \"a\"\npath = \"/p\"\n",
        )
        .unwrap();
        assert_eq!(
            config.managed_volumes_path(),
            Some(PathBuf::from("/s/managed-volumes.toml"))
        );
        let changes: ManagedVolumes =
            toml::from_str("volume_removed = [\"a\"]\n[[volume]]\nname = \"b\"\npath = \"/q\"\n")
                .unwrap();
        let served = changes.apply(&config.volume).unwrap();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].name, "b");
        let clash: ManagedVolumes =
            toml::from_str("[[volume]]\nname = \"a\"\npath = \"/q\"\n").unwrap();
        assert!(clash.apply(&config.volume).is_err());
        // A splitter with a control socket may start empty and get volumes at runtime.
        assert!(SplitterConfig::from_toml(
            "appliance = \"unix:/l\"\nnbd_unix = \"/n\"\ncontrol = \"/s/c\"\n"
        )
        .is_ok());
    }
}
