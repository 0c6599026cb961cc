//! Golden bytes, round trips, corruption and upgrade of the state files.

use std::collections::{BTreeMap, BTreeSet};

use super::body::*;
use super::facts::*;
use super::*;

fn group() -> GroupIdentity {
    GroupIdentity {
        group_id: 0x0102_0304_0506_0708,
        name: "g".into(),
        volumes: BTreeMap::from([("a".to_string(), 1), ("bc".to_string(), 2)]),
    }
}

/// Golden bytes of version 1: the header and a `GRUP` body, byte by byte, so a change
/// to the released layout fails here.
#[test]
fn golden_v1_group() {
    let bytes = encode(StateKind::Group, 1, &encode_group(&group()));
    let mut want: Vec<u8> = Vec::new();
    want.extend_from_slice(b"CDPSTATE");
    want.extend_from_slice(b"GRUP");
    want.extend_from_slice(&[1, 0, 0, 0]);
    want.extend_from_slice(&[36, 0, 0, 0]); // body length
    want.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]); // group_id
    want.extend_from_slice(&[1, 0, 0, 0, b'g']); // name
    want.extend_from_slice(&[2, 0, 0, 0]); // volume count
    want.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0, b'a']);
    want.extend_from_slice(&[2, 0, 0, 0, 2, 0, 0, 0, b'b', b'c']);
    let crc = crc32fast::hash(&want);
    want.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(bytes, want);
    assert_eq!(&bytes[bytes.len() - 4..], &[0x8c, 0xcb, 0x3d, 0x8e]);
}

/// Golden bytes of the scalar, source_seqs and consolidation bodies.
#[test]
fn golden_v1_bodies() {
    assert_eq!(
        encode(StateKind::UndoFloor, 1, &encode_seq(&0x0102)),
        [
            b"CDPSTATEUNDF".as_slice(),
            &[1, 0, 0, 0, 8, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0],
            &crc32fast::hash(b"CDPSTATEUNDF\x01\0\0\0\x08\0\0\0\x02\x01\0\0\0\0\0\0").to_le_bytes(),
        ]
        .concat()
    );
    assert_eq!(
        encode_source_seqs(&BTreeMap::from([(3, 9)])),
        [1, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]
    );
    let c = ConsolidationPromise {
        consolidated_below: 5,
        kept: BTreeSet::from([2, 4]),
    };
    assert_eq!(
        encode_consolidation(&c),
        [5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]
    );
}

/// Every kind round-trips through its file, and a stored file is read back as stored.
#[test]
fn round_trip_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(load_group(d).unwrap(), None);
    store_group(d, &group()).unwrap();
    assert_eq!(load_group(d).unwrap(), Some(group()));
    let seqs = BTreeMap::from([(1, 10), (7, u64::MAX)]);
    store_source_seqs(d, &seqs).unwrap();
    assert_eq!(load_source_seqs(d).unwrap(), seqs);
    let c = ConsolidationPromise {
        consolidated_below: 50,
        kept: BTreeSet::from([3, 9, 40]),
    };
    store_consolidation(d, &c).unwrap();
    assert_eq!(load_consolidation(d).unwrap(), Some(c));
    store_replication_source(d, 0xfeed).unwrap();
    assert_eq!(load_replication_source(d).unwrap(), Some(0xfeed));
    store_undo_floor(d, 12).unwrap();
    assert_eq!(load_undo_floor(d).unwrap(), Some(12));
    assert_eq!(load_resync_marker(d).unwrap(), None);
    store_resync_marker(d, 33).unwrap();
    assert_eq!(load_resync_marker(d).unwrap(), Some(33));
    remove(d, StateKind::ResyncMarker).unwrap();
    assert_eq!(load_resync_marker(d).unwrap(), None);
    remove(d, StateKind::ResyncMarker).unwrap();
}

/// Any flipped bit, a truncation, trailing bytes, another kind's file and a bad body
/// all read as Corruption naming the file, never as a value or a config error.
#[test]
fn damage_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    store_group(d, &group()).unwrap();
    let good = fs::read(path(d, StateKind::Group)).unwrap();
    let is_corruption = |bytes: &[u8]| {
        fs::write(path(d, StateKind::Group), bytes).unwrap();
        matches!(load_group(d), Err(StateFileError::Corruption { path, .. }) if path.ends_with("group.state"))
    };
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(is_corruption(&bad), "bit {bit} flipped was accepted");
    }
    for len in 0..good.len() {
        assert!(is_corruption(&good[..len]), "truncated to {len} accepted");
    }
    assert!(is_corruption(&[good.as_slice(), &[0]].concat()));
    let other = encode(StateKind::UndoFloor, 1, &encode_seq(&1));
    assert!(is_corruption(&other));
    // A valid CRC over a body that does not parse: a count larger than the body.
    let bad_body = encode(StateKind::Group, 1, &[0u8; 8]);
    assert!(is_corruption(&bad_body));
    let mut w = BodyWriter::default();
    w.u64(1).str("g").u32(u32::MAX);
    assert!(is_corruption(&encode(StateKind::Group, 1, &w.0)));
    let future = encode(StateKind::Group, 2, &encode_group(&group()));
    assert!(is_corruption(&future));
}

/// Files written by the appliance before this format (the bytes its serde_json and
/// decimal writers produced) are read once, rewritten as `.state` files and deleted.
#[test]
fn legacy_files_are_upgraded_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(
        d.join("group.json"),
        "{\n  \"format\": \"cdp-group\",\n  \"version\": 1,\n  \"name\": \"g\",\n  \"group_id\": 72623859790382856,\n  \"volumes\": {\n    \"a\": 1,\n    \"bc\": 2\n  }\n}",
    )
    .unwrap();
    fs::write(d.join("source_seqs.json"), "{\"1\":10,\"7\":3}").unwrap();
    fs::write(
        d.join("consolidation.json"),
        "{\"consolidated_below\":50,\"kept\":[3,9,40]}",
    )
    .unwrap();
    fs::write(
        d.join("replication_source.json"),
        "{\"source_group_id\":65261}",
    )
    .unwrap();
    fs::write(d.join("undo.floor"), "12").unwrap();
    fs::write(d.join("resync.marker"), "33").unwrap();
    for _ in 0..2 {
        assert_eq!(load_group(d).unwrap(), Some(group()));
        assert_eq!(
            load_source_seqs(d).unwrap(),
            BTreeMap::from([(1, 10), (7, 3)])
        );
        assert_eq!(
            load_consolidation(d).unwrap().map(|c| c.kept),
            Some(BTreeSet::from([3, 9, 40]))
        );
        assert_eq!(load_replication_source(d).unwrap(), Some(65261));
        assert_eq!(load_undo_floor(d).unwrap(), Some(12));
        assert_eq!(load_resync_marker(d).unwrap(), Some(33));
    }
    for kind in [
        StateKind::Group,
        StateKind::SourceSeqs,
        StateKind::Consolidation,
        StateKind::ReplicationSource,
        StateKind::UndoFloor,
        StateKind::ResyncMarker,
    ] {
        assert!(path(d, kind).is_file(), "{kind:?} not rewritten");
        assert!(
            !d.join(kind.legacy_file_name()).exists(),
            "{kind:?}'s old file kept"
        );
    }
    // A crash after the rewrite but before the old file went: the new file wins.
    fs::write(d.join("undo.floor"), "99").unwrap();
    assert_eq!(load_undo_floor(d).unwrap(), Some(12));
    assert!(!d.join("undo.floor").exists());
    // An unreadable old file is corruption too.
    fs::write(d.join("resync.marker"), "x").unwrap();
    remove(d, StateKind::ResyncMarker).unwrap();
    fs::write(d.join("resync.marker"), "x").unwrap();
    assert!(matches!(
        load_resync_marker(d),
        Err(StateFileError::Corruption { .. })
    ));
}
