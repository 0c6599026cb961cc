//! The group's persistent small state: the one home for every fact of a group that must
//! survive a restart apart from its journal, undo stream and replicas.
//!
//! Each fact is one file in the group directory, in the one format of `state_file.rs`
//! (magic, kind, version, CRC, replaced atomically), except `distribution.state`, whose
//! fixed 24-byte layout `distribution_state.rs` keeps because it is rewritten at every
//! checkpoint. The parts of the group reach these files only through [`GroupState`]; a new
//! fact (a failover role, a generation history, an archive watermark) gets a `StateKind`
//! and a body codec in `state_file.rs` and a load/store pair here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cdp_types::Seq;

use crate::consolidation::ConsolidationState;
use crate::distribution_state;
use crate::error::ApplianceError;
use crate::group_meta::GroupMeta;
use crate::state_file::{self, StateFileError, StateKind};

/// The group directory's small state files.
pub(super) struct GroupState {
    dir: PathBuf,
    /// `distribution.state`: the replica holds every record up to this seq.
    distribution: PathBuf,
}

impl GroupState {
    /// The state of the group whose directory is `dir`, created if absent.
    pub(super) fn open(dir: PathBuf) -> Result<GroupState, ApplianceError> {
        std::fs::create_dir_all(&dir)?;
        Ok(GroupState {
            distribution: dir.join(DISTRIBUTION_STATE_FILE),
            dir,
        })
    }

    /// The group directory (the journal and the undo stream live below it).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The group's identity and volume ids (`group.state`), with ids for `volumes` it lacks.
    pub(super) fn meta(&self, name: &str, volumes: &[String]) -> Result<GroupMeta, ApplianceError> {
        GroupMeta::load_or_create(&self.dir, name, volumes)
    }

    /// Where `meta` keeps the volume ids, for error messages.
    pub(super) fn meta_path(&self) -> PathBuf {
        state_file::path(&self.dir, StateKind::Group)
    }

    /// The last distribution checkpoint (`Seq::ZERO` for a new group).
    pub(super) fn distributed(&self) -> Result<Seq, ApplianceError> {
        distribution_state::load(&self.distribution)
    }

    /// Stores a distribution checkpoint; the replicas must already be synced through it.
    pub(super) fn store_distributed(&self, distributed: Seq) -> Result<(), ApplianceError> {
        distribution_state::store(&self.distribution, distributed)
    }

    /// The seq the undo stream started at (`undo_floor.state`), stored as `distributed` the
    /// first time. Points below it have no before-images (the group was distributed before
    /// the stream existed).
    pub(super) fn undo_floor_or_create(&self, distributed: Seq) -> Result<u64, ApplianceError> {
        match state_file::load_undo_floor(&self.dir)? {
            Some(floor) => Ok(floor),
            None => {
                state_file::store_undo_floor(&self.dir, distributed.0)?;
                Ok(distributed.0)
            }
        }
    }

    /// Per volume id, the highest source_seq among records retention released.
    pub(super) fn released_source_seqs(&self) -> Result<BTreeMap<u32, u64>, ApplianceError> {
        Ok(state_file::load_source_seqs(&self.dir)?)
    }

    /// Stores the distributed source_seq maxima before retention releases records.
    pub(super) fn store_released_source_seqs(
        &self,
        seqs: &BTreeMap<u32, u64>,
    ) -> Result<(), ApplianceError> {
        Ok(state_file::store_source_seqs(&self.dir, seqs)?)
    }

    /// The points consolidation kept (`consolidation.state`).
    pub(super) fn consolidation(&self) -> Result<ConsolidationState, StateFileError> {
        ConsolidationState::load(&self.dir)
    }

    pub(super) fn store_consolidation(
        &self,
        state: &ConsolidationState,
    ) -> Result<(), StateFileError> {
        state.store(&self.dir)
    }

    /// The point P of an unfinished resynchronisation by regions (`resync_marker.state`).
    pub(super) fn resync_marker(&self) -> Result<Option<u64>, StateFileError> {
        state_file::load_resync_marker(&self.dir)
    }

    pub(super) fn store_resync_marker(&self, through: u64) -> Result<(), StateFileError> {
        state_file::store_resync_marker(&self.dir, through)
    }

    pub(super) fn remove_resync_marker(&self) -> Result<(), StateFileError> {
        state_file::remove(&self.dir, StateKind::ResyncMarker)
    }

    pub(super) fn resync_marker_path(&self) -> PathBuf {
        state_file::path(&self.dir, StateKind::ResyncMarker)
    }
}

/// The distribution checkpoint's file name in the group directory.
const DISTRIBUTION_STATE_FILE: &str = "distribution.state";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_group_starts_undistributed_and_keeps_its_first_undo_floor() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = GroupState::open(dir.path().join("g")).expect("open");
        assert_eq!(state.distributed().expect("distributed"), Seq::ZERO);
        assert_eq!(state.undo_floor_or_create(Seq(7)).expect("floor"), 7);
        state.store_distributed(Seq(42)).expect("store");
        // The floor is where the stream started, not where distribution is now.
        assert_eq!(state.undo_floor_or_create(Seq(42)).expect("floor"), 7);
        let reopened = GroupState::open(dir.path().join("g")).expect("reopen");
        assert_eq!(reopened.distributed().expect("distributed"), Seq(42));
        assert!(reopened.resync_marker().expect("marker").is_none());
        reopened.store_resync_marker(9).expect("marker");
        assert_eq!(reopened.resync_marker().expect("marker"), Some(9));
        reopened.remove_resync_marker().expect("remove");
        assert!(reopened.resync_marker().expect("marker").is_none());
    }

    #[test]
    fn released_source_seqs_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = GroupState::open(dir.path().to_path_buf()).expect("open");
        assert!(state.released_source_seqs().expect("load").is_empty());
        let seqs = BTreeMap::from([(1, 10), (3, 30)]);
        state.store_released_source_seqs(&seqs).expect("store");
        assert_eq!(state.released_source_seqs().expect("load"), seqs);
    }
}
