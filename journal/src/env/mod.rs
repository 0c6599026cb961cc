//! The file-system seam: every create, write, sync, truncate and remove the journal does
//! goes through `Env`, so tests built with `--features failpoints` can inject faults
//! (fsync failure, short write, ENOSPC, a crash that leaves a torn tail) without mocks.

#[cfg(feature = "failpoints")]
mod faults;

#[cfg(feature = "failpoints")]
pub use faults::{Fault, FaultPoint, Faults};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
#[cfg(feature = "failpoints")]
use std::sync::Arc;

use crate::limits::IOVECS_PER_WRITE_MAX;

/// Opens files for the journal; carries the fault plan when built with `failpoints`.
#[derive(Clone, Default)]
pub struct Env {
    #[cfg(feature = "failpoints")]
    faults: Option<Arc<Faults>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Env")
    }
}

/// Which operation a fault check is for; compiled to nothing without `failpoints`.
#[cfg(not(feature = "failpoints"))]
#[derive(Clone, Copy)]
enum FaultPoint {
    Create,
    Write,
    Sync,
    Truncate,
    Remove,
    SyncDir,
}

impl Env {
    /// The real file system, no faults.
    pub fn new() -> Env {
        Env::default()
    }

    /// The real file system with faults injected from `faults`.
    #[cfg(feature = "failpoints")]
    pub fn with_faults(faults: Arc<Faults>) -> Env {
        Env {
            faults: Some(faults),
        }
    }

    #[cfg(feature = "failpoints")]
    fn fault(&self, point: FaultPoint) -> io::Result<Option<Fault>> {
        match &self.faults {
            Some(f) => f.check(point),
            None => Ok(None),
        }
    }

    #[cfg(not(feature = "failpoints"))]
    #[inline(always)]
    fn fault(&self, _point: FaultPoint) -> io::Result<Option<std::convert::Infallible>> {
        Ok(None)
    }

    /// Creates `path`, failing if it exists, opened for reading and writing.
    pub fn create_new(&self, path: &Path) -> io::Result<EnvFile> {
        if let Some(f) = self.fault(FaultPoint::Create)? {
            #[allow(unreachable_code)]
            return Err(fault_error(f));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)?;
        Ok(self.wrap(file, path, /* created */ true))
    }

    /// Opens an existing `path` for reading and writing.
    pub fn open_rw(&self, path: &Path) -> io::Result<EnvFile> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(self.wrap(file, path, /* created */ false))
    }

    /// Opens an existing `path` read-only.
    pub fn open_ro(&self, path: &Path) -> io::Result<EnvFile> {
        let file = File::open(path)?;
        Ok(self.wrap(file, path, /* created */ false))
    }

    #[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
    fn wrap(&self, file: File, path: &Path, created: bool) -> EnvFile {
        #[cfg(feature = "failpoints")]
        if let (Some(faults), Ok(meta)) = (&self.faults, file.metadata()) {
            faults.note_open(faults::file_key(&meta), meta.len(), created);
        }
        EnvFile {
            file,
            path: path.to_path_buf(),
            env: self.clone(),
        }
    }

    /// Removes a file.
    pub fn remove_file(&self, path: &Path) -> io::Result<()> {
        if let Some(f) = self.fault(FaultPoint::Remove)? {
            #[allow(unreachable_code)]
            return Err(fault_error(f));
        }
        #[cfg(feature = "failpoints")]
        if let (Some(faults), Ok(meta)) = (&self.faults, fs::metadata(path)) {
            faults.note_removed(faults::file_key(&meta));
        }
        fs::remove_file(path)
    }

    /// Makes a directory's entries (created or removed files) durable.
    pub fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if let Some(f) = self.fault(FaultPoint::SyncDir)? {
            #[allow(unreachable_code)]
            return Err(fault_error(f));
        }
        File::open(dir)?.sync_all()
    }
}

#[cfg(feature = "failpoints")]
fn fault_error(f: Fault) -> io::Error {
    f.error()
}

#[cfg(not(feature = "failpoints"))]
fn fault_error(f: std::convert::Infallible) -> io::Error {
    match f {}
}

/// An open journal file. All methods take `&self` and use positioned I/O, so one file
/// can be written by the appender, synced by a committer and read by readers at once.
#[derive(Debug)]
pub struct EnvFile {
    file: File,
    path: PathBuf,
    env: Env,
}

impl EnvFile {
    /// Maps the whole file read-only. The caller must make sure nobody truncates the file
    /// while the map lives (reading a truncated page raises SIGBUS).
    pub fn map_read_only(&self) -> io::Result<memmap2::Mmap> {
        // SAFETY: the map is read-only; `Segment::map` only maps sealed segments, which are
        // never truncated or written again (unlinking one keeps its pages alive).
        unsafe { memmap2::Mmap::map(&self.file) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current file size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Writes all of `bufs` at `offset` with as few `pwritev` calls as possible.
    /// On error some prefix may have been written; the caller truncates it away.
    pub fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        #[cfg(feature = "failpoints")]
        if let Some(f) = self.env.fault(FaultPoint::Write)? {
            return self.write_faulty(bufs, offset, f);
        }
        #[cfg(not(feature = "failpoints"))]
        if let Some(f) = self.env.fault(FaultPoint::Write)? {
            return Err(fault_error(f));
        }
        self.pwritev_all(bufs, offset)
    }

    /// Writes a prefix of `bufs` and then fails, as a full disk or a crash would.
    #[cfg(feature = "failpoints")]
    fn write_faulty(&self, bufs: &[&[u8]], offset: u64, fault: Fault) -> io::Result<()> {
        let keep = fault.bytes_written();
        let mut prefix = Vec::new();
        for b in bufs {
            let room = keep.saturating_sub(prefix.len());
            prefix.extend_from_slice(&b[..room.min(b.len())]);
        }
        if !prefix.is_empty() {
            self.file.write_all_at(&prefix, offset)?;
        }
        if let Some(faults) = &self.env.faults {
            faults.after_write(&fault);
        }
        Err(fault.error())
    }

    fn pwritev_all(&self, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0;
        while first < iov.len() {
            let end = (first + IOVECS_PER_WRITE_MAX).min(iov.len());
            let chunk = &iov[first..end];
            // SAFETY: every iovec points into a slice borrowed from `bufs` for the whole call,
            // with its exact length; the kernel only reads from them.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    chunk.as_ptr(),
                    chunk.len() as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote 0 bytes",
                ));
            }
            let mut n = n as usize;
            offset += n as u64;
            // A short write: skip the iovecs written in full, trim the partly written one.
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: n < iov_len, so the new base stays inside the same slice.
                    v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_vectored_at(&[buf], offset)
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// fdatasync: makes written data (and the size) durable.
    pub fn sync_data(&self) -> io::Result<()> {
        if let Some(f) = self.env.fault(FaultPoint::Sync)? {
            #[allow(unreachable_code)]
            return Err(fault_error(f));
        }
        // What the fdatasync covers: the bytes written before it began.
        #[cfg(feature = "failpoints")]
        let before = self.file.metadata();
        self.file.sync_data()?;
        #[cfg(feature = "failpoints")]
        if let (Some(faults), Ok(meta)) = (&self.env.faults, before) {
            faults.note_synced(faults::file_key(&meta), meta.len());
        }
        Ok(())
    }

    /// Cuts the file to `len` bytes.
    pub fn truncate(&self, len: u64) -> io::Result<()> {
        if let Some(f) = self.env.fault(FaultPoint::Truncate)? {
            #[allow(unreachable_code)]
            return Err(fault_error(f));
        }
        self.file.set_len(len)?;
        #[cfg(feature = "failpoints")]
        if let (Some(faults), Ok(meta)) = (&self.env.faults, self.file.metadata()) {
            faults.note_truncated(faults::file_key(&meta), len);
        }
        Ok(())
    }
}

/// An exclusive advisory lock on a journal directory, held while the journal is open so
/// two processes (or two `Journal`s) never append to the same files.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(path: &Path) -> io::Result<DirLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirLock { _file: file })
    }
}
