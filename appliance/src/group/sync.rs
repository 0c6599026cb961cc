//! The sync thread: one journal fsync serves every flush queued meanwhile (group commit).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use cdp_types::Seq;

use super::Group;
use crate::connection_progress::ConnectionProgress;
use crate::error::ApplianceError;
use crate::limits::SYNC_REQUESTS_MAX;

impl Group {
    /// Asks the sync thread to make everything appended so far durable, then raise
    /// `progress.durable` to `source_seq`.
    pub fn request_sync(
        &self,
        source_seq: u64,
        progress: &Arc<ConnectionProgress>,
    ) -> Result<(), ApplianceError> {
        let sync_tx = self.sync_tx.lock();
        let Some(sync_tx) = sync_tx.as_ref() else {
            return Err(ApplianceError::Busy("group is stopping".into()));
        };
        sync_tx
            .try_send(SyncRequest {
                source_seq,
                progress: Arc::clone(progress),
            })
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => ApplianceError::Busy(format!(
                    "more than {SYNC_REQUESTS_MAX} flushes outstanding"
                )),
                mpsc::TrySendError::Disconnected(_) => {
                    ApplianceError::Busy("group is stopping".into())
                }
            })
    }

    pub(super) fn sync_loop(&self, rx: mpsc::Receiver<SyncRequest>, interval: Duration) {
        let mut requests = Vec::new();
        loop {
            let stopping = match rx.recv_timeout(interval) {
                Ok(r) => {
                    requests.push(r);
                    requests.extend(rx.try_iter());
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            };
            if self.failure.borrow().is_some() {
                requests.clear();
                if stopping {
                    return;
                }
                continue;
            }
            if !requests.is_empty() || self.journal.durable_seq() < self.journal.last_seq() {
                match self.journal.sync() {
                    Ok(_) => {
                        for r in requests.drain(..) {
                            cdp_link::watermark::raise(&r.progress.durable, r.source_seq);
                        }
                        let _ = self.distribution_wake.try_send(());
                    }
                    Err(e) => {
                        // Never retry a failed fsync: the page cache can no longer be trusted.
                        self.fail(format!("journal sync failed: {e}"));
                        requests.clear();
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Makes every appended record durable now (replicated records, or what a checksum
    /// request waits for) and lets distribution apply them. A failure fences the group
    /// (never retry an fsync). Blocks: call from a thread.
    pub fn sync_replicated(&self) -> Result<Seq, ApplianceError> {
        match self.journal.sync() {
            Ok(seq) => {
                let _ = self.distribution_wake.try_send(());
                Ok(seq)
            }
            Err(e) => {
                let what = format!("journal sync failed: {e}");
                self.fail(what.clone());
                Err(ApplianceError::Fenced(what))
            }
        }
    }
}

/// A flush waiting for the next journal sync.
pub(super) struct SyncRequest {
    source_seq: u64,
    progress: Arc<ConnectionProgress>,
}
