//! An NBD export as a block device on the host, without the kernel's nbd driver: nbdfuse
//! shows the export as a file, a loop device carries it, and a filesystem may be mounted on
//! that. Dropping the stack undoes it in reverse order, also after a failed assertion.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{first_difference, pattern, poll_until, run, run_ok, wait_child, SplitMix64};

const MIB: u64 = 1 << 20;

const T: Duration = Duration::from_secs(120);

/// nbdfuse + loop device (+ mount) for one export.
pub struct FuseLoop {
    pub dev: String,
    mounted: Option<PathBuf>,
    loop_attached: bool,
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
}

impl FuseLoop {
    /// Attaches `uri` under `work` (a directory this stack may use); `read_only` makes both
    /// nbdfuse and the loop device read-only.
    pub fn attach(uri: &str, work: &Path, read_only: bool) -> FuseLoop {
        let fuse_dir = work.join("fuse");
        std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
        // nbdfuse stays in the foreground; it writes the pid file once it serves the file.
        let pidfile = work.join("nbdfuse.pid");
        let mut cmd = Command::new("nbdfuse");
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse_dir)
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let mut stack = FuseLoop {
            dev: String::new(),
            mounted: None,
            loop_attached: false,
            fuse_dir,
            nbdfuse: Some(child),
        };
        let ready = poll_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| !s.trim().is_empty())
        });
        assert!(ready, "nbdfuse did not become ready for {uri}");
        let mut losetup = Command::new("losetup");
        if read_only {
            losetup.arg("-r");
        }
        let out = run(
            losetup
                .args(["-f", "--show"])
                .arg(stack.fuse_dir.join("nbd")),
            T,
        );
        assert!(
            out.status.success(),
            "losetup could not attach a loop device (are loop devices available in this \
             container? /dev/loop-control must exist and the kernel must have the loop driver): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stack.dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        stack.loop_attached = true;
        stack
    }

    /// The file nbdfuse serves (the export's bytes).
    pub fn file(&self) -> PathBuf {
        self.fuse_dir.join("nbd")
    }

    pub fn mount(&mut self, dir: &Path, options: &str) {
        std::fs::create_dir_all(dir).expect("mount dir");
        run_ok(
            Command::new("mount")
                .args(["-t", "ext4", "-o", options, &self.dev])
                .arg(dir),
            T,
        );
        self.mounted = Some(dir.to_path_buf());
    }

    pub fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            run_ok(Command::new("umount").arg(&m), T);
        }
    }

    /// Unmounts, detaches the loop device and stops nbdfuse, checking each step.
    pub fn detach(mut self) {
        self.umount();
        if self.loop_attached {
            self.loop_attached = false;
            run_ok(Command::new("losetup").arg("-d").arg(&self.dev), T);
        }
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir), T);
        if let Some(mut child) = self.nbdfuse.take() {
            let status = wait_child(&mut child, T).expect("nbdfuse did not exit after unmount");
            assert!(status.success(), "nbdfuse exited with {status}");
        }
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        // Best effort: errors here must not hide the original failure.
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if self.loop_attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.fuse_dir)
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Seeded files: (name, content). Sizes range from empty to a few MiB, some not block-aligned.
pub fn files(seed: u64) -> Vec<(String, Vec<u8>)> {
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

pub fn check_files(root: &Path, files: &[(String, Vec<u8>)]) {
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
