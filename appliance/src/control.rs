//! The control socket: one JSON request per line in, one JSON response per line out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UnixListener;

use cdp_link::control_socket::ControlError;
use cdp_types::{Seq, TimestampNs};

use crate::bookmark::BookmarkPayload;
use crate::group::Group;
use crate::group_registry::Groups;
use crate::image::{AccessRequest, Images};
use crate::limits::{BOOKMARK_RECOVERABLE_POLL, CONTROL_CONNECTIONS_MAX};
use crate::point::{format_time, parse_point, resolve, PointSpec, ResolvedPoint};
use crate::timeline::{timeline, NotRecoverable};

/// The requests this socket answers, and the answers, are the control protocol's.
pub use cdp_control::{ApplianceStatus, Request};

pub async fn serve_control(listener: UnixListener, registry: Arc<Groups>, images: Arc<Images>) {
    cdp_link::control_socket::serve(
        listener,
        CONTROL_CONNECTIONS_MAX,
        move |request: Request| {
            let registry = Arc::clone(&registry);
            let images = Arc::clone(&images);
            async move { answer(&registry, &images, request).await }
        },
    )
    .await
}

/// One control request's answer; the control socket and the web timeline (`crate::web`)
/// share it, so both say the same thing and refuse the same points.
pub async fn answer(
    registry: &Arc<Groups>,
    images: &Arc<Images>,
    request: Request,
) -> Result<serde_json::Value, ControlError> {
    let groups = registry.list();
    match request {
        request @ (Request::GroupCreate(_)
        | Request::GroupList
        | Request::VolumeAdd { .. }
        | Request::VolumeRemove { .. }) => manage_request(Arc::clone(registry), request).await,
        Request::Status => to_json(&status(&groups)),
        request @ (Request::ImageAccess { .. }
        | Request::ImageList { .. }
        | Request::ImageRelease { .. }) => image_request(&groups, images, request).await,
        request => group_request(&groups, request).await,
    }
}

/// Image requests, on the blocking pool (they create files, roll replicas, wait).
async fn image_request(
    groups: &[Arc<Group>],
    images: &Arc<Images>,
    request: Request,
) -> Result<serde_json::Value, ControlError> {
    let images = Arc::clone(images);
    let work: Box<dyn FnOnce() -> Result<serde_json::Value, ControlError> + Send> = match request {
        Request::ImageAccess {
            group,
            at,
            writable,
            logged,
        } => {
            let group = find_group(groups, group.as_deref())?;
            Box::new(move || {
                let resolved = resolve_point(&group, &at)?;
                let image = images.access(
                    &group,
                    AccessRequest {
                        point: at,
                        resolved,
                        writable,
                        logged,
                    },
                )?;
                to_json(&cdp_control::ImageAccessed { image })
            })
        }
        Request::ImageList { group } => {
            if let Some(name) = group.as_deref() {
                find_group(groups, Some(name))?;
            }
            Box::new(move || {
                to_json(&cdp_control::ImageListed {
                    images: images.list(group.as_deref()),
                })
            })
        }
        Request::ImageRelease { id } => Box::new(move || {
            to_json(&cdp_control::ImageReleased {
                released: images.release(&id)?,
            })
        }),
        _ => return Err("not an image request".into()),
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ControlError::from(format!("request failed: {e}")))?
}

/// Group and volume management, on the blocking pool (files are created and synced;
/// removing a volume waits for distribution).
async fn manage_request(
    registry: Arc<Groups>,
    request: Request,
) -> Result<serde_json::Value, ControlError> {
    let work = move || match request {
        Request::GroupCreate(create) => {
            let group = registry.create_group(create)?;
            to_json(&cdp_control::GroupCreated {
                created: group.name.clone(),
                status: wire_status(group.status()),
            })
        }
        Request::GroupList => to_json(&cdp_control::GroupListed {
            groups: registry.summaries(),
        }),
        Request::VolumeAdd {
            group,
            name,
            size,
            replica,
        } => {
            let volume = registry.add_volume(&group, &name, size, replica)?;
            to_json(&cdp_control::VolumeAdded {
                group,
                added: volume.name.clone(),
                volume_id: volume.id,
                size: volume.size,
                replica: volume.replica_path.clone(),
            })
        }
        Request::VolumeRemove { group, name, force } => {
            let volume = registry.remove_volume(&group, &name, force)?;
            to_json(&cdp_control::VolumeRemoved {
                group,
                removed: volume.name.clone(),
                replica_kept: volume.replica_path.clone(),
            })
        }
        _ => Err("not a management request".into()),
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ControlError::from(format!("request failed: {e}")))?
}

/// Resolves a point the administrator named to a seq, refusing what `Group::check_recoverable`
/// refuses, points inside a resync (the copy is not consistent there) and moments when a
/// volume was marking or had no splitter. Every command that takes a point comes through here.
pub(crate) fn resolve_point(g: &Group, point: &str) -> Result<ResolvedPoint, ControlError> {
    let spec = parse_point(point)?;
    let bookmarks = g.bookmarks();
    if let PointSpec::Bookmark(name) = &spec {
        if !bookmarks.iter().any(|b| &b.name == name) {
            return Err(ControlError::not_found(format!(
                "no bookmark named {name:?} in group {} (released by retention, or never \
                 taken; see cdp bookmark list)",
                g.name
            )));
        }
    }
    let now = TimestampNs::now().0;
    let r = resolve(g.journal(), &bookmarks, &spec, now, g.oldest_point().0)?;
    g.check_recoverable(Seq(r.seq))?;
    // A point asked for by time is the state at that time, which may be after the record
    // it resolves to: writes acknowledged in between must be journaled too.
    let moment = match spec {
        PointSpec::Time(t) => t,
        PointSpec::Ago(d) => now.saturating_sub(d),
        _ => r.timestamp_ns,
    }
    .max(r.timestamp_ns);
    if let Some((volume, span)) = g.resync_span_containing(r.seq, moment) {
        let (range, after) = match span.end {
            Some(end) => (format!("seq {} to {end}", span.start), format!("seq {end}")),
            None => (
                format!("from seq {}, still running", span.start),
                "its end, once it completes".to_string(),
            ),
        };
        if let Some(since) = span.marking_since_ns {
            return Err(ControlError::refused(format!(
                "seq {} ({}) is not recoverable: volume {volume}'s splitter was in marking \
                 mode from {} and resynchronised it ({range}); host writes acknowledged in \
                 that time are not in the journal before {after}",
                r.seq,
                r.time,
                format_time(since)
            )));
        }
        return Err(ControlError::refused(format!(
            "seq {} lies inside a resync of volume {volume} ({range}): the copy is \
             not consistent there; consistent points nearby are seq {} and {after}",
            r.seq, span.start
        )));
    }
    if let Some((volume, since)) = g
        .volumes_down()
        .into_iter()
        .find(|(_, since)| moment >= *since)
    {
        return Err(ControlError::refused(format!(
            "seq {} ({}) is not recoverable: volume {volume} has had no connected splitter \
             since {}, so its splitter may be in marking mode and host writes it \
             acknowledged since may be missing from the journal",
            r.seq,
            r.time,
            format_time(since)
        )));
    }
    Ok(r)
}

/// The stretches of a group's history that `resolve_point` refuses, for the timeline.
fn not_recoverable(g: &Group) -> Vec<NotRecoverable> {
    let mut list: Vec<NotRecoverable> = g
        .resync_spans()
        .into_iter()
        .map(|(volume, span)| NotRecoverable {
            volume,
            reason: if span.marking_since_ns.is_some() {
                "marking".into()
            } else {
                "resync".into()
            },
            from_seq: Some(span.start),
            from_ns: span.marking_since_ns,
            from_time: span.marking_since_ns.map(format_time),
            until_seq: span.end,
        })
        .collect();
    list.extend(
        g.volumes_down()
            .into_iter()
            .map(|(volume, since)| NotRecoverable {
                volume,
                reason: "no_splitter".into(),
                from_seq: None,
                from_ns: Some(since),
                from_time: Some(format_time(since)),
                until_seq: None,
            }),
    );
    list
}

/// The group a request names, or the only group when it names none.
fn find_group(groups: &[Arc<Group>], name: Option<&str>) -> Result<Arc<Group>, ControlError> {
    let names = || {
        groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(name) => groups
            .iter()
            .find(|g| g.name == name)
            .cloned()
            .ok_or_else(|| {
                ControlError::not_found(format!("no group named {name:?} (groups: {})", names()))
            }),
        None if groups.len() == 1 => Ok(Arc::clone(&groups[0])),
        None => Err(ControlError::new(
            cdp_link::control_socket::ErrorCode::BadRequest,
            format!(
                "the appliance has {} groups; say which with --group NAME ({})",
                groups.len(),
                names()
            ),
        )),
    }
}

/// A request's work on one group, run on the blocking pool.
type GroupWork = Box<dyn FnOnce(&Group) -> Result<serde_json::Value, ControlError> + Send>;

/// Bookmark, point and timeline requests. They read the journal or fsync it, so they run on
/// the blocking pool, never on the tasks that serve the split links.
async fn group_request(
    groups: &[Arc<Group>],
    request: Request,
) -> Result<serde_json::Value, ControlError> {
    let received = Instant::now();
    let (group, work): (Arc<Group>, GroupWork) = match request {
        Request::Status => {
            return serde_json::to_value(status(groups)).map_err(|e| e.to_string().into())
        }
        Request::BookmarkCreate {
            group,
            name,
            consistency,
            freeze_window_ms,
            deadline_ms,
            keep,
            wait_recoverable_ms,
        } => (
            find_group(groups, group.as_deref())?,
            Box::new(move |g| {
                // A bookmark is a promise that every write acknowledged before it is in the
                // journal before it (DESIGN.md rule 7): refused, or waited for, otherwise.
                let wait_until = received + Duration::from_millis(wait_recoverable_ms.unwrap_or(0));
                let mut waited = false;
                // A taken name is refused as such (by `create_bookmark`), whatever the state.
                let taken = g.bookmarks().iter().any(|b| b.name == name);
                while let Some(reason) = g.not_recoverable_now().filter(|_| !taken) {
                    if Instant::now() >= wait_until {
                        return Err(ControlError::refused(if waited {
                            format!(
                                "bookmark not taken: still not recoverable after waiting: {reason}"
                            )
                        } else {
                            format!(
                                "bookmark not taken: {reason}; retry once the volume is \
                                     protecting again, or pass --wait SECONDS"
                            )
                        }));
                    }
                    waited = true;
                    std::thread::sleep(BOOKMARK_RECOVERABLE_POLL);
                }
                let received = if waited { Instant::now() } else { received };
                let deadline = deadline_ms.map(|ms| received + Duration::from_millis(ms));
                let payload = BookmarkPayload {
                    name,
                    consistency,
                    freeze_window_ms,
                    keep,
                };
                let b = g.create_bookmark(payload, deadline)?;
                tracing::info!(group = %g.name, name = %b.name, seq = b.seq, consistency = %b.consistency, "bookmark created");
                to_json(&cdp_control::BookmarkCreated {
                    group: g.name.clone(),
                    bookmark: b,
                })
            }),
        ),
        Request::BookmarkList { group } => (
            find_group(groups, group.as_deref())?,
            Box::new(|g| {
                to_json(&cdp_control::BookmarkListed {
                    group: g.name.clone(),
                    bookmarks: g.bookmarks(),
                })
            }),
        ),
        Request::PointResolve { group, point } => (
            find_group(groups, group.as_deref())?,
            Box::new(move |g| {
                let r = resolve_point(g, &point)?;
                to_json(&cdp_control::PointResolved {
                    group: g.name.clone(),
                    point,
                    resolved: r,
                })
            }),
        ),
        Request::Timeline { group } => (
            find_group(groups, group.as_deref())?,
            Box::new(|g| {
                let mut t = timeline(
                    &g.name,
                    g.journal(),
                    g.bookmarks(),
                    &g.consolidation_state(),
                    g.oldest_point().0,
                )?;
                t.not_recoverable = not_recoverable(g);
                to_json(&t)
            }),
        ),
        Request::Failover {
            group,
            planned,
            force,
            timeout_ms,
        } => (
            find_group(groups, group.as_deref())?,
            Box::new(move |g| {
                let answer = if planned {
                    let timeout = timeout_ms
                        .map(Duration::from_millis)
                        .unwrap_or(crate::failover::PLANNED_TIMEOUT_DEFAULT);
                    crate::failover::planned(g, timeout)?
                } else {
                    crate::failover::promote_unplanned(g, force)?
                };
                to_json(&answer)
            }),
        ),
        Request::Reprotect { group, force } => (
            find_group(groups, group.as_deref())?,
            Box::new(move |g| to_json(&crate::failover::reprotect(g, force)?)),
        ),
        Request::JournalConsolidate { group } => (
            find_group(groups, group.as_deref())?,
            Box::new(|g| {
                let report = g.consolidate()?;
                to_json(&cdp_control::JournalConsolidated {
                    group: g.name.clone(),
                    consolidation: report,
                })
            }),
        ),
        _ => return Err("not a group request".into()),
    };
    tokio::task::spawn_blocking(move || work(&group))
        .await
        .map_err(|e| ControlError::from(format!("request failed: {e}")))?
}

fn to_json(v: &impl Serialize) -> Result<serde_json::Value, ControlError> {
    serde_json::to_value(v).map_err(|e| format!("encoding the answer: {e}").into())
}

pub fn status(groups: &[Arc<Group>]) -> ApplianceStatus {
    ApplianceStatus {
        groups: groups.iter().map(|g| wire_status(g.status())).collect(),
    }
}

/// A group's status as the protocol defines it. Every field is named on both sides, so a
/// field added to or renamed in either struct is a compile error here. (The group keeps its
/// own struct until its split into parts lands; then it can build the protocol's directly.)
pub fn wire_status(status: crate::group::GroupStatus) -> cdp_control::GroupStatus {
    let crate::group::GroupStatus {
        name,
        journal_bytes,
        journal_segments,
        first_seq,
        last_seq,
        durable_seq,
        distributed_seq,
        lag_records,
        journal_capacity_bytes,
        journal_over_capacity,
        journal_full_policy,
        journal_throttling,
        journal_retention_s,
        first_timestamp_ns,
        journal_write_logical_bytes,
        journal_write_stored_bytes,
        journal_compression_ratio,
        failure,
        undo_bytes,
        oldest_point_seq,
        replica_held_at,
        history,
        consolidation,
        volumes,
        source,
        remote,
        replication_source,
        role,
        archive,
    } = status;
    cdp_control::GroupStatus {
        name,
        journal_bytes,
        journal_segments,
        first_seq,
        last_seq,
        durable_seq,
        distributed_seq,
        lag_records,
        journal_capacity_bytes,
        journal_over_capacity,
        journal_full_policy,
        journal_throttling,
        journal_retention_s,
        first_timestamp_ns,
        journal_write_logical_bytes,
        journal_write_stored_bytes,
        journal_compression_ratio,
        failure,
        undo_bytes,
        oldest_point_seq,
        replica_held_at,
        history,
        consolidation,
        volumes: volumes
            .into_iter()
            .map(cdp_control::VolumeStatus::from)
            .collect(),
        source,
        remote,
        replication_source,
        role,
        archive,
    }
}
