//! The local site's end of a replication link: ships the group's journal records (durable ones in async mode, appended ones in sync mode) to its remote copy, in order, exactly once.
//!
//! One thread per group with `[group.remote]`. Each connection (mutual TLS unless configured
//! plaintext: `tls.rs`, with `link_stream.rs` splitting it for the ack reader): Hello (group
//! name, group id, volumes) -> Welcome (the remote's durable last seq) -> batches of whole records from that
//! seq + 1, at most `BATCHES_IN_FLIGHT_MAX` unacknowledged. In async mode only records
//! already durable here are shipped (so the remote never holds a record this journal could
//! lose); in sync mode every appended record is shipped at once (`Group::append` unparks
//! this thread), because the host's Ack waits for the remote and a local fsync first would
//! add its latency to every write. With `bandwidth_bytes_per_s` each batch first waits for
//! its wire bytes in a token bucket (`bandwidth.rs`). Batches are deduplicated against a
//! window of blocks sent on this connection (`cdp_link::dedup_window`, reset per connection
//! like the receiver's) and compressed at the level `compression.rs` picks. A second thread reads
//! the cumulative `BatchAck`s, raises `shipped_seq` and moves the group's retention pin, so the
//! local journal keeps every record the remote has not made durable. When the link breaks the
//! shipper reconnects with backoff and resumes from the remote's answer: the remote's durable
//! seq decides, so nothing is skipped and nothing is appended twice.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cdp_journal::{Record, RecordKind};
use cdp_link::dedup_window::DedupIndex;
use cdp_link::replication::{
    read_message, write_message, BatchCodec, BatchStream, HelloVolume, ReplicatedKind,
    ReplicatedRecord, ReplicationMessage, BATCHES_IN_FLIGHT_MAX, BATCH_RAW_BYTES_TARGET,
    BATCH_RECORDS_MAX, RECORD_HEAD_LEN,
};
use cdp_link::LinkError;
use cdp_types::{Seq, TimestampNs};

use crate::config::ReplicationMode;
use crate::error::ApplianceError;
use crate::group::Group;
use crate::limits::{
    replication_heartbeat_interval, DYNAMIC_SYNC_RETURN, REPLICATION_IDLE_TIMEOUT,
    REPLICATION_RECONNECT_BACKOFF_MAX, SYNC_WAIT_WARN,
};
use crate::replication::bandwidth::{RateMeter, TokenBucket};
use crate::replication::compression::{BatchCost, LevelChooser};
use crate::replication::dedup_policy::DedupPolicy;
use crate::replication::link_stream::{LinkReader, LinkWriter};
use crate::replication::tls::ClientSecurity;
use crate::replication::ShippingState;

/// How often a shipper with nothing to send looks for newly durable records. Journal syncs
/// happen at least every `journal_sync_interval_ms` (200 by default), so this adds little lag.
/// (In sync mode appends also wake it at once.)
const DURABLE_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// With a bandwidth limit, batches are cut at 1/this of a second of traffic, so the rate is
/// smooth at the scale of a second rather than one 8 MiB step at a time.
const LIMITED_BATCHES_PER_S: u64 = 8;
/// ... but never smaller than this (per-batch overhead, one remote fsync each).
const LIMITED_BATCH_BYTES_MIN: usize = 64 * 1024;

/// A stop request that wakes a sleeping shipper at once.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }
    /// Sleeps up to `d`; true if stopped.
    fn wait(&self, d: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// The running shipper of one group.
pub struct Shipper {
    stop: Arc<StopSignal>,
    /// The socket of the current link, shut down to unblock the thread at stop.
    link: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Shipper {
    /// Starts shipping `group`, which must have `[group.remote]`, over a link secured as
    /// `security` says.
    pub fn start(
        group: Arc<Group>,
        security: ClientSecurity,
        deadline: Duration,
    ) -> Result<Shipper, ApplianceError> {
        let stop = Arc::new(StopSignal::default());
        let link: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let (s, l) = (Arc::clone(&stop), Arc::clone(&link));
        let g = Arc::clone(&group);
        let thread = std::thread::Builder::new()
            .name(format!("ship-{}", group.name))
            .spawn(move || run(&g, &security, &s, &l, deadline))?;
        if let Some(state) = group.replication().shipping.as_ref() {
            // One shipper per group for the appliance's life, so this is set once.
            let _ = state.shipper_thread.set(thread.thread().clone());
        }
        Ok(Shipper {
            stop,
            link,
            thread: Some(thread),
        })
    }

    /// Stops shipping (what is in flight is resent after the next start) and joins.
    pub fn stop(mut self) {
        self.stop.set();
        if let Some(s) = self.link.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn run(
    group: &Group,
    security: &ClientSecurity,
    stop: &StopSignal,
    link: &Mutex<Option<TcpStream>>,
    deadline: Duration,
) {
    let Some(state) = group.replication().shipping.as_ref() else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    let mut last_logged: Option<String> = None;
    let mut lag = LagClock::default();
    while !stop.is_set() {
        let started = Instant::now();
        let result = ship_one_connection(group, state, security, stop, link, &mut lag, deadline);
        state.set_connected(false);
        *link.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(e) = result {
            if stop.is_set() {
                break;
            }
            let what = link_error_text(&e);
            // The same failure every retry would flood the log: once per distinct reason.
            if last_logged.as_deref() != Some(what.as_str()) {
                tracing::warn!(group = %group.name, endpoint = %state.config.endpoint, "replication link: {what}; retrying");
                last_logged = Some(what.clone());
            }
            *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
        }
        // A link that worked for a while starts the backoff over.
        if started.elapsed() > REPLICATION_RECONNECT_BACKOFF_MAX {
            backoff = Duration::from_millis(100);
        }
        let deadline = Instant::now() + backoff;
        while Instant::now() < deadline {
            lag.update(group, state, None);
            if stop.wait(Duration::from_millis(250).min(deadline - Instant::now())) {
                return;
            }
        }
        backoff = (backoff * 2).min(REPLICATION_RECONNECT_BACKOFF_MAX);
    }
}

/// What the shipper remembers of a batch until it is acknowledged.
#[derive(Clone, Copy)]
struct SentBatch {
    last_seq: u64,
    /// Timestamp of its first record: the age of the oldest unacknowledged record.
    first_timestamp_ns: u64,
}

/// Acknowledgement progress shared by the sending and the ack-reading thread.
struct InFlight {
    /// Each unacknowledged batch, oldest first (at most BATCHES_IN_FLIGHT_MAX).
    batches: VecDeque<SentBatch>,
    /// Set when the ack reader failed; the link is over.
    broken: Option<LinkError>,
}

fn ship_one_connection(
    group: &Group,
    state: &ShippingState,
    security: &ClientSecurity,
    stop: &StopSignal,
    link: &Mutex<Option<TcpStream>>,
    lag: &mut LagClock,
    deadline: Duration,
) -> Result<(), ApplianceError> {
    let endpoint = &state.config.endpoint;
    let addr = endpoint
        .to_socket_addrs()
        .map_err(|e| io_context(e, &format!("cannot resolve {endpoint}")))?
        .next()
        .ok_or_else(|| {
            ApplianceError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{endpoint} resolves to no address"),
            ))
        })?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| io_context(e, &format!("cannot connect to {endpoint}")))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(REPLICATION_IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REPLICATION_IDLE_TIMEOUT));
    *link.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream.try_clone()?);
    if stop.is_set() {
        return Ok(());
    }
    let (reader, writer) = match security {
        ClientSecurity::Plaintext => LinkReader::plain_pair(stream.try_clone()?)?,
        ClientSecurity::Tls(tls) => {
            crate::replication::tls::connect(stream.try_clone()?, tls, endpoint)?
        }
    };
    // After the handshake (which has its own timeout): a remote silent for the deadline (it
    // answers every heartbeat) is gone. The options belong to the socket, shared by all handles.
    let _ = stream.set_read_timeout(Some(deadline));
    let _ = stream.set_write_timeout(Some(deadline));
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::with_capacity(256 * 1024, writer);
    let volumes = group
        .volumes()
        .iter()
        .map(|v| HelloVolume {
            id: v.id,
            size: v.size,
            name: v.name.clone(),
        })
        .collect();
    write_message(
        &mut writer,
        &ReplicationMessage::Hello {
            group: group.name.clone(),
            source_group_id: group.group_id(),
            volumes,
        },
    )?;
    let remote_last = match read_message(&mut reader)? {
        ReplicationMessage::Welcome { last_seq } => last_seq,
        ReplicationMessage::Refuse { reason } => return Err(LinkError::Refused(reason).into()),
        other => {
            return Err(LinkError::Protocol(format!("expected Welcome, got {other:?}")).into())
        }
    };
    let journal = group.journal();
    let local_last = journal.last_seq().0;
    if remote_last > local_last {
        return Err(ApplianceError::Refused(format!(
            "the remote copy holds seqs up to {remote_last} but this journal ends at {local_last}: \
             it has records this group never had; not shipping"
        )));
    }
    let remote_last = if remote_last + 1 < journal.first_seq().0 {
        crate::replication::region_resync::resync_by_regions(
            group,
            state,
            &mut reader,
            &mut writer,
            remote_last,
        )?
    } else {
        remote_last
    };
    state.set_shipped(remote_last);
    state.shipped_known.store(true, Ordering::Relaxed);
    group.release_for_remote_copy_through(Seq(remote_last));
    state.set_connected(true);
    *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    tracing::info!(group = %group.name, %endpoint, remote_last, local_last, "replication link up");

    let in_flight = Arc::new((
        Mutex::new(InFlight {
            batches: VecDeque::new(),
            broken: None,
        }),
        Condvar::new(),
    ));
    let result = std::thread::scope(|scope| {
        let acks = Arc::clone(&in_flight);
        scope.spawn(move || read_acks(group, state, reader, &acks, deadline));
        let result = send_batches(
            group,
            state,
            stop,
            &mut writer,
            remote_last,
            &in_flight,
            lag,
            deadline,
        );
        // Ends the ack reader too.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        result
    });
    let broken = in_flight
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .broken
        .take();
    match (result, broken) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(b)) if !stop.is_set() => Err(b.into()),
        (Ok(()), _) => Ok(()),
    }
}

/// Reads cumulative BatchAcks until the link ends; each must cover whole batches sent.
fn read_acks(
    group: &Group,
    state: &ShippingState,
    mut reader: BufReader<LinkReader>,
    in_flight: &(Mutex<InFlight>, Condvar),
    deadline: Duration,
) {
    let broken = loop {
        let through = match read_message(&mut reader) {
            Ok(ReplicationMessage::BatchAck { through_seq }) => through_seq,
            Ok(ReplicationMessage::Refuse { reason }) => break LinkError::Refused(reason),
            Ok(other) => {
                break LinkError::Protocol(format!("unexpected message from the remote: {other:?}"))
            }
            Err(LinkError::Io(e)) => break link_lost(e, deadline, Direction::Read),
            Err(e) => break e,
        };
        let shipped = state.shipped_seq.load(Ordering::Relaxed);
        let mut f = in_flight.0.lock().unwrap_or_else(|p| p.into_inner());
        let sent = f.batches.back().map_or(shipped, |b| b.last_seq);
        if through < shipped || through > sent {
            break LinkError::Protocol(format!(
                "the remote acknowledged seq {through}, outside what was sent ({shipped}..={sent})"
            ));
        }
        while f.batches.front().is_some_and(|b| b.last_seq <= through) {
            f.batches.pop_front();
        }
        drop(f);
        in_flight.1.notify_all();
        state.set_shipped(through);
        group.release_for_remote_copy_through(Seq(through));
    };
    // A sender blocked in a write to a peer that stopped reading must not wait for the
    // write timeout.
    let _ = reader.get_ref().socket().shutdown(std::net::Shutdown::Both);
    in_flight.0.lock().unwrap_or_else(|p| p.into_inner()).broken = Some(broken);
    in_flight.1.notify_all();
}

/// Reads records (durable ones, or appended ones in sync mode) from `remote_last + 1` on and
/// sends them in bounded batches, paced by the bandwidth limit if one is set.
#[allow(clippy::too_many_arguments)]
fn send_batches(
    group: &Group,
    state: &ShippingState,
    stop: &StopSignal,
    writer: &mut BufWriter<LinkWriter>,
    remote_last: u64,
    in_flight: &(Mutex<InFlight>, Condvar),
    lag: &mut LagClock,
    deadline: Duration,
) -> Result<(), ApplianceError> {
    let heartbeat = replication_heartbeat_interval(deadline);
    let journal = group.journal();
    let mut reader = journal.read_from(Seq(remote_last + 1))?;
    let mut levels = LevelChooser::new(state.config.compress_level);
    // The dedup window lives as long as this connection: the receiver starts a new one
    // with each connection too, and both follow the batches in the order sent.
    let mut dedup = state
        .config
        .dedup
        .then(|| DedupIndex::new(state.config.dedup_window_bytes as usize));
    let mut dedup_policy = DedupPolicy::new(state.config.dedup);
    let mut ack_wait = Duration::ZERO;
    let sync = state.tracks_remote_acks();
    let mut bucket = state
        .config
        .bandwidth_bytes_per_s
        .map(|limit| TokenBucket::new(limit, Instant::now()));
    let batch_bytes_target = match state.config.bandwidth_bytes_per_s {
        Some(limit) => usize::try_from(limit / LIMITED_BATCHES_PER_S)
            .unwrap_or(usize::MAX)
            .clamp(LIMITED_BATCH_BYTES_MIN, BATCH_RAW_BYTES_TARGET),
        None => BATCH_RAW_BYTES_TARGET,
    };
    let mut next = remote_last + 1;
    // A record read but not yet durable (or not fitting the last batch) waits here.
    let mut pending: Option<Record> = None;
    let mut last_sent = Instant::now();
    let mut last_lag_update = Instant::now();
    loop {
        if stop.is_set() {
            return Ok(());
        }
        if last_lag_update.elapsed() >= Duration::from_secs(1) {
            let shipped = state.shipped_seq.load(Ordering::Relaxed);
            let oldest_sent = in_flight
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .batches
                .front()
                .map(|b| b.first_timestamp_ns);
            let oldest_unsent = pending
                .as_ref()
                .filter(|r| r.seq.0 == shipped + 1)
                .map(|r| r.timestamp.0);
            lag.update(group, state, oldest_sent.or(oldest_unsent));
            last_lag_update = Instant::now();
        }
        {
            // Bounded window: wait for an ack before reading more.
            let waited_from = Instant::now();
            let f = in_flight.0.lock().unwrap_or_else(|p| p.into_inner());
            let (mut f, _) = in_flight
                .1
                .wait_timeout_while(f, Duration::from_millis(250), |f| {
                    f.broken.is_none() && f.batches.len() >= BATCHES_IN_FLIGHT_MAX
                })
                .unwrap_or_else(|p| p.into_inner());
            ack_wait += waited_from.elapsed();
            if let Some(b) = f.broken.take() {
                return Err(b.into());
            }
            if f.batches.len() >= BATCHES_IN_FLIGHT_MAX {
                continue;
            }
        }
        // Sync mode ships whatever was appended (the remote makes it durable before its ack).
        let ship_through = if sync {
            u64::MAX
        } else {
            journal.durable_seq().0
        };
        let mut records = Vec::new();
        let mut raw_bytes = 0usize;
        // The batch was cut by its size with more records ready: the link has a backlog.
        let mut backlog = false;
        while records.len() < BATCH_RECORDS_MAX {
            let record = match pending.take() {
                Some(r) => r,
                None => match reader.next() {
                    Some(r) => r.map_err(|e| {
                        ApplianceError::from(e)
                            .context(&format!("reading the journal at seq {next}"))
                    })?,
                    None => break,
                },
            };
            // Paired check: the reader yields every seq once, in order.
            if record.seq.0 != next {
                // A broken invariant of the journal's reader, reported as the journal's damage.
                return Err(ApplianceError::Corruption {
                    path: format!("group {} journal", group.name),
                    what: format!(
                        "the reader returned seq {} where {next} was expected",
                        record.seq
                    ),
                });
            }
            let size = RECORD_HEAD_LEN + record.payload.len();
            if record.seq.0 > ship_through {
                pending = Some(record);
                break;
            }
            if !records.is_empty() && raw_bytes + size > batch_bytes_target {
                pending = Some(record);
                backlog = true;
                break;
            }
            raw_bytes += size;
            next += 1;
            records.push(to_replicated(record));
        }
        backlog |= records.len() == BATCH_RECORDS_MAX;
        if records.is_empty() {
            if last_sent.elapsed() >= heartbeat {
                write_message(writer, &ReplicationMessage::Heartbeat).map_err(|e| match e {
                    LinkError::Io(e) => link_lost(e, deadline, Direction::Write),
                    e => e,
                })?;
                last_sent = Instant::now();
            }
            if sync {
                // Woken by the next append (or the stop, which unparks too).
                std::thread::park_timeout(DURABLE_POLL_INTERVAL);
                if stop.is_set() {
                    return Ok(());
                }
            } else if stop.wait(DURABLE_POLL_INTERVAL) {
                return Ok(());
            }
            continue;
        }
        let sent = SentBatch {
            last_seq: records[records.len() - 1].seq,
            first_timestamp_ns: records[0].timestamp_ns,
        };
        let deduplicate = dedup_policy.use_dedup();
        let stream = match dedup.as_mut().filter(|_| deduplicate) {
            Some(index) => BatchStream::deduplicated(&records, index),
            None => BatchStream::plain(&records),
        };
        drop(records);
        let counts = stream.counts;
        let codec = levels.codec();
        let compress_started = Instant::now();
        let encoded = stream.encode(codec);
        let compress = compress_started.elapsed();
        let wire_wait_started = Instant::now();
        if let Some(bucket) = bucket.as_mut() {
            loop {
                let wait = bucket.delay_for(encoded.bytes.len(), Instant::now());
                if wait.is_zero() {
                    break;
                }
                if stop.wait(wait) {
                    return Ok(());
                }
            }
        }
        // Recorded before the write, so an ack can never name a batch not yet recorded.
        in_flight
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .batches
            .push_back(sent);
        writer
            .write_all(&encoded.bytes)
            .and_then(|()| writer.flush())
            .map_err(|e| link_lost(e, deadline, Direction::Write))?;
        let tried = codec != BatchCodec::Raw;
        levels.observe(BatchCost {
            compress: if tried { compress } else { Duration::ZERO },
            wire_wait: wire_wait_started.elapsed(),
            ack_wait: std::mem::take(&mut ack_wait),
            backlog,
            stream_len: encoded.stream_len,
            sent_len: if encoded.compressed {
                encoded.bytes.len()
            } else {
                encoded.stream_len
            },
            tried,
        });
        dedup_policy.observe(deduplicate, counts);
        publish_batch(state, &encoded, counts, codec);
        last_sent = Instant::now();
    }
}

/// Which way a link failed to pass bytes.
#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Why a link broke, for the log and `last_error` in status: a socket timeout is the
/// deadline passing with no bytes (a silent partition or a stalled remote), said as such
/// rather than as EAGAIN.
fn link_lost(e: std::io::Error, deadline: Duration, direction: Direction) -> LinkError {
    use std::io::ErrorKind::{TimedOut, WouldBlock};
    if !matches!(e.kind(), WouldBlock | TimedOut) {
        return LinkError::Io(e);
    }
    let ms = deadline.as_millis();
    let why = match direction {
        Direction::Read => format!(
            "the remote sent nothing for {ms} ms (replication_deadline_ms; it answers every \
             heartbeat): a silent partition or a stalled remote"
        ),
        Direction::Write => format!(
            "the remote took no bytes for {ms} ms (replication_deadline_ms): a silent \
             partition or a stalled remote"
        ),
    };
    LinkError::Io(std::io::Error::new(TimedOut, why))
}

/// Adds a sent batch to the byte and block counters status shows.
fn publish_batch(
    state: &ShippingState,
    encoded: &cdp_link::replication::EncodedMessage,
    counts: cdp_link::replication::DedupCounts,
    codec: BatchCodec,
) {
    let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
        counter.fetch_add(n, Ordering::Relaxed);
    };
    add(&state.raw_bytes, encoded.raw_len as u64);
    add(&state.dedup_bytes, encoded.stream_len as u64);
    add(&state.wire_bytes, encoded.bytes.len() as u64);
    add(&state.dedup_literal_blocks, counts.literal_blocks);
    add(&state.dedup_zero_blocks, counts.zero_blocks);
    add(&state.dedup_reference_blocks, counts.reference_blocks);
    let level = match codec {
        BatchCodec::Zstd(level) if encoded.compressed => level,
        _ => 0,
    };
    state.compress_level_now.store(level, Ordering::Relaxed);
}

fn to_replicated(r: Record) -> ReplicatedRecord {
    let kind = match r.kind {
        RecordKind::Write => ReplicatedKind::Write,
        RecordKind::Trim => ReplicatedKind::Trim,
        RecordKind::Zero => ReplicatedKind::Zero,
        RecordKind::Bookmark => ReplicatedKind::Bookmark,
        RecordKind::ResyncStart => ReplicatedKind::ResyncStart,
        RecordKind::ResyncEnd => ReplicatedKind::ResyncEnd,
    };
    ReplicatedRecord {
        seq: r.seq.0,
        timestamp_ns: r.timestamp.0,
        kind,
        volume: r.volume,
        source_seq: r.source_seq,
        offset: r.offset,
        length: r.length,
        payload: r.payload,
    }
}

/// Computes the age of the oldest record the remote has not acknowledged, and warns once per
/// episode when it exceeds the RPO (or, in sync mode, when host writes wait for the remote);
/// also samples the wire rate.
#[derive(Default)]
struct LagClock {
    /// The timestamp of one seq read from the journal, so a stalled link does not make the
    /// shipper scan for the same header every second.
    looked_up: Option<(u64, u64)>,
    wire_rate: RateMeter,
    /// Dynamic mode running async: since when the remote has kept up (lag within a quarter
    /// of `sync_wait_ms_max`, link connected).
    keeping_up_since: Option<Instant>,
}

impl LagClock {
    /// Dynamic mode: falls back to async once the oldest record the remote lacks is
    /// `sync_wait_ms_max` old (host writes have waited that long), and returns to sync
    /// after the remote kept the lag under a quarter of that for `DYNAMIC_SYNC_RETURN`
    /// (hysteresis, so a link at the edge does not flap). Each switch is logged.
    fn switch_dynamic_mode(&mut self, group: &Group, state: &ShippingState, lag_ns: u64) {
        if state.config.mode != ReplicationMode::Dynamic {
            return;
        }
        let limit_ns = state.config.sync_wait_ms_max.saturating_mul(1_000_000);
        if state.is_sync_active() {
            if lag_ns >= limit_ns {
                state.set_sync_active(false);
                self.keeping_up_since = None;
                tracing::warn!(
                    group = %group.name,
                    endpoint = %state.config.endpoint,
                    waited_ms = lag_ns / 1_000_000,
                    sync_wait_ms_max = state.config.sync_wait_ms_max,
                    connected = state.connected.load(Ordering::Relaxed),
                    "dynamic replication: switching to async, host writes no longer wait for the remote copy"
                );
            }
            return;
        }
        if !state.connected.load(Ordering::Relaxed) || lag_ns > limit_ns / 4 {
            self.keeping_up_since = None;
            return;
        }
        let since = *self.keeping_up_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= DYNAMIC_SYNC_RETURN {
            state.set_sync_active(true);
            self.keeping_up_since = None;
            tracing::info!(
                group = %group.name,
                endpoint = %state.config.endpoint,
                "dynamic replication: the remote copy keeps up; switching back to sync"
            );
        }
    }

    /// `oldest_ns`: the oldest unacknowledged record's timestamp when the sender knows it
    /// (first record of the oldest batch in flight, or the next record to send).
    fn update(&mut self, group: &Group, state: &ShippingState, oldest_ns: Option<u64>) {
        let rate = self
            .wire_rate
            .sample(Instant::now(), state.wire_bytes.load(Ordering::Relaxed));
        state.wire_rate_bytes_per_s.store(rate, Ordering::Relaxed);
        let shipped = state.shipped_seq.load(Ordering::Relaxed);
        let journal = group.journal();
        let oldest_ns = if shipped >= journal.last_seq().0 {
            None
        } else if let Some(t) = oldest_ns {
            Some(t)
        } else {
            let seq = (shipped + 1).max(journal.first_seq().0);
            match self.looked_up {
                Some((s, t)) if s == seq => Some(t),
                _ => match crate::bookmark::record_timestamp(journal, Seq(seq)) {
                    Ok(t) => {
                        self.looked_up = Some((seq, t));
                        Some(t)
                    }
                    // Unreadable right now: keep the last figure.
                    Err(_) => return,
                },
            }
        };
        let lag_ns = oldest_ns.map_or(0, |t| TimestampNs::now().0.saturating_sub(t));
        state.record_lag(lag_ns);
        let lag_bytes = group.journal_bytes_after(Seq(shipped));
        state.lag_bytes.store(lag_bytes, Ordering::Relaxed);
        let exceeded = lag_ns > state.config.rpo_s.saturating_mul(1_000_000_000)
            || state.config.rpo_bytes.is_some_and(|b| lag_bytes > b);
        let was = state.set_rpo_exceeded(exceeded);
        if exceeded && !was {
            tracing::warn!(
                group = %group.name,
                endpoint = %state.config.endpoint,
                lag_s = lag_ns / 1_000_000_000,
                rpo_s = state.config.rpo_s,
                lag_bytes,
                rpo_bytes = state.config.rpo_bytes,
                throttling = state.config.throttle_on_rpo,
                unshipped_records = journal.last_seq().0.saturating_sub(shipped),
                connected = state.connected.load(Ordering::Relaxed),
                "remote copy lags beyond its RPO"
            );
        } else if was && !exceeded {
            tracing::info!(group = %group.name, "remote copy back within its RPO");
        }
        self.switch_dynamic_mode(group, state, lag_ns);
        let waiting = state.is_sync_active() && lag_ns >= SYNC_WAIT_WARN.as_nanos() as u64;
        let was = state.sync_waiting.swap(waiting, Ordering::Relaxed);
        if waiting && !was {
            tracing::warn!(
                group = %group.name,
                endpoint = %state.config.endpoint,
                waited_s = lag_ns / 1_000_000_000,
                connected = state.connected.load(Ordering::Relaxed),
                "sync replication: host writes are waiting for the remote copy"
            );
        } else if was && !waiting {
            tracing::info!(group = %group.name, "sync replication: the remote copy caught up; host writes flow");
        }
    }
}

/// A failed link's reason as status and the log show it: a link error's own words (the log
/// line already says "replication link"), anything else as it displays.
fn link_error_text(e: &ApplianceError) -> String {
    match e {
        ApplianceError::Link(link) => link.to_string(),
        other => other.to_string(),
    }
}

/// An I/O error with what was being done said first; its kind is kept.
fn io_context(e: std::io::Error, what: &str) -> ApplianceError {
    ApplianceError::Io(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}
