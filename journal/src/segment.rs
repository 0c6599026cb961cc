//! One segment file, `{index:016x}.seg`: a header followed by records, appended with
//! positioned writes and read with positioned reads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::env::{Env, EnvFile};
use crate::error::JournalError;
use crate::format::{SegmentHeader, Version, SEGMENT_HEADER_LEN};

/// File-name suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// The path of segment `index` in `dir`. Fixed-width hex so names sort like indexes.
pub fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:016x}{SEGMENT_SUFFIX}"))
}

/// The index a segment file name encodes, or `None` if the name is not a segment's.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SEGMENT_SUFFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// An open segment. `written` is the length readers may trust: every byte below it
/// belongs to a complete record whose append returned. It only grows, except that a
/// failed append never raised it in the first place.
#[derive(Debug)]
pub struct Segment {
    pub index: u64,
    pub first_seq: u64,
    /// When the segment was created (from its header), ns since the Unix epoch. Every
    /// record of the previous segment is at least this old, which lets retention judge
    /// a segment's age without reading it.
    pub created_ns: u64,
    file: EnvFile,
    written: AtomicU64,
    /// A read-only map, made on the first single-record read once the segment is sealed
    /// (a later segment exists, so it is never appended to or truncated again): reads then
    /// cost no system call. `None` if mapping failed; reads fall back to `pread`.
    map: OnceLock<Option<memmap2::Mmap>>,
}

impl Segment {
    /// Creates segment `index` with its header and makes the header durable. The caller
    /// fsyncs the directory so the new name survives a crash too.
    pub fn create(
        env: &Env,
        dir: &Path,
        group_id: u64,
        index: u64,
        first_seq: u64,
        created_ns: u64,
    ) -> Result<Segment, JournalError> {
        let path = segment_path(dir, index);
        let file = env
            .create_new(&path)
            .map_err(|e| JournalError::io("create", &path, e))?;
        let header = SegmentHeader {
            version: Version::CURRENT,
            group_id,
            segment_index: index,
            first_seq,
            created_ns,
        };
        let result = file
            .write_all_at(&header.encode(), 0)
            .map_err(|e| JournalError::io("write header", &path, e))
            .and_then(|()| {
                file.sync_data()
                    .map_err(|e| JournalError::io("fdatasync", &path, e))
            });
        if let Err(e) = result {
            // Leave no half-written segment behind; if removing fails too, recovery
            // removes a segment whose header is incomplete.
            let _ = env.remove_file(&path);
            return Err(e);
        }
        Ok(Segment {
            index,
            first_seq,
            created_ns,
            file,
            written: AtomicU64::new(SEGMENT_HEADER_LEN as u64),
            map: OnceLock::new(),
        })
    }

    /// Wraps an already validated file whose good bytes end at `written`.
    pub fn from_file(file: EnvFile, header: &SegmentHeader, written: u64) -> Segment {
        Segment {
            index: header.segment_index,
            first_seq: header.first_seq,
            created_ns: header.created_ns,
            file,
            written: AtomicU64::new(written),
            map: OnceLock::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file(&self) -> &EnvFile {
        &self.file
    }

    /// The segment's bytes below `written`, mapped; only for a sealed segment (the caller
    /// knows a later one exists). `None` when mapping is not possible.
    pub fn sealed_bytes(&self) -> Option<&[u8]> {
        let map = self
            .map
            .get_or_init(|| match self.file.map_read_only() {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %self.path().display(), "mapping a sealed segment failed, reading it with pread: {e}");
                    None
                }
            })
            .as_ref()?;
        let written = (self.written() as usize).min(map.len());
        Some(&map[..written])
    }

    /// Bytes readers may read (header included).
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Appends `bufs` at the current end. On failure the file is truncated back so it
    /// still ends at a record boundary; if that truncation fails too, the error says so
    /// via `Err(Err(..))` and the caller must fence.
    pub fn append(&self, bufs: &[&[u8]], len: u64) -> Result<(), AppendFailure> {
        let start = self.written();
        match self.file.write_all_vectored_at(bufs, start) {
            Ok(()) => {
                self.written.store(start + len, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                let error = JournalError::io("write", self.path(), e);
                let undone = self.file.truncate(start).is_ok();
                Err(AppendFailure { error, undone })
            }
        }
    }

    /// fdatasync of everything written so far.
    pub fn sync(&self) -> Result<(), JournalError> {
        self.file
            .sync_data()
            .map_err(|e| JournalError::io("fdatasync", self.path(), e))
    }
}

/// A failed segment append: the error, and whether the partial write was cut away.
#[derive(Debug)]
pub struct AppendFailure {
    pub error: JournalError,
    pub undone: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names round-trip and anything else is not mistaken for a segment.
    #[test]
    fn names() {
        let p = segment_path(Path::new("/x"), 0xab);
        assert_eq!(p, Path::new("/x/00000000000000ab.seg"));
        assert_eq!(parse_segment_name("00000000000000ab.seg"), Some(0xab));
        assert_eq!(parse_segment_name("ab.seg"), None);
        assert_eq!(parse_segment_name("LOCK"), None);
        assert_eq!(parse_segment_name("00000000000000zz.seg"), None);
    }
}
