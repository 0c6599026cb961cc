//! A group's archive progress, shared by the archiver thread (which sets it) and the group's
//! status (which reads it with the journal to tell the lag). Imports nothing of the group, so
//! the group holds it without importing the archiver thread that uses the group.

use std::sync::Mutex;

use cdp_journal::Journal;
use cdp_types::{Seq, TimestampNs};

pub use cdp_control::ArchiveStatus;

use super::config::ArchiveConfig;

/// What the archive holds and what the archiver did, as of its last pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveProgress {
    /// The archive's manifest has been read (or written) since start.
    pub known: bool,
    pub archived_seq: u64,
    pub generation: u64,
    pub uploaded_segments: u64,
    pub uploaded_raw_bytes: u64,
    pub uploaded_stored_bytes: u64,
    pub last_error: Option<String>,
}

/// `[group.archive]` and its progress, kept in the group.
pub struct GroupArchive {
    pub config: ArchiveConfig,
    progress: Mutex<ArchiveProgress>,
}

impl GroupArchive {
    pub fn new(config: ArchiveConfig) -> GroupArchive {
        GroupArchive {
            config,
            progress: Mutex::new(ArchiveProgress::default()),
        }
    }

    pub fn progress(&self) -> ArchiveProgress {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the progress (one short critical section, no other lock taken inside).
    pub fn update(&self, f: impl FnOnce(&mut ArchiveProgress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Status against the journal now: the durable records the archive lacks, the segments
    /// holding them, and the age of the oldest (one record header read).
    pub fn status(&self, journal: &Journal) -> ArchiveStatus {
        let p = self.progress();
        let durable = journal.durable_seq().0;
        // What the journal released before the archive had it is not counted: it cannot be
        // archived any more (release_unarchived), and the archiver reports the gap.
        let oldest_lacking = (p.archived_seq + 1).max(journal.first_seq().0);
        let lag_records = (durable + 1).saturating_sub(oldest_lacking);
        let (lag_segments, lag_seconds) = if lag_records == 0 {
            (0, 0.0)
        } else {
            let firsts = journal.segment_first_seqs();
            let segments = firsts
                .iter()
                .enumerate()
                .filter(|(i, _)| {
                    // A segment lacks archiving if its last record is above the archived seq.
                    firsts
                        .get(i + 1)
                        .is_none_or(|next| next.0.saturating_sub(1) >= oldest_lacking)
                })
                .count() as u64;
            let stamped = journal
                .read_headers_from(Seq(oldest_lacking))
                .ok()
                .and_then(|mut r| r.next())
                .and_then(Result::ok)
                .map(|r| r.timestamp.0);
            let age = stamped.map_or(0, |ns| TimestampNs::now().0.saturating_sub(ns));
            (segments, age as f64 / 1e9)
        };
        ArchiveStatus {
            url: self.config.url.clone(),
            archived_seq: p.archived_seq,
            archived_known: p.known,
            generation: p.generation,
            lag_records,
            lag_segments,
            lag_seconds,
            uploaded_segments: p.uploaded_segments,
            uploaded_raw_bytes: p.uploaded_raw_bytes,
            uploaded_stored_bytes: p.uploaded_stored_bytes,
            last_error: p.last_error,
            release_unarchived: self.config.release_unarchived,
        }
    }
}
