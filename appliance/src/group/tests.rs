//! Unit tests of the group's parts on a real group in a temporary directory. They run with
//! the lock order checked (`lock_order.rs`: unit tests always check it), so every path they
//! take also proves its locks nest in rank order.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cdp_journal::{JournalConfig, RecordIn};
use cdp_types::Seq;

use super::Group;
use crate::config::GroupConfig;
use crate::error::ApplianceError;

const VOLUME_BYTES: u64 = 1 << 20;
/// The id `group.state` gives the first volume of a new group.
const VOLUME_ID: u32 = 1;
const WAIT: Duration = Duration::from_secs(60);

fn open(dir: &Path) -> Arc<Group> {
    let text = format!(
        "name = \"g\"\n[[volume]]\nname = \"v\"\nsize = {VOLUME_BYTES}\nreplica = {:?}\n",
        dir.join("v.replica")
    );
    let config: GroupConfig = toml::from_str(&text).expect("group config");
    let journal = JournalConfig {
        segment_bytes_max: 1 << 20,
        ..Default::default()
    };
    Group::open(
        dir,
        &config,
        journal,
        Duration::from_millis(1),
        Duration::ZERO,
    )
    .expect("open group")
}

/// A 4 KiB write of `byte` to the group's volume (ids are assigned by `group.state`).
fn write(offset: u64, byte: u8, source_seq: u64) -> RecordIn {
    RecordIn::write(VOLUME_ID, offset, Bytes::from(vec![byte; 4096])).with_source_seq(source_seq)
}

#[test]
fn appends_are_distributed_to_the_replica() {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = open(dir.path());
    let volume = group.volume("v").expect("volume v");
    assert_eq!(volume.id, VOLUME_ID);
    let last = group
        .append(&volume, &[write(0, 1, 1), write(8192, 2, 2)])
        .expect("append");
    assert_eq!(last, Seq(2));
    assert_eq!(
        volume
            .last_source_seq
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    group.distribute_everything(WAIT).expect("distributed");
    assert_eq!(group.distributed_seq(), Seq(2));
    let mut buf = vec![0u8; 4096];
    group.read_replica(&volume, 8192, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 2));
    // Status takes most of the group's locks: in rank order, one at a time.
    let status = group.status();
    assert_eq!((status.last_seq, status.distributed_seq), (2, 2));
    group.stop();
}

#[test]
fn a_fenced_group_refuses_every_append() {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = open(dir.path());
    let volume = group.volume("v").expect("volume v");
    group.append(&volume, &[write(0, 1, 1)]).expect("append");
    group.fail("injected".into());
    assert!(matches!(
        group.append(&volume, &[write(0, 2, 2)]),
        Err(ApplianceError::Fenced(_))
    ));
    assert!(matches!(
        group.append_replicated(&[write(0, 3, 3)], Seq(2), &[1]),
        Err(ApplianceError::Fenced(_))
    ));
    assert_eq!(group.last_seq(), Seq(1), "nothing appended after the fence");
    group.stop();
}

#[test]
fn a_waiter_for_distribution_wakes_with_fenced_when_the_group_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = open(dir.path());
    let started = std::time::Instant::now();
    let waiter = {
        let group = Arc::clone(&group);
        std::thread::spawn(move || {
            group.wait_for_distribution(
                std::time::Instant::now() + WAIT,
                |mark| mark.distributed == Seq(u64::MAX),
                |_| "deadline".into(),
            )
        })
    };
    group.fail("injected".into());
    let waited = waiter.join().expect("waiter thread");
    assert!(
        matches!(waited, Err(ApplianceError::Fenced(_))),
        "{waited:?}"
    );
    assert!(
        started.elapsed() < WAIT,
        "the waiter slept until its deadline"
    );
    group.stop();
}

#[test]
fn a_replicated_batch_that_does_not_continue_the_journal_is_refused_without_fencing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = open(dir.path());
    let volume = group.volume("v").expect("volume v");
    group.append(&volume, &[write(0, 1, 1)]).expect("append");
    let gap = group.append_replicated(&[write(0, 2, 2)], Seq(5), &[u64::MAX]);
    assert!(matches!(gap, Err(ApplianceError::Refused(_))), "{gap:?}");
    assert!(
        group.failure().borrow().is_none(),
        "the peer's error fenced the group"
    );
    // The same path indexes a batch that does continue it.
    let next = group
        .append_replicated(&[write(4096, 3, 7)], Seq(2), &[u64::MAX])
        .expect("continuing batch");
    assert_eq!(next, Seq(2));
    group.stop();
}

#[test]
fn a_removed_volume_refuses_appends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = open(dir.path());
    group
        .append(&group.volume("v").expect("v"), &[write(0, 1, 1)])
        .expect("append");
    let removed = group.remove_volume("v", false).expect("remove");
    assert!(matches!(
        group.append(&removed, &[write(0, 2, 2)]),
        Err(ApplianceError::Refused(_))
    ));
    assert!(group.volume("v").is_none());
    group.stop();
}

#[test]
fn pins_refuse_points_outside_the_window_and_hold_history() {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = open(dir.path());
    let volume = group.volume("v").expect("volume v");
    group
        .append(&volume, &[write(0, 1, 1), write(0, 2, 2)])
        .expect("append");
    assert!(matches!(
        group.pin_point(Seq(3)),
        Err(ApplianceError::NotFound(_))
    ));
    let pin = group.pin_point(Seq(1)).expect("pin seq 1");
    group.distribute_everything(WAIT).expect("distributed");
    // The image at seq 1 reads the first write although the replica holds the second.
    let mut buf = vec![0u8; 4096];
    group
        .read_at_point(&volume, Seq(1), 0, &mut buf)
        .expect("read at seq 1");
    assert!(buf.iter().all(|&b| b == 1));
    group.unpin(pin);
    group.stop();
}
