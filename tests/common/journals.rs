//! Reading a group's journal offline and comparing two copies' journals record by record (remote replication tests).

use std::collections::BTreeMap;
use std::path::Path;

use cdp_journal::{Journal, JournalConfig, Record};
use cdp_types::Seq;

/// A group directory's group id and volume name -> id, from its identity file (read with
/// the appliance's own decoder, so the tests follow the format).
pub fn volume_ids(group_dir: &Path) -> (u64, BTreeMap<String, u32>) {
    let meta = cdp_appliance::group_meta::GroupMeta::load(group_dir)
        .expect("readable group identity")
        .expect("the group directory has an identity");
    (meta.group_id, meta.volumes)
}

/// Every record of a stopped group directory's journal from seq 1, and volume id -> name.
pub fn read_journal(group_dir: &Path) -> (Vec<Record>, BTreeMap<u32, String>) {
    let (group_id, ids) = volume_ids(group_dir);
    let (journal, _) = Journal::open(
        &group_dir.join("journal"),
        group_id,
        JournalConfig::default(),
    )
    .unwrap();
    let records = journal
        .read_from(Seq(1))
        .unwrap()
        .map(|r| r.expect("readable record"))
        .collect();
    (records, ids.into_iter().map(|(n, id)| (id, n)).collect())
}

/// Both journals hold the same records seq by seq: same seq, time, kind, volume (by name),
/// range, source seq and payload; no gap, no duplicate. Returns how many were compared.
pub fn assert_same_journals(local_dir: &Path, remote_dir: &Path) -> usize {
    let (local, local_names) = read_journal(local_dir);
    let (remote, remote_names) = read_journal(remote_dir);
    assert_eq!(local.len(), remote.len(), "record counts differ");
    for (i, (a, b)) in local.iter().zip(&remote).enumerate() {
        assert_eq!(
            a.seq,
            Seq(i as u64 + 1),
            "local journal starts at 1, no gaps"
        );
        assert_eq!(a.seq, b.seq);
        assert_eq!(a.timestamp, b.timestamp, "seq {}", a.seq);
        assert_eq!(a.kind, b.kind, "seq {}", a.seq);
        if a.kind.change_kind().is_some() {
            assert_eq!(
                local_names.get(&a.volume),
                remote_names.get(&b.volume),
                "seq {}",
                a.seq
            );
        }
        assert_eq!(
            (a.offset, a.length, a.source_seq),
            (b.offset, b.length, b.source_seq)
        );
        assert!(a.payload == b.payload, "payload of seq {} differs", a.seq);
    }
    local.len()
}
