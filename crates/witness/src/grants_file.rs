//! `DATA_DIR/witness.state`: the grants a witness made, so that after a restart it never
//! grants a lease to a second site while the first's may still run. Encoding, decoding and
//! the atomic store only.
//!
//! Layout (little-endian), version 1:
//! ```text
//! 0   8  magic "CDPWITNS"
//! 8   2  version (1)
//! 10  2  reserved (0)
//! 12  4  body length N
//! 16  N  body: u32 group count, then per group (sorted by id):
//!          u16 id length, id bytes (UTF-8),
//!          u64 generation,
//!          u8 holder present (0/1), u16 holder length, holder bytes (UTF-8),
//!          u64 duration_ms (the longest lease granted to this holder at this generation)
//! 16+N 4 CRC32 of bytes 0..16+N
//! ```
//! Stored by temp file, fsync, rename, directory fsync. A file failing any check is
//! `WitnessError::Corruption`: the witness refuses to start rather than forget a grant.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::WitnessError;
use crate::limits::{GROUPS_MAX, NAME_BYTES_MAX};

pub const FILE_NAME: &str = "witness.state";
const MAGIC: &[u8; 8] = b"CDPWITNS";
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 16;

/// One group's persisted grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredGrant {
    pub group: String,
    /// Highest generation ever granted for the group (never goes down).
    pub generation: u64,
    /// The site holding (or last granted) the lease; `None` after a release.
    pub holder: Option<String>,
    pub duration_ms: u64,
}

pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    assert!(name.len() <= NAME_BYTES_MAX, "name checked at the boundary");
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

pub fn encode(grants: &[StoredGrant]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(grants.len() as u32).to_le_bytes());
    for g in grants {
        put_name(&mut body, &g.group);
        body.extend_from_slice(&g.generation.to_le_bytes());
        body.push(u8::from(g.holder.is_some()));
        put_name(&mut body, g.holder.as_deref().unwrap_or(""));
        body.extend_from_slice(&g.duration_ms.to_le_bytes());
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Why a grants file failed its checks.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantsFileError {
    #[error("{0} bytes, shorter than a header")]
    ShortHeader(usize),
    #[error("bad magic (not a witness state file)")]
    BadMagic,
    #[error("unknown version {0}")]
    UnknownVersion(u16),
    #[error("{actual} bytes, but the header says {expected}")]
    Length { actual: usize, expected: usize },
    #[error("CRC mismatch")]
    Crc,
    #[error("body ends at byte {0} inside a field")]
    Truncated(usize),
    #[error("a name of {0} bytes (at most {NAME_BYTES_MAX})")]
    NameTooLong(usize),
    #[error("a name is not UTF-8")]
    NameNotUtf8,
    #[error("{0} groups (at most {GROUPS_MAX})")]
    TooManyGroups(usize),
    #[error("holder flag {0}")]
    HolderFlag(u8),
    #[error("bytes after the last group")]
    TrailingBytes,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GrantsFileError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(GrantsFileError::Truncated(self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, GrantsFileError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, GrantsFileError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, GrantsFileError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, GrantsFileError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn name(&mut self) -> Result<String, GrantsFileError> {
        let len = usize::from(self.u16()?);
        if len > NAME_BYTES_MAX {
            return Err(GrantsFileError::NameTooLong(len));
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| GrantsFileError::NameNotUtf8)
    }
}

/// Decodes a whole file; `Err` says which check failed.
pub fn decode(bytes: &[u8]) -> Result<Vec<StoredGrant>, GrantsFileError> {
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(GrantsFileError::ShortHeader(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(GrantsFileError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(GrantsFileError::UnknownVersion(version));
    }
    let body_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if bytes.len() != HEADER_BYTES + body_len + 4 {
        return Err(GrantsFileError::Length {
            actual: bytes.len(),
            expected: HEADER_BYTES + body_len + 4,
        });
    }
    let (covered, crc) = bytes.split_at(HEADER_BYTES + body_len);
    if crc32fast::hash(covered) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(GrantsFileError::Crc);
    }
    let mut c = Cursor {
        bytes: &covered[HEADER_BYTES..],
        at: 0,
    };
    let count = c.u32()? as usize;
    if count > GROUPS_MAX {
        return Err(GrantsFileError::TooManyGroups(count));
    }
    let mut grants = Vec::with_capacity(count);
    for _ in 0..count {
        let group = c.name()?;
        let generation = c.u64()?;
        let present = c.u8()?;
        let holder = c.name()?;
        let duration_ms = c.u64()?;
        let holder = match present {
            0 => None,
            1 => Some(holder),
            p => return Err(GrantsFileError::HolderFlag(p)),
        };
        grants.push(StoredGrant {
            group,
            generation,
            holder,
            duration_ms,
        });
    }
    if c.at != c.bytes.len() {
        return Err(GrantsFileError::TrailingBytes);
    }
    Ok(grants)
}

/// Reads the file; an absent file is an empty list (a witness that never granted).
pub fn load(data_dir: &Path) -> Result<Vec<StoredGrant>, WitnessError> {
    let path = path_in(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WitnessError::io(format!("reading {}", path.display()), e)),
    };
    decode(&bytes).map_err(|e| WitnessError::Corruption {
        path,
        reason: e.to_string(),
    })
}

/// Replaces the file atomically and durably: temp file, fsync, rename, directory fsync.
pub fn store(data_dir: &Path, grants: &[StoredGrant]) -> Result<(), WitnessError> {
    let bytes = encode(grants);
    // Pair assertion: what is written must read back as what was meant.
    debug_assert_eq!(decode(&bytes).as_deref(), Ok(grants));
    let path = path_in(data_dir);
    let temp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let io = |what: &str, e| WitnessError::io(format!("{what} {}", temp.display()), e);
    let mut f = std::fs::File::create(&temp).map_err(|e| io("creating", e))?;
    f.write_all(&bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    std::fs::rename(&temp, &path)
        .map_err(|e| WitnessError::io(format!("renaming into {}", path.display()), e))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WitnessError::io(format!("syncing directory {}", data_dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<StoredGrant> {
        vec![
            StoredGrant {
                group: "g".into(),
                generation: 2,
                holder: Some("a".into()),
                duration_ms: 3000,
            },
            StoredGrant {
                group: "h".into(),
                generation: 7,
                holder: None,
                duration_ms: 1000,
            },
        ]
    }

    #[test]
    fn golden_bytes_version_1() {
        let bytes = encode(&sample()[..1]);
        let mut expected = Vec::new();
        expected.extend_from_slice(b"CDPWITNS\x01\x00\x00\x00");
        expected.extend_from_slice(&27u32.to_le_bytes());
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(b"\x01\x00g");
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"\x01\x01\x00a");
        expected.extend_from_slice(&3000u64.to_le_bytes());
        let crc = crc32fast::hash(&expected);
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(decode(&bytes).unwrap(), sample()[..1].to_vec());
    }

    #[test]
    fn every_flipped_bit_and_every_cut_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode(&b).is_err(), "bit {i}");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn store_and_load_round_trip_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![]);
        store(dir.path(), &sample()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), sample());
        let path = path_in(dir.path());
        let mut b = std::fs::read(&path).unwrap();
        b[20] ^= 0xff;
        std::fs::write(&path, b).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(matches!(e, WitnessError::Corruption { .. }), "{e}");
    }
}
