//! Crash tests: SIGKILL of the appliance or the splitter at seeded random instants during a
//! write workload with periodic FLUSH and FUA; no acknowledged-durable write may be lost from
//! production or from the replica, and the replica must converge to production.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
/// The workload's region: 8 MiB in the middle of the volume, so untouched bytes around it are
/// checked too.
const REGION_OFFSET: u64 = 8 * MIB;
const REGION: u64 = 8 * MIB;
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

fn count_flushes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.lines().filter(|l| l.starts_with("F ")).count())
        .unwrap_or(0)
}

fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn start_client(
    site: &Site,
    log: &Path,
    stop: &Path,
    seed: u64,
    flush_every: u64,
    block: u64,
) -> Child {
    python("crash_client.py")
        .arg("run")
        .arg(site.nbd_uri("vol0"))
        .arg(log)
        .arg(stop)
        .arg(format!("--seed={}", seed >> 1))
        .arg(format!("--block-size={block}"))
        .arg(format!("--blocks={}", REGION / block))
        .arg(format!("--region-offset={REGION_OFFSET}"))
        .arg(format!("--flush-every={flush_every}"))
        .arg("--fua-every=16")
        .arg("--depth=16")
        .stdin(Stdio::null())
        .spawn()
        .expect("start crash_client.py")
}

/// Whether the test requires the replica to equal production after each crash.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Convergence {
    Required,
    /// Only acknowledged-durable writes are checked on the replica.
    NotChecked,
}

/// `block`: the client's write size; larger writes widen the window in which production is
/// ahead of the journal.
/// What the test kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Appliance,
    Splitter,
    /// Both at the same instant, as a power loss of a host running both would (minus the page
    /// cache, which survives a process kill).
    Both,
}

/// Kills the workload client if the test fails before the client exits.
struct ClientGuard(Child);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn crash_test(victim: Victim, iterations: u64, convergence: Convergence, block: u64) {
    let name = format!("crash_{victim:?}").to_lowercase();
    let seed = seed(&name);
    let mut rng = SplitMix64(seed);
    let mut site = Site::start(&[("vol0", SIZE)]);
    for k in 0..iterations {
        let dir = site.root().to_path_buf();
        // Each copy's own state before this iteration: where a crash left the replica behind
        // production on non-durable writes, the copies may legitimately differ.
        let baseline = dir.join(format!("baseline-production-{k}.img"));
        std::fs::copy(&site.volume("vol0").production, &baseline).unwrap();
        let replica_baseline = dir.join(format!("baseline-replica-{k}.img"));
        if !reference_mode() {
            std::fs::copy(&site.volume("vol0").replica, &replica_baseline).unwrap();
        }
        let log = dir.join(format!("client-{k}.log"));
        let stop = dir.join(format!("stop-{k}"));
        let flush_every = 4 + rng.below(29);
        // Up to about 64 MiB of writes before the kill, whatever the write size.
        let flushes_max = (64 * MIB / (block * flush_every)).clamp(2, 150);
        let kill_after_flushes = 1 + rng.below(flushes_max) as usize;
        let jitter_us = rng.below(3000);
        eprintln!(
            "{name} iteration {k}: flush every {flush_every} writes, kill after {kill_after_flushes} \
             flushes + {jitter_us} us"
        );
        let mut client_guard = ClientGuard(start_client(
            &site,
            &log,
            &stop,
            rng.next_u64(),
            flush_every,
            block,
        ));
        let client = &mut client_guard.0;

        let mut client_status = None;
        let reached = poll_until(CLIENT_DEADLINE, || {
            if let Some(s) = client.try_wait().unwrap() {
                client_status = Some(s);
                return true;
            }
            count_flushes(&log) >= kill_after_flushes
        });
        assert!(
            reached && client_status.is_none(),
            "{name}: the client did not reach {kill_after_flushes} flushes (exit {client_status:?}, \
             last log line {:?})\n{}",
            last_line(&log),
            site.logs()
        );
        // A seeded, deliberate delay: it moves the kill to a random point between flushes.
        std::thread::sleep(Duration::from_micros(jitter_us));
        match victim {
            Victim::Appliance => site.kill(Role::Appliance),
            Victim::Splitter => site.kill(Role::Splitter),
            Victim::Both => {
                site.kill(Role::Splitter);
                site.kill(Role::Appliance);
            }
        }
        std::fs::write(&stop, b"").unwrap();

        match victim {
            Victim::Both => {
                let status = wait_child(client, CLIENT_DEADLINE)
                    .expect("client hung after both processes were killed");
                assert!(status.success(), "client failed: {status}");
                site.start_role(Role::Appliance);
                site.start_role(Role::Splitter);
            }
            Victim::Splitter => {
                // The client sees its connection drop (or notices the stop file first).
                let status = wait_child(client, CLIENT_DEADLINE)
                    .expect("client hung after the splitter was killed");
                assert!(status.success(), "client failed: {status}");
                site.start_role(Role::Splitter);
            }
            Victim::Appliance => {
                site.start_role(Role::Appliance);
                // The splitter must keep serving the host through an appliance crash: pending
                // requests complete once the appliance is back at the latest.
                let status = wait_child(client, CLIENT_DEADLINE).unwrap_or_else(|| {
                    panic!(
                        "client hung after the appliance was killed and restarted; last log \
                         line {:?}\n{}",
                        last_line(&log),
                        site.logs()
                    )
                });
                assert!(status.success(), "client failed: {status}");
                let last = last_line(&log);
                assert!(
                    last.starts_with("X "),
                    "the host saw an error while the appliance was down: {last:?}\n{}",
                    site.logs()
                );
            }
        }
        site.assert_alive();
        eprintln!(
            "{name} iteration {k}: client log ends with {:?}",
            last_line(&log)
        );

        let volume = site.volume("vol0").clone();
        verify_crash_log(&log, &volume.production, &baseline, "production", &site);
        site.settle();
        if !reference_mode() {
            verify_crash_log(&log, &volume.replica, &replica_baseline, "replica", &site);
        }
        if convergence == Convergence::Required {
            site.assert_replica_equals_production("vol0");
        }
    }
}

fn requirements() -> bool {
    requires("qemu-img") && requires("qemu-io") && requires_python_libnbd()
}

#[test]
fn crash_appliance_during_writes() {
    // Goal: DESIGN rule 4 for the appliance: SIGKILL at any instant loses no write whose FLUSH or
    // FUA was acknowledged, the journal reopens, and distribution converges. Method: a seeded
    // libnbd client writes and flushes while the appliance is killed at seeded random moments
    // and restarted; production and replica are checked against the client's durable log.
    if !requirements() || reference_mode() {
        return;
    }
    crash_test(Victim::Appliance, 4, Convergence::Required, 4096);
}

#[test]
fn crash_splitter_during_writes() {
    // Goal: DESIGN rule 4 for the splitter: SIGKILL at any instant loses no acknowledged-durable
    // write from production or from the replica. Method: as for the appliance, but the client's
    // connection drops with the kill; the splitter is restarted before the checks.
    if !requirements() {
        return;
    }
    crash_test(Victim::Splitter, 4, Convergence::NotChecked, 4096);
}

#[test]
fn crash_splitter_replica_converges() {
    // Goal: DESIGN rule 2 after a splitter crash: writes that reached production but not the
    // journal when the splitter died (in flight, unacknowledged) must still reach the replica
    // after the restart (resync), so the replica converges to production. Method: the crash
    // workload with 1 MiB writes (a wider window between pwrite and journal), then qemu-img
    // compare of replica and production after distribution caught up.
    if !requirements() {
        return;
    }
    crash_test(Victim::Splitter, 3, Convergence::Required, 1024 * 1024);
}

#[test]
fn crash_both_during_writes() {
    // Goal: rule 4 when splitter and appliance die at the same instant: no acknowledged-durable
    // write is lost from either copy after both restart. Method: the crash workload, SIGKILL
    // to both, restart appliance then splitter, check production and replica against the log.
    if !requirements() || reference_mode() {
        return;
    }
    crash_test(Victim::Both, 3, Convergence::NotChecked, 4096);
}

#[test]
fn crash_appliance_while_idle_keeps_data() {
    // Goal: the journal survives a crash of an idle appliance and distribution resumes. Method:
    // write and flush with qemu-io, SIGKILL the appliance before distribution can be assumed done,
    // restart it, and compare replica and production.
    if !requirements() || reference_mode() {
        return;
    }
    let mut site = Site::start(&[("vol0", 16 * MIB)]);
    let uri = site.nbd_uri("vol0");
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "flush"])
            .arg(&uri),
        Duration::from_secs(60),
    );
    site.kill_appliance();
    site.start_role(Role::Appliance);
    site.settle();
    let mut model = Model::zeroed(16 * MIB);
    model.fill(0, 8 * MIB, 0x5a);
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}
