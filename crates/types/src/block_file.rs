//! A volume copy on disk (production or replica): positioned I/O on a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Largest zero-filled buffer written at once when the kernel cannot zero a range for us.
const ZERO_CHUNK_BYTES: usize = 1024 * 1024;

/// A volume copy opened for positioned reads and writes.
#[derive(Debug)]
pub struct BlockFile {
    file: File,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
}

impl BlockFile {
    /// Opens an existing file or block device read-write (or read-only) and learns its size.
    pub fn open(path: &Path, read_only: bool) -> io::Result<BlockFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            block_device_size(&file)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        Ok(BlockFile {
            file,
            path: path.to_path_buf(),
            size,
            is_block_device,
        })
    }

    /// Creates a sparse regular file of `size` bytes if it does not exist, then opens it.
    pub fn create_sparse(path: &Path, size: u64) -> io::Result<BlockFile> {
        if !path.exists() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let file = OpenOptions::new().write(true).create_new(true).open(path)?;
            file.set_len(size)?;
            file.sync_all()?;
        }
        BlockFile::open(path, false)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `length` bytes; a short file reads as zeroes past its end.
    pub fn read_at(&self, offset: u64, length: usize) -> io::Result<Bytes> {
        let mut buf: Vec<u8> = Vec::with_capacity(length);
        let mut done = 0usize;
        while done < length {
            // SAFETY: pread writes at most `length - done` bytes into the spare capacity starting
            // at `done`, and we only extend the length by what it reports as written.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr().add(done) as *mut libc::c_void,
                    length - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            // SAFETY: the first `done` bytes were initialised by pread above.
            unsafe { buf.set_len(done) };
        }
        buf.resize(length, 0);
        Ok(Bytes::from(buf))
    }

    /// Fills `buf` from `offset`; a short file reads as zeroes past its end. For callers
    /// that already own the destination (no allocation, no second copy).
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Where the next allocated data at or after `offset` starts (the volume's size if only a
    /// hole follows), so callers can skip holes without reading them; None where the file
    /// system or device cannot tell.
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if self.is_block_device || offset >= self.size {
            return Ok(None);
        }
        // SAFETY: lseek on an open descriptor has no memory effects. It moves the file
        // position, which nothing here uses (all I/O is positioned).
        let at = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if at >= 0 {
            return Ok(Some((at as u64).min(self.size)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(Some(self.size)),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        }
    }

    /// Where the hole after `offset` starts (the volume's size if data runs to the end);
    /// None where the file system or device cannot tell.
    pub fn next_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        if self.is_block_device || offset >= self.size {
            return Ok(None);
        }
        // SAFETY: as in `next_data`: lseek moves only the unused file position.
        let at = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_HOLE,
            )
        };
        if at >= 0 {
            return Ok(Some((at as u64).min(self.size)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Past the end of a file shorter than the volume: all hole from here.
            Some(libc::ENXIO) => Ok(Some(offset)),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        }
    }

    /// The allocation of `[offset, offset + length)` as consecutive runs of
    /// (length, is_hole), from SEEK_DATA/SEEK_HOLE: at most `runs_max` runs, so the runs may
    /// end before `offset + length`. None where the file system or device cannot tell.
    /// A hole reads as zeroes; data may hold anything, zeroes included.
    pub fn allocation(
        &self,
        offset: u64,
        length: u64,
        runs_max: usize,
    ) -> io::Result<Option<Vec<(u64, bool)>>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < runs_max {
            let Some(data) = self.next_data(pos)? else {
                return Ok(if runs.is_empty() {
                    None
                } else {
                    runs.push((end - pos, false));
                    Some(runs)
                });
            };
            let (run_end, hole) = if data > pos {
                (data.min(end), true)
            } else {
                match self.next_hole(pos)? {
                    Some(hole) if hole > pos => (hole.min(end), false),
                    // A file changing under us (or an odd file system): call it data.
                    _ => (end, false),
                }
            };
            runs.push((run_end - pos, hole));
            pos = run_end;
        }
        Ok(Some(runs))
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range so that it reads back as zeroes on both production and replica.
    /// A hole is punched where the file system supports it; otherwise zeroes are written.
    pub fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero(offset, length, true)
    }

    /// Sets a range to zeroes; `may_punch` allows deallocating it (NBD's NO_HOLE unset).
    pub fn zero(&self, offset: u64, length: u64, may_punch: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        if self.is_block_device {
            if self.blk_zero_out(offset, length).is_ok() {
                return Ok(());
            }
        } else {
            let mode = if may_punch {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            // SAFETY: fallocate on an open descriptor with in-range values has no memory effects.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        self.write_zeroes_slowly(offset, length)
    }

    /// Sets a range to zeroes only where the kernel can do it without writing them: a hole
    /// punched or an unwritten extent on a file (`fallocate`), a device's zeroing offload
    /// (`fallocate(PUNCH_HOLE)` on a block device never falls back to writing). Fails with
    /// `ErrorKind::Unsupported`, the range untouched, where that is not possible, including
    /// NO_HOLE (`may_punch` false) on a block device, whose zero-range may write.
    pub fn zero_fast(&self, offset: u64, length: u64, may_punch: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let mode = match (self.is_block_device, may_punch) {
            (_, true) => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (false, false) => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            (true, false) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a block device cannot be zeroed fast without deallocating",
                ))
            }
        };
        // SAFETY: fallocate on an open descriptor with in-range values has no memory effects.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{} cannot zero a range fast: {err}", self.path.display()),
                ))
            }
            _ => Err(err),
        }
    }

    /// Asks the kernel to read a range ahead (`POSIX_FADV_WILLNEED`); a hint, so failures
    /// are ignored.
    pub fn will_need(&self, offset: u64, length: u64) {
        // SAFETY: posix_fadvise on an open descriptor has no memory effects.
        let _ = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    fn write_zeroes_slowly(&self, offset: u64, length: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK_BYTES.min(length as usize)];
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = ((end - at) as usize).min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn blk_zero_out(&self, offset: u64, length: u64) -> io::Result<()> {
        // BLKZEROOUT = _IO(0x12, 127); it guarantees zeroes, unlike BLKDISCARD.
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [offset, length];
        // SAFETY: the ioctl reads two u64 values from `range`, which lives across the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_reports_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = BlockFile::create_sparse(&path, 16 << 20).unwrap();
        f.write_at(4 << 20, &[7u8; 1 << 20]).unwrap();
        let Some(runs) = f.allocation(0, 16 << 20, 16).unwrap() else {
            return; // a file system without SEEK_DATA
        };
        assert_eq!(
            runs,
            vec![(4 << 20, true), (1 << 20, false), (11 << 20, true)]
        );
        assert_eq!(
            f.allocation(4 << 20, 4096, 16).unwrap(),
            Some(vec![(4096, false)])
        );
        assert_eq!(
            f.allocation(0, 16 << 20, 1).unwrap(),
            Some(vec![(4 << 20, true)])
        );
        f.trim(4 << 20, 1 << 20).unwrap();
        assert_eq!(
            f.allocation(0, 16 << 20, 16).unwrap(),
            Some(vec![(16 << 20, true)])
        );
    }

    #[test]
    fn fast_zero_zeroes_or_refuses_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let v = BlockFile::create_sparse(&dir.path().join("v.img"), 1 << 20).unwrap();
        v.write_at(0, &[9u8; 1 << 20]).unwrap();
        let mut model = vec![9u8; 1 << 20];
        for (offset, length, may_punch) in [(4096, 8192, true), (65536, 4096, false)] {
            match v.zero_fast(offset, length, may_punch) {
                Ok(()) => model[offset as usize..(offset + length) as usize].fill(0),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}"),
            }
            assert_eq!(&v.read_at(0, 1 << 20).unwrap()[..], &model[..]);
        }
        v.zero_fast(0, 0, false).unwrap();
        v.will_need(0, 1 << 20);
    }

    #[test]
    fn write_read_trim_zero_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let v = BlockFile::create_sparse(&path, 1 << 20).unwrap();
        let mut model = vec![0u8; 1 << 20];
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        v.write_at(1000, &data).unwrap();
        model[1000..71_000].copy_from_slice(&data);
        v.trim(4096, 8192).unwrap();
        model[4096..12288].fill(0);
        v.zero(20_000, 5000, false).unwrap();
        model[20_000..25_000].fill(0);
        assert_eq!(&v.read_at(0, 1 << 20).unwrap()[..], &model[..]);
        let mut into = vec![0xffu8; 70_001];
        v.read_into(999, &mut into).unwrap();
        assert_eq!(&into[..], &model[999..71_000]);
        // The trimmed range is a hole on file systems that punch; data follows it.
        if let Some(next) = v.next_data(4096).unwrap() {
            assert!(next <= 12288, "data after a hole found at {next}");
        }
        assert_eq!(v.next_data(0).unwrap(), Some(0));
        // Reads past the end of a short file are zero-filled, never garbage.
        assert_eq!(
            &v.read_at((1 << 20) - 10, 10).unwrap()[..],
            &model[(1 << 20) - 10..]
        );
        let mut past = [0xffu8; 30];
        v.read_into((1 << 20) - 10, &mut past).unwrap();
        assert_eq!(&past[..10], &model[(1 << 20) - 10..]);
        assert_eq!(past[10..], [0u8; 20]);
    }
}
