//! The appliance's archiver: one thread per group with `[group.archive]` uploads each sealed
//! journal segment to object storage (`cdp_archive`), oldest first, behind the host.
//!
//! The queue is the journal itself: sealed segments wait on disk until a pass uploads them,
//! and the archive retention pin (`Group::release_for_archive_through`) keeps local retention
//! from releasing them first, unless `release_unarchived`. A pass holds at most
//! `parallelism` objects in flight and pays the bandwidth limit before each; the host path
//! never waits for it (the thread takes no group lock but the journal's own, briefly, to
//! seal). A store that is down or refusing makes passes fail: the lag grows, the error shows
//! in `cdp status`, and the next pass (after a doubling backoff, at most 30 s) resumes where
//! the archive's newest manifest ends. `config.rs` is `[group.archive]`, `state.rs` the
//! progress the group's status reads.

pub mod config;
pub mod state;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cdp_archive::{ArchiveGroup, ArchiveTarget, Archiver, S3Settings, UploadLimits, VolumeEntry};
use cdp_types::{Seq, TimestampNs};
use tokio::sync::watch;

use crate::error::ApplianceError;
use crate::group::Group;
use state::GroupArchive;

/// How often the thread looks for newly sealed segments (and for an active segment due to
/// be sealed), at most: the archive's lag floor is about `seal_after_s` plus this.
const POLL: Duration = Duration::from_secs(1);
/// The longest wait between two failed passes.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The archiver threads of one appliance.
pub struct Archivers {
    threads: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Archivers {
    /// Opens every archive target (a bad URL or unreadable archiver id stops the appliance
    /// at start, named) and starts one thread per group with `[group.archive]`.
    pub fn start(groups: &[Arc<Group>]) -> Result<Archivers, ApplianceError> {
        let (stop, stop_rx) = watch::channel(false);
        let mut work = Vec::new();
        for g in groups {
            let Some(archive) = g.archive() else { continue };
            let c = &archive.config;
            let s3 = S3Settings {
                endpoint: c.endpoint.clone(),
                region: c.region.clone(),
                access_key_id: c.access_key_id.clone(),
                secret_access_key: c.secret_access_key.clone(),
            };
            let context = |e: cdp_archive::ArchiveError| {
                ApplianceError::Config(format!("group {:?}: [group.archive]: {e}", g.name))
            };
            let target = ArchiveTarget::open(&c.url, &s3).map_err(context)?;
            let archiver_id = cdp_archive::archiver_id(g.state_dir()).map_err(context)?;
            let limits = UploadLimits {
                parallelism: c.parallelism,
                retries: c.retries,
                backoff: Duration::from_millis(c.backoff_ms),
                bandwidth_bytes_per_s: c.bandwidth_bytes_per_s,
                ..Default::default()
            };
            let archiver = Archiver::new(
                target,
                ArchiveGroup {
                    name: g.name.clone(),
                    group_id: g.group_id(),
                    archiver_id,
                    volumes: Vec::new(),
                },
                limits,
            );
            work.push((Arc::clone(g), Arc::clone(archive), archiver));
        }
        let mut threads = Vec::new();
        for (group, archive, archiver) in work {
            let stop_rx = stop_rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("archive-{}", group.name))
                .spawn(move || run(group, archive, archiver, stop_rx));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let started = Archivers { threads, stop };
                    started.stop();
                    return Err(e.into());
                }
            }
        }
        Ok(Archivers { threads, stop })
    }

    /// Stops every archiver (a pass in flight is abandoned: its objects stay unreferenced
    /// until the next pass overwrites them) and waits for the threads.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run(
    group: Arc<Group>,
    archive: Arc<GroupArchive>,
    archiver: Archiver,
    stop: watch::Receiver<bool>,
) {
    // A runtime of its own: the store's I/O never competes with the link tasks' runtime,
    // and compression runs on this runtime's blocking threads.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(group = %group.name, error = %e, "archiver: no runtime; the group is not archived");
            archive.update(|p| p.last_error = Some(format!("no runtime: {e}")));
            return;
        }
    };
    rt.block_on(archive_loop(group, archive, archiver, stop));
}

async fn archive_loop(
    group: Arc<Group>,
    archive: Arc<GroupArchive>,
    mut archiver: Archiver,
    mut stop: watch::Receiver<bool>,
) {
    let journal_dir = group.journal().dir().to_path_buf();
    let seal_after_ns = archive.config.seal_after_s.saturating_mul(1_000_000_000);
    let backoff_min = Duration::from_millis(archive.config.backoff_ms.max(1));
    let mut backoff = backoff_min;
    let mut archived_index: Option<u64> = None;
    let mut failing = false;
    tracing::info!(group = %group.name, url = %archive.config.url, "archiver started");
    loop {
        if *stop.borrow() {
            break;
        }
        // While passes fail, sealing more would only make more, smaller segments to upload.
        if !failing {
            seal_if_due(&group, seal_after_ns);
        }
        let sealed: Vec<u64> = group
            .journal()
            .sealed_segments()
            .iter()
            .map(|s| s.0)
            .collect();
        let known = archive.progress().known;
        let pending = !known || sealed.last().is_some_and(|&l| archived_index < Some(l));
        let mut wait = POLL;
        if pending {
            archiver.group.volumes = group
                .volumes()
                .iter()
                .map(|v| VolumeEntry {
                    id: v.id,
                    name: v.name.clone(),
                    size_bytes: v.size,
                })
                .collect();
            let pass = tokio::select! {
                r = archiver.archive_sealed(&journal_dir, &sealed) => r,
                _ = stop.changed() => break,
            };
            match pass {
                Ok(r) => {
                    if failing {
                        tracing::info!(group = %group.name, archived_seq = r.archived_seq, "archive resumed");
                    }
                    failing = false;
                    backoff = backoff_min;
                    archived_index = r.archived_index;
                    archive.update(|p| {
                        p.known = true;
                        p.archived_seq = r.archived_seq;
                        p.generation = r.generation;
                        p.uploaded_segments += r.segments_uploaded;
                        p.uploaded_raw_bytes += r.raw_bytes;
                        p.uploaded_stored_bytes += r.stored_bytes;
                        p.last_error = None;
                    });
                    if !archive.config.release_unarchived {
                        group.release_for_archive_through(Seq(r.archived_seq));
                    }
                    // More may have been sealed while the pass ran.
                    wait = Duration::ZERO;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(group = %group.name, url = %archive.config.url, error = %e,
                            "archive pass failed; the journal keeps what is not archived and passes are retried");
                    } else {
                        tracing::debug!(group = %group.name, error = %e, "archive pass failed again");
                    }
                    failing = true;
                    archive.update(|p| p.last_error = Some(e.to_string()));
                    wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => break,
            }
        }
    }
    tracing::info!(group = %group.name, "archiver stopped");
}

/// Seals the active segment once its first record is `seal_after_ns` old, so a quiet
/// group's last records reach the archive too.
fn seal_if_due(group: &Group, seal_after_ns: u64) {
    let journal = group.journal();
    let Some(active_first) = journal.segment_first_seqs().last().copied() else {
        return;
    };
    if journal.last_seq() < active_first {
        return;
    }
    let first_ns = journal
        .read_headers_from(active_first)
        .ok()
        .and_then(|mut r| r.next())
        .and_then(Result::ok)
        .map(|r| r.timestamp.0);
    let Some(first_ns) = first_ns else { return };
    if TimestampNs::now().0.saturating_sub(first_ns) < seal_after_ns {
        return;
    }
    match journal.seal_active() {
        Ok(true) => {
            tracing::debug!(group = %group.name, first_seq = %active_first, "active journal segment sealed for the archive")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(group = %group.name, error = %e, "sealing the active segment for the archive failed")
        }
    }
}
