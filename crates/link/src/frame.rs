//! Link frame format: a fixed header with magic, version, kind, length and CRC, then a body.
//!
//! Byte layout, version 1 (all integers little-endian):
//! ```text
//! offset size field
//!      0    4 magic      b"CDPL"
//!      4    2 version    1
//!      6    1 kind       message kind (see message.rs)
//!      7    1 flags      0 (reserved; a set bit is a protocol error)
//!      8    4 body_len   bytes of body after the header, <= FRAME_BODY_MAX
//!     12    4 crc32      crc32 (IEEE, crc32fast) over header bytes 0..12 then the body
//!     16    .. body
//! ```
//! The CRC covers the header so a flipped length or kind is caught as corruption, not
//! misparsed as another message.

use crate::error::LinkError;
use crate::limits::FRAME_BODY_MAX;

pub const MAGIC: [u8; 4] = *b"CDPL";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;

/// The decoded fixed header of a frame, CRC not yet checked (the body is needed for that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub body_len: u32,
    pub crc: u32,
}

/// Encodes a header for `kind` whose body is the concatenation of `body_parts`.
pub fn encode_header(kind: u8, body_parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let body_len: usize = body_parts.iter().map(|p| p.len()).sum();
    debug_assert!(body_len <= FRAME_BODY_MAX);
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6] = kind;
    header[7] = 0;
    header[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[0..12]);
    for part in body_parts {
        crc.update(part);
    }
    header[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    header
}

/// Validates magic, version, flags and length before anything is allocated for the body.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<FrameHeader, LinkError> {
    if header[0..4] != MAGIC {
        return Err(LinkError::Corrupt(format!(
            "bad frame magic {:02x?}",
            &header[0..4]
        )));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(LinkError::Version {
            theirs: version,
            ours: VERSION,
        });
    }
    if header[7] != 0 {
        return Err(LinkError::Corrupt(format!(
            "reserved frame flags set: {:#x}",
            header[7]
        )));
    }
    let body_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if body_len as usize > FRAME_BODY_MAX {
        return Err(LinkError::Corrupt(format!(
            "frame body of {body_len} bytes exceeds the {FRAME_BODY_MAX} byte limit"
        )));
    }
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    Ok(FrameHeader {
        kind: header[6],
        body_len,
        crc,
    })
}

/// Checks the CRC of a whole frame once its body has been read.
pub fn verify_crc(
    header_bytes: &[u8; HEADER_LEN],
    header: &FrameHeader,
    body: &[u8],
) -> Result<(), LinkError> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header_bytes[0..12]);
    crc.update(body);
    let actual = crc.finalize();
    if actual != header.crc {
        return Err(LinkError::Corrupt(format!(
            "frame CRC mismatch (kind {}, {} byte body): stored {:#010x}, computed {:#010x}",
            header.kind, header.body_len, header.crc, actual
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_header_v1() {
        let h = encode_header(2, &[b"abc"]);
        assert_eq!(&h[0..12], &[b'C', b'D', b'P', b'L', 1, 0, 2, 0, 3, 0, 0, 0]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[0..12]);
        crc.update(b"abc");
        assert_eq!(h[12..16], crc.finalize().to_le_bytes());
        let d = decode_header(&h).unwrap();
        assert_eq!(d.kind, 2);
        assert_eq!(d.body_len, 3);
        verify_crc(&h, &d, b"abc").unwrap();
        assert!(verify_crc(&h, &d, b"abd").is_err());
    }

    #[test]
    fn rejects_bad_headers() {
        let good = encode_header(1, &[b""]);
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(decode_header(&bad), Err(LinkError::Corrupt(_))));
        let mut bad = good;
        bad[4] = 9;
        assert!(matches!(
            decode_header(&bad),
            Err(LinkError::Version { theirs: 9, ours: 1 })
        ));
        let mut bad = good;
        bad[7] = 1;
        assert!(decode_header(&bad).is_err());
        let mut bad = good;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_header(&bad).is_err());
    }
}
