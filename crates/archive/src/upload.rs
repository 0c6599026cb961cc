//! The archiver's upload pass: the sealed segments the archive lacks, in order, each
//! verified before upload, compressed, stored with retries and read back, then one new
//! manifest generation naming them. A crash anywhere before the manifest's put leaves the
//! previous manifest, which names only objects already confirmed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::{PutMode, PutOptions, PutPayload};

use crate::error::ArchiveError;
use crate::manifest::{
    manifest_key, segment_key, ArchivedBookmark, ArchivedSegment, Manifest, VolumeEntry,
    MANIFEST_FORMAT,
};
use crate::pacer::Pacer;
use crate::restore::load_latest_manifest;
use crate::segment::verify_segment;
use crate::target::ArchiveTarget;

/// Who archives: the group's name (the key prefix), its journal's group id, the archiver's
/// persistent id and the volumes (for restore without config).
#[derive(Clone, Debug)]
pub struct ArchiveGroup {
    pub name: String,
    pub group_id: u64,
    pub archiver_id: u64,
    pub volumes: Vec<VolumeEntry>,
}

/// Bounds of one pass.
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Objects in flight at once.
    pub parallelism: usize,
    /// Attempts per object after the first one fails.
    pub retries: u32,
    /// First backoff; doubles per retry, at most 30 s.
    pub backoff: Duration,
    /// zstd level of stored segments.
    pub zstd_level: i32,
    /// Stored bytes per second over all objects in flight; `None`: unlimited.
    pub bandwidth_bytes_per_s: Option<u64>,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            parallelism: 2,
            retries: 5,
            backoff: Duration::from_millis(200),
            zstd_level: 3,
            bandwidth_bytes_per_s: None,
        }
    }
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadReport {
    pub generation: u64,
    pub segments_uploaded: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Last seq the archive holds after the pass.
    pub archived_seq: u64,
    /// Timestamp of that seq's record.
    pub archived_ns: u64,
    /// Index of the last archived segment, if any.
    pub archived_index: Option<u64>,
}

pub struct Archiver {
    pub target: ArchiveTarget,
    /// May change between passes (volumes added at runtime).
    pub group: ArchiveGroup,
    pub limits: UploadLimits,
    pacer: Pacer,
}

/// The archiver's persistent id for a group directory (`GROUP_DIR/archive.id`, hex), made on
/// first use; `cdp archive push` and the appliance's archiver share it.
pub fn archiver_id(group_dir: &Path) -> Result<u64, ArchiveError> {
    let path = group_dir.join("archive.id");
    let io = |e: std::io::Error| ArchiveError::Io {
        path: path.display().to_string(),
        what: e.to_string(),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return u64::from_str_radix(text.trim(), 16).map_err(|_| ArchiveError::Io {
                path: path.display().to_string(),
                what: "not a hex archiver id".into(),
            })
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        Err(_) => {}
    }
    let seed = format!(
        "{:?}{}{}",
        std::time::SystemTime::now(),
        std::process::id(),
        group_dir.display()
    );
    let hash = blake3::hash(seed.as_bytes());
    let mut id_bytes = [0u8; 8];
    id_bytes.copy_from_slice(&hash.as_bytes()[..8]);
    let id = u64::from_le_bytes(id_bytes) | 1;
    // Written whole then renamed, so a crash never leaves a torn id.
    let tmp = group_dir.join("archive.id.tmp");
    std::fs::write(&tmp, format!("{id:016x}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(id)
}

/// Segment files in a journal directory, sorted; all but the last are sealed.
pub fn sealed_in_dir(journal_dir: &Path) -> Result<Vec<u64>, ArchiveError> {
    let io = |e: std::io::Error| ArchiveError::Io {
        path: journal_dir.display().to_string(),
        what: e.to_string(),
    };
    let mut indexes = Vec::new();
    for entry in std::fs::read_dir(journal_dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if let Some(i) = entry
            .file_name()
            .to_str()
            .and_then(cdp_journal::parse_segment_name)
        {
            indexes.push(i);
        }
    }
    indexes.sort_unstable();
    indexes.pop();
    Ok(indexes)
}

impl Archiver {
    pub fn new(target: ArchiveTarget, group: ArchiveGroup, limits: UploadLimits) -> Archiver {
        Archiver {
            target,
            group,
            pacer: Pacer::new(limits.bandwidth_bytes_per_s),
            limits,
        }
    }

    /// Uploads every sealed segment (`sealed`: indexes in `journal_dir`, oldest first) newer
    /// than the archive's last, then writes the next manifest. Refuses a prefix another
    /// group or archiver owns.
    pub async fn archive_sealed(
        &self,
        journal_dir: &Path,
        sealed: &[u64],
    ) -> Result<UploadReport, ArchiveError> {
        let previous = load_latest_manifest(&self.target, &self.group.name).await?;
        if let Some(m) = &previous {
            if m.group_id != self.group.group_id || m.archiver_id != self.group.archiver_id {
                return Err(ArchiveError::OwnedByOther {
                    prefix: format!("{}/{}", self.target.url, self.group.name),
                    found: m.group_id,
                    ours: self.group.group_id,
                    found_archiver: m.archiver_id,
                    ours_archiver: self.group.archiver_id,
                });
            }
        }
        let last_index = previous
            .as_ref()
            .and_then(|m| m.segments.last())
            .map(|s| s.index);
        let todo: Vec<u64> = sealed
            .iter()
            .copied()
            .filter(|&i| last_index.is_none_or(|l| i > l))
            .collect();
        if let (Some(l), Some(&first)) = (last_index, todo.first()) {
            if first != l + 1 {
                return Err(ArchiveError::Io {
                    path: journal_dir.display().to_string(),
                    what: format!(
                        "the archive ends at segment {l} but the journal's next sealed segment is {first}: history between was released unarchived"
                    ),
                });
            }
        }
        let generation = previous.as_ref().map_or(1, |m| m.generation + 1);
        let mut report = UploadReport {
            generation: previous.as_ref().map_or(0, |m| m.generation),
            archived_seq: previous.as_ref().map_or(0, |m| m.last_seq()),
            archived_ns: previous
                .as_ref()
                .and_then(|m| m.segments.last())
                .map_or(0, |s| s.last_ns),
            archived_index: last_index,
            ..Default::default()
        };
        if todo.is_empty() {
            return Ok(report);
        }
        // `buffered` keeps the order, so the manifest lists segments oldest first.
        let uploaded: Vec<(ArchivedSegment, Vec<ArchivedBookmark>)> = stream::iter(todo)
            .map(|index| self.upload_segment(journal_dir, index))
            .buffered(self.limits.parallelism.max(1))
            .try_collect()
            .await?;
        let mut manifest = previous.unwrap_or(Manifest {
            format: MANIFEST_FORMAT,
            group: self.group.name.clone(),
            group_id: self.group.group_id,
            archiver_id: self.group.archiver_id,
            generation: 0,
            written_ns: 0,
            volumes: Vec::new(),
            segments: Vec::new(),
            bookmarks: Vec::new(),
        });
        for (seg, bookmarks) in uploaded {
            report.segments_uploaded += 1;
            report.raw_bytes += seg.raw_bytes;
            report.stored_bytes += seg.stored_bytes;
            if let Some(prev) = manifest.segments.last() {
                if seg.first_seq != prev.last_seq + 1 {
                    return Err(ArchiveError::Io {
                        path: journal_dir.display().to_string(),
                        what: format!(
                            "segment {} starts at seq {}, not {}",
                            seg.index,
                            seg.first_seq,
                            prev.last_seq + 1
                        ),
                    });
                }
            }
            manifest.segments.push(seg);
            manifest.bookmarks.extend(bookmarks);
        }
        manifest.generation = generation;
        // Volumes removed since keep their entry: older segments still name them.
        for v in &self.group.volumes {
            match manifest.volumes.iter_mut().find(|m| m.id == v.id) {
                Some(m) => *m = v.clone(),
                None => manifest.volumes.push(v.clone()),
            }
        }
        manifest.written_ns = cdp_types::TimestampNs::now().0;
        self.put_manifest(&manifest).await?;
        report.generation = generation;
        report.archived_seq = manifest.last_seq();
        report.archived_ns = manifest.segments.last().map_or(0, |s| s.last_ns);
        report.archived_index = manifest.segments.last().map(|s| s.index);
        tracing::info!(group = %self.group.name, generation, segments = report.segments_uploaded,
            raw_bytes = report.raw_bytes, stored_bytes = report.stored_bytes,
            archived_seq = report.archived_seq, "archive generation written");
        Ok(report)
    }

    async fn upload_segment(
        &self,
        journal_dir: &Path,
        index: u64,
    ) -> Result<(ArchivedSegment, Vec<ArchivedBookmark>), ArchiveError> {
        let path: PathBuf = cdp_journal::segment_path(journal_dir, index);
        let level = self.limits.zstd_level;
        let group_id = self.group.group_id;
        let read_path = path.clone();
        // Reading, checking and compressing are CPU and disk work: off the async threads.
        let prepared = tokio::task::spawn_blocking(move || {
            let raw = std::fs::read(&read_path).map_err(|e| ArchiveError::Io {
                path: read_path.display().to_string(),
                what: e.to_string(),
            })?;
            let summary = verify_segment(&raw, Some(group_id)).map_err(|d| {
                ArchiveError::LocalSegmentDamaged {
                    index,
                    offset: d.offset,
                    what: d.what,
                }
            })?;
            if summary.index != index {
                return Err(ArchiveError::LocalSegmentDamaged {
                    index,
                    offset: 0,
                    what: format!("header names segment {}", summary.index),
                });
            }
            let stored = zstd::bulk::compress(&raw, level).map_err(|e| ArchiveError::Io {
                path: read_path.display().to_string(),
                what: format!("zstd: {e}"),
            })?;
            Ok::<_, ArchiveError>((raw.len() as u64, summary, stored))
        })
        .await
        .map_err(|e| ArchiveError::Io {
            path: path.display().to_string(),
            what: format!("compression task: {e}"),
        })??;
        let (raw_bytes, summary, stored) = prepared;
        let sum = blake3::hash(&stored).to_hex().to_string();
        let key = segment_key(&self.group.name, index);
        let stored_bytes = stored.len() as u64;
        let payload = bytes::Bytes::from(stored);
        self.with_retries(&key, || async {
            self.pacer.pace(stored_bytes).await;
            self.target
                .store
                .put(&self.target.key(&key), PutPayload::from(payload.clone()))
                .await?;
            // Read back and compare: the manifest names only objects known to be whole.
            let back = self
                .target
                .store
                .get(&self.target.key(&key))
                .await?
                .bytes()
                .await?;
            if blake3::hash(&back).to_hex().as_str() != sum {
                return Err(ArchiveError::damaged(&key, "read-back checksum differs"));
            }
            Ok(())
        })
        .await?;
        let bookmarks = summary
            .bookmarks
            .iter()
            .map(|(name, seq, ns)| ArchivedBookmark {
                name: name.clone(),
                seq: *seq,
                timestamp_ns: *ns,
            })
            .collect();
        Ok((
            ArchivedSegment {
                index,
                first_seq: summary.first_seq,
                last_seq: summary.last_seq,
                first_ns: summary.first_ns,
                last_ns: summary.last_ns,
                raw_bytes,
                stored_bytes,
                blake3: sum,
            },
            bookmarks,
        ))
    }

    async fn put_manifest(&self, manifest: &Manifest) -> Result<(), ArchiveError> {
        let key = manifest_key(&self.group.name, manifest.generation);
        let body = bytes::Bytes::from(manifest.encode());
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let result = self
            .target
            .store
            .put_opts(
                &self.target.key(&key),
                PutPayload::from(body.clone()),
                create,
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(ArchiveError::GenerationTaken(manifest.generation))
            }
            Err(object_store::Error::NotImplemented) => {
                self.with_retries(&key, || async {
                    self.target
                        .store
                        .put(&self.target.key(&key), PutPayload::from(body.clone()))
                        .await?;
                    Ok(())
                })
                .await
            }
            Err(e) => {
                // Retry as a plain put only if the object is not there: a lost answer to a
                // create that did succeed reads back as our own manifest.
                self.with_retries(&key, || async {
                    match self.target.store.get(&self.target.key(&key)).await {
                        Ok(got) => {
                            let back = got.bytes().await?;
                            if back == body {
                                Ok(())
                            } else {
                                Err(ArchiveError::GenerationTaken(manifest.generation))
                            }
                        }
                        Err(object_store::Error::NotFound { .. }) => {
                            self.target
                                .store
                                .put(&self.target.key(&key), PutPayload::from(body.clone()))
                                .await?;
                            Ok(())
                        }
                        Err(e2) => Err(e2.into()),
                    }
                })
                .await
                .map_err(|_| ArchiveError::Store(e))
            }
        }
    }

    async fn with_retries<F, Fut>(&self, key: &str, mut attempt: F) -> Result<(), ArchiveError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), ArchiveError>>,
    {
        let mut backoff = self.limits.backoff;
        let mut tries = 0;
        loop {
            match attempt().await {
                Ok(()) => return Ok(()),
                Err(e @ ArchiveError::GenerationTaken(_)) => return Err(e),
                Err(e) if tries >= self.limits.retries => return Err(e),
                Err(e) => {
                    tracing::warn!(group = %self.group.name, key, error = %e, "archive upload failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    tries += 1;
                }
            }
        }
    }
}
