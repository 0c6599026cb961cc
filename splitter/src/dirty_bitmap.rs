//! The persistent dirty bitmap: which regions of production may differ from the journal.
//!
//! A bit is set *before* a change is applied to production and cleared only once every change
//! touching its region is in the journal (and no resync of it is pending), so after any crash
//! of the splitter the set bits cover every region whose latest content the appliance may
//! lack. The file lives beside the production volume and is memory-mapped; setting a bit is a
//! store into the page cache, which survives a crash of the process (not of the machine; see
//! ARCHITECTURE.md).
//!
//! Byte layout, version 1 (little-endian):
//! ```text
//! 0   8 magic         b"CDPDIRTY"
//! 8   4 version       1
//! 12  4 region_bytes  bytes of production per bit (a power of two, >= 4096)
//! 16  8 volume_bytes  size of the production volume
//! 24  4 crc32         over bytes 0..24 (the header is written once; the bits change
//!                     constantly and a bit flipped by damage only causes an extra resync
//!                     or, if cleared, is caught by `cdp volume resync --verify`)
//! 28 36 reserved, zero
//! 64 .. bits, bit i of byte j = region 8*j + i
//! ```

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

const MAGIC: [u8; 8] = *b"CDPDIRTY";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;

/// Bytes of production covered by one bit: small enough that a resync copies little more
/// than was written, large enough that a 1 TiB volume needs only 2 MiB of bitmap.
pub const REGION_BYTES_DEFAULT: u64 = 64 * 1024;

/// A dirty bitmap mapped into memory.
pub struct DirtyBitmap {
    map: MmapMut,
    path: PathBuf,
    region_bytes: u64,
    regions: u64,
}

/// How the bitmap was found when opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// No bitmap existed: this volume was never protected by this splitter.
    Created,
    /// An existing bitmap, with this many regions marked dirty.
    Existing { dirty_regions: u64 },
}

fn encode_header(region_bytes: u64, volume_bytes: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(region_bytes as u32).to_le_bytes());
    h[16..24].copy_from_slice(&volume_bytes.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a dirty bitmap's header is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum HeaderError {
    #[error("{0} bytes is shorter than the header")]
    Short(usize),
    #[error("not a cdp dirty bitmap (bad magic)")]
    BadMagic,
    #[error("version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    #[error("header CRC mismatch")]
    Crc,
    #[error("region size {0} is invalid")]
    RegionSize(u64),
    #[error("made for a {recorded} byte volume, production is {production} bytes")]
    VolumeSize { recorded: u64, production: u64 },
}

fn check_header(h: &[u8], volume_bytes: u64) -> Result<u64, HeaderError> {
    if h.len() < HEADER_LEN {
        return Err(HeaderError::Short(h.len()));
    }
    if h[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crc != crc32fast::hash(&h[0..24]) {
        return Err(HeaderError::Crc);
    }
    let region_bytes = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as u64;
    if region_bytes < 4096 || !region_bytes.is_power_of_two() {
        return Err(HeaderError::RegionSize(region_bytes));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&h[16..24]);
    let recorded = u64::from_le_bytes(v);
    if recorded != volume_bytes {
        return Err(HeaderError::VolumeSize {
            recorded,
            production: volume_bytes,
        });
    }
    Ok(region_bytes)
}

impl DirtyBitmap {
    /// Opens the bitmap at `path`, creating it (all clean) if it does not exist.
    pub fn open(path: &Path, volume_bytes: u64) -> io::Result<(DirtyBitmap, Opened)> {
        let invalid = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("dirty bitmap {}: {what}", path.display()),
            )
        };
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let region_bytes = if exists {
            let mut header = [0u8; HEADER_LEN];
            let len = file.metadata()?.len();
            if (len as usize) < HEADER_LEN {
                return Err(invalid(format!("{len} bytes is shorter than the header")));
            }
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0)?;
            check_header(&header, volume_bytes).map_err(|e| invalid(e.to_string()))?
        } else {
            REGION_BYTES_DEFAULT
        };
        let regions = volume_bytes.div_ceil(region_bytes);
        let len = HEADER_LEN as u64 + regions.div_ceil(8);
        if exists && file.metadata()?.len() != len {
            return Err(invalid(format!(
                "{} bytes, expected {len}",
                file.metadata()?.len()
            )));
        }
        if !exists {
            file.set_len(len)?;
            std::os::unix::fs::FileExt::write_all_at(
                &file,
                &encode_header(region_bytes, volume_bytes),
                0,
            )?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        // SAFETY: the file is ours (beside the production volume) and stays open through the
        // map; nothing else truncates it while the splitter runs.
        let map = unsafe { MmapMut::map_mut(&file)? };
        let bitmap = DirtyBitmap {
            map,
            path: path.to_path_buf(),
            region_bytes,
            regions,
        };
        let opened = if exists {
            Opened::Existing {
                dirty_regions: bitmap.dirty_regions().len() as u64,
            }
        } else {
            Opened::Created
        };
        Ok((bitmap, opened))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The regions a change of `length` bytes at `offset` touches.
    pub fn regions_of(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        if length == 0 {
            return 0..0;
        }
        let first = offset / self.region_bytes;
        let last = (offset + length - 1) / self.region_bytes;
        first..(last + 1).min(self.regions)
    }

    pub fn is_set(&self, region: u64) -> bool {
        let byte = self.map[HEADER_LEN + (region / 8) as usize];
        byte & (1 << (region % 8)) != 0
    }

    /// Sets a bit; returns true if it was clear.
    pub fn set(&mut self, region: u64) -> bool {
        let at = HEADER_LEN + (region / 8) as usize;
        let mask = 1u8 << (region % 8);
        let was_clear = self.map[at] & mask == 0;
        self.map[at] |= mask;
        was_clear
    }

    pub fn clear(&mut self, region: u64) {
        let at = HEADER_LEN + (region / 8) as usize;
        self.map[at] &= !(1u8 << (region % 8));
    }

    /// Every set region, in order.
    pub fn dirty_regions(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (j, byte) in self.map[HEADER_LEN..].iter().enumerate() {
            if *byte == 0 {
                continue;
            }
            for i in 0..8u64 {
                let region = j as u64 * 8 + i;
                if byte & (1 << i) != 0 && region < self.regions {
                    out.push(region);
                }
            }
        }
        out
    }

    /// Makes the bits durable (msync), for clean stops and FLUSH.
    pub fn sync(&self) -> io::Result<()> {
        self.map.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_persist_across_reopen_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.cdp-dirty");
        let size = 10 * REGION_BYTES_DEFAULT + 1;
        let (mut b, opened) = DirtyBitmap::open(&path, size).unwrap();
        assert_eq!(opened, Opened::Created);
        assert_eq!(b.regions(), 11);
        assert_eq!(b.regions_of(0, 1), 0..1);
        assert_eq!(b.regions_of(REGION_BYTES_DEFAULT - 1, 2), 0..2);
        assert_eq!(b.regions_of(size - 1, 1), 10..11);
        assert_eq!(b.regions_of(5, 0), 0..0);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert!(b.set(10));
        b.set(7);
        b.clear(7);
        b.sync().unwrap();
        drop(b);
        let (b, opened) = DirtyBitmap::open(&path, size).unwrap();
        assert_eq!(opened, Opened::Existing { dirty_regions: 2 });
        assert_eq!(b.dirty_regions(), vec![3, 10]);
        assert!(b.is_set(3) && !b.is_set(7));
        drop(b);
        assert!(DirtyBitmap::open(&path, size + 4096).is_err());
        let mut raw = std::fs::read(&path).unwrap();
        raw[13] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert!(DirtyBitmap::open(&path, size).is_err());
    }

    #[test]
    fn golden_header_v1() {
        let h = encode_header(65536, 1 << 30);
        assert_eq!(&h[0..12], b"CDPDIRTY\x01\x00\x00\x00");
        assert_eq!(&h[12..24], &[0, 0, 1, 0, 0, 0, 0, 64, 0, 0, 0, 0]);
        assert_eq!(check_header(&h, 1 << 30), Ok(65536));
    }
}
