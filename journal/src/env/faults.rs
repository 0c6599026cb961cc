//! Fault plans for tests (only with `--features failpoints`).
//!
//! Fault model: an armed fault fires on the Nth later call at its point. `Error` fails the
//! call with an errno and writes nothing; `ShortWrite` writes a prefix and then fails (a
//! disk filling up mid-write); `Crash` writes a prefix and then fails every later call of
//! every kind, as if the process died there, leaving a torn tail for recovery to cut.
//!
//! Durable lengths: the plan also remembers, per file (by inode, so a rename keeps it),
//! how many bytes the last successful fdatasync covered. A simulated power loss
//! (`synced_len`) may cut a file back to that length but never below it; the journal only
//! appends, so everything past it is what a lost page cache could take.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

/// Where a fault can fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    Create,
    Write,
    Sync,
    Truncate,
    Remove,
    SyncDir,
}

/// What happens when a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with this errno (e.g. `libc::EIO`, `libc::ENOSPC`), writing nothing.
    Error(i32),
    /// A write stores its first `bytes` bytes, then fails with `errno`.
    ShortWrite { bytes: usize, errno: i32 },
    /// A write stores its first `bytes` bytes; then the "process dies": this call and every
    /// later call through the same `Faults` fail with EIO.
    Crash { bytes: usize },
}

impl Fault {
    pub(crate) fn error(&self) -> io::Error {
        match *self {
            Fault::Error(errno) | Fault::ShortWrite { errno, .. } => {
                io::Error::from_raw_os_error(errno)
            }
            Fault::Crash { .. } => io::Error::from_raw_os_error(libc::EIO),
        }
    }

    pub(crate) fn bytes_written(&self) -> usize {
        match *self {
            Fault::Error(_) => 0,
            Fault::ShortWrite { bytes, .. } | Fault::Crash { bytes } => bytes,
        }
    }
}

#[derive(Default)]
struct State {
    armed: Vec<(FaultPoint, u64, Fault)>,
    crashed: bool,
    hits: Vec<(FaultPoint, u64)>,
    /// Bytes of each file (by device and inode) the last successful fdatasync made durable.
    synced: HashMap<(u64, u64), u64>,
}

/// Identifies a file across renames.
pub(crate) fn file_key(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// A shared, thread-safe fault plan. Give it to `Env::with_faults`.
#[derive(Default)]
pub struct Faults {
    state: Mutex<State>,
}

impl Faults {
    pub fn new() -> std::sync::Arc<Faults> {
        std::sync::Arc::new(Faults::default())
    }

    /// Fires `fault` on the next call at `point`.
    pub fn arm(&self, point: FaultPoint, fault: Fault) {
        self.arm_after(point, 0, fault);
    }

    /// Fires `fault` after `skip` more calls at `point` have succeeded.
    pub fn arm_after(&self, point: FaultPoint, skip: u64, fault: Fault) {
        let mut s = self.lock();
        s.armed.push((point, skip, fault));
    }

    /// Removes every armed fault (a crash stays crashed).
    pub fn clear(&self) {
        self.lock().armed.clear();
    }

    /// Calls made at `point` so far, including failed ones.
    pub fn hits(&self, point: FaultPoint) -> u64 {
        let s = self.lock();
        s.hits
            .iter()
            .find(|(p, _)| *p == point)
            .map_or(0, |(_, n)| *n)
    }

    /// The process "dies" now: every later call through this plan fails with EIO.
    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }

    /// How many bytes of the file with metadata `meta` are durable (covered by an
    /// fdatasync, or on disk when the file was opened), if the file went through this plan.
    pub fn synced_len(&self, meta: &std::fs::Metadata) -> Option<u64> {
        self.lock().synced.get(&file_key(meta)).copied()
    }

    /// A file was opened (its bytes on disk count as durable) or created empty.
    pub(crate) fn note_open(&self, key: (u64, u64), len: u64, created: bool) {
        let mut s = self.lock();
        if created {
            s.synced.insert(key, 0);
        } else {
            s.synced.entry(key).or_insert(len);
        }
    }

    /// An fdatasync that began when the file held `len` bytes succeeded.
    pub(crate) fn note_synced(&self, key: (u64, u64), len: u64) {
        let mut s = self.lock();
        let e = s.synced.entry(key).or_insert(0);
        *e = (*e).max(len);
    }

    /// The file was cut to `len` bytes.
    pub(crate) fn note_truncated(&self, key: (u64, u64), len: u64) {
        if let Some(e) = self.lock().synced.get_mut(&key) {
            *e = (*e).min(len);
        }
    }

    /// The file was removed (its inode may be reused).
    pub(crate) fn note_removed(&self, key: (u64, u64)) {
        self.lock().synced.remove(&key);
    }

    /// Whether a `Crash` fault has fired.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread must not hide the plan from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn check(&self, point: FaultPoint) -> io::Result<Option<Fault>> {
        let mut s = self.lock();
        match s.hits.iter_mut().find(|(p, _)| *p == point) {
            Some((_, n)) => *n += 1,
            None => s.hits.push((point, 1)),
        }
        if s.crashed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut fired = None;
        let mut i = 0;
        while i < s.armed.len() {
            let (p, skip, fault) = s.armed[i];
            if p == point {
                if skip == 0 {
                    s.armed.remove(i);
                    fired = Some(fault);
                    break;
                }
                s.armed[i].1 = skip - 1;
            }
            i += 1;
        }
        if let Some(Fault::Crash { .. }) = fired {
            if point != FaultPoint::Write {
                s.crashed = true;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(fired)
    }

    pub(crate) fn after_write(&self, fault: &Fault) {
        if let Fault::Crash { .. } = fault {
            self.lock().crashed = true;
        }
    }
}
