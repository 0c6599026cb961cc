//! The appliance's TOML configuration.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cdp_types::{validate_name, Endpoint};
use serde::{Deserialize, Serialize};

use crate::error::ApplianceError;
use crate::limits::{JOURNAL_CAPACITY_BYTES_DEFAULT, JOURNAL_CAPACITY_SEGMENTS_MIN};

/// `appliance.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// Journals and appliance state live under this directory (created if missing).
    pub data_dir: PathBuf,
    /// Where splitters connect: `unix:PATH` or `HOST:PORT`.
    pub link_listen: Endpoint,
    /// Unix socket for `cdp status` and other control commands. Default `DATA_DIR/appliance.ctl`.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Where point-in-time images are served over NBD: `unix:PATH` or `HOST:PORT`.
    /// Default `unix:DATA_DIR/image.sock`.
    #[serde(default)]
    pub image_nbd: Option<Endpoint>,
    /// Size at which a journal segment file is closed and a new one started.
    /// Default 256 MiB, minimum 1 MiB.
    #[serde(default)]
    pub journal_segment_bytes: Option<u64>,
    /// Milliseconds between background journal syncs when no host flush asked for one; bounds
    /// how far distribution to the replica can trail the journal. Default 200, minimum 1.
    #[serde(default = "sync_interval_default")]
    pub journal_sync_interval_ms: u64,
    /// Seconds distribution may wait for a pause in host writes before it writes the replica
    /// anyway. Distribution competes with the host for the disk; deferring it keeps bursts at
    /// full speed at the cost of replica lag (shown by `cdp status`). Default 30, minimum 0.
    #[serde(default = "distribution_delay_default")]
    pub distribution_delay_max_s: u64,
    #[serde(default)]
    pub group: Vec<GroupConfig>,
}

fn distribution_delay_default() -> u64 {
    30
}

fn journal_compress_default() -> bool {
    // Compression runs on the host's write path; measured, it cost 10-15 % of 4 KiB write
    // rates on fio's barely compressible data, so it is opt-in until it moves off that path.
    false
}

fn journal_capacity_default() -> u64 {
    JOURNAL_CAPACITY_BYTES_DEFAULT
}

fn sync_interval_default() -> u64 {
    200
}

/// A consistency group: volumes whose writes share one order and one journal.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    /// Journal size in bytes above which the oldest whole segments are released (deleted),
    /// once the replica holds every record in them (the replica is the base image; the journal
    /// is the history after it). Released history is no longer recoverable: `first_seq` in
    /// `cdp status` is the oldest point kept. If distribution is so far behind that nothing may
    /// be released, the journal keeps growing and status shows `journal_over_capacity`.
    /// Default 8 GiB; minimum two journal segments (smaller values are raised, with a warning).
    #[serde(default = "journal_capacity_default")]
    pub journal_capacity_bytes: u64,
    /// Also release segments whose records are all older than this many seconds (again only
    /// once distributed). Default: none, only capacity applies; minimum 1.
    #[serde(default)]
    pub journal_retention_s: Option<u64>,
    /// Store write payloads zstd-compressed in the journal when that saves space (level 1,
    /// computed on the appending thread). Default false: it costs host throughput (see
    /// ARCHITECTURE.md); turn it on for compressible data where journal space matters more.
    #[serde(default = "journal_compress_default")]
    pub journal_compress: bool,
    #[serde(default)]
    pub volume: Vec<VolumeConfig>,
}

/// A protected volume as the appliance knows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Must match the splitter's volume name.
    pub name: String,
    /// Size in bytes; a splitter announcing another size is refused.
    pub size: u64,
    /// The local replica copy: a file (created sparse if missing) or a block device.
    pub replica: PathBuf,
}

impl ApplianceConfig {
    pub fn from_toml(text: &str) -> Result<ApplianceConfig, ApplianceError> {
        let config: ApplianceConfig =
            toml::from_str(text).map_err(|e| ApplianceError::Config(e.to_string()))?;
        config.sanitize()
    }

    pub fn image_nbd(&self) -> Endpoint {
        self.image_nbd
            .clone()
            .unwrap_or_else(|| Endpoint::Unix(self.data_dir.join("image.sock")))
    }

    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.data_dir.join("appliance.ctl"))
    }

    /// Rejects contradictions; clamps soft mistakes with a warning.
    pub fn sanitize(mut self) -> Result<ApplianceConfig, ApplianceError> {
        let bad = |m: String| Err(ApplianceError::Config(m));
        if self.group.is_empty() {
            return bad("no [[group]] configured".into());
        }
        let mut groups = BTreeSet::new();
        let mut volumes = BTreeSet::new();
        let mut replicas = BTreeSet::new();
        for g in &self.group {
            validate_name(&g.name).map_err(|e| ApplianceError::Config(e.to_string()))?;
            if !groups.insert(g.name.clone()) {
                return bad(format!("group {:?} is configured twice", g.name));
            }
            for v in &g.volume {
                validate_name(&v.name).map_err(|e| ApplianceError::Config(e.to_string()))?;
                if !volumes.insert(v.name.clone()) {
                    return bad(format!(
                        "volume {:?} is configured twice (a volume belongs to one group)",
                        v.name
                    ));
                }
                if !replicas.insert(v.replica.clone()) {
                    return bad(format!(
                        "replica {} is used by two volumes",
                        v.replica.display()
                    ));
                }
                if v.size == 0 {
                    return bad(format!("volume {:?} has size 0", v.name));
                }
            }
        }
        if let Some(bytes) = self.journal_segment_bytes {
            if bytes < 1024 * 1024 {
                tracing::warn!("journal_segment_bytes = {bytes} is below 1 MiB; using 1 MiB");
                self.journal_segment_bytes = Some(1024 * 1024);
            }
        }
        let segment_bytes = self
            .journal_segment_bytes
            .unwrap_or(cdp_journal::limits::SEGMENT_BYTES_DEFAULT);
        let capacity_min = segment_bytes.saturating_mul(JOURNAL_CAPACITY_SEGMENTS_MIN);
        for g in &mut self.group {
            // Retention never releases the active segment, so a capacity below two segments
            // could never be met.
            if g.journal_capacity_bytes < capacity_min {
                tracing::warn!(
                    group = %g.name,
                    "journal_capacity_bytes = {} is below two journal segments; using {capacity_min}",
                    g.journal_capacity_bytes
                );
                g.journal_capacity_bytes = capacity_min;
            }
            if g.journal_retention_s == Some(0) {
                tracing::warn!(group = %g.name, "journal_retention_s = 0; using 1");
                g.journal_retention_s = Some(1);
            }
        }
        if self.journal_sync_interval_ms == 0 {
            tracing::warn!("journal_sync_interval_ms = 0; using 1");
            self.journal_sync_interval_ms = 1;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "/d"
link_listen = "unix:/d/link.sock"
[[group]]
name = "default"
[[group.volume]]
name = "vol0"
size = 1048576
replica = "/d/r0.img"
"#;

    #[test]
    fn parses_defaults_and_rejects_contradictions() {
        let c = ApplianceConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.control_path(), PathBuf::from("/d/appliance.ctl"));
        assert_eq!(c.journal_sync_interval_ms, 200);
        assert_eq!(
            c.group[0].journal_capacity_bytes,
            JOURNAL_CAPACITY_BYTES_DEFAULT
        );
        assert_eq!(c.group[0].journal_retention_s, None);
        assert!(!c.group[0].journal_compress);
        let small = GOOD.replace(
            "name = \"default\"\n",
            "name = \"default\"\njournal_capacity_bytes = 1\njournal_retention_s = 0\n",
        );
        let small = format!("journal_segment_bytes = 2097152\n{small}");
        let c = ApplianceConfig::from_toml(&small).unwrap();
        assert_eq!(c.group[0].journal_capacity_bytes, 2 * 2097152);
        assert_eq!(c.group[0].journal_retention_s, Some(1));
        let twice = format!("{GOOD}\n[[group]]\nname = \"default\"\n");
        assert!(ApplianceConfig::from_toml(&twice).is_err());
        let shared_replica = format!(
            "{GOOD}\n[[group.volume]]\nname = \"vol1\"\nsize = 1048576\nreplica = \"/d/r0.img\"\n"
        );
        assert!(ApplianceConfig::from_toml(&shared_replica).is_err());
        assert!(ApplianceConfig::from_toml("data_dir = \"/d\"\nlink_listen = \"x\"\n").is_err());
    }
}
