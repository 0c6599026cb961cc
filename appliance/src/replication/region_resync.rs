//! The source's side of a resynchronisation by regions: the remote copy ends before this
//! journal's first record (history it never received was released), so the two replicas are
//! compared region by region at a pinned point and only the differing regions are sent.
//!
//! The point P is the journal's durable end when the resync starts; an image at P (pinned,
//! so retention keeps what it reads) is what is compared and sent, so host writes go on.
//! The remote acknowledges P once its history restarts there, and shipping resumes at P + 1.
//! See `group/region_resync.rs` for the remote's side and its crash safety.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_link::checksum::region_checksum;
use cdp_link::replication::{read_message, write_message, ReplicationMessage};

use crate::error::ApplianceError;
use crate::group::Group;
use crate::replication::link_stream::{LinkReader, LinkWriter};
use crate::replication::ShippingState;

/// Bytes compared (and sent, if they differ) as one unit.
pub const RESYNC_REGION_BYTES: u32 = 1024 * 1024;
/// Longest wait for the replica to be exact after a restart before comparing.
const REPLICA_EXACT_WAIT: Duration = Duration::from_secs(600);

/// What the last resynchronisation by regions did, for status.
pub use cdp_control::RegionResyncReport;

/// Resynchronises the remote copy (which holds the journal up to `remote_last`) and returns
/// the seq it holds afterwards.
pub fn resync_by_regions(
    group: &Group,
    state: &ShippingState,
    reader: &mut BufReader<LinkReader>,
    writer: &mut BufWriter<LinkWriter>,
    remote_last: u64,
) -> Result<u64, ApplianceError> {
    let started = Instant::now();
    let journal_first = group.journal().first_seq().0;
    let through = group.journal().durable_seq();
    let pin = group.pin_point(through)?;
    let result = (|| {
        group.wait_replica_exact(REPLICA_EXACT_WAIT)?;
        tracing::warn!(
            group = %group.name,
            endpoint = %state.config.endpoint,
            remote_had_through = remote_last,
            journal_first,
            through = %through,
            "the remote copy lacks history this journal released before shipping it: resynchronising it by regions"
        );
        write_message(
            writer,
            &ReplicationMessage::ResyncBegin {
                through_seq: through.0,
                region_bytes: RESYNC_REGION_BYTES,
            },
        )?;
        let volumes = group.volumes();
        let regions = |size: u64| size.div_ceil(RESYNC_REGION_BYTES as u64) as usize;
        let mut remote_sums: BTreeMap<u32, Vec<[u8; 32]>> =
            volumes.iter().map(|v| (v.id, Vec::new())).collect();
        let expected: usize = volumes.iter().map(|v| regions(v.size)).sum();
        let mut received = 0;
        while received < expected {
            match read_message(reader)? {
                ReplicationMessage::ResyncSums {
                    volume,
                    offset,
                    sums,
                } => {
                    let size = volumes
                        .iter()
                        .find(|v| v.id == volume)
                        .map(|v| v.size)
                        .ok_or_else(|| {
                            ApplianceError::Refused(format!(
                                "resync sums for unknown volume id {volume}"
                            ))
                        })?;
                    let have = remote_sums.entry(volume).or_default();
                    if offset != have.len() as u64 * RESYNC_REGION_BYTES as u64
                        || have.len() + sums.len() > regions(size)
                    {
                        return Err(ApplianceError::Refused(format!(
                            "resync sums for volume {volume} at {offset} out of order or past its end"
                        )));
                    }
                    received += sums.len();
                    have.extend(sums);
                }
                ReplicationMessage::Refuse { reason } => {
                    return Err(ApplianceError::Refused(format!(
                        "the remote copy refused the resync: {reason}"
                    )))
                }
                other => {
                    return Err(ApplianceError::Refused(format!(
                        "expected resync sums, got {other:?}"
                    )))
                }
            }
        }
        let mut report = RegionResyncReport {
            remote_had_through_seq: remote_last,
            journal_first_seq: journal_first,
            through_seq: through.0,
            ..RegionResyncReport::default()
        };
        let mut buf = vec![0u8; RESYNC_REGION_BYTES as usize];
        for v in &volumes {
            for (i, remote) in remote_sums[&v.id].iter().enumerate() {
                let offset = i as u64 * RESYNC_REGION_BYTES as u64;
                let len = (v.size - offset).min(RESYNC_REGION_BYTES as u64) as usize;
                group
                    .read_at_point(v, through, offset, &mut buf[..len])
                    .map_err(|e| e.context(&format!("reading the image at seq {through}")))?;
                report.regions_compared += 1;
                if region_checksum(&buf[..len]) != *remote {
                    write_message(
                        writer,
                        &ReplicationMessage::ResyncData {
                            volume: v.id,
                            offset,
                            data: Bytes::copy_from_slice(&buf[..len]),
                        },
                    )?;
                    report.regions_sent += 1;
                    report.bytes_sent += len as u64;
                    state.wire_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
            }
        }
        write_message(
            writer,
            &ReplicationMessage::ResyncEnd {
                through_seq: through.0,
            },
        )?;
        match read_message(reader)? {
            ReplicationMessage::BatchAck { through_seq } if through_seq == through.0 => {}
            ReplicationMessage::Refuse { reason } => {
                return Err(ApplianceError::Refused(format!(
                    "the remote copy refused the resync: {reason}"
                )))
            }
            other => {
                return Err(ApplianceError::Refused(format!(
                    "expected the resync's ack, got {other:?}"
                )))
            }
        }
        report.millis = started.elapsed().as_millis() as u64;
        tracing::info!(
            group = %group.name,
            endpoint = %state.config.endpoint,
            through = report.through_seq,
            regions_compared = report.regions_compared,
            regions_sent = report.regions_sent,
            bytes_sent = report.bytes_sent,
            millis = report.millis,
            "remote copy resynchronised by regions; shipping resumes after the resync point"
        );
        *state
            .last_region_resync
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(report);
        Ok(through.0)
    })();
    group.unpin(pin);
    result
}
