//! Region checksums for verified seeding: one definition shared by splitter and appliance.
//!
//! A checksum is BLAKE3 (256 bits) over the region's bytes, prefixed by the region's length,
//! so a short last region never equals a full one. BLAKE3 rather than the frames' CRC32: a
//! matching checksum means a region is *not* copied, so a collision silently leaves the
//! replica wrong; 32 bits would make that likely across millions of regions, 256 bits never.

use crate::limits::CHECKSUM_BYTES;

/// The checksum of one region's bytes.
pub type RegionChecksum = [u8; CHECKSUM_BYTES];

/// Checksums `data`, the whole content of one region.
pub fn region_checksum(data: &[u8]) -> RegionChecksum {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(data.len() as u64).to_le_bytes());
    hasher.update(data);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differs_by_content_and_length() {
        let zeros = region_checksum(&[0u8; 4096]);
        assert_eq!(zeros, region_checksum(&[0u8; 4096]));
        assert_ne!(zeros, region_checksum(&[0u8; 4095]));
        let mut one = [0u8; 4096];
        one[4095] = 1;
        assert_ne!(zeros, region_checksum(&one));
    }

    #[test]
    fn golden_empty_region() {
        // BLAKE3 of eight zero bytes (the length 0): pins the definition across releases.
        let hex: String = region_checksum(&[])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "71e0a99173564931c0b8acc52d2685a8e39c64dc52e3d02390fdac2a12b155cb"
        );
    }
}
