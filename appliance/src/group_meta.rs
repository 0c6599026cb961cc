//! A group's identity on disk: its journal id and the stable numeric id of each volume.
//!
//! Stored as `group.state` (kind `GRUP`, layout in `state_file.rs`) beside the journal,
//! replaced atomically, so a crash leaves either the old or the new version, never a torn
//! one. A directory from before that format has `group.json`, read once and rewritten.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::ApplianceError;
use crate::state_file::{self, GroupIdentity};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMeta {
    pub name: String,
    /// Mixed into every journal record's CRC, so records of another group are rejected.
    pub group_id: u64,
    /// Volume name to the id carried in journal records. Ids are never reused.
    pub volumes: BTreeMap<String, u32>,
}

impl GroupMeta {
    /// Reads a group directory's identity without creating or changing anything (offline
    /// tools and tests); `None` if the directory has none yet. Upgrades a `group.json`.
    pub fn load(dir: &Path) -> Result<Option<GroupMeta>, ApplianceError> {
        Ok(state_file::load_group(dir)?.map(|g| GroupMeta {
            name: g.name,
            group_id: g.group_id,
            volumes: g.volumes,
        }))
    }

    /// Loads the group's identity, creating it on first use and giving new volumes new ids.
    pub fn load_or_create(
        dir: &Path,
        name: &str,
        volume_names: &[String],
    ) -> Result<GroupMeta, ApplianceError> {
        let stored = Self::load(dir)?;
        let mut meta = match stored.clone() {
            Some(meta) => {
                if meta.name != name {
                    return Err(ApplianceError::Corruption {
                        path: state_file::path(dir, state_file::StateKind::Group)
                            .display()
                            .to_string(),
                        what: format!("belongs to group {:?}, not {name:?}", meta.name),
                    });
                }
                meta
            }
            None => GroupMeta {
                name: name.into(),
                // One source of randomness for the whole program: `rand` (also the
                // splitter's id).
                group_id: rand::random(),
                volumes: BTreeMap::new(),
            },
        };
        for v in volume_names {
            if !meta.volumes.contains_key(v) {
                let next = meta.volumes.values().max().map_or(1, |m| m + 1);
                meta.volumes.insert(v.clone(), next);
            }
        }
        if stored.as_ref() != Some(&meta) {
            meta.store(dir)?;
        }
        Ok(meta)
    }

    fn store(&self, dir: &Path) -> Result<(), ApplianceError> {
        Ok(state_file::store_group(
            dir,
            &GroupIdentity {
                group_id: self.group_id,
                name: self.name.clone(),
                volumes: self.volumes.clone(),
            },
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn ids_are_stable_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = GroupMeta::load_or_create(dir.path(), "g", &["a".into(), "b".into()]).unwrap();
        let again = GroupMeta::load_or_create(dir.path(), "g", &["b".into(), "a".into()]).unwrap();
        assert_eq!(a, again);
        let more = GroupMeta::load_or_create(dir.path(), "g", &["c".into()]).unwrap();
        assert_eq!(more.volumes["c"], 3);
        assert_eq!(more.group_id, a.group_id);
        assert!(GroupMeta::load_or_create(dir.path(), "other", &[]).is_err());
        // A damaged file is corruption, and so is an unreadable one from before the format.
        let path = dir.path().join("group.state");
        let mut bytes = fs::read(&path).unwrap();
        bytes[30] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            GroupMeta::load_or_create(dir.path(), "g", &[]),
            Err(ApplianceError::Corruption { .. })
        ));
        fs::remove_file(&path).unwrap();
        fs::write(dir.path().join("group.json"), b"{garbage").unwrap();
        assert!(matches!(
            GroupMeta::load_or_create(dir.path(), "g", &[]),
            Err(ApplianceError::Corruption { .. })
        ));
    }
}
