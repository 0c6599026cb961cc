//! Protecting a volume that already holds data: the replica must start as a copy of production.

mod common;

use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
#[ignore = "initial synchronisation of existing production data is not implemented yet"]
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
