//! Consistency groups and volumes managed at runtime: `cdp group create|list`, `cdp volume
//! add|remove` against running processes, kept across restarts, with plain errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

/// `cdp ARGS` with both control sockets of the site (group commands take only the
/// appliance's).
fn cdp(site: &Site, args: &[&str]) -> Command {
    let mut c = Command::new(cdp_bin());
    c.args(args).arg("--control").arg(&site.control_sock);
    if args.first() == Some(&"volume") {
        c.arg("--splitter-control").arg(site.splitter_control());
    }
    c
}

fn cdp_ok(site: &Site, args: &[&str]) -> String {
    run_ok(&mut cdp(site, args), T)
}

/// Runs a command that must fail and returns its stderr.
fn cdp_fails(site: &Site, args: &[&str]) -> String {
    let out: Output = run(&mut cdp(site, args), T);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "cdp {args:?} should fail but printed:\n{}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// A production file for a volume added at runtime, registered with the site so that
/// `settle` flushes it and replica checks find it (the appliance's default replica path).
fn new_volume(site: &mut Site, group: &str, name: &str, size: u64) -> PathBuf {
    let production = site.root().join("production").join(format!("{name}.img"));
    std::fs::File::create(&production)
        .and_then(|f| f.set_len(size))
        .expect("production file");
    site.volumes.push(Volume {
        name: name.to_string(),
        size,
        production: production.clone(),
        replica: site
            .root()
            .join("appliance/replicas")
            .join(group)
            .join(format!("{name}.img")),
    });
    production
}

/// Writes `byte` over `len` bytes at `offset` through the splitter; qemu-io exits only once
/// the write is acknowledged, which is what makes a later write causally after it.
fn write(site: &Site, model: &mut Model, vol: &str, offset: u64, len: u64, byte: u8) {
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {byte} {offset} {len}"),
            ])
            .arg(site.nbd_uri(vol)),
        T,
    );
    model.fill(offset, len, byte);
}

/// Reads a whole NBD export into a file.
fn read_export(uri: &str, to: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(to);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(to),
        T,
    );
    std::fs::read(to).expect("read exported image")
}

fn group_list(site: &Site) -> serde_json::Value {
    let out = cdp_ok(site, &["group", "list", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("group list --json ({e}): {out}"))
}

/// The names of a group's volumes in `cdp group list --json`.
fn listed_volumes(list: &serde_json::Value, group: &str) -> Vec<String> {
    let g = list["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == group))
        .unwrap_or_else(|| panic!("group {group} not listed: {list}"));
    g["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}

fn restart_both(site: &mut Site) {
    assert!(site.terminate(Role::Splitter, T).success());
    assert!(site.terminate(Role::Appliance, T).success());
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
}

/// Hosts attached to `vol`, as the splitter counts them.
fn nbd_clients(site: &Site, vol: &str) -> u64 {
    let status = control_request(
        &site.splitter_control(),
        &serde_json::json!({"command": "status"}),
    );
    status["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == vol))
        .and_then(|v| v["nbd_clients"].as_u64())
        .unwrap_or(0)
}

#[test]
fn runtime_group_with_two_volumes_keeps_order_survives_restart_and_removal_rules() {
    // Goal: a group created at runtime and volumes added to it behave like configured ones
    // (one write order, bookmarks, images, replicas) and survive restarts; removing a volume
    // is refused while a host is attached, and errors are plain. Method: a site with vol0 in
    // `default`; `cdp group create g2`, `cdp volume add g2 volA|volB`; causally ordered writes
    // volA -> volB -> volA, bookmark, more writes; the image at the bookmark must equal the
    // model of that moment on both volumes; restart both processes and compare replicas with
    // production; hold a qemu-io session on volA while removing it, then remove it.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 8 * MIB)]);
    site.settle();

    let created = cdp_ok(
        &site,
        &[
            "group",
            "create",
            "g2",
            "--capacity",
            "1G",
            "--retention",
            "24h",
        ],
    );
    assert!(created.contains("group g2 created"), "{created}");
    let a_path = new_volume(&mut site, "g2", "volA", 8 * MIB);
    let b_path = new_volume(&mut site, "g2", "volB", 4 * MIB);
    let a_path = a_path.to_str().expect("utf-8 path").to_string();
    let b_path = b_path.to_str().expect("utf-8 path").to_string();
    let added = cdp_ok(&site, &["volume", "add", "g2", "volA", "--path", &a_path]);
    assert!(added.contains("volume volA added to group g2"), "{added}");
    cdp_ok(&site, &["volume", "add", "g2", "volB", "--path", &b_path]);

    // Plain errors, and nothing half-added.
    let e = cdp_fails(&site, &["group", "create", "g2"]);
    assert!(e.contains("group \"g2\" already exists"), "{e}");
    let e = cdp_fails(&site, &["group", "create", "default"]);
    assert!(e.contains("already exists"), "{e}");
    let e = cdp_fails(
        &site,
        &["volume", "add", "nosuch", "volC", "--path", &b_path],
    );
    assert!(e.contains("no group named \"nosuch\""), "{e}");
    let e = cdp_fails(&site, &["volume", "add", "g2", "vol0", "--path", &b_path]);
    assert!(e.contains("already exists in group \"default\""), "{e}");
    let e = cdp_fails(&site, &["group", "create", "g3", "--capacity", "1M"]);
    assert!(e.contains("below two journal segments"), "{e}");
    let e = cdp_fails(&site, &["volume", "remove", "g2", "volZ"]);
    assert!(e.contains("no volume \"volZ\""), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // The splitter's step fails (unreachable): the appliance's step is undone.
    let c_path = new_volume(&mut site, "g2", "volC", MIB);
    site.volumes.retain(|v| v.name != "volC");
    let out = run(
        Command::new(cdp_bin())
            .args(["volume", "add", "g2", "volC", "--path"])
            .arg(&c_path)
            .arg("--control")
            .arg(&site.control_sock)
            .arg("--splitter-control")
            .arg(site.root().join("nowhere.ctl")),
        T,
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("the appliance's side was undone"), "{e}");

    site.settle();
    let list = group_list(&site);
    assert_eq!(listed_volumes(&list, "g2"), ["volA", "volB"], "{list}");
    assert_eq!(listed_volumes(&list, "default"), ["vol0"], "{list}");
    assert_eq!(list["groups"].as_array().map(Vec::len), Some(2), "{list}");
    let g2 = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "g2")
        .unwrap();
    assert_eq!(g2["origin"], "runtime", "{list}");
    assert_eq!(g2["journal_capacity_bytes"], 1u64 << 30, "{list}");
    assert_eq!(g2["journal_retention_s"], 86400, "{list}");
    let human = cdp_ok(&site, &["group", "list"]);
    assert!(
        human.contains("group g2 (runtime)") && human.contains("volB"),
        "{human}"
    );

    // A log write on volA, then the data write it announces on volB, then a commit mark on
    // volA: each issued only after the previous one was acknowledged.
    let mut model_a = Model::zeroed(8 * MIB);
    let mut model_b = Model::zeroed(4 * MIB);
    write(&site, &mut model_a, "volA", 0, 65536, 0x11);
    write(&site, &mut model_b, "volB", 4096, 131072, 0x22);
    write(&site, &mut model_a, "volA", 32768, 65536, 0x33);
    let bookmark = site.cdp_json(&["bookmark", "create", "b1", "--group", "g2", "--json"]);
    let (at_b1_a, at_b1_b) = (model_a.clone(), model_b.clone());
    write(&site, &mut model_a, "volA", 0, MIB, 0x44);
    write(&site, &mut model_b, "volB", 0, MIB, 0x55);

    let image = site.cdp_json(&["image", "access", "g2", "--at", "b1", "--json"]);
    assert_eq!(image["seq"], bookmark["seq"], "{image} {bookmark}");
    let scratch = site.root().join("image.raw");
    at_b1_a.check(
        "volA at b1",
        &read_export(&site.image_uri(&image, "volA"), &scratch),
    );
    at_b1_b.check(
        "volB at b1",
        &read_export(&site.image_uri(&image, "volB"), &scratch),
    );
    let id = image["id"].as_str().expect("image id").to_string();
    site.cdp_json(&["image", "release", &id, "--json"]);

    site.settle();
    model_a.check_file("volA production", Path::new(&a_path));
    model_b.check_file("volB production", Path::new(&b_path));
    site.assert_all_replicas_equal_production();

    // Both processes restart from their files: the group and its volumes are back.
    restart_both(&mut site);
    site.settle();
    let list = group_list(&site);
    assert_eq!(listed_volumes(&list, "g2"), ["volA", "volB"], "{list}");
    site.assert_all_replicas_equal_production();
    write(&site, &mut model_a, "volA", 2 * MIB, 65536, 0x66);
    site.settle();
    site.assert_all_replicas_equal_production();

    // A host attached to volA: removal is refused, and volA keeps being served.
    let mut host = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(site.nbd_uri("volA"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    assert!(
        poll_until(T, || nbd_clients(&site, "volA") == 1),
        "qemu-io never attached to volA"
    );
    let e = cdp_fails(&site, &["volume", "remove", "g2", "volA"]);
    assert!(e.contains("host(s) attached to volume \"volA\""), "{e}");
    assert_eq!(listed_volumes(&group_list(&site), "g2"), ["volA", "volB"]);
    // The appliance alone refuses too while the splitter is connected.
    let refused = raw_request(
        &site.control_sock,
        &serde_json::json!({"command": "volume_remove", "group": "g2", "name": "volA"}),
    );
    let refused = refused["error"].as_str().unwrap_or_default().to_string();
    assert!(
        refused.contains("still has a connected splitter"),
        "{refused}"
    );
    drop(host.stdin.take());
    let _ = host.kill();
    let _ = host.wait();
    assert!(
        poll_until(T, || nbd_clients(&site, "volA") == 0),
        "qemu-io never detached"
    );
    let removed = cdp_ok(&site, &["volume", "remove", "g2", "volA"]);
    assert!(removed.contains("replica kept at"), "{removed}");
    assert_eq!(listed_volumes(&group_list(&site), "g2"), ["volB"]);
    // The kept replica holds everything journaled for volA.
    site.assert_replica_equals_production("volA");
    site.volumes.retain(|v| v.name != "volA");

    restart_both(&mut site);
    site.settle();
    let list = group_list(&site);
    assert_eq!(listed_volumes(&list, "g2"), ["volB"], "{list}");
    site.assert_all_replicas_equal_production();

    // One journal for the group, in causal order; volA's records outlive its removal.
    assert!(site.terminate(Role::Splitter, T).success());
    assert!(site.terminate(Role::Appliance, T).success());
    let order = journal_writes(&site.root().join("appliance/groups/g2"));
    let seq_of = |vol: &str, offset: u64, byte: u8| {
        order
            .iter()
            .find(|w| w.0 == vol && w.1 == offset && w.2 == byte)
            .map(|w| w.3)
            .unwrap_or_else(|| panic!("{vol} write of {byte:#x} at {offset} not journaled"))
    };
    let (log, data, commit) = (
        seq_of("volA", 0, 0x11),
        seq_of("volB", 4096, 0x22),
        seq_of("volA", 32768, 0x33),
    );
    assert!(
        log < data && data < commit,
        "causal order lost: {log} {data} {commit}"
    );
}

/// Every write record of a group's journal as (volume name, offset, first byte, seq).
fn journal_writes(group_dir: &Path) -> Vec<(String, u64, u8, u64)> {
    let (group_id, ids) = common::journals::volume_ids(group_dir);
    let names: std::collections::BTreeMap<u64, String> = ids
        .into_iter()
        .map(|(name, id)| (u64::from(id), name))
        .collect();
    let (journal, _) = cdp_journal::Journal::open(
        &group_dir.join("journal"),
        group_id,
        cdp_journal::JournalConfig::default(),
    )
    .expect("open the journal");
    let mut writes = Vec::new();
    for record in journal.read_from(cdp_types::Seq(1)).expect("read") {
        let record = record.expect("record");
        if record.kind == cdp_journal::RecordKind::Write && !record.payload.is_empty() {
            let name = names
                .get(&u64::from(record.volume))
                .cloned()
                .unwrap_or_default();
            writes.push((name, record.offset, record.payload[0], record.seq.0));
        }
    }
    writes
}

#[test]
fn forced_removal_with_a_host_attached_never_hangs_the_host() {
    // Goal: `--force` removes a volume a host still uses, and that host's writes complete
    // (production and the dirty bitmap take them) instead of waiting for a journal that no
    // longer expects them. Method: an interactive qemu-io session on volA writes, volA is
    // removed with --force, the same session writes again and quits within the timeout;
    // production holds both writes, and re-adding volA resyncs the second one.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 4 * MIB)]);
    site.settle();
    cdp_ok(&site, &["group", "create", "g2"]);
    let a_path = new_volume(&mut site, "g2", "volA", 4 * MIB);
    let a_path = a_path.to_str().expect("utf-8 path").to_string();
    cdp_ok(&site, &["volume", "add", "g2", "volA", "--path", &a_path]);
    site.settle();

    let mut host = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(site.nbd_uri("volA"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    let mut stdin = host.stdin.take().expect("stdin");
    use std::io::Write;
    writeln!(stdin, "write -P 0x61 0 64k").expect("send");
    assert!(poll_until(T, || nbd_clients(&site, "volA") == 1));
    let e = cdp_fails(&site, &["volume", "remove", "g2", "volA"]);
    assert!(e.contains("attached"), "{e}");
    let removed = cdp_ok(&site, &["volume", "remove", "g2", "volA", "--force"]);
    assert!(removed.contains("removed from group g2"), "{removed}");
    writeln!(stdin, "write -P 0x62 65536 64k\nflush\nquit").expect("send");
    drop(stdin);
    let status = wait_child(&mut host, T).expect("the host hung after a forced removal");
    assert!(status.success(), "qemu-io exited with {status}");
    let mut model = Model::zeroed(4 * MIB);
    model.fill(0, 65536, 0x61);
    model.fill(65536, 65536, 0x62);
    model.check_file("volA production", Path::new(&a_path));

    // Back in the group: the write made while it was out reaches the replica by resync.
    cdp_ok(&site, &["volume", "add", "g2", "volA", "--path", &a_path]);
    site.settle();
    site.assert_all_replicas_equal_production();
}

/// Sends one control request and returns the answer, error or not.
fn raw_request(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut line = serde_json::to_vec(request).expect("encode");
    line.push(b'\n');
    stream.write_all(&line).expect("send");
    let mut answer = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer ({e}): {answer}"))
}
