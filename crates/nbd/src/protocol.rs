//! NBD wire format: constants, magic numbers, and encode/decode of handshake and transmission frames.
//!
//! Everything is big-endian. Layouts (fixed newstyle, compact request headers):
//!
//! ```text
//! greeting     S: u64 NBDMAGIC | u64 IHAVEOPT | u16 handshake flags
//! client flags C: u32
//! option       C: u64 IHAVEOPT | u32 option | u32 length | length bytes
//! option reply S: u64 REPLY_MAGIC | u32 option | u32 reply type | u32 length | length bytes
//! EXPORT_NAME  S: u64 size | u16 transmission flags | 124 zero bytes unless NO_ZEROES
//! INFO/GO data C: u32 name length | name | u16 n | n x u16 info type
//! request      C: u32 0x25609513 | u16 flags | u16 type | u64 handle | u64 offset | u32 length
//!                 (+ length bytes of payload for NBD_CMD_WRITE only)
//! simple reply S: u32 0x67446698 | u32 error | u64 handle (+ data for a successful READ)
//! ```
//!
//! Decoders take complete, already-read byte slices and return `NbdError::Protocol` for
//! anything malformed; none of them panic on peer input.

use bytes::{BufMut, BytesMut};

use crate::error::NbdError;
use crate::export::ExportFeatures;

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const GREETING_BYTES: usize = 18;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;

// Handshake flags (server) and client flags.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types for NBD_REP_INFO.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Error values for simple replies.
pub const NBD_OK: u32 = 0;
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Handshake flags this server offers.
pub const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Client flags this server understands; any other bit ends the connection (spec: MUST).
pub const CLIENT_FLAGS_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// The transmission flags for an export with these features.
pub fn transmission_flags(features: &ExportFeatures) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS;
    if features.read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    if features.can_flush {
        flags |= NBD_FLAG_SEND_FLUSH;
    }
    if features.can_fua {
        flags |= NBD_FLAG_SEND_FUA;
    }
    if features.can_trim {
        flags |= NBD_FLAG_SEND_TRIM;
    }
    if features.can_write_zeroes {
        flags |= NBD_FLAG_SEND_WRITE_ZEROES;
    }
    if features.can_multi_conn {
        flags |= NBD_FLAG_CAN_MULTI_CONN;
    }
    flags
}

pub fn encode_greeting(out: &mut BytesMut) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(HANDSHAKE_FLAGS);
}

/// The fixed part of an option request; `length` bytes of data follow on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn decode_option_header(buf: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, NbdError> {
    let magic = u64::from_be_bytes(field(buf, 0));
    if magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!("option magic {magic:#018x}")));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(field(buf, 8)),
        length: u32::from_be_bytes(field(buf, 12)),
    })
}

pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    // Every caller's data is bounded by STRING_BYTES_MAX or a fixed size, far below u32::MAX.
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(length);
    out.put_slice(&data[..length as usize]);
}

/// The answer to `NBD_OPT_EXPORT_NAME`.
pub fn encode_export_name_reply(out: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_ZEROES_BYTES);
    }
}

/// Data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub info_types: Vec<u16>,
}

pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, NbdError> {
    let bad = |why: &str| NbdError::Protocol(format!("INFO/GO option: {why}"));
    if data.len() < 6 {
        return Err(bad("shorter than 6 bytes"));
    }
    let name_len = u32::from_be_bytes(field(data, 0)) as usize;
    if name_len > data.len() - 6 {
        return Err(bad("name length runs past the option"));
    }
    let name = data[4..4 + name_len].to_vec();
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(field(rest, 0)) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(bad(
            "information request count does not match the option length",
        ));
    }
    let info_types = list
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Ok(InfoRequest { name, info_types })
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&minimum.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&maximum.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for a string item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(info_type: u16, text: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + text.len());
    b.extend_from_slice(&info_type.to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload: the name, then the description as free text.
pub fn encode_server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    // Registry names are at most STRING_BYTES_MAX bytes, so this never saturates.
    b.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// A transmission request header as sent by the client, not yet validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn decode_request(buf: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, NbdError> {
    let magic = u32::from_be_bytes(field(buf, 0));
    if magic != REQUEST_MAGIC {
        return Err(NbdError::Protocol(format!("request magic {magic:#010x}")));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(field(buf, 4)),
        command: u16::from_be_bytes(field(buf, 6)),
        handle: u64::from_be_bytes(field(buf, 8)),
        offset: u64::from_be_bytes(field(buf, 16)),
        length: u32::from_be_bytes(field(buf, 24)),
    })
}

pub fn encode_simple_reply(out: &mut BytesMut, error: u32, handle: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(handle);
}

/// Copies `N` bytes at `at`. Callers pass slices whose length they checked (or fixed-size
/// arrays), so the zero fill for a short slice is unreachable rather than a silent default.
fn field<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = buf.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_golden_bytes() {
        let mut out = BytesMut::new();
        encode_greeting(&mut out);
        assert_eq!(&out[..], b"NBDMAGICIHAVEOPT\x00\x03");
        assert_eq!(out.len(), GREETING_BYTES);
    }

    #[test]
    fn request_decodes_golden_bytes() {
        let raw: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0,
            0, 0x10, 0x00, 0x00, 0x00, 0x02, 0x00,
        ];
        let req = decode_request(&raw).unwrap();
        assert_eq!(
            req,
            RequestHeader {
                flags: NBD_CMD_FLAG_FUA,
                command: NBD_CMD_WRITE,
                handle: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            }
        );
    }

    #[test]
    fn request_with_bad_magic_is_an_error() {
        let mut raw = [0u8; 28];
        raw[0] = 0x25;
        assert!(matches!(decode_request(&raw), Err(NbdError::Protocol(_))));
    }

    #[test]
    fn simple_reply_golden_bytes() {
        let mut out = BytesMut::new();
        encode_simple_reply(&mut out, NBD_EINVAL, 7);
        assert_eq!(
            &out[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn option_reply_golden_bytes() {
        let mut out = BytesMut::new();
        encode_option_reply(&mut out, NBD_OPT_GO, NBD_REP_ACK, &[]);
        assert_eq!(
            &out[..],
            &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn option_header_rejects_bad_magic() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(b"IHAVEOPX");
        assert!(decode_option_header(&raw).is_err());
        raw[..8].copy_from_slice(b"IHAVEOPT");
        raw[11] = 7;
        raw[15] = 9;
        let header = decode_option_header(&raw).unwrap();
        assert_eq!(
            header,
            OptionHeader {
                option: 7,
                length: 9
            }
        );
    }

    #[test]
    fn info_request_decodes_and_rejects_inconsistent_lengths() {
        let mut data = vec![0, 0, 0, 3];
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        let req = decode_info_request(&data).unwrap();
        assert_eq!(req.name, b"abc");
        assert_eq!(req.info_types, vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);

        // Count says two requests but only one follows.
        assert!(decode_info_request(&data[..data.len() - 2]).is_err());
        // Name length larger than the option.
        assert!(decode_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        assert!(decode_info_request(&[0, 0, 0]).is_err());
        assert!(decode_info_request(&[]).is_err());
    }

    #[test]
    fn transmission_flags_follow_features() {
        let none = ExportFeatures {
            read_only: false,
            can_flush: false,
            can_fua: false,
            can_trim: false,
            can_write_zeroes: false,
            can_multi_conn: false,
        };
        assert_eq!(transmission_flags(&none), NBD_FLAG_HAS_FLAGS);
        let all = ExportFeatures {
            read_only: true,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
        };
        assert_eq!(transmission_flags(&all), 0b1_0110_1111);
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let mut out = BytesMut::new();
        encode_export_name_reply(&mut out, 1 << 20, 1, true);
        assert_eq!(out.len(), 10);
        out.clear();
        encode_export_name_reply(&mut out, 1 << 20, 1, false);
        assert_eq!(out.len(), 134);
    }
}
