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
//! META_CONTEXT C: u32 export name length | name | u32 n | n x (u32 query length | query)
//! REP_META_CTX S: u32 context id | name
//! chunk        S: u32 0x668e33ef | u16 flags | u16 type | u64 handle | u32 length | payload
//!   OFFSET_DATA    u64 offset | data
//!   OFFSET_HOLE    u64 offset | u32 hole length
//!   BLOCK_STATUS   u32 context id | n x (u32 extent length | u32 status flags)
//!   ERROR          u32 error | u16 message length | message
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
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const GREETING_BYTES: usize = 18;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const CHUNK_HEADER_BYTES: usize = 20;
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
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
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
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// `base:allocation` status flags.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// The one metadata context the protocol defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values for simple replies.
pub const NBD_OK: u32 = 0;
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Handshake flags this server offers.
pub const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Client flags this server understands; any other bit ends the connection (spec: MUST).
pub const CLIENT_FLAGS_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// The transmission flags for an export with these features; `structured` says whether
/// the client negotiated structured replies (DF is only offered then, as the spec says).
pub fn transmission_flags(features: &ExportFeatures, structured: bool) -> u16 {
    // CACHE is a hint every export can take: it is answered at once, without reading.
    let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE;
    if structured {
        flags |= NBD_FLAG_SEND_DF;
    }
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
        // FAST_ZERO goes with WRITE_ZEROES (spec: MUST NOT without it). Every export can
        // honour it: one that cannot zero fast answers ENOTSUP at once (`write_zeroes_fast`),
        // which tells a client such as qemu-img to skip pre-zeroing and write instead.
        flags |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
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

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: Vec<u8>,
    pub queries: Vec<String>,
}

/// Decodes a metadata context option; at most `queries_max` queries, each valid UTF-8.
pub fn decode_meta_context_request(
    data: &[u8],
    queries_max: usize,
) -> Result<MetaContextRequest, NbdError> {
    let bad = |why: &str| NbdError::Protocol(format!("META_CONTEXT option: {why}"));
    let mut rest = data;
    let mut take = |n: usize| -> Result<&[u8], NbdError> {
        if rest.len() < n {
            return Err(bad("runs past the option's length"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let name_len = u32::from_be_bytes(field(take(4)?, 0)) as usize;
    let export = take(name_len)?.to_vec();
    let count = u32::from_be_bytes(field(take(4)?, 0)) as usize;
    if count > queries_max {
        return Err(bad("too many queries"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_be_bytes(field(take(4)?, 0)) as usize;
        let query = std::str::from_utf8(take(len)?).map_err(|_| bad("query is not UTF-8"))?;
        queries.push(query.to_owned());
    }
    if !rest.is_empty() {
        return Err(bad("bytes left after the last query"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// A structured reply chunk header; `length` payload bytes follow.
pub fn encode_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, handle: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(handle);
    out.put_u32(length);
}

/// The header and offset of an `OFFSET_DATA` chunk; the `data_len` data bytes follow.
pub fn encode_data_chunk_header(
    out: &mut BytesMut,
    flags: u16,
    handle: u64,
    offset: u64,
    data_len: u32,
) {
    encode_chunk_header(
        out,
        flags,
        NBD_REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len.saturating_add(8),
    );
    out.put_u64(offset);
}

pub fn encode_hole_chunk(out: &mut BytesMut, flags: u16, handle: u64, offset: u64, length: u32) {
    encode_chunk_header(out, flags, NBD_REPLY_TYPE_OFFSET_HOLE, handle, 12);
    out.put_u64(offset);
    out.put_u32(length);
}

/// A `BLOCK_STATUS` chunk: `extents` are (length, status flags), at least one.
pub fn encode_block_status_chunk(
    out: &mut BytesMut,
    flags: u16,
    handle: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) {
    // Callers cap extents at BLOCK_STATUS_EXTENTS_MAX, far below what overflows u32.
    let length = u32::try_from(4 + 8 * extents.len()).unwrap_or(u32::MAX);
    encode_chunk_header(out, flags, NBD_REPLY_TYPE_BLOCK_STATUS, handle, length);
    out.put_u32(context_id);
    for &(extent_len, status) in extents {
        out.put_u32(extent_len);
        out.put_u32(status);
    }
}

/// An `ERROR` chunk, always the last of its reply; the message is cut to fit a u16.
pub fn encode_error_chunk(out: &mut BytesMut, handle: u64, error: u32, message: &str) {
    let mut cut = message.len().min(u16::MAX as usize - 6);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    encode_chunk_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        handle,
        6 + cut as u32,
    );
    out.put_u32(error);
    out.put_u16(cut as u16);
    out.put_slice(message);
}

/// The `NONE` chunk that ends a reply whose other chunks did not carry DONE.
pub fn encode_none_chunk(out: &mut BytesMut, handle: u64) {
    encode_chunk_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0);
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
        assert_eq!(
            transmission_flags(&none, false),
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE
        );
        assert_eq!(
            transmission_flags(&none, true),
            NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE | NBD_FLAG_SEND_DF
        );
        let all = ExportFeatures {
            read_only: true,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
        };
        assert_eq!(transmission_flags(&all, false), 0b1101_0110_1111);
    }

    #[test]
    fn meta_context_request_decodes_and_rejects_bad_lengths() {
        let mut data = vec![0, 0, 0, 2];
        data.extend_from_slice(b"v0");
        data.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 15]);
        data.extend_from_slice(b"base:allocation");
        let req = decode_meta_context_request(&data, 4).unwrap();
        assert_eq!(req.export, b"v0");
        assert_eq!(req.queries, vec![BASE_ALLOCATION.to_string()]);
        assert!(decode_meta_context_request(&data[..data.len() - 1], 4).is_err());
        let mut long = data.clone();
        long.push(0);
        assert!(decode_meta_context_request(&long, 4).is_err());
        assert!(decode_meta_context_request(&data, 0).is_err());
        assert!(decode_meta_context_request(&[0xff, 0xff, 0xff, 0xff], 4).is_err());
        assert!(decode_meta_context_request(&[], 4).is_err());
    }

    #[test]
    fn chunk_golden_bytes() {
        let mut out = BytesMut::new();
        encode_hole_chunk(&mut out, NBD_REPLY_FLAG_DONE, 7, 4096, 512);
        assert_eq!(
            &out[..],
            &[
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12, 0, 0, 0,
                0, 0, 0, 0x10, 0, 0, 0, 2, 0
            ]
        );
        out.clear();
        encode_error_chunk(&mut out, 1, NBD_EIO, "x");
        assert_eq!(
            &out[..],
            &[
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0,
                5, 0, 1, b'x'
            ]
        );
        out.clear();
        encode_block_status_chunk(&mut out, 0, 2, 1, &[(4096, NBD_STATE_HOLE)]);
        assert_eq!(out.len(), CHUNK_HEADER_BYTES + 12);
        assert_eq!(&out[16..20], &[0, 0, 0, 12]);
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
