//! One format for a group's small state files: magic, kind, version, a length-prefixed body and a CRC32, replaced atomically.
//!
//! A group directory holds a few small facts that must survive crashes: its identity, the
//! source_seqs retention released, what consolidation kept, which source a remote copy
//! belongs to, where the undo stream started, and an unfinished resynchronisation by
//! regions. Each is one file, `NAME.state`, written by [`write_atomically`] (temp file,
//! fsync, rename, directory fsync), so a crash leaves the old or the new content. A file
//! whose magic, kind, length, version or CRC is wrong is [`StateFileError::Corruption`],
//! never a configuration error: nothing an administrator wrote can fix it.
//!
//! Byte layout, every file (little-endian):
//! ```text
//! 0      8  magic     b"CDPSTATE"
//! 8      4  kind      four ASCII bytes naming what the file holds (table below), so one
//!                     state file copied over another is refused
//! 12     4  version   of this kind's body layout (1 for every kind so far)
//! 16     4  body_len  n, at most STATE_BODY_BYTES_MAX
//! 20     n  body      the kind's fields (below)
//! 20+n   4  crc32     over bytes 0..20+n
//! ```
//! Bodies, version 1 (`str` = u32 byte length + UTF-8 bytes):
//! ```text
//! kind  file                       body
//! GRUP  group.state                group_id u64, name str, volume count u32,
//!                                  then per volume in name order: id u32, name str
//! SSEQ  source_seqs.state          count u32, then per volume in id order:
//!                                  id u32, highest released source_seq u64
//! CONS  consolidation.state        consolidated_below u64, count u32,
//!                                  then each kept seq u64, ascending
//! RSRC  replication_source.state   source_group_id u64
//! UNDF  undo_floor.state           the seq the undo stream started at, u64
//! RSYN  resync_marker.state        the point P of the unfinished resync, u64
//! ```
//! Never change a released version: add the next and keep reading the old.
//!
//! **Upgrade.** Data directories made before this format hold `group.json`,
//! `source_seqs.json`, `consolidation.json`, `replication_source.json` (JSON) and
//! `undo.floor`, `resync.marker` (decimal text). Loading a kind whose `.state` file is
//! absent reads the old file once, stores the `.state` file, then deletes the old one (a
//! crash in between leaves both; the `.state` file wins and the old one is deleted then).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::limits::STATE_BODY_BYTES_MAX;

const MAGIC: [u8; 8] = *b"CDPSTATE";
const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 4;
const VERSION_1: u32 = 1;

/// What went wrong reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {what}")]
    Corruption { path: String, what: String },
}

/// What is wrong with a state file's bytes (becomes [`StateFileError::Corruption`] with
/// the file's path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

impl From<String> for Malformed {
    fn from(what: String) -> Self {
        Malformed(what)
    }
}

impl From<&str> for Malformed {
    fn from(what: &str) -> Self {
        Malformed(what.to_string())
    }
}

/// Which fact a state file holds; each has its own file name and kind tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    Group,
    SourceSeqs,
    Consolidation,
    ReplicationSource,
    UndoFloor,
    ResyncMarker,
}

impl StateKind {
    fn tag(self) -> [u8; 4] {
        match self {
            StateKind::Group => *b"GRUP",
            StateKind::SourceSeqs => *b"SSEQ",
            StateKind::Consolidation => *b"CONS",
            StateKind::ReplicationSource => *b"RSRC",
            StateKind::UndoFloor => *b"UNDF",
            StateKind::ResyncMarker => *b"RSYN",
        }
    }

    /// The file's name in the group directory.
    pub fn file_name(self) -> &'static str {
        match self {
            StateKind::Group => "group.state",
            StateKind::SourceSeqs => "source_seqs.state",
            StateKind::Consolidation => "consolidation.state",
            StateKind::ReplicationSource => "replication_source.state",
            StateKind::UndoFloor => "undo_floor.state",
            StateKind::ResyncMarker => "resync_marker.state",
        }
    }

    /// The name the same fact had before this format (read once, then deleted).
    pub fn legacy_file_name(self) -> &'static str {
        match self {
            StateKind::Group => "group.json",
            StateKind::SourceSeqs => "source_seqs.json",
            StateKind::Consolidation => "consolidation.json",
            StateKind::ReplicationSource => "replication_source.json",
            StateKind::UndoFloor => "undo.floor",
            StateKind::ResyncMarker => "resync.marker",
        }
    }
}

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

/// Encodes one state file: header, body, CRC.
pub fn encode(kind: StateKind, version: u32, body: &[u8]) -> Vec<u8> {
    assert!(body.len() <= STATE_BODY_BYTES_MAX, "state body too large");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&kind.tag());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a whole state file of `kind` and returns its version and body.
pub fn decode(kind: StateKind, bytes: &[u8]) -> Result<(u32, &[u8]), Malformed> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(format!("{} bytes, shorter than a header", bytes.len()).into());
    }
    if bytes[0..8] != MAGIC {
        return Err("bad magic (not a cdp state file)".into());
    }
    if bytes[8..12] != kind.tag() {
        return Err(format!(
            "holds kind {:?}, expected {:?}",
            String::from_utf8_lossy(&bytes[8..12]),
            String::from_utf8_lossy(&kind.tag())
        )
        .into());
    }
    let version = u32_at(bytes, 12);
    let body_len = u32_at(bytes, 16) as usize;
    if body_len > STATE_BODY_BYTES_MAX {
        return Err(format!("body of {body_len} bytes is over the limit").into());
    }
    if bytes.len() != HEADER_LEN + body_len + CRC_LEN {
        return Err(format!(
            "{} bytes, the header says {}",
            bytes.len(),
            HEADER_LEN + body_len + CRC_LEN
        )
        .into());
    }
    let crc_at = HEADER_LEN + body_len;
    if u32_at(bytes, crc_at) != crc32fast::hash(&bytes[..crc_at]) {
        return Err("CRC mismatch".into());
    }
    if version != VERSION_1 {
        return Err(format!("unsupported version {version}").into());
    }
    Ok((version, &bytes[HEADER_LEN..crc_at]))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content: temp
/// file, fsync, rename, directory fsync.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateFileError + '_ {
    move |source| StateFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, what: Malformed) -> StateFileError {
    StateFileError::Corruption {
        path: path.display().to_string(),
        what: what.0,
    }
}

/// Reads a file, `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StateFileError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn remove_file(path: &Path) -> Result<(), StateFileError> {
    fs::remove_file(path).map_err(io_err(path))?;
    sync_parent(path).map_err(io_err(path))
}

fn store_body(dir: &Path, kind: StateKind, body: &[u8]) -> Result<(), StateFileError> {
    let path = dir.join(kind.file_name());
    if body.len() > STATE_BODY_BYTES_MAX {
        return Err(StateFileError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!(
                "{} bytes of state, more than {STATE_BODY_BYTES_MAX}",
                body.len()
            )),
        });
    }
    write_atomically(&path, &encode(kind, VERSION_1, body)).map_err(io_err(&path))
}

/// Loads `kind` from `dir`: the `.state` file, or else the pre-format file, which is then
/// rewritten as a `.state` file and deleted. `None` when neither exists.
fn load<T>(
    dir: &Path,
    kind: StateKind,
    decode_body: impl Fn(&mut BodyReader<'_>) -> Result<T, Malformed>,
    decode_legacy: impl Fn(&[u8]) -> Result<T, Malformed>,
    encode_body: impl Fn(&T) -> Vec<u8>,
) -> Result<Option<T>, StateFileError> {
    let path = dir.join(kind.file_name());
    let legacy = dir.join(kind.legacy_file_name());
    if let Some(bytes) = read_optional(&path)? {
        let (_version, body) = decode(kind, &bytes).map_err(|what| corrupt(&path, what))?;
        let mut reader = BodyReader::new(body);
        let value = decode_body(&mut reader).map_err(|what| corrupt(&path, what))?;
        reader.finish().map_err(|what| corrupt(&path, what))?;
        // A crash between storing the new file and deleting the old one left both.
        if legacy.exists() {
            remove_file(&legacy)?;
        }
        return Ok(Some(value));
    }
    let Some(bytes) = read_optional(&legacy)? else {
        return Ok(None);
    };
    let value = decode_legacy(&bytes).map_err(|what| corrupt(&legacy, what))?;
    store_body(dir, kind, &encode_body(&value))?;
    remove_file(&legacy)?;
    tracing::info!(from = %legacy.display(), to = %path.display(), "state file upgraded");
    Ok(Some(value))
}

/// Deletes `kind`'s file (and a pre-format one), durably; absent is fine.
pub fn remove(dir: &Path, kind: StateKind) -> Result<(), StateFileError> {
    for name in [kind.file_name(), kind.legacy_file_name()] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path).map_err(io_err(&path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(())
}

/// Builds a body: little-endian integers and length-prefixed strings.
#[derive(Default)]
struct BodyWriter(Vec<u8>);

impl BodyWriter {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

/// Reads a body, checking every length against what is left before using it.
struct BodyReader<'a> {
    rest: &'a [u8],
}

impl<'a> BodyReader<'a> {
    fn new(body: &'a [u8]) -> Self {
        BodyReader { rest: body }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.rest.len() < n {
            return Err(format!(
                "body ends early ({} bytes left, {n} needed)",
                self.rest.len()
            )
            .into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn str(&mut self) -> Result<String, Malformed> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed::from("a name is not UTF-8"))
    }
    /// A count of items of at least `item_len` bytes each, checked against what is left
    /// so a bad count cannot make the reader allocate.
    fn count(&mut self, item_len: usize) -> Result<usize, Malformed> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_len) > self.rest.len() {
            return Err(format!("count {n} does not fit the body").into());
        }
        Ok(n)
    }
    fn finish(self) -> Result<(), Malformed> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes after the last field", self.rest.len()).into())
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Malformed> {
    serde_json::from_slice(bytes).map_err(|e| Malformed(format!("unreadable: {e}")))
}

fn parse_decimal(bytes: &[u8]) -> Result<u64, Malformed> {
    std::str::from_utf8(bytes)
        .map_err(|_| Malformed::from("not text"))?
        .trim()
        .parse()
        .map_err(|e| Malformed(format!("not a number: {e}")))
}

fn encode_seq(v: &u64) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u64(*v);
    w.0
}

fn decode_seq(r: &mut BodyReader<'_>) -> Result<u64, Malformed> {
    r.u64()
}

fn encode_group(g: &GroupIdentity) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u64(g.group_id).str(&g.name).u32(g.volumes.len() as u32);
    for (name, id) in &g.volumes {
        w.u32(*id).str(name);
    }
    w.0
}

fn decode_group(r: &mut BodyReader<'_>) -> Result<GroupIdentity, Malformed> {
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
struct LegacyGroup {
    format: String,
    version: u32,
    name: String,
    group_id: u64,
    volumes: BTreeMap<String, u32>,
}

fn decode_legacy_group(bytes: &[u8]) -> Result<GroupIdentity, Malformed> {
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

fn encode_source_seqs(seqs: &BTreeMap<u32, u64>) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u32(seqs.len() as u32);
    for (id, seq) in seqs {
        w.u32(*id).u64(*seq);
    }
    w.0
}

fn decode_source_seqs(r: &mut BodyReader<'_>) -> Result<BTreeMap<u32, u64>, Malformed> {
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

fn encode_consolidation(c: &ConsolidationPromise) -> Vec<u8> {
    let mut w = BodyWriter::default();
    w.u64(c.consolidated_below).u32(c.kept.len() as u32);
    for seq in &c.kept {
        w.u64(*seq);
    }
    w.0
}

fn decode_consolidation(r: &mut BodyReader<'_>) -> Result<ConsolidationPromise, Malformed> {
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
struct LegacyConsolidation {
    consolidated_below: u64,
    kept: BTreeSet<u64>,
}

fn decode_legacy_consolidation(bytes: &[u8]) -> Result<ConsolidationPromise, Malformed> {
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
struct LegacySource {
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

/// Path of `kind`'s file in `dir` (for messages and tests).
pub fn path(dir: &Path, kind: StateKind) -> PathBuf {
    dir.join(kind.file_name())
}

#[cfg(test)]
mod tests {
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
                &crc32fast::hash(b"CDPSTATEUNDF\x01\0\0\0\x08\0\0\0\x02\x01\0\0\0\0\0\0")
                    .to_le_bytes(),
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
}
