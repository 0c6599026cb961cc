//! Remote replication after the local journal released history it never shipped: the remote
//! copy is resynchronised by regions (only the differing ones are sent), says so, and then
//! follows the journal again.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cli::{copy_export, release_image};
use common::replication::wait_shipped;
use common::*;

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(120);

fn requirements() -> bool {
    !reference_mode() && requires("qemu-io") && requires("qemu-img")
}

/// One qemu-io run of patterned writes `(offset, len, byte)`, acknowledged one by one.
fn write(site: &Site, model: &mut Model, writes: &[(u64, u64, u8)]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for &(offset, len, byte) in writes {
        cmd.arg("-c")
            .arg(format!("write -P {byte:#x} {offset} {len}"));
        model.fill(offset, len, byte);
    }
    cmd.arg(site.nbd_uri("vol0"));
    run_ok(&mut cmd, T);
}

/// A whole log file (`Site::logs` keeps only the tail, and a source retrying its link to a
/// dead remote logs a lot).
fn whole_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Opens the remote's image at bookmark `name`, reads it whole and compares it with `model`;
/// returns the image's seq.
fn check_remote_image(site: &Site, remote: &RemoteAppliance, name: &str, model: &Model) -> u64 {
    let image = remote.cdp_json(&["image", "access", "--at", name, "--json"]);
    let file = remote.root().join(format!("{name}.img"));
    copy_export(&site.image_uri(&image, "vol0"), &file);
    model.check_file(&format!("remote image at {name}"), &file);
    release_image(&image, |a| remote.cdp_json(a));
    image["seq"].as_u64().expect("image seq")
}

#[test]
fn released_unshipped_history_resyncs_only_the_differing_regions() {
    // Goal: issue 6 item 6. While the remote copy is down, the local journal (4 MiB capacity,
    // `unshipped_history = "release"`) releases history the remote never received; when the
    // remote comes back it is resynchronised by regions, only the regions that differ are
    // sent, status and both logs say so, and shipping then goes on. Method: 16 MiB written
    // and shipped; remote killed; 6 chosen 1 MiB regions rewritten 5 times each (30 MiB, far
    // past the capacity); remote restarted. Exactly those 6 of 64 regions must be sent; the
    // remote replica equals production (and the model); a bookmark taken afterwards opens
    // at the remote equal to the model. Then the same with the remote killed at a seeded
    // instant while it comes back: the next connection resynchronises again (never more than
    // the 6 regions) and the remote converges.
    if !requirements() {
        return;
    }
    let volumes = [("vol0", VOLUME_BYTES)];
    let mut remote = RemoteAppliance::start(&volumes);
    let mut site = Site::create(&volumes, SiteOptions::default());
    site.add_appliance_settings(
        &format!("journal_segment_bytes = {MIB}\n"),
        &format!(
            "journal_compress = false\njournal_capacity_bytes = {}\n",
            4 * MIB
        ),
    );
    add_remote_to_site_config(&site, &remote.endpoint, 30);
    // `[group.remote]` is the config's last table: these keys land in it.
    let text = std::fs::read_to_string(&site.appliance_config).unwrap();
    std::fs::write(
        &site.appliance_config,
        text + "unshipped_history = \"release\"\n",
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.wait_connected(T);

    let mut model = Model::zeroed(VOLUME_BYTES);
    let first: Vec<(u64, u64, u8)> = (0..16)
        .map(|i| (i * 4 * MIB, MIB, 0x10 + i as u8))
        .collect();
    write(&site, &mut model, &first);
    site.flush_all();
    let shipped_before = wait_shipped(&site, &remote);

    remote.kill();
    let regions = [3u64, 17, 18, 40, 41, 63];
    for round in 0..5u8 {
        let writes: Vec<(u64, u64, u8)> = regions
            .iter()
            .map(|&r| (r * MIB, MIB, 0x80 + round * 8 + r as u8 % 8))
            .collect();
        write(&site, &mut model, &writes);
    }
    site.settle();
    // Retention runs after distribution: wait until it released past what the remote has
    // (the journal's first record lies beyond the remote's next one) and said so.
    let released = poll_until(T, || {
        site.status()["groups"][0]["first_seq"]
            .as_u64()
            .unwrap_or(0)
            > shipped_before + 1
            && whole_log(&site.log_path(Role::Appliance))
                .contains("released history the remote copy has not received")
    });
    assert!(
        released,
        "the journal did not release unshipped history: {}",
        site.status()
    );

    remote.start_process();
    site.flush_all();
    let last = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    let status = site.status();
    let resync = &status["groups"][0]["remote"]["last_region_resync"];
    eprintln!("resync: {resync}");
    assert_eq!(resync["regions_compared"], 64, "{status}");
    assert_eq!(
        resync["regions_sent"],
        regions.len() as u64,
        "only the rewritten regions differ: {status}"
    );
    assert_eq!(resync["bytes_sent"], regions.len() as u64 * MIB, "{status}");
    assert!(whole_log(&site.log_path(Role::Appliance)).contains("resynchronised by regions"));
    assert!(whole_log(&remote.log_path()).contains("resynchronising by regions"));
    model.check_file("production", &site.volume("vol0").production);
    model.check_file("remote replica after the resync", remote.replica("vol0"));

    // Shipping goes on after the resync point: new writes and a bookmark reach the remote.
    write(&site, &mut model, &[(5 * MIB, 2 * MIB, 0x5a)]);
    let b = site.cdp_json(&["bookmark", "create", "after-resync", "--json"]);
    let last = wait_shipped(&site, &remote);
    assert!(last >= b["seq"].as_u64().unwrap_or(u64::MAX));
    check_remote_image(&site, &remote, "after-resync", &model);
    remote.wait_distributed(last, T);
    model.check_file("remote replica after the resync", remote.replica("vol0"));

    // Again, but the remote is killed at a seeded instant while it comes back (during the
    // resync, or just before or after it): the next connection finishes the job.
    let mut rng = SplitMix64(seed("remote_resync"));
    let shipped_before = last;
    remote.kill();
    for round in 0..5u8 {
        let writes: Vec<(u64, u64, u8)> = regions
            .iter()
            .map(|&r| (r * MIB, MIB, 0x30 + round * 8 + r as u8 % 8))
            .collect();
        write(&site, &mut model, &writes);
    }
    site.settle();
    assert!(poll_until(T, || {
        site.status()["groups"][0]["first_seq"]
            .as_u64()
            .unwrap_or(0)
            > shipped_before + 1
            && whole_log(&site.log_path(Role::Appliance))
                .matches("released history the remote copy has not received")
                .count()
                >= 2
    }));
    remote.start_process();
    std::thread::sleep(Duration::from_millis(rng.below(300)));
    remote.kill();
    remote.start_process();
    site.flush_all();
    let last = wait_shipped(&site, &remote);
    remote.wait_distributed(last, T);
    let status = site.status();
    let resync = &status["groups"][0]["remote"]["last_region_resync"];
    assert!(
        resync["regions_sent"].as_u64().unwrap_or(u64::MAX) <= regions.len() as u64,
        "{status}"
    );
    model.check_file(
        "remote replica after an interrupted resync",
        remote.replica("vol0"),
    );
    let b = site.cdp_json(&["bookmark", "create", "after-crash", "--json"]);
    wait_shipped(&site, &remote);
    let seq = check_remote_image(&site, &remote, "after-crash", &model);
    assert_eq!(Some(seq), b["seq"].as_u64(), "the bookmark's point");
}
