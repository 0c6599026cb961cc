//! Reading an archive alone: its groups and points, a full integrity check, and restore of
//! every volume of a group at a point by replaying archived segments.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cdp_journal::RecordKind;
use futures::TryStreamExt;

use crate::error::ArchiveError;
use crate::manifest::{segment_key, ArchivedSegment, Manifest};
use crate::segment::scan_segment;
use crate::target::ArchiveTarget;

/// The point to restore at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Point {
    /// The last archived record.
    Latest,
    Seq(u64),
    /// The last record stamped at or before this time (ns since the epoch).
    Time(u64),
    Bookmark(String),
}

impl Point {
    /// `latest`, `seq:N`, an RFC 3339 time, or a bookmark name.
    pub fn parse(s: &str) -> Point {
        if s == "latest" {
            return Point::Latest;
        }
        if let Some(n) = s.strip_prefix("seq:").and_then(|n| n.parse().ok()) {
            return Point::Seq(n);
        }
        match cdp_types::rfc3339::parse_time(s) {
            Ok(ns) => Point::Time(ns),
            Err(_) => Point::Bookmark(s.to_string()),
        }
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Point::Latest => f.write_str("latest"),
            Point::Seq(s) => write!(f, "seq:{s}"),
            Point::Time(t) => f.write_str(&cdp_types::rfc3339::format_time(*t)),
            Point::Bookmark(b) => write!(f, "bookmark {b}"),
        }
    }
}

/// The newest manifest of `group` that decodes, or `None` for an empty archive. A newer
/// manifest that does not decode is an error, never skipped silently.
pub async fn load_latest_manifest(
    target: &ArchiveTarget,
    group: &str,
) -> Result<Option<Manifest>, ArchiveError> {
    let dir = target.key(&format!("{group}/manifests"));
    let mut keys: Vec<_> = target
        .store
        .list(Some(&dir))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    keys.retain(|k| k.as_ref().ends_with(".json"));
    keys.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
    let Some(key) = keys.last() else {
        return Ok(None);
    };
    let bytes = target.store.get(key).await?.bytes().await?;
    Manifest::decode(key.as_ref(), &bytes).map(Some)
}

/// The group names under the archive's prefix.
pub async fn list_groups(target: &ArchiveTarget) -> Result<Vec<String>, ArchiveError> {
    let prefix = if target.prefix.is_empty() {
        None
    } else {
        Some(object_store::path::Path::from(target.prefix.as_str()))
    };
    let listed = target.store.list_with_delimiter(prefix.as_ref()).await?;
    let mut names: Vec<String> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// Where replay stops: the last seq to apply, or a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Seq(u64),
    Time(u64),
}

/// Checks that `point` lies inside what `manifest` holds and says where replay stops.
pub fn resolve_point(manifest: &Manifest, point: &Point) -> Result<Stop, ArchiveError> {
    let refuse = |why: String| ArchiveError::NotRecoverable(point.to_string(), why);
    let (Some(first), Some(last)) = (manifest.segments.first(), manifest.segments.last()) else {
        return Err(refuse("the archive holds no segment yet".into()));
    };
    if first.first_seq != 1 {
        return Err(refuse(format!(
            "the archive starts at seq {} and holds no base image",
            first.first_seq
        )));
    }
    match point {
        Point::Latest => Ok(Stop::Seq(last.last_seq)),
        Point::Seq(s) if *s <= last.last_seq => Ok(Stop::Seq(*s)),
        Point::Seq(_) => Err(refuse(format!("the archive ends at seq {}", last.last_seq))),
        Point::Time(t) if *t < first.first_ns => Err(refuse(format!(
            "before the first archived record ({})",
            cdp_types::rfc3339::format_time(first.first_ns)
        ))),
        Point::Time(t) if *t > last.last_ns => Err(refuse(format!(
            "after the last archived record ({}); later history is not archived yet",
            cdp_types::rfc3339::format_time(last.last_ns)
        ))),
        Point::Time(t) => Ok(Stop::Time(*t)),
        Point::Bookmark(name) => manifest
            .bookmarks
            .iter()
            .rev()
            .find(|b| &b.name == name)
            .map(|b| Stop::Seq(b.seq))
            .ok_or_else(|| refuse("no archived bookmark has this name".into())),
    }
}

async fn fetch_segment(
    target: &ArchiveTarget,
    group: &str,
    seg: &ArchivedSegment,
) -> Result<Vec<u8>, ArchiveError> {
    let key = segment_key(group, seg.index);
    let stored = target.store.get(&target.key(&key)).await?.bytes().await?;
    if stored.len() as u64 != seg.stored_bytes {
        return Err(ArchiveError::damaged(
            &key,
            format!(
                "{} bytes, the manifest says {}",
                stored.len(),
                seg.stored_bytes
            ),
        ));
    }
    if blake3::hash(&stored).to_hex().as_str() != seg.blake3 {
        return Err(ArchiveError::damaged(&key, "BLAKE3 checksum mismatch"));
    }
    let raw = zstd::bulk::decompress(&stored, seg.raw_bytes as usize)
        .map_err(|e| ArchiveError::damaged(&key, format!("zstd: {e}")))?;
    if raw.len() as u64 != seg.raw_bytes {
        return Err(ArchiveError::damaged(&key, "decompressed size differs"));
    }
    Ok(raw)
}

/// The result of a restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    /// The last seq applied and its time.
    pub seq: u64,
    pub timestamp_ns: u64,
    pub files: Vec<PathBuf>,
    pub bytes_fetched: u64,
    pub segments: u64,
}

/// Rebuilds every volume of `group` at `point` into `to`: a directory (one `NAME.img` per
/// volume) or, for a group of one volume, a file. Every object's checksum and every
/// record's CRC is checked; `progress(fetched, total)` is called after each object.
pub async fn restore(
    target: &ArchiveTarget,
    group: &str,
    point: &Point,
    to: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<RestoreReport, ArchiveError> {
    let manifest = load_latest_manifest(target, group)
        .await?
        .ok_or_else(|| ArchiveError::NoGroup(group.to_string()))?;
    let stop = resolve_point(&manifest, point)?;
    let io = |p: &Path, e: std::io::Error| ArchiveError::Io {
        path: p.display().to_string(),
        what: e.to_string(),
    };
    let to_dir = to.is_dir() || manifest.volumes.len() != 1;
    let mut outputs = Vec::new();
    if to_dir {
        std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    }
    for v in &manifest.volumes {
        let path = if to_dir {
            to.join(format!("{}.img", v.name))
        } else {
            to.to_path_buf()
        };
        let file = File::create(&path).map_err(|e| io(&path, e))?;
        file.set_len(v.size_bytes).map_err(|e| io(&path, e))?;
        outputs.push((v.id, v.size_bytes, path, file));
    }
    let total: u64 = manifest.segments.iter().map(|s| s.stored_bytes).sum();
    let mut report = RestoreReport {
        seq: 0,
        timestamp_ns: 0,
        files: outputs.iter().map(|o| o.2.clone()).collect(),
        bytes_fetched: 0,
        segments: 0,
    };
    let zeros = vec![0u8; 1 << 20];
    'segments: for seg in &manifest.segments {
        if let Stop::Seq(s) = stop {
            if seg.first_seq > s {
                break;
            }
        }
        let raw = fetch_segment(target, group, seg).await?;
        report.bytes_fetched += seg.stored_bytes;
        report.segments += 1;
        progress(report.bytes_fetched, total);
        let key = segment_key(group, seg.index);
        let mut done = false;
        let mut apply_error = None;
        let summary = scan_segment(&raw, Some(manifest.group_id), |r| {
            if done || apply_error.is_some() {
                return Ok(());
            }
            let h = &r.header;
            let past = match stop {
                Stop::Seq(s) => h.seq > s,
                Stop::Time(t) => h.timestamp_ns > t,
            };
            if past {
                done = true;
                return Ok(());
            }
            report.seq = h.seq;
            report.timestamp_ns = h.timestamp_ns;
            if !matches!(
                h.kind,
                RecordKind::Write | RecordKind::Trim | RecordKind::Zero
            ) {
                return Ok(());
            }
            let Some((_, size, path, file)) = outputs.iter().find(|o| o.0 == h.volume) else {
                apply_error = Some(ArchiveError::damaged(
                    &key,
                    format!(
                        "record {} names volume {} the manifest lacks",
                        h.seq, h.volume
                    ),
                ));
                return Ok(());
            };
            if h.offset.checked_add(h.length).is_none_or(|end| end > *size) {
                apply_error = Some(ArchiveError::damaged(
                    &key,
                    format!("record {} runs past the volume's end", h.seq),
                ));
                return Ok(());
            }
            let result = if h.kind == RecordKind::Write {
                file.write_all_at(&r.payload, h.offset)
            } else {
                let mut at = h.offset;
                let end = h.offset + h.length;
                let mut result = Ok(());
                while at < end && result.is_ok() {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    result = file.write_all_at(&zeros[..n], at);
                    at += n as u64;
                }
                result
            };
            if let Err(e) = result {
                apply_error = Some(io(path, e));
            }
            Ok(())
        })
        .map_err(|d| ArchiveError::damaged(&key, format!("at byte {}: {}", d.offset, d.what)))?;
        if let Some(e) = apply_error {
            return Err(e);
        }
        if summary.first_seq != seg.first_seq || summary.last_seq != seg.last_seq {
            return Err(ArchiveError::damaged(
                &key,
                "seqs differ from the manifest's",
            ));
        }
        if done {
            break 'segments;
        }
    }
    for (_, _, path, file) in &outputs {
        file.sync_all().map_err(|e| io(path, e))?;
    }
    Ok(report)
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub groups: u64,
    pub segments: u64,
    pub stored_bytes: u64,
    /// Each problem, with its object.
    pub problems: Vec<String>,
    /// Objects no manifest names (left by an upload a crash cut short): harmless.
    pub unreferenced: Vec<String>,
}

/// Checks every group's newest manifest, every segment object it names (size, BLAKE3,
/// zstd, every record CRC, the seqs against the manifest) and that the chain has no gap.
pub async fn verify(target: &ArchiveTarget) -> Result<VerifyReport, ArchiveError> {
    let mut report = VerifyReport::default();
    for group in list_groups(target).await? {
        report.groups += 1;
        let manifest = match load_latest_manifest(target, &group).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                report.problems.push(format!("{group}: no manifest"));
                continue;
            }
            Err(e) => {
                report.problems.push(format!("{group}: {e}"));
                continue;
            }
        };
        // Manifest::decode already refused a gap in the chain.
        for seg in &manifest.segments {
            report.segments += 1;
            report.stored_bytes += seg.stored_bytes;
            let key = segment_key(&group, seg.index);
            let checked = match fetch_segment(target, &group, seg).await {
                Ok(raw) => scan_segment(&raw, Some(manifest.group_id), |_| Ok(()))
                    .map_err(|d| format!("{key}: at byte {}: {}", d.offset, d.what))
                    .and_then(|s| {
                        if s.first_seq == seg.first_seq
                            && s.last_seq == seg.last_seq
                            && s.index == seg.index
                        {
                            Ok(())
                        } else {
                            Err(format!("{key}: seqs differ from the manifest's"))
                        }
                    }),
                Err(e) => Err(e.to_string()),
            };
            if let Err(p) = checked {
                report.problems.push(p);
            }
        }
        let named: std::collections::HashSet<String> = manifest
            .segments
            .iter()
            .map(|s| target.key(&segment_key(&group, s.index)).to_string())
            .collect();
        let dir = target.key(&format!("{group}/segments"));
        let objects: Vec<_> = target.store.list(Some(&dir)).try_collect().await?;
        for o in objects {
            if !named.contains(o.location.as_ref()) {
                report.unreferenced.push(o.location.to_string());
            }
        }
    }
    Ok(report)
}
