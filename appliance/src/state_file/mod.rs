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
//! ROLE  role.state                 role, generation history, last failover (`role.rs`)
//! ```
//! Never change a released version: add the next and keep reading the old.
//!
//! **Upgrade.** Data directories made before this format hold `group.json`,
//! `source_seqs.json`, `consolidation.json`, `replication_source.json` (JSON) and
//! `undo.floor`, `resync.marker` (decimal text). Loading a kind whose `.state` file is
//! absent reads the old file once, stores the `.state` file, then deletes the old one (a
//! crash in between leaves both; the `.state` file wins and the old one is deleted then).

mod body;
mod facts;
#[cfg(test)]
mod tests;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::limits::STATE_BODY_BYTES_MAX;
use body::BodyReader;

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
    Role,
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
            StateKind::Role => *b"ROLE",
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
            StateKind::Role => "role.state",
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
            // Never existed before this format: nothing to upgrade.
            StateKind::Role => "role.none",
        }
    }
}

pub use facts::{
    load_consolidation, load_group, load_replication_source, load_resync_marker, load_source_seqs,
    load_undo_floor, store_consolidation, store_group, store_replication_source,
    store_resync_marker, store_source_seqs, store_undo_floor, ConsolidationPromise, GroupIdentity,
};

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

/// Loads a kind whose body another module decodes (`role.rs`); `None` when absent.
pub fn load_body(dir: &Path, kind: StateKind) -> Result<Option<Vec<u8>>, StateFileError> {
    let path = dir.join(kind.file_name());
    let Some(bytes) = read_optional(&path)? else {
        return Ok(None);
    };
    let (_version, body) = decode(kind, &bytes).map_err(|what| corrupt(&path, what))?;
    Ok(Some(body.to_vec()))
}

/// Stores a body another module encoded, atomically.
pub fn store_raw_body(dir: &Path, kind: StateKind, body: &[u8]) -> Result<(), StateFileError> {
    store_body(dir, kind, body)
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

/// Path of `kind`'s file in `dir` (for messages and tests).
pub fn path(dir: &Path, kind: StateKind) -> PathBuf {
    dir.join(kind.file_name())
}
