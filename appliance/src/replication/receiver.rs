//! The remote site's end of replication links: checks each batch continues the journal and appends it with its original seqs.
//!
//! One listener thread accepts links on `replication_listen`; each link gets a thread
//! (at most `REPLICATION_LINKS_MAX`), which first authenticates the peer (mutual TLS unless
//! configured plaintext, `tls.rs`; a refusal is logged with the peer and reason), and a
//! group takes one link at a time. A batch is appended with the source's seqs and
//! timestamps (`Group::append_replicated`), the journal is synced, and only then is the batch acknowledged, so an acknowledged record survives
//! any crash here. Distribution, the undo stream and images then work as for a local group.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_journal::{RecordIn, RecordKind};
use cdp_link::replication::{
    read_message, write_message, BatchDecoder, HelloVolume, ReplicatedKind, ReplicatedRecord,
    ReplicationMessage, RESYNC_SUMS_PER_MESSAGE_MAX,
};
use cdp_link::LinkError;
use cdp_types::Seq;

use crate::config::GroupSource;
use crate::error::ApplianceError;
use crate::group::Group;
use crate::limits::{REPLICATION_IDLE_TIMEOUT, REPLICATION_LINKS_MAX};
use crate::replication::link_stream::{LinkReader, LinkWriter};
use crate::replication::tls::{self, ServerSecurity};
use crate::state_file;
use cdp_metrics::event_log::{EventLog, Scope};

/// The links being served: a handle on each socket (to shut it at stop) and its thread.
type Links = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// The running listener; `stop` closes every link and joins the threads.
pub struct Receiver {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    links: Links,
    listener: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Binds `listen` and serves replication links for the remote groups among `groups`,
    /// with mutual TLS unless `security` is `None` (plaintext, explicitly configured).
    pub fn start(
        listen: SocketAddr,
        data_dir: &Path,
        groups: Vec<Arc<Group>>,
        security: ServerSecurity,
        deadline: Duration,
        events: Arc<EventLog>,
    ) -> Result<Receiver, ApplianceError> {
        let tls_on = security.is_some();
        let listener = TcpListener::bind(listen)?;
        let local_addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let links: Links = Arc::default();
        let active = Arc::new(AtomicUsize::new(0));
        let groups_dir = data_dir.join("groups");
        let (stop, all) = (Arc::clone(&stopping), Arc::clone(&links));
        let thread = std::thread::Builder::new()
            .name("replication-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("replication accept failed: {e}");
                            continue;
                        }
                    };
                    let peer = stream
                        .peer_addr()
                        .map_or_else(|_| "?".to_string(), |a| a.to_string());
                    if active.load(Ordering::Relaxed) >= REPLICATION_LINKS_MAX {
                        tracing::warn!(%peer, "replication link refused: {REPLICATION_LINKS_MAX} links already served");
                        continue;
                    }
                    let Ok(handle) = stream.try_clone() else {
                        continue;
                    };
                    let groups = groups.clone();
                    let groups_dir = groups_dir.clone();
                    let security = security.clone();
                    let events = Arc::clone(&events);
                    let active = Arc::clone(&active);
                    active.fetch_add(1, Ordering::Relaxed);
                    let spawned = std::thread::Builder::new()
                        .name("replication-link".into())
                        .spawn(move || {
                            serve_link(
                                stream,
                                &peer,
                                &security,
                                &groups,
                                &groups_dir,
                                deadline,
                                &events,
                            );
                            active.fetch_sub(1, Ordering::Relaxed);
                        });
                    let mut links = all.lock().unwrap_or_else(|p| p.into_inner());
                    // Forget links that ended, so the list stays bounded.
                    links.retain(|(_, t)| !t.is_finished());
                    match spawned {
                        Ok(t) => links.push((handle, t)),
                        Err(e) => tracing::warn!("replication link thread: {e}"),
                    }
                }
            })?;
        tracing::info!(listen = %local_addr, tls = tls_on, "replication links accepted");
        Ok(Receiver {
            local_addr,
            stopping,
            links,
            listener: Some(thread),
        })
    }

    /// Closes the listener and every link, and waits for their threads (each finishes or
    /// abandons the batch it was appending; unacknowledged batches are resent later).
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.local_addr);
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|p| p.into_inner()));
        for (stream, thread) in links {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
    }
}

/// How long a new link of a group waits for the link it replaces to end.
const LINK_TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Makes this link the group's only one. The source (already checked to be the bound one)
/// reconnects only when its side of the old link is gone, so an old link still here is
/// half-open (a cut cable sends no FIN): close it rather than refuse the new one until it
/// times out. Waits for the old session to end, so its last append precedes our Welcome.
fn take_over_link(receiving: &crate::replication::ReceivingState) -> bool {
    let deadline = Instant::now() + LINK_TAKEOVER_WAIT;
    let mut seen = receiving.connected.subscribe();
    while receiving.connected.swap(true) {
        if let Some(old) = receiving
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            tracing::info!(
                "closing the previous replication link of this group: a newer one arrived"
            );
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        // The old session's guard sets it false when the session ends.
        seen.borrow_and_update();
        if !receiving.connected.get() {
            continue;
        }
        if !receiving.connected.wait_changed(&mut seen, deadline) {
            return false;
        }
    }
    true
}

/// Marks a remote group's link as gone however the session ends.
struct ReceivingGuard<'a>(&'a Group);

impl Drop for ReceivingGuard<'_> {
    fn drop(&mut self) {
        let receiving = &self.0.replication().receiving;
        receiving
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        receiving.connected.set(false);
    }
}

/// Authenticates the peer (mutual TLS unless configured plaintext) and splits the link, or
/// refuses it: logged at warn with the peer and the reason, and the socket closed gently so
/// the peer can read why (a TLS alert, or a plaintext Refuse) before the connection ends.
fn open_link(
    stream: TcpStream,
    peer: &str,
    security: &ServerSecurity,
    events: &EventLog,
) -> Option<(LinkReader, LinkWriter)> {
    let handle = stream.try_clone().ok()?;
    let wrong_dialect = match security {
        Some(_) if tls::peer_speaks_plaintext_replication(&stream) => Some(
            "a plaintext replication peer on a TLS listener: this appliance requires mutual TLS \
             (give the source's [group.remote] a tls table)",
        ),
        None if tls::peer_speaks_tls(&stream) => Some(
            "a TLS client on a plaintext listener: this appliance has replication_plaintext = \
             true (configure replication_tls here, or plaintext = true at the source)",
        ),
        _ => None,
    };
    let opened = match (wrong_dialect, security) {
        (Some(reason), _) => {
            // Said in the replication dialect: a plaintext source shows it in its status, and
            // a TLS source recognises a plaintext answer by it.
            let refuse = ReplicationMessage::Refuse {
                reason: reason.to_string(),
            };
            let _ = write_message(&mut &stream, &refuse);
            Err(reason.to_string())
        }
        (None, Some(config)) => tls::accept(stream, config).map_err(|e| e.to_string()),
        (None, None) => {
            LinkReader::plain_pair(stream).map_err(|e| format!("cloning the socket: {e}"))
        }
    };
    match opened {
        Ok(halves) => Some(halves),
        Err(reason) => {
            tracing::warn!(%peer, "replication link refused: {reason}");
            // Durable and alerted: a refused peer is a misconfiguration or an intruder.
            events.record(
                "tls_refused",
                Scope::default(),
                format!("replication link from {peer} refused: {reason}"),
            );
            close_gently(&handle);
            None
        }
    }
}

/// Longest a refused connection is kept open for its peer to read why.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Ends a refused connection without discarding what we sent: closing a socket with unread
/// input makes the kernel send a reset, which can destroy the alert or Refuse the peer has
/// not read yet. So: send FIN, drain what the peer still sends (bounded in bytes and time),
/// then close.
fn close_gently(socket: &TcpStream) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let _ = socket.set_read_timeout(Some(REFUSAL_LINGER));
    let deadline = Instant::now() + REFUSAL_LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while Instant::now() < deadline && drained < 256 * 1024 {
        match std::io::Read::read(&mut &*socket, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn serve_link(
    stream: TcpStream,
    peer: &str,
    security: &ServerSecurity,
    groups: &[Arc<Group>],
    groups_dir: &Path,
    deadline: Duration,
    events: &EventLog,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(REPLICATION_IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REPLICATION_IDLE_TIMEOUT));
    let handle = stream.try_clone();
    let Some((read_half, write_half)) = open_link(stream, peer, security, events) else {
        return;
    };
    // After the handshake (which has its own timeout): a source silent for the deadline,
    // heartbeats included, is gone. The options belong to the socket, shared by every handle.
    if let Ok(handle) = handle {
        let _ = handle.set_read_timeout(Some(deadline));
        let _ = handle.set_write_timeout(Some(deadline));
    }
    let mut reader = BufReader::with_capacity(256 * 1024, read_half);
    let mut writer = BufWriter::new(write_half);
    let outcome = match read_message(&mut reader) {
        Ok(ReplicationMessage::Hello {
            group,
            source_group_id,
            volumes,
        }) => match admit(groups, groups_dir, &group, source_group_id, &volumes) {
            Ok((g, volume_map)) => {
                let g = Arc::clone(g);
                let receiving = &g.replication().receiving;
                if take_over_link(receiving) {
                    let _guard = ReceivingGuard(&g);
                    *receiving.peer.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(peer.to_string());
                    *receiving.link.lock().unwrap_or_else(|p| p.into_inner()) =
                        reader.get_ref().socket().try_clone().ok();
                    receive(&g, &volume_map, peer, &mut reader, &mut writer, deadline)
                } else {
                    Err(ApplianceError::Busy(format!(
                        "group {group:?} still has a replication link that did not end within \
                         {LINK_TAKEOVER_WAIT:?}; one link at a time"
                    )))
                }
            }
            Err(reason) => Err(reason),
        },
        Ok(other) => Err(ApplianceError::Refused(format!(
            "expected Hello, got {}",
            message_name(&other)
        ))),
        Err(e) => Err(ApplianceError::Refused(format!("bad Hello: {e}"))),
    };
    if let Err(reason) = outcome {
        let reason = reason.to_string();
        tracing::warn!(%peer, "replication link refused or ended: {reason}");
        let _ = write_message(&mut writer, &ReplicationMessage::Refuse { reason });
    }
}

/// Checks the Hello: a configured remote copy of that name whose volumes match, copying
/// this source group (or nothing yet). Returns the group and source volume id -> local id.
fn admit<'a>(
    groups: &'a [Arc<Group>],
    groups_dir: &Path,
    name: &str,
    source_group_id: u64,
    volumes: &[HelloVolume],
) -> Result<(&'a Arc<Group>, BTreeMap<u32, u32>), ApplianceError> {
    let group = groups.iter().find(|g| g.name == name).ok_or_else(|| {
        ApplianceError::NotFound(format!("no group {name:?} is configured on this appliance"))
    })?;
    if group.replication().source != GroupSource::Remote {
        return Err(ApplianceError::Refused(format!(
            "group {name:?} here is not a remote copy (set source = \"remote\" in its [[group]])"
        )));
    }
    if let Some(failure) = group.failure().borrow().clone() {
        return Err(ApplianceError::Fenced(format!(
            "group {name:?} is fenced: {failure}"
        )));
    }
    let mut map = BTreeMap::new();
    for v in volumes {
        let local = group.volume(&v.name).ok_or_else(|| {
            ApplianceError::NotFound(format!(
                "volume {:?} of group {name:?} is not configured here",
                v.name
            ))
        })?;
        if local.size != v.size {
            return Err(ApplianceError::Refused(format!(
                "volume {:?} is {} bytes at the source but {} bytes here",
                v.name, v.size, local.size
            )));
        }
        map.insert(v.id, local.id);
    }
    check_source_identity(&groups_dir.join(name), group, source_group_id)?;
    Ok((group, map))
}

/// A remote copy belongs to one source group for good: the first link records the source's
/// group id; a link from another group (same name, other appliance or recreated group) is
/// refused once records are here, since its seqs would mean other writes.
fn check_source_identity(
    dir: &Path,
    group: &Group,
    source_group_id: u64,
) -> Result<(), ApplianceError> {
    // `replication_source.state` (kind `RSRC` in `state_file.rs`).
    match state_file::load_replication_source(dir)? {
        Some(known) => {
            if known != source_group_id {
                return Err(ApplianceError::Refused(format!(
                    "group {:?} here is the copy of source group id {known:016x}, not {source_group_id:016x}; \
                     refusing records of another group (remove this copy's data to start over)",
                    group.name
                )));
            }
            Ok(())
        }
        None => {
            if group.last_seq() > Seq::ZERO {
                return Err(ApplianceError::Refused(format!(
                    "group {:?} here already holds records of unknown origin; refusing to mix in source {source_group_id:016x}",
                    group.name
                )));
            }
            Ok(state_file::store_replication_source(dir, source_group_id)?)
        }
    }
}

fn message_name(m: &ReplicationMessage) -> &'static str {
    match m {
        ReplicationMessage::Hello { .. } => "Hello",
        ReplicationMessage::Batch { .. } => "Batch",
        ReplicationMessage::Heartbeat => "Heartbeat",
        ReplicationMessage::Welcome { .. } => "Welcome",
        ReplicationMessage::BatchAck { .. } => "BatchAck",
        ReplicationMessage::Refuse { .. } => "Refuse",
        ReplicationMessage::ResyncBegin { .. } => "ResyncBegin",
        ReplicationMessage::ResyncSums { .. } => "ResyncSums",
        ReplicationMessage::ResyncData { .. } => "ResyncData",
        ReplicationMessage::ResyncEnd { .. } => "ResyncEnd",
    }
}

/// Welcomes the source with the journal's durable end, then appends, syncs and
/// acknowledges batches until the link ends. `Err` carries a reason for a Refuse.
fn receive(
    group: &Group,
    volume_map: &BTreeMap<u32, u32>,
    peer: &str,
    reader: &mut BufReader<LinkReader>,
    writer: &mut BufWriter<LinkWriter>,
    deadline: Duration,
) -> Result<(), ApplianceError> {
    // Everything in the journal after a restart is on disk or in the page cache; sync so
    // the resume point we announce is durable.
    let mut durable = group.sync_replicated()?;
    write_message(
        writer,
        &ReplicationMessage::Welcome {
            last_seq: durable.0,
        },
    )?;
    tracing::info!(group = %group.name, %peer, last_seq = %durable, "replication source connected");
    // Deduplicated batches refer to blocks of earlier batches of this connection only.
    let mut decoder = BatchDecoder::new();
    // A resynchronisation by regions in progress: its point, regions and bytes written.
    let mut resync: Option<(Seq, u64, u64)> = None;
    loop {
        let message = match decoder.read_message(reader) {
            Ok(m) => m,
            Err(LinkError::Closed) => {
                tracing::info!(group = %group.name, %peer, "replication source disconnected");
                return Ok(());
            }
            // The source heartbeats an idle link: silence this long is a partition or a
            // dead source, said as such rather than as EAGAIN.
            Err(LinkError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ApplianceError::Link(LinkError::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "the source sent nothing for {} ms (replication_deadline_ms; it \
                         sends a heartbeat every sixth of it): link dropped",
                        deadline.as_millis()
                    ),
                ))));
            }
            Err(e) => return Err(e.into()),
        };
        match message {
            ReplicationMessage::Batch { .. } if resync.is_some() => {
                return Err(ApplianceError::Refused(
                    "a batch arrived during a resynchronisation by regions".into(),
                ));
            }
            ReplicationMessage::ResyncBegin {
                through_seq,
                region_bytes,
            } => {
                if through_seq <= durable.0 || resync.is_some() {
                    return Err(ApplianceError::Refused(format!(
                        "resync to seq {through_seq} while this copy holds seqs up to {durable}"
                    )));
                }
                tracing::warn!(
                    group = %group.name,
                    %peer,
                    holds_through = %durable,
                    resync_through = through_seq,
                    "the source released history this copy never received: resynchronising by regions (only differing regions are copied; this copy's history restarts after the resync point)"
                );
                group.begin_region_resync(Seq(through_seq))?;
                for (&source_id, &local_id) in volume_map {
                    let mut first = 0u64;
                    loop {
                        let sums = group.replica_region_sums(
                            local_id,
                            region_bytes,
                            first,
                            RESYNC_SUMS_PER_MESSAGE_MAX,
                        )?;
                        if sums.is_empty() {
                            break;
                        }
                        let count = sums.len() as u64;
                        write_message(
                            writer,
                            &ReplicationMessage::ResyncSums {
                                volume: source_id,
                                offset: first * region_bytes as u64,
                                sums,
                            },
                        )?;
                        first += count;
                    }
                }
                resync = Some((Seq(through_seq), 0, 0));
                continue;
            }
            ReplicationMessage::ResyncData {
                volume,
                offset,
                data,
            } => {
                let Some((_, regions, bytes)) = resync.as_mut() else {
                    return Err(ApplianceError::Refused(
                        "resync data outside a resynchronisation".into(),
                    ));
                };
                let id = *volume_map.get(&volume).ok_or_else(|| {
                    ApplianceError::Refused(format!(
                        "resync data for volume id {volume}, not in the Hello"
                    ))
                })?;
                group.write_resync_region(id, offset, &data)?;
                *regions += 1;
                *bytes += data.len() as u64;
                continue;
            }
            ReplicationMessage::ResyncEnd { through_seq } => {
                let Some((through, regions, bytes)) = resync.take() else {
                    return Err(ApplianceError::Refused(
                        "resync end outside a resynchronisation".into(),
                    ));
                };
                if through.0 != through_seq {
                    return Err(ApplianceError::Refused(format!(
                        "resync to seq {through} ended at seq {through_seq}"
                    )));
                }
                group.finish_region_resync(through)?;
                durable = through;
                tracing::info!(
                    group = %group.name,
                    %peer,
                    through = %through,
                    regions,
                    bytes,
                    "resynchronised by regions: this copy now holds the source's state at the resync point; its history restarts there"
                );
            }
            ReplicationMessage::Batch { records } => {
                let first = records[0].seq;
                if first != durable.0 + 1 {
                    return Err(ApplianceError::Refused(format!(
                        "batch starts at seq {first} but this copy holds seqs up to {durable}: \
                         a gap or a duplicate"
                    )));
                }
                let (ins, stamps) = to_journal_records(group, volume_map, &records)?;
                group.append_replicated(&ins, Seq(first), &stamps)?;
                durable = group.sync_replicated()?;
            }
            ReplicationMessage::Heartbeat => {}
            other => {
                return Err(ApplianceError::Refused(format!(
                    "unexpected {} on a replication link",
                    message_name(&other)
                )))
            }
        }
        write_message(
            writer,
            &ReplicationMessage::BatchAck {
                through_seq: durable.0,
            },
        )?;
    }
}

/// Translates shipped records into this journal's terms (local volume ids), checking each
/// change lies within its volume.
fn to_journal_records(
    group: &Group,
    volume_map: &BTreeMap<u32, u32>,
    records: &[ReplicatedRecord],
) -> Result<(Vec<RecordIn>, Vec<u64>), ApplianceError> {
    let sizes: BTreeMap<u32, u64> = group.volumes().iter().map(|v| (v.id, v.size)).collect();
    let mut ins = Vec::with_capacity(records.len());
    let mut stamps = Vec::with_capacity(records.len());
    for r in records {
        let kind = match r.kind {
            ReplicatedKind::Write => RecordKind::Write,
            ReplicatedKind::Trim => RecordKind::Trim,
            ReplicatedKind::Zero => RecordKind::Zero,
            ReplicatedKind::Bookmark => RecordKind::Bookmark,
            ReplicatedKind::ResyncStart => RecordKind::ResyncStart,
            ReplicatedKind::ResyncEnd => RecordKind::ResyncEnd,
        };
        let volume = if kind == RecordKind::Bookmark {
            0
        } else {
            let id = *volume_map.get(&r.volume).ok_or_else(|| {
                ApplianceError::Refused(format!(
                    "seq {}: volume id {} was not in the Hello",
                    r.seq, r.volume
                ))
            })?;
            let size = sizes.get(&id).copied().unwrap_or(0);
            if kind.change_kind().is_some() && r.offset + r.length > size {
                return Err(ApplianceError::Refused(format!(
                    "seq {}: {:?} at {} + {} is past the volume's end ({size})",
                    r.seq, r.kind, r.offset, r.length
                )));
            }
            id
        };
        ins.push(RecordIn {
            kind,
            volume,
            source_seq: r.source_seq,
            offset: r.offset,
            length: r.length,
            payload: Bytes::clone(&r.payload),
        });
        stamps.push(r.timestamp_ns);
    }
    Ok((ins, stamps))
}
