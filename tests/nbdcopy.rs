//! nbdcopy in and out of a volume over several connections: bytes survive the round trip and
//! the replica converges to production.

mod common;

use common::*;
use rand::{RngCore, SeedableRng};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

#[test]
fn nbdcopy_round_trip_and_replica() {
    // Goal: a bulk copy over multiple NBD connections (nbdcopy uses 4 by default with
    // multi-conn) stores exactly the source, including all-zero stretches that nbdcopy sends as
    // WRITE_ZEROES. Method: copy a seeded random file with a zero hole in, copy the volume out,
    // compare both with the source, and compare production and the replica with it.
    if !requires("nbdcopy") || !requires("qemu-img") {
        return;
    }
    let seed = seed("nbdcopy");
    let site = Site::start(&[("vol0", SIZE)]);
    let uri = site.nbd_uri("vol0");

    // Dirty the volume first so that the copy's zero stretch must really overwrite data.
    let junk = site.root().join("junk.bin");
    std::fs::write(&junk, pattern(seed ^ 0xdead, SIZE as usize)).unwrap();
    run_ok(
        Command::new("nbdcopy").arg("--flush").arg(&junk).arg(&uri),
        Duration::from_secs(300),
    );

    let mut data = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    // A zero hole of 8 MiB, and a second one that is not aligned to 64 KiB.
    data[(8 * MIB) as usize..(16 * MIB) as usize].fill(0);
    data[(40 * MIB + 1234) as usize..(41 * MIB + 99) as usize].fill(0);
    let source = site.root().join("source.bin");
    std::fs::write(&source, &data).unwrap();

    run_ok(
        Command::new("nbdcopy")
            .args(["--flush", "--connections=4", "--requests=16"])
            .arg(&source)
            .arg(&uri),
        Duration::from_secs(300),
    );
    let copied_out = site.root().join("out.bin");
    run_ok(
        Command::new("nbdcopy").arg(&uri).arg(&copied_out),
        Duration::from_secs(300),
    );

    let mut model = Model::zeroed(SIZE);
    model.write(0, &data);
    model.check_file("nbdcopy output", &copied_out);
    model.check_file("production vol0", &site.volume("vol0").production);
    site.settle();
    site.assert_replica_equals_production("vol0");
}
