//! The fencing witness end to end: the real `cdp witness` process, two sites' `LeaseKeeper`s
//! in this process reaching it through `LinkProxy` forwarders, partitions (blackhole), and
//! kill -9 restarts of the witness. Oracle: every belief a keeper had (its grants' `received`
//! to `until`, on the one boot clock of this machine) and a sampler reading both sites'
//! `holds_lease()` every millisecond; no instant may have two sites believing.
//!
//! Lease 1500 ms with the default margin (1 % + 100 ms): a holder believes for 1385 ms after
//! sending, the witness keeps others out for 1615 ms after granting.

mod common;

use cdp_witness::protocol::RefuseReason;
use cdp_witness::{KeeperConfig, LeaseKeeper, LeaseState, Margin, Stamp};
use common::link_proxy::LinkProxy;
use common::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LEASE: Duration = Duration::from_millis(1500);

/// A `cdp witness` on a fixed port and data directory, restartable.
struct WitnessProc {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

impl WitnessProc {
    fn start() -> WitnessProc {
        let mut w = WitnessProc {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            child: None,
            starts: 0,
        };
        w.spawn();
        w
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("witness.log")
    }

    /// Starts the process and returns once it accepts connections.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(cdp_bin())
            .args(["witness", "--listen", &self.addr(), "--data-dir"])
            .arg(self.data_dir())
            .env("CDP_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.starts += 1;
        let addr = self.addr();
        let mut child = self.child.take().unwrap();
        let up = poll_until(READY_DEADLINE, || {
            assert!(
                child.try_wait().unwrap().is_none(),
                "witness exited:\n{}",
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            std::net::TcpStream::connect(&addr).is_ok()
        });
        self.child = Some(child);
        assert!(up, "witness did not listen on {addr}");
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for WitnessProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- witness log ---\n{}",
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
        }
    }
}

fn keeper(addr: String, site: &str, generation: u64) -> LeaseKeeper {
    LeaseKeeper::start(KeeperConfig {
        witness: addr,
        group: "g1".into(),
        site: site.into(),
        generation,
        duration: LEASE,
        margin: Margin::default(),
    })
    .unwrap()
}

/// A keeper's grants, each ending where the keeper stopped believing if that came first.
fn beliefs(k: &LeaseKeeper) -> Vec<cdp_witness::LeaseGrant> {
    let stopped = k.stopped_at();
    k.recent_grants()
        .into_iter()
        .map(|mut g| {
            if let Some(s) = stopped {
                g.until = g.until.min(s);
            }
            g
        })
        .collect()
}

/// Every keeper the test ran, by site, and a sampler thread reading all of them.
#[derive(Default)]
struct Views {
    keepers: Mutex<Vec<(String, Arc<LeaseKeeper>)>>,
    /// Grants of keepers already dropped.
    retired: Mutex<Vec<(String, cdp_witness::LeaseGrant)>>,
    /// Instants at which two sites held at once.
    both: Mutex<Vec<(Stamp, String)>>,
    samples: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
}

impl Views {
    fn add(&self, site: &str, k: LeaseKeeper) -> Arc<LeaseKeeper> {
        let k = Arc::new(k);
        self.keepers
            .lock()
            .unwrap()
            .push((site.to_string(), Arc::clone(&k)));
        k
    }

    /// Drops a site's keepers (their grants are kept for the final check).
    fn retire(&self, site: &str) {
        let mut ks = self.keepers.lock().unwrap();
        let mut retired = self.retired.lock().unwrap();
        ks.retain(|(s, k)| {
            if s == site {
                // Stopped first, so no grant arrives after its grants are read.
                k.stop();
                retired.extend(beliefs(k).into_iter().map(|g| (s.clone(), g)));
                false
            } else {
                true
            }
        });
    }

    fn sampler(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let v = Arc::clone(self);
        std::thread::spawn(move || {
            while !v.stop.load(Ordering::SeqCst) {
                let now = Stamp::now();
                let holders: Vec<String> = v
                    .keepers
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, k)| k.holds_lease())
                    .map(|(s, _)| s.clone())
                    .collect();
                let mut sites = holders.clone();
                sites.sort();
                sites.dedup();
                if sites.len() > 1 {
                    v.both.lock().unwrap().push((now, sites.join("+")));
                }
                v.samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    }

    /// Every grant of every keeper, by site.
    fn all_grants(&self) -> Vec<(String, cdp_witness::LeaseGrant)> {
        let mut all = self.retired.lock().unwrap().clone();
        for (s, k) in self.keepers.lock().unwrap().iter() {
            all.extend(beliefs(k).into_iter().map(|g| (s.clone(), g)));
        }
        all
    }

    /// The rigorous check: no belief interval of one site meets one of another site.
    fn assert_no_overlap(&self) {
        let all = self.all_grants();
        for (sa, a) in &all {
            for (sb, b) in &all {
                if sa < sb {
                    let overlap = a.received < b.until && b.received < a.until;
                    assert!(!overlap, "{sa} {a:?} overlaps {sb} {b:?}");
                }
            }
        }
        let both = self.both.lock().unwrap();
        assert!(
            both.is_empty(),
            "two sites held at once: {:?}",
            &both[..both.len().min(5)]
        );
    }
}

fn wait_state(k: &LeaseKeeper, what: &str, timeout: Duration, f: impl Fn(&LeaseState) -> bool) {
    let ok = poll_until(timeout, || f(&k.state()));
    assert!(ok, "keeper never reached {what}; state {:?}", k.state());
}

/// Site A holds and B (promoted, generation 2) is refused while A renews; A is cut off by a
/// silent partition: A's keeper reports the expiry by its own deadline, and B is granted
/// only after the witness's deadline for A's last grant; A, healed, finds its generation over.
#[test]
fn partitioned_holder_expires_before_the_other_site_is_granted() {
    let witness = WitnessProc::start();
    let proxy_a = LinkProxy::start(witness.addr());
    let proxy_b = LinkProxy::start(witness.addr());
    let views = Arc::new(Views::default());
    let sampler = views.sampler();

    let a = views.add("a", keeper(format!("127.0.0.1:{}", proxy_a.port), "a", 1));
    a.wait_held(Duration::from_secs(10)).expect("A is granted");
    let b = views.add("b", keeper(format!("127.0.0.1:{}", proxy_b.port), "b", 2));
    wait_state(
        &b,
        "refused",
        Duration::from_secs(10),
        |s| matches!(s, LeaseState::Refused { reason: RefuseReason::HeldByOther, holder: Some(h), .. } if h == "a"),
    );
    // Three lease durations of A renewing: B stays refused, A never stops holding.
    let until = Stamp::now().plus(LEASE * 3);
    while Stamp::now() < until {
        assert!(
            a.holds_lease(),
            "A lost its lease while reachable: {:?}",
            a.state()
        );
        assert!(!b.holds_lease());
        std::thread::sleep(Duration::from_millis(5));
    }
    let renewals = a.recent_grants().len();
    assert!(renewals >= 7, "A renewed only {renewals} times in 4.5 s");

    proxy_a.blackhole();
    let cut = Stamp::now();
    let a_until = a.lease_until().expect("A holds at the cut");
    assert!(a_until.since(cut) <= Margin::default().holder_validity(LEASE).unwrap());
    // A's view: expired by its own deadline (the watch a few ms after it).
    wait_state(&a, "expired", LEASE * 2, |s| {
        matches!(s, LeaseState::Expired { .. })
    });
    let a_seen_expired = Stamp::now();
    assert!(!a.holds_lease());
    assert!(
        a_seen_expired.since(a_until) < Duration::from_millis(300),
        "A's watch said expired {:?} after its deadline",
        a_seen_expired.since(a_until)
    );
    b.wait_held(LEASE * 4)
        .expect("B is granted after A's lease");
    let a_last = *a.recent_grants().last().unwrap();
    let b_first = b.recent_grants()[0];
    // The witness granted at least D + m after A's last request was sent (one clock here).
    let witness_deadline = a_last.sent.plus(Margin::default().witness_exclusion(LEASE));
    assert!(
        b_first.received >= witness_deadline,
        "B granted {:?} before the witness's deadline for A",
        witness_deadline.since(b_first.received)
    );
    let gap = b_first.received.since(a_last.until);
    eprintln!(
        "A cut; its belief ended {:?} after the cut; B believed {gap:?} after that; {} samples",
        a_last.until.since(cut),
        views.samples.load(Ordering::Relaxed)
    );
    assert!(
        gap >= Duration::from_millis(200),
        "gap {gap:?} below 2 x fixed margin"
    );

    proxy_a.heal();
    wait_state(&a, "stale generation", LEASE * 4, |s| {
        matches!(
            s,
            LeaseState::Refused {
                reason: RefuseReason::StaleGeneration,
                ..
            }
        )
    });
    assert!(b.holds_lease());
    views.stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    views.assert_no_overlap();
}

/// kill -9 of the witness while A holds, then restart: A renews through the restart, B is
/// refused; then kill -9 again with A cut off at the same moment: B gets the lease only one
/// full lease plus margin after the restart, and after A's belief ended.
#[test]
fn witness_kill9_and_restart_keep_the_lease_rule() {
    let mut witness = WitnessProc::start();
    let proxy_a = LinkProxy::start(witness.addr());
    let views = Arc::new(Views::default());
    let sampler = views.sampler();
    let a = views.add("a", keeper(format!("127.0.0.1:{}", proxy_a.port), "a", 1));
    a.wait_held(Duration::from_secs(10)).expect("A is granted");

    witness.kill9();
    witness.spawn();
    let b = views.add("b", keeper(witness.addr(), "b", 2));
    wait_state(&b, "refused", Duration::from_secs(10), |s| {
        matches!(
            s,
            LeaseState::Refused {
                reason: RefuseReason::RestartHold | RefuseReason::HeldByOther,
                ..
            }
        )
    });
    let until = Stamp::now().plus(LEASE * 2);
    while Stamp::now() < until {
        assert!(!b.holds_lease(), "B granted while A renews");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A kept its lease across the restart (renewals at a third of the lease, retried).
    assert!(
        a.holds_lease(),
        "A lost its lease over a witness restart: {:?}",
        a.state()
    );

    proxy_a.blackhole();
    witness.kill9();
    let restart = Stamp::now();
    witness.spawn();
    b.wait_held(LEASE * 4)
        .expect("B is granted after the restart hold");
    let b_first = *b.recent_grants().first().unwrap();
    let hold_end = restart.plus(Margin::default().witness_exclusion(LEASE));
    assert!(
        b_first.received >= hold_end,
        "B granted {:?} before the restart hold's end",
        hold_end.since(b_first.received)
    );
    let log = std::fs::read_to_string(witness.log()).unwrap();
    assert!(
        log.contains("restart_hold") || log.contains("RestartHold"),
        "{log}"
    );
    views.stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    views.assert_no_overlap();
    drop(proxy_a);
}

/// A seeded run of random partitions (either site), heals, witness kill -9 restarts,
/// releases and promotions (a new keeper at the next generation at the site that does not
/// hold): at no sampled instant two sites believe, and no two sites' beliefs overlap.
#[test]
fn seeded_partitions_restarts_and_promotions_never_give_two_holders() {
    let seed = seed("witness_seeded");
    let mut rng = SplitMix64(seed);
    let mut witness = WitnessProc::start();
    let proxies = [
        LinkProxy::start(witness.addr()),
        LinkProxy::start(witness.addr()),
    ];
    let sites = ["a", "b"];
    let views = Arc::new(Views::default());
    let sampler = views.sampler();
    let mut generation = 1;
    views.add(
        "a",
        keeper(format!("127.0.0.1:{}", proxies[0].port), "a", generation),
    );
    let mut cut = [false, false];
    let (mut promotions, mut restarts, mut cuts, mut releases) = (0, 0, 0, 0);
    let steps = std::env::var("CDP_WITNESS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30u64);
    // A partition heals by itself 1 to 3 steps later, so every run also has calm spells.
    let mut heal_at = [0u64; 2];
    for step in 0..steps {
        for i in 0..2 {
            if cut[i] && step >= heal_at[i] {
                proxies[i].heal();
                cut[i] = false;
            }
        }
        match rng.below(6) {
            0 | 1 => {
                let i = rng.below(2) as usize;
                if !cut[i] {
                    proxies[i].blackhole();
                    cuts += 1;
                    cut[i] = true;
                    heal_at[i] = step + 1 + rng.below(3);
                }
            }
            2 => {
                witness.kill9();
                if rng.below(2) == 0 {
                    std::thread::sleep(Duration::from_millis(rng.below(800)));
                }
                witness.spawn();
                restarts += 1;
            }
            3 | 4 => {
                // Promote the site whose keeper does not hold (or a random one).
                let holder = views
                    .keepers
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, k)| k.holds_lease())
                    .map(|(s, _)| s.clone());
                let i = match holder.as_deref() {
                    Some("a") => 1,
                    Some(_) => 0,
                    None => rng.below(2) as usize,
                };
                views.retire(sites[i]);
                generation += 1;
                views.add(
                    sites[i],
                    keeper(
                        format!("127.0.0.1:{}", proxies[i].port),
                        sites[i],
                        generation,
                    ),
                );
                promotions += 1;
            }
            _ => {
                // The holder releases (a planned move), if it can reach the witness.
                let holder = views
                    .keepers
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, k)| k.holds_lease())
                    .map(|(s, k)| (s.clone(), Arc::clone(k)));
                if let Some((site, k)) = holder {
                    if k.release(Duration::from_millis(500)).is_ok() {
                        releases += 1;
                    }
                    views.retire(&site);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200 + rng.below(1800)));
        eprintln!("step {step}: cut {cut:?}, generation {generation}");
    }
    views.stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let grants = views.all_grants();
    eprintln!(
        "seed {seed}: {promotions} promotions, {restarts} restarts, {cuts} cuts, {releases} \
         releases, {} grants, {} samples",
        grants.len(),
        views.samples.load(Ordering::Relaxed)
    );
    assert!(grants.len() > 10, "too few grants to mean anything");
    views.assert_no_overlap();
}

/// Garbage on the witness port gets a `bad_request` line and a close; the witness keeps
/// serving; a second witness on the same data directory refuses to start.
#[test]
fn bad_requests_and_a_second_witness_are_refused() {
    use std::io::{BufRead, BufReader, Write};
    let witness = WitnessProc::start();
    for bad in [
        "garbage\n".to_string(),
        "{\"v\":9,\"op\":\"query\",\"group\":\"g\"}\n".to_string(),
        format!("{}\n", "x".repeat(10_000)),
    ] {
        let mut s = std::net::TcpStream::connect(witness.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("\"bad_request\""), "{line}");
    }
    let k = keeper(witness.addr(), "a", 1);
    k.wait_held(Duration::from_secs(10)).expect("still serving");
    let out = Command::new(cdp_bin())
        .args(["witness", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(witness.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another witness"), "{err}");
    // Corrupt state is named, never a fresh start.
    drop(k);
    let mut w = witness;
    w.kill9();
    let state = w.data_dir().join("witness.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&state, bytes).unwrap();
    let out = Command::new(cdp_bin())
        .args(["witness", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(w.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt") && err.contains("CRC"), "{err}");
    std::fs::remove_file(&state).unwrap();
}
