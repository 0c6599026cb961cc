//! The ordering queue of one volume's split link: source_seq numbering, the changes the
//! journal has not acknowledged, acks, and the dirty-bitmap bookkeeping rule 2 rests on.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cdp_link::Message;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::dirty_bitmap::DirtyBitmap;

/// A change waiting for the appliance's Ack.
pub(super) struct Pending {
    pub(super) source_seq: u64,
    pub(super) message: Message,
    /// Wakes exactly the host request waiting for this change, instead of every waiter.
    pub(super) acked: Option<oneshot::Sender<()>>,
    /// The regions it touches, which become marked if the link breaks before its Ack.
    pub(super) regions: std::ops::Range<u64>,
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
pub struct AckWait(pub(super) oneshot::Receiver<()>);

pub(super) struct Queue {
    /// Highest source_seq handed out.
    pub(super) last_seq: u64,
    /// Changes not yet acknowledged, in source_seq order.
    pub(super) unacked: VecDeque<Pending>,
    /// Highest source_seq written to the current connection.
    pub(super) sent_through: u64,
    /// Highest source_seq a FLUSH has asked to make durable, and the highest asked on this connection.
    pub(super) flush_requested: u64,
    pub(super) flush_sent: u64,
    pub(super) bitmap: DirtyBitmap,
    /// Regions whose bit this queue set since the unacked queue was last empty.
    pub(super) touched: Vec<u64>,
    /// Regions production holds changes of that the journal may lack: copied on reconnect.
    pub(super) resync_pending: BTreeSet<u64>,
    /// The link is down and the policy is `mark`: changes are marked, not queued.
    pub(super) marking: bool,
    /// Checksum requests of a verifying resync, each sent once every change up to its seq is
    /// on the wire, so the appliance's answer covers every change production held when it
    /// was asked.
    pub(super) checksum_requests: VecDeque<(u64, Message)>,
    /// Checksum regions (index, by `verify_region_bytes`) being compared right now, and
    /// whether the host wrote to them since their production checksum was started: a
    /// mismatch there may be the two sides hashing different moments, so it is verified
    /// again rather than copied at once.
    pub(super) verify_watch: BTreeMap<u64, bool>,
    pub(super) verify_region_bytes: u64,
    /// When marking began (ns since the Unix epoch), kept until a resync's `ResyncEnd` is
    /// acknowledged: the `ResyncStart` tells the appliance, so it can refuse points from then
    /// on (host writes acknowledged since are only in production and the bitmap).
    pub(super) marking_since_ns: Option<u64>,
    /// When the link was last lost (the start of the current marking episode).
    pub(super) link_lost_ns: Option<u64>,
    /// The source_seq of a queued `ResyncEnd` the appliance has not acknowledged yet: until
    /// then the volume is still resyncing, whatever the copy loop says.
    pub(super) resync_end_unacked: Option<u64>,
    /// A resync's markers were lost with a connection (or its end could not be queued): the
    /// next connection runs a resync even with no region pending, so the appliance's span
    /// gets its `ResyncEnd`.
    pub(super) resync_incomplete: bool,
}

impl Queue {
    /// A queue over `bitmap`. Regions dirty at start-up may hold changes the journal never
    /// got (a crash, or a stop while marking): they are pending, copied at the first
    /// connection.
    pub(super) fn new(bitmap: DirtyBitmap) -> Queue {
        let resync_pending: BTreeSet<u64> = bitmap.dirty_regions().into_iter().collect();
        Queue {
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
        }
    }

    /// Applies a change to production and queues it (or, while marking, only marks its
    /// regions). The caller holds the queue's lock, so this is atomic with respect to every
    /// other change of the volume: production and the queue see one order (rule 2).
    pub(super) fn submit<E>(
        &mut self,
        offset: u64,
        length: u64,
        apply: impl FnOnce() -> Result<(), E>,
        message: impl FnOnce(u64) -> Message,
    ) -> Result<Submitted, E> {
        let regions = self.bitmap.regions_of(offset, length);
        // Mark before production changes, so a crash between the two can never hide it.
        for region in regions.clone() {
            if self.bitmap.set(region) {
                self.touched.push(region);
            }
        }
        apply()?;
        self.note_verify_write(offset, length);
        if self.marking {
            self.mark(regions);
            return Ok(Submitted::Marked);
        }
        let (tx, rx) = oneshot::channel();
        let source_seq = self.push(message, Some(tx), regions, None);
        Ok(Submitted::Queued {
            source_seq,
            acked: AckWait(rx),
        })
    }

    /// The appliance journaled every change through `source_seq`.
    pub(super) fn ack(&mut self, source_seq: u64) {
        pop_acked(&mut self.unacked, source_seq);
        if self.resync_end_unacked.is_some_and(|end| end <= source_seq) {
            self.resync_ended();
        }
        self.clear_settled_regions();
    }

    /// Gives the next change its source_seq and queues it for the appliance.
    pub(super) fn push(
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
    pub(super) fn clear_settled_regions(&mut self) {
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
    pub(super) fn note_verify_write(&mut self, offset: u64, length: u64) {
        if self.verify_watch.is_empty() || self.verify_region_bytes == 0 {
            return;
        }
        let first = offset / self.verify_region_bytes;
        let last = (offset + length.max(1) - 1) / self.verify_region_bytes;
        for (_, written) in self.verify_watch.range_mut(first..=last) {
            *written = true;
        }
    }

    /// Whether the next connection owes the appliance a resync (Some(when marking began, 0
    /// if unknown)): host writes were acknowledged that the journal may lack. The appliance
    /// refuses points from the Hello until that resync's `ResyncStart` is journaled, so the
    /// resync then runs even with no region pending, to send one.
    pub(super) fn announce_resync(&mut self) -> Option<u64> {
        let owed = self.marking
            || self.resync_incomplete
            || self.resync_end_unacked.is_some()
            || !self.resync_pending.is_empty();
        if !owed {
            return None;
        }
        self.resync_incomplete = true;
        Some(self.marking_since_ns.or(self.link_lost_ns).unwrap_or(0))
    }

    /// The journal acknowledged a resync's `ResyncEnd`: it holds everything marked since
    /// marking began, unless marking began again meanwhile.
    pub(super) fn resync_ended(&mut self) {
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

    pub(super) fn mark(&mut self, regions: std::ops::Range<u64>) {
        for region in regions {
            self.bitmap.set(region);
            self.resync_pending.insert(region);
        }
    }
}

/// Room in the unacked window for one change; released when the change is acknowledged.
pub struct WindowPermit(#[allow(dead_code)] pub(super) OwnedSemaphorePermit);

/// Forgets changes the journal has and wakes the host requests that waited for them.
pub(super) fn pop_acked(unacked: &mut VecDeque<Pending>, through: u64) {
    while unacked.front().is_some_and(|p| p.source_seq <= through) {
        if let Some(Pending {
            acked: Some(tx), ..
        }) = unacked.pop_front()
        {
            let _ = tx.send(());
        }
    }
}

/// A queue over a bitmap in a temporary directory, and ways to feed it, for the unit tests
/// of every part of the link.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// The bitmap's region size (64 KiB), so tests can place changes in distinct regions.
    pub(crate) const REGION: u64 = 64 * 1024;

    /// A queue for a volume of `regions` bitmap regions, none dirty.
    pub(crate) fn queue(regions: u64) -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (bitmap, _) = DirtyBitmap::open(&dir.path().join("bitmap"), regions * REGION)
            .expect("a new dirty bitmap");
        assert_eq!(bitmap.region_bytes(), REGION);
        (dir, Queue::new(bitmap))
    }

    /// Submits a Zero change of `length` bytes at `offset`; `None` when it was only marked.
    pub(crate) fn submit(queue: &mut Queue, offset: u64, length: u64) -> Option<(u64, AckWait)> {
        let submitted = queue.submit(
            offset,
            length,
            || Ok::<(), ()>(()),
            |source_seq| Message::Zero {
                source_seq,
                offset,
                length,
            },
        );
        match submitted {
            Ok(Submitted::Queued { source_seq, acked }) => Some((source_seq, acked)),
            Ok(Submitted::Marked) => None,
            Err(()) => unreachable!("the apply closure never fails"),
        }
    }

    /// The source_seq of each change in `batch` (other messages are left out).
    pub(crate) fn seqs(batch: &[Message]) -> Vec<u64> {
        batch
            .iter()
            .filter_map(|m| match m {
                Message::Write { source_seq, .. }
                | Message::Zero { source_seq, .. }
                | Message::ResyncStart { source_seq, .. }
                | Message::ResyncEnd { source_seq } => Some(*source_seq),
                _ => None,
            })
            .collect()
    }

    /// The offset of each Zero change in `batch`.
    pub(crate) fn zero_offsets(batch: &[Message]) -> Vec<u64> {
        batch
            .iter()
            .map(|m| match m {
                Message::Zero { offset, .. } => *offset,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Submits `count` changes, one at the start of each region from 0; their ack waits.
    pub(crate) fn submit_per_region(queue: &mut Queue, count: u64) -> Vec<AckWait> {
        (0..count)
            .map(|i| submit(queue, i * REGION, 4096).expect("queued").1)
            .collect()
    }

    /// The source_seqs still waiting for an Ack.
    pub(crate) fn unacked(queue: &Queue) -> Vec<u64> {
        queue.unacked.iter().map(|p| p.source_seq).collect()
    }

    /// Whether the host request behind `wait` has been answered.
    pub(crate) fn answered(wait: &mut AckWait) -> bool {
        wait.0.try_recv().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{
        answered, queue, seqs, submit, submit_per_region, unacked, zero_offsets, REGION,
    };
    use super::*;

    #[test]
    fn changes_get_strictly_increasing_source_seqs_in_submit_order() {
        let (_dir, mut q) = queue(8);
        let offsets = [5 * REGION, 0, 3 * REGION + 512, REGION, 7 * REGION];
        let seqs_given: Vec<u64> = offsets
            .iter()
            .map(|&at| submit(&mut q, at, 4096).expect("queued").0)
            .collect();
        assert_eq!(seqs_given, vec![1, 2, 3, 4, 5]);
        assert_eq!(q.last_seq, 5);
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        assert_eq!(seqs(&batch), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            zero_offsets(&batch),
            offsets,
            "sent in submit order, not by offset"
        );
        // Every region a queued change touches is dirty until the journal has it.
        for at in offsets {
            assert!(q.bitmap.is_set(at / REGION));
        }
    }

    #[test]
    fn an_overlapping_later_write_is_queued_after_the_earlier_one() {
        let (_dir, mut q) = queue(4);
        // Production sees the applies in this order; the journal must see the same one.
        let mut applied = Vec::new();
        let mut write = |q: &mut Queue, fill: u8| {
            let submitted = q.submit(
                REGION - 4096,
                8192,
                || {
                    applied.push(fill);
                    Ok::<(), ()>(())
                },
                |source_seq| Message::Write {
                    source_seq,
                    offset: REGION - 4096,
                    data: vec![fill; 8192].into(),
                },
            );
            match submitted {
                Ok(Submitted::Queued { source_seq, .. }) => source_seq,
                _ => panic!("not queued"),
            }
        };
        let first = write(&mut q, 1);
        let second = write(&mut q, 2);
        assert!(second > first);
        assert_eq!(applied, vec![1, 2]);
        let mut batch = Vec::new();
        q.take_unsent(&mut batch);
        let fills: Vec<(u64, u8)> = batch
            .iter()
            .map(|m| match m {
                Message::Write {
                    source_seq, data, ..
                } => (*source_seq, data[0]),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(fills, vec![(first, 1), (second, 2)]);
        // Both regions the writes straddle are dirty.
        assert!(q.bitmap.is_set(0) && q.bitmap.is_set(1));
    }

    #[test]
    fn acks_pop_exactly_the_acknowledged_prefix() {
        let (_dir, mut q) = queue(4);
        let mut waits = submit_per_region(&mut q, 4);
        q.ack(2);
        assert_eq!(unacked(&q), vec![3, 4]);
        let answered_now: Vec<bool> = waits.iter_mut().map(answered).collect();
        assert_eq!(answered_now, vec![true, true, false, false]);
        // Regions stay dirty while any change is unacknowledged: a crash now must resync them.
        assert!((0..4).all(|r| q.bitmap.is_set(r)));
        // An older (duplicate) ack changes nothing.
        q.ack(1);
        assert_eq!(unacked(&q), vec![3, 4]);
        q.ack(4);
        assert!(unacked(&q).is_empty());
        assert!(waits[2..].iter_mut().all(answered));
        assert!((0..4).all(|r| !q.bitmap.is_set(r)), "settled regions clear");
    }

    #[test]
    fn while_marking_changes_are_only_marked_and_take_no_number() {
        let (_dir, mut q) = queue(4);
        submit(&mut q, 0, 4096).expect("queued");
        q.marking = true;
        assert!(submit(&mut q, 2 * REGION, 4096).is_none());
        assert_eq!(q.last_seq, 1);
        assert!(q.resync_pending.contains(&2) && q.bitmap.is_set(2));
    }
}
