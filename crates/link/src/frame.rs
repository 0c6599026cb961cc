//! Link frame format: a fixed header with magic, version, kind, length and CRC, then a body.
//!
//! One 16-byte header codec serves both links: the split link (magic `CDPL`, this module's
//! `SPLIT_LINK`) and the replication link between appliances (magic `CDPR`, its
//! `FrameSpec` in `replication.rs`). A [`FrameSpec`] names what differs: the magic (so a
//! peer of one link dialling the other is refused at the first header), the versions read
//! and each version's body bound.
//!
//! Byte layout, version 1 (all integers little-endian):
//! ```text
//! offset size field
//!      0    4 magic      b"CDPL" (split link), b"CDPR" (replication link)
//!      4    2 version    1 (the replication link also reads 2)
//!      6    1 kind       message kind (see message.rs, replication.rs)
//!      7    1 flags      0 (reserved; a set bit is a protocol error)
//!      8    4 body_len   bytes of body after the header, <= the spec's body bound
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

/// What tells one link's frames from another's; the header layout is shared.
#[derive(Clone, Copy, Debug)]
pub struct FrameSpec {
    /// Names the frame in errors ("frame", "replication frame").
    pub name: &'static str,
    pub magic: [u8; 4],
    /// Versions this end reads, the newest last (a version error names it as ours).
    pub versions: &'static [u16],
    /// The largest body a frame of `version` may carry, checked before allocating.
    pub body_max: fn(u16) -> usize,
}

fn split_link_body_max(_version: u16) -> usize {
    FRAME_BODY_MAX
}

/// The split link's frames.
pub const SPLIT_LINK: FrameSpec = FrameSpec {
    name: "frame",
    magic: MAGIC,
    versions: &[VERSION],
    body_max: split_link_body_max,
};

/// The decoded fixed header of a frame, CRC not yet checked (the body is needed for that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: u8,
    pub body_len: u32,
    pub crc: u32,
}

/// Encodes a split-link header for `kind` whose body is the concatenation of `body_parts`.
pub fn encode_header(kind: u8, body_parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    encode_header_with(&SPLIT_LINK, VERSION, kind, body_parts)
}

/// Encodes a header of `spec`'s link.
pub fn encode_header_with(
    spec: &FrameSpec,
    version: u16,
    kind: u8,
    body_parts: &[&[u8]],
) -> [u8; HEADER_LEN] {
    let body_len: usize = body_parts.iter().map(|p| p.len()).sum();
    debug_assert!(spec.versions.contains(&version));
    debug_assert!(body_len <= (spec.body_max)(version));
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&spec.magic);
    header[4..6].copy_from_slice(&version.to_le_bytes());
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

/// Validates a split-link header: magic, version, flags and length.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<FrameHeader, LinkError> {
    decode_header_with(&SPLIT_LINK, header)
}

/// Validates magic, version, flags and length before anything is allocated for the body.
pub fn decode_header_with(
    spec: &FrameSpec,
    header: &[u8; HEADER_LEN],
) -> Result<FrameHeader, LinkError> {
    let name = spec.name;
    if header[0..4] != spec.magic {
        return Err(LinkError::Corrupt(format!(
            "bad {name} magic {:02x?}",
            &header[0..4]
        )));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if !spec.versions.contains(&version) {
        return Err(LinkError::Version {
            theirs: version,
            ours: spec.versions.last().copied().unwrap_or(0),
        });
    }
    if header[7] != 0 {
        return Err(LinkError::Corrupt(format!(
            "reserved {name} flags set: {:#x}",
            header[7]
        )));
    }
    let body_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let max = (spec.body_max)(version);
    if body_len as usize > max {
        return Err(LinkError::Corrupt(format!(
            "{name} body of {body_len} bytes exceeds the {max} byte limit"
        )));
    }
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    Ok(FrameHeader {
        version,
        kind: header[6],
        body_len,
        crc,
    })
}

/// Checks the CRC of a whole split-link frame once its body has been read.
pub fn verify_crc(
    header_bytes: &[u8; HEADER_LEN],
    header: &FrameHeader,
    body: &[u8],
) -> Result<(), LinkError> {
    verify_crc_with(&SPLIT_LINK, header_bytes, header, body)
}

/// Checks the CRC of a whole frame of `spec`'s link once its body has been read.
pub fn verify_crc_with(
    spec: &FrameSpec,
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
            "{} CRC mismatch (kind {}, {} byte body): stored {:#010x}, computed {:#010x}",
            spec.name, header.kind, header.body_len, header.crc, actual
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
        assert_eq!(h[12..16], [2, 210, 86, 124]);
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

    /// Goal: one codec, several links. Method: a second spec with another magic, two
    /// versions and a bound per version; each link refuses the other's headers, versions
    /// and lengths are checked against the right spec.
    #[test]
    fn spec_separates_links() {
        fn body_max(version: u16) -> usize {
            if version == 2 {
                100
            } else {
                10
            }
        }
        const OTHER: FrameSpec = FrameSpec {
            name: "other frame",
            magic: *b"CDPX",
            versions: &[1, 2],
            body_max,
        };
        let h = encode_header_with(&OTHER, 2, 5, &[&[7u8; 50]]);
        assert_eq!(
            &h[0..12],
            &[b'C', b'D', b'P', b'X', 2, 0, 5, 0, 50, 0, 0, 0]
        );
        let d = decode_header_with(&OTHER, &h).unwrap();
        assert_eq!((d.version, d.kind, d.body_len), (2, 5, 50));
        verify_crc_with(&OTHER, &h, &d, &[7u8; 50]).unwrap();
        assert!(matches!(decode_header(&h), Err(LinkError::Corrupt(_))));
        let split = encode_header(1, &[b""]);
        assert!(matches!(
            decode_header_with(&OTHER, &split),
            Err(LinkError::Corrupt(_))
        ));
        let mut v1_too_long = encode_header_with(&OTHER, 1, 5, &[]);
        v1_too_long[8] = 50;
        assert!(matches!(
            decode_header_with(&OTHER, &v1_too_long),
            Err(LinkError::Corrupt(_))
        ));
        let mut v3 = h;
        v3[4] = 3;
        assert!(matches!(
            decode_header_with(&OTHER, &v3),
            Err(LinkError::Version { theirs: 3, ours: 2 })
        ));
    }
}
