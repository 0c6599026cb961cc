//! Each fact a group directory keeps: its body layout (version 1), its pre-format
//! reader, and its load/store pair.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::body::{parse_decimal, parse_json, BodyReader, BodyWriter};
use super::{load, store_body, Malformed, StateFileError, StateKind};

/// A group's identity (kind `GRUP`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupIdentity {
    pub group_id: u64,
    pub name: String,
    pub volumes: BTreeMap<String, u32>,
}

/// What consolidation promised (kind `CONS`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsolidationPromise {
    pub consolidated_below: u64,
    pub kept: BTreeSet<u64>,
}

pub(super) fn encode_seq(v: &u64) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u64(*v);
    w.0
}

pub(super) fn decode_seq(r: &mut BodyReader<'_>) -> Result<u64, Malformed> {
    r.u64()
}

pub(super) fn encode_group(g: &GroupIdentity) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u64(g.group_id).str(&g.name).u32(g.volumes.len() as u32);
    for (name, id) in &g.volumes {
        w.u32(*id).str(name);
    }
    w.0
}

pub(super) fn decode_group(r: &mut BodyReader<'_>) -> Result<GroupIdentity, Malformed> {
    let group_id = r.u64()?;
    let name = r.str()?;
    let n = r.count(8)?;
    let mut volumes = BTreeMap::new();
    for _ in 0..n {
        let id = r.u32()?;
        let name = r.str()?;
        if volumes.insert(name.clone(), id).is_some() {
            return Err(format!("volume {name:?} listed twice").into());
        }
    }
    Ok(GroupIdentity {
        group_id,
        name,
        volumes,
    })
}

/// `group.json` as the appliance wrote it before this format.
#[derive(serde::Deserialize)]
pub(super) struct LegacyGroup {
    format: String,
    version: u32,
    name: String,
    group_id: u64,
    volumes: BTreeMap<String, u32>,
}

pub(super) fn decode_legacy_group(bytes: &[u8]) -> Result<GroupIdentity, Malformed> {
    let g: LegacyGroup = parse_json(bytes)?;
    if g.format != "cdp-group" {
        return Err(format!("not a group file ({:?})", g.format).into());
    }
    if g.version != 1 {
        return Err(format!("version {} (this appliance reads version 1)", g.version).into());
    }
    Ok(GroupIdentity {
        group_id: g.group_id,
        name: g.name,
        volumes: g.volumes,
    })
}

pub fn load_group(dir: &Path) -> Result<Option<GroupIdentity>, StateFileError> {
    load(
        dir,
        StateKind::Group,
        decode_group,
        decode_legacy_group,
        encode_group,
    )
}

pub fn store_group(dir: &Path, g: &GroupIdentity) -> Result<(), StateFileError> {
    store_body(dir, StateKind::Group, &encode_group(g))
}

pub(super) fn encode_source_seqs(seqs: &BTreeMap<u32, u64>) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u32(seqs.len() as u32);
    for (id, seq) in seqs {
        w.u32(*id).u64(*seq);
    }
    w.0
}

pub(super) fn decode_source_seqs(r: &mut BodyReader<'_>) -> Result<BTreeMap<u32, u64>, Malformed> {
    let n = r.count(12)?;
    let mut seqs = BTreeMap::new();
    for _ in 0..n {
        let id = r.u32()?;
        if seqs.insert(id, r.u64()?).is_some() {
            return Err(format!("volume id {id} listed twice").into());
        }
    }
    Ok(seqs)
}

/// Per volume id, the highest source_seq retention may have released; empty if never stored.
pub fn load_source_seqs(dir: &Path) -> Result<BTreeMap<u32, u64>, StateFileError> {
    Ok(load(
        dir,
        StateKind::SourceSeqs,
        decode_source_seqs,
        parse_json,
        encode_source_seqs,
    )?
    .unwrap_or_default())
}

pub fn store_source_seqs(dir: &Path, seqs: &BTreeMap<u32, u64>) -> Result<(), StateFileError> {
    store_body(dir, StateKind::SourceSeqs, &encode_source_seqs(seqs))
}

pub(super) fn encode_consolidation(c: &ConsolidationPromise) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u64(c.consolidated_below).u32(c.kept.len() as u32);
    for seq in &c.kept {
        w.u64(*seq);
    }
    w.0
}

pub(super) fn decode_consolidation(
    r: &mut BodyReader<'_>,
) -> Result<ConsolidationPromise, Malformed> {
    let consolidated_below = r.u64()?;
    let n = r.count(8)?;
    let mut kept = BTreeSet::new();
    let mut last = None;
    for _ in 0..n {
        let seq = r.u64()?;
        if last.is_some_and(|l| l >= seq) {
            return Err("kept points are not ascending".into());
        }
        last = Some(seq);
        kept.insert(seq);
    }
    Ok(ConsolidationPromise {
        consolidated_below,
        kept,
    })
}

/// `consolidation.json` as the appliance wrote it before this format.
#[derive(serde::Deserialize)]
pub(super) struct LegacyConsolidation {
    consolidated_below: u64,
    kept: BTreeSet<u64>,
}

pub(super) fn decode_legacy_consolidation(bytes: &[u8]) -> Result<ConsolidationPromise, Malformed> {
    let c: LegacyConsolidation =
        parse_json(bytes).map_err(|e| Malformed(format!("not a consolidation state: {e}")))?;
    Ok(ConsolidationPromise {
        consolidated_below: c.consolidated_below,
        kept: c.kept,
    })
}

pub fn load_consolidation(dir: &Path) -> Result<Option<ConsolidationPromise>, StateFileError> {
    load(
        dir,
        StateKind::Consolidation,
        decode_consolidation,
        decode_legacy_consolidation,
        encode_consolidation,
    )
}

pub fn store_consolidation(dir: &Path, c: &ConsolidationPromise) -> Result<(), StateFileError> {
    store_body(dir, StateKind::Consolidation, &encode_consolidation(c))
}

/// `replication_source.json` as the appliance wrote it before this format.
#[derive(serde::Deserialize)]
pub(super) struct LegacySource {
    source_group_id: u64,
}

/// The source group id a remote copy is bound to, if bound.
pub fn load_replication_source(dir: &Path) -> Result<Option<u64>, StateFileError> {
    load(
        dir,
        StateKind::ReplicationSource,
        decode_seq,
        |b| parse_json::<LegacySource>(b).map(|s| s.source_group_id),
        encode_seq,
    )
}

pub fn store_replication_source(dir: &Path, source_group_id: u64) -> Result<(), StateFileError> {
    store_body(
        dir,
        StateKind::ReplicationSource,
        &encode_seq(&source_group_id),
    )
}

/// The seq the undo stream started at, if stored.
pub fn load_undo_floor(dir: &Path) -> Result<Option<u64>, StateFileError> {
    load(
        dir,
        StateKind::UndoFloor,
        decode_seq,
        parse_decimal,
        encode_seq,
    )
}

pub fn store_undo_floor(dir: &Path, seq: u64) -> Result<(), StateFileError> {
    store_body(dir, StateKind::UndoFloor, &encode_seq(&seq))
}

/// The point of an unfinished resynchronisation by regions, if one is in progress.
pub fn load_resync_marker(dir: &Path) -> Result<Option<u64>, StateFileError> {
    load(
        dir,
        StateKind::ResyncMarker,
        decode_seq,
        parse_decimal,
        encode_seq,
    )
}

pub fn store_resync_marker(dir: &Path, through: u64) -> Result<(), StateFileError> {
    store_body(dir, StateKind::ResyncMarker, &encode_seq(&through))
}
