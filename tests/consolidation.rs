//! Consolidation end to end: a group whose policy keeps every point for 2 s and then one per
//! day is written in rounds with bookmarks (some marked `--keep`) through the real splitter;
//! `cdp journal consolidate` must free space, keep the kept points exact (as images, through
//! logged rollback and roll-forward, across a restart and a kill -9 mid-pass), refuse the
//! dropped ones plainly, and leave a journal `cdp journal inspect` finds clean.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cli::{copy_export, release_image};
use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const T: Duration = Duration::from_secs(120);
/// Points younger than this stay; older ones keep one per day (the test's history all falls
/// in one day bucket, so only bookmarks marked to keep, the oldest point and the region's
/// end survive).
const KEEP_ALL_S: u64 = 2;

fn site() -> Site {
    let site = Site::create(&[("vol0", SIZE)], SiteOptions::default());
    // The policy goes right after the group's name, so it is an inline table.
    site.add_appliance_settings(
        &format!("journal_segment_bytes = {MIB}\n"),
        &format!(
            "journal_compress = false\n\
             consolidation = {{ keep_all_s = {KEEP_ALL_S}, interval_s = 86400, \
             tier = [{{ every_s = 86400, for_s = 604800 }}] }}\n"
        ),
    );
    site
}

/// One round: 48 writes of 64 KiB at 64 KiB-aligned places in the first 4 MiB (so rounds
/// overwrite each other's blocks), one qemu-io process.
fn write_round(site: &Site, model: &mut Model, rng: &mut SplitMix64) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for _ in 0..48 {
        let offset = rng.below(64) * 64 * 1024;
        let byte = (rng.below(255) + 1) as u8;
        cmd.arg("-c")
            .arg(format!("write -P {byte:#x} {offset} {}", 64 * 1024));
        model.fill(offset, 64 * 1024, byte);
    }
    cmd.arg(site.nbd_uri("vol0"));
    run_ok(&mut cmd, T);
}

fn bookmark(site: &Site, name: &str, keep: bool) -> u64 {
    let mut args = vec!["bookmark", "create", name, "--json"];
    if keep {
        args.push("--keep");
    }
    site.cdp_json(&args)["seq"].as_u64().expect("bookmark seq")
}

/// Opens the image at `at` and compares it with `model`; `Err` with the refusal if the point
/// cannot be opened.
fn check_point(site: &Site, at: &str, model: &Model) -> Result<(), String> {
    let out = run(&mut site.cdp(&["image", "access", "--at", at, "--json"]), T);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).expect("image json");
    let file = site.root().join("point.img");
    let _ = std::fs::remove_file(&file);
    copy_export(&site.image_uri(&image, "vol0"), &file);
    model.check_file(&format!("image at {at}"), &file);
    release_image(&image, |a| site.cdp_json(a));
    Ok(())
}

fn group_status(site: &Site) -> serde_json::Value {
    site.status()["groups"][0].clone()
}

/// Bytes the group's journal and undo stream hold on disk.
fn history_disk_bytes(site: &Site) -> u64 {
    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
    let group = site.root().join("appliance/groups/default");
    dir_bytes(&group.join("journal/journal")) + dir_bytes(&group.join("undo/journal"))
}

/// Writes rounds with a bookmark after each; returns (name, model, keep) per bookmark.
fn rounds(
    site: &Site,
    model: &mut Model,
    rng: &mut SplitMix64,
    prefix: &str,
    count: usize,
) -> Vec<(String, Model, bool)> {
    (0..count)
        .map(|i| {
            write_round(site, model, rng);
            let name = format!("{prefix}{i}");
            let keep = i % 3 == 0;
            bookmark(site, &name, keep);
            (name, model.clone(), keep)
        })
        .collect()
}

/// Waits (on the clock: the policy is about age) until everything so far is older than
/// `KEEP_ALL_S`.
fn age_past_keep_all(since: Instant) {
    let aged = poll_until(Duration::from_secs(KEEP_ALL_S + 10), || {
        since.elapsed() > Duration::from_millis(KEEP_ALL_S * 1000 + 200)
    });
    assert!(aged);
}

#[test]
fn consolidation_keeps_kept_points_exact_and_frees_space() {
    // Goal: consolidation frees space, every kept point stays exact (image, logged rollback
    // and roll-forward, restart), points it dropped are refused with a clear reason, young
    // points are untouched, and the journal stays valid. Method: byte models of vol0 at every
    // bookmark; images read whole with qemu-img; status and the files on disk for space.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut rng = SplitMix64(seed("consolidation"));
    let mut site = site();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);
    let mut model = Model::zeroed(SIZE);
    let old = rounds(&site, &mut model, &mut rng, "old", 8);
    let old_done = Instant::now();
    site.settle();
    age_past_keep_all(old_done);
    let young = rounds(&site, &mut model, &mut rng, "young", 2);
    site.settle();

    let before = group_status(&site);
    let disk_before = history_disk_bytes(&site);
    let answer = site.cdp_json(&["journal", "consolidate", "--json"]);
    let report = &answer["consolidation"];
    eprintln!("consolidation: {report:#}");
    let freed = report["bytes_freed"].as_u64().expect("bytes_freed");
    assert!(
        report["payloads_dropped"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
    let after = group_status(&site);
    let held = |g: &serde_json::Value| {
        g["journal_bytes"].as_u64().unwrap_or(0) + g["undo_bytes"].as_u64().unwrap_or(0)
    };
    assert_eq!(held(&before) - freed, held(&after), "{before:#}\n{after:#}");
    let disk_after = history_disk_bytes(&site);
    eprintln!(
        "history on disk: {disk_before} -> {disk_after} bytes ({:.1}x smaller)",
        disk_before as f64 / disk_after.max(1) as f64
    );
    assert_eq!(
        disk_before - disk_after,
        freed,
        "files on disk vs the report"
    );
    // Eight rounds over the same 4 MiB: the old region keeps little more than the last
    // bytes of each block and the before-images of three kept points.
    let (region_before, region_after) = (
        report["bytes_before"].as_u64().unwrap_or(0),
        report["bytes_after"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(
        region_after * 2 < region_before,
        "consolidated segments did not shrink by half: {region_before} -> {region_after}"
    );
    assert_eq!(after["consolidation"]["passes"], 1, "{after:#}");

    // Kept and young points are exact; dropped ones are refused and listed as such.
    let listed = site.cdp_json(&["bookmark", "list", "--json"]);
    let mut refused = 0;
    for (name, want, keep) in old.iter().chain(&young) {
        let entry = listed["bookmarks"]
            .as_array()
            .and_then(|l| l.iter().find(|b| b["name"] == name.as_str()))
            .unwrap_or_else(|| panic!("bookmark {name} not listed: {listed}"));
        match check_point(&site, name, want) {
            Ok(()) => assert_eq!(entry["consolidated"], false, "{name}: {entry}"),
            Err(e) => {
                assert!(!keep && !name.starts_with("young"), "{name} refused: {e}");
                assert!(e.contains("consolidated away"), "{name}: {e}");
                assert_eq!(entry["consolidated"], true, "{name}: {entry}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "consolidation dropped no bookmark's point");
    // The timeline lists the kept points of the consolidated region: the kept bookmarks are
    // among them, the refused ones are not.
    let timeline = site.cdp_json(&["timeline", "--json"]);
    let kept_seqs: Vec<u64> = timeline["consolidated"]["kept"]
        .as_array()
        .unwrap_or_else(|| panic!("no consolidated region in {timeline}"))
        .iter()
        .filter_map(|k| k["seq"].as_u64())
        .collect();
    for b in listed["bookmarks"].as_array().expect("bookmarks") {
        let seq = b["seq"].as_u64().expect("seq");
        let below = timeline["consolidated"]["below_seq"]
            .as_u64()
            .expect("below_seq");
        if seq < below {
            assert_eq!(
                kept_seqs.contains(&seq),
                b["consolidated"] == false,
                "bookmark {b} vs timeline {timeline}"
            );
        }
    }

    // Logged access to a kept point in consolidated history rolls the replica back exactly;
    // release rolls it forward through the thinned-out journal to production.
    let (name, want, _) = &old[3];
    let logged = site.cdp_json(&["image", "access", "--at", name, "--logged", "--json"]);
    assert_eq!(logged["state"], "ready", "{logged}");
    want.check_file("replica rolled back", &site.volume("vol0").replica);
    release_image(&logged, |a| site.cdp_json(a));
    site.settle();
    model.check_file("production", &site.volume("vol0").production);
    site.assert_replica_equals_production("vol0");

    // A restart rebuilds the index from the rewritten files and keeps refusing.
    site.restart_appliance();
    site.settle();
    for (name, want, keep) in &old {
        let opened = check_point(&site, name, want);
        if *keep {
            opened.unwrap_or_else(|e| panic!("kept {name} refused after restart: {e}"));
        }
    }

    // More history, consolidated while the appliance is killed at seeded instants; the kept
    // points of both generations must survive.
    let more = rounds(&site, &mut model, &mut rng, "more", 6);
    site.settle();
    age_past_keep_all(Instant::now());
    let mut child = site
        .cdp(&["journal", "consolidate", "--json"])
        .spawn()
        .expect("cdp");
    std::thread::sleep(Duration::from_millis(rng.below(600)));
    site.kill_appliance();
    let _ = wait_child(&mut child, T);
    site.start_role(Role::Appliance);
    site.settle();
    site.cdp_json(&["journal", "consolidate", "--json"]);
    for (name, want, keep) in old.iter().chain(&more) {
        let opened = check_point(&site, name, want);
        if *keep {
            opened.unwrap_or_else(|e| panic!("kept {name} refused after a crash: {e}"));
        }
    }
    model.check_file("production", &site.volume("vol0").production);
    site.assert_replica_equals_production("vol0");

    // Offline, the consolidated journal and undo stream are valid.
    site.terminate(Role::Splitter, T);
    site.terminate(Role::Appliance, T);
    let group = site.root().join("appliance/groups/default");
    for stream in ["journal", "undo"] {
        let out = run(
            Command::new(cdp_bin())
                .args(["journal", "inspect", "--json"])
                .arg(group.join(stream)),
            T,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "inspect {stream}: {text}");
        assert!(text.contains("\"payloads_dropped\""), "{text}");
    }
}
