//! The splitter's end of the split link: orders changes, sends them, tracks acks, resends after a reconnect.
//!
//! Every change applied to production is queued here under the same lock that applied it, so
//! production and the journal see overlapping writes in one order (DESIGN.md rule 2). A change
//! stays queued until the appliance acknowledges that it is in the journal; after a reconnect
//! the appliance's `Welcome` names the last change it journaled and only later ones are resent,
//! so nothing is lost and nothing is journaled twice.
//!
//! Every region a change touches is marked in the persistent dirty bitmap before production
//! is written, and unmarked once the journal has every change queued meanwhile. When the
//! link breaks and the policy is `mark`, unacknowledged changes become marked regions and new
//! changes are only marked, so the host keeps being served; after the reconnect the marked
//! regions are copied from production into the journal (resync), in order with new writes
//! because the copy is taken under the same lock.
//!
//! A resync may first verify (verified seeding): it compares each region's checksum in
//! production with the replica's, asked over the link, and copies only regions that differ.
//! Why a host write racing the comparison cannot leave a wrong region uncopied is explained
//! in ARCHITECTURE.md, "Verified seeding".
//!
//! One file a concern: `queue` holds the ordering queue (numbering, unacknowledged changes,
//! acks, the bitmap's bookkeeping), `connection` the connection loop and what a Welcome or a
//! lost link does to the queue, `resync` the bracketed copy, `seeding` the checksum exchange
//! of verified seeding, and `status` what `cdp status` shows. This file holds the link's
//! state and its public face.

mod connection;
mod queue;
mod resync;
mod seeding;
mod status;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cdp_link::Message;
use cdp_types::{BlockFile, Endpoint};
use tokio::sync::{watch, Notify, Semaphore};

use crate::config::OnApplianceLoss;
use crate::dirty_bitmap::DirtyBitmap;
use crate::error::SplitterError;
use crate::limits::CHANGE_OVERHEAD_BYTES;
use queue::Queue;
pub use queue::{AckWait, Submitted, WindowPermit};
use status::ResyncProgress;
pub use status::{ResyncMethod, ResyncReason, ResyncState, ResyncSummary, VolumeState};

/// The split link of one volume.
pub struct SplitLink {
    volume: String,
    size: u64,
    endpoint: Endpoint,
    splitter_id: u64,
    queue: Mutex<Queue>,
    wake_sender: Notify,
    acked: watch::Sender<u64>,
    durable: watch::Sender<u64>,
    connected: AtomicBool,
    ready: watch::Sender<Readiness>,
    window: Arc<Semaphore>,
    /// The window's size in bytes (`link_window_bytes`).
    window_bytes: usize,
    policy: OnApplianceLoss,
    production: Arc<BlockFile>,
    marking: watch::Sender<bool>,
    resync_copied_bytes: AtomicU64,
    resync_wake: Notify,
    progress: Mutex<ResyncProgress>,
    /// The last Welcome said the replica holds data: a first initialization verifies.
    replica_holds_data: AtomicBool,
    /// Set by `stop` (the volume was removed at runtime): the connection task ends.
    stopped: watch::Sender<bool>,
    /// `link_deadline_ms`: silence from the appliance after which the connection is dropped.
    deadline: Duration,
    /// Connections this process made for the volume; sent in Hello so the appliance can
    /// replace a stale (half-open) connection of ours at once.
    sessions: AtomicU64,
}

/// How a FLUSH's changes were made safe.
#[derive(Debug, PartialEq, Eq)]
pub enum DurableBy {
    /// The appliance synced its journal through them.
    Journal,
    /// The link is down: the dirty bitmap must be synced instead.
    Bitmap,
}

/// Whether the appliance has accepted this volume yet.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Readiness {
    Waiting,
    Ready,
    Refused(String),
}

impl SplitLink {
    /// Creates the link and starts connecting in the background; see `wait_ready`.
    pub fn start(
        volume: &str,
        production: Arc<BlockFile>,
        endpoint: Endpoint,
        bitmap: DirtyBitmap,
        policy: OnApplianceLoss,
        window_bytes: usize,
        deadline: Duration,
    ) -> Arc<SplitLink> {
        let link = Arc::new(SplitLink {
            volume: volume.to_string(),
            size: production.size(),
            endpoint,
            splitter_id: rand::random(),
            queue: Mutex::new(Queue::new(bitmap)),
            wake_sender: Notify::new(),
            acked: watch::Sender::new(0),
            durable: watch::Sender::new(0),
            connected: AtomicBool::new(false),
            ready: watch::Sender::new(Readiness::Waiting),
            window: Arc::new(Semaphore::new(window_bytes)),
            window_bytes,
            policy,
            production,
            marking: watch::Sender::new(false),
            resync_copied_bytes: AtomicU64::new(0),
            resync_wake: Notify::new(),
            progress: Mutex::new(ResyncProgress::default()),
            replica_holds_data: AtomicBool::new(false),
            stopped: watch::Sender::new(false),
            deadline,
            sessions: AtomicU64::new(0),
        });
        tokio::spawn(Arc::clone(&link).run_connections());
        link
    }

    /// Waits until the appliance has welcomed this volume once, so source sequence numbers
    /// continue where the journal left off.
    /// Fails if the appliance refused the volume before ever welcoming it: that is a
    /// configuration problem (unknown volume, size mismatch, volume already split elsewhere)
    /// for the administrator, not something retrying fixes.
    pub async fn wait_ready(&self) -> Result<(), SplitterError> {
        let mut rx = self.ready.subscribe();
        let state = match rx.wait_for(|r| *r != Readiness::Waiting).await {
            Ok(state) => state.clone(),
            Err(_) => {
                return Err(SplitterError::Volume {
                    volume: self.volume.clone(),
                    what: "split link stopped".into(),
                })
            }
        };
        match state {
            Readiness::Refused(reason) => Err(SplitterError::Refused {
                volume: self.volume.clone(),
                reason,
            }),
            _ => Ok(()),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Reserves room for a change of `payload_bytes`; waits while the appliance is behind.
    pub async fn reserve(&self, payload_bytes: usize) -> WindowPermit {
        // A change bigger than the whole window takes all of it.
        let cost = (payload_bytes + CHANGE_OVERHEAD_BYTES).min(self.window_bytes) as u32;
        match Arc::clone(&self.window).acquire_many_owned(cost).await {
            Ok(permit) => WindowPermit(permit),
            // The semaphore is never closed while the link exists.
            Err(_) => unreachable!("split link window closed"),
        }
    }

    /// Applies a change to production and queues it for the appliance (or, while marking,
    /// only marks its regions), atomically with respect to every other change of this volume.
    pub fn submit<E>(
        &self,
        offset: u64,
        length: u64,
        apply: impl FnOnce() -> Result<(), E>,
        message: impl FnOnce(u64) -> Message,
    ) -> Result<Submitted, E> {
        let submitted = self.lock_queue().submit(offset, length, apply, message)?;
        if matches!(submitted, Submitted::Queued { .. }) {
            self.wake_sender.notify_one();
        }
        Ok(submitted)
    }

    /// True while the link is down and changes are being marked instead of sent.
    pub fn is_marking(&self) -> bool {
        *self.marking.borrow()
    }

    /// Makes the dirty bitmap durable: what a FLUSH promises while marking.
    pub fn sync_bitmap(&self) -> std::io::Result<()> {
        self.lock_queue().bitmap.sync()
    }

    /// Bytes copied from production into the journal by resyncs since start.
    pub fn resync_copied_bytes(&self) -> u64 {
        self.resync_copied_bytes.load(Ordering::Relaxed)
    }

    /// The source_seq of the last change applied to production.
    pub fn last_seq(&self) -> u64 {
        self.lock_queue().last_seq
    }

    /// Waits until the appliance has the change in its journal.
    pub async fn wait_acked(&self, wait: AckWait) {
        // The sender is only dropped after firing, or when the link itself is dropped.
        let _ = wait.0.await;
    }

    /// Asks the appliance to make every change up to `source_seq` durable, and waits for it.
    pub async fn wait_durable(&self, source_seq: u64) -> DurableBy {
        if *self.durable.borrow() >= source_seq {
            return DurableBy::Journal;
        }
        if self.is_marking() {
            return DurableBy::Bitmap;
        }
        {
            let mut queue = self.lock_queue();
            queue.flush_requested = queue.flush_requested.max(source_seq);
        }
        self.wake_sender.notify_one();
        let mut durable = self.durable.subscribe();
        let mut marking = self.marking.subscribe();
        // While marking, the journal cannot be reached: the caller makes the bitmap durable.
        tokio::select! {
            _ = durable.wait_for(|d| *d >= source_seq) => DurableBy::Journal,
            _ = marking.wait_for(|m| *m) => DurableBy::Bitmap,
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock would already have aborted the write path; the queue
        // itself is always left consistent, so recovering the guard is safe.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_progress(&self) -> MutexGuard<'_, ResyncProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the link for good (the volume was removed from this splitter): the connection
    /// closes, and changes a host still attached sends from now on are only marked in the
    /// dirty bitmap, so a later re-add resynchronises them and no host request hangs.
    pub fn stop(&self) {
        if self.stopped.send_replace(true) {
            return;
        }
        self.connected.store(false, Ordering::Relaxed);
        self.ready.send_if_modified(|r| {
            let waiting = *r == Readiness::Waiting;
            if waiting {
                *r = Readiness::Refused("the volume was removed from the splitter".into());
            }
            waiting
        });
        self.start_marking();
    }

    /// What `cdp status` shows for this volume.
    pub fn state(&self) -> VolumeState {
        let (pending, region_bytes, marking, ending, marking_since_ns) = {
            let queue = self.lock_queue();
            (
                queue.resync_pending.len() as u64,
                queue.bitmap.region_bytes(),
                queue.marking,
                // Protecting only once the journal acknowledged the resync's end, not once
                // the end was queued: until then a point may still fall inside the span.
                queue.resync_end_unacked.is_some() || queue.resync_incomplete,
                queue.marking_since_ns,
            )
        };
        let progress = self.lock_progress();
        let resync = progress.started.map(|started| {
            let seconds = started.elapsed().as_secs_f64().max(0.001);
            let rate = progress.done_bytes as f64 / seconds;
            let left = progress.total_bytes.saturating_sub(progress.done_bytes);
            ResyncState {
                method: progress.method,
                total_bytes: progress.total_bytes,
                done_bytes: progress.done_bytes,
                verified_bytes: progress.verified_bytes,
                copied_bytes: progress.copied_bytes,
                percent: progress.percent(),
                rate_bytes_per_s: rate as u64,
                seconds_left: if rate > 0.0 {
                    Some((left as f64 / rate) as u64)
                } else {
                    None
                },
            }
        });
        let mode = if marking {
            "marking"
        } else if !self.is_connected() {
            "connecting"
        } else if pending > 0 || resync.is_some() || ending {
            match progress.reason {
                ResyncReason::Initial => "initializing",
                _ => "resyncing",
            }
        } else {
            "protecting"
        };
        VolumeState {
            name: self.volume.clone(),
            state: mode.to_string(),
            on_appliance_loss: format!("{:?}", self.policy).to_lowercase(),
            dirty_bytes: pending * region_bytes,
            resync_copied_bytes: self.resync_copied_bytes(),
            resync,
            last_resync: progress.last.clone(),
            marking_since_ns,
            nbd_clients: Some(0),
        }
    }
}
