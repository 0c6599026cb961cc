//! `cdp journal inspect` end to end: a journal written through NBD inspects clean from the
//! data_dir, the group directory and the journal directory; one flipped byte in a middle
//! segment gives exit status 1 and the damaged record's exact file and byte offset; bad
//! arguments give exit status 2. Compression (on by default) shrinks the journal of
//! compressible writes and status reports the ratio; the replica still matches production.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn inspect(args: &[&std::ffi::OsStr]) -> Output {
    run(
        Command::new(cdp_bin())
            .args(["journal", "inspect"])
            .args(args),
        Duration::from_secs(60),
    )
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Start offsets of the records in a segment file, parsed independently of the journal crate
/// (64-byte segment header; each record a 64-byte header whose bytes 56..60 are payload_len).
fn record_offsets(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = 64usize;
    while pos + 64 <= bytes.len() {
        out.push(pos as u64);
        let len = u32::from_le_bytes(bytes[pos + 56..pos + 60].try_into().unwrap()) as usize;
        pos += 64 + len;
    }
    out
}

/// 1 MiB segments and `group_settings` for the site's group.
fn configure(site: &Site, group_settings: &str) {
    let text = std::fs::read_to_string(&site.appliance_config).unwrap();
    let text = text.replacen(
        "name = \"default\"\n",
        &format!("name = \"default\"\n{group_settings}"),
        1,
    );
    std::fs::write(
        &site.appliance_config,
        format!("journal_segment_bytes = {MIB}\n{text}"),
    )
    .unwrap();
}

#[test]
fn inspect_clean_then_flipped_byte() {
    if !requires("qemu-io") || reference_mode() {
        return;
    }
    let mut site = Site::create(&[("vol0", 16 * MIB)], SiteOptions::default());
    configure(&site, "journal_compress = false\n");
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    // The splitter's first-time initialization journals the (sparse) volume first.
    site.settle();
    let base = site.status()["groups"][0]["last_seq"].as_u64().unwrap();
    let total = base + 96;
    // 6 MiB in 96 writes of 64 KiB: about six 1 MiB segments.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..96u64 {
        cmd.arg("-c")
            .arg(format!("write -P {:#x} {} 65536", i % 250 + 1, i * 65536));
    }
    run_ok(cmd.arg(site.nbd_uri("vol0")), Duration::from_secs(120));
    site.settle();
    site.terminate(Role::Splitter, Duration::from_secs(30));
    site.terminate(Role::Appliance, Duration::from_secs(60));

    let data_dir = site.root().join("appliance");
    let group_dir = data_dir.join("groups/default");
    let journal_dir = group_dir.join("journal/journal");
    for dir in [&data_dir, &group_dir, &journal_dir] {
        let out = inspect(&[dir.as_os_str()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}: {text}", dir.display());
        assert!(
            text.contains(&format!("{total} records, seq 1..={total}")),
            "{text}"
        );
        assert!(text.contains("clean"), "{text}");
    }
    let out = inspect(&[data_dir.as_os_str(), "--json".as_ref()]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["clean"], true);
    assert_eq!(json["journals"][0]["group"], "default");
    assert_eq!(json["journals"][0]["records"], total);
    assert_eq!(json["journals"][0]["last_seq"], total);

    // Flip one byte in the middle of a middle segment's payload.
    let segs = segments(&journal_dir);
    assert!(segs.len() >= 4, "{segs:?}");
    let victim = &segs[segs.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let flip = bytes.len() / 2;
    bytes[flip] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();
    let record = record_offsets(&bytes)
        .into_iter()
        .rfind(|&o| o as usize <= flip)
        .unwrap();

    let out = inspect(&[data_dir.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let expected = format!("DAMAGE {} at byte {record}:", victim.display());
    assert!(
        text.contains(&expected),
        "expected `{expected}` in:\n{text}"
    );
    assert!(text.contains("DAMAGED: 1 place(s)"), "{text}");
    let out = inspect(&[journal_dir.as_os_str(), "--json".as_ref()]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damage = &json["journals"][0]["damage"];
    assert_eq!(damage.as_array().unwrap().len(), 1, "{json:#}");
    assert_eq!(damage[0]["path"], victim.display().to_string());
    assert_eq!(damage[0]["offset"], record);

    // Usage errors: no such directory, a directory without a journal, no argument.
    let missing = site.root().join("missing");
    assert_eq!(inspect(&[missing.as_os_str()]).status.code(), Some(2));
    let empty = site.root().join("production");
    assert_eq!(inspect(&[empty.as_os_str()]).status.code(), Some(2));
    assert_eq!(inspect(&[]).status.code(), Some(2));
}

#[test]
fn compressed_journal_replicates_and_reports_ratio() {
    // Goal: with compression on (journal_compress = true), compressible host writes are journaled in a
    // fraction of their size, read back exactly by distribution and by recovery. Oracle: the
    // production model, qemu-img compare of the replica, the segment files' sizes, inspect.
    if !requires("qemu-io") || !requires("qemu-img") || reference_mode() {
        return;
    }
    let mut site = Site::create(&[("vol0", 16 * MIB)], SiteOptions::default());
    configure(&site, "journal_compress = true\n");
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let mut model = Model::zeroed(16 * MIB);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..64u64 {
        let byte = (i % 250 + 1) as u8;
        cmd.arg("-c")
            .arg(format!("write -P {byte:#x} {} 131072", i * 131072));
        model.fill(i * 131072, 131072, byte);
    }
    // Some unaligned small writes too (below the compression minimum).
    for i in 0..16u64 {
        cmd.arg("-c")
            .arg(format!("write -P 0x77 {} 100", i * 100_003));
        model.fill(i * 100_003, 100, 0x77);
    }
    run_ok(cmd.arg(site.nbd_uri("vol0")), Duration::from_secs(120));
    site.settle();
    let g = site.status()["groups"][0].clone();
    let logical = g["journal_write_logical_bytes"].as_u64().unwrap();
    let stored = g["journal_write_stored_bytes"].as_u64().unwrap();
    assert_eq!(logical, 64 * 131072 + 16 * 100, "{g:#}");
    assert!(stored * 20 < logical, "{g:#}");
    assert!(
        g["journal_compression_ratio"].as_f64().unwrap() > 20.0,
        "{g:#}"
    );
    let journal_dir = site.root().join("appliance/groups/default/journal/journal");
    let on_disk: u64 = segments(&journal_dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk * 20 < logical, "journal files hold {on_disk} bytes");
    model.check_file("production", &site.volume("vol0").production);
    site.assert_replica_equals_production("vol0");
    let table = run_ok(
        Command::new(cdp_bin())
            .args(["status", "--control"])
            .arg(&site.control_sock),
        Duration::from_secs(30),
    );
    assert!(table.contains("compression"), "{table}");

    // Recovery and distribution from a compressed journal: lose the replica's contents and
    // the checkpoint, restart, and the appliance re-applies every record from the journal.
    site.terminate(Role::Splitter, Duration::from_secs(30));
    site.terminate(Role::Appliance, Duration::from_secs(60));
    let out = inspect(&[site.root().join("appliance").as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    let replica = &site.volume("vol0").replica;
    std::fs::write(replica, vec![0u8; (16 * MIB) as usize]).unwrap();
    std::fs::remove_file(
        site.root()
            .join("appliance/groups/default/distribution.state"),
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.settle();
    site.assert_replica_equals_production("vol0");
}
