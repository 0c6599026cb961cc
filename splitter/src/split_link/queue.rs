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
