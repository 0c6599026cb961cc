//! The manifest of one archive generation: which group owns the prefix, every archived
//! segment with its checksums, and the bookmarks. Stored as JSON with a BLAKE3 trailer line
//! so a torn or altered manifest is refused rather than trusted.

use serde::{Deserialize, Serialize};

use crate::error::ArchiveError;

/// Format number of the manifest body; bump on an incompatible change.
pub const MANIFEST_FORMAT: u32 = 1;
const TRAILER: &str = "\nblake3:";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub id: u32,
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedSegment {
    pub index: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Size of the segment file as it was in the journal.
    pub raw_bytes: u64,
    /// Size of the stored (zstd) object.
    pub stored_bytes: u64,
    /// BLAKE3 of the stored object, hex.
    pub blake3: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedBookmark {
    pub name: String,
    pub seq: u64,
    pub timestamp_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub group: String,
    pub group_id: u64,
    /// Random id of the appliance's archiver for this group (kept in its group directory):
    /// a second appliance with a copy of the same group (a replica site) is refused too.
    pub archiver_id: u64,
    pub generation: u64,
    pub written_ns: u64,
    pub volumes: Vec<VolumeEntry>,
    /// Contiguous by seq, oldest first.
    pub segments: Vec<ArchivedSegment>,
    pub bookmarks: Vec<ArchivedBookmark>,
}

/// Key of segment `index` of `group`, relative to the prefix.
pub fn segment_key(group: &str, index: u64) -> String {
    format!("{group}/segments/{index:016x}.seg.zst")
}

/// Key of manifest `generation` of `group`, relative to the prefix.
pub fn manifest_key(group: &str, generation: u64) -> String {
    format!("{group}/manifests/{generation:016x}.json")
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = serde_json::to_vec_pretty(self).unwrap_or_default();
        let sum = blake3::hash(&body).to_hex().to_string();
        body.extend_from_slice(TRAILER.as_bytes());
        body.extend_from_slice(sum.as_bytes());
        body.push(b'\n');
        body
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Manifest, ArchiveError> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| ArchiveError::damaged(key, "not UTF-8"))?;
        let at = text
            .rfind(TRAILER)
            .ok_or_else(|| ArchiveError::damaged(key, "no checksum trailer (torn write?)"))?;
        let (body, trailer) = text.split_at(at);
        let sum = trailer[TRAILER.len()..].trim_end();
        if blake3::hash(body.as_bytes()).to_hex().as_str() != sum {
            return Err(ArchiveError::damaged(key, "manifest checksum mismatch"));
        }
        let m: Manifest = serde_json::from_str(body)
            .map_err(|e| ArchiveError::damaged(key, format!("manifest JSON: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(ArchiveError::damaged(
                key,
                format!("manifest format {}", m.format),
            ));
        }
        for w in m.segments.windows(2) {
            if w[1].first_seq != w[0].last_seq + 1 || w[1].index != w[0].index + 1 {
                return Err(ArchiveError::damaged(
                    key,
                    format!(
                        "segment {} does not follow segment {}",
                        w[1].index, w[0].index
                    ),
                ));
            }
        }
        Ok(m)
    }

    /// The last archived seq (0 when nothing is).
    pub fn last_seq(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.last_seq)
    }
}
