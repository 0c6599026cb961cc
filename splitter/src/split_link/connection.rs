//! The split link's connection: connect, Hello and Welcome, heartbeats and the link deadline,
//! the sender and receiver halves, resend after a Welcome, and marking when the link is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use cdp_link::limits::CHECKSUM_REQUESTS_IN_FLIGHT_MAX;
use cdp_link::{watermark, LinkError, LinkStream, Message};
use tokio::sync::mpsc;

use super::queue::{pop_acked, Queue};
use super::seeding::ChecksumReplies;
use super::{Readiness, SplitLink};
use crate::config::OnApplianceLoss;
use crate::limits::{RECONNECT_BACKOFF_MS_MAX, SEND_BATCH_MESSAGES_MAX};

impl SplitLink {
    pub(super) async fn run_connections(self: Arc<Self>) {
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
        let resync_follows = self.lock_queue().announce_resync();
        writer
            .send(&Message::Hello {
                volume: self.volume.clone(),
                size: self.size,
                splitter_id: self.splitter_id,
                session,
                resync_follows,
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
                    "expected Welcome, got {}",
                    other.name()
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
                            "unexpected message from appliance: {}",
                            other.name()
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
                    self.lock_queue().take_unsent(&mut batch);
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
        if queue.last_seq < last_journaled && (queue.last_seq != 0 || !queue.unacked.is_empty()) {
            tracing::error!(
                volume = %self.volume,
                ours = queue.last_seq,
                journal = last_journaled,
                "the journal holds changes this splitter never sent; was the volume written elsewhere?"
            );
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
        queue.welcome(last_journaled);
        drop(queue);
        // Durable marks of the old connection say nothing about renumbered changes.
        self.durable.send_replace(0);
        self.marking.send_replace(false);
        watermark::raise(&self.acked, last_journaled);
        // Resend whatever is still queued, and any flush still waited on.
        self.wake_sender.notify_one();
    }

    fn on_ack(&self, source_seq: u64) {
        self.lock_queue().ack(source_seq);
        watermark::raise(&self.acked, source_seq);
    }

    /// The link is gone and the policy is `mark`: every unacknowledged change becomes marked
    /// regions (its host request completes: production has it) and later changes are marked.
    pub(super) fn start_marking(&self) {
        let mut queue = self.lock_queue();
        let count = queue.start_marking(cdp_types::TimestampNs::now().0);
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
}

/// What a connection's start, end and sender do to the queue; plain state, so the resend
/// rules are tested without sockets.
impl Queue {
    /// A Welcome said the journal holds every change through `last_journaled`: forget those,
    /// rewind the send cursor so exactly the later ones are resent, in order, and leave
    /// marking (numbering resumes from the journal when nothing is left queued).
    pub(super) fn welcome(&mut self, last_journaled: u64) {
        if self.last_seq < last_journaled {
            self.last_seq = last_journaled;
        }
        pop_acked(&mut self.unacked, last_journaled);
        if self
            .resync_end_unacked
            .is_some_and(|end| end <= last_journaled)
        {
            self.resync_ended();
        }
        if self.unacked.is_empty() {
            // Changes dropped into the bitmap while marking were never journaled; their
            // numbers are reused so the appliance sees no gap.
            self.last_seq = last_journaled;
            self.flush_requested = self.flush_requested.min(last_journaled);
        }
        self.sent_through = last_journaled;
        self.flush_sent = 0;
        self.marking = false;
        // A marking episode that marked nothing (no host write was acknowledged without the
        // journal) needs no resync and leaves no unrecoverable stretch: forget its start, or
        // the next episode's span would reach back to it.
        if self.resync_pending.is_empty()
            && self.resync_end_unacked.is_none()
            && !self.resync_incomplete
        {
            self.marking_since_ns = None;
        }
        // Requests and comparisons of the old connection will never be answered.
        self.checksum_requests.clear();
        self.verify_watch.clear();
        self.clear_settled_regions();
    }

    /// The link was lost at `now_ns` and the policy is `mark`: every unacknowledged change
    /// becomes marked regions and its host request completes; later changes are only marked.
    /// Returns how many changes were unacknowledged.
    pub(super) fn start_marking(&mut self, now_ns: u64) -> usize {
        let unacked = std::mem::take(&mut self.unacked);
        let count = unacked.len();
        if self.resync_end_unacked.take().is_some()
            || unacked.iter().any(|p| {
                matches!(
                    p.message,
                    Message::ResyncStart { .. } | Message::ResyncEnd { .. }
                )
            })
        {
            self.resync_incomplete = true;
        }
        self.link_lost_ns = Some(now_ns);
        if self.marking_since_ns.is_none() {
            self.marking_since_ns = Some(now_ns);
        }
        for pending in unacked {
            self.mark(pending.regions.clone());
            if let Some(tx) = pending.acked {
                let _ = tx.send(());
            }
        }
        self.marking = true;
        count
    }

    /// Moves the next unsent changes (and a pending flush request) into `batch`.
    pub(super) fn take_unsent(&mut self, batch: &mut Vec<Message>) {
        let sent_through = self.sent_through;
        let start = self
            .unacked
            .partition_point(|p| p.source_seq <= sent_through);
        let mut last = sent_through;
        for pending in self.unacked.range(start..).take(SEND_BATCH_MESSAGES_MAX) {
            batch.push(pending.message.clone());
            last = pending.source_seq;
        }
        self.sent_through = last;
        while self
            .checksum_requests
            .front()
            .is_some_and(|(after, _)| *after <= last)
        {
            if let Some((_, request)) = self.checksum_requests.pop_front() {
                batch.push(request);
            }
        }
        // A flush may only be sent once every change it covers is on the wire ahead of it.
        if self.flush_requested > self.flush_sent && self.flush_requested <= last {
            batch.push(Message::Flush {
                source_seq: self.flush_requested,
            });
            self.flush_sent = self.flush_requested;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::queue::testing::{
        answered, queue, seqs, submit, submit_per_region, unacked, zero_offsets, REGION,
    };
    use super::*;

    #[test]
    fn block_policy_resends_exactly_the_changes_after_last_journaled_in_order() {
        let (_dir, mut q) = queue(8);
        let mut waits = submit_per_region(&mut q, 5);
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        assert_eq!(seqs(&batch), vec![1, 2, 3, 4, 5]);
        q.ack(1);
        // The connection breaks; under `block` nothing else happens until the next Welcome,
        // whose journal has two more changes than were acknowledged.
        q.welcome(3);
        assert_eq!(unacked(&q), vec![4, 5]);
        let answered_now: Vec<bool> = waits.iter_mut().map(answered).collect();
        assert_eq!(answered_now, vec![true, true, true, false, false]);
        batch.clear();
        q.take_unsent(&mut batch);
        assert_eq!(
            seqs(&batch),
            vec![4, 5],
            "only the changes after the journal's"
        );
        assert_eq!(
            zero_offsets(&batch),
            vec![3 * REGION, 4 * REGION],
            "the same changes, in order"
        );
        // Each is sent once per connection, and numbering continues after them.
        batch.clear();
        q.take_unsent(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(submit(&mut q, 0, 4096).expect("queued").0, 6);
    }

    #[test]
    fn block_policy_resends_everything_when_the_journal_has_none_of_it() {
        let (_dir, mut q) = queue(4);
        submit_per_region(&mut q, 3);
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        q.welcome(0);
        batch.clear();
        q.take_unsent(&mut batch);
        assert_eq!(seqs(&batch), vec![1, 2, 3]);
    }

    #[test]
    fn a_flush_is_resent_after_the_changes_it_covers() {
        let (_dir, mut q) = queue(4);
        submit_per_region(&mut q, 3);
        q.flush_requested = 3;
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        assert_eq!(batch.last(), Some(&Message::Flush { source_seq: 3 }));
        q.welcome(1);
        batch.clear();
        q.take_unsent(&mut batch);
        assert_eq!(seqs(&batch), vec![2, 3]);
        assert_eq!(batch.last(), Some(&Message::Flush { source_seq: 3 }));
    }

    #[test]
    fn mark_policy_turns_unacked_changes_into_dirty_regions_and_renumbers_from_the_journal() {
        let (_dir, mut q) = queue(8);
        let mut waits = submit_per_region(&mut q, 3);
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        q.ack(1);
        assert_eq!(q.start_marking(1_000), 2);
        // The host requests complete (production has them); their regions await the resync.
        assert!(waits.iter_mut().all(answered));
        assert!(unacked(&q).is_empty());
        assert_eq!(
            q.resync_pending.iter().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(q.bitmap.is_set(1) && q.bitmap.is_set(2));
        // While marking, a change is only marked.
        assert!(submit(&mut q, 5 * REGION, 4096).is_none());
        assert!(q.resync_pending.contains(&5) && q.bitmap.is_set(5));
        // The journal got change 1 only: numbering resumes from there, with no gap.
        q.welcome(1);
        assert!(!q.marking);
        assert_eq!(q.last_seq, 1);
        batch.clear();
        q.take_unsent(&mut batch);
        assert!(batch.is_empty(), "marked changes are resynced, not resent");
        assert_eq!(submit(&mut q, 6 * REGION, 4096).expect("queued").0, 2);
        assert_eq!(
            q.resync_pending.iter().copied().collect::<Vec<_>>(),
            vec![1, 2, 5]
        );
    }
}
