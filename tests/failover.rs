//! Failover and failback between two sites, each an appliance and a splitter (real
//! processes; qemu-io as the host): a planned move and back with no write lost and
//! replication reversed each time; an unplanned failover after a kill -9 of site A, A's
//! return as a demoted, diverged secondary that refuses host writes, reprotect, and
//! failback. Every step checks the bytes of production and of every copy against the model.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::replication::write_random_patterns;
use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(120);
/// Generous for a busy machine: every wait polls its condition.
const CONVERGE: Duration = Duration::from_secs(180);

fn requirements() -> bool {
    !reference_mode() && requires("qemu-io")
}

/// Two sites of group `default`, each shipping to the other when primary: A starts primary
/// (and serving its host), B secondary with only its appliance running. Plaintext links on
/// loopback (the TLS path is remote_tls.rs's); each volume names its site's production file.
fn start_sites(mode: &str) -> (Site, Site) {
    let volumes = [("vol0", VOLUME_BYTES)];
    let mut a = Site::create(&volumes, SiteOptions::default());
    let mut b = Site::create(&volumes, SiteOptions::default());
    let (port_a, port_b) = (free_port(), free_port());
    let top = |port: u16| {
        format!("replication_listen = \"127.0.0.1:{port}\"\nreplication_plaintext = true\nreplication_deadline_ms = 3000\n")
    };
    a.add_appliance_settings(&top(port_a), "site = \"A\"\n");
    b.add_appliance_settings(&top(port_b), "site = \"B\"\nsource = \"remote\"\n");
    for (site, peer) in [(&a, port_b), (&b, port_a)] {
        let mut text = std::fs::read_to_string(&site.appliance_config).unwrap();
        for v in &site.volumes {
            text = text.replace(
                &format!("replica = \"{}\"\n", v.replica.display()),
                &format!(
                    "replica = \"{}\"\nproduction = \"{}\"\n",
                    v.replica.display(),
                    v.production.display()
                ),
            );
        }
        text += &format!(
            "\n[group.remote]\nendpoint = \"127.0.0.1:{peer}\"\nplaintext = true\nmode = \"{mode}\"\n"
        );
        std::fs::write(&site.appliance_config, text).unwrap();
    }
    a.start_role(Role::Appliance);
    a.start_role(Role::Splitter);
    b.start_role(Role::Appliance);
    (a, b)
}

fn appliance_status(site: &Site) -> serde_json::Value {
    let out = run_ok(
        Command::new(cdp_bin())
            .args(["--json", "status", "--control"])
            .arg(&site.control_sock),
        T,
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

fn group(site: &Site) -> serde_json::Value {
    appliance_status(site)["groups"][0].clone()
}

fn role_of(site: &Site) -> String {
    group(site)["role"]["role"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn logs(a: &Site, b: &Site) -> String {
    format!(
        "===== site A =====\n{}\n===== site B =====\n{}",
        a.logs(),
        b.logs()
    )
}

/// Waits until `to` holds every record of `from`'s journal and its replica is distributed
/// through it; returns that seq.
fn wait_converged(from: &Site, to: &Site, a: &Site, b: &Site) -> u64 {
    let mut last = 0;
    let ok = poll_until(CONVERGE, || {
        let f = group(from);
        last = f["last_seq"].as_u64().unwrap_or(0);
        let t = group(to);
        f["remote"]["shipped_seq"].as_u64() == Some(last)
            && t["last_seq"].as_u64() == Some(last)
            && t["distributed_seq"].as_u64() == Some(last)
    });
    assert!(ok, "copies did not converge at seq {last}\n{}", logs(a, b));
    last
}

/// `cdp failover` at `site`, answered as JSON.
fn failover(site: &Site, args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new(cdp_bin())
            .args(["--json", "failover"])
            .args(args)
            .arg("--control")
            .arg(&site.control_sock),
        T,
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("failover answer ({e}): {out}"))
}

/// A host write through `site`'s splitter: Ok, or the client's error text.
fn try_write(site: &Site, offset: u64, byte: u8) -> Result<(), String> {
    let out = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -P {byte} {offset} 4096"))
            .arg(site.nbd_uri("vol0")),
        T,
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // qemu-io exits 0 even when a command fails; it says so.
    if out.status.success() && !text.contains("failed") && !text.contains("error") {
        Ok(())
    } else {
        Err(text)
    }
}

fn assert_refused(site: &Site, what: &str) {
    match try_write(site, 0, 0xEE) {
        Ok(()) => panic!("{what}: a host write was accepted at a secondary copy (rule 6)"),
        Err(text) => assert!(
            text.contains("Operation not permitted"),
            "{what}: expected EPERM, got: {text}"
        ),
    }
}

fn check(model: &Model, what: &str, path: &Path) {
    model.check_file(what, path);
}

#[test]
fn planned_failover_and_failback_lose_nothing_and_reverse_replication() {
    if !requirements() {
        return;
    }
    let (mut a, mut b) = start_sites("async");
    let mut model = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("planned_failover"));
    write_random_patterns(&a, &mut model, &mut rng, 150, 16);
    wait_converged(&a, &b, &a, &b);
    assert_eq!(role_of(&a), "primary");
    assert_eq!(role_of(&b), "secondary");

    // Planned move A -> B: drain, ship, demote A, promote B.
    let answer = failover(&a, &["--planned"]);
    let pause_ms = answer["pause_ms"].as_u64().expect("pause_ms");
    eprintln!(
        "planned failover A -> B: host-visible pause {:.3} s",
        pause_ms as f64 / 1000.0
    );
    assert_eq!(role_of(&a), "secondary", "{}", logs(&a, &b));
    let gb = group(&b);
    assert_eq!(gb["role"]["role"], "primary");
    assert_eq!(gb["role"]["generation"], 2);
    // Nothing acknowledged at A is missing at B: its production, written from its replica
    // at the promotion, and the replica itself equal the model.
    check(
        &model,
        "B production after the planned failover",
        &b.volume("vol0").production,
    );
    check(
        &model,
        "B replica after the planned failover",
        &b.volume("vol0").replica,
    );
    // A's splitter keeps serving reads and refuses writes (EPERM).
    assert_refused(&a, "A after the planned failover");
    model.check(
        "A production read through its demoted splitter",
        &std::fs::read(a.volume("vol0").production.clone()).unwrap(),
    );

    // Hosts write at B; replication now runs B -> A.
    b.start_role(Role::Splitter);
    write_random_patterns(&b, &mut model, &mut rng, 150, 16);
    wait_converged(&b, &a, &a, &b);
    check(&model, "A replica fed by B", &a.volume("vol0").replica);
    let splitter_b = std::fs::read_to_string(b.log_path(Role::Splitter)).unwrap();
    assert!(
        !splitter_b.contains("resync started"),
        "the promoted copy's splitter resynchronised instead of resuming:\n{splitter_b}"
    );

    // Planned failback B -> A; A's running splitter accepts writes again.
    let back = failover(&b, &["--planned"]);
    eprintln!(
        "planned failback B -> A: host-visible pause {:.3} s",
        back["pause_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    assert_eq!(role_of(&a), "primary", "{}", logs(&a, &b));
    assert_eq!(group(&a)["role"]["generation"], 3);
    assert_eq!(role_of(&b), "secondary");
    check(
        &model,
        "A production after the failback",
        &a.volume("vol0").production,
    );
    assert_refused(&b, "B after the failback");
    let resumed = poll_until(CONVERGE, || try_write(&a, 8 * MIB, 0x5A).is_ok());
    assert!(
        resumed,
        "A's splitter never accepted writes again\n{}",
        logs(&a, &b)
    );
    model.fill(8 * MIB, 4096, 0x5A);
    write_random_patterns(&a, &mut model, &mut rng, 100, 16);
    wait_converged(&a, &b, &a, &b);
    check(
        &model,
        "B replica after the failback",
        &b.volume("vol0").replica,
    );
    check(&model, "A replica after the failback", &{
        let g = group(&a);
        assert_eq!(g["distributed_seq"], g["last_seq"]);
        a.volume("vol0").replica.clone()
    });
    let text = run_ok(
        Command::new(cdp_bin())
            .args(["status", "--control"])
            .arg(&a.control_sock),
        T,
    );
    assert!(
        text.contains("role primary at site A, generation 3"),
        "status: {text}"
    );
    a.kill(Role::Splitter);
    b.kill(Role::Splitter);
}

/// One 4 KiB write of `byte` at each offset through `site`'s splitter, in one qemu-io run
/// (each acknowledged before the next); the model follows.
fn write_blocks(site: &Site, model: &mut Model, blocks: &[(u64, u8)]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for &(offset, byte) in blocks {
        cmd.arg("-c").arg(format!("write -P {byte} {offset} 4096"));
        model.fill(offset, 4096, byte);
    }
    cmd.arg(site.nbd_uri("vol0"));
    run_ok(&mut cmd, T);
}

#[test]
fn unplanned_failover_demotes_the_old_primary_and_reprotect_sends_only_what_changed() {
    if !requirements() {
        return;
    }
    let (mut a, mut b) = start_sites("async");
    let mut shared = Model::zeroed(VOLUME_BYTES);
    let mut rng = SplitMix64(seed("unplanned_failover"));
    write_random_patterns(&a, &mut shared, &mut rng, 100, 16);
    let b_last = wait_converged(&a, &b, &a, &b);

    // Site B loses the link; A's host goes on writing (async: acknowledged, never shipped),
    // then all of site A dies.
    b.kill(Role::Appliance);
    let mut model_a = shared.clone();
    write_blocks(
        &a,
        &mut model_a,
        &[(3 * MIB, 0xA1), (10 * MIB, 0xA2), (20 * MIB + 8192, 0xA3)],
    );
    let a_last = group(&a)["last_seq"].as_u64().unwrap();
    assert!(a_last > b_last);
    a.kill(Role::Splitter);
    a.kill(Role::Appliance);

    // Unplanned failover at B: primary at what it holds; the loss is named.
    b.start_role(Role::Appliance);
    let answer = failover(&b, &[]);
    assert_eq!(answer["planned"], false);
    assert_eq!(answer["generation"], 2);
    assert_eq!(answer["first_seq"].as_u64(), Some(b_last + 1));
    assert_eq!(
        answer["lost"]["first_seq"].as_u64(),
        Some(b_last + 1),
        "{answer}"
    );
    assert_eq!(role_of(&b), "primary");
    check(
        &shared,
        "B production after the unplanned failover",
        &b.volume("vol0").production,
    );

    // Hosts write at B.
    b.start_role(Role::Splitter);
    let mut model_b = shared.clone();
    write_blocks(
        &b,
        &mut model_b,
        &[(10 * MIB + 4096, 0xB1), (40 * MIB, 0xB2), (41 * MIB, 0xB3)],
    );

    // A comes back: it meets the newer primary, steps down and reports the divergence at
    // the first seq B's generation replaced; its splitter refuses writes.
    a.start_role(Role::Appliance);
    let demoted = poll_until(CONVERGE, || {
        let g = group(&a);
        g["role"]["role"] == "secondary" && g["role"]["divergence_seq"].as_u64() == Some(b_last + 1)
    });
    assert!(
        demoted,
        "A did not step down with a divergence: {}\n{}",
        group(&a),
        logs(&a, &b)
    );
    // A still holds the records B never got: exactly the seqs the failover called lost.
    assert_eq!(group(&a)["last_seq"].as_u64(), Some(a_last));
    a.start_role(Role::Splitter);
    assert_refused(&a, "A back after the unplanned failover");

    // Reprotect: A's writes since the divergence are kept as an image; then B resyncs A.
    let out = run_ok(
        Command::new(cdp_bin())
            .args(["--json", "reprotect", "--control"])
            .arg(&a.control_sock),
        T,
    );
    let reprotected: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reprotected["divergence_seq"].as_u64(), Some(b_last + 1));
    let kept = Path::new(reprotected["kept_image_dir"].as_str().unwrap()).join("vol0.img");
    check(&model_a, "A's diverged writes kept as an image", &kept);
    wait_converged(&b, &a, &a, &b);
    check(
        &model_b,
        "A replica after reprotect",
        &a.volume("vol0").replica,
    );
    let g = group(&a);
    assert!(g["role"]["divergence_seq"].is_null(), "{g}");
    // Only the regions either side wrote since the divergence crossed the link: A's at 3,
    // 10 and 20 MiB, B's at 10, 40 and 41 MiB: five 1 MiB regions.
    let report = group(&b)["remote"]["last_region_resync"].clone();
    assert_eq!(report["regions_sent"].as_u64(), Some(5), "{report}");
    assert_eq!(report["bytes_sent"].as_u64(), Some(5 * MIB), "{report}");
    eprintln!(
        "reprotect: {} of {} regions sent ({} bytes; a full copy is {} bytes)",
        report["regions_sent"], report["regions_compared"], report["bytes_sent"], VOLUME_BYTES
    );

    // Failback, planned: A is primary again with B's writes, and protection goes on.
    failover(&b, &["--planned"]);
    assert_eq!(role_of(&a), "primary", "{}", logs(&a, &b));
    check(
        &model_b,
        "A production after the failback",
        &a.volume("vol0").production,
    );
    assert_refused(&b, "B after the failback");
    let resumed = poll_until(CONVERGE, || try_write(&a, 30 * MIB, 0x77).is_ok());
    assert!(
        resumed,
        "A's splitter never accepted writes again\n{}",
        logs(&a, &b)
    );
    model_b.fill(30 * MIB, 4096, 0x77);
    wait_converged(&a, &b, &a, &b);
    check(&model_b, "B replica at the end", &b.volume("vol0").replica);
    a.kill(Role::Splitter);
    b.kill(Role::Splitter);
}
