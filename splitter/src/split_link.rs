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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cdp_link::checksum::{region_checksum, RegionChecksum};
use cdp_link::limits::{
    CHECKSUM_REGION_BYTES_MAX, CHECKSUM_REGION_BYTES_MIN, CHECKSUM_REQUESTS_IN_FLIGHT_MAX,
};
use cdp_link::{watermark, LinkError, LinkStream, Message};
use cdp_types::{BlockFile, Endpoint};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::OnApplianceLoss;
use crate::dirty_bitmap::DirtyBitmap;
use crate::limits::{CHANGE_OVERHEAD_BYTES, RECONNECT_BACKOFF_MS_MAX, SEND_BATCH_MESSAGES_MAX};
use crate::limits::{RESYNC_REPORT_INTERVAL, RESYNC_ZERO_RUN_BYTES_MAX};
use crate::limits::{VERIFY_REGION_BYTES, VERIFY_REQUEST_REGIONS_MAX, VERIFY_RETRIES_MAX};

/// A change waiting for the appliance's Ack.
struct Pending {
    source_seq: u64,
    message: Message,
    /// Wakes exactly the host request waiting for this change, instead of every waiter.
    acked: Option<oneshot::Sender<()>>,
    /// The regions it touches, which become marked if the link breaks before its Ack.
    regions: std::ops::Range<u64>,
    /// Room a resync copy holds in the unacked window until its Ack.
    _permit: Option<WindowPermit>,
}

/// What happened to a submitted change.
pub enum Submitted {
    /// Queued for the appliance; the handle completes once the journal has it.
    Queued { source_seq: u64, acked: AckWait },
    /// The appliance is unreachable and the policy is `mark`: production has the change and
    /// the dirty bitmap records its regions for the resync.
    Marked,
}

/// Completes when the appliance has journaled one change.
pub struct AckWait(oneshot::Receiver<()>);

struct Queue {
    /// Highest source_seq handed out.
    last_seq: u64,
    /// Changes not yet acknowledged, in source_seq order.
    unacked: VecDeque<Pending>,
    /// Highest source_seq written to the current connection.
    sent_through: u64,
    /// Highest source_seq a FLUSH has asked to make durable, and the highest asked on this connection.
    flush_requested: u64,
    flush_sent: u64,
    bitmap: DirtyBitmap,
    /// Regions whose bit this queue set since the unacked queue was last empty.
    touched: Vec<u64>,
    /// Regions production holds changes of that the journal may lack: copied on reconnect.
    resync_pending: BTreeSet<u64>,
    /// The link is down and the policy is `mark`: changes are marked, not queued.
    marking: bool,
    /// Checksum requests of a verifying resync, each sent once every change up to its seq is
    /// on the wire, so the appliance's answer covers every change production held when it
    /// was asked.
    checksum_requests: VecDeque<(u64, Message)>,
    /// Checksum regions (index, by `verify_region_bytes`) being compared right now, and
    /// whether the host wrote to them since their production checksum was started: a
    /// mismatch there may be the two sides hashing different moments, so it is verified
    /// again rather than copied at once.
    verify_watch: BTreeMap<u64, bool>,
    verify_region_bytes: u64,
    /// When marking began (ns since the Unix epoch), kept until a resync's `ResyncEnd` is
    /// acknowledged: the `ResyncStart` tells the appliance, so it can refuse points from then
    /// on (host writes acknowledged since are only in production and the bitmap).
    marking_since_ns: Option<u64>,
    /// When the link was last lost (the start of the current marking episode).
    link_lost_ns: Option<u64>,
    /// The source_seq of a queued `ResyncEnd` the appliance has not acknowledged yet: until
    /// then the volume is still resyncing, whatever the copy loop says.
    resync_end_unacked: Option<u64>,
    /// A resync's markers were lost with a connection (or its end could not be queued): the
    /// next connection runs a resync even with no region pending, so the appliance's span
    /// gets its `ResyncEnd`.
    resync_incomplete: bool,
}

impl Queue {
    /// Gives the next change its source_seq and queues it for the appliance.
    fn push(
        &mut self,
        message: impl FnOnce(u64) -> Message,
        acked: Option<oneshot::Sender<()>>,
        regions: std::ops::Range<u64>,
        permit: Option<WindowPermit>,
    ) -> u64 {
        self.last_seq += 1;
        let source_seq = self.last_seq;
        self.unacked.push_back(Pending {
            source_seq,
            message: message(source_seq),
            acked,
            regions,
            _permit: permit,
        });
        source_seq
    }

    /// Once nothing is waiting for an Ack, regions touched since are consistent again.
    fn clear_settled_regions(&mut self) {
        if !self.unacked.is_empty() {
            return;
        }
        for region in std::mem::take(&mut self.touched) {
            if !self.resync_pending.contains(&region) {
                self.bitmap.clear(region);
            }
        }
    }

    /// Notes a host change for the checksum regions being compared (see `verify_watch`).
    fn note_verify_write(&mut self, offset: u64, length: u64) {
        if self.verify_watch.is_empty() || self.verify_region_bytes == 0 {
            return;
        }
        let first = offset / self.verify_region_bytes;
        let last = (offset + length.max(1) - 1) / self.verify_region_bytes;
        for (_, written) in self.verify_watch.range_mut(first..=last) {
            *written = true;
        }
    }

    /// The journal acknowledged a resync's `ResyncEnd`: it holds everything marked since
    /// marking began, unless marking began again meanwhile.
    fn resync_ended(&mut self) {
        self.resync_end_unacked = None;
        // Everything marked before the ResyncEnd is journaled now. If the link was lost
        // again since (a Welcome reports the end), the current episode began at that loss,
        // not at the earlier one: a point between the two is recoverable.
        self.marking_since_ns = if self.marking {
            self.link_lost_ns
        } else {
            None
        };
    }

    fn mark(&mut self, regions: std::ops::Range<u64>) {
        for region in regions {
            self.bitmap.set(region);
            self.resync_pending.insert(region);
        }
    }
}

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

/// Why regions are being copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResyncReason {
    /// Regions marked by crashes or marking mode.
    #[default]
    Dirty,
    /// First protection of this volume by this splitter: everything is copied.
    Initial,
    /// An administrator asked for a full resync.
    Full,
}

/// How a resync decides which regions to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncMethod {
    /// Copy every pending region.
    #[default]
    Copy,
    /// Compare each pending region's checksum with the replica's; copy only those that differ.
    Verify,
}

#[derive(Default)]
struct ResyncProgress {
    reason: ResyncReason,
    method: ResyncMethod,
    started: Option<Instant>,
    total_bytes: u64,
    /// Bytes settled: found equal by verification, or copied.
    done_bytes: u64,
    /// Bytes whose checksums were compared with the replica's.
    verified_bytes: u64,
    /// Payload bytes this resync copied into the journal.
    copied_bytes: u64,
    /// The totals of the last resync that completed, kept for `cdp volume resync`'s summary.
    last: Option<ResyncSummary>,
}

/// What a completed resync did, from the finished operation itself (not a progress sample).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ResyncSummary {
    pub method: ResyncMethod,
    pub total_bytes: u64,
    /// Bytes compared with the replica by checksum (verify only).
    pub verified_bytes: u64,
    /// Payload bytes the resync copied into the journal.
    pub copied_bytes: u64,
    pub seconds: f64,
    /// When it completed, ns since the Unix epoch.
    pub completed_ns: u64,
}

impl ResyncProgress {
    fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            100.0
        } else {
            100.0 * self.done_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// A volume's protection state, as `cdp status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VolumeState {
    pub name: String,
    /// protecting, marking, resyncing, initializing or connecting.
    pub state: String,
    pub on_appliance_loss: String,
    /// Bytes of regions waiting for a resync copy.
    pub dirty_bytes: u64,
    /// Payload bytes copied by resyncs since the splitter started.
    pub resync_copied_bytes: u64,
    pub resync: Option<ResyncState>,
    /// The last completed resync's totals.
    pub last_resync: Option<ResyncSummary>,
    /// When the splitter began marking what is still to be resynchronised (ns since the
    /// Unix epoch); points of the group from then until the resync's end are not recoverable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marking_since_ns: Option<u64>,
    /// Hosts attached over NBD (connections in the transmission phase); filled in by the
    /// control socket, which knows the NBD server.
    pub nbd_clients: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ResyncState {
    /// copy, or verify (compare checksums with the replica, copy only what differs).
    pub method: ResyncMethod,
    pub total_bytes: u64,
    /// Bytes settled: found equal to the replica, or copied (zero runs count without payload).
    pub done_bytes: u64,
    /// Bytes compared with the replica by checksum (verify only).
    pub verified_bytes: u64,
    /// Payload bytes this resync copied into the journal.
    pub copied_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_s: u64,
    pub seconds_left: Option<u64>,
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

/// The checksum answers of one connection, and how many requests still await theirs.
struct ChecksumReplies {
    answers: mpsc::Receiver<Message>,
    outstanding: usize,
}

/// A checksum request sent and waiting for its answer.
struct ChecksumInFlight {
    /// First checksum region (index by the verify region size) and how many.
    first: u64,
    count: u64,
    production: Vec<RegionChecksum>,
}

/// Why verification stopped before deciding every region.
enum VerifyStop {
    /// The link broke; the regions stay pending for the next connection.
    LinkLost,
    /// Verification cannot be used (a bad answer, a production read error); the remaining
    /// regions are copied instead.
    Unusable(String),
}

/// Room in the unacked window for one change; released when the change is acknowledged.
pub struct WindowPermit(#[allow(dead_code)] OwnedSemaphorePermit);

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
        // Regions dirty at start-up may hold changes the journal never got (a crash, or a stop
        // while marking): copy them at the first connection.
        let resync_pending: BTreeSet<u64> = bitmap.dirty_regions().into_iter().collect();
        let link = Arc::new(SplitLink {
            volume: volume.to_string(),
            size: production.size(),
            endpoint,
            splitter_id: rand::random(),
            queue: Mutex::new(Queue {
                last_seq: 0,
                unacked: VecDeque::new(),
                sent_through: 0,
                flush_requested: 0,
                flush_sent: 0,
                bitmap,
                touched: Vec::new(),
                resync_pending,
                marking: false,
                checksum_requests: VecDeque::new(),
                verify_watch: BTreeMap::new(),
                verify_region_bytes: 0,
                marking_since_ns: None,
                link_lost_ns: None,
                resync_end_unacked: None,
                resync_incomplete: false,
            }),
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
    pub async fn wait_ready(&self) -> Result<(), String> {
        let mut rx = self.ready.subscribe();
        let state = match rx.wait_for(|r| *r != Readiness::Waiting).await {
            Ok(state) => state.clone(),
            Err(_) => return Err("split link stopped".into()),
        };
        match state {
            Readiness::Refused(reason) => Err(reason),
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
        let mut queue = self.lock_queue();
        let regions = queue.bitmap.regions_of(offset, length);
        // Mark before production changes, so a crash between the two can never hide it.
        for region in regions.clone() {
            if queue.bitmap.set(region) {
                queue.touched.push(region);
            }
        }
        apply()?;
        queue.note_verify_write(offset, length);
        if queue.marking {
            queue.mark(regions);
            return Ok(Submitted::Marked);
        }
        let (tx, rx) = oneshot::channel();
        let source_seq = queue.push(message, Some(tx), regions, None);
        drop(queue);
        self.wake_sender.notify_one();
        Ok(Submitted::Queued {
            source_seq,
            acked: AckWait(rx),
        })
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

    async fn run_connections(self: Arc<Self>) {
        let mut stopped = self.stopped.subscribe();
        tokio::select! {
            () = self.run_connections_until_stopped() => {}
            _ = stopped.wait_for(|s| *s) => {}
        }
    }

    async fn run_connections_until_stopped(&self) {
        let mut backoff_ms = 50u64;
        // When the appliance first said another connection holds the volume.
        let mut held_since: Option<Instant> = None;
        loop {
            match self.run_one_connection().await {
                Ok(()) => return,
                Err(LinkError::Refused(reason)) if *self.ready.borrow() == Readiness::Waiting => {
                    // Perhaps this splitter's own connection from before a crash, which the
                    // appliance drops within its deadline (twice ours covers an appliance
                    // configured longer); past that it is another splitter: a configuration
                    // error to exit with.
                    let since = *held_since.get_or_insert_with(Instant::now);
                    let held = reason.contains(cdp_link::message::REFUSED_VOLUME_ALREADY_SPLIT);
                    if !held || since.elapsed() >= self.deadline * 2 {
                        tracing::error!(volume = %self.volume, "appliance refused the volume: {reason}");
                        self.ready.send_replace(Readiness::Refused(reason));
                        return;
                    }
                    tracing::warn!(volume = %self.volume, "appliance refused the volume: {reason}; asking again until its link deadline drops a stale connection");
                }
                Err(e) => {
                    if self.connected.swap(false, Ordering::Relaxed) {
                        tracing::warn!(volume = %self.volume, "split link lost: {e}; reconnecting");
                        backoff_ms = 50;
                        if self.policy == OnApplianceLoss::Mark {
                            self.start_marking();
                        }
                    } else if let LinkError::Refused(reason) = &e {
                        tracing::warn!(volume = %self.volume, "appliance refused the volume: {reason}; asking again");
                    } else {
                        tracing::debug!(volume = %self.volume, "appliance not reachable: {e}");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
        }
    }

    async fn run_one_connection(&self) -> Result<(), LinkError> {
        // A connect to an unreachable host would otherwise wait for TCP's SYN retries.
        let LinkStream {
            mut reader,
            mut writer,
        } = tokio::time::timeout(self.deadline, cdp_link::connect(&self.endpoint))
            .await
            .map_err(|_| {
                LinkError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connecting took longer than the {} ms link deadline",
                        self.deadline.as_millis()
                    ),
                ))
            })??;
        reader.set_idle_timeout(Some(self.deadline));
        let session = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        writer
            .send(&Message::Hello {
                volume: self.volume.clone(),
                size: self.size,
                splitter_id: self.splitter_id,
                session,
            })
            .await?;
        writer.flush().await?;
        // The appliance sends heartbeats while a Welcome waits (sync replication catching up).
        let mut welcome = reader.read().await?;
        while welcome == Message::Heartbeat {
            welcome = reader.read().await?;
        }
        let last_journaled = match welcome {
            Message::Welcome {
                last_source_seq,
                replica_holds_data,
                ..
            } => {
                self.replica_holds_data
                    .store(replica_holds_data, Ordering::Relaxed);
                last_source_seq
            }
            // Logged by the caller, which knows whether it asks again.
            Message::Refuse { reason } => return Err(LinkError::Refused(reason)),
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
        };
        self.on_welcome(last_journaled);
        self.connected.store(true, Ordering::Relaxed);
        self.ready.send_replace(Readiness::Ready);
        tracing::info!(volume = %self.volume, last_journaled, "split link connected");

        let (answers_tx, answers) = mpsc::channel(CHECKSUM_REQUESTS_IN_FLIGHT_MAX);
        let mut replies = ChecksumReplies {
            answers,
            outstanding: 0,
        };
        let receive = async {
            loop {
                match reader.read().await? {
                    Message::Ack { source_seq } => self.on_ack(source_seq),
                    // Only proves the appliance alive; the reader's idle timeout is the check.
                    Message::Heartbeat => {}
                    Message::Durable { source_seq } => {
                        watermark::raise(&self.durable, source_seq);
                    }
                    Message::Refuse { reason } => return Err(LinkError::Refused(reason)),
                    answer @ Message::Checksums { .. } => {
                        // The verify keeps at most CHECKSUM_REQUESTS_IN_FLIGHT_MAX requests
                        // unanswered, so a full channel means answers nobody asked for.
                        answers_tx.try_send(answer).map_err(|_| {
                            LinkError::Protocol("checksums the splitter did not ask for".into())
                        })?;
                    }
                    other => {
                        return Err::<(), LinkError>(LinkError::Protocol(format!(
                            "unexpected message from appliance: {other:?}"
                        )))
                    }
                }
            }
        };
        let send = async {
            let mut batch = Vec::with_capacity(SEND_BATCH_MESSAGES_MAX);
            let mut heartbeat = tokio::time::interval(
                self.deadline / cdp_link::limits::LINK_HEARTBEATS_PER_DEADLINE,
            );
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = self.wake_sender.notified() => {}
                    _ = heartbeat.tick() => {
                        // Sent even while changes flow: cheap, and it keeps the rule simple.
                        writer.send(&Message::Heartbeat).await?;
                        writer.flush().await?;
                        continue;
                    }
                }
                loop {
                    self.take_unsent(&mut batch);
                    if batch.is_empty() {
                        break;
                    }
                    for message in batch.drain(..) {
                        writer.send(&message).await?;
                    }
                    writer.flush().await?;
                }
            }
        };
        let resync = async {
            loop {
                self.resync(&mut replies).await;
                self.resync_wake.notified().await;
            }
        };
        tokio::select! {
            r = receive => r,
            r = send => r,
            r = resync => r,
        }
    }

    /// After (re)connecting: forget what the journal already has and rewind the send cursor.
    fn on_welcome(&self, last_journaled: u64) {
        let mut queue = self.lock_queue();
        if queue.last_seq < last_journaled {
            if queue.last_seq != 0 || !queue.unacked.is_empty() {
                tracing::error!(
                    volume = %self.volume,
                    ours = queue.last_seq,
                    journal = last_journaled,
                    "the journal holds changes this splitter never sent; was the volume written elsewhere?"
                );
            }
            queue.last_seq = last_journaled;
        }
        let acked_before = *self.acked.borrow();
        if last_journaled < acked_before {
            // Only a lost page cache (power failure at the appliance) can do this: changes it
            // acknowledged but had not synced are gone, and they are no longer queued here.
            tracing::error!(
                volume = %self.volume,
                acknowledged = acked_before,
                journal = last_journaled,
                "the appliance lost {} acknowledged but unflushed changes; the replica needs a resync of this volume",
                acked_before - last_journaled
            );
        }
        pop_acked(&mut queue.unacked, last_journaled);
        if queue
            .resync_end_unacked
            .is_some_and(|end| end <= last_journaled)
        {
            queue.resync_ended();
        }
        if queue.unacked.is_empty() {
            // Changes dropped into the bitmap while marking were never journaled; their
            // numbers are reused so the appliance sees no gap.
            queue.last_seq = last_journaled;
            queue.flush_requested = queue.flush_requested.min(last_journaled);
        }
        queue.sent_through = last_journaled;
        queue.flush_sent = 0;
        queue.marking = false;
        // A marking episode that marked nothing (no host write was acknowledged without the
        // journal) needs no resync and leaves no unrecoverable stretch: forget its start, or
        // the next episode's span would reach back to it.
        if queue.resync_pending.is_empty()
            && queue.resync_end_unacked.is_none()
            && !queue.resync_incomplete
        {
            queue.marking_since_ns = None;
        }
        // Requests and comparisons of the old connection will never be answered.
        queue.checksum_requests.clear();
        queue.verify_watch.clear();
        queue.clear_settled_regions();
        drop(queue);
        // Durable marks of the old connection say nothing about renumbered changes.
        self.durable.send_replace(0);
        self.marking.send_replace(false);
        watermark::raise(&self.acked, last_journaled);
        // Resend whatever is still queued, and any flush still waited on.
        self.wake_sender.notify_one();
    }

    fn on_ack(&self, source_seq: u64) {
        let mut queue = self.lock_queue();
        pop_acked(&mut queue.unacked, source_seq);
        if queue
            .resync_end_unacked
            .is_some_and(|end| end <= source_seq)
        {
            queue.resync_ended();
        }
        queue.clear_settled_regions();
        drop(queue);
        watermark::raise(&self.acked, source_seq);
    }

    /// The link is gone and the policy is `mark`: every unacknowledged change becomes marked
    /// regions (its host request completes: production has it) and later changes are marked.
    fn start_marking(&self) {
        let mut queue = self.lock_queue();
        let unacked = std::mem::take(&mut queue.unacked);
        let count = unacked.len();
        if queue.resync_end_unacked.take().is_some()
            || unacked.iter().any(|p| {
                matches!(
                    p.message,
                    Message::ResyncStart { .. } | Message::ResyncEnd { .. }
                )
            })
        {
            queue.resync_incomplete = true;
        }
        let now_ns = cdp_types::TimestampNs::now().0;
        queue.link_lost_ns = Some(now_ns);
        if queue.marking_since_ns.is_none() {
            queue.marking_since_ns = Some(now_ns);
        }
        for pending in unacked {
            queue.mark(pending.regions.clone());
            if let Some(tx) = pending.acked {
                let _ = tx.send(());
            }
        }
        queue.marking = true;
        let dirty = queue.resync_pending.len() as u64 * queue.bitmap.region_bytes();
        drop(queue);
        self.marking.send_replace(true);
        tracing::warn!(
            volume = %self.volume,
            unacknowledged = count,
            dirty_bytes = dirty,
            "appliance unreachable: marking mode, the host keeps being served and changed regions are recorded"
        );
    }

    /// Marks every region for resync (first-time initialization or `cdp volume resync`) and
    /// wakes the resync task. A first initialization verifies instead of copying when the
    /// appliance says the replica holds data (see `resync`).
    pub fn request_full_resync(&self, why: ResyncReason) {
        self.request_resync(why, ResyncMethod::Copy);
    }

    /// Marks every region for a resync by `method` and wakes the resync task. A resync
    /// already running keeps its method for the regions it has not reached.
    pub fn request_resync(&self, why: ResyncReason, method: ResyncMethod) {
        // Reason and method first: the resync task may start as soon as regions are pending.
        {
            let mut progress = self.lock_progress();
            progress.reason = why;
            progress.method = method;
        }
        let mut queue = self.lock_queue();
        for region in 0..queue.bitmap.regions() {
            queue.bitmap.set(region);
            queue.resync_pending.insert(region);
        }
        drop(queue);
        self.resync_wake.notify_one();
    }

    /// Copies every region marked for resync from production into the journal, in order with
    /// host writes (each copy is taken under the queue lock). Holes and all-zero regions go
    /// as Zero changes without payload, consecutive ones merged. Stops if the link drops.
    /// When verifying, regions whose checksum equals the replica's are dropped first.
    async fn resync(&self, replies: &mut ChecksumReplies) {
        let (total, region_bytes, incomplete) = {
            let queue = self.lock_queue();
            (
                queue.resync_pending.len() as u64,
                queue.bitmap.region_bytes(),
                queue.resync_incomplete,
            )
        };
        if total == 0 && !incomplete {
            return;
        }
        let (reason, method) = {
            let mut progress = self.lock_progress();
            progress.total_bytes = total * region_bytes;
            progress.done_bytes = 0;
            progress.verified_bytes = 0;
            progress.copied_bytes = 0;
            progress.started = Some(Instant::now());
            // First protection of a volume whose replica already holds data: it was most
            // likely seeded by other means (a copy of the disk), so only differences travel.
            if progress.reason == ResyncReason::Initial
                && self.replica_holds_data.load(Ordering::Relaxed)
            {
                progress.method = ResyncMethod::Verify;
            }
            (progress.reason, progress.method)
        };
        let before = self.resync_copied_bytes();
        tracing::info!(
            volume = %self.volume,
            regions = total,
            bytes = total * region_bytes,
            ?reason,
            ?method,
            "resync started"
        );
        let mut last_report = Instant::now();
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                return;
            }
            let marking_since_ns = queue.marking_since_ns.unwrap_or(0);
            queue.resync_incomplete = false;
            self.push_marker(&mut queue, move |source_seq| Message::ResyncStart {
                source_seq,
                marking_since_ns,
            });
        }
        self.wake_sender.notify_one();
        if method == ResyncMethod::Verify {
            match self.verify_pending(region_bytes, replies).await {
                Ok(()) => {}
                Err(VerifyStop::LinkLost) => {
                    tracing::warn!(volume = %self.volume, "resync verification interrupted by link loss");
                    return;
                }
                Err(VerifyStop::Unusable(why)) => {
                    tracing::warn!(volume = %self.volume, "resync verification stopped: {why}; copying the remaining regions");
                }
            }
        }
        loop {
            let permit = self.reserve(region_bytes as usize).await;
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                tracing::warn!(volume = %self.volume, remaining = queue.resync_pending.len(), "resync interrupted by link loss");
                return;
            }
            let Some(region) = queue.resync_pending.pop_first() else {
                break;
            };
            let offset = region * region_bytes;
            let length = region_bytes.min(self.size - offset);
            let (change, end_region, copied) = match self.resync_change(
                &mut queue,
                region,
                region_bytes,
            ) {
                Ok(found) => found,
                Err(e) => {
                    queue.resync_pending.insert(region);
                    tracing::error!(volume = %self.volume, region, "resync read failed: {e}; will retry on the next connection");
                    return;
                }
            };
            queue.touched.extend(region..end_region);
            queue.push(change, None, region..end_region, Some(permit));
            drop(queue);
            self.wake_sender.notify_one();
            self.resync_copied_bytes
                .fetch_add(copied, Ordering::Relaxed);
            let done = (end_region - region - 1) * region_bytes + length;
            {
                let mut progress = self.lock_progress();
                progress.done_bytes += done;
                progress.copied_bytes += copied;
            }
            if last_report.elapsed() >= RESYNC_REPORT_INTERVAL {
                last_report = Instant::now();
                let p = self.lock_progress();
                tracing::info!(volume = %self.volume, "resync {:.1}% ({} of {} bytes)", p.percent(), p.done_bytes, p.total_bytes);
            }
        }
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                // The ResyncStart went out on a connection that is gone: the next one
                // brackets again, so the appliance's span is closed by a ResyncEnd.
                queue.resync_incomplete = true;
                tracing::warn!(volume = %self.volume, "resync end interrupted by link loss");
                return;
            }
            let end = self.push_marker(&mut queue, |source_seq| Message::ResyncEnd { source_seq });
            queue.resync_end_unacked = Some(end);
        }
        self.wake_sender.notify_one();
        // One critical section: `state()` must never see the resync ended (no `started`)
        // without its summary (`last`).
        let copied_bytes = self.resync_copied_bytes() - before;
        let mut progress = self.lock_progress();
        let seconds = progress
            .started
            .take()
            .map_or(0.0, |s| s.elapsed().as_secs_f64());
        let verified_bytes = progress.verified_bytes;
        progress.last = Some(ResyncSummary {
            method,
            total_bytes: total * region_bytes,
            verified_bytes,
            copied_bytes,
            seconds,
            completed_ns: cdp_types::TimestampNs::now().0,
        });
        tracing::info!(
            volume = %self.volume,
            regions = total,
            verified_bytes,
            copied_bytes,
            seconds,
            ?reason,
            ?method,
            "resync complete"
        );
        progress.reason = ResyncReason::Dirty;
        progress.method = ResyncMethod::Copy;
    }

    /// Verified seeding: compares the checksum of every checksum region holding pending
    /// regions with the replica's, and drops the pending regions of those that are equal, so
    /// the copy that follows moves only what differs.
    async fn verify_pending(
        &self,
        bitmap_region_bytes: u64,
        replies: &mut ChecksumReplies,
    ) -> Result<(), VerifyStop> {
        // Both powers of two, so the larger is a whole number of bitmap regions.
        let checksum_region_bytes = VERIFY_REGION_BYTES.max(bitmap_region_bytes);
        if checksum_region_bytes > u64::from(CHECKSUM_REGION_BYTES_MAX)
            || checksum_region_bytes < u64::from(CHECKSUM_REGION_BYTES_MIN)
        {
            return Err(VerifyStop::Unusable(format!(
                "bitmap regions of {bitmap_region_bytes} bytes cannot be verified"
            )));
        }
        // Answers to requests of a verify abandoned earlier on this connection come first.
        while replies.outstanding > 0 {
            replies.answers.recv().await.ok_or(VerifyStop::LinkLost)?;
            replies.outstanding -= 1;
        }
        let per_checksum = checksum_region_bytes / bitmap_region_bytes;
        let mut todo: Vec<u64> = {
            let mut queue = self.lock_queue();
            queue.verify_watch.clear();
            queue.verify_region_bytes = checksum_region_bytes;
            let mut todo: Vec<u64> = queue
                .resync_pending
                .iter()
                .map(|r| r / per_checksum)
                .collect();
            todo.dedup();
            todo
        };
        let mut round = 0;
        let result = loop {
            let may_retry = round < VERIFY_RETRIES_MAX;
            match self
                .verify_round(
                    &todo,
                    checksum_region_bytes,
                    per_checksum,
                    may_retry,
                    replies,
                )
                .await
            {
                Ok(retry) if retry.is_empty() => break Ok(()),
                Ok(retry) => {
                    tracing::debug!(volume = %self.volume, regions = retry.len(), "verifying regions written during the comparison again");
                    todo = retry;
                    round += 1;
                }
                Err(stop) => break Err(stop),
            }
        };
        let mut queue = self.lock_queue();
        queue.verify_watch.clear();
        queue.verify_region_bytes = 0;
        result
    }

    /// One pass over `todo` (checksum region indexes, ascending), with up to
    /// CHECKSUM_REQUESTS_IN_FLIGHT_MAX requests in flight. Returns the regions to verify again.
    async fn verify_round(
        &self,
        todo: &[u64],
        checksum_region_bytes: u64,
        per_checksum: u64,
        may_retry: bool,
        replies: &mut ChecksumReplies,
    ) -> Result<Vec<u64>, VerifyStop> {
        let mut runs = contiguous_runs(todo, VERIFY_REQUEST_REGIONS_MAX).into_iter();
        let mut in_flight: VecDeque<ChecksumInFlight> = VecDeque::new();
        let mut retry = Vec::new();
        let mut last_report = Instant::now();
        loop {
            while in_flight.len() < CHECKSUM_REQUESTS_IN_FLIGHT_MAX {
                let Some((first, count)) = runs.next() else {
                    break;
                };
                in_flight.push_back(
                    self.ask_checksums(first, count, checksum_region_bytes)
                        .await?,
                );
                replies.outstanding += 1;
            }
            let Some(asked) = in_flight.pop_front() else {
                return Ok(retry);
            };
            let answer = replies.answers.recv().await.ok_or(VerifyStop::LinkLost)?;
            replies.outstanding -= 1;
            let sums = match answer {
                Message::Checksums {
                    offset,
                    region_bytes,
                    sums,
                } if offset == asked.first * checksum_region_bytes
                    && u64::from(region_bytes) == checksum_region_bytes
                    && sums.len() as u64 == asked.count =>
                {
                    sums
                }
                other => {
                    return Err(VerifyStop::Unusable(format!(
                        "the appliance answered checksums for {} regions at {} with {other:?}",
                        asked.count,
                        asked.first * checksum_region_bytes
                    )))
                }
            };
            self.settle_compared(
                &asked,
                &sums,
                checksum_region_bytes,
                per_checksum,
                may_retry,
                &mut retry,
            );
            if last_report.elapsed() >= RESYNC_REPORT_INTERVAL {
                last_report = Instant::now();
                let p = self.lock_progress();
                tracing::info!(volume = %self.volume, "resync verify {:.1}% ({} bytes compared, {} equal or copied of {})", p.percent(), p.verified_bytes, p.done_bytes, p.total_bytes);
            }
        }
    }

    /// Starts watching `count` checksum regions from `first` for host writes, checksums them
    /// in production (blocking pool) and queues the request for the replica's checksums.
    async fn ask_checksums(
        &self,
        first: u64,
        count: u64,
        checksum_region_bytes: u64,
    ) -> Result<ChecksumInFlight, VerifyStop> {
        let offset = first * checksum_region_bytes;
        let length = (count * checksum_region_bytes).min(self.size - offset);
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                return Err(VerifyStop::LinkLost);
            }
            // Watch before hashing: a write landing while production is read must be seen.
            for region in first..first + count {
                queue.verify_watch.insert(region, false);
            }
        }
        let production = Arc::clone(&self.production);
        let sums = tokio::task::spawn_blocking(move || {
            production_checksums(&production, offset, length, checksum_region_bytes)
        })
        .await
        .map_err(|e| VerifyStop::Unusable(format!("checksum task failed: {e}")))?
        .map_err(|e| VerifyStop::Unusable(format!("production read at {offset}: {e}")))?;
        {
            let mut queue = self.lock_queue();
            if queue.marking || !self.is_connected() {
                return Err(VerifyStop::LinkLost);
            }
            let after = queue.last_seq;
            queue.checksum_requests.push_back((
                after,
                Message::ChecksumRequest {
                    offset,
                    length,
                    // Bounded by CHECKSUM_REGION_BYTES_MAX in verify_pending.
                    region_bytes: checksum_region_bytes as u32,
                },
            ));
        }
        self.wake_sender.notify_one();
        Ok(ChecksumInFlight {
            first,
            count,
            production: sums,
        })
    }

    /// Decides each compared checksum region: equal ones leave the pending set (their bits
    /// clear once the journal has everything queued meanwhile); differing ones stay pending
    /// for the copy, or go back to `retry` when the host wrote to them during the comparison.
    fn settle_compared(
        &self,
        asked: &ChecksumInFlight,
        replica: &[RegionChecksum],
        checksum_region_bytes: u64,
        per_checksum: u64,
        may_retry: bool,
        retry: &mut Vec<u64>,
    ) {
        let mut equal_bytes = 0;
        let mut verified_bytes = 0;
        let mut queue = self.lock_queue();
        let bitmap_region_bytes = queue.bitmap.region_bytes();
        let bitmap_regions = queue.bitmap.regions();
        for (i, (ours, theirs)) in asked.production.iter().zip(replica).enumerate() {
            let region = asked.first + i as u64;
            let written = queue.verify_watch.remove(&region).unwrap_or(false);
            if ours != theirs && written && may_retry {
                retry.push(region);
                continue;
            }
            let start = region * checksum_region_bytes;
            verified_bytes += checksum_region_bytes.min(self.size - start);
            if ours != theirs {
                continue;
            }
            let first = region * per_checksum;
            for bit in first..(first + per_checksum).min(bitmap_regions) {
                if queue.resync_pending.remove(&bit) {
                    queue.touched.push(bit);
                    equal_bytes += bitmap_region_bytes.min(self.size - bit * bitmap_region_bytes);
                }
            }
        }
        queue.clear_settled_regions();
        drop(queue);
        let mut progress = self.lock_progress();
        progress.done_bytes += equal_bytes;
        progress.verified_bytes += verified_bytes;
    }

    /// Queues a resync marker (start or end) in the change stream, under the queue lock so it
    /// sits exactly between the changes before and after it.
    fn push_marker(&self, queue: &mut Queue, marker: impl FnOnce(u64) -> Message) -> u64 {
        queue.push(marker, None, 0..0, None)
    }

    /// The change that brings the journal's copy of `region` (already popped) up to date:
    /// a Write of its bytes, or a Zero covering it and any directly following pending regions
    /// that are holes too. Returns the change, the end region and the payload bytes.
    #[allow(clippy::type_complexity)]
    fn resync_change(
        &self,
        queue: &mut Queue,
        region: u64,
        region_bytes: u64,
    ) -> std::io::Result<(Box<dyn FnOnce(u64) -> Message + Send>, u64, u64)> {
        let offset = region * region_bytes;
        let length = region_bytes.min(self.size - offset);
        let data_at = self.production.next_data(offset)?;
        let zero_run = |queue: &mut Queue, hole_end: u64| {
            let mut end = offset + length;
            while end < hole_end.min(self.size)
                && end - offset < RESYNC_ZERO_RUN_BYTES_MAX
                && queue.resync_pending.first() == Some(&(end / region_bytes))
            {
                let next_len = region_bytes.min(self.size - end);
                if end + next_len > hole_end {
                    break;
                }
                queue.resync_pending.pop_first();
                end += next_len;
            }
            end
        };
        if data_at.is_some_and(|d| d >= offset + length) {
            let end = zero_run(queue, data_at.unwrap_or(offset + length));
            let end_region = end.div_ceil(region_bytes);
            return Ok((
                Box::new(move |source_seq| Message::Zero {
                    source_seq,
                    offset,
                    length: end - offset,
                }),
                end_region,
                0,
            ));
        }
        let data = self.production.read_at(offset, length as usize)?;
        if data.iter().all(|b| *b == 0) {
            return Ok((
                Box::new(move |source_seq| Message::Zero {
                    source_seq,
                    offset,
                    length,
                }),
                region + 1,
                0,
            ));
        }
        Ok((
            Box::new(move |source_seq| Message::Write {
                source_seq,
                offset,
                data,
            }),
            region + 1,
            length,
        ))
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
            nbd_clients: 0,
        }
    }

    fn lock_progress(&self) -> MutexGuard<'_, ResyncProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the next unsent changes (and a pending flush request) into `batch`.
    fn take_unsent(&self, batch: &mut Vec<Message>) {
        let mut queue = self.lock_queue();
        let sent_through = queue.sent_through;
        let start = queue
            .unacked
            .partition_point(|p| p.source_seq <= sent_through);
        let mut last = sent_through;
        for pending in queue.unacked.range(start..).take(SEND_BATCH_MESSAGES_MAX) {
            batch.push(pending.message.clone());
            last = pending.source_seq;
        }
        queue.sent_through = last;
        while queue
            .checksum_requests
            .front()
            .is_some_and(|(after, _)| *after <= last)
        {
            if let Some((_, request)) = queue.checksum_requests.pop_front() {
                batch.push(request);
            }
        }
        // A flush may only be sent once every change it covers is on the wire ahead of it.
        if queue.flush_requested > queue.flush_sent && queue.flush_requested <= last {
            batch.push(Message::Flush {
                source_seq: queue.flush_requested,
            });
            queue.flush_sent = queue.flush_requested;
        }
    }
}

/// Checksums production's regions of `region_bytes` in `offset..offset + length` (the last
/// may be short). Holes are not read: their checksum is that of zeroes.
fn production_checksums(
    production: &BlockFile,
    offset: u64,
    length: u64,
    region_bytes: u64,
) -> std::io::Result<Vec<RegionChecksum>> {
    let end = offset + length;
    let mut sums = Vec::with_capacity(length.div_ceil(region_bytes) as usize);
    let mut zeroes: Option<(usize, RegionChecksum)> = None;
    let mut at = offset;
    while at < end {
        let len = region_bytes.min(end - at);
        let hole = production.next_data(at)?.is_some_and(|d| d >= at + len);
        if hole {
            let sum = match zeroes {
                Some((n, sum)) if n == len as usize => sum,
                _ => {
                    let sum = region_checksum(&vec![0u8; len as usize]);
                    zeroes = Some((len as usize, sum));
                    sum
                }
            };
            sums.push(sum);
        } else {
            sums.push(region_checksum(&production.read_at(at, len as usize)?));
        }
        at += len;
    }
    Ok(sums)
}

/// Splits ascending indexes into runs of consecutive ones, each at most `run_max` long:
/// (first, count).
fn contiguous_runs(indexes: &[u64], run_max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &i in indexes {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == i && *count < run_max => *count += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Forgets changes the journal has and wakes the host requests that waited for them.
fn pop_acked(unacked: &mut VecDeque<Pending>, through: u64) {
    while unacked.front().is_some_and(|p| p.source_seq <= through) {
        if let Some(Pending {
            acked: Some(tx), ..
        }) = unacked.pop_front()
        {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_checksums_cover_holes_data_and_a_short_last_region() {
        // Holes are not read but must checksum like the zeroes they read as, and the last
        // region, cut by the volume's end, must checksum its own length only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        let region = 64 * 1024u64;
        let size = 2 * region + 4096;
        {
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(size).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 100], region + 5).unwrap();
        }
        let production = BlockFile::open(&path, true).unwrap();
        let sums = production_checksums(&production, 0, size, region).unwrap();
        let mut data = vec![0u8; region as usize];
        data[5..105].fill(7);
        assert_eq!(
            sums,
            vec![
                region_checksum(&vec![0u8; region as usize]),
                region_checksum(&data),
                region_checksum(&[0u8; 4096]),
            ]
        );
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_maximum() {
        assert_eq!(contiguous_runs(&[], 4), vec![]);
        assert_eq!(
            contiguous_runs(&[0, 1, 2, 5, 6, 7, 8, 9, 10], 4),
            vec![(0, 3), (5, 4), (9, 2)]
        );
    }
}
