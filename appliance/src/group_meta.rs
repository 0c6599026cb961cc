//! A group's identity on disk: its journal id and the stable numeric id of each volume.
//!
//! Stored as `group.json` beside the journal, replaced atomically (write, fsync, rename,
//! fsync directory), so a crash leaves either the old or the new version, never a torn one.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ApplianceError;

const FORMAT: &str = "cdp-group";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupMeta {
    pub format: String,
    pub version: u32,
    pub name: String,
    /// Mixed into every journal record's CRC, so records of another group are rejected.
    pub group_id: u64,
    /// Volume name to the id carried in journal records. Ids are never reused.
    pub volumes: BTreeMap<String, u32>,
}

impl GroupMeta {
    fn path(dir: &Path) -> PathBuf {
        dir.join("group.json")
    }

    /// Loads the group's identity, creating it on first use and giving new volumes new ids.
    pub fn load_or_create(
        dir: &Path,
        name: &str,
        volume_names: &[String],
    ) -> Result<GroupMeta, ApplianceError> {
        let path = Self::path(dir);
        let state_err = |what: String| ApplianceError::State {
            path: path.display().to_string(),
            what,
        };
        let mut meta = match fs::read(&path) {
            Ok(bytes) => {
                let meta: GroupMeta = serde_json::from_slice(&bytes)
                    .map_err(|e| state_err(format!("unreadable: {e}")))?;
                if meta.format != FORMAT {
                    return Err(state_err(format!("not a group file ({:?})", meta.format)));
                }
                if meta.version != VERSION {
                    return Err(state_err(format!(
                        "version {} is not supported (this build reads {VERSION})",
                        meta.version
                    )));
                }
                if meta.name != name {
                    return Err(state_err(format!(
                        "belongs to group {:?}, not {name:?}",
                        meta.name
                    )));
                }
                meta
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => GroupMeta {
                format: FORMAT.into(),
                version: VERSION,
                name: name.into(),
                // One source of randomness for the whole program: `rand` (also the splitter's id).
                group_id: rand::random(),
                volumes: BTreeMap::new(),
            },
            Err(e) => return Err(state_err(e.to_string())),
        };
        let before = meta.clone();
        for v in volume_names {
            if !meta.volumes.contains_key(v) {
                let next = meta.volumes.values().max().map_or(1, |m| m + 1);
                meta.volumes.insert(v.clone(), next);
            }
        }
        if meta != before || !path.exists() {
            meta.store(dir)?;
        }
        Ok(meta)
    }

    fn store(&self, dir: &Path) -> Result<(), ApplianceError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| ApplianceError::State {
            path: dir.display().to_string(),
            what: e.to_string(),
        })?;
        write_atomically(&Self::path(dir), &json)
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ApplianceError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        fs::write(dir.path().join("group.json"), b"{garbage").unwrap();
        assert!(GroupMeta::load_or_create(dir.path(), "g", &[]).is_err());
    }
}
