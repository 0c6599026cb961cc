//! ext4 on a loop device over nbdfuse over the splitter: a real filesystem's write, flush and
//! discard traffic, checked by fsck, by file contents after remount, and by the replica.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 128 * MIB;
const T: Duration = Duration::from_secs(120);

/// Undoes the mount stack in reverse order on every exit, including a failed assertion.
struct Teardown {
    fs_mount: Option<PathBuf>,
    loop_dev: Option<String>,
    fuse_mount: Option<PathBuf>,
    nbdfuse: Option<Child>,
}

impl Teardown {
    fn umount_fs(&mut self) {
        if let Some(m) = self.fs_mount.take() {
            run_ok(Command::new("umount").arg(&m), T);
        }
    }

    fn detach_loop(&mut self) {
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev), T);
        }
    }

    fn unmount_fuse(&mut self) {
        if let Some(m) = self.fuse_mount.take() {
            run_ok(Command::new("fusermount3").arg("-u").arg(&m), T);
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let status = wait_child(&mut child, T).expect("nbdfuse did not exit after unmount");
            assert!(status.success(), "nbdfuse exited with {status}");
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        // Best effort: errors here must not hide the original failure.
        if let Some(m) = self.fs_mount.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        if let Some(m) = self.fuse_mount.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&m)
                .status();
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Seeded files: (name, content). Sizes range from empty to a few MiB, some not block-aligned.
fn files(seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = SplitMix64(seed);
    (0..24)
        .map(|i| {
            let len = match i % 4 {
                0 => rng.below(4096) as usize,
                1 => 4096 * (1 + rng.below(16) as usize),
                2 => rng.below(MIB) as usize,
                _ => (MIB + rng.below(3 * MIB)) as usize,
            };
            (
                format!("dir{}/file{i}.bin", i % 3),
                pattern(rng.next_u64(), len),
            )
        })
        .collect()
}

fn check_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, content) in files {
        let got = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        if got != *content {
            let at = first_difference(content, &got, |_| true);
            panic!(
                "{name}: content differs (len {} vs {}, first difference at {at:?})",
                content.len(),
                got.len()
            );
        }
    }
}

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
    let fuse_dir = site.root().join("fuse");
    let fs_dir = site.root().join("fs");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&fs_dir).unwrap();
    let mut td = Teardown {
        fs_mount: None,
        loop_dev: None,
        fuse_mount: None,
        nbdfuse: None,
    };

    // nbdfuse stays in the foreground; it writes the pid file once it serves the file.
    let pidfile = site.root().join("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(site.nbd_uri("vol0"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    td.nbdfuse = Some(child);
    td.fuse_mount = Some(fuse_dir.clone());
    let ready = poll_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| !s.trim().is_empty())
    });
    assert!(ready, "nbdfuse did not become ready");
    let image = fuse_dir.join("nbd");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), SIZE);

    let out = run(
        Command::new("losetup").args(["-f", "--show"]).arg(&image),
        T,
    );
    assert!(
        out.status.success(),
        "losetup could not attach a loop device (are loop devices available in this \
         container? /dev/loop-control must exist and the kernel must have the loop driver): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    td.loop_dev = Some(dev.clone());

    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &dev]), T);
    run_ok(
        Command::new("mount")
            .args(["-t", "ext4", "-o", "discard", &dev])
            .arg(&fs_dir),
        T,
    );
    td.fs_mount = Some(fs_dir.clone());

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
    td.umount_fs();

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

    run_ok(
        Command::new("mount")
            .args(["-t", "ext4", "-o", "ro", &dev])
            .arg(&fs_dir),
        T,
    );
    td.fs_mount = Some(fs_dir.clone());
    check_files(&fs_dir, &kept);
    for (name, _) in files.iter().step_by(5) {
        assert!(!fs_dir.join(name).exists(), "{name} was deleted but exists");
    }
    td.umount_fs();
    td.detach_loop();
    td.unmount_fuse();

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
