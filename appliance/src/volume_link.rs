//! Who holds a volume's split link at the appliance, and since when the volume has none.
//!
//! At most one splitter connection serves a volume (rule 6). A reconnect of the *same*
//! splitter process (same `splitter_id`, a higher Hello `session`) means the old connection
//! is half-open: the splitter has given up on it, this side has not noticed yet. The new
//! connection fences the old one (its tasks stop at their next await; an append in progress
//! finishes first, because appends do not await) and waits until it has released the volume,
//! so the new connection's Welcome names a resume point no late append of the old one can
//! move. Any other splitter is refused while a connection holds the volume.
//!
//! While no connection holds the volume, its splitter may be marking: host writes it
//! acknowledges since are not in the journal. `down_since_ns` says from when points are
//! therefore not recoverable (see `Group::not_recoverable_at`). A splitter that says in its
//! Hello that a resync follows (it was marking) keeps the volume down from the moment it
//! began marking until this connection's `ResyncStart` is journaled: from then on the resync
//! span refuses those points, and between the two nothing may offer them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cdp_types::TimestampNs;
use tokio::sync::{watch, Notify};

use crate::error::ApplianceError;

/// The connection holding the volume.
struct Holder {
    id: u64,
    splitter_id: u64,
    session: u64,
    fence: Arc<watch::Sender<bool>>,
}

struct State {
    holder: Option<Holder>,
    next_id: u64,
    /// No connection holds the volume since this moment (ns since the Unix epoch).
    down_since_ns: Option<u64>,
    /// The volume had a connection since the appliance started and lost it.
    lost: bool,
    /// The holder announced a resync whose `ResyncStart` is not journaled yet.
    resync_owed: bool,
}

/// One volume's split-link ownership.
pub struct VolumeLink {
    state: Mutex<State>,
    released: Notify,
}

/// A granted claim: the connection holds the volume until `release`.
pub struct LinkClaim {
    pub id: u64,
    /// Becomes true when a newer connection of the same splitter replaces this one.
    pub fence: watch::Receiver<bool>,
    /// The volume was down before this claim since this moment, after losing a connection
    /// (not merely since start-up): the fallback start of a marking span when the splitter
    /// cannot say when it began marking (it restarted meanwhile).
    pub lost_since_ns: Option<u64>,
}

impl Default for VolumeLink {
    fn default() -> Self {
        VolumeLink {
            state: Mutex::new(State {
                holder: None,
                next_id: 1,
                down_since_ns: Some(TimestampNs::now().0),
                lost: false,
                resync_owed: false,
            }),
            released: Notify::new(),
        }
    }
}

impl VolumeLink {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the volume for a connection from `splitter_id` (Hello `session`). Replaces a
    /// connection of the same splitter with a lower session once it has released the
    /// volume (waiting at most `wait`); refuses anyone else while the volume is held.
    /// `resync_follows` is the Hello's: Some(when marking began, 0 if unknown).
    pub async fn claim(
        &self,
        splitter_id: u64,
        session: u64,
        resync_follows: Option<u64>,
        wait: Duration,
    ) -> Result<LinkClaim, ApplianceError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            {
                let mut state = self.lock();
                match &state.holder {
                    None => {
                        let id = state.next_id;
                        state.next_id += 1;
                        let (fence, fence_rx) = watch::channel(false);
                        state.holder = Some(Holder {
                            id,
                            splitter_id,
                            session,
                            fence: Arc::new(fence),
                        });
                        let lost_since_ns = state.down_since_ns.filter(|_| state.lost);
                        state.resync_owed = resync_follows.is_some();
                        state.down_since_ns = match resync_follows {
                            None => None,
                            Some(since) => {
                                let now = TimestampNs::now().0;
                                let down = state.down_since_ns.unwrap_or(now);
                                Some(if since == 0 { down } else { down.min(since) })
                            }
                        };
                        return Ok(LinkClaim {
                            id,
                            fence: fence_rx,
                            lost_since_ns,
                        });
                    }
                    Some(h) if h.splitter_id == splitter_id && session > h.session => {
                        tracing::warn!(
                            splitter_id = format!("{splitter_id:016x}"),
                            stale_session = h.session,
                            session,
                            "the splitter reconnected over a stale connection; fencing the old one"
                        );
                        h.fence.send_replace(true);
                    }
                    Some(h) => {
                        // Refused: a second splitter for a held volume would be split brain.
                        return Err(ApplianceError::Refused(if h.splitter_id == splitter_id {
                            format!(
                                "already connected by this splitter in session {} (this Hello says {session})",
                                h.session
                            )
                        } else {
                            cdp_link::message::REFUSED_VOLUME_ALREADY_SPLIT.to_string()
                        }));
                    }
                }
                // Registered before the lock is released, so a release in between is seen.
                released.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(ApplianceError::Busy(format!(
                    "the stale connection it replaces did not end within {} ms",
                    wait.as_millis()
                )));
            }
        }
    }

    /// The connection `id` ended: the volume is down from `now - margin` on (the splitter may
    /// have given up on the link up to `margin` before this side noticed).
    pub fn release(&self, id: u64, margin: Duration) {
        let mut state = self.lock();
        if state.holder.as_ref().is_some_and(|h| h.id == id) {
            state.holder = None;
            let lost_at = TimestampNs::now()
                .0
                .saturating_sub(margin.as_nanos() as u64);
            // A resync announced but never started: the volume was down all along.
            state.down_since_ns = Some(match state.down_since_ns.filter(|_| state.resync_owed) {
                Some(since) => since.min(lost_at),
                None => lost_at,
            });
            state.resync_owed = false;
            state.lost = true;
        }
        drop(state);
        self.released.notify_waiters();
    }

    /// The connection `id` journaled the `ResyncStart` its Hello announced: its resync span
    /// refuses the points from here on.
    pub fn resync_journaled(&self, id: u64) {
        let mut state = self.lock();
        if state.resync_owed && state.holder.as_ref().is_some_and(|h| h.id == id) {
            state.resync_owed = false;
            state.down_since_ns = None;
        }
    }

    /// Since when no connection holds the volume, if none does, or since when the holder
    /// acknowledged host writes the journal lacks, until its announced resync starts.
    pub fn down_since_ns(&self) -> Option<u64> {
        let state = self.lock();
        if state.holder.is_some() && !state.resync_owed {
            None
        } else {
            state.down_since_ns
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_splitter_newer_session_replaces_and_others_are_refused() {
        let link = VolumeLink::default();
        let wait = Duration::from_secs(5);
        let first = link.claim(7, 1, None, wait).await.unwrap();
        assert!(link.down_since_ns().is_none());
        assert!(
            link.claim(8, 9, None, wait).await.is_err(),
            "another splitter"
        );
        assert!(
            link.claim(7, 1, None, wait).await.is_err(),
            "not a newer session"
        );
        // The old connection ends when fenced; the newer claim then gets the volume.
        let mut fence = first.fence.clone();
        let old = async {
            fence.wait_for(|f| *f).await.unwrap();
            link.release(first.id, Duration::ZERO);
        };
        let (second, ()) = tokio::join!(link.claim(7, 2, None, wait), old);
        let second = second.unwrap();
        assert!(
            second.lost_since_ns.is_some(),
            "the volume was lost in between"
        );
        link.release(second.id, Duration::ZERO);
        assert!(link.down_since_ns().is_some());
    }

    #[tokio::test]
    async fn an_announced_resync_keeps_the_volume_down_until_it_is_journaled() {
        let link = VolumeLink::default();
        let wait = Duration::from_secs(5);
        let first = link.claim(7, 1, None, wait).await.unwrap();
        link.release(first.id, Duration::ZERO);
        let lost = link.down_since_ns().unwrap();
        // The splitter began marking before this side noticed the loss.
        let claim = link.claim(7, 2, Some(lost - 1_000), wait).await.unwrap();
        assert_eq!(
            link.down_since_ns(),
            Some(lost - 1_000),
            "down until the ResyncStart"
        );
        link.resync_journaled(claim.id + 1);
        assert!(
            link.down_since_ns().is_some(),
            "another connection's marker counts not"
        );
        link.resync_journaled(claim.id);
        assert_eq!(link.down_since_ns(), None);
        // Announced with no time, then lost before the ResyncStart: down since the old loss.
        link.release(claim.id, Duration::ZERO);
        let lost = link.down_since_ns().unwrap();
        let claim = link.claim(7, 3, Some(0), wait).await.unwrap();
        assert_eq!(link.down_since_ns(), Some(lost));
        link.release(claim.id, Duration::ZERO);
        assert_eq!(link.down_since_ns(), Some(lost));
    }
}
