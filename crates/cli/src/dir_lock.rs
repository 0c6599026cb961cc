//! An exclusive lock on a `cdp up` directory, held for as long as `cdp up` runs, naming the
//! process that holds it so a second start can say who is in the way.

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The lock file inside the directory.
pub const LOCK_FILE: &str = "cdp-up.lock";

/// Held lock; released when dropped (or when the process dies, since it is an flock).
pub struct DirLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock or fails with the pid that holds it.
    pub fn acquire(dir: &Path) -> anyhow::Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                bail!("locking {}: {err}", path.display());
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("cdp up (pid {holder})")
            };
            bail!(
                "{} is already in use by {who}; stop it (Ctrl-C in its terminal, or kill \
                 -INT {}) or choose another --dir",
                dir.display(),
                if holder.is_empty() { "PID" } else { holder }
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(DirLock { _file: file, path })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // The flock goes with the descriptor; emptying the file keeps a stale pid from being
        // shown by a later failure of another kind.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.path);
    }
}
