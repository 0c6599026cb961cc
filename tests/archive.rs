//! The appliance's archiver end to end against a real Garage: `[group.archive]` uploads each
//! sealed segment while the host writes through qemu-io, `cdp status` shows the lag fall to
//! 0, and `cdp archive restore` from the bucket alone (the appliance's data directory
//! deleted) equals the model at bookmarks, at times and at the end. The retention guard:
//! with the store down nothing unarchived is released and the host is not held; once it is
//! back the archive catches up and retention releases; `release_unarchived = true` releases.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::garage::{garage_bin, Garage};
use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 16 * MIB;
const LAG_DEADLINE: Duration = Duration::from_secs(90);

/// Writes `len` seeded bytes at `offset` through the splitter (qemu-io, then FLUSH) and
/// into the model.
fn write(site: &Site, model: &mut Model, seed: u64, offset: u64, len: usize) {
    let data = pattern(seed, len);
    let src = site.root().join(format!("src-{seed}"));
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -s {} {offset} {len}", src.display()))
            .args(["-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(60),
    );
    std::fs::remove_file(&src).unwrap();
    model.write(offset, &data);
}

fn zero(site: &Site, model: &mut Model, offset: u64, len: u64) {
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -z {offset} {len}"))
            .args(["-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(60),
    );
    model.fill(offset, len, 0);
}

fn group_status(site: &Site) -> serde_json::Value {
    site.status()["groups"][0].clone()
}

/// Polls `cdp status` until the archive holds every durable record (lag 0).
fn wait_archived(site: &Site) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = poll_until(LAG_DEADLINE, || {
        last = group_status(site);
        let a = &last["archive"];
        a["archived_known"] == true
            && a["lag_records"] == 0
            && a["lag_seconds"].as_f64() == Some(0.0)
            && a["archived_seq"].as_u64() == last["durable_seq"].as_u64()
    });
    assert!(
        ok,
        "archive lag did not reach 0 within {LAG_DEADLINE:?}: {last:#}\n{}",
        site.logs()
    );
    last
}

fn archive_cmd(garage: &Garage, args: &[&str]) -> Command {
    let mut c = Command::new(cdp_bin());
    c.arg("archive").args(args);
    garage.env(&mut c);
    c
}

/// The body of `GET path` from `addr`.
fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(answer)
}

/// RFC 3339 with nanoseconds, so the restore names an exact instant.
fn rfc3339_ns(ns: u64) -> String {
    let out = run_ok(
        Command::new("date")
            .args(["-u", "-d"])
            .arg(format!("@{}", ns / 1_000_000_000))
            .arg("+%Y-%m-%dT%H:%M:%S"),
        Duration::from_secs(10),
    );
    format!("{}.{:09}Z", out.trim(), ns % 1_000_000_000)
}

fn restore_and_check(garage: &Garage, url: &str, at: &str, to: &Path, want: &Model) {
    let mut restore = archive_cmd(
        garage,
        &["restore", url, "--group", "default", "--at", at, "--to"],
    );
    run_ok(restore.arg(to), Duration::from_secs(120));
    want.check_file(&format!("restored at {at}"), to);
    std::fs::remove_file(to).unwrap();
}

#[test]
fn appliance_archives_as_it_seals_and_restores_from_garage_alone() {
    // Goal: the appliance's own archiver keeps the archive current while the host writes,
    // and the bucket alone rebuilds the volume at any archived point. Method: a real Garage,
    // an appliance with `[group.archive]` (1 MiB segments, seal_after_s = 1), seeded writes
    // and zeroes through qemu-io with three bookmarks between them; poll `cdp status` until
    // the archive lag is 0 (and check the metric), stop everything, delete the appliance's
    // data directory, verify the bucket, restore at the bookmarks, at two times and at the
    // end; each equals the model snapshot taken there.
    let Some(bin) = garage_bin() else { return };
    if !requires("qemu-io") {
        return;
    }
    let seed = seed("appliance_archives_as_it_seals_and_restores_from_garage_alone");
    let mut site = Site::create(&[("vol0", VOLUME_BYTES)], SiteOptions::default());
    let garage = Garage::start(bin, &site.root().join("garage"));
    let metrics = format!("127.0.0.1:{}", free_port());
    site.add_appliance_settings(
        &format!("journal_segment_bytes = 1048576\nmetrics_listen = \"{metrics}\"\n"),
        &garage.archive_table("cdp", "seal_after_s = 1, backoff_ms = 100"),
    );
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(Duration::from_secs(30));

    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed);
    let mut snapshots: Vec<(String, u64, Model)> = Vec::new();
    for round in 0..3u64 {
        for i in 0..6u64 {
            let len = (64 + rng.below(4) * 64) as usize * 1024;
            let offset = rng.below((VOLUME_BYTES - len as u64) / 4096) * 4096;
            if i == 5 {
                zero(&site, &mut model, offset, len as u64);
            } else {
                write(&site, &mut model, seed ^ (round * 100 + i), offset, len);
            }
        }
        let name = format!("b{}", round + 1);
        let b = site.cdp_json(&["bookmark", "create", &name, "--json"]);
        let ns = b["timestamp_ns"].as_u64().expect("bookmark time");
        snapshots.push((name, ns, model.clone()));
    }
    write(&site, &mut model, seed ^ 999, 0, 512 * 1024);
    let status = wait_archived(&site);
    let a = &status["archive"];
    assert!(a["uploaded_segments"].as_u64() >= Some(3), "{a}");
    assert!(a["last_error"].is_null(), "{a}");
    let text = run_ok(&mut site.cdp(&["status"]), Duration::from_secs(30));
    assert!(text.contains("archive s3://archive/cdp"), "{text}");
    // The metrics are sampled once a second: the sample after the lag fell shows 0.
    let mut scraped = String::new();
    let metric_zero = poll_until(Duration::from_secs(10), || {
        scraped = http_get(&metrics, "/metrics");
        scraped.lines().any(|l| {
            l.starts_with("cdp_archive_lag_seconds{")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(0.0)
        })
    });
    assert!(metric_zero, "no cdp_archive_lag_seconds 0 in:\n{scraped}");

    // Only the bucket is left.
    site.terminate(Role::Splitter, Duration::from_secs(30));
    site.terminate(Role::Appliance, Duration::from_secs(30));
    std::fs::remove_dir_all(site.root().join("appliance")).unwrap();
    let url = "s3://archive/cdp";
    let verified = run_ok(
        &mut archive_cmd(&garage, &["verify", url, "--json"]),
        Duration::from_secs(120),
    );
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(verified["problems"], serde_json::json!([]), "{verified}");
    let out = site.root().join("restored.img");
    for (name, _, want) in &snapshots {
        restore_and_check(&garage, url, name, &out, want);
    }
    // Two times: each bookmark's instant holds every write before it and none after.
    for (_, ns, want) in snapshots.iter().take(2) {
        restore_and_check(&garage, url, &rfc3339_ns(*ns), &out, want);
    }
    restore_and_check(&garage, url, "latest", &out, &model);
}

/// Writes `count` chunks of 512 KiB through qemu-io, each followed by FLUSH, checking the
/// host is never held: each write with its flush returns within `host_deadline`.
fn write_chunks(site: &Site, model: &mut Model, seed: u64, first: u64, count: u64) {
    for i in first..first + count {
        let started = std::time::Instant::now();
        write(site, model, seed ^ (1000 + i), i * 512 * 1024, 512 * 1024);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a host write took {:?} with the archive behind",
            started.elapsed()
        );
    }
}

fn archive_settings(segment_capacity: &str) -> String {
    format!("journal_segment_bytes = 1048576\n{segment_capacity}")
}

#[test]
fn retention_keeps_what_the_archive_lacks_until_the_store_is_back() {
    // Goal: local retention never releases journal history the archive has not confirmed,
    // the host is not held meanwhile, and once the store is back the archive catches up and
    // retention releases. Method: a Garage set up and then killed; an appliance with a 2 MiB
    // journal capacity (1 MiB segments) archiving to it; 6 MiB of qemu-io writes. The oracle:
    // status (first_seq stays 1, the journal over capacity, the archive failing and behind),
    // the log's retention-held line; then Garage restarted: lag 0, first_seq > 1, and the
    // bucket alone restores the model.
    let Some(bin) = garage_bin() else { return };
    if !requires("qemu-io") {
        return;
    }
    let seed = seed("retention_keeps_what_the_archive_lacks_until_the_store_is_back");
    let mut site = Site::create(&[("vol0", VOLUME_BYTES)], SiteOptions::default());
    let mut garage = Garage::start(bin, &site.root().join("garage"));
    garage.kill();
    site.add_appliance_settings(
        &archive_settings(""),
        &format!(
            "journal_capacity_bytes = 2097152\n{}",
            garage.archive_table("guard", "seal_after_s = 1, backoff_ms = 100, retries = 1")
        ),
    );
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(Duration::from_secs(30));
    let mut model = Model::zeroed(VOLUME_BYTES);
    write_chunks(&site, &mut model, seed, 0, 12);
    site.wait_distributed(DISTRIBUTED_DEADLINE);
    // A retention pass ran and was held by the archive (logged once per episode).
    let held = poll_until(LAG_DEADLINE, || {
        site.logs()
            .contains("the archive has not confirmed its oldest history")
    });
    assert!(
        held,
        "no retention pass held for the archive:\n{}",
        site.logs()
    );
    let g = group_status(&site);
    assert_eq!(g["first_seq"], 1, "history released unarchived: {g:#}");
    assert!(
        g["journal_bytes"].as_u64() > Some(2 * MIB),
        "the journal must be over its capacity: {g:#}"
    );
    // The first pass fails once its retries are spent.
    let mut g = serde_json::Value::Null;
    let failing = poll_until(LAG_DEADLINE, || {
        g = group_status(&site);
        g["archive"]["last_error"].is_string()
    });
    assert!(failing, "the store is down but no pass failed: {g:#}");
    let a = &g["archive"];
    assert!(a["lag_segments"].as_u64() >= Some(4), "{a}");
    assert!(a["lag_seconds"].as_f64() > Some(0.0), "{a}");

    garage.start_server();
    wait_archived(&site);
    // Retention runs at least once a second after distribution: it may release now.
    let released = poll_until(LAG_DEADLINE, || {
        g = group_status(&site);
        g["first_seq"].as_u64() > Some(1) && g["journal_bytes"].as_u64() <= Some(2 * MIB)
    });
    assert!(released, "retention did not release once archived: {g:#}");
    site.terminate(Role::Splitter, Duration::from_secs(30));
    site.terminate(Role::Appliance, Duration::from_secs(30));
    std::fs::remove_dir_all(site.root().join("appliance")).unwrap();
    let out = site.root().join("restored.img");
    restore_and_check(&garage, "s3://archive/guard", "latest", &out, &model);
}

#[test]
fn release_unarchived_lets_retention_go_ahead() {
    // Goal: `release_unarchived = true` lifts the guard. Method: an archive whose store never
    // answers (a closed port), a 2 MiB journal capacity, 6 MiB of writes; the oracle is
    // status: first_seq moves past 1 and the journal is back within capacity while the
    // archive reports its error.
    if !requires("qemu-io") {
        return;
    }
    let seed = seed("release_unarchived_lets_retention_go_ahead");
    let mut site = Site::create(&[("vol0", VOLUME_BYTES)], SiteOptions::default());
    site.add_appliance_settings(
        &archive_settings(""),
        &format!(
            "journal_capacity_bytes = 2097152\narchive = {{ url = \"s3://none/x\", endpoint = \"http://127.0.0.1:{}\", region = \"r\", access_key_id = \"k\", secret_access_key = \"s\", retries = 0, release_unarchived = true }}\n",
            free_port()
        ),
    );
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(Duration::from_secs(30));
    let mut model = Model::zeroed(VOLUME_BYTES);
    write_chunks(&site, &mut model, seed, 0, 12);
    site.wait_distributed(DISTRIBUTED_DEADLINE);
    let mut g = serde_json::Value::Null;
    let released = poll_until(LAG_DEADLINE, || {
        g = group_status(&site);
        g["first_seq"].as_u64() > Some(1)
            && g["journal_bytes"].as_u64() <= Some(2 * MIB)
            && g["archive"]["last_error"].is_string()
    });
    assert!(released, "retention held with release_unarchived: {g:#}");
    assert_eq!(g["archive"]["release_unarchived"], true);
    site.assert_replica_equals_production("vol0");
}
