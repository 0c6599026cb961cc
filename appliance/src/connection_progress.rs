//! What one split-link connection is told of its changes: appended (`acked`), durable after a
//! Flush (`durable`) and, in sync mode, held by the remote copy. The link server owns it;
//! the group's sync thread raises `durable` (`group/sync.rs`), replication's shipped mark
//! releases `remote_pending`. A leaf: it imports neither the group nor replication.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Progress reported back to one split-link connection; cumulative, so no queue is needed
/// (except in sync mode, see `remote_pending`).
pub struct ConnectionProgress {
    /// Highest source_seq appended to the local journal.
    pub acked: watch::Sender<u64>,
    /// Highest source_seq a local journal sync covered after the splitter's Flush.
    pub durable: watch::Sender<u64>,
    /// Sync mode only: (last journal seq, last source_seq) of each appended batch whose Ack
    /// still waits for the remote copy, oldest first. The journal interleaves the group's
    /// volumes, so a connection's source_seq maps to a journal seq only through this list.
    /// At most `SYNC_ACKS_PENDING_MAX` entries: past that, a batch joins the newest entry
    /// (its changes are then acknowledged a little later, never earlier).
    pub remote_pending: Mutex<std::collections::VecDeque<(u64, u64)>>,
}

impl ConnectionProgress {
    pub fn new(start: u64) -> Arc<ConnectionProgress> {
        Arc::new(ConnectionProgress {
            acked: watch::Sender::new(start),
            durable: watch::Sender::new(0),
            remote_pending: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Sync mode: notes that changes through `source_seq` are at journal seq ≤ `journal_seq`
    /// and must wait for the remote copy before their Ack.
    pub fn note_remote_pending(&self, journal_seq: u64, source_seq: u64) {
        let mut q = lock(&self.remote_pending);
        if q.len() >= crate::limits::SYNC_ACKS_PENDING_MAX {
            if let Some(back) = q.back_mut() {
                *back = (journal_seq, source_seq);
                return;
            }
        }
        q.push_back((journal_seq, source_seq));
    }

    /// Sync mode: the highest source_seq whose batch the remote copy holds once it
    /// acknowledged `shipped`, dropping those entries; `None` if no entry is covered yet.
    pub fn remote_covered(&self, shipped: u64) -> Option<u64> {
        let mut q = lock(&self.remote_pending);
        let mut covered = None;
        while let Some(&(journal_seq, source_seq)) = q.front() {
            if journal_seq > shipped {
                break;
            }
            covered = Some(source_seq);
            q.pop_front();
        }
        covered
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
