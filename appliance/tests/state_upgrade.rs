//! Opening a group directory made before the state files had one format: the old JSON and
//! decimal files are read once, rewritten as `.state` files and deleted, and a damaged
//! state file stops the group as corruption, not as a configuration error.

use std::fs;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cdp_appliance::config::GroupConfig;
use cdp_appliance::error::ApplianceError;
use cdp_appliance::group::Group;
use cdp_appliance::state_file::{self, StateKind};
use cdp_journal::{Journal, JournalConfig, RecordIn};
use cdp_types::Seq;

const GROUP_ID: u64 = 0x5eed_0000_0000_0042;

fn config(dir: &Path) -> GroupConfig {
    let mut text = String::from("name = \"g\"\n");
    for name in ["a", "b"] {
        text += &format!(
            "[[volume]]\nname = \"{name}\"\nsize = 1048576\nreplica = {:?}\n",
            dir.join(format!("{name}.replica"))
        );
    }
    toml::from_str(&text).expect("group config")
}

fn open(dir: &Path) -> Result<std::sync::Arc<Group>, ApplianceError> {
    Group::open(
        dir,
        &config(dir),
        JournalConfig::default(),
        Duration::from_millis(10),
        Duration::ZERO,
    )
}

/// Writes a group directory the way the appliance did before `state_file.rs`: its
/// `group.json` (serde_json's pretty form of the old `GroupMeta`), a journal of records
/// bound to that group id, `source_seqs.json`, `consolidation.json` (serde_json's compact
/// form) and the decimal `undo.floor` and `resync.marker`.
fn write_old_directory(data_dir: &Path) -> std::path::PathBuf {
    let dir = data_dir.join("groups/g");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("group.json"),
        format!(
            "{{\n  \"format\": \"cdp-group\",\n  \"version\": 1,\n  \"name\": \"g\",\n  \"group_id\": {GROUP_ID},\n  \"volumes\": {{\n    \"a\": 1,\n    \"b\": 2\n  }}\n}}"
        ),
    )
    .unwrap();
    let (journal, _) =
        Journal::open(&dir.join("journal"), GROUP_ID, JournalConfig::default()).unwrap();
    for s in 1..=3u64 {
        let payload = Bytes::from(vec![s as u8; 4096]);
        journal
            .append(&[RecordIn::write(1, s * 4096, payload).with_source_seq(s)])
            .unwrap();
    }
    journal
        .append(&[RecordIn::write(2, 0, Bytes::from(vec![9u8; 4096])).with_source_seq(1)])
        .unwrap();
    journal.sync().unwrap();
    drop(journal);
    // Volume b's records up to source_seq 40 were released by retention long ago.
    fs::write(dir.join("source_seqs.json"), "{\"1\":2,\"2\":40}").unwrap();
    fs::write(
        dir.join("consolidation.json"),
        "{\"consolidated_below\":2,\"kept\":[1]}",
    )
    .unwrap();
    fs::write(dir.join("undo.floor"), "0").unwrap();
    // A resynchronisation by regions to point 7 that never finished.
    fs::write(dir.join("resync.marker"), "7").unwrap();
    dir
}

/// Opens an old directory twice: the first open upgrades every file (the journal opens
/// with the old group id, the resume points and kept points are the old files' values),
/// the second reads only the new files and finds the same.
#[test]
fn old_directory_is_upgraded_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_old_directory(tmp.path());
    for round in 0..2 {
        let group = open(tmp.path()).unwrap_or_else(|e| panic!("open, round {round}: {e}"));
        assert_eq!(group.last_seq(), Seq(4), "round {round}");
        let resume: Vec<(String, u32, u64)> = group
            .volumes()
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    v.id,
                    v.last_source_seq.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect();
        assert_eq!(
            resume,
            [("a".to_string(), 1, 3), ("b".to_string(), 2, 40)],
            "round {round}"
        );
        let consolidation = group.consolidation_state();
        assert_eq!(consolidation.consolidated_below, 2, "round {round}");
        assert_eq!(consolidation.kept.into_iter().collect::<Vec<_>>(), [1]);
        group.stop();
        drop(group);
        for kind in [
            StateKind::Group,
            StateKind::SourceSeqs,
            StateKind::Consolidation,
            StateKind::UndoFloor,
            StateKind::ResyncMarker,
        ] {
            assert!(
                state_file::path(&dir, kind).is_file(),
                "{kind:?} not rewritten"
            );
            assert!(
                !dir.join(kind.legacy_file_name()).exists(),
                "old {} kept",
                kind.legacy_file_name()
            );
        }
        assert_eq!(state_file::load_undo_floor(&dir).unwrap(), Some(0));
        assert_eq!(state_file::load_resync_marker(&dir).unwrap(), Some(7));
    }
}

/// A state file with one flipped bit stops the group with `Corruption` naming the file;
/// before the format, a damaged `source_seqs.json` was reported as a configuration error.
#[test]
fn damaged_state_file_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_old_directory(tmp.path());
    let group = open(tmp.path()).expect("open");
    group.stop();
    drop(group);
    for kind in [
        StateKind::Group,
        StateKind::SourceSeqs,
        StateKind::UndoFloor,
    ] {
        let path = state_file::path(&dir, kind);
        let good = fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[good.len() - 5] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        match open(tmp.path()) {
            Err(ApplianceError::Corruption { path: named, .. }) => {
                assert!(named.ends_with(kind.file_name()), "{named}")
            }
            Err(e) => panic!("{kind:?}: not reported as corruption: {e}"),
            Ok(_) => panic!("{kind:?}: a damaged file was accepted"),
        }
        fs::write(&path, &good).unwrap();
    }
    open(tmp.path()).expect("open after repair").stop();
}
