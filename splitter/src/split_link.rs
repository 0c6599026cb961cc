//! The splitter's end of the split link: orders changes, sends them, tracks acks, resends after a reconnect.
//!
//! Every change applied to production is queued here under the same lock that applied it, so
//! production and the journal see overlapping writes in one order (DESIGN.md rule 2). A change
//! stays queued until the appliance acknowledges that it is in the journal; after a reconnect
//! the appliance's `Welcome` names the last change it journaled and only later ones are resent,
//! so nothing is lost and nothing is journaled twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cdp_link::{watermark, LinkError, LinkStream, Message};
use cdp_types::Endpoint;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::limits::{
    CHANGE_OVERHEAD_BYTES, RECONNECT_BACKOFF_MS_MAX, SEND_BATCH_MESSAGES_MAX, UNACKED_BYTES_MAX,
};

/// A change waiting for the appliance's Ack.
struct Pending {
    source_seq: u64,
    message: Message,
    /// Wakes exactly the host request waiting for this change, instead of every waiter.
    acked: Option<oneshot::Sender<()>>,
}

/// Completes when the appliance has journaled one change.
pub struct AckWait(oneshot::Receiver<()>);

#[derive(Default)]
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
}

/// Whether the appliance has accepted this volume yet.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Readiness {
    Waiting,
    Ready,
    Refused(String),
}

/// Room in the unacked window for one change; released when the change is acknowledged.
pub struct WindowPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl SplitLink {
    /// Creates the link and starts connecting in the background; see `wait_ready`.
    pub fn start(volume: &str, size: u64, endpoint: Endpoint) -> Arc<SplitLink> {
        let link = Arc::new(SplitLink {
            volume: volume.to_string(),
            size,
            endpoint,
            splitter_id: rand::random(),
            queue: Mutex::new(Queue::default()),
            wake_sender: Notify::new(),
            acked: watch::Sender::new(0),
            durable: watch::Sender::new(0),
            connected: AtomicBool::new(false),
            ready: watch::Sender::new(Readiness::Waiting),
            window: Arc::new(Semaphore::new(UNACKED_BYTES_MAX)),
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
        let cost = (payload_bytes + CHANGE_OVERHEAD_BYTES).min(UNACKED_BYTES_MAX) as u32;
        match Arc::clone(&self.window).acquire_many_owned(cost).await {
            Ok(permit) => WindowPermit(permit),
            // The semaphore is never closed while the link exists.
            Err(_) => unreachable!("split link window closed"),
        }
    }

    /// Applies a change to production and queues it for the appliance, atomically with
    /// respect to every other change of this volume. Returns its source_seq and a handle
    /// that completes once the journal has it.
    pub fn submit<E>(
        &self,
        apply: impl FnOnce() -> Result<(), E>,
        message: impl FnOnce(u64) -> Message,
    ) -> Result<(u64, AckWait), E> {
        let (tx, rx) = oneshot::channel();
        let mut queue = self.lock_queue();
        apply()?;
        queue.last_seq += 1;
        let source_seq = queue.last_seq;
        queue.unacked.push_back(Pending {
            source_seq,
            message: message(source_seq),
            acked: Some(tx),
        });
        drop(queue);
        self.wake_sender.notify_one();
        Ok((source_seq, AckWait(rx)))
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
    pub async fn wait_durable(&self, source_seq: u64) {
        if *self.durable.borrow() >= source_seq {
            return;
        }
        {
            let mut queue = self.lock_queue();
            queue.flush_requested = queue.flush_requested.max(source_seq);
        }
        self.wake_sender.notify_one();
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|d| *d >= source_seq).await;
    }

    pub fn acked_seq(&self) -> u64 {
        *self.acked.borrow()
    }

    pub fn durable_seq(&self) -> u64 {
        *self.durable.borrow()
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock would already have aborted the write path; the queue
        // itself is always left consistent, so recovering the guard is safe.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run_connections(self: Arc<Self>) {
        let mut backoff_ms = 50u64;
        loop {
            match self.run_one_connection().await {
                Ok(()) => return,
                Err(LinkError::Refused(reason)) if *self.ready.borrow() == Readiness::Waiting => {
                    self.ready.send_replace(Readiness::Refused(reason));
                    return;
                }
                Err(e) => {
                    if self.connected.swap(false, Ordering::Relaxed) {
                        tracing::warn!(volume = %self.volume, "split link lost: {e}; reconnecting");
                        backoff_ms = 50;
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
        let LinkStream {
            mut reader,
            mut writer,
        } = cdp_link::connect(&self.endpoint).await?;
        writer
            .send(&Message::Hello {
                volume: self.volume.clone(),
                size: self.size,
                splitter_id: self.splitter_id,
            })
            .await?;
        writer.flush().await?;
        let last_journaled = match reader.read().await? {
            Message::Welcome {
                last_source_seq, ..
            } => last_source_seq,
            Message::Refuse { reason } => {
                tracing::error!(volume = %self.volume, "appliance refused the volume: {reason}");
                return Err(LinkError::Refused(reason));
            }
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

        let receive = async {
            loop {
                match reader.read().await? {
                    Message::Ack { source_seq } => self.on_ack(source_seq),
                    Message::Durable { source_seq } => {
                        watermark::raise(&self.durable, source_seq);
                    }
                    Message::Refuse { reason } => return Err(LinkError::Refused(reason)),
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
            loop {
                self.wake_sender.notified().await;
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
        tokio::select! {
            r = receive => r,
            r = send => r,
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
        queue.sent_through = last_journaled;
        queue.flush_sent = 0;
        drop(queue);
        watermark::raise(&self.acked, last_journaled);
        // Resend whatever is still queued, and any flush still waited on.
        self.wake_sender.notify_one();
    }

    fn on_ack(&self, source_seq: u64) {
        let mut queue = self.lock_queue();
        pop_acked(&mut queue.unacked, source_seq);
        drop(queue);
        watermark::raise(&self.acked, source_seq);
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
        // A flush may only be sent once every change it covers is on the wire ahead of it.
        if queue.flush_requested > queue.flush_sent && queue.flush_requested <= last {
            batch.push(Message::Flush {
                source_seq: queue.flush_requested,
            });
            queue.flush_sent = queue.flush_requested;
        }
    }
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
