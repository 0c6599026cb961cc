//! Answers a splitter's checksum requests with checksums of the replica once distribution has caught up.
//!
//! Verified seeding compares production with the replica region by region and copies only
//! the regions that differ. The replica trails the journal, so a checksum is taken only after
//! distribution has applied every record the journal held when the request arrived; the
//! splitter's reasoning about host writes racing the comparison (ARCHITECTURE.md, "Verified
//! seeding") needs no more than that. Requests of one connection are answered in order by
//! one task, the reads and hashing on the blocking pool, never on the link's async thread.

use std::sync::Arc;
use std::time::Duration;

use cdp_link::checksum::{region_checksum, RegionChecksum};
use cdp_link::{LinkError, Message};
use cdp_types::Seq;
use tokio::sync::mpsc;

use crate::error::ApplianceError;
use crate::group::{Group, GroupVolume};

/// A checksum request waiting longer than this for distribution is logged once.
const DISTRIBUTION_WAIT_WARN: Duration = Duration::from_secs(60);

/// A checksum request accepted from a splitter, with the journal position it must reflect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChecksumAsk {
    pub offset: u64,
    pub length: u64,
    pub region_bytes: u32,
    /// The journal's last seq when the request arrived (after every change before it on the
    /// same connection was appended).
    pub through: Seq,
}

impl ChecksumAsk {
    /// Accepts a request whose regions lie inside the volume. The message decoder already
    /// bounded the region size, alignment and count.
    pub fn new(
        volume: &GroupVolume,
        offset: u64,
        length: u64,
        region_bytes: u32,
        through: Seq,
    ) -> Result<ChecksumAsk, LinkError> {
        if offset
            .checked_add(length)
            .is_none_or(|end| end > volume.size)
        {
            // The splitter broke the protocol: the connection ends.
            return Err(LinkError::Protocol(format!(
                "checksum request for {offset}+{length} is past the end of the {} byte volume",
                volume.size
            )));
        }
        Ok(ChecksumAsk {
            offset,
            length,
            region_bytes,
            through,
        })
    }
}

/// Serves one connection's checksum requests in order until either channel closes. An error
/// (the group fenced, a replica read failed) ends the connection: the splitter's verify stops
/// and restarts on its next connection.
pub async fn answer_checksum_requests(
    group: Arc<Group>,
    volume: Arc<GroupVolume>,
    mut asks: mpsc::Receiver<ChecksumAsk>,
    answers: mpsc::Sender<Message>,
) -> Result<(), ApplianceError> {
    while let Some(ask) = asks.recv().await {
        let sums = loop {
            wait_for_distribution(&group, ask.through).await?;
            let (g, v, a) = (Arc::clone(&group), Arc::clone(&volume), ask.clone());
            let sums = tokio::task::spawn_blocking(move || replica_checksums(&g, &v, &a))
                .await
                .map_err(|e| {
                    ApplianceError::Io(std::io::Error::other(format!("checksum task failed: {e}")))
                })??;
            match sums {
                Some(sums) => break sums,
                None => tracing::info!(
                    volume = %volume.name,
                    "the replica was rolled back while being checksummed; checksumming again once distribution is back"
                ),
            }
        };
        let answer = Message::Checksums {
            offset: ask.offset,
            region_bytes: ask.region_bytes,
            sums,
        };
        if answers.send(answer).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Waits until the replica holds every record up to `through`, urging distribution not to
/// wait for a pause in host writes.
async fn wait_for_distribution(group: &Arc<Group>, through: Seq) -> Result<(), ApplianceError> {
    let mut failure = group.failure();
    let mut progress = group.subscribe_distribution();
    let warn_at = tokio::time::Instant::now() + DISTRIBUTION_WAIT_WARN;
    let mut warned = false;
    if group.journal().durable_seq() < through {
        // Distribution applies only durable records: sync now rather than wait for the sync
        // thread's next interval (a verify asks hundreds of times). A failure fences.
        let g = Arc::clone(group);
        tokio::task::spawn_blocking(move || g.sync_replicated())
            .await
            .map_err(|e| {
                ApplianceError::Io(std::io::Error::other(format!("sync task failed: {e}")))
            })??;
    }
    loop {
        if progress.borrow_and_update().distributed >= through {
            return Ok(());
        }
        if let Some(failure) = failure.borrow_and_update().clone() {
            return Err(ApplianceError::Fenced(format!(
                "group {} is fenced: {failure}",
                group.name
            )));
        }
        group.urge_distribution();
        // The group owns both senders and outlives this wait, so neither channel closes.
        tokio::select! {
            moved = progress.changed() => moved.map_err(|_| ApplianceError::Fenced(format!("group {} stopped", group.name)))?,
            fenced = failure.changed() => fenced.map_err(|_| ApplianceError::Fenced(format!("group {} stopped", group.name)))?,
            _ = tokio::time::sleep_until(warn_at), if !warned => {
                warned = true;
                tracing::warn!(
                    group = %group.name,
                    %through,
                    distributed = %group.distributed_seq(),
                    "a checksum request has waited {} s for distribution (is the replica held by a logged image?)",
                    DISTRIBUTION_WAIT_WARN.as_secs()
                );
            }
        }
    }
}

/// Reads and checksums each region of the request from the replica (blocking I/O). None if
/// the replica went back before `ask.through` meanwhile (a logged image rolled it back): a
/// replica older than the splitter's connection must not be compared, see ARCHITECTURE.md.
fn replica_checksums(
    group: &Group,
    volume: &GroupVolume,
    ask: &ChecksumAsk,
) -> Result<Option<Vec<RegionChecksum>>, ApplianceError> {
    let end = ask.offset + ask.length;
    let region_bytes = u64::from(ask.region_bytes);
    let mut buf = vec![0u8; ask.region_bytes as usize];
    let mut sums = Vec::with_capacity(ask.length.div_ceil(region_bytes) as usize);
    let mut offset = ask.offset;
    while offset < end {
        let length = region_bytes.min(volume.size - offset) as usize;
        let region = &mut buf[..length];
        group
            .read_replica(volume, offset, region)
            .map_err(|e| e.context(&format!("replica read at {offset}")))?;
        if group.distributed_seq() < ask.through {
            return Ok(None);
        }
        sums.push(region_checksum(region));
        offset += region_bytes;
    }
    Ok(Some(sums))
}

/// Whether a first initialization of `volume` should verify rather than copy everything:
/// the replica has a data extent (it was seeded, or distribution wrote to it), or the journal
/// already holds changes of the volume. A replica whose extents cannot be told (a block
/// device) counts as holding data. Blocking I/O.
pub fn replica_holds_data(volume: &GroupVolume) -> bool {
    if volume
        .last_source_seq
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        return true;
    }
    match cdp_types::BlockFile::open(&volume.replica_path, /* read_only */ true)
        .and_then(|replica| replica.next_data(0))
    {
        Ok(Some(at)) => at < volume.size,
        Ok(None) => true,
        Err(e) => {
            tracing::warn!(volume = %volume.name, "cannot tell whether the replica holds data: {e}");
            true
        }
    }
}
