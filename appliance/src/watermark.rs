//! Watermarks: a small value other threads wait on (blocking, with a deadline) or await
//! (`watch`), instead of sleeping and polling it.
//!
//! The value lives in a `watch` channel, so async waiters subscribe as usual; blocking
//! waiters sleep on a `Condvar` until the channel's version moves. A setter updates the value
//! and then takes the gate before notifying, so a waiter that saw the old value is either
//! already waiting (and woken) or has not checked yet (and sees the new version): no wakeup
//! is lost. The gate is a leaf lock: nothing else is taken under it.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

use tokio::sync::watch;

pub struct Watermark<T> {
    tx: watch::Sender<T>,
    gate: Mutex<()>,
    moved: Condvar,
}

impl<T: Copy + Default> Default for Watermark<T> {
    fn default() -> Self {
        Watermark::new(T::default())
    }
}

impl<T: Copy> Watermark<T> {
    pub fn new(value: T) -> Watermark<T> {
        Watermark {
            tx: watch::Sender::new(value),
            gate: Mutex::new(()),
            moved: Condvar::new(),
        }
    }

    pub fn get(&self) -> T {
        *self.tx.borrow()
    }

    /// Sets the value and wakes every waiter.
    pub fn set(&self, value: T) {
        self.tx.send_replace(value);
        self.wake();
    }

    /// Wakes every waiter without changing the value, so they recheck their other
    /// conditions (the group was fenced, say).
    pub fn bump(&self) {
        self.tx.send_modify(|_| {});
        self.wake();
    }

    /// Sets the value, returning the old one; waiters are woken if it changed.
    pub fn swap(&self, value: T) -> T
    where
        T: PartialEq,
    {
        let mut old = value;
        let changed = self.tx.send_if_modified(|current| {
            old = *current;
            *current = value;
            old != value
        });
        if changed {
            self.wake();
        }
        old
    }

    /// For async waiters.
    pub fn subscribe(&self) -> watch::Receiver<T> {
        self.tx.subscribe()
    }

    /// Blocks until the value was set (or bumped) after `rx` last looked at it, or until
    /// `deadline`; returns whether it was. Marks the value seen.
    pub fn wait_changed(&self, rx: &mut watch::Receiver<T>, deadline: Instant) -> bool {
        let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // The sender lives in `self`, so the channel cannot be closed here.
            if rx.has_changed().unwrap_or(true) {
                rx.borrow_and_update();
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            gate = self
                .moved
                .wait_timeout(gate, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn wake(&self) {
        drop(self.gate.lock().unwrap_or_else(|p| p.into_inner()));
        self.moved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_blocked_waiter_wakes_when_the_value_is_set() {
        let mark = Arc::new(Watermark::new(0u64));
        let mut rx = mark.subscribe();
        let setter = {
            let mark = Arc::clone(&mark);
            std::thread::spawn(move || {
                for v in 1..=100 {
                    mark.set(v);
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while *rx.borrow() < 100 {
            assert!(
                mark.wait_changed(&mut rx, deadline),
                "no wakeup before the deadline"
            );
        }
        setter.join().expect("setter");
        assert_eq!(mark.get(), 100);
    }

    #[test]
    fn a_wait_with_nothing_set_ends_at_its_deadline_and_a_bump_wakes_it() {
        let mark = Watermark::new(7u64);
        let mut rx = mark.subscribe();
        let started = Instant::now();
        assert!(!mark.wait_changed(&mut rx, started + Duration::from_millis(30)));
        assert!(started.elapsed() >= Duration::from_millis(30));
        mark.bump();
        assert!(mark.wait_changed(&mut rx, Instant::now() + Duration::from_secs(30)));
        assert_eq!(mark.get(), 7);
    }

    #[test]
    fn swap_returns_the_old_value_and_wakes_only_on_a_change() {
        let mark = Watermark::new(false);
        let mut rx = mark.subscribe();
        assert!(!mark.swap(true));
        assert!(mark.swap(true));
        assert!(mark.wait_changed(&mut rx, Instant::now() + Duration::from_secs(30)));
        assert!(!mark.wait_changed(&mut rx, Instant::now()));
    }
}
