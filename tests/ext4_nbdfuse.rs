//! ext4 on a loop device over nbdfuse over the splitter: a real filesystem's write, flush and
//! discard traffic, checked by fsck, by file contents after remount, and by the replica.

mod common;

use common::mount::{check_files, files, FuseLoop};
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 128 * MIB;
const T: Duration = Duration::from_secs(120);

#[test]
fn ext4_on_loop_over_nbdfuse() {
    // Goal: a real filesystem, with its journal commits, flushes and discards, survives on the
    // volume and replicates exactly. Method: nbdfuse exposes the export as a file, a loop device
    // carries ext4 on it; write seeded files, unmount, e2fsck -fn, remount and compare the files,
    // tear down, then compare replica with production.
    if !requires("nbdfuse")
        || !requires("fusermount3")
        || !requires("losetup")
        || !requires("mkfs.ext4")
        || !requires("e2fsck")
        || !requires_condition(is_root(), "ext4_nbdfuse needs root (mount, losetup)")
        || !requires_condition(
            Path::new("/dev/fuse").exists(),
            "ext4_nbdfuse needs /dev/fuse",
        )
    {
        return;
    }
    let seed = seed("ext4_nbdfuse");
    let site = Site::start(&[("vol0", SIZE)]);
    let fs_dir = site.root().join("fs");
    let mut stack = FuseLoop::attach(&site.nbd_uri("vol0"), site.root(), false);
    assert_eq!(std::fs::metadata(stack.file()).unwrap().len(), SIZE);
    let dev = stack.dev.clone();
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]), T);
    stack.mount(&fs_dir, "discard");

    let files = files(seed);
    for (name, content) in &files {
        let path = fs_dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
    }
    // Delete some files and overwrite others so that discards and reuse reach the device.
    for (name, _) in files.iter().step_by(5) {
        std::fs::remove_file(fs_dir.join(name)).unwrap();
    }
    let kept: Vec<(String, Vec<u8>)> = files
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 0)
        .map(|(_, f)| f.clone())
        .collect();
    run_ok(Command::new("fstrim").arg(&fs_dir), T);
    run_ok(Command::new("sync").arg("-f").arg(&fs_dir), T);
    check_files(&fs_dir, &kept);
    stack.umount();

    // Drop the loop device's page cache so the checks below read through NBD.
    run_ok(Command::new("blockdev").args(["--flushbufs", &dev]), T);
    let out = run(Command::new("e2fsck").args(["-fn", &dev]), T);
    assert!(
        out.status.success(),
        "e2fsck -fn found problems ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    stack.mount(&fs_dir, "ro");
    check_files(&fs_dir, &kept);
    for (name, _) in files.iter().step_by(5) {
        assert!(!fs_dir.join(name).exists(), "{name} was deleted but exists");
    }
    stack.detach();

    site.settle();
    site.assert_replica_equals_production("vol0");
    // The filesystem in the production file is the one the host wrote.
    let out = run(
        Command::new("e2fsck")
            .arg("-fn")
            .arg(&site.volume("vol0").production),
        T,
    );
    assert!(
        out.status.success(),
        "e2fsck -fn of the production file: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
