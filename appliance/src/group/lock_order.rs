//! The group's lock order: every lock of a `Group` has a rank, a thread takes locks only in
//! increasing rank, and checked builds assert it.
//!
//! A deadlock needs two threads taking two locks in opposite orders; with one total order
//! no such pair exists. The order (ARCHITECTURE.md, "Lock order") is the declaration order
//! of [`Rank`]. Checked builds (debug builds, the crate's own unit tests, and the feature
//! `lock-order-checks`) keep a per-thread list of the ranks held and panic, naming both
//! locks, when a blocking acquire would take a rank at or below one already held, before the
//! thread blocks. `try_lock` never blocks, so it cannot close a cycle: it is allowed at any
//! rank (retention's `try_lock` of `ConsolidationPass` under `ReplicaWriter` relies on that).
//! Release builds keep none of this: a ranked lock is then a std lock and a rank byte.
//!
//! Every lock is poison-tolerant, as the group's locks always were: each change under them
//! is one call on the guarded value, so a panicking holder leaves it consistent.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, RwLock, TryLockError};

/// The group's locks, outermost first: a thread holding one may take only those below it.
/// Locks inside the journal, undo stream, record cache, bookmark index, resync spans and
/// `watch` values are leaves: they are taken last and call nothing of the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// A consolidation pass; rollback and region resync take it to keep history still.
    ConsolidationPass,
    /// Whoever writes the replica in bulk: a distribution pass, a rollback, a region resync.
    ReplicaWriter,
    /// Image reads (shared) against consolidation moving records (exclusive).
    Relocation,
    /// What the replica holds, as image reads see it.
    ReplicaState,
    /// Retention pins of open images and the remote copy.
    Pins,
    /// The points consolidation kept.
    ConsolidationState,
    /// Per volume, the highest distributed source_seq.
    DistributedSourceSeqs,
    /// The block index; appends hold it across the journal append.
    History,
    /// The group's volumes by name.
    Volumes,
    /// A logged image's hold on the replica.
    Hold,
    /// Consolidation's counters.
    ConsolidationStats,
    /// The sync thread's request queue (`None` once stopping).
    SyncTx,
    /// The group's thread handles.
    Threads,
}

/// Whether this build checks the order.
const CHECKED: bool = cfg!(any(debug_assertions, test, feature = "lock-order-checks"));

thread_local! {
    /// Ranks this thread holds, in the order taken (checked builds only).
    static HELD: std::cell::RefCell<Vec<Rank>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Panics if this thread holds `rank` or a later one: taking `rank` now could deadlock.
fn check_order(rank: Rank) {
    if !CHECKED {
        return;
    }
    HELD.with(|held| {
        if let Some(&later) = held.borrow().iter().find(|&&h| h >= rank) {
            panic!(
                "lock order violated: taking {rank:?} while holding {later:?} \
                 (the order is Rank's declaration order, ARCHITECTURE.md \"Lock order\")"
            );
        }
    });
}

/// Notes `rank` as held until the returned token is dropped.
fn note_held(rank: Rank) -> Held {
    if CHECKED {
        HELD.with(|held| held.borrow_mut().push(rank));
    }
    Held { rank }
}

/// One entry of the thread's held list; dropping it removes that entry (guards may be
/// dropped in any order).
struct Held {
    rank: Rank,
}

impl Drop for Held {
    fn drop(&mut self) {
        if CHECKED {
            HELD.with(|held| {
                let mut held = held.borrow_mut();
                if let Some(i) = held.iter().rposition(|&h| h == self.rank) {
                    held.remove(i);
                }
            });
        }
    }
}

/// A guard of a ranked lock; derefs to the guarded value.
pub struct Ranked<G> {
    guard: G,
    _held: Held,
}

impl<G: Deref> Deref for Ranked<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: DerefMut> DerefMut for Ranked<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

pub type MutexGuard<'a, T> = Ranked<std::sync::MutexGuard<'a, T>>;
pub type ReadGuard<'a, T> = Ranked<std::sync::RwLockReadGuard<'a, T>>;
pub type WriteGuard<'a, T> = Ranked<std::sync::RwLockWriteGuard<'a, T>>;

/// A `Mutex` with a place in the lock order.
pub struct RankedMutex<T> {
    rank: Rank,
    inner: Mutex<T>,
}

impl<T> RankedMutex<T> {
    pub fn new(rank: Rank, value: T) -> RankedMutex<T> {
        RankedMutex {
            rank,
            inner: Mutex::new(value),
        }
    }

    /// Blocks until held; asserts the order first.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        check_order(self.rank);
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ranked {
            guard,
            _held: note_held(self.rank),
        }
    }

    /// Holds it if free, at any rank (not blocking, it cannot deadlock); `None` if taken.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        let guard = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Ranked {
            guard,
            _held: note_held(self.rank),
        })
    }
}

/// An `RwLock` with a place in the lock order (shared and exclusive alike).
pub struct RankedRwLock<T> {
    rank: Rank,
    inner: RwLock<T>,
}

impl<T> RankedRwLock<T> {
    pub fn new(rank: Rank, value: T) -> RankedRwLock<T> {
        RankedRwLock {
            rank,
            inner: RwLock::new(value),
        }
    }

    /// Blocks until held shared; asserts the order first. A thread never takes the same
    /// lock shared twice: with a writer waiting between, that deadlocks.
    pub fn read(&self) -> ReadGuard<'_, T> {
        check_order(self.rank);
        let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
        Ranked {
            guard,
            _held: note_held(self.rank),
        }
    }

    /// Blocks until held exclusively; asserts the order first.
    pub fn write(&self) -> WriteGuard<'_, T> {
        check_order(self.rank);
        let guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        Ranked {
            guard,
            _held: note_held(self.rank),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_taken_in_rank_order_are_fine_and_released_in_any_order() {
        let pins = RankedMutex::new(Rank::Pins, 0u32);
        let history = RankedMutex::new(Rank::History, 0u32);
        let volumes = RankedRwLock::new(Rank::Volumes, 0u32);
        let p = pins.lock();
        let h = history.lock();
        let v = volumes.read();
        drop(p);
        drop(v);
        drop(h);
        // Everything released: the outermost lock may be taken again.
        *pins.lock() += 1;
        assert_eq!(*pins.lock(), 1);
    }

    #[test]
    #[should_panic(expected = "lock order violated: taking Pins while holding History")]
    fn taking_a_lock_out_of_order_panics() {
        let pins = RankedMutex::new(Rank::Pins, ());
        let history = RankedMutex::new(Rank::History, ());
        let _h = history.lock();
        let _p = pins.lock();
    }

    #[test]
    #[should_panic(expected = "taking ReplicaState while holding ReplicaState")]
    fn taking_a_shared_lock_twice_panics() {
        let state = RankedRwLock::new(Rank::ReplicaState, ());
        let _a = state.read();
        let _b = state.read();
    }

    #[test]
    fn try_lock_is_allowed_out_of_order_and_counts_as_held() {
        let pass = RankedMutex::new(Rank::ConsolidationPass, ());
        let writer = RankedMutex::new(Rank::ReplicaWriter, ());
        let pins = RankedMutex::new(Rank::Pins, ());
        let _w = writer.lock();
        let p = pass.try_lock();
        assert!(p.is_some());
        assert!(pass.try_lock().is_none(), "a held mutex is not free");
        let _pins = pins.lock();
        drop(p);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _again = writer.lock();
        }));
        assert!(
            outcome.is_err(),
            "ReplicaWriter is still held: taking it again must panic"
        );
    }
}
