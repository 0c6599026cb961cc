//! `LeaseKeeper`: holds one group's primary lease for this site at one generation, renewing
//! it in a background thread, so the data path only ever reads an atomic.
//!
//! - **The deadline.** Before each request the keeper stamps `sent` on the boot clock
//!   (`clock.rs`); on a grant it raises the lease's end to `sent + D - m`, where `m` is the
//!   larger of its own margin and the witness's (`lease_rule.rs` says why this is safe).
//!   `holds_lease()` compares that end with the clock now: one atomic load and one vDSO
//!   clock read, never the network, and exact at the deadline whatever the thread is doing.
//! - **Renewal** at every third of the lease (`sent + D/3`), so two renewals may fail before
//!   the lease ends; a failed request is retried with backoff (50 ms doubling, at most
//!   `D/10`), each under a timeout that also ends at the lease's end.
//! - **State** for status and waiters: a `tokio::sync::watch` of `LeaseState`. It turns to
//!   `Expired` within a few milliseconds after the deadline (the thread wakes for it), but the
//!   data path must use `holds_lease()`, which is exact.
//! - **Generations.** A keeper asks for one generation. A promotion starts a new keeper at
//!   the new generation (the witness grants the same site a higher generation at once) and
//!   drops the old one. A `stale_generation` refusal is final: the keeper stops.
//! - **Refusals** (`held_by_other`, `restart_hold`) are retried after the witness's
//!   `retry_after_ms` (at most `D/3`), so a keeper started at a promoted site takes the lease
//!   as soon as the witness may grant it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::client::WitnessClient;
use crate::clock::Stamp;
use crate::error::WitnessError;
use crate::lease_rule::Margin;
use crate::protocol::{RefuseReason, Reply, Request};

/// How many grants `recent_grants` remembers.
const GRANTS_KEPT: usize = 4096;

/// What a keeper is asked to hold.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// The witness, `HOST:PORT`.
    pub witness: String,
    pub group: String,
    /// This site's id (the same id every time this site asks).
    pub site: String,
    pub generation: u64,
    /// The lease duration `D` asked for (at most the witness's `lease_duration_ms_max`).
    pub duration: Duration,
    /// This side's margin; it must be at least what the witness applies (the keeper takes
    /// the larger of the two anyway).
    pub margin: Margin,
}

/// The keeper's view of its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// No grant yet (first request, or retrying after refusals or errors).
    Acquiring { last_error: Option<String> },
    /// Held until `until` (boot clock) at `generation`.
    Held { until: Stamp, generation: u64 },
    /// The witness refused; `reason` `stale_generation` is final, the others are retried.
    Refused {
        reason: RefuseReason,
        holder: Option<String>,
        generation: u64,
        message: String,
    },
    /// The lease ran out without a renewal; the keeper keeps asking.
    Expired { last_error: String },
    /// Stopped by `release` or drop, or after a final refusal.
    Stopped,
}

/// One grant as the holder saw it (boot clock): for status and for tests that check that
/// no two sites' beliefs overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    pub sent: Stamp,
    pub received: Stamp,
    /// The lease's end this grant gave (the belief runs from `received` to `until`).
    pub until: Stamp,
    pub generation: u64,
}

struct Shared {
    /// The lease's end, boot-clock ns; 0: not held.
    until_ns: AtomicU64,
    stop: AtomicBool,
    /// Taken to raise `until_ns` on a grant (checking `stop` first) and to stop, so no
    /// grant arriving during a stop makes the lease held again. `holds_lease` never takes it.
    belief: Mutex<()>,
    /// When the keeper stopped believing early (stop, release, final refusal); 0: never.
    stopped_ns: AtomicU64,
    wake: (Mutex<()>, Condvar),
    grants: Mutex<VecDeque<LeaseGrant>>,
    state: watch::Sender<LeaseState>,
    changed: (Mutex<u64>, Condvar),
}

impl Shared {
    fn publish(&self, state: LeaseState) {
        self.state.send_if_modified(|s| {
            if *s == state {
                false
            } else {
                *s = state;
                true
            }
        });
        let (lock, cv) = &self.changed;
        if let Ok(mut n) = lock.lock() {
            *n += 1;
            cv.notify_all();
        }
    }

    /// Sleeps until `at` or until stopped.
    fn sleep_until(&self, at: Stamp) {
        let (lock, cv) = &self.wake;
        let Ok(mut guard) = lock.lock() else { return };
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = Stamp::now();
            if now >= at {
                return;
            }
            guard = match cv.wait_timeout(guard, at.since(now)) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }
}

/// Holds one group's lease in the background; see the module doc.
pub struct LeaseKeeper {
    shared: Arc<Shared>,
    config: KeeperConfig,
}

impl LeaseKeeper {
    /// Starts the background thread; returns at once (the first grant arrives later: wait
    /// with `wait_held` or watch `watch()`).
    pub fn start(config: KeeperConfig) -> Result<LeaseKeeper, WitnessError> {
        config.margin.check()?;
        if config.margin.holder_validity(config.duration).is_none() {
            return Err(WitnessError::Config(format!(
                "a lease of {} ms is not longer than its margin",
                config.duration.as_millis()
            )));
        }
        let (state, _) = watch::channel(LeaseState::Acquiring { last_error: None });
        let shared = Arc::new(Shared {
            until_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            belief: Mutex::new(()),
            stopped_ns: AtomicU64::new(0),
            wake: (Mutex::new(()), Condvar::new()),
            grants: Mutex::new(VecDeque::new()),
            state,
            changed: (Mutex::new(0), Condvar::new()),
        });
        let (s, c) = (Arc::clone(&shared), config.clone());
        std::thread::Builder::new()
            .name(format!("lease-{}", config.group))
            .spawn(move || run(&s, &c))
            .map_err(|e| WitnessError::io("starting the lease keeper thread", e))?;
        Ok(LeaseKeeper { shared, config })
    }

    /// Whether this site holds the lease now. The data path calls this before each
    /// acknowledgement: no lock, no network.
    pub fn holds_lease(&self) -> bool {
        self.lease_until().is_some()
    }

    /// The lease's end on the boot clock, if it is held now.
    pub fn lease_until(&self) -> Option<Stamp> {
        let until = Stamp(self.shared.until_ns.load(Ordering::Acquire));
        (until > Stamp::now()).then_some(until)
    }

    /// The lease's end as an `Instant`, if it is held now (for timers and display; see
    /// `Stamp::to_instant` on suspend).
    pub fn holds_lease_until(&self) -> Option<Instant> {
        self.lease_until().map(Stamp::to_instant)
    }

    /// The lease state, for status and for tasks that react to changes.
    pub fn watch(&self) -> watch::Receiver<LeaseState> {
        self.shared.state.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        self.shared.state.borrow().clone()
    }

    pub fn generation(&self) -> u64 {
        self.config.generation
    }

    /// When the keeper stopped believing before its lease's end (`stop`, `release`, drop or
    /// a final refusal): every grant's belief ends there at the latest.
    pub fn stopped_at(&self) -> Option<Stamp> {
        match self.shared.stopped_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(Stamp(ns)),
        }
    }

    /// The last grants received, oldest first.
    pub fn recent_grants(&self) -> Vec<LeaseGrant> {
        self.shared
            .grants
            .lock()
            .map(|g| g.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Blocks until the lease is held or `timeout` passes (for a promote, never the data
    /// path); `Err` is the state at the deadline.
    pub fn wait_held(&self, timeout: Duration) -> Result<Stamp, LeaseState> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &self.shared.changed;
        let mut guard = lock.lock().map_err(|_| LeaseState::Stopped)?;
        loop {
            if let Some(until) = self.lease_until() {
                return Ok(until);
            }
            let state = self.state();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state == LeaseState::Stopped {
                return Err(state);
            }
            guard = cv
                .wait_timeout(guard, left.min(Duration::from_millis(50)))
                .map_err(|_| LeaseState::Stopped)?
                .0;
        }
    }

    /// Stops believing and renewing, at once and without the network: from this call on
    /// `holds_lease()` is false for good. The witness still keeps the lease for this site
    /// until its own deadline (use `release` to free it sooner).
    pub fn stop(&self) {
        {
            let _belief = self.shared.belief.lock();
            self.shared.stop.store(true, Ordering::SeqCst);
            self.shared.until_ns.store(0, Ordering::Release);
            let _ = self.shared.stopped_ns.compare_exchange(
                0,
                Stamp::now().0,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        let (lock, cv) = &self.shared.wake;
        let _guard = lock.lock();
        cv.notify_all();
        drop(_guard);
        self.shared.publish(LeaseState::Stopped);
    }

    /// Gives the lease up: `stop` (no belief from here on, before anything is sent), then
    /// tells the witness so another site may take it without waiting for the deadline.
    /// Blocks up to `timeout` on the network: an administrative call. (A renewal already in
    /// flight may reach the witness after the release and be granted: the witness then keeps
    /// others out until that grant's deadline, which costs time, never safety.)
    pub fn release(&self, timeout: Duration) -> Result<(), WitnessError> {
        self.stop();
        let mut client = WitnessClient::connect(&self.config.witness, timeout)?;
        let reply = client.request(
            &Request::Release {
                group: self.config.group.clone(),
                site: self.config.site.clone(),
                generation: self.config.generation,
            },
            timeout,
        )?;
        match reply {
            Reply::Released => Ok(()),
            Reply::Refused { message, .. } => Err(WitnessError::Protocol(format!(
                "the witness refused the release: {message}"
            ))),
            other => Err(WitnessError::Protocol(format!(
                "unexpected reply to a release: {other:?}"
            ))),
        }
    }
}

impl Drop for LeaseKeeper {
    /// Stops renewing; the lease then runs out by itself (no network on drop).
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared, config: &KeeperConfig) {
    let third = config.duration / 3;
    let backoff_max = (config.duration / 10).max(Duration::from_millis(10));
    let mut backoff = Duration::from_millis(50).min(backoff_max);
    let mut client: Option<WitnessClient> = None;
    let request = Request::Acquire {
        group: config.group.clone(),
        site: config.site.clone(),
        generation: config.generation,
        duration_ms: config.duration.as_millis() as u64,
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let until = Stamp(shared.until_ns.load(Ordering::Acquire));
        let now = Stamp::now();
        // Each attempt ends by the lease's end, so expiry is published on time.
        let mut timeout = third.max(Duration::from_millis(20));
        if until > now {
            timeout = timeout.min(until.since(now).max(Duration::from_millis(20)));
        }
        let outcome = (|| {
            if client.is_none() {
                client = Some(WitnessClient::connect(&config.witness, timeout)?);
            }
            let c = client.as_mut().expect("just connected");
            let sent = Stamp::now();
            c.request(&request, timeout).map(|r| (sent, r))
        })();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let next = match outcome {
            Ok((
                sent,
                Reply::Granted {
                    generation,
                    duration_ms,
                    margin,
                },
            )) => {
                let received = Stamp::now();
                backoff = Duration::from_millis(50).min(backoff_max);
                let margin = config.margin.max(margin);
                let granted = Duration::from_millis(duration_ms).min(config.duration);
                match margin.holder_validity(granted) {
                    Some(validity) if generation == config.generation => {
                        let end = sent.plus(validity);
                        let Ok(belief) = shared.belief.lock() else {
                            return;
                        };
                        if shared.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let before = shared.until_ns.fetch_max(end.0, Ordering::AcqRel);
                        drop(belief);
                        let end = Stamp(before.max(end.0));
                        if let Ok(mut g) = shared.grants.lock() {
                            if g.len() == GRANTS_KEPT {
                                g.pop_front();
                            }
                            g.push_back(LeaseGrant {
                                sent,
                                received,
                                until: sent.plus(validity),
                                generation,
                            });
                        }
                        if end > Stamp::now() {
                            shared.publish(LeaseState::Held {
                                until: end,
                                generation,
                            });
                        }
                    }
                    _ => {
                        tracing::error!(
                            "group {}: witness grant of {duration_ms} ms at generation \
                             {generation} is unusable (asked {} at generation {})",
                            config.group,
                            config.duration.as_millis(),
                            config.generation
                        );
                    }
                }
                sent.plus(third)
            }
            Ok((
                _,
                Reply::Refused {
                    reason,
                    holder,
                    generation,
                    retry_after_ms,
                    message,
                },
            )) => {
                let final_refusal = matches!(
                    reason,
                    RefuseReason::StaleGeneration | RefuseReason::BadRequest
                );
                if final_refusal {
                    // The generation is over (or the request can never succeed): stop
                    // believing now, even if an earlier grant's end has not come.
                    let _belief = shared.belief.lock();
                    shared.stop.store(true, Ordering::SeqCst);
                    shared.until_ns.store(0, Ordering::Release);
                    let _ = shared.stopped_ns.compare_exchange(
                        0,
                        Stamp::now().0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                let held = Stamp(shared.until_ns.load(Ordering::Acquire)) > Stamp::now();
                if !held {
                    shared.publish(LeaseState::Refused {
                        reason,
                        holder,
                        generation,
                        message: message.clone(),
                    });
                }
                tracing::warn!(
                    "group {}: witness refused the lease: {message}",
                    config.group
                );
                if final_refusal {
                    shared.publish(LeaseState::Refused {
                        reason,
                        holder: None,
                        generation,
                        message,
                    });
                    return;
                }
                let wait = Duration::from_millis(retry_after_ms.max(20)).min(third);
                Stamp::now().plus(wait)
            }
            Ok((_, other)) => {
                client = None;
                tracing::warn!("group {}: unexpected witness reply {other:?}", config.group);
                Stamp::now().plus(backoff)
            }
            Err(e) => {
                client = None;
                let message = e.to_string();
                tracing::debug!("group {}: witness request failed: {message}", config.group);
                let held = Stamp(shared.until_ns.load(Ordering::Acquire)) > Stamp::now();
                if !held {
                    let had_lease = shared.until_ns.load(Ordering::Acquire) != 0;
                    shared.publish(if had_lease {
                        LeaseState::Expired {
                            last_error: message,
                        }
                    } else {
                        LeaseState::Acquiring {
                            last_error: Some(message),
                        }
                    });
                }
                let wait = backoff;
                backoff = (backoff * 2).min(backoff_max);
                Stamp::now().plus(wait)
            }
        };
        // Sleep to the next request, waking at the lease's end to publish the expiry.
        loop {
            let until = Stamp(shared.until_ns.load(Ordering::Acquire));
            let now = Stamp::now();
            if until > now && until < next {
                shared.sleep_until(until);
                if Stamp::now() >= until && !shared.stop.load(Ordering::SeqCst) {
                    shared.publish(LeaseState::Expired {
                        last_error: "no renewal granted before the lease's end".into(),
                    });
                }
                continue;
            }
            shared.sleep_until(next);
            break;
        }
    }
}
