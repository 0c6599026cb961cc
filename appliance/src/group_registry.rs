//! The appliance's consistency groups by name: opened at start, created and changed at runtime.
//!
//! Link connections look volumes up here on Hello, control requests find groups here, and
//! `cdp group create` / `cdp volume add|remove` change it. Every change is stored in
//! `DATA_DIR/managed.toml` (see `managed_groups.rs`) before it is answered, so a restart
//! opens the same groups and volumes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cdp_journal::JournalConfig;
use cdp_types::validate_name;

use crate::config::{ApplianceConfig, GroupConfig, VolumeConfig};
use crate::error::ApplianceError;
use crate::group::{Group, GroupVolume};
use crate::limits::JOURNAL_CAPACITY_SEGMENTS_MIN;
use crate::managed_groups::{GroupVolumeName, ManagedGroups, ManagedVolume};

/// The groups, changeable while the appliance runs.
pub struct Groups {
    groups: RwLock<BTreeMap<String, Arc<Group>>>,
    data_dir: PathBuf,
    journal_config: JournalConfig,
    sync_interval: Duration,
    distribution_delay_max: Duration,
    /// Groups of `appliance.toml`; the others were created at runtime.
    configured: BTreeSet<String>,
    /// The stored runtime changes. Held across a whole change (on a blocking thread), so
    /// changes never interleave and the file always matches the live groups.
    managed: Mutex<ManagedGroups>,
}

/// `group_create`'s settings, and one group as `cdp group list` shows it.
pub use cdp_control::{GroupCreate, GroupOrigin, GroupSummary};

impl Groups {
    /// Opens `appliance.toml`'s groups with the runtime changes applied over them.
    pub fn open(config: &ApplianceConfig) -> Result<Groups, ApplianceError> {
        let managed = ManagedGroups::load(&config.data_dir)?;
        let configured = config.group.iter().map(|g| g.name.clone()).collect();
        let merged = managed.apply(config.clone())?;
        let mut journal_config = JournalConfig::default();
        if let Some(bytes) = merged.journal_segment_bytes {
            journal_config.segment_bytes_max = bytes;
        }
        let registry = Groups {
            groups: RwLock::new(BTreeMap::new()),
            data_dir: merged.data_dir.clone(),
            journal_config,
            sync_interval: Duration::from_millis(merged.journal_sync_interval_ms),
            distribution_delay_max: Duration::from_secs(merged.distribution_delay_max_s),
            configured,
            managed: Mutex::new(managed),
        };
        for g in &merged.group {
            let group = registry.open_group(g)?;
            registry.write().insert(g.name.clone(), group);
        }
        Ok(registry)
    }

    fn open_group(&self, config: &GroupConfig) -> Result<Arc<Group>, ApplianceError> {
        Group::open(
            &self.data_dir,
            config,
            self.journal_config.clone(),
            self.sync_interval,
            self.distribution_delay_max,
        )
    }

    /// The groups now, by name.
    pub fn list(&self) -> Vec<Arc<Group>> {
        self.read().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Group>> {
        self.read().get(name).cloned()
    }

    /// The group holding volume `name` (a volume belongs to one group), and the volume.
    pub fn find_volume(&self, name: &str) -> Option<(Arc<Group>, Arc<GroupVolume>)> {
        self.read()
            .values()
            .find_map(|g| g.volume(name).map(|v| (Arc::clone(g), v)))
    }

    /// Creates a group with an empty journal (or reopens the journal a group of that name
    /// left in the data directory). Blocks on file I/O: call from a blocking thread.
    pub fn create_group(&self, request: GroupCreate) -> Result<Arc<Group>, ApplianceError> {
        validate_name(&request.name).map_err(|e| ApplianceError::Refused(e.to_string()))?;
        let mut managed = self.lock_managed();
        if self.get(&request.name).is_some() {
            return Err(ApplianceError::Refused(format!(
                "group {:?} already exists",
                request.name
            )));
        }
        let segment_bytes = self.journal_config.segment_bytes_max;
        let capacity_min = segment_bytes.saturating_mul(JOURNAL_CAPACITY_SEGMENTS_MIN);
        if let Some(capacity) = request.journal_capacity_bytes {
            if capacity < capacity_min {
                return Err(ApplianceError::Refused(format!(
                    "journal capacity {capacity} bytes is below two journal segments; use at \
                     least {capacity_min} bytes (retention never releases the active segment)"
                )));
            }
        }
        if request.journal_retention_s == Some(0) {
            return Err(ApplianceError::Refused(
                "journal retention must be at least 1 second".into(),
            ));
        }
        // Through serde, so settings this request does not name take `[[group]]`'s defaults.
        let mut settings = serde_json::json!({ "name": request.name });
        if let Some(capacity) = request.journal_capacity_bytes {
            settings["journal_capacity_bytes"] = capacity.into();
        }
        if let Some(window) = request.journal_retention_s {
            settings["journal_retention_s"] = window.into();
        }
        if let Some(compress) = request.journal_compress {
            settings["journal_compress"] = compress.into();
        }
        let config: GroupConfig = serde_json::from_value(settings)
            .map_err(|e| ApplianceError::Refused(format!("group settings: {e}")))?;
        let group = self.open_group(&config)?;
        let mut changed = managed.clone();
        changed.group.push(config);
        if let Err(e) = changed.store(&self.data_dir) {
            group.stop();
            return Err(e);
        }
        *managed = changed;
        self.write()
            .insert(request.name.clone(), Arc::clone(&group));
        tracing::info!(group = %request.name, "group created");
        Ok(group)
    }

    /// Adds a volume to a group. The replica (default `DATA_DIR/replicas/GROUP/VOLUME.img`)
    /// is created sparse if missing. Blocks on file I/O: call from a blocking thread.
    pub fn add_volume(
        &self,
        group: &str,
        name: &str,
        size: u64,
        replica: Option<PathBuf>,
    ) -> Result<Arc<GroupVolume>, ApplianceError> {
        validate_name(name).map_err(|e| ApplianceError::Refused(e.to_string()))?;
        if size == 0 {
            return Err(ApplianceError::Refused(format!(
                "volume {name:?} needs a size above 0"
            )));
        }
        let mut managed = self.lock_managed();
        let target = self.group_named(group)?;
        if let Some((owner, _)) = self.find_volume(name) {
            return Err(ApplianceError::Refused(format!(
                "volume {name:?} already exists in group {:?} (a volume belongs to one group)",
                owner.name
            )));
        }
        let replica = match replica {
            Some(path) => path,
            None => {
                let dir = self.data_dir.join("replicas").join(group);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    ApplianceError::from(e).context(&format!("creating {}", dir.display()))
                })?;
                dir.join(format!("{name}.img"))
            }
        };
        if let Some((g, v)) = self.replica_user(&replica) {
            return Err(ApplianceError::Refused(format!(
                "replica {} is already used by volume {:?} of group {:?}",
                replica.display(),
                v.name,
                g.name
            )));
        }
        let config = VolumeConfig {
            name: name.to_string(),
            size,
            replica,
        };
        let volume = target.add_volume(&config)?;
        let mut changed = managed.clone();
        changed.volume.push(ManagedVolume {
            group: group.to_string(),
            name: config.name.clone(),
            size,
            replica: config.replica.clone(),
        });
        if let Err(e) = changed.store(&self.data_dir) {
            // Nothing was journaled for it yet: undoing cannot lose history.
            let _ = target.remove_volume(name, true);
            return Err(e);
        }
        *managed = changed;
        Ok(volume)
    }

    /// Removes a volume from its group (see `Group::remove_volume`: its journal records and
    /// its replica are kept). Blocks until distribution applied its last changes.
    pub fn remove_volume(
        &self,
        group: &str,
        name: &str,
        force: bool,
    ) -> Result<Arc<GroupVolume>, ApplianceError> {
        let mut managed = self.lock_managed();
        let target = self.group_named(group)?;
        if target.volume(name).is_none() {
            if let Some((owner, _)) = self.find_volume(name) {
                return Err(ApplianceError::Refused(format!(
                    "volume {name:?} belongs to group {:?}, not {group:?}",
                    owner.name
                )));
            }
        }
        let volume = target.remove_volume(name, force)?;
        let mut changed = managed.clone();
        let added_at_runtime = changed
            .volume
            .iter()
            .any(|v| v.group == group && v.name == name);
        if added_at_runtime {
            changed
                .volume
                .retain(|v| !(v.group == group && v.name == name));
        } else {
            changed.volume_removed.push(GroupVolumeName {
                group: group.to_string(),
                name: name.to_string(),
            });
        }
        if let Err(e) = changed.store(&self.data_dir) {
            let config = VolumeConfig {
                name: name.to_string(),
                size: volume.size,
                replica: volume.replica_path.clone(),
            };
            if let Err(undo) = target.add_volume(&config) {
                tracing::error!(
                    group,
                    volume = name,
                    "re-adding after a failed store: {undo}"
                );
            }
            return Err(e);
        }
        *managed = changed;
        Ok(volume)
    }

    /// Every group with its journal and volumes, for `cdp group list`.
    pub fn summaries(&self) -> Vec<GroupSummary> {
        self.list()
            .iter()
            .map(|g| {
                let status = g.status();
                let oldest_timestamp_ns =
                    g.journal().first_record_timestamp().unwrap_or_else(|e| {
                        tracing::warn!(group = %g.name, "reading the oldest journal record: {e}");
                        None
                    });
                GroupSummary {
                    name: g.name.clone(),
                    origin: if self.configured.contains(&g.name) {
                        GroupOrigin::ApplianceToml
                    } else {
                        GroupOrigin::Runtime
                    },
                    journal_capacity_bytes: status.journal_capacity_bytes,
                    journal_retention_s: status.journal_retention_s,
                    journal_bytes: status.journal_bytes,
                    last_seq: status.last_seq,
                    oldest_point_seq: status.oldest_point_seq,
                    oldest_timestamp_ns,
                    volumes: status
                        .volumes
                        .into_iter()
                        .map(cdp_control::VolumeStatus::from)
                        .collect(),
                }
            })
            .collect()
    }

    /// Stops every group (link connections must be closed first).
    pub fn stop_all(&self) {
        for g in self.list() {
            g.stop();
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn group_named(&self, name: &str) -> Result<Arc<Group>, ApplianceError> {
        self.get(name).ok_or_else(|| {
            let names: Vec<String> = self.read().keys().cloned().collect();
            ApplianceError::NotFound(format!(
                "no group named {name:?} (groups: {}); create it with cdp group create",
                names.join(", ")
            ))
        })
    }

    fn replica_user(&self, replica: &Path) -> Option<(Arc<Group>, Arc<GroupVolume>)> {
        self.list().into_iter().find_map(|g| {
            let v = g
                .volumes()
                .into_iter()
                .find(|v| v.replica_path == replica)?;
            Some((g, v))
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Group>>> {
        // Every change is one map call, so a poisoned lock still guards a consistent map.
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Group>>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_managed(&self) -> std::sync::MutexGuard<'_, ManagedGroups> {
        self.managed.lock().unwrap_or_else(|p| p.into_inner())
    }
}
