//! The appliance's end of split links: welcomes a splitter, checks each change, queues it for the journal.
//!
//! Checksum requests (verified seeding) are handed to a per-connection task in
//! `replica_verify.rs`, so waiting for distribution never holds up this volume's appends.
//!
//! In sync (and dynamic, while synchronous) replication mode the receive half still appends
//! at once, but the sender half holds each Ack (and Durable) until the remote copy
//! acknowledged the journal seqs of the changes it covers (`ConnectionProgress::
//! remote_pending` against the group's `shipped` watch). The receive loop never waits for
//! the remote: the splitter's unacked window is what holds the host back. The Welcome
//! itself waits in sync mode until the remote holds the whole journal (see `serve_link`).
//!
//! Liveness: the reader fails once the splitter has sent nothing (heartbeats included) for
//! `link_deadline_ms`, and the sender half sends a heartbeat every quarter of it, so a
//! silent partition ends the connection on both ends within the deadline. A reconnect of the
//! same splitter over a connection this side still holds (half-open) replaces it at once:
//! see `volume_link.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cdp_journal::{RecordIn, RecordKind};
use cdp_link::limits::CHECKSUM_REQUESTS_IN_FLIGHT_MAX;
use cdp_link::{LinkError, LinkStream, Message};
use tokio::sync::mpsc;

use crate::connection_progress::ConnectionProgress;
use crate::group::{Group, GroupVolume};
use crate::group_registry::Groups;
use crate::limits::{APPEND_BATCH_BYTES_MAX, APPEND_BATCH_ITEMS_MAX};
use crate::replica_verify::{self, ChecksumAsk};
use crate::volume_link::LinkClaim;

/// Releases a volume's claim and "connected" mark when its connection ends, however it ends.
struct ConnectedGuard {
    volume: Arc<GroupVolume>,
    claim: u64,
    /// How long before this side noticed the splitter may already have given up.
    margin: Duration,
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.volume.connected.set(false);
        self.volume.link.release(self.claim, self.margin);
    }
}

async fn refuse(writer: &mut cdp_link::FrameWriter, volume: &str, reason: String) {
    tracing::warn!(volume, "refusing split link: {reason}");
    let _ = writer.send(&Message::Refuse { reason }).await;
    let _ = writer.flush().await;
}

/// Serves one split-link connection until it closes or breaks the protocol.
pub async fn serve_link(groups: Arc<Groups>, stream: LinkStream, deadline: Duration) {
    let LinkStream {
        mut reader,
        mut writer,
    } = stream;
    // A connection that never says Hello holds a link slot only this long.
    reader.set_idle_timeout(Some(deadline));
    let (volume_name, size, splitter_id, session, resync_follows) = match reader.read().await {
        Ok(Message::Hello {
            volume,
            size,
            splitter_id,
            session,
            resync_follows,
        }) => (volume, size, splitter_id, session, resync_follows),
        Ok(other) => {
            tracing::warn!(got = other.name(), "split link: expected Hello; closing");
            return;
        }
        Err(e) => {
            tracing::warn!("split link: bad Hello: {e}; closing");
            return;
        }
    };
    let Some((group, volume)) = groups.find_volume(&volume_name) else {
        refuse(
            &mut writer,
            &volume_name,
            format!("volume {volume_name:?} is not configured on this appliance"),
        )
        .await;
        return;
    };
    if volume.size != size {
        refuse(
            &mut writer,
            &volume_name,
            format!(
            "volume {volume_name:?} is {} bytes at the appliance but {size} bytes at the splitter",
            volume.size
        ),
        )
        .await;
        return;
    }
    // Remote replication: a remote copy is written only by its replication link (rule 6).
    if let Err(reason) = group.refuse_local_changes_at_remote_copy() {
        refuse(&mut writer, &volume_name, reason.to_string()).await;
        return;
    }
    let fenced = group.failure().borrow().clone();
    if let Some(failure) = fenced {
        refuse(
            &mut writer,
            &volume_name,
            format!("group {} is fenced: {failure}", group.name),
        )
        .await;
        return;
    }
    // Sync mode: the Welcome tells the splitter which changes the journal holds, and it then
    // completes their host requests. After a crash of this appliance the journal may hold
    // changes the remote copy does not have yet, so the Welcome waits until the remote
    // acknowledged everything journaled so far (or dynamic mode falls back to async). A
    // splitter with `on_appliance_loss = "block"` keeps its host waiting meanwhile; one in
    // marking mode has already answered its host from the bitmap.
    if let Some(shipping) = group
        .replication()
        .shipping
        .as_ref()
        .filter(|s| s.is_sync_active())
    {
        let target = group.last_seq().0;
        let mut shipped = shipping.shipped.subscribe();
        if *shipped.borrow_and_update() < target {
            tracing::info!(volume = %volume_name, target, "sync replication: the splitter is welcomed once the remote copy holds the journal through seq {target}");
            // Heartbeats meanwhile, so the splitter's deadline does not cut the wait short.
            let mut heartbeat = tokio::time::interval(heartbeat_interval(deadline));
            loop {
                tokio::select! {
                    r = async { shipped.wait_for(|s| *s >= target || !shipping.is_sync_active()).await.map(|_| ()) } => {
                        if r.is_err() { return; }
                        break;
                    }
                    _ = heartbeat.tick() => {
                        if writer.send(&Message::Heartbeat).await.is_err()
                            || writer.flush().await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    }
    // The old connection, if this replaces one, has released the volume once this returns:
    // its appends are over, so `last_source_seq` below is final.
    let claim = match volume
        .link
        .claim(splitter_id, session, resync_follows, deadline)
        .await
    {
        Ok(claim) => claim,
        Err(why) => {
            refuse(
                &mut writer,
                &volume_name,
                format!("volume {volume_name:?} {why}"),
            )
            .await;
            return;
        }
    };
    volume.connected.set(true);
    let _connected = ConnectedGuard {
        volume: Arc::clone(&volume),
        claim: claim.id,
        margin: deadline,
    };
    let mut fence = claim.fence.clone();
    let last_journaled = volume.last_source_seq.load(Ordering::Relaxed);
    let progress = ConnectionProgress::new(last_journaled);
    let v = Arc::clone(&volume);
    let replica_holds_data =
        tokio::task::spawn_blocking(move || replica_verify::replica_holds_data(&v))
            .await
            // A panicked check tells nothing; verifying is correct either way.
            .unwrap_or(true);
    if writer
        .send(&Message::Welcome {
            volume_id: volume.id,
            last_source_seq: last_journaled,
            replica_holds_data,
        })
        .await
        .is_err()
        || writer.flush().await.is_err()
    {
        return;
    }
    tracing::info!(volume = %volume_name, splitter_id = format!("{splitter_id:016x}"), last_journaled, replica_holds_data, "splitter connected");

    let (asks_tx, asks_rx) = mpsc::channel(CHECKSUM_REQUESTS_IN_FLIGHT_MAX);
    let (answers_tx, mut answers_rx) = mpsc::channel(CHECKSUM_REQUESTS_IN_FLIGHT_MAX);
    let checksums = async {
        replica_verify::answer_checksum_requests(
            Arc::clone(&group),
            Arc::clone(&volume),
            asks_rx,
            answers_tx,
        )
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
        // The receive half dropped its end: the connection is ending anyway.
        std::future::pending::<Result<(), LinkError>>().await
    };
    let receive = receive_changes(
        &group,
        &volume,
        &progress,
        &mut reader,
        last_journaled,
        &asks_tx,
        &claim,
    );
    // Subscribe before either future runs: a change appended by `receive` before `send` is
    // first polled must still be seen as new, or its Ack would never be sent.
    let mut acked = progress.acked.subscribe();
    let mut durable = progress.durable.subscribe();
    let mut failure = group.failure();
    // Sync and dynamic mode: the remote copy's acknowledged journal seq gates Acks and
    // Durables (in dynamic mode only while `sync_active`).
    let shipping = group
        .replication()
        .shipping
        .as_ref()
        .filter(|s| s.tracks_remote_acks());
    let mut shipped = shipping.map(|s| s.shipped.subscribe());
    let send = async {
        // What the splitter was last told; marks are cumulative, so only rises are sent.
        let mut sent_ack = last_journaled;
        let mut sent_durable = 0u64;
        // Sync mode: highest source_seq whose journal seq the remote copy acknowledged.
        let mut remote_covered = last_journaled;
        let mut heartbeat = tokio::time::interval(heartbeat_interval(deadline));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    writer.send(&Message::Heartbeat).await?;
                    writer.flush().await?;
                    continue;
                }
                // Each wake-up only marks its mark seen; what to send is worked out below
                // from all of them, since in sync mode any one can release the others.
                r = acked.changed() => {
                    if r.is_err() { return Ok(()); }
                    acked.mark_unchanged();
                }
                r = durable.changed() => {
                    if r.is_err() { return Ok(()); }
                    durable.mark_unchanged();
                }
                r = async {
                    match shipped.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if r.is_err() { return Ok(()); }
                }
                Some(answer) = answers_rx.recv() => {
                    writer.send(&answer).await?;
                    writer.flush().await?;
                    continue;
                }
                _ = failure.changed() => {
                    let reason = failure.borrow_and_update().clone().unwrap_or_default();
                    writer.send(&Message::Refuse { reason: format!("group {} is fenced: {reason}", group.name) }).await?;
                    writer.flush().await?;
                    return Err(LinkError::Refused(reason));
                }
            }
            let (mut ack, mut durable_through) = (*acked.borrow(), *durable.borrow());
            if let (Some(rx), Some(shipping)) = (shipped.as_mut(), shipping) {
                let through = *rx.borrow_and_update();
                if let Some(covered) = progress.remote_covered(through) {
                    remote_covered = remote_covered.max(covered);
                }
                // Dynamic mode running async: the list is still kept (and drained here), so
                // switching back to sync needs no catch-up of its own.
                if shipping.is_sync_active() {
                    ack = ack.min(remote_covered);
                    durable_through = durable_through.min(remote_covered);
                }
            }
            if ack > sent_ack {
                writer.send(&Message::Ack { source_seq: ack }).await?;
                sent_ack = ack;
            }
            if durable_through > sent_durable {
                writer
                    .send(&Message::Durable {
                        source_seq: durable_through,
                    })
                    .await?;
                sent_durable = durable_through;
            }
            writer.flush().await?;
        }
    };
    let fenced = async {
        let _ = fence.wait_for(|f| *f).await;
        Err::<(), LinkError>(LinkError::Refused(
            "replaced by a newer connection of the same splitter (this one was half-open)".into(),
        ))
    };
    let result: Result<(), LinkError> = tokio::select! {
        r = receive => r,
        r = send => r,
        r = checksums => r,
        r = fenced => r,
    };
    match result {
        Ok(()) | Err(LinkError::Closed) => {
            tracing::info!(volume = %volume_name, "splitter disconnected")
        }
        Err(e) => tracing::warn!(volume = %volume_name, "split link dropped: {e}"),
    }
}

async fn receive_changes(
    group: &Group,
    volume: &Arc<GroupVolume>,
    progress: &Arc<ConnectionProgress>,
    reader: &mut cdp_link::FrameReader,
    last_journaled: u64,
    checksum_asks: &mpsc::Sender<ChecksumAsk>,
    claim: &LinkClaim,
) -> Result<(), LinkError> {
    // Set until this connection's first ResyncStart: a splitter that cannot say when it
    // began marking (it restarted meanwhile) gets the moment this side lost the volume.
    let mut lost_since_ns = claim.lost_since_ns;
    let sync = group
        .replication()
        .shipping
        .as_ref()
        .is_some_and(|s| s.tracks_remote_acks());
    let mut last_received = last_journaled;
    let mut batch: Vec<RecordIn> = Vec::with_capacity(APPEND_BATCH_ITEMS_MAX);
    // Checksum requests of this batch: answered for the journal as it stands after the
    // batch's changes, which the splitter sent before them, are appended.
    let mut checksum_requests: Vec<(u64, u64, u32)> = Vec::new();
    loop {
        // Take one frame, then every whole frame already buffered: one journal append and one
        // Ack then serve all of them, without ever waiting for more input to fill a batch.
        let mut next = Some(reader.read().await?);
        let mut batch_bytes = 0usize;
        let mut flush_through = None;
        let mut resync_started = false;
        while let Some(message) = next.take() {
            match message {
                Message::Flush { source_seq } => {
                    if source_seq > last_received {
                        return Err(LinkError::Protocol(format!(
                            "flush through {source_seq} but only {last_received} received"
                        )));
                    }
                    flush_through = Some(source_seq);
                }
                Message::Heartbeat => {}
                Message::ChecksumRequest {
                    offset,
                    length,
                    region_bytes,
                } => {
                    // Checked here too, so a flood of requests inside one batch is refused
                    // before it is collected, not after.
                    if checksum_requests.len() >= CHECKSUM_REQUESTS_IN_FLIGHT_MAX {
                        return Err(LinkError::Protocol(format!(
                            "more than {CHECKSUM_REQUESTS_IN_FLIGHT_MAX} checksum requests in flight"
                        )));
                    }
                    checksum_requests.push((offset, length, region_bytes));
                }
                change => {
                    if let Message::ResyncStart {
                        marking_since_ns, ..
                    } = &change
                    {
                        // Noted before the append that indexes the marker, so the span
                        // covers every point from the moment marking began.
                        let since = match (*marking_since_ns, lost_since_ns.take()) {
                            (0, lost) => lost,
                            (since, lost) => Some(lost.map_or(since, |l| l.min(since))),
                        };
                        if let Some(since) = since {
                            group.note_marking_since(volume.id, since);
                        }
                        resync_started = true;
                    }
                    let record = check_change(change, volume, last_received)?;
                    last_received = record.source_seq;
                    batch_bytes += record.payload.len();
                    batch.push(record);
                }
            }
            if batch.len() < APPEND_BATCH_ITEMS_MAX && batch_bytes < APPEND_BATCH_BYTES_MAX {
                next = reader.read_if_buffered().await?;
            }
        }
        if !batch.is_empty() {
            // Backpressure: while held, this volume's Acks stop, the splitter's window of
            // unacknowledged changes fills and the host's writes wait.
            if group.journal_full_hold() {
                group.wait_journal_full_hold().await;
            }
            let journal_last = group
                .append(volume, &batch)
                .map_err(|e| LinkError::Refused(format!("group {} is fenced: {e}", group.name)))?;
            batch.clear();
            if resync_started {
                // The span opened by that append refuses the points the Hello's
                // announcement held back until now.
                volume.link.resync_journaled(claim.id);
            }
            if sync {
                progress.note_remote_pending(journal_last.0, last_received);
            }
            cdp_link::watermark::raise(&progress.acked, last_received);
        }
        for (offset, length, region_bytes) in checksum_requests.drain(..) {
            let through = group.last_seq();
            let ask = ChecksumAsk::new(volume, offset, length, region_bytes, through)?;
            checksum_asks.try_send(ask).map_err(|_| {
                LinkError::Protocol(format!(
                    "more than {CHECKSUM_REQUESTS_IN_FLIGHT_MAX} checksum requests in flight"
                ))
            })?;
        }
        if let Some(source_seq) = flush_through {
            group
                .request_sync(source_seq, progress)
                .map_err(|e| LinkError::Protocol(e.to_string()))?;
        }
    }
}

/// How often each end sends a heartbeat for a given deadline.
fn heartbeat_interval(deadline: Duration) -> Duration {
    deadline / cdp_link::limits::LINK_HEARTBEATS_PER_DEADLINE
}

/// Checks a change from the splitter (sequence continuity, bounds) and makes it a record.
fn check_change(
    message: Message,
    volume: &GroupVolume,
    last_received: u64,
) -> Result<RecordIn, LinkError> {
    let (kind, source_seq, offset, length, payload) = match message {
        Message::Write {
            source_seq,
            offset,
            data,
        } => (
            RecordKind::Write,
            source_seq,
            offset,
            data.len() as u64,
            data,
        ),
        Message::Trim {
            source_seq,
            offset,
            length,
        } => (RecordKind::Trim, source_seq, offset, length, Bytes::new()),
        Message::Zero {
            source_seq,
            offset,
            length,
        } => (RecordKind::Zero, source_seq, offset, length, Bytes::new()),
        Message::ResyncStart { source_seq, .. } => {
            (RecordKind::ResyncStart, source_seq, 0, 0, Bytes::new())
        }
        Message::ResyncEnd { source_seq } => {
            (RecordKind::ResyncEnd, source_seq, 0, 0, Bytes::new())
        }
        other => {
            return Err(LinkError::Protocol(format!(
                "unexpected message from splitter: {}",
                other.name()
            )))
        }
    };
    if source_seq != last_received + 1 {
        return Err(LinkError::Protocol(format!(
            "change {source_seq} out of sequence (expected {})",
            last_received + 1
        )));
    }
    if offset
        .checked_add(length)
        .is_none_or(|end| end > volume.size)
    {
        return Err(LinkError::Protocol(format!(
            "change {source_seq} at {offset}+{length} is past the end of the {} byte volume",
            volume.size
        )));
    }
    Ok(RecordIn {
        kind,
        volume: volume.id,
        source_seq,
        offset,
        length,
        payload,
    })
}
