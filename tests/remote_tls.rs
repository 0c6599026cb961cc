//! Replication link security end to end: mutual TLS between real appliances with certificates made by `cdp tls`; peers that fail authentication are refused, logged and retried; host bytes never cross the wire in the clear.
//!
//! Each test starts a site (appliance + splitter) shipping group `default` to a remote
//! appliance on loopback TCP, writes through NBD with qemu-io or nbdsh, and checks the
//! remote replica and journal against the writes (a `Model`) or the local journal.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_journal::{Journal, JournalConfig, Record};
use cdp_types::Seq;
use common::replication::{wait_shipped, write_random_patterns};
use common::*;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);
const VOLUME_BYTES: u64 = 16 * MIB;

fn requirements() -> bool {
    !reference_mode() && requires("qemu-io")
}

/// Waits until the site's status shows a replication `last_error` containing `needle`.
fn wait_last_error(site: &Site, needle: &str) -> String {
    let mut status = serde_json::Value::Null;
    let seen = poll_until(T, || {
        status = site.status();
        status["groups"][0]["remote"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(needle))
    });
    assert!(
        seen,
        "no last_error containing {needle:?}: {status}\n{}",
        site.logs()
    );
    assert_eq!(
        status["groups"][0]["remote"]["connected"], false,
        "{status}"
    );
    status["groups"][0]["remote"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until the remote's log has a line containing every one of `needles`; returns it.
fn wait_remote_log_line(remote: &RemoteAppliance, needles: &[&str]) -> String {
    let mut found = String::new();
    let seen = poll_until(T, || {
        let log = std::fs::read_to_string(remote.log_path()).unwrap_or_default();
        match log
            .lines()
            .find(|line| needles.iter().all(|n| line.contains(n)))
        {
            Some(line) => {
                found = line.to_string();
                true
            }
            None => false,
        }
    });
    assert!(
        seen,
        "no remote log line with {needles:?}\n{}",
        remote.logs()
    );
    found
}

fn read_journal(group_dir: &Path) -> Vec<Record> {
    let (group_id, _) = common::journals::volume_ids(group_dir);
    let (journal, _) = Journal::open(
        &group_dir.join("journal"),
        group_id,
        JournalConfig::default(),
    )
    .unwrap();
    journal
        .read_from(Seq(1))
        .unwrap()
        .map(|r| r.expect("readable record"))
        .collect()
}

/// Stops both sites, then checks the remote journal holds the local journal's `last`
/// records seq by seq (same time, kind, range, source seq and payload).
fn stop_and_assert_same_journals(site: &mut Site, remote: &mut RemoteAppliance, last: u64) {
    site.kill(Role::Splitter);
    site.kill_appliance();
    remote.kill();
    let local = read_journal(&site.root().join("appliance").join("groups").join("default"));
    let copy = read_journal(&remote.group_dir());
    assert_eq!(local.len() as u64, last, "local record count");
    assert_eq!(copy.len(), local.len(), "remote record count");
    for (a, b) in local.iter().zip(&copy) {
        assert_eq!(
            (a.seq, a.timestamp, a.kind, a.source_seq, a.offset, a.length),
            (b.seq, b.timestamp, b.kind, b.source_seq, b.offset, b.length),
            "record {}",
            a.seq
        );
        assert_eq!(a.payload, b.payload, "payload of seq {}", a.seq);
    }
}

/// The remote group's `last_seq` (records in its journal) by `cdp status`.
fn remote_last_seq(remote: &RemoteAppliance) -> u64 {
    remote.status()["groups"][0]["last_seq"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A remote appliance and a site (not started) whose `[group.remote]` carries
/// `security_lines` and `remote_keys`, shipping to `endpoint` (default: the remote).
fn create_pair(
    remote_security: LinkSecurity,
    security_lines: &str,
    endpoint: Option<String>,
) -> (Site, RemoteAppliance) {
    let volumes = [("vol0", VOLUME_BYTES)];
    let remote = RemoteAppliance::start_with(&volumes, remote_security);
    let site = Site::create(&volumes, SiteOptions::default());
    let endpoint = endpoint.unwrap_or_else(|| remote.endpoint.clone());
    add_remote_to_site_config_with(&site, &endpoint, 30, security_lines);
    (site, remote)
}

fn start_site(site: &mut Site) {
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);
}

#[test]
fn tls_link_ships_and_the_remote_copy_matches() {
    // Goal: with mutual TLS (certificates from `cdp tls ca` / `cdp tls issue`) shipping works
    // end to end. Method: random writes through the splitter; the remote replica must equal
    // the model of the writes and production, and after stopping both, the remote journal
    // must hold every local record, payload included.
    if !requirements() {
        return;
    }
    let tls = format!("tls = {}\n", tls_table(&test_pki().source));
    let (mut site, mut remote) = create_pair(LinkSecurity::Tls, &tls, None);
    start_site(&mut site);
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_tls_ships"));
    write_random_patterns(&site, &mut model, &mut rng, 40, 64);
    site.settle();
    let last = wait_shipped(&site, &remote);
    let status = site.status();
    assert!(
        status["groups"][0]["remote"]["last_error"].is_null(),
        "{status}"
    );
    assert_eq!(status["groups"][0]["remote"]["tls"], true, "{status}");
    wait_remote_log_line(&remote, &["replication source connected"]);
    remote.wait_distributed(last, T);
    model.check_file("remote replica", remote.replica("vol0"));
    model.check_file("production", &site.volume("vol0").production);
    stop_and_assert_same_journals(&mut site, &mut remote, last);
}

#[test]
fn a_source_with_a_certificate_of_another_ca_is_refused_until_fixed() {
    // Goal: a shipper whose certificate another CA signed is refused by the remote, which
    // logs who and why; the remote journal gets nothing; the source's status says why and it
    // keeps retrying; once restarted with the right certificate it catches up. Method: the
    // site trusts the right CA but presents a certificate from a second `cdp tls ca`.
    if !requirements() {
        return;
    }
    let other = tempfile::Builder::new()
        .prefix("cdp-other-ca-")
        .tempdir_in("/tmp")
        .unwrap();
    cdp_tls_ca(&other.path().join("ca"));
    cdp_tls_issue(
        &other.path().join("ca"),
        "intruder",
        &[],
        &other.path().join("intruder"),
    );
    let good = &test_pki().source;
    let wrong_cert = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
        good.join("ca.pem").display(),
        other.path().join("intruder").join("cert.pem").display(),
        other.path().join("intruder").join("key.pem").display()
    );
    let (mut site, mut remote) = create_pair(LinkSecurity::Tls, &wrong_cert, None);
    start_site(&mut site);
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_tls_wrong_ca"));
    write_random_patterns(&site, &mut model, &mut rng, 20, 64);
    site.settle();

    let error = wait_last_error(&site, "refused this appliance's TLS certificate");
    assert!(error.contains("UnknownCA"), "{error}");
    let line = wait_remote_log_line(
        &remote,
        &["WARN", "replication link refused", "not signed by a CA"],
    );
    assert!(line.contains("peer=127.0.0.1:"), "no peer address: {line}");
    // The shipper keeps retrying (with backoff): a second refusal is logged.
    let retried = poll_until(T, || {
        std::fs::read_to_string(remote.log_path())
            .unwrap_or_default()
            .matches("not signed by a CA")
            .count()
            >= 2
    });
    assert!(retried, "no second attempt\n{}", remote.logs());
    // The refusal is in the remote's event log too (durable, alerted), naming peer and cause.
    let remote_events = remote.dir.path().join("appliance").join("events.jsonl");
    let mut refusal = None;
    let recorded = poll_until(T, || {
        let out = run_ok(
            Command::new(cdp_bin())
                .args(["--json", "events", "--dir"])
                .arg(remote.dir.path())
                .arg("--appliance-log")
                .arg(&remote_events),
            T,
        );
        refusal = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["class"] == "tls_refused");
        refusal.is_some()
    });
    assert!(
        recorded,
        "no tls_refused event at the remote\n{}",
        remote.logs()
    );
    let detail = refusal
        .as_ref()
        .and_then(|e| e["detail"].as_str())
        .unwrap_or("");
    assert!(
        detail.contains("127.0.0.1:") && detail.contains("not signed by a CA"),
        "tls_refused event without peer or cause: {refusal:?}"
    );
    assert_eq!(
        remote_last_seq(&remote),
        0,
        "the refused source's records arrived"
    );
    Model::zeroed(VOLUME_BYTES).check_file("remote replica while refused", remote.replica("vol0"));

    // Fixed: the right certificate, and shipping catches up.
    let text = std::fs::read_to_string(&site.appliance_config).unwrap();
    let fixed = format!("tls = {}\n", tls_table(good));
    std::fs::write(&site.appliance_config, text.replace(&wrong_cert, &fixed)).unwrap();
    site.restart_appliance();
    site.wait_connected(T);
    write_random_patterns(&site, &mut model, &mut rng, 10, 64);
    site.settle();
    let last = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    model.check_file("remote replica after the fix", remote.replica("vol0"));
    stop_and_assert_same_journals(&mut site, &mut remote, last);
}

#[test]
fn a_plaintext_source_is_refused_by_a_tls_listener() {
    // Goal: a source configured plaintext cannot feed a remote that requires TLS: refused,
    // logged at the remote with the peer and reason, shown in the source's status, and
    // nothing reaches the remote journal or replica.
    if !requirements() {
        return;
    }
    let (mut site, remote) = create_pair(LinkSecurity::Tls, "plaintext = true\n", None);
    start_site(&mut site);
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_tls_plain_source"));
    write_random_patterns(&site, &mut model, &mut rng, 10, 64);
    site.settle();
    let error = wait_last_error(&site, "plaintext replication peer on a TLS listener");
    assert!(error.contains("requires mutual TLS"), "{error}");
    assert_eq!(site.status()["groups"][0]["remote"]["tls"], false);
    let line = wait_remote_log_line(
        &remote,
        &[
            "WARN",
            "replication link refused",
            "plaintext replication peer",
        ],
    );
    assert!(line.contains("peer=127.0.0.1:"), "no peer address: {line}");
    assert_eq!(remote_last_seq(&remote), 0);
    Model::zeroed(VOLUME_BYTES).check_file("remote replica", remote.replica("vol0"));
    model.check_file("production", &site.volume("vol0").production);
}

#[test]
fn a_tls_source_is_refused_by_a_plaintext_listener() {
    // Goal: the reverse mismatch: a TLS source meets a listener configured plaintext. The
    // listener logs and refuses it; the source says the remote answered in plaintext (it
    // never sends its Hello unencrypted) and nothing reaches the remote.
    if !requirements() {
        return;
    }
    let tls = format!("tls = {}\n", tls_table(&test_pki().source));
    let (mut site, remote) = create_pair(LinkSecurity::Plaintext, &tls, None);
    start_site(&mut site);
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_tls_plain_listener"));
    write_random_patterns(&site, &mut model, &mut rng, 10, 64);
    site.settle();
    wait_last_error(&site, "answered in plaintext");
    let line = wait_remote_log_line(
        &remote,
        &[
            "WARN",
            "replication link refused",
            "TLS client on a plaintext listener",
        ],
    );
    assert!(line.contains("peer=127.0.0.1:"), "no peer address: {line}");
    assert_eq!(remote_last_seq(&remote), 0);
    Model::zeroed(VOLUME_BYTES).check_file("remote replica", remote.replica("vol0"));
}

#[test]
fn a_remote_whose_certificate_does_not_carry_the_server_name_is_refused() {
    // Goal: the source authenticates the remote too: a remote certificate from the right CA
    // but not valid for the configured `server_name` is refused by the source, which logs
    // and shows why, and ships nothing.
    if !requirements() {
        return;
    }
    let pki = &test_pki().source;
    let tls = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", server_name = \"elsewhere.example\" }}\n",
        pki.join("ca.pem").display(),
        pki.join("cert.pem").display(),
        pki.join("key.pem").display()
    );
    let (mut site, remote) = create_pair(LinkSecurity::Tls, &tls, None);
    start_site(&mut site);
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("remote_tls_server_name"));
    write_random_patterns(&site, &mut model, &mut rng, 5, 64);
    site.settle();
    let error = wait_last_error(&site, "TLS handshake with");
    assert!(
        error.contains("not valid for name") && error.contains("elsewhere.example"),
        "{error}"
    );
    let log = std::fs::read_to_string(site.log_path(Role::Appliance)).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("not valid for name")),
        "no warning at the source\n{}",
        site.logs()
    );
    assert_eq!(remote_last_seq(&remote), 0);
    Model::zeroed(VOLUME_BYTES).check_file("remote replica", remote.replica("vol0"));
}

/// A forwarder that keeps a copy of every byte it passes, both directions.
struct CaptureProxy {
    port: u16,
    wire: Arc<Mutex<Vec<u8>>>,
}

impl CaptureProxy {
    fn start(target: String) -> CaptureProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let wire: Arc<Mutex<Vec<u8>>> = Arc::default();
        let captured = Arc::clone(&wire);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let captured = Arc::clone(&captured);
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            captured.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CaptureProxy { port, wire }
    }

    fn contains(&self, needle: &[u8]) -> bool {
        self.wire
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    fn len(&self) -> usize {
        self.wire.lock().unwrap().len()
    }
}

#[test]
fn host_bytes_never_cross_the_wire_in_the_clear() {
    // Goal: over TLS the wire never carries what the host wrote. Method: a capture proxy
    // between site and remote, wire compression off (so plaintext would carry the bytes
    // verbatim), a distinctive 256 KiB pattern written by qemu-io; the remote replica
    // must hold it (it was shipped) and the captured bytes must not contain its marker. The same run with an explicitly plaintext link must show the piece on the
    // wire, proving the probe would see a leak.
    if !requirements() {
        return;
    }
    // 32-byte pieces, each the marker and a counter, so no two 4 KiB blocks are alike and
    // block dedup cannot stand in for the bytes.
    let marker = b"cdp-wire-probe:7Hq2Zk9L|";
    let pattern: Vec<u8> = (0..256 * 1024 / 32)
        .flat_map(|i: u32| {
            let mut piece = marker.to_vec();
            piece.extend_from_slice(format!("{i:08x}").as_bytes());
            piece
        })
        .collect();
    let offset = 4 * MIB;
    for security in [LinkSecurity::Plaintext, LinkSecurity::Tls] {
        let volumes = [("vol0", VOLUME_BYTES)];
        let remote = RemoteAppliance::start_with(&volumes, security);
        let proxy = CaptureProxy::start(remote.endpoint.clone());
        let mut site = Site::create(&volumes, SiteOptions::default());
        let endpoint = format!("127.0.0.1:{}", proxy.port);
        add_remote_to_site_config_secured(&site, &endpoint, 30, security);
        let mut text = std::fs::read_to_string(&site.appliance_config).unwrap();
        text += "compress_level = 0\n";
        std::fs::write(&site.appliance_config, text).unwrap();
        start_site(&mut site);

        let pattern_file = site.root().join("pattern.bin");
        std::fs::write(&pattern_file, &pattern).unwrap();
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c"])
                .arg(format!(
                    "write -s {} {offset} {}",
                    pattern_file.display(),
                    pattern.len()
                ))
                .args(["-c", "flush"])
                .arg(site.nbd_uri("vol0")),
            T,
        );
        let mut model = Model::zeroed(VOLUME_BYTES);
        model.write(offset, &pattern);
        site.settle();
        let last = wait_shipped(&site, &remote);
        remote.wait_distributed(last, T);
        model.check_file("remote replica", remote.replica("vol0"));
        assert!(
            proxy.len() >= pattern.len(),
            "{security:?}: only {} bytes crossed the proxy",
            proxy.len()
        );
        assert_eq!(
            proxy.contains(marker),
            security == LinkSecurity::Plaintext,
            "{security:?}: the host's bytes {} on the wire",
            if security == LinkSecurity::Plaintext {
                "are missing"
            } else {
                "appear in the clear"
            }
        );
    }
}

/// Runs `cdp appliance` on `config` and returns its stderr, asserting it exits non-zero
/// at once (it must refuse to start, not run).
fn appliance_refuses(config: &str, dir: &Path) -> String {
    let path = dir.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    let out = run(
        Command::new(cdp_bin())
            .args(["appliance", "--config"])
            .arg(&path)
            .env("NO_COLOR", "1"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the appliance started: {stderr}");
    stderr
}

#[test]
fn an_appliance_without_link_security_refuses_to_start() {
    // Goal: plaintext only when said; a config that says neither TLS nor plaintext, or both,
    // or names a certificate file that is missing or not PEM, stops the appliance at start
    // with a message naming the key to set.
    if reference_mode() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("cdp-tls-conf-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let base = format!(
        "data_dir = \"{}\"\nlink_listen = \"unix:{}\"\ncontrol = \"{}\"\n",
        d.join("data").display(),
        d.join("link.sock").display(),
        d.join("a.ctl").display()
    );
    let group = format!(
        "\n[[group]]\nname = \"default\"\n[[group.volume]]\nname = \"vol0\"\nsize = 1048576\nreplica = \"{}\"\n",
        d.join("r.img").display()
    );
    let remote_group = group.replace(
        "name = \"default\"\n",
        "name = \"default\"\nsource = \"remote\"\n",
    );
    let listen = format!("replication_listen = \"127.0.0.1:{}\"\n", free_port());

    let e = appliance_refuses(&format!("{base}{listen}{remote_group}"), d);
    assert!(
        e.contains("needs replication_tls = {") && e.contains("replication_plaintext = true"),
        "{e}"
    );
    let e = appliance_refuses(
        &format!("{base}{group}[group.remote]\nendpoint = \"127.0.0.1:1\"\n"),
        d,
    );
    assert!(
        e.contains("[group.remote] needs tls = {") && e.contains("plaintext = true"),
        "{e}"
    );
    let both = format!(
        "{base}{group}[group.remote]\nendpoint = \"127.0.0.1:1\"\nplaintext = true\ntls = {}\n",
        tls_table(&test_pki().source)
    );
    assert!(appliance_refuses(&both, d).contains("both tls and plaintext"));

    // Files named but missing, or not PEM: refused at start, naming the key and the file.
    let missing = d.join("missing");
    let e = appliance_refuses(
        &format!(
            "{base}{listen}replication_tls = {}\n{remote_group}",
            tls_table(&missing)
        ),
        d,
    );
    assert!(
        e.contains("replication_tls.ca")
            && e.contains(&missing.join("ca.pem").display().to_string()),
        "{e}"
    );
    let garbled = d.join("garbled");
    std::fs::create_dir_all(&garbled).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(test_pki().source.join(f), garbled.join(f)).unwrap();
    }
    std::fs::write(garbled.join("key.pem"), "not a key\n").unwrap();
    let e = appliance_refuses(
        &format!(
            "{base}{group}[group.remote]\nendpoint = \"127.0.0.1:1\"\ntls = {}\n",
            tls_table(&garbled)
        ),
        d,
    );
    assert!(
        e.contains("tls.key") && e.contains("no usable private key"),
        "{e}"
    );
    // A key that is not the certificate's.
    std::fs::copy(test_pki().remote.join("key.pem"), garbled.join("key.pem")).unwrap();
    let e = appliance_refuses(
        &format!(
            "{base}{group}[group.remote]\nendpoint = \"127.0.0.1:1\"\ntls = {}\n",
            tls_table(&garbled)
        ),
        d,
    );
    assert!(e.contains("do not make a usable identity"), "{e}");
}

#[test]
fn cdp_tls_makes_private_keys_and_never_overwrites() {
    // Goal: `cdp tls` writes keys readable by their owner only, refuses to overwrite without
    // --force, and `issue` names the certificate's addresses. Method: run the commands and
    // check files, modes and messages.
    if reference_mode() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cdp-tls-cli-")
        .tempdir_in("/tmp")
        .unwrap();
    let ca = dir.path().join("ca");
    cdp_tls_ca(&ca);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    let ca_pem = std::fs::read(ca.join("ca.pem")).unwrap();
    assert!(ca_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));

    let again = run(
        Command::new(cdp_bin())
            .args(["tls", "ca", "--out"])
            .arg(&ca),
        Duration::from_secs(30),
    );
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(ca.join("ca.pem")).unwrap(),
        ca_pem,
        "overwritten"
    );

    let out = dir.path().join("dr");
    let stdout = run_ok(
        Command::new(cdp_bin())
            .args(["tls", "issue", "--ca"])
            .arg(&ca)
            .args([
                "--name",
                "dr",
                "--dns",
                "dr.example",
                "--ip",
                "10.1.2.3",
                "--out",
            ])
            .arg(&out),
        Duration::from_secs(30),
    );
    assert!(
        stdout.contains("dr.example") && stdout.contains("10.1.2.3"),
        "{stdout}"
    );
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca_pem);

    // A CA key that does not belong to the CA certificate is caught.
    let other = dir.path().join("other");
    cdp_tls_ca(&other);
    std::fs::copy(other.join("ca-key.pem"), ca.join("ca-key.pem")).unwrap();
    let bad = run(
        Command::new(cdp_bin())
            .args(["tls", "issue", "--ca"])
            .arg(&ca)
            .args(["--name", "x", "--out"])
            .arg(dir.path().join("x")),
        Duration::from_secs(30),
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("does not verify"), "{stderr}");
}
