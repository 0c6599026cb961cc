//! Helpers shared by the remote replication tests: patterned host writes through the real
//! splitter, and waiting until the remote copy acknowledged the whole local journal.

use std::process::Command;
use std::time::Duration;

use super::{poll_until, run_ok, Model, RemoteAppliance, Site, SplitMix64};

/// Long enough for a busy machine; the condition is polled, so a pass returns at once.
const SHIPPED_DEADLINE: Duration = Duration::from_secs(300);

/// `count` writes of one-byte patterns (1..=`max_blocks` 4 KiB blocks each) at random
/// 4 KiB-aligned places of `vol0`, in one qemu-io run; each is acknowledged before the next is
/// sent. The model follows.
pub fn write_random_patterns(
    site: &Site,
    model: &mut Model,
    rng: &mut SplitMix64,
    count: usize,
    max_blocks: u64,
) {
    let size = site.volume("vol0").size;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for _ in 0..count {
        let len = (rng.below(max_blocks) + 1) * 4096;
        let offset = rng.below((size - len) / 4096) * 4096;
        let byte = (rng.below(255) + 1) as u8;
        cmd.arg("-c").arg(format!("write -P {byte} {offset} {len}"));
        model.fill(offset, len, byte);
    }
    cmd.arg(site.nbd_uri("vol0"));
    run_ok(&mut cmd, Duration::from_secs(120));
}

/// Waits until the remote acknowledged every record of the local journal; returns last_seq.
pub fn wait_shipped(site: &Site, remote: &RemoteAppliance) -> u64 {
    let mut last = 0;
    let ok = poll_until(SHIPPED_DEADLINE, || {
        let g = &site.status()["groups"][0];
        last = g["last_seq"].as_u64().unwrap_or(0);
        g["remote"]["shipped_seq"].as_u64() == Some(last) && last > 0
    });
    assert!(
        ok,
        "remote did not catch up: {}\n{}\n{}",
        site.status(),
        site.logs(),
        remote.logs()
    );
    last
}
