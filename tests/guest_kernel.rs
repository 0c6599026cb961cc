//! The Linux kernel NBD client (nbd-client in a QEMU guest, ../shared/tools/nbd-guest) against the
//! splitter: ext4 written by the real kernel is intact in production and replicated exactly, and
//! a point-in-time image of it mounts in the kernel with the same file.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 96 * MIB;

/// The nbd-guest `run` script: ../shared/tools/nbd-guest/run beside the repository, or
/// NBD_GUEST_RUN.
fn guest_run() -> Option<PathBuf> {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/nbd-guest/run");
    if beside.exists() {
        return Some(beside);
    }
    std::env::var_os("NBD_GUEST_RUN").map(PathBuf::from)
}

/// The value the guest printed last after `key` (for example "GUEST_MD5 ").
fn console_field(console: &str, key: &str) -> String {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(key))
        .map(|s| s.trim().to_string())
        .next_back()
        .unwrap_or_else(|| panic!("guest printed no {key}:\n{console}"))
}

fn md5_of(path: &std::path::Path) -> String {
    let out = run_ok(Command::new("md5sum").arg(path), Duration::from_secs(60));
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn guest_kernel_ext4_md5() {
    // Goal: the kernel's NBD client (late handshake, its own request sizes, flushes and trims)
    // writes a filesystem that reads back correctly on the host and in the replica. Method: boot
    // the nbd-guest VM on the splitter's socket, let it make ext4 and write a random file whose
    // md5 it prints, then dump that file from the production image with debugfs and compare the
    // md5, check the filesystem with e2fsck, and compare replica with production.
    let Some(run_script) = guest_run() else {
        requires_condition(false, "nbd-guest kit not found (set NBD_GUEST_RUN)");
        return;
    };
    if !requires("debugfs") || !requires("md5sum") || !requires("qemu-system-x86_64") {
        return;
    }
    let site = Site::start(&[("vol0", SIZE)]);
    let script = tests_dir().join("guest/ext4-md5.sh");
    let out = run(
        Command::new(&run_script)
            .args(["--timeout", "300", "--export", "vol0"])
            .arg(&site.nbd_sock)
            .arg(&script),
        Duration::from_secs(360),
    );
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "nbd-guest run exited {}:\n{console}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        site.logs()
    );
    let field = |key: &str| console_field(&console, key);
    assert_eq!(
        field("GUEST_SIZE "),
        SIZE.to_string(),
        "size seen by the kernel"
    );
    let guest_md5 = field("GUEST_MD5 ");

    let production = &site.volume("vol0").production;
    let dumped = site.root().join("file.bin");
    run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /file.bin {}", dumped.display()))
            .arg(production),
        Duration::from_secs(60),
    );
    assert_eq!(
        md5_of(&dumped),
        guest_md5,
        "md5 of /file.bin in the production image differs from the guest's"
    );
    let fsck = run(
        Command::new("e2fsck").arg("-fn").arg(production),
        Duration::from_secs(60),
    );
    assert!(
        fsck.status.success(),
        "e2fsck -fn of production: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    site.settle();
    site.assert_replica_equals_production("vol0");

    // The same kernel client reads a point-in-time image: bookmark the filesystem, wreck
    // production's first 64 MiB, and mount the image at the bookmark in a second guest.
    site.cdp_json(&["bookmark", "create", "ext4-written", "--json"]);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 64M", "-c", "flush"])
            .arg(site.nbd_uri("vol0")),
        Duration::from_secs(120),
    );
    let image = site.cdp_json(&["image", "access", "--at", "ext4-written", "--json"]);
    let export = image["exports"][0]["export"].as_str().expect("export");
    let socket = image["nbd"]
        .as_str()
        .and_then(|n| n.strip_prefix("unix:"))
        .expect("image socket");
    let out = run(
        Command::new(&run_script)
            .args(["--timeout", "300", "--export", export, socket])
            .arg(tests_dir().join("guest/image-md5.sh")),
        Duration::from_secs(360),
    );
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "nbd-guest run on the image exited {}:\n{console}\n{}",
        out.status,
        site.logs()
    );
    let image_field = |key: &str| console_field(&console, key);
    assert_eq!(
        image_field("GUEST_RO "),
        "1",
        "the image export must be read-only"
    );
    assert_eq!(
        image_field("GUEST_MD5 "),
        guest_md5,
        "the image at the bookmark holds another /file.bin than the guest wrote"
    );
    site.cdp_json(&[
        "image",
        "release",
        image["id"].as_str().expect("id"),
        "--json",
    ]);
}
