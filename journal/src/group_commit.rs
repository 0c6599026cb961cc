//! Group commit: many threads wait for durability, one of them (the leader) runs the
//! sync for all. It knows nothing of journals: a position is a `u64` that only grows, and
//! the sync closure returns the position it made durable.
//!
//! Protocol (raft-engine's `write_barrier.rs` idea, with a Mutex and a Condvar):
//! a committer whose target is already durable returns at once; if a leader is syncing
//! it waits and rechecks; otherwise it becomes the leader, runs the sync with the lock
//! released, publishes the result and wakes everyone. A failed sync fences the group for
//! good: the page cache can no longer be trusted, so nobody retries.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Why a commit did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub enum CommitError<E> {
    /// This caller led a sync and it failed with `E`; the group is now fenced.
    Failed(E),
    /// The group was fenced by an earlier failure.
    Fenced,
}

#[derive(Debug)]
struct State {
    durable: u64,
    syncing: bool,
    fenced: bool,
}

/// Shares syncs between concurrent committers.
#[derive(Debug)]
pub struct GroupCommit {
    state: Mutex<State>,
    wake: Condvar,
}

impl GroupCommit {
    /// Starts with everything up to `durable` already durable.
    pub fn new(durable: u64) -> GroupCommit {
        GroupCommit {
            state: Mutex::new(State {
                durable,
                syncing: false,
                fenced: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few plain fields updated atomically under the lock, so it is
        // consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest position known durable.
    pub fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// Everything up to `to` is durable without a sync (the journal restarted after it).
    pub fn raise_durable(&self, to: u64) {
        let mut s = self.lock();
        s.durable = s.durable.max(to);
    }

    /// Sets the durable mark to exactly `to`, for a journal restarted below its old end
    /// (`Journal::restart_discarding`), whose old records are gone.
    pub fn reset_durable(&self, to: u64) {
        self.lock().durable = to;
    }

    pub fn is_fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Fences the group: every later commit fails with `Fenced`.
    pub fn fence(&self) {
        let mut s = self.lock();
        s.fenced = true;
        drop(s);
        self.wake.notify_all();
    }

    /// Returns once `target` is durable, running `sync` at most once, as leader.
    /// `sync` must return a position ≥ every position appended before it was called.
    pub fn commit<E>(
        &self,
        target: u64,
        sync: impl FnOnce() -> Result<u64, E>,
    ) -> Result<u64, CommitError<E>> {
        let mut s = self.lock();
        loop {
            if s.fenced {
                return Err(CommitError::Fenced);
            }
            if s.durable >= target {
                return Ok(s.durable);
            }
            if !s.syncing {
                break;
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.syncing = true;
        drop(s);

        // If `sync` panics, the guard fences and wakes the followers instead of leaving
        // them waiting on a leader that is gone.
        let mut guard = LeaderGuard {
            commit: self,
            done: false,
        };
        let result = sync();
        guard.done = true;
        drop(guard);

        let mut s = self.lock();
        s.syncing = false;
        let out = match result {
            Ok(position) => {
                s.durable = s.durable.max(position);
                Ok(s.durable)
            }
            Err(e) => {
                s.fenced = true;
                Err(CommitError::Failed(e))
            }
        };
        drop(s);
        self.wake.notify_all();
        out
    }
}

struct LeaderGuard<'a> {
    commit: &'a GroupCommit,
    done: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut s = self.commit.lock();
            s.syncing = false;
            s.fenced = true;
            drop(s);
            self.commit.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    /// A target already durable returns without syncing.
    #[test]
    fn durable_target_skips_sync() {
        let g = GroupCommit::new(5);
        let r: Result<u64, CommitError<()>> = g.commit(5, || panic!("must not sync"));
        assert_eq!(r, Ok(5));
    }

    /// Many threads committing concurrently share syncs: each position becomes durable,
    /// and far fewer syncs run than commits. The fake sync takes 2 ms to model fsync
    /// latency, during which other committers queue up behind the leader.
    #[test]
    fn concurrent_commits_share_syncs() {
        let g = Arc::new(GroupCommit::new(0));
        let appended = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads = 16;
        let per_thread = 20;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (g, appended, syncs) = (g.clone(), appended.clone(), syncs.clone());
                thread::spawn(move || {
                    for _ in 0..per_thread {
                        let mine = appended.fetch_add(1, Ordering::SeqCst) + 1;
                        let d = g
                            .commit(mine, || -> Result<u64, ()> {
                                let snapshot = appended.load(Ordering::SeqCst);
                                syncs.fetch_add(1, Ordering::SeqCst);
                                thread::sleep(Duration::from_millis(2));
                                Ok(snapshot)
                            })
                            .unwrap();
                        assert!(d >= mine);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let commits = threads * per_thread;
        let n = syncs.load(Ordering::SeqCst);
        assert!(n < commits / 2, "{n} syncs for {commits} commits");
        assert_eq!(g.durable(), commits);
    }

    /// A failed sync fences: the leader gets the error, everyone after gets Fenced, and
    /// the sync closure is never run again.
    #[test]
    fn failure_fences() {
        let g = GroupCommit::new(0);
        assert_eq!(
            g.commit(1, || Err::<u64, _>("eio")),
            Err(CommitError::Failed("eio"))
        );
        assert!(g.is_fenced());
        let r: Result<u64, CommitError<&str>> = g.commit(1, || panic!("never retry fsync"));
        assert_eq!(r, Err(CommitError::Fenced));
        // Even an already-durable target reports the fence: the journal is unusable.
        let r: Result<u64, CommitError<&str>> = g.commit(0, || Ok(0));
        assert_eq!(r, Err(CommitError::Fenced));
    }

    /// Followers waiting on a leader whose sync fails are woken and see Fenced.
    #[test]
    fn followers_of_failed_leader_see_fence() {
        let g = Arc::new(GroupCommit::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let leader = {
            let g = g.clone();
            thread::spawn(move || {
                g.commit(1, || {
                    // Hold leadership until the follower is queued behind us.
                    let _ = rx.recv();
                    Err::<u64, _>("eio")
                })
            })
        };
        // Wait until the leader is syncing, then queue a follower.
        while !g.lock().syncing {
            thread::yield_now();
        }
        let follower = {
            let g = g.clone();
            thread::spawn(move || g.commit(1, || Ok::<u64, &str>(1)))
        };
        thread::sleep(Duration::from_millis(20));
        tx.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), Err(CommitError::Failed("eio")));
        assert_eq!(follower.join().unwrap(), Err(CommitError::Fenced));
    }

    /// A panicking leader fences instead of leaving followers stuck.
    #[test]
    fn panicking_leader_fences() {
        let g = Arc::new(GroupCommit::new(0));
        let g2 = g.clone();
        let r =
            thread::spawn(move || g2.commit(1, || -> Result<u64, ()> { panic!("boom") })).join();
        assert!(r.is_err());
        assert!(g.is_fenced());
    }
}
