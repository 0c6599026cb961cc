//! Marking mode: the splitter keeps serving the host while the appliance is gone, records the
//! changed regions in its dirty bitmap, and resynchronises exactly those regions afterwards.

mod common;

use common::link_proxy::LinkProxy;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The splitter's dirty-bitmap region size (splitter/src/dirty_bitmap.rs).
const REGION: u64 = 64 * 1024;

fn qemu_io(uri: &str, commands: &[String], timeout: Duration) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run_ok(cmd.arg(uri), timeout);
    assert!(!out.contains("failed"), "qemu-io {commands:?}:\n{out}");
    out
}

#[test]
fn outage_is_marked_and_only_dirty_regions_are_resynced() {
    // Goal: with the appliance gone, host writes and flushes still succeed at once; after it
    // returns, the resync copies exactly the dirtied regions (counted) and the replica equals
    // production and the model; history from before the outage is untouched. Method: kill the
    // appliance, write 8 scattered 4 KiB blocks in distinct 64 KiB regions plus one aligned
    // 1 MiB write (16 regions) with qemu-io (which must finish while the appliance is still
    // down), restart the appliance, settle, and read the splitter's resync count.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 64 * MIB)]);
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(64 * MIB);
    qemu_io(
        &uri,
        &["write -P 0x11 0 8M".into(), "flush".into()],
        Duration::from_secs(60),
    );
    model.fill(0, 8 * MIB, 0x11);
    site.settle();
    let before = site.status()["groups"][0]["last_seq"].as_u64().unwrap();
    let before_outage = model.clone();

    site.kill_appliance();
    let mut commands = Vec::new();
    for i in 0..8u64 {
        // Regions 200, 210, ... : one 4 KiB block somewhere inside each.
        let offset = (200 + 10 * i) * REGION + 4096 * (i % 4);
        commands.push(format!("write -P {:#x} {offset} 4096", 0x40 + i));
        model.fill(offset, 4096, 0x40 + i as u8);
    }
    commands.push(format!("write -P 0x77 {} 1M", 32 * MIB));
    model.fill(32 * MIB, MIB, 0x77);
    commands.push("flush".into());
    // No appliance: the host must still be served promptly (marking mode), flush included.
    qemu_io(&uri, &commands, Duration::from_secs(30));
    model.check_file("production", &site.volume("vol0").production);
    assert!(
        site.logs().contains("marking mode"),
        "splitter did not report marking mode\n{}",
        site.logs()
    );

    site.start_role(Role::Appliance);
    site.settle();
    let copied = poll_until(Duration::from_secs(30), || {
        site.resync_copied_bytes().is_some()
    });
    assert!(copied, "no resync completed\n{}", site.logs());
    let dirty_regions = 8 + MIB / REGION;
    assert_eq!(
        site.resync_copied_bytes(),
        Some(dirty_regions * REGION),
        "resync copied a different amount than the {dirty_regions} dirtied regions\n{}",
        site.logs()
    );
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
    let after = site.status()["groups"][0]["last_seq"].as_u64().unwrap();
    assert_eq!(
        after,
        before + dirty_regions + 2,
        "one journal record per copied region, between a ResyncStart and a ResyncEnd marker"
    );
    // Points inside the resync are refused as recovery points; its ends are not.
    let resolve = |point: String| {
        run(
            Command::new(cdp_bin())
                .args(["point", "resolve", "default", &point, "--control"])
                .arg(site.root().join("appliance.ctl")),
            Duration::from_secs(30),
        )
    };
    // The ResyncStart record itself (before + 1) is stamped after the splitter began
    // marking, so it lacks the marked writes too: refused since the marking moment is known.
    for ok in [before, after] {
        let out = resolve(format!("seq:{ok}"));
        assert!(
            out.status.success(),
            "seq {ok} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let inside = resolve(format!("seq:{}", before + 5));
    assert!(
        !inside.status.success(),
        "a point inside the resync was offered"
    );
    assert!(
        // After marking the refusal names the marking moment as well as the resync.
        String::from_utf8_lossy(&inside.stderr)
            .contains("volume vol0's splitter was in marking mode"),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    // The resync destroyed no history: the point before the outage is still exact, and so
    // is the one after the resync.
    for (seq, want) in [(before, &before_outage), (after, &model)] {
        let at = format!("seq:{seq}");
        let image = site.cdp_json(&["image", "access", "--at", &at, "--json"]);
        let file = site.root().join(format!("image-{seq}.img"));
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(site.image_uri(&image, "vol0"))
                .arg(&file),
            Duration::from_secs(60),
        );
        want.check_file(&format!("image at seq {seq}"), &file);
        site.cdp_json(&[
            "image",
            "release",
            image["id"].as_str().expect("id"),
            "--json",
        ]);
    }
}

#[test]
fn splitter_stopped_while_marking_resyncs_at_next_start() {
    // Goal: a splitter that stops (cleanly) while marking remembers what is dirty, and its next
    // start resynchronises it. Method: kill the appliance, write, SIGTERM the splitter, start
    // the appliance, start the splitter again, settle, compare replica with production.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::start(&[("vol0", 16 * MIB)]);
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(16 * MIB);
    site.kill_appliance();
    qemu_io(
        &uri,
        &[format!("write -P 0x5a {} 256k", 3 * MIB), "flush".into()],
        Duration::from_secs(30),
    );
    model.fill(3 * MIB, 256 * 1024, 0x5a);
    let status = site.terminate(Role::Splitter, Duration::from_secs(30));
    assert!(status.success(), "splitter stop: {status}\n{}", site.logs());
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.settle();
    assert_eq!(
        site.resync_copied_bytes(),
        Some(256 * 1024),
        "{}",
        site.logs()
    );
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}

#[test]
fn block_policy_holds_host_writes_until_the_appliance_returns() {
    // Goal: on_appliance_loss = "block" makes host writes wait for the appliance instead of
    // marking. Method: with the appliance killed, a qemu-io write must still be running after
    // the splitter has certainly noticed the loss (its reconnect attempts are logged at debug,
    // so wait for the link-lost warning), finish once the appliance is back, and the replica
    // must equal production with no resync.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::create(&[("vol0", 16 * MIB)], SiteOptions::default());
    let text = std::fs::read_to_string(&site.splitter_config).unwrap();
    std::fs::write(
        &site.splitter_config,
        format!("on_appliance_loss = \"block\"\n{text}"),
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let uri = site.nbd_uri("vol0");
    site.kill_appliance();
    assert!(poll_until(Duration::from_secs(10), || site
        .logs()
        .contains("split link lost")));
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x66 0 64k", "-c", "flush"])
        .arg(&uri)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(site.root().join("writer.log")).unwrap())
        .stderr(std::fs::File::create(site.root().join("writer.err")).unwrap())
        .spawn()
        .unwrap();
    // The write is held: it has not finished after a generous wait for a local operation.
    let finished_early = poll_until(Duration::from_secs(3), || {
        writer.try_wait().unwrap().is_some()
    });
    assert!(
        !finished_early,
        "a host write completed with the appliance down under the block policy"
    );
    site.start_role(Role::Appliance);
    let status = wait_child(&mut writer, Duration::from_secs(60)).expect("write never finished");
    assert!(
        status.success(),
        "qemu-io: {status}\n{}{}\n{}",
        std::fs::read_to_string(site.root().join("writer.log")).unwrap_or_default(),
        std::fs::read_to_string(site.root().join("writer.err")).unwrap_or_default(),
        site.logs()
    );
    site.settle();
    let mut model = Model::zeroed(16 * MIB);
    model.fill(0, 64 * 1024, 0x66);
    model.check_file("replica", &site.volume("vol0").replica);
    assert!(!site.logs().contains("marking mode"), "{}", site.logs());
}

#[test]
fn appliance_killed_during_fio_verify_host_sees_no_error() {
    // Goal: an appliance crash in the middle of a verified fio run is invisible to the host
    // (marking mode), and the replica converges afterwards. Method: fio random writes with
    // crc32c verify over NBD; once the journal shows progress, SIGKILL the appliance; once fio
    // has written more while it was down (production changes), restart it; fio must exit 0
    // with no verify errors, and the replica must equal production after settling.
    if reference_mode() || !requires("fio") || !requires("qemu-img") || !requires("qemu-io") {
        return;
    }
    let mut site = Site::start(&[("vol0", 64 * MIB)]);
    let uri = site.nbd_uri("vol0");
    let mut fio = Command::new("fio")
        .current_dir(site.root())
        .args([
            "--name=marking",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=48M",
            "--verify=crc32c",
            "--fsync=64",
            "--rate=40m",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(site.root().join("fio.out")).unwrap())
        .stderr(std::fs::File::create(site.root().join("fio.err")).unwrap())
        .spawn()
        .unwrap();
    let journaled = || site.status()["groups"][0]["last_seq"].as_u64().unwrap_or(0);
    assert!(
        poll_until(Duration::from_secs(60), || journaled() > 500),
        "fio made no progress\n{}",
        site.logs()
    );
    site.kill_appliance();
    let production = site.volume("vol0").production.clone();
    let before = std::fs::read(&production).unwrap();
    assert!(
        poll_until(Duration::from_secs(60), || std::fs::read(&production)
            .unwrap()
            != before),
        "the host was not served while the appliance was down"
    );
    site.start_role(Role::Appliance);
    let status = wait_child(&mut fio, Duration::from_secs(240)).expect("fio did not finish");
    let out = std::fs::read_to_string(site.root().join("fio.out")).unwrap_or_default();
    let err = std::fs::read_to_string(site.root().join("fio.err")).unwrap_or_default();
    assert!(
        status.success(),
        "fio: {status}\n{out}\n{err}\n{}",
        site.logs()
    );
    assert!(!out.contains("verify: bad"), "{out}");
    site.settle();
    site.assert_replica_equals_production("vol0");
    assert!(site.logs().contains("resync complete"), "{}", site.logs());
}

#[test]
fn link_cut_is_marked_and_resynced_without_a_crash() {
    // Goal: the same guarantees when the split link is cut (both processes stay up) rather
    // than the appliance crashing: the host is served while cut, the resync copies exactly the
    // dirtied regions, and the replica equals production and the model. Method: the split link
    // runs over TCP through a forwarder the test controls; cut it, write 4 blocks in distinct
    // regions with qemu-io, restore it, settle, count the copied bytes.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let options = SiteOptions {
        link_tcp: true,
        nbd_tcp: false,
    };
    let mut site = Site::create(&[("vol0", 32 * MIB)], options);
    let text = std::fs::read_to_string(&site.splitter_config).unwrap();
    let target = text
        .lines()
        .find_map(|l| l.strip_prefix("appliance = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("appliance address in splitter.toml")
        .to_string();
    let proxy = LinkProxy::start(target.clone());
    std::fs::write(
        &site.splitter_config,
        text.replace(
            &format!("appliance = \"{target}\""),
            &format!("appliance = \"127.0.0.1:{}\"", proxy.port),
        ),
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    site.settle();
    let uri = site.nbd_uri("vol0");
    let mut model = Model::zeroed(32 * MIB);
    let copied_before = site.resync_copied_bytes().unwrap_or(0);

    proxy.cut();
    assert!(poll_until(Duration::from_secs(10), || site
        .logs()
        .contains("marking mode")));
    let mut commands = Vec::new();
    for i in 0..4u64 {
        let offset = (100 + 7 * i) * REGION + 512;
        commands.push(format!("write -P {:#x} {offset} 8192", 0x20 + i));
        model.fill(offset, 8192, 0x20 + i as u8);
    }
    commands.push("flush".into());
    qemu_io(&uri, &commands, Duration::from_secs(30));
    assert!(
        poll_until(Duration::from_secs(10), || site.status()["groups"][0]
            ["volumes"][0]["connected"]
            == false),
        "the appliance still sees the splitter through a cut link"
    );
    proxy.restore();
    site.settle();
    assert_eq!(
        site.resync_copied_bytes().unwrap_or(0) - copied_before,
        4 * REGION,
        "{}",
        site.logs()
    );
    model.check_file("replica", &site.volume("vol0").replica);
    site.assert_replica_equals_production("vol0");
}
