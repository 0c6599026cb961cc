//! Prometheus metrics end to end: a real Prometheus server (Debian's `prometheus`) started by
//! the test scrapes the appliance and the splitter on loopback every second while fio writes
//! through a protected volume with a remote copy. PromQL answers over its HTTP API must match
//! what fio wrote and what `cdp status --json` says (write bytes and rate, journal bytes and
//! seqs, replication lag, marking after the appliance is killed), and every exposed series
//! must pass `promtool check metrics`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);
/// fio's throttled rate and volume: 8 s of writes.
const FIO_RATE: u64 = 4 * MIB;
const FIO_BYTES: u64 = 32 * MIB;

/// `GET path` from `addr`; the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(T)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head from {addr}{path}: {answer}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line from {addr}: {head}"));
    (status, body.to_string())
}

fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A Prometheus server scraping the given targets every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, String)]) -> Prometheus {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, target) in targets {
            config += &format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            );
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, addr };
        let ready = poll_until(T, || {
            TcpStream::connect(&prometheus.addr).is_ok()
                && http_get(&prometheus.addr, "/-/ready").0 == 200
        });
        assert!(ready, "prometheus not ready: {}", prometheus.log(dir));
        prometheus
    }

    fn log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query's result: each series' labels and value.
    fn query_at(&self, promql: &str, at: Option<f64>) -> Vec<(serde_json::Value, f64)> {
        let mut path = format!("/api/v1/query?query={}", url_encoded(promql));
        if let Some(at) = at {
            path += &format!("&time={at:.3}");
        }
        let (status, body) = http_get(&self.addr, &path);
        assert_eq!(status, 200, "query {promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "query {promql}: {body}");
        v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("query {promql}: no vector result: {body}"))
            .iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("query {promql}: bad value in {series}"));
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that must give exactly one series, or `None` while it gives none.
    fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query_at(promql, None);
        assert!(
            result.len() <= 1,
            "query {promql}: several series: {result:?}"
        );
        result.first().map(|(_, v)| *v)
    }

    /// Polls until `promql` has the value `want` (Prometheus scrapes every second and each
    /// process samples every second, so a change shows within a few seconds).
    fn wait_value(&self, promql: &str, want: f64) {
        let mut last = None;
        let ok = poll_until(T, || {
            last = self.value(promql);
            last == Some(want)
        });
        assert!(ok, "{promql}: want {want}, Prometheus says {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cdp status --json`, also while the appliance is down (the splitter's part is printed
/// and the exit status is 5).
fn status_any(site: &Site) -> serde_json::Value {
    let out = run(
        Command::new(cdp_bin())
            .args(["--json", "status", "--control"])
            .arg(&site.control_sock)
            .arg("--splitter-control")
            .arg(site.splitter_control()),
        T,
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cdp status --json printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `promtool check metrics` on what `addr` serves at /metrics: no error and no lint problem.
fn assert_promtool_clean(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{addr}/metrics: {body}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {addr}: {}\n{said}\n{body}",
        out.status
    );
    body
}

/// Every `cdp_*` name in `expr`, without histogram suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("cdp_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            names.push(expr[start..end].trim_end_matches("_bucket").to_string());
        }
        i = end;
    }
    names
}

/// contrib/: the alert rules pass `promtool check rules` and their unit tests, and every
/// query of the Grafana dashboard and of the rules names only series the processes expose;
/// each dashboard query runs on the live Prometheus and returns data.
fn check_contrib(prom: &Prometheus, exposed: &str) {
    assert_eq!(
        metric_names("rate(cdp_a_bucket{x=\"y\"}[1m]) / cdp_b"),
        ["cdp_a", "cdp_b"]
    );
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let rules = contrib.join("prometheus/cdp-alerts.yml");
    run_ok(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
        T,
    );
    run_ok(
        Command::new("promtool")
            .args(["test", "rules", "cdp-alerts.test.yml"])
            .current_dir(contrib.join("prometheus")),
        T,
    );
    let exists = |name: &str| {
        exposed.contains(&format!("# TYPE {name} "))
            || exposed.contains(&format!("\n{name}{{"))
            || exposed.contains(&format!("\n{name} "))
    };
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    for line in rules_text
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        for name in metric_names(line) {
            assert!(
                exists(&name),
                "cdp-alerts.yml uses {name}, which no process exposes"
            );
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(contrib.join("grafana/cdp-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                assert!(
                    exists(&name),
                    "dashboard panel {} uses {name}, which no process exposes",
                    panel["title"]
                );
            }
            let live = expr
                .replace("$site", ".*")
                .replace("$group", ".*")
                .replace("$volume", ".*");
            let result = prom.query_at(&live, None);
            assert!(
                !result.is_empty(),
                "dashboard panel {}: {live} returned nothing",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} dashboard queries");
}

#[test]
fn prometheus_scrapes_both_processes_and_matches_status() {
    if reference_mode()
        || !(requires("prometheus")
            && requires("promtool")
            && requires("fio")
            && requires("qemu-io"))
    {
        return;
    }
    let volumes = [("vol0", 64 * MIB)];
    let remote = RemoteAppliance::start(&volumes);
    let mut site = Site::create(&volumes, SiteOptions::default());
    add_remote_to_site_config(&site, &remote.endpoint, 30);
    let appliance_metrics = format!("127.0.0.1:{}", free_port());
    let splitter_metrics = format!("127.0.0.1:{}", free_port());
    site.add_appliance_settings(
        &format!("metrics_listen = \"{appliance_metrics}\"\nsite = \"site-a\"\n"),
        "",
    );
    let splitter_toml = std::fs::read_to_string(&site.splitter_config).unwrap();
    std::fs::write(
        &site.splitter_config,
        format!("metrics_listen = \"{splitter_metrics}\"\nsite = \"site-a\"\n{splitter_toml}"),
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);

    let prom = Prometheus::start(
        site.root(),
        &[
            ("appliance", appliance_metrics.clone()),
            ("splitter", splitter_metrics.clone()),
        ],
    );
    prom.wait_value("sum(up)", 2.0);
    prom.wait_value(
        "cdp_build_info{job=\"appliance\",role=\"appliance\",site=\"site-a\"}",
        1.0,
    );
    prom.wait_value(
        "cdp_build_info{job=\"splitter\",role=\"splitter\",site=\"site-a\"}",
        1.0,
    );

    // fio at a throttled rate, so the rate Prometheus computes has a known value.
    let job = format!(
        "[global]\nioengine=nbd\nuri={}\nrw=write\nbs=64k\nsize={FIO_BYTES}\nrate={FIO_RATE}\nend_fsync=1\n[metered]\n",
        site.nbd_uri("vol0")
    );
    let job_path = site.root().join("metered.fio");
    std::fs::write(&job_path, job).unwrap();
    let fio_start = unix_now();
    let out = run(
        Command::new("fio")
            .current_dir(site.root())
            .arg("--output-format=json")
            .arg(&job_path),
        Duration::from_secs(120),
    );
    let fio_end = unix_now();
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let fio: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio JSON: {e}\n{text}"));
    let written = fio["jobs"][0]["write"]["io_bytes"]
        .as_u64()
        .expect("io_bytes");
    assert_eq!(written, FIO_BYTES, "fio wrote {written} bytes");

    // The rate over the middle of the run, from the splitter's byte counter.
    let middle = (fio_start + fio_end) / 2.0;
    let rate = prom.query_at(
        "rate(cdp_host_write_bytes_total{volume=\"vol0\"}[4s])",
        Some(middle),
    );
    assert_eq!(rate.len(), 1, "rate: {rate:?}");
    let rate = rate[0].1;
    eprintln!(
        "fio {:.1} s; Prometheus write rate at mid-run {:.2} MiB/s (fio asked {} MiB/s)",
        fio_end - fio_start,
        rate / MIB as f64,
        FIO_RATE / MIB
    );
    assert!(
        rate > FIO_RATE as f64 * 0.6 && rate < FIO_RATE as f64 * 1.4,
        "write rate {rate} B/s, fio wrote at {FIO_RATE} B/s"
    );
    let write_p = prom.value(
        "histogram_quantile(0.5, rate(cdp_host_write_duration_seconds_bucket{volume=\"vol0\"}[30s]))",
    );
    assert!(
        write_p.is_some_and(|s| s > 0.0 && s < 1.0),
        "write latency median {write_p:?}"
    );

    site.settle();
    let caught_up = poll_until(T, || {
        site.status()["groups"][0]["remote"]["lag_records"].as_u64() == Some(0)
    });
    assert!(caught_up, "remote copy did not catch up: {}", site.status());

    // Everything is still now: the last scrape must equal status exactly.
    prom.wait_value(
        "cdp_host_write_bytes_total{volume=\"vol0\"}",
        written as f64,
    );
    prom.wait_value(
        "cdp_host_writes_total{volume=\"vol0\"}",
        (written / (64 * 1024)) as f64,
    );
    let status = site.status();
    let g = &status["groups"][0];
    let n =
        |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a number: {v}")) as f64;
    assert_eq!(n(&g["journal_write_logical_bytes"]), written as f64, "{g}");
    let group = "{group=\"default\",site=\"site-a\"}";
    prom.wait_value(
        &format!("cdp_journal_write_logical_bytes_total{group}"),
        n(&g["journal_write_logical_bytes"]),
    );
    prom.wait_value(&format!("cdp_journal_bytes{group}"), n(&g["journal_bytes"]));
    prom.wait_value(&format!("cdp_journal_last_seq{group}"), n(&g["last_seq"]));
    prom.wait_value(
        &format!("cdp_journal_durable_seq{group}"),
        n(&g["durable_seq"]),
    );
    prom.wait_value(
        &format!("cdp_journal_distributed_seq{group}"),
        n(&g["distributed_seq"]),
    );
    prom.wait_value(
        &format!("cdp_journal_capacity_bytes{group}"),
        n(&g["journal_capacity_bytes"]),
    );
    prom.wait_value(&format!("cdp_distribution_lag_records{group}"), 0.0);
    prom.wait_value(&format!("cdp_distribution_lag_seconds{group}"), 0.0);
    prom.wait_value(&format!("cdp_undo_bytes{group}"), n(&g["undo_bytes"]));
    let remote_copy = &g["remote"];
    let peer = format!("{{group=\"default\",peer=\"{}\"}}", remote.endpoint);
    prom.wait_value(&format!("cdp_replication_connected{peer}"), 1.0);
    prom.wait_value(
        &format!("cdp_replication_lag_records{peer}"),
        n(&remote_copy["lag_records"]),
    );
    prom.wait_value(
        &format!("cdp_replication_shipped_seq{peer}"),
        n(&g["last_seq"]),
    );
    prom.wait_value(
        &format!("cdp_replication_lag_seconds{peer}"),
        remote_copy["lag_seconds"].as_f64().unwrap(),
    );
    prom.wait_value(&format!("cdp_replication_rpo_exceeded{peer}"), 0.0);
    let wire = site.status()["groups"][0]["remote"].clone();
    prom.wait_value(
        &format!("cdp_replication_raw_bytes_total{peer}"),
        n(&wire["wire_raw_bytes"]),
    );
    prom.wait_value(
        &format!("cdp_replication_wire_bytes_total{peer}"),
        n(&wire["wire_bytes"]),
    );
    prom.wait_value(
        "cdp_split_link_state{volume=\"vol0\",state=\"protecting\"}",
        1.0,
    );
    let lag_p99 = prom.value(&format!(
        "max_over_time(cdp_replication_lag_p99_seconds{peer}[1m])"
    ));
    eprintln!("replication lag p99 over the run, as scraped: {lag_p99:?} s");

    // Every series either process exposes is valid and lint-clean.
    let appliance_text = assert_promtool_clean(&appliance_metrics);
    let splitter_text = assert_promtool_clean(&splitter_metrics);
    eprintln!(
        "appliance exposes {} lines, splitter {}",
        appliance_text.lines().count(),
        splitter_text.lines().count()
    );

    check_contrib(&prom, &format!("{appliance_text}{splitter_text}"));

    // The appliance dies: the splitter marks, and says so to Prometheus and to status alike.
    site.kill_appliance();
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 7 0 1M", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        T,
    );
    prom.wait_value("up{job=\"appliance\"}", 0.0);
    prom.wait_value(
        "cdp_split_link_state{volume=\"vol0\",state=\"marking\"}",
        1.0,
    );
    prom.wait_value("cdp_marking{volume=\"vol0\"}", 1.0);
    let splitter_volume = status_any(&site)["splitter"]["volumes"][0].clone();
    assert_eq!(splitter_volume["state"], "marking", "{splitter_volume}");
    assert!(
        n(&splitter_volume["dirty_bytes"]) >= MIB as f64,
        "{splitter_volume}"
    );
    prom.wait_value(
        "cdp_marking_dirty_bytes{volume=\"vol0\"}",
        n(&splitter_volume["dirty_bytes"]),
    );

    // Back: the resync empties the dirty regions and protection resumes.
    site.start_role(Role::Appliance);
    prom.wait_value(
        "cdp_split_link_state{volume=\"vol0\",state=\"protecting\"}",
        1.0,
    );
    prom.wait_value("cdp_marking_dirty_bytes{volume=\"vol0\"}", 0.0);
    prom.wait_value("sum(up)", 2.0);
    let started = Instant::now();
    site.settle();
    site.assert_replica_equals_production("vol0");
    eprintln!("resynced and settled in {:?}", started.elapsed());
}
