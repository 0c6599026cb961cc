//! Async replication's recovery point under a sustained write rate: fio writes with verification at a throttled rate while bookmarks are taken; the lag stays under the RPO target and the remote image at every bookmark equals the local one.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::release_image;
use common::replication::wait_shipped;
use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 256 * MIB;
/// The RPO target the lag is held against (`[group.remote] rpo_s`).
const RPO_S: u64 = 5;
/// fio's throttled write rate and how much it writes: about 24 s of writes at that rate.
const RATE_MIB_S: u64 = 20;
const WRITE_MIB: u64 = 480;
/// fio writes at a throttled rate, then reads every block back; both together must finish
/// within this even on a busy machine.
const FIO_DEADLINE: Duration = Duration::from_secs(300);
const BOOKMARK_EVERY: Duration = Duration::from_secs(3);
/// How often the test reads the lag from `cdp status` (the shipper measures it about once a
/// second).
const LAG_SAMPLE_EVERY: Duration = Duration::from_millis(500);
const T: Duration = Duration::from_secs(300);

fn requirements() -> bool {
    !reference_mode() && requires("fio") && requires("qemu-img") && requires("qemu-io")
}

/// Random 64 KiB writes over the whole volume with crc32c verify headers, at `RATE_MIB_S`;
/// blocks are overwritten (no random map), and fio verifies the newest write of each at the
/// end. One write in flight: two overlapping writes in flight at once may land in either
/// order (NBD promises nothing there), which fio's verify would report as corruption.
fn fio_job(uri: &str) -> String {
    format!(
        "[global]
ioengine=nbd
uri={uri}
rw=randwrite
bs=64k
iodepth=1
size={VOLUME_BYTES}
io_size={}
rate={RATE_MIB_S}m
norandommap=1
randrepeat=0
verify=crc32c
verify_fatal=1

[rpo]
",
        WRITE_MIB * MIB
    )
}

/// One reading of `groups[0].remote` from the site's status.
struct LagSample {
    at: Duration,
    lag_ms: f64,
    rpo_exceeded: bool,
    connected: bool,
}

fn sample_lag(site: &Site, started: Instant) -> LagSample {
    let status = site.status();
    let r = &status["groups"][0]["remote"];
    LagSample {
        at: started.elapsed(),
        lag_ms: r["lag_seconds"].as_f64().expect("lag_seconds") * 1000.0,
        rpo_exceeded: r["rpo_exceeded"] == true,
        connected: r["connected"] == true,
    }
}

/// Nearest-rank 99th percentile.
fn p99(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99).div_ceil(100).saturating_sub(1)]
}

/// `qemu-img compare` of two raw sources (files or NBD URIs): true if equal, false if they
/// differ; panics on any other outcome.
fn same_bytes(a: &str, b: &str) -> bool {
    let out = run(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]),
        T,
    );
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {a} {b} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A site shipping to a fresh remote appliance with `rpo_s`, more `[group.remote]` keys and
/// top-level splitter keys, started, its replication link up.
fn start_pair(rpo_s: u64, remote_keys: &str, splitter_keys: &str) -> (Site, RemoteAppliance) {
    let volumes = [("vol0", VOLUME_BYTES)];
    let remote = RemoteAppliance::start(&volumes);
    let mut site = Site::create(&volumes, SiteOptions::default());
    add_remote_to_site_config(&site, &remote.endpoint, rpo_s);
    // `[group.remote]` is the config's last table: appended keys land in it.
    let text = std::fs::read_to_string(&site.appliance_config).unwrap();
    std::fs::write(&site.appliance_config, text + remote_keys).unwrap();
    let text = std::fs::read_to_string(&site.splitter_config).unwrap();
    std::fs::write(&site.splitter_config, format!("{splitter_keys}{text}")).unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);
    let connected = poll_until(T, || {
        site.status()["groups"][0]["remote"]["connected"] == true
    });
    assert!(connected, "link never came up\n{}", remote.logs());
    (site, remote)
}

/// Starts fio on job file text `job` (written into the site as NAME.fio), JSON output to
/// NAME.json; fio's verify state files stay in the site directory.
fn spawn_fio(site: &Site, name: &str, job: &str) -> (std::process::Child, std::path::PathBuf) {
    let job_path = site.root().join(format!("{name}.fio"));
    std::fs::write(&job_path, job).unwrap();
    let out = site.root().join(format!("{name}.json"));
    let fio = Command::new("fio")
        .current_dir(site.root())
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .arg(&job_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    (fio, out)
}

/// fio's first job from its JSON output, after checking that fio (and its verification)
/// succeeded.
fn fio_job_result(
    fio: &mut std::process::Child,
    status: std::process::ExitStatus,
    out: &std::path::Path,
    site: &Site,
) -> serde_json::Value {
    let mut stderr = String::new();
    if let Some(mut e) = fio.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let text = std::fs::read_to_string(out).unwrap_or_default();
    // fio prints non-JSON notes before the JSON document on some errors.
    let result: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio: no JSON ({e}), {status}:\n{text}\n{stderr}"));
    let job = result["jobs"][0].clone();
    assert!(
        status.success() && job["error"] == 0,
        "fio failed (verification?): {status}, error {}\n{stderr}\n{}",
        job["error"],
        site.logs()
    );
    job
}

#[test]
fn async_lag_stays_under_rpo_and_remote_images_equal_local_at_every_bookmark() {
    // Goal: issue 6's RPO evidence. In async mode, at a sustained host write rate, the remote
    // copy's lag stays under the RPO target, and what the remote holds at every bookmark is
    // what the local site holds there. Method: fio writes 64 KiB blocks at 20 MiB/s with
    // crc32c verify headers (fio must exit 0: production reads back what was written);
    // meanwhile a bookmark every 3 s and the lag from `cdp status --json` every 0.5 s. The
    // p99 of the sampled lag during the writes, and status's own `lag_p99_ms`, must be under
    // `rpo_s`. Then, for every bookmark, the local and the remote image are opened (`cdp
    // image access` on each appliance) and compared whole over NBD; finally the remote
    // replica equals production.
    if !requirements() {
        return;
    }
    let (site, remote) = start_pair(RPO_S, "", "");
    let (mut fio, fio_out) = spawn_fio(&site, "rpo", &fio_job(&site.nbd_uri("vol0")));
    let started = Instant::now();
    let expected_write_time = Duration::from_secs(WRITE_MIB / RATE_MIB_S);
    let mut samples = Vec::new();
    let mut bookmarks: Vec<(String, u64)> = Vec::new();
    let mut next_bookmark = started + BOOKMARK_EVERY;
    let fio_status = loop {
        if let Some(status) = fio.try_wait().expect("fio try_wait") {
            break status;
        }
        assert!(
            started.elapsed() < FIO_DEADLINE,
            "fio still running after {FIO_DEADLINE:?}"
        );
        samples.push(sample_lag(&site, started));
        // Bookmarks only while fio writes (it reads back afterwards): each names a new point.
        if Instant::now() >= next_bookmark && started.elapsed() < expected_write_time {
            let name = format!("b{}", bookmarks.len() + 1);
            let b = site.cdp_json(&["bookmark", "create", &name, "--json"]);
            bookmarks.push((name, b["seq"].as_u64().expect("bookmark seq")));
            next_bookmark += BOOKMARK_EVERY;
        }
        std::thread::sleep(LAG_SAMPLE_EVERY);
    };
    let fio_job = fio_job_result(&mut fio, fio_status, &fio_out, &site);

    // The sustained rate: fio's own bytes over its own write time.
    let written = fio_job["write"]["io_bytes"].as_u64().expect("io_bytes");
    let write_ms = fio_job["write"]["runtime"].as_u64().expect("runtime");
    assert_eq!(written, WRITE_MIB * MIB, "fio wrote {written} bytes");
    let rate = written as f64 / MIB as f64 / (write_ms as f64 / 1000.0);
    // Lag samples taken while fio wrote (not while it read back).
    let writing: Vec<&LagSample> = samples
        .iter()
        .filter(|s| s.at <= Duration::from_millis(write_ms))
        .collect();
    assert!(
        writing.len() >= 10,
        "only {} lag samples during the writes",
        writing.len()
    );
    assert!(
        writing.iter().all(|s| s.connected),
        "the link dropped during the run\n{}",
        site.logs()
    );
    let lags: Vec<f64> = writing.iter().map(|s| s.lag_ms).collect();
    let sampled_p99 = p99(&lags);
    let sampled_max = lags.iter().copied().fold(0.0, f64::max);
    let status = site.status();
    let r = &status["groups"][0]["remote"];
    let status_p99 = r["lag_p99_ms"].as_u64().expect("lag_p99_ms");
    let status_max = r["lag_max_ms"].as_u64().expect("lag_max_ms");
    let window_s = r["lag_window_s"].as_u64().expect("lag_window_s");
    eprintln!(
        "async at {rate:.1} MiB/s sustained for {:.1} s ({written} bytes, 64 KiB random writes, \
         target {RATE_MIB_S} MiB/s): lag sampled {} times from status, p99 {sampled_p99:.0} ms, \
         max {sampled_max:.0} ms; status over its last {window_s} s: p99 {status_p99} ms, \
         max {status_max} ms; RPO {RPO_S} s; {} bookmarks",
        write_ms as f64 / 1000.0,
        lags.len(),
        bookmarks.len()
    );
    assert!(
        rate >= RATE_MIB_S as f64 / 2.0,
        "fio sustained only {rate:.1} MiB/s of the {RATE_MIB_S} asked: not the load this test means"
    );
    // The lag is measured, not stuck at zero: records do wait for a journal sync and a batch.
    assert!(
        sampled_max > 0.0 && status_max > 0,
        "the lag never left 0: {status}"
    );
    let rpo_ms = (RPO_S * 1000) as f64;
    assert!(
        sampled_p99 < rpo_ms,
        "sampled lag p99 {sampled_p99:.0} ms is not under the RPO of {RPO_S} s: {lags:?}"
    );
    assert!(
        (status_p99 as f64) < rpo_ms,
        "status lag_p99_ms {status_p99} is not under the RPO of {RPO_S} s: {status}"
    );
    assert!(
        window_s >= write_ms / 1000 / 2,
        "the status window holds only {window_s} per-second samples: {status}"
    );
    assert!(
        samples.iter().all(|s| !s.rpo_exceeded) && r["rpo_exceeded"] == false,
        "rpo_exceeded was set during the run: {status}"
    );

    // Every bookmark: the remote image equals the local image, whole volume.
    assert!(
        bookmarks.len() >= 5,
        "only {} bookmarks were taken",
        bookmarks.len()
    );
    assert!(
        bookmarks.windows(2).all(|w| w[0].1 < w[1].1),
        "bookmarks do not name increasing points: {bookmarks:?}"
    );
    site.flush_all();
    let last = wait_shipped(&site, &remote);
    let compare_started = Instant::now();
    for (name, seq) in &bookmarks {
        let local = site.cdp_json(&["image", "access", "--at", name, "--json"]);
        let at_remote = remote.cdp_json(&["image", "access", "--at", name, "--json"]);
        assert_eq!(local["seq"], *seq, "{local}");
        assert_eq!(at_remote["seq"], *seq, "{at_remote}");
        assert_eq!(
            at_remote["time_ns"], local["time_ns"],
            "{at_remote} {local}"
        );
        let (local_uri, remote_uri) = (
            site.image_uri(&local, "vol0"),
            site.image_uri(&at_remote, "vol0"),
        );
        assert!(
            same_bytes(&local_uri, &remote_uri),
            "bookmark {name} (seq {seq}): the remote image differs from the local one"
        );
        release_image(&local, |a| site.cdp_json(a));
        release_image(&at_remote, |a| remote.cdp_json(a));
    }
    // The images compared do differ from one another: the first bookmark is not the last.
    let first = site.cdp_json(&["image", "access", "--at", &bookmarks[0].0, "--json"]);
    let final_name = &bookmarks[bookmarks.len() - 1].0;
    let final_image = site.cdp_json(&["image", "access", "--at", final_name, "--json"]);
    assert!(
        !same_bytes(
            &site.image_uri(&first, "vol0"),
            &site.image_uri(&final_image, "vol0")
        ),
        "the images at the first and the last bookmark are equal: the comparison shows nothing"
    );
    release_image(&first, |a| site.cdp_json(a));
    release_image(&final_image, |a| site.cdp_json(a));
    eprintln!(
        "{} bookmarks: remote image == local image, {} MiB each, compared in {:.1?}",
        bookmarks.len(),
        VOLUME_BYTES / MIB,
        compare_started.elapsed()
    );

    // And the remote replica converges to production.
    remote.wait_distributed(last, T);
    let production = site.volume("vol0").production.display().to_string();
    let replica = remote.replica("vol0").display().to_string();
    assert!(
        same_bytes(&replica, &production),
        "the remote replica differs from production"
    );
}

/// The throttle test's link: a bandwidth limit well below fio's rate.
const THROTTLE_LINK_BYTES_PER_S: u64 = 2 * MIB;
const THROTTLE_RPO_S: u64 = 2;
const THROTTLE_RPO_BYTES: u64 = 4 * MIB;
/// The splitter's window of unacknowledged changes: how far the host may run ahead of what
/// the appliance acknowledged.
const THROTTLE_SPLITTER_WINDOW: u64 = 8 * MIB;
const THROTTLE_FIO_RATE_MIB_S: u64 = 8;
const THROTTLE_WRITE_MIB: u64 = 48;

#[test]
fn throttle_on_rpo_holds_the_host_to_what_the_link_ships() {
    // Goal: `throttle_on_rpo` keeps an async remote copy within about its RPO when the host
    // writes faster than the link ships, by holding host writes (never an error), and loses
    // nothing. Method: a 2 MiB/s wire limit (no compression, no dedup, incompressible fio
    // buffers), rpo_s = 2 and rpo_bytes = 4 MiB, a splitter window of 8 MiB (how far the host
    // may run ahead of the appliance's acks), fio writes 48 MiB of 64 KiB blocks with crc32c
    // verify at 8 MiB/s.
    // Unthrottled that takes 6 s and leaves the remote ~18 s behind; throttled, fio's write
    // phase must last at least twice that (the host ran at the link's pace), the lag sampled
    // from status must stay under 4 x the RPO, status must have shown `rpo_throttling`, fio
    // must verify, and the remote replica must equal production.
    if !requirements() {
        return;
    }
    let (site, remote) = start_pair(
        THROTTLE_RPO_S,
        &format!(
            "throttle_on_rpo = true\nrpo_bytes = {THROTTLE_RPO_BYTES}\n\
             bandwidth_bytes_per_s = {THROTTLE_LINK_BYTES_PER_S}\ncompress_level = 0\n\
             dedup = false\n"
        ),
        &format!("link_window_bytes = {THROTTLE_SPLITTER_WINDOW}\n"),
    );
    let job = format!(
        "[global]\nioengine=nbd\nuri={}\nrw=randwrite\nbs=64k\niodepth=1\n\
         size={}\nio_size={}\nrate={THROTTLE_FIO_RATE_MIB_S}m\nnorandommap=1\n\
         randrepeat=0\nrefill_buffers=1\nverify=crc32c\nverify_fatal=1\n[throttle]\n",
        site.nbd_uri("vol0"),
        64 * MIB,
        THROTTLE_WRITE_MIB * MIB
    );
    let (mut fio, fio_out) = spawn_fio(&site, "throttle", &job);
    let started = Instant::now();
    let mut lags = Vec::new();
    let mut throttled = false;
    let fio_status = loop {
        if let Some(status) = fio.try_wait().expect("fio try_wait") {
            break status;
        }
        assert!(started.elapsed() < FIO_DEADLINE, "fio still running");
        let status = site.status();
        let r = &status["groups"][0]["remote"];
        lags.push(r["lag_seconds"].as_f64().unwrap_or(0.0));
        throttled |= r["rpo_throttling"] == true;
        std::thread::sleep(LAG_SAMPLE_EVERY);
    };
    let job = fio_job_result(&mut fio, fio_status, &fio_out, &site);
    let write_s = job["write"]["runtime"].as_u64().expect("runtime") as f64 / 1000.0;
    let max_lag = lags.iter().copied().fold(0.0, f64::max);
    let unthrottled_s = (THROTTLE_WRITE_MIB / THROTTLE_FIO_RATE_MIB_S) as f64;
    eprintln!(
        "throttle_on_rpo: fio wrote {THROTTLE_WRITE_MIB} MiB in {write_s:.1} s (unthrottled \
         {unthrottled_s:.0} s, link {} MiB/s); max sampled lag {max_lag:.1} s against RPO \
         {THROTTLE_RPO_S} s ({} samples)",
        THROTTLE_LINK_BYTES_PER_S / MIB,
        lags.len()
    );
    assert!(
        throttled,
        "status never showed rpo_throttling\n{}",
        site.logs()
    );
    assert!(
        write_s >= 2.0 * unthrottled_s,
        "fio's writes took {write_s:.1} s: the host was not held to the link's pace"
    );
    assert!(
        max_lag < (4 * THROTTLE_RPO_S) as f64,
        "the remote copy fell {max_lag:.1} s behind with throttling on: {lags:?}"
    );
    site.flush_all();
    let last = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    let production = site.volume("vol0").production.display().to_string();
    let remote_replica = remote.replica("vol0").display().to_string();
    assert!(
        same_bytes(&production, &remote_replica),
        "the remote replica differs from production"
    );
}
