//! Groups and volumes changed at runtime (`cdp group create`, `cdp volume add/remove`), kept in `DATA_DIR/managed.toml`.
//!
//! `appliance.toml` is the administrator's file and is never rewritten; runtime changes live
//! beside the journals and are applied over it at start: removals of its volumes first, then
//! groups created at runtime, then volumes added at runtime. The file is replaced atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ApplianceConfig, GroupConfig, VolumeConfig};
use crate::error::ApplianceError;
use crate::state_file::write_atomically;

/// File name in the data directory.
pub const MANAGED_FILE: &str = "managed.toml";

/// What changed at runtime.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedGroups {
    /// Volumes of `appliance.toml` removed at runtime.
    #[serde(default)]
    pub volume_removed: Vec<GroupVolumeName>,
    /// Groups created at runtime, with their journal settings (their volumes are in `volume`).
    #[serde(default)]
    pub group: Vec<GroupConfig>,
    /// Volumes added at runtime, to any group.
    #[serde(default)]
    pub volume: Vec<ManagedVolume>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupVolumeName {
    pub group: String,
    pub name: String,
}

/// A volume added at runtime: its group and the settings `[[group.volume]]` would hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedVolume {
    pub group: String,
    pub name: String,
    pub size: u64,
    pub replica: PathBuf,
}

impl ManagedVolume {
    pub fn config(&self) -> VolumeConfig {
        VolumeConfig {
            name: self.name.clone(),
            size: self.size,
            replica: self.replica.clone(),
            production: None,
        }
    }
}

impl ManagedGroups {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(MANAGED_FILE)
    }

    /// Reads the file; a missing file means nothing changed at runtime.
    pub fn load(data_dir: &Path) -> Result<ManagedGroups, ApplianceError> {
        let path = Self::path(data_dir);
        match std::fs::read_to_string(&path) {
            // An administrator may edit this file, so a parse error is a configuration error.
            Ok(text) => toml::from_str(&text)
                .map_err(|e| ApplianceError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ManagedGroups::default()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn store(&self, data_dir: &Path) -> Result<(), ApplianceError> {
        let path = Self::path(data_dir);
        let text = toml::to_string(self).map_err(|e| {
            ApplianceError::Io(std::io::Error::other(format!(
                "encoding {}: {e}",
                path.display()
            )))
        })?;
        write_atomically(&path, text.as_bytes()).map_err(|e| {
            ApplianceError::Io(std::io::Error::new(
                e.kind(),
                format!("writing {}: {e}", path.display()),
            ))
        })
    }

    /// Applies the runtime changes over `appliance.toml`'s groups and checks the result as
    /// a whole (names, replicas), as if it had all been written in `appliance.toml`.
    pub fn apply(&self, mut config: ApplianceConfig) -> Result<ApplianceConfig, ApplianceError> {
        let managed_path = Self::path(&config.data_dir);
        let origin = |what: String| {
            ApplianceError::Config(format!(
                "{what} (in {}, changed by cdp group/volume commands)",
                managed_path.display()
            ))
        };
        for removed in &self.volume_removed {
            if let Some(g) = config.group.iter_mut().find(|g| g.name == removed.group) {
                g.volume.retain(|v| v.name != removed.name);
            }
        }
        for g in &self.group {
            if config.group.iter().any(|c| c.name == g.name) {
                return Err(origin(format!(
                    "group {:?} was created at runtime and is also in appliance.toml; remove one",
                    g.name
                )));
            }
            config.group.push(g.clone());
        }
        for v in &self.volume {
            let Some(g) = config.group.iter_mut().find(|g| g.name == v.group) else {
                return Err(origin(format!(
                    "volume {:?} was added to group {:?}, which no longer exists",
                    v.name, v.group
                )));
            };
            g.volume.push(v.config());
        }
        config.sanitize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::GOOD as BASE;

    fn managed(text: &str) -> ManagedGroups {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn runtime_changes_apply_over_the_config_and_clashes_are_refused() {
        let base = ApplianceConfig::from_toml(BASE).unwrap();
        let changes = managed(
            r#"
[[volume_removed]]
group = "default"
name = "vol0"
[[group]]
name = "g2"
journal_retention_s = 60
[[volume]]
group = "g2"
name = "volA"
size = 4096
replica = "/d/a.img"
[[volume]]
group = "default"
name = "vol1"
size = 4096
replica = "/d/r1.img"
"#,
        );
        let merged = changes.apply(base.clone()).unwrap();
        let names: Vec<(&str, Vec<&str>)> = merged
            .group
            .iter()
            .map(|g| {
                let volumes = g.volume.iter().map(|v| v.name.as_str()).collect();
                (g.name.as_str(), volumes)
            })
            .collect();
        assert_eq!(names, [("default", vec!["vol1"]), ("g2", vec!["volA"])]);
        assert_eq!(merged.group[1].journal_retention_s, Some(60));
        // The stored form reads back the same.
        let again: ManagedGroups = toml::from_str(&toml::to_string(&changes).unwrap()).unwrap();
        assert_eq!(again.volume.len(), 2);

        let clash = managed("[[group]]\nname = \"default\"\n");
        let e = clash.apply(base.clone()).unwrap_err().to_string();
        assert!(e.contains("also in appliance.toml"), "{e}");
        let orphan =
            managed("[[volume]]\ngroup = \"gone\"\nname = \"v\"\nsize = 1\nreplica = \"/x\"\n");
        assert!(orphan.apply(base.clone()).is_err());
        let duplicate = managed(
            "[[volume]]\ngroup = \"default\"\nname = \"vol0\"\nsize = 1\nreplica = \"/x\"\n",
        );
        assert!(duplicate.apply(base).is_err());
    }
}
