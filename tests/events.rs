//! The event log and its alerts end to end: a site with a remote copy behind a slow link and
//! a small journal, both processes alerting a webhook served by the test. Writing past the
//! link's rate exceeds the RPO and fills the journal; a SIGKILL of the appliance sends the
//! splitter to marking; its restart resyncs. Every event must reach the webhook exactly once
//! (the first POST is answered 503, so delivery retries) and appear once in `cdp events
//! --json`, in the same order per process, and what was logged before the kill must still be
//! there after the restart.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(90);

/// The event bodies a webhook accepted, in arrival order.
type Accepted = Arc<Mutex<Vec<serde_json::Value>>>;

/// A webhook receiver: answers the first POST 503 and the others 200, and keeps the bodies
/// it accepted (parsed as JSON), in arrival order.
fn start_webhook() -> (String, Accepted, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let (a, r) = (Arc::clone(&accepted), Arc::clone(&refused));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let first = {
                let mut refused = r.lock().unwrap();
                let first = *refused == 0 && a.lock().unwrap().is_empty();
                if first {
                    *refused += 1;
                }
                first
            };
            if first {
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            assert!(request_line.starts_with("POST /hook "), "{request_line}");
            a.lock()
                .unwrap()
                .push(serde_json::from_slice(&body).expect("event JSON"));
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (url, accepted, refused)
}

/// `cdp events --json` of the site: one event per line.
fn events(site: &Site, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = run_ok(
        Command::new(cdp_bin())
            .args(["--json", "events", "--dir"])
            .arg(site.root())
            .args(extra),
        T,
    );
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn classes(events: &[serde_json::Value], role: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["role"] == role)
        .map(|e| e["class"].as_str().unwrap().to_string())
        .collect()
}

fn ids(events: &[serde_json::Value], role: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["role"] == role)
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// Polls `cdp events` until the `role`'s events include `class` after `after` (a class
/// already seen, or none); returns all events then.
fn wait_event(site: &Site, role: &str, class: &str, after: Option<&str>) -> Vec<serde_json::Value> {
    let mut last = Vec::new();
    let ok = poll_until(T, || {
        last = events(site, &[]);
        let c = classes(&last, role);
        let from = after
            .and_then(|a| c.iter().rposition(|x| x == a))
            .map_or(0, |i| i + 1);
        c[from..].iter().any(|x| x == class)
    });
    assert!(
        ok,
        "no {role} event {class} (after {after:?}); events: {:#?}\n{}",
        classes(&last, role),
        site.logs()
    );
    last
}

#[test]
fn events_reach_the_log_and_the_webhook_once_in_order() {
    if reference_mode() || !requires("qemu-io") {
        return;
    }
    let (url, accepted, refused) = start_webhook();
    let volumes = [("vol0", 16 * MIB)];
    let remote = RemoteAppliance::start(&volumes);
    let mut site = Site::create(&volumes, SiteOptions::default());
    site.add_appliance_settings(
        &format!("journal_segment_bytes = {MIB}\n"),
        &format!("journal_capacity_bytes = {}\n", 2 * MIB),
    );
    add_remote_to_site_config(&site, &remote.endpoint, 1);
    let alert = format!("\n[[alert]]\nwebhook = \"{url}\"\ntimeout_ms = 2000\nretries = 5\n");
    let mut text = std::fs::read_to_string(&site.appliance_config).unwrap();
    text += "bandwidth_bytes_per_s = 1048576\ncompress_level = 0\ndedup = false\n";
    text += &alert;
    std::fs::write(&site.appliance_config, text).unwrap();
    let mut text = std::fs::read_to_string(&site.splitter_config).unwrap();
    text += &alert;
    std::fs::write(&site.splitter_config, text).unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);
    wait_event(&site, "appliance", "replication_up", None);
    // `--follow` from here on: it must print every later event as it is recorded.
    let followed_path = site.root().join("followed.jsonl");
    let mut follow = Command::new(cdp_bin())
        .args(["--json", "events", "--follow", "--dir"])
        .arg(site.root())
        .stdout(std::fs::File::create(&followed_path).unwrap())
        .spawn()
        .expect("start cdp events --follow");

    // 8 MiB at once over a 1 MiB/s link: the RPO of 1 s is exceeded and the 2 MiB journal
    // cannot release what the remote copy lacks; both recover once it is shipped.
    // 64 KiB writes, so the shipper's once-a-second lag measure runs between batches.
    let mut writes = Command::new("qemu-io");
    writes.args(["-f", "raw"]);
    for i in 0..128u64 {
        writes.args(["-c", &format!("write -P 5 {} 64k", i * 64 * 1024)]);
    }
    run_ok(writes.args(["-c", "flush"]).arg(site.nbd_uri("vol0")), T);
    wait_event(&site, "appliance", "rpo_exceeded", None);
    wait_event(&site, "appliance", "journal_over_capacity", None);
    wait_event(&site, "appliance", "rpo_recovered", Some("rpo_exceeded"));
    wait_event(
        &site,
        "appliance",
        "journal_within_capacity",
        Some("journal_over_capacity"),
    );

    // The appliance dies: the splitter loses its link and marks the next write.
    site.kill_appliance();
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 6 0 1M", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        T,
    );
    wait_event(&site, "splitter", "link_down", None);
    let before_restart = wait_event(&site, "splitter", "marking_entered", Some("link_down"));

    site.start_role(Role::Appliance);
    wait_event(&site, "splitter", "link_up", Some("marking_entered"));
    wait_event(
        &site,
        "splitter",
        "resync_finished",
        Some("marking_entered"),
    );
    wait_event(&site, "splitter", "marking_left", Some("marking_entered"));
    let after = wait_event(&site, "appliance", "splitter_connected", Some("started"));

    // What was logged before the kill is still there, in the same order.
    for role in ["appliance", "splitter"] {
        let (old, new) = (ids(&before_restart, role), ids(&after, role));
        assert_eq!(
            &new[..old.len()],
            &old[..],
            "{role} events changed across the restart"
        );
    }
    let appliance = classes(&after, "appliance");
    let position = |c: &str| appliance.iter().position(|x| x == c).unwrap();
    assert!(
        position("rpo_exceeded") < position("rpo_recovered"),
        "{appliance:?}"
    );
    assert!(
        position("journal_over_capacity") < position("journal_within_capacity"),
        "{appliance:?}"
    );
    let splitter = classes(&after, "splitter");
    let position = |c: &str| splitter.iter().rposition(|x| x == c).unwrap();
    assert!(
        position("link_down") < position("marking_entered"),
        "{splitter:?}"
    );
    assert!(
        position("marking_entered") < position("link_up"),
        "{splitter:?}"
    );
    assert!(
        position("marking_entered") < position("marking_left"),
        "{splitter:?}"
    );

    // Every logged event reaches the webhook exactly once, in each process's order (the
    // first POST was refused, so its event arrived on a retry).
    let mut last_log = Vec::new();
    let delivered = poll_until(T, || {
        last_log = events(&site, &[]);
        accepted.lock().unwrap().len() >= last_log.len()
    });
    let hooked = accepted.lock().unwrap().clone();
    assert!(
        delivered,
        "webhook got {} of {} events",
        hooked.len(),
        last_log.len()
    );
    assert_eq!(*refused.lock().unwrap(), 1);
    for role in ["appliance", "splitter"] {
        assert_eq!(
            ids(&hooked, role),
            ids(&last_log, role),
            "{role}: webhook and log differ"
        );
    }
    assert_eq!(
        hooked.len(),
        last_log.len(),
        "duplicates at the webhook: {hooked:#?}"
    );
    for e in &last_log {
        let at_hook = hooked.iter().find(|h| h["id"] == e["id"]).unwrap();
        assert_eq!(at_hook, e, "the webhook's body is the logged event");
        assert_eq!(e["site"].as_str().map(str::is_empty), Some(false), "{e}");
    }
    eprintln!(
        "{} events: appliance {:?}; splitter {:?}",
        last_log.len(),
        classes(&last_log, "appliance"),
        classes(&last_log, "splitter")
    );

    let followed_all = poll_until(T, || {
        std::fs::read_to_string(&followed_path)
            .unwrap()
            .lines()
            .count()
            == last_log.len()
    });
    let _ = follow.kill();
    let _ = follow.wait();
    let followed: Vec<serde_json::Value> = std::fs::read_to_string(&followed_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        followed_all,
        "--follow printed {} of {} events",
        followed.len(),
        last_log.len()
    );
    for role in ["appliance", "splitter"] {
        assert_eq!(
            ids(&followed, role),
            ids(&last_log, role),
            "{role}: --follow differs"
        );
    }

    // --since keeps only later events; the table form prints one line per event.
    let middle = &last_log[last_log.len() / 2];
    let since = events(&site, &["--since", middle["time"].as_str().unwrap()]);
    assert!(
        !since.is_empty() && since.len() < last_log.len(),
        "{}",
        since.len()
    );
    let floor_ms = middle["time_ns"].as_u64().unwrap() / 1_000_000 * 1_000_000;
    assert!(since
        .iter()
        .all(|e| e["time_ns"].as_u64().unwrap() >= floor_ms));
    let table = run_ok(
        Command::new(cdp_bin())
            .args(["events", "--dir"])
            .arg(site.root()),
        T,
    );
    assert_eq!(table.lines().count(), last_log.len(), "{table}");
    assert!(table.contains("marking_entered"), "{table}");
}
