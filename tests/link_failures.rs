//! Link failures the processes cannot see directly: a silent partition of the split link
//! (blackhole), a half-open connection, a bookmark taken while a volume is marking, and the
//! splitter's status against the journal's acknowledgement of a resync's end. Real processes,
//! the split link over TCP through `LinkProxy`, qemu-io as the host and a model as the oracle.

mod common;

use common::link_proxy::{site_through_proxy, LinkProxy};
use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The splitter's dirty-bitmap region size (splitter/src/dirty_bitmap.rs).
const REGION: u64 = 64 * 1024;

fn qemu_io(uri: &str, commands: &[String], timeout: Duration) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run_ok(cmd.arg(uri), timeout);
    assert!(!out.contains("failed"), "qemu-io {commands:?}:\n{out}");
    out
}

/// One control request whose answer may be an error (returned, not asserted).
fn control_try(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut line = serde_json::to_vec(request).unwrap();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer ({e}): {answer}"))
}

/// The splitter's state of vol0 in `cdp status --json`.
fn splitter_state(site: &Site) -> String {
    site.status()["splitter"]["volumes"][0]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Writes 4 blocks of 8 KiB in distinct regions (pattern from `base`) and flushes.
fn write_blocks(site: &Site, model: &mut Model, base: u64, timeout: Duration) {
    let mut commands = Vec::new();
    for i in 0..4u64 {
        let offset = (base + 7 * i) * REGION + 512;
        commands.push(format!("write -P {:#x} {offset} 8192", 0x20 + i));
        model.fill(offset, 8192, 0x20 + i as u8);
    }
    commands.push("flush".into());
    qemu_io(&site.nbd_uri("vol0"), &commands, timeout);
}

/// A volume of `size` bytes behind a proxy (link deadline `deadline_ms`) with journaled,
/// flushed writes at region 10, then the link cut and, once the splitter is marking, writes
/// at region `marking_base` that only production and the dirty bitmap hold.
fn marking_after_protected_writes(
    size: u64,
    deadline_ms: u64,
    marking_base: u64,
) -> (Site, LinkProxy, Model) {
    let (site, proxy) = site_through_proxy(&[("vol0", size)], deadline_ms);
    let mut model = Model::zeroed(size);
    write_blocks(&site, &mut model, 10, Duration::from_secs(30));
    site.flush_all();
    proxy.cut();
    assert!(poll_until(Duration::from_secs(10), || splitter_state(
        &site
    ) == "marking"));
    write_blocks(&site, &mut model, marking_base, Duration::from_secs(30));
    (site, proxy, model)
}

#[test]
fn blackhole_host_is_served_within_the_deadline_then_resync_is_exact() {
    // Goal: a split link that stops passing bytes without closing is detected within the
    // deadline: the host's writes complete (mark policy), status shows marking, and after the
    // link heals the replica equals production and the model. Method: deadline 1 s, blackhole
    // the proxy, time a qemu-io write+flush, heal, settle and compare.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let deadline = Duration::from_millis(1000);
    let (site, proxy) = site_through_proxy(&[("vol0", 32 * MIB)], deadline.as_millis() as u64);
    let mut model = Model::zeroed(32 * MIB);
    write_blocks(&site, &mut model, 10, Duration::from_secs(30));
    site.flush_all();

    proxy.blackhole();
    let started = Instant::now();
    write_blocks(&site, &mut model, 100, Duration::from_secs(60));
    let took = started.elapsed();
    // The deadline, a heartbeat's lateness, qemu-io's own start-up and a loaded machine.
    assert!(
        took < deadline * 4 + Duration::from_secs(2),
        "the host waited {took:?} on a silent partition (deadline {deadline:?})\n{}",
        site.logs()
    );
    assert_eq!(splitter_state(&site), "marking", "{}", site.logs());
    assert!(
        poll_until(Duration::from_secs(10), || site.status()["groups"][0]
            ["volumes"][0]["connected"]
            == false),
        "the appliance did not time out the silent splitter\n{}",
        site.logs()
    );
    proxy.heal();
    site.settle();
    assert_eq!(splitter_state(&site), "protecting");
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn half_open_connection_is_replaced_at_once() {
    // Goal: when the splitter's side of the split link is reset but the appliance's stays
    // open, the splitter's reconnect replaces the stale connection at once instead of being
    // refused until the stale socket dies. Method: a 30 s deadline (so only the replacement
    // can be quick), half-open the proxy, require protection back within 10 s, then write,
    // settle and compare with the model.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let (site, proxy) = site_through_proxy(&[("vol0", 32 * MIB)], 30_000);
    let mut model = Model::zeroed(32 * MIB);
    write_blocks(&site, &mut model, 10, Duration::from_secs(30));
    proxy.half_open();
    let started = Instant::now();
    assert!(
        poll_until(Duration::from_secs(20), || site
            .logs()
            .contains("fencing the old one")),
        "the reconnect did not replace the stale connection\n{}",
        site.logs()
    );
    assert!(
        poll_until(Duration::from_secs(10), || splitter_state(&site)
            == "protecting"),
        "{}",
        site.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "protection took {:?}",
        started.elapsed()
    );
    assert!(!site.logs().contains("already has a connected splitter"));
    write_blocks(&site, &mut model, 200, Duration::from_secs(30));
    site.settle();
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn a_splitter_restarted_over_its_stale_connection_is_admitted_once_the_appliance_drops_it() {
    // Goal: a splitter restarted at once after a crash, while the appliance still holds its
    // old connection, asks again until the appliance's deadline drops that connection instead
    // of exiting at the first refusal (a second splitter alive is still refused and exits:
    // tests/recovery.rs). Method: a 5 s deadline; blackhole the proxy, kill -9 the splitter,
    // half-open the proxy (the appliance's side stays open and silent and the held close is
    // never delivered), heal, start a new splitter process: the appliance must refuse it at
    // least once, and it must still become ready; then write, settle and compare.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let (mut site, proxy) = site_through_proxy(&[("vol0", 32 * MIB)], 5000);
    let mut model = Model::zeroed(32 * MIB);
    write_blocks(&site, &mut model, 10, Duration::from_secs(30));
    proxy.blackhole();
    site.kill(Role::Splitter);
    proxy.half_open();
    proxy.heal();
    // Panics if the splitter exits during start-up.
    site.start_role(Role::Splitter);
    assert!(
        site.logs().contains("already has a connected splitter"),
        "the restarted splitter never met its stale connection\n{}",
        site.logs()
    );
    site.wait_connected(Duration::from_secs(60));
    write_blocks(&site, &mut model, 200, Duration::from_secs(30));
    site.settle();
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn bookmark_while_marking_is_refused_and_points_then_are_not_resolvable() {
    // Goal: no false recovery point. While the splitter is marking (link reset, appliance up)
    // a bookmark is refused; a time point from then is refused during and after the resync;
    // `bookmark create --wait` is taken once the resync completes and resolves; the timeline
    // shows the stretch as not recoverable. Method: cut the proxy, write with qemu-io, ask
    // the control socket and the CLI, restore, and check again.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let (site, proxy, model) = marking_after_protected_writes(32 * MIB, 1000, 100);
    let during = cdp_types_now_ns();
    let refused = control_try(
        &site.control_sock,
        &serde_json::json!({"command": "bookmark_create", "name": "during", "consistency": "crash"}),
    );
    let error = refused["error"].as_str().unwrap_or_else(|| {
        panic!(
            "a bookmark was taken while marking: {refused}\n{}",
            site.logs()
        )
    });
    assert!(error.contains("marking"), "{error}");
    let resolve = |point: String| {
        control_try(
            &site.control_sock,
            &serde_json::json!({"command": "point_resolve", "point": point}),
        )
    };
    let at_during = rfc3339(during);
    let answer = resolve(at_during.clone());
    assert!(
        answer.get("error").is_some(),
        "point while marking: {answer}"
    );

    // --wait takes the bookmark once the volume is protecting again.
    let waiter = {
        let mut cmd = Command::new(cdp_bin());
        cmd.args(["bookmark", "create", "--wait", "60", "after"])
            .arg("--control")
            .arg(&site.control_sock);
        std::thread::spawn(move || run(&mut cmd, Duration::from_secs(90)))
    };
    proxy.restore();
    let out = waiter.join().unwrap();
    assert!(
        out.status.success(),
        "bookmark create --wait: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        site.logs()
    );
    site.settle();
    let answer = resolve("after".into());
    assert!(answer.get("error").is_none(), "{answer}");
    let answer = resolve(at_during);
    let error = answer["error"].as_str().unwrap_or_else(|| {
        panic!("a point from the marking time resolves after the resync: {answer}")
    });
    assert!(error.contains("marking"), "{error}");
    let timeline = control_try(
        &site.control_sock,
        &serde_json::json!({"command": "timeline"}),
    );
    let spans = timeline["not_recoverable"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        spans
            .iter()
            .any(|s| s["reason"] == "marking" && s["until_seq"].is_u64()),
        "{timeline}"
    );
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn no_bookmark_is_taken_between_a_marking_splitters_reconnect_and_its_resync_start() {
    // Goal: the reconnect of a splitter that was marking opens no window for a false point.
    // Before the fix, the appliance offered points again at the splitter's claim, and the
    // ResyncStart that makes them refused arrived a round trip later: a bookmark taken in
    // between was accepted and later refused (campaign seed 1796304538651052938, fault 177).
    // Method: marking writes, then a 150 ms one-way delay on the link widens that window to a
    // few hundred ms while bookmarks are asked for back to back until the volume protects.
    // Oracle: every bookmark the appliance accepted resolves once resynced, and the first
    // one's exported image holds every write acknowledged before it (the model).
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let (site, proxy, model) = marking_after_protected_writes(8 * MIB, 2000, 60);
    proxy.delay(Duration::from_millis(150));
    proxy.restore();
    let mut accepted = Vec::new();
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0.. {
        assert!(
            Instant::now() < deadline,
            "not protecting within 60 s\n{}",
            site.logs()
        );
        let name = format!("r{n}");
        let answer = control_try(
            &site.control_sock,
            &serde_json::json!({"command": "bookmark_create", "name": name, "consistency": "crash"}),
        );
        match answer.get("error") {
            None => accepted.push(name),
            Some(_) => refused += 1,
        }
        if accepted.len() >= 3 && splitter_state(&site) == "protecting" {
            break;
        }
    }
    assert!(refused > 0, "the reconnect was never caught refusing");
    site.settle();
    for name in &accepted {
        let answer = control_try(
            &site.control_sock,
            &serde_json::json!({"command": "point_resolve", "point": name}),
        );
        assert!(
            answer.get("error").is_none(),
            "bookmark {name} was accepted but is not a recovery point: {answer}\n{}",
            site.logs()
        );
    }
    let out = site.root().join("first-accepted");
    let mut cmd = Command::new(cdp_bin());
    cmd.args(["image", "export", "--at", &accepted[0], "--to"])
        .arg(&out)
        .arg("--control")
        .arg(&site.control_sock);
    let result = run(&mut cmd, Duration::from_secs(60));
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    // One volume exports to the file itself; several to a directory of VOLUME.img.
    let image = if out.is_dir() {
        out.join("vol0.img")
    } else {
        out
    };
    model.check_file(&format!("image at {}", accepted[0]), &image);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn status_says_protecting_only_once_resync_end_is_journaled() {
    // Goal: `protecting` means the journal holds the resync's end, not that it was queued.
    // Method: a slow link (300 ms each way), a cut and writes, then after the restore poll the
    // splitter's state; the first time it says protecting, the appliance's timeline must show
    // no open resync span.
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let (site, proxy) = site_through_proxy(&[("vol0", 32 * MIB)], 5000);
    let mut model = Model::zeroed(32 * MIB);
    proxy.cut();
    assert!(poll_until(Duration::from_secs(10), || splitter_state(
        &site
    ) == "marking"));
    write_blocks(&site, &mut model, 100, Duration::from_secs(30));
    proxy.delay(Duration::from_millis(300));
    proxy.restore();
    assert!(
        poll_until(Duration::from_secs(60), || splitter_state(&site)
            == "protecting"),
        "{}",
        site.logs()
    );
    let timeline = control_try(
        &site.control_sock,
        &serde_json::json!({"command": "timeline"}),
    );
    let open: Vec<_> = timeline["not_recoverable"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["until_seq"].is_null())
        .collect();
    assert!(
        open.is_empty(),
        "status said protecting while the journal's span is open: {open:?}"
    );
    proxy.delay(Duration::ZERO);
    site.settle();
    model.check_file("replica", &site.volume("vol0").replica);
}

/// `ns` since the Unix epoch as an RFC 3339 UTC time with ms (what `cdp point` parses).
fn rfc3339(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ns % 1_000_000_000 / 1_000_000
    )
}

fn cdp_types_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
