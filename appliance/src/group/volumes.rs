//! The group's volumes: opening their replicas, recovering their resume points, and adding
//! and removing volumes at runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_journal::Journal;
use cdp_types::BlockFile;

use super::{Group, GroupState};
use crate::config::{GroupConfig, VolumeConfig};
use crate::error::ApplianceError;
use crate::group_meta::GroupMeta;
use crate::watermark::Watermark;

impl Group {
    /// Adds a volume to the running group (`cdp volume add`). It gets a new id in
    /// `group.state`, or its old one if it belonged to the group before: ids are never reused,
    /// and the journal may still hold its records, so its resume point is recovered as at
    /// start-up. Reads the journal backwards: call from a blocking thread.
    pub fn add_volume(&self, config: &VolumeConfig) -> Result<Arc<GroupVolume>, ApplianceError> {
        let already = || {
            ApplianceError::Refused(format!(
                "group {} already has a volume {:?}",
                self.name, config.name
            ))
        };
        if self.read_volumes().contains_key(&config.name) {
            return Err(already());
        }
        let meta = self
            .state
            .meta(&self.name, std::slice::from_ref(&config.name))?;
        let id =
            meta.volumes
                .get(&config.name)
                .copied()
                .ok_or_else(|| ApplianceError::Corruption {
                    path: self.state.meta_path().display().to_string(),
                    what: format!("volume {} has no id", config.name),
                })?;
        let volume = Arc::new(open_volume(config, id)?);
        let single = BTreeMap::from([(config.name.clone(), Arc::clone(&volume))]);
        recover_last_source_seqs(&self.journal, &single)?;
        let released = self
            .state
            .released_source_seqs()?
            .get(&id)
            .copied()
            .unwrap_or(0);
        let resume = volume
            .last_source_seq
            .fetch_max(released, Ordering::Relaxed)
            .max(released);
        {
            let mut seqs = self.distributed_source_seqs.lock();
            let e = seqs.entry(id).or_default();
            *e = (*e).max(resume);
        }
        let mut volumes = self.volumes.write();
        if volumes.contains_key(&config.name) {
            return Err(already());
        }
        volumes.insert(config.name.clone(), Arc::clone(&volume));
        drop(volumes);
        tracing::info!(group = %self.name, volume = %config.name, id, size = config.size, replica = %config.replica.display(), "volume added");
        Ok(volume)
    }

    /// Removes a volume from the running group (`cdp volume remove`). Refused while its
    /// splitter is connected unless `force`. Its records stay in the journal (retention
    /// releases them as any others) and its replica file is kept: first distribution applies
    /// everything journaled for it, so the replica ends equal to what production held at the
    /// last journaled change. Waits for distribution: call from a blocking thread.
    pub fn remove_volume(
        &self,
        name: &str,
        force: bool,
    ) -> Result<Arc<GroupVolume>, ApplianceError> {
        let volume = self.volume(name).ok_or_else(|| {
            ApplianceError::NotFound(format!(
                "group {} has no volume {name:?} (it has: {})",
                self.name,
                {
                    let names: Vec<String> = self.read_volumes().keys().cloned().collect();
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                }
            ))
        })?;
        // `cdp volume remove` stops the splitter's side first; its connection closes a
        // moment later, so give it that moment before refusing.
        let deadline = Instant::now() + VOLUME_REMOVE_DISCONNECT_WAIT;
        let mut seen = volume.connected.subscribe();
        while !force && *seen.borrow_and_update() {
            if !volume.connected.wait_changed(&mut seen, deadline) {
                break;
            }
        }
        if volume.connected.get() && !force {
            return Err(ApplianceError::Refused(format!(
                "volume {name:?} still has a connected splitter; remove it from the splitter \
                 first (cdp volume remove does) or use --force"
            )));
        }
        if let Some(held) = *self.hold.lock() {
            return Err(ApplianceError::Refused(format!(
                "a logged image holds group {}'s replicas at seq {held}; release it first, \
                 so the replica of {name:?} can receive its last changes",
                self.name
            )));
        }
        volume.removed.store(true, Ordering::Relaxed);
        if let Err(e) = self.distribute_everything(VOLUME_REMOVE_DISTRIBUTION_WAIT) {
            volume.removed.store(false, Ordering::Relaxed);
            return Err(e.context(&format!("volume {name:?} not removed")));
        }
        self.volumes.write().remove(name);
        tracing::info!(group = %self.name, volume = %name, replica = %volume.replica_path.display(), "volume removed; its journal records and replica are kept");
        Ok(volume)
    }
}

/// One volume of the group as the appliance sees it.
pub struct GroupVolume {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub replica_path: PathBuf,
    pub(super) replica: BlockFile,
    /// A splitter is connected for this volume (at most one at a time).
    pub connected: Watermark<bool>,
    /// Highest splitter source_seq in the journal for this volume.
    pub last_source_seq: AtomicU64,
    /// Removed from the group at runtime: appends for it are refused from then on.
    pub removed: AtomicBool,
    /// Which connection holds the volume, and since when none does (`volume_link.rs`).
    pub link: crate::volume_link::VolumeLink,
}

impl GroupVolume {
    /// Allocation runs of the replica file (`BlockFile::allocation`), for copies that skip
    /// its holes.
    pub fn replica_allocation(
        &self,
        offset: u64,
        length: u64,
        runs_max: usize,
    ) -> std::io::Result<Option<Vec<(u64, bool)>>> {
        self.replica.allocation(offset, length, runs_max)
    }
}

pub(super) fn open_volume(v: &VolumeConfig, id: u32) -> Result<GroupVolume, ApplianceError> {
    let replica = BlockFile::create_sparse(&v.replica, v.size).map_err(|e| {
        ApplianceError::Config(format!(
            "volume {}: replica {}: {e}",
            v.name,
            v.replica.display()
        ))
    })?;
    if replica.size() < v.size {
        return Err(ApplianceError::Config(format!(
            "volume {}: replica {} holds {} bytes, the volume has {}",
            v.name,
            v.replica.display(),
            replica.size(),
            v.size
        )));
    }
    Ok(GroupVolume {
        id,
        name: v.name.clone(),
        size: v.size,
        replica_path: v.replica.clone(),
        replica,
        connected: Watermark::new(false),
        last_source_seq: AtomicU64::new(0),
        removed: AtomicBool::new(false),
        link: crate::volume_link::VolumeLink::default(),
    })
}

/// How long removing a volume waits for distribution to apply its last changes.
pub(super) const VOLUME_REMOVE_DISTRIBUTION_WAIT: Duration = Duration::from_secs(60);

/// How long removing a volume waits for its splitter's connection to close.
pub(super) const VOLUME_REMOVE_DISCONNECT_WAIT: Duration = Duration::from_secs(3);

/// Finds each volume's last splitter source_seq by reading the journal backwards in
/// segment-sized steps, so a restarted splitter link resumes without gaps or duplicates.
pub(super) fn recover_last_source_seqs(
    journal: &Journal,
    volumes: &BTreeMap<String, Arc<GroupVolume>>,
) -> Result<(), ApplianceError> {
    let mut by_id: BTreeMap<u32, &GroupVolume> =
        volumes.values().map(|v| (v.id, v.as_ref())).collect();
    for start in journal.segment_first_seqs().into_iter().rev() {
        if by_id.is_empty() {
            break;
        }
        let mut found: BTreeMap<u32, u64> = BTreeMap::new();
        for record in journal.read_from(start)? {
            let record = record?;
            if by_id.contains_key(&record.volume) && record.source_seq != 0 {
                let e = found.entry(record.volume).or_default();
                *e = (*e).max(record.source_seq);
            }
        }
        for (id, seq) in found {
            if let Some(v) = by_id.remove(&id) {
                v.last_source_seq.store(seq, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// The group's volumes by name.
pub(super) type VolumesByName = BTreeMap<String, Arc<GroupVolume>>;

/// Opens the configured volumes' replicas and recovers each one's resume point: its last
/// source_seq in the journal or, if retention released that, the one stored then. Returns
/// the volumes by name and, per volume id, the distributed source_seq maxima they seed.
pub(super) fn open_volumes(
    config: &GroupConfig,
    meta: &GroupMeta,
    journal: &Journal,
    state: &GroupState,
) -> Result<(VolumesByName, BTreeMap<u32, u64>), ApplianceError> {
    let mut volumes = BTreeMap::new();
    for v in &config.volume {
        let id = meta.volumes.get(&v.name).copied().ok_or_else(|| {
            ApplianceError::Config(format!("volume {} has no id in group.state", v.name))
        })?;
        volumes.insert(v.name.clone(), Arc::new(open_volume(v, id)?));
    }
    let released_source_seqs = state.released_source_seqs()?;
    recover_last_source_seqs(journal, &volumes)?;
    // Everything recovered is durable, so it seeds the distributed maxima too.
    let mut distributed_source_seqs = BTreeMap::new();
    for v in volumes.values() {
        let released = released_source_seqs.get(&v.id).copied().unwrap_or(0);
        let seq = v
            .last_source_seq
            .fetch_max(released, Ordering::Relaxed)
            .max(released);
        distributed_source_seqs.insert(v.id, seq);
    }
    Ok((volumes, distributed_source_seqs))
}
