//! The distribution checkpoint: how far the replicas of a group are known to be synced.
//!
//! Byte layout, version 1 (little-endian), 24 bytes:
//! ```text
//! 0  8 magic           b"CDPDIST\0"
//! 8  4 version         1
//! 12 8 distributed_seq every journal record up to here is durable in every replica
//! 20 4 crc32           over bytes 0..20
//! ```

use std::path::Path;

use cdp_types::Seq;

use crate::error::ApplianceError;
use crate::state_file::{write_atomically, Malformed};

const MAGIC: [u8; 8] = *b"CDPDIST\0";
const VERSION: u32 = 1;
const LEN: usize = 24;

pub fn encode(distributed: Seq) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&distributed.0.to_le_bytes());
    let crc = crc32fast::hash(&out[0..20]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode(bytes: &[u8]) -> Result<Seq, Malformed> {
    if bytes.len() != LEN {
        return Err(format!("{} bytes, expected {LEN}", bytes.len()).into());
    }
    if bytes[0..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(format!("unsupported version {version}").into());
    }
    let crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if crc != crc32fast::hash(&bytes[0..20]) {
        return Err("CRC mismatch".into());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[12..20]);
    Ok(Seq(u64::from_le_bytes(seq)))
}

/// Reads the checkpoint; a missing file means nothing was distributed yet.
pub fn load(path: &Path) -> Result<Seq, ApplianceError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map_err(|what| ApplianceError::Corruption {
            path: path.display().to_string(),
            what: what.0,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Seq::ZERO),
        Err(e) => Err(e.into()),
    }
}

pub fn store(path: &Path, distributed: Seq) -> Result<(), ApplianceError> {
    Ok(write_atomically(path, &encode(distributed))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_v1_and_corruption() {
        let b = encode(Seq(0x0102));
        assert_eq!(
            &b[0..20],
            b"CDPDIST\0\x01\x00\x00\x00\x02\x01\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!(decode(&b), Ok(Seq(0x0102)));
        let mut bad = b;
        bad[13] ^= 1;
        assert!(decode(&bad).is_err());
        assert!(decode(&b[..10]).is_err());
    }
}
