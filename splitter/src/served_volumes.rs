//! The volumes a splitter serves, each an NBD export with its split link; added and removed at runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_link::control_socket::{ControlError, ErrorCode};
use cdp_nbd::ExportRegistry;
use cdp_types::{validate_name, BlockFile, Endpoint};

use crate::config::{ManagedVolumes, OnApplianceLoss, SplitVolumeConfig};
use crate::dirty_bitmap::{self, DirtyBitmap};
use crate::error::SplitterError;
use crate::metered_export::{HostIo, MeteredExport};
use crate::split_export::SplitExport;
use crate::split_link::{self, DurableBy, SplitLink};

/// How long a volume added at runtime may wait for the appliance's Welcome. The appliance
/// was told about the volume first, so a longer wait means it is unreachable or refusing.
const ADD_WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// How long removing a volume waits for the appliance to make its last changes durable.
/// Why runtime volume changes are refused without a file to keep them in.
const NO_MANAGED_FILE: &str = "this splitter has no managed_volumes file (set control or \
     managed_volumes in splitter.toml) to keep runtime changes in";

const REMOVE_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// One volume being served: production, its split link, and how it was configured.
pub struct ServedVolume {
    pub config: SplitVolumeConfig,
    pub production: Arc<BlockFile>,
    pub link: Arc<SplitLink>,
    /// The host's requests, counted by the export's metering layer (`metered_export.rs`).
    pub host_io: Arc<HostIo>,
}

/// The served volumes. Hosts find them through `registry`; control requests change them.
pub struct ServedVolumes {
    volumes: Mutex<BTreeMap<String, Arc<ServedVolume>>>,
    pub registry: ExportRegistry,
    appliance: Endpoint,
    policy: OnApplianceLoss,
    /// Each link's window of unacknowledged change bytes (`link_window_bytes`).
    window_bytes: usize,
    /// Silence after which a split link is considered gone (`link_deadline_ms`).
    deadline: std::time::Duration,
    /// Where runtime changes are stored (None: runtime changes are refused).
    managed_path: Option<PathBuf>,
    /// The stored runtime changes. Held across a whole add or remove, so two requests never
    /// interleave and the file always matches what is served.
    managed: tokio::sync::Mutex<ManagedVolumes>,
}

impl ServedVolumes {
    pub fn new(
        registry: ExportRegistry,
        appliance: Endpoint,
        policy: OnApplianceLoss,
        window_bytes: usize,
        deadline: std::time::Duration,
        managed_path: Option<PathBuf>,
        managed: ManagedVolumes,
    ) -> ServedVolumes {
        ServedVolumes {
            volumes: Mutex::new(BTreeMap::new()),
            registry,
            appliance,
            policy,
            window_bytes,
            deadline,
            managed_path,
            managed: tokio::sync::Mutex::new(managed),
        }
    }

    /// Opens production and the dirty bitmap, starts the split link and publishes the export.
    /// The link connects in the background; see `SplitLink::wait_ready`.
    pub fn start(&self, v: &SplitVolumeConfig) -> Result<Arc<ServedVolume>, SplitterError> {
        let volume_err = |what: String| SplitterError::Volume {
            volume: v.name.clone(),
            what,
        };
        let production =
            Arc::new(BlockFile::open(&v.path, v.read_only).map_err(|e| volume_err(e.to_string()))?);
        if production.size() == 0 {
            return Err(volume_err(format!(
                "{} is empty (0 bytes)",
                v.path.display()
            )));
        }
        let bitmap_path = v.dirty_bitmap_path()?;
        let (bitmap, opened) = DirtyBitmap::open(&bitmap_path, production.size())
            .map_err(|e| volume_err(e.to_string()))?;
        if let dirty_bitmap::Opened::Existing { dirty_regions } = &opened {
            let dirty_regions = *dirty_regions;
            if dirty_regions > 0 {
                tracing::warn!(
                    volume = %v.name,
                    dirty_regions,
                    dirty_bytes = dirty_regions * bitmap.region_bytes(),
                    "volume was not cleanly in sync at the last stop; these regions will be resynchronised"
                );
            }
        }
        let link = SplitLink::start(
            &v.name,
            Arc::clone(&production),
            self.appliance.clone(),
            bitmap,
            self.policy,
            self.window_bytes,
            self.deadline,
        );
        if opened == dirty_bitmap::Opened::Created {
            // Never protected by this splitter: the replica cannot be assumed to match, so
            // everything is copied once (holes and zeroes cost no payload).
            link.request_full_resync(split_link::ResyncReason::Initial);
        }
        let export = SplitExport::new(Arc::clone(&production), Arc::clone(&link), v.read_only);
        let host_io = Arc::new(HostIo::default());
        let export = MeteredExport::new(export, Arc::clone(&host_io));
        if let Err(e) = self.registry.add(
            &v.name,
            &format!("cdp protected volume {}", v.name),
            Arc::new(export),
        ) {
            link.stop();
            return Err(SplitterError::Nbd(e.to_string()));
        }
        let served = Arc::new(ServedVolume {
            config: v.clone(),
            production,
            link,
            host_io,
        });
        self.lock().insert(v.name.clone(), Arc::clone(&served));
        Ok(served)
    }

    /// The volumes served now, by name.
    pub fn list(&self) -> Vec<Arc<ServedVolume>> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<ServedVolume>> {
        self.lock().get(name).cloned()
    }

    pub fn names(&self) -> String {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// Serves a new volume from now on and after restarts. Answers once the appliance
    /// welcomed it; a refusal (unknown volume, other size, already split) undoes the add.
    pub async fn add(&self, v: SplitVolumeConfig) -> Result<Arc<ServedVolume>, ControlError> {
        let Some(managed_path) = self.managed_path.clone() else {
            return Err(ControlError::refused(NO_MANAGED_FILE));
        };
        validate_name(&v.name)
            .map_err(|e| ControlError::new(ErrorCode::BadRequest, e.to_string()))?;
        let mut managed = self.managed.lock().await;
        if self.get(&v.name).is_some() {
            return Err(ControlError::refused(format!(
                "volume {:?} is already served by this splitter",
                v.name
            )));
        }
        let served = self
            .start(&v)
            .map_err(|e| ControlError::from(e.to_string()))?;
        let ready = tokio::time::timeout(ADD_WELCOME_TIMEOUT, served.link.wait_ready()).await;
        let refused = match ready {
            Ok(Ok(())) => None,
            Ok(Err(e @ SplitterError::Refused { .. })) => {
                Some(ControlError::refused(e.to_string()))
            }
            Ok(Err(e)) => Some(ControlError::from(e.to_string())),
            Err(_) => Some(ControlError::from(format!(
                "the appliance did not welcome volume {:?} within {} s (is it running, and \
                 does it know the volume? add it there first)",
                v.name,
                ADD_WELCOME_TIMEOUT.as_secs()
            ))),
        };
        if let Some(refused) = refused {
            self.unserve(&v.name, &served);
            return Err(refused);
        }
        let mut changed = managed.clone();
        changed.volume.retain(|m| m.name != v.name);
        changed.volume.push(v.clone());
        if let Err(e) = changed.store(&managed_path) {
            self.unserve(&v.name, &served);
            return Err(ControlError::from(e.to_string()));
        }
        *managed = changed;
        tracing::info!(volume = %v.name, path = %v.path.display(), "volume added");
        Ok(served)
    }

    /// Stops serving a volume, now and after restarts. Refused while hosts are attached
    /// unless `force`; forced, attached hosts keep their connection and their writes reach
    /// production and the dirty bitmap only. Production, its bitmap and the appliance's
    /// journal and replica are all kept.
    pub async fn remove(
        &self,
        name: &str,
        force: bool,
    ) -> Result<cdp_control::SplitterVolumeRemoved, ControlError> {
        let Some(managed_path) = self.managed_path.clone() else {
            return Err(ControlError::refused(NO_MANAGED_FILE));
        };
        let mut managed = self.managed.lock().await;
        let served = self.get(name).ok_or_else(|| {
            ControlError::not_found(format!(
                "no volume {name:?} on this splitter (it serves: {})",
                self.names()
            ))
        })?;
        let hosts = self.registry.clients(name).unwrap_or(0);
        if hosts > 0 && !force {
            return Err(ControlError::refused(format!(
                "{hosts} host(s) attached to volume {name:?}; detach them first or use --force"
            )));
        }
        let mut changed = managed.clone();
        if changed.volume.iter().any(|m| m.name == name) {
            changed.volume.retain(|m| m.name != name);
        } else if !changed.volume_removed.iter().any(|r| r == name) {
            changed.volume_removed.push(name.to_string());
        }
        changed
            .store(&managed_path)
            .map_err(|e| ControlError::from(e.to_string()))?;
        *managed = changed;
        // No new host finds it from here on; then every change already made reaches the
        // journal (or the bitmap) before the link ends.
        self.registry.remove(name);
        let last = served.link.last_seq();
        if let Err(e) = served.production.sync_data() {
            tracing::error!(volume = %name, "production sync at removal failed: {e}");
        }
        let durable =
            tokio::time::timeout(REMOVE_FLUSH_TIMEOUT, served.link.wait_durable(last)).await;
        let journaled = matches!(durable, Ok(DurableBy::Journal));
        if !journaled {
            tracing::warn!(volume = %name, last, "appliance did not confirm the last changes before removal; they stay marked in the dirty bitmap");
        }
        served.link.stop();
        if let Err(e) = served.link.sync_bitmap() {
            tracing::error!(volume = %name, "dirty bitmap sync failed: {e}");
        }
        self.lock().remove(name);
        tracing::info!(volume = %name, hosts, journaled, "volume removed");
        Ok(cdp_control::SplitterVolumeRemoved {
            removed: name.to_string(),
            hosts_attached: hosts,
            last_changes_journaled: journaled,
            production: served.config.path.clone(),
        })
    }

    /// Undoes a `start` whose add did not complete.
    fn unserve(&self, name: &str, served: &ServedVolume) {
        self.registry.remove(name);
        served.link.stop();
        if let Err(e) = served.link.sync_bitmap() {
            tracing::error!(volume = %name, "dirty bitmap sync failed: {e}");
        }
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<ServedVolume>>> {
        // Every change is one map call, so a poisoned lock still guards a consistent map.
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }
}
