//! Protecting a volume that already holds data: the replica must start as a copy of production.

mod common;

use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn preexisting_production_data_reaches_replica() {
    // Goal: when cdp starts protecting a volume that already has data (the usual case for an
    // administrator), the replica converges to production, not only to the writes made since.
    // Method: fill the production file with a seeded pattern before the first start, write a
    // little through NBD, wait for distribution, and compare replica with production.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::create(&[("vol0", 8 * MIB)], SiteOptions::default());
    std::fs::write(
        &site.volume("vol0").production,
        pattern(0x1417, (8 * MIB) as usize),
    )
    .unwrap();
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    run_ok(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 0 4096", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(60),
    );
    site.settle();
    site.assert_replica_equals_production("vol0");
}

#[test]
fn one_gib_volume_initializes_while_fio_writes() {
    // Goal: first-time initialization of a 1 GiB volume that already holds data runs in the
    // background while the host writes, copies exactly the allocated data (holes cost nothing),
    // and ends with replica == production. Method: write 128 MiB of seeded data into every
    // eighth MiB of a sparse 1 GiB production file before the first start; start cdp; run fio
    // random writes with verify at once; settle (waits for the splitter to report
    // "protecting"); compare, and check the copied byte count in the splitter's log.
    if reference_mode() || !requires("fio") || !requires("qemu-img") {
        return;
    }
    let mut site = Site::create(&[("vol0", 1024 * MIB)], SiteOptions::default());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&site.volume("vol0").production)
            .unwrap();
        for i in 0..128u64 {
            f.write_all_at(&pattern(i, MIB as usize), i * 8 * MIB)
                .unwrap();
        }
        f.sync_all().unwrap();
    }
    site.start_role(Role::Appliance);
    site.start_role(Role::Splitter);
    let out = run(
        std::process::Command::new("fio")
            .current_dir(site.root())
            .args([
                "--name=init",
                "--ioengine=nbd",
                &format!("--uri={}", site.nbd_uri("vol0")),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--size=64M",
                "--offset=512M",
                "--verify=crc32c",
            ]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "fio: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    site.settle();
    site.assert_replica_equals_production("vol0");
    let log = std::fs::read_to_string(site.root().join("splitter.log")).unwrap();
    assert!(log.contains("reason=initial"), "{log}");
    let copied = site.resync_copied_bytes().unwrap_or(0);
    // Every data MiB is copied once; fio's writes into holes before the copier reached them
    // may add at most the 64 KiB regions they touched inside its 64 MiB range.
    assert!(
        (128 * MIB..=128 * MIB + 64 * MIB).contains(&copied),
        "initialization copied {copied} bytes for 128 MiB of data\n{log}"
    );
}

#[test]
fn volume_resync_command_copies_everything_and_reports_progress() {
    // Goal: `cdp volume resync VOL` copies the whole volume again while protection goes on,
    // `cdp status` shows it, and the replica still equals production. Method: a 64 MiB volume
    // with 16 MiB of data; settle; run the command; read the splitter state from status until
    // it is protecting again; the copy count grows by exactly the data bytes.
    if reference_mode() || !requires("qemu-io") || !requires("qemu-img") {
        return;
    }
    let site = Site::start(&[("vol0", 64 * MIB)]);
    run_ok(
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5c 8M 16M", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(60),
    );
    site.settle();
    let before = site.resync_copied_bytes().unwrap_or(0);
    let out = run_ok(
        std::process::Command::new(cdp_bin())
            .args(["volume", "resync", "vol0", "--splitter-control"])
            .arg(site.splitter_control()),
        Duration::from_secs(30),
    );
    assert!(out.contains("full resync of vol0 started"), "{out}");
    // Without --no-wait the command follows the copy until the volume is protecting again.
    assert!(out.contains("resync of vol0 complete"), "{out}");
    let table = run_ok(
        std::process::Command::new(cdp_bin())
            .args(["status", "--control"])
            .arg(site.root().join("appliance.ctl"))
            .arg("--splitter-control")
            .arg(site.splitter_control()),
        Duration::from_secs(30),
    );
    assert!(table.contains("vol0"), "{table}");
    site.settle();
    assert_eq!(site.resync_copied_bytes().unwrap_or(0) - before, 16 * MIB);
    site.assert_replica_equals_production("vol0");
    let bad = run(
        std::process::Command::new(cdp_bin())
            .args(["volume", "resync", "nosuch", "--splitter-control"])
            .arg(site.splitter_control()),
        Duration::from_secs(30),
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no volume \"nosuch\""));
}
