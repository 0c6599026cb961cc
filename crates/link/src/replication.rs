//! The replication link between a local and a remote appliance: frames, messages, batches of journal records.
//!
//! A sibling of the split link's `frame.rs`, with its own magic so that a replication peer
//! that dials a split-link port (or the reverse) is refused at the first header instead of
//! being misparsed. Blocking helpers (`write_message`, `read_message`) run on the shipper and
//! receiver threads; encoding and decoding are pure functions, tested with golden bytes.
//!
//! Frame, version 1 (all integers little-endian):
//! ```text
//! offset size field
//!      0    4 magic      b"CDPR"
//!      4    2 version    1
//!      6    1 kind       see below
//!      7    1 flags      0 (a set bit is a protocol error)
//!      8    4 body_len   <= REPLICATION_FRAME_BODY_MAX
//!     12    4 crc32      over header bytes 0..12 then the body
//!     16    .. body
//! ```
//! Bodies (text = u16 length + UTF-8 bytes, at most TEXT_LEN_MAX):
//! ```text
//! 1  Hello      group text, source_group_id u64, volume_count u16,
//!               volume_count x (volume_id u32, size u64, name text)
//! 2  Batch      first_seq u64, record_count u32, raw_len u32, codec u8 (0 raw, 1 zstd),
//!               3 reserved zero bytes, then the records: raw, or one zstd frame that
//!               decompresses to exactly raw_len bytes
//! 3  Heartbeat  (empty) the shipper is idle; the receiver answers with a BatchAck
//! 16 Welcome    last_seq u64: the receiver's journal is durable through this seq
//! 17 BatchAck   through_seq u64: everything up to here is durable at the receiver
//! 18 Refuse     reason text
//! ```
//! One record inside a batch: a 52-byte head, then the payload (the write's data
//! uncompressed, or a bookmark's journal payload):
//! ```text
//!  0 8 seq            8 8 timestamp_ns     16 1 kind (journal numbering: 1 Write, 2 Trim,
//! 17 3 zero          20 4 volume id            3 Zero, 4 Bookmark, 5 ResyncStart, 6 ResyncEnd)
//! 24 8 source_seq    32 8 offset           40 8 length          48 4 payload_len
//! ```
//! Records of a batch have contiguous seqs from `first_seq` and non-decreasing timestamps.

use std::io::{Read, Write};

use bytes::Bytes;

use crate::error::LinkError;
use crate::limits::{TEXT_LEN_MAX, WRITE_PAYLOAD_MAX};

pub const MAGIC: [u8; 4] = *b"CDPR";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;

/// Bytes of records the shipper puts in one batch before it cuts it (a single record larger
/// than this travels alone). Each batch in flight pins about this much memory at both ends.
pub const BATCH_RAW_BYTES_TARGET: usize = 8 * 1024 * 1024;

/// Largest raw (uncompressed) batch: one maximal write record, or a full target batch.
pub const BATCH_RAW_BYTES_MAX: usize = WRITE_PAYLOAD_MAX + 4096;

/// Most records in one batch; bounds per-record work and allocation at the receiver.
pub const BATCH_RECORDS_MAX: usize = 4096;

/// Batches the shipper may have unacknowledged. With `BATCH_RAW_BYTES_MAX` this bounds what a
/// slow remote makes the shipper hold (and resend after a reconnect).
pub const BATCHES_IN_FLIGHT_MAX: usize = 4;

/// Volumes one Hello may describe.
pub const HELLO_VOLUMES_MAX: usize = 1024;

/// Largest bookmark payload a batch may carry (the journal's own limit).
pub const BOOKMARK_PAYLOAD_MAX: usize = 4096;

/// Largest frame body: a raw batch plus its fixed fields; a Hello with every volume fits too.
pub const REPLICATION_FRAME_BODY_MAX: usize = BATCH_RAW_BYTES_MAX + 64;

/// Bytes of one record's fixed head inside a batch, payload_len included.
pub const RECORD_HEAD_LEN: usize = 52;

const _: () = assert!(BATCH_RAW_BYTES_TARGET <= BATCH_RAW_BYTES_MAX);
const _: () = assert!(WRITE_PAYLOAD_MAX + RECORD_HEAD_LEN <= BATCH_RAW_BYTES_MAX);
const _: () =
    assert!(HELLO_VOLUMES_MAX * (12 + 2 + TEXT_LEN_MAX) + 64 <= REPLICATION_FRAME_BODY_MAX);
const _: () = assert!(REPLICATION_FRAME_BODY_MAX <= u32::MAX as usize);

/// What a replicated record does; the numbers are the journal's record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicatedKind {
    Write = 1,
    Trim = 2,
    Zero = 3,
    Bookmark = 4,
    ResyncStart = 5,
    ResyncEnd = 6,
}

impl ReplicatedKind {
    fn from_code(code: u8) -> Option<ReplicatedKind> {
        Some(match code {
            1 => ReplicatedKind::Write,
            2 => ReplicatedKind::Trim,
            3 => ReplicatedKind::Zero,
            4 => ReplicatedKind::Bookmark,
            5 => ReplicatedKind::ResyncStart,
            6 => ReplicatedKind::ResyncEnd,
            _ => return None,
        })
    }
}

/// One journal record as it travels: everything the remote journal needs to hold the same
/// record at the same seq and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicatedRecord {
    pub seq: u64,
    pub timestamp_ns: u64,
    pub kind: ReplicatedKind,
    /// The sender's volume id (the receiver maps it by name, from the Hello).
    pub volume: u32,
    pub source_seq: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: Bytes,
}

/// A volume of the replicated group as the sender describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloVolume {
    pub id: u32,
    pub size: u64,
    pub name: String,
}

/// One message on the replication link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    Hello {
        group: String,
        source_group_id: u64,
        volumes: Vec<HelloVolume>,
    },
    Batch {
        records: Vec<ReplicatedRecord>,
    },
    Heartbeat,
    Welcome {
        last_seq: u64,
    },
    BatchAck {
        through_seq: u64,
    },
    Refuse {
        reason: String,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const BATCH: u8 = 2;
    pub const HEARTBEAT: u8 = 3;
    pub const WELCOME: u8 = 16;
    pub const BATCH_ACK: u8 = 17;
    pub const REFUSE: u8 = 18;
}

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// How a batch is compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchCodec {
    Raw,
    /// zstd at this level; kept only when it saves bytes.
    Zstd(i32),
}

/// A message encoded for the socket, with the sizes a status display wants.
pub struct EncodedMessage {
    pub bytes: Vec<u8>,
    /// Record bytes before compression (batches only; 0 otherwise).
    pub raw_len: usize,
}

fn corrupt(what: impl Into<String>) -> LinkError {
    LinkError::Corrupt(what.into())
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    // Texts we send are short; cut (on a char boundary) rather than fail.
    let mut end = text.len().min(TEXT_LEN_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// Encodes the records of a batch back to back (the raw form, before compression).
pub fn encode_records(records: &[ReplicatedRecord]) -> Vec<u8> {
    let len: usize = records
        .iter()
        .map(|r| RECORD_HEAD_LEN + r.payload.len())
        .sum();
    let mut out = Vec::with_capacity(len);
    for r in records {
        out.extend_from_slice(&r.seq.to_le_bytes());
        out.extend_from_slice(&r.timestamp_ns.to_le_bytes());
        out.push(r.kind as u8);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&r.volume.to_le_bytes());
        out.extend_from_slice(&r.source_seq.to_le_bytes());
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.length.to_le_bytes());
        out.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.payload);
    }
    out
}

impl ReplicationMessage {
    /// Encodes the message as one frame. Batches are compressed with `codec` when that
    /// makes them smaller. Panics only on a caller's broken invariant (an over-long batch).
    pub fn encode(&self, codec: BatchCodec) -> EncodedMessage {
        let mut body = Vec::new();
        let mut raw_len = 0;
        let kind = match self {
            ReplicationMessage::Hello {
                group,
                source_group_id,
                volumes,
            } => {
                put_text(&mut body, group);
                body.extend_from_slice(&source_group_id.to_le_bytes());
                body.extend_from_slice(&(volumes.len() as u16).to_le_bytes());
                for v in volumes {
                    body.extend_from_slice(&v.id.to_le_bytes());
                    body.extend_from_slice(&v.size.to_le_bytes());
                    put_text(&mut body, &v.name);
                }
                kind::HELLO
            }
            ReplicationMessage::Batch { records } => {
                assert!(!records.is_empty() && records.len() <= BATCH_RECORDS_MAX);
                let raw = encode_records(records);
                assert!(raw.len() <= BATCH_RAW_BYTES_MAX);
                raw_len = raw.len();
                let compressed = match codec {
                    BatchCodec::Raw => None,
                    BatchCodec::Zstd(level) => zstd::bulk::compress(&raw, level)
                        .ok()
                        .filter(|z| z.len() < raw.len()),
                };
                body.extend_from_slice(&records[0].seq.to_le_bytes());
                body.extend_from_slice(&(records.len() as u32).to_le_bytes());
                body.extend_from_slice(&(raw.len() as u32).to_le_bytes());
                match compressed {
                    Some(z) => {
                        body.extend_from_slice(&[CODEC_ZSTD, 0, 0, 0]);
                        body.extend_from_slice(&z);
                    }
                    None => {
                        body.extend_from_slice(&[CODEC_RAW, 0, 0, 0]);
                        body.extend_from_slice(&raw);
                    }
                }
                kind::BATCH
            }
            ReplicationMessage::Heartbeat => kind::HEARTBEAT,
            ReplicationMessage::Welcome { last_seq } => {
                body.extend_from_slice(&last_seq.to_le_bytes());
                kind::WELCOME
            }
            ReplicationMessage::BatchAck { through_seq } => {
                body.extend_from_slice(&through_seq.to_le_bytes());
                kind::BATCH_ACK
            }
            ReplicationMessage::Refuse { reason } => {
                put_text(&mut body, reason);
                kind::REFUSE
            }
        };
        assert!(body.len() <= REPLICATION_FRAME_BODY_MAX);
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(&encode_header(kind, &body));
        bytes.extend_from_slice(&body);
        EncodedMessage { bytes, raw_len }
    }

    /// Decodes a frame body whose header and CRC were already checked.
    pub fn decode(kind: u8, body: &[u8]) -> Result<ReplicationMessage, LinkError> {
        let mut c = Cursor { buf: body, at: 0 };
        let message = match kind {
            kind::HELLO => {
                let group = c.text()?;
                let source_group_id = c.u64()?;
                let count = c.u16()? as usize;
                if count > HELLO_VOLUMES_MAX {
                    return Err(corrupt(format!("Hello names {count} volumes")));
                }
                let mut volumes = Vec::with_capacity(count);
                for _ in 0..count {
                    let id = c.u32()?;
                    let size = c.u64()?;
                    let name = c.text()?;
                    volumes.push(HelloVolume { id, size, name });
                }
                ReplicationMessage::Hello {
                    group,
                    source_group_id,
                    volumes,
                }
            }
            kind::BATCH => decode_batch(&mut c)?,
            kind::HEARTBEAT => ReplicationMessage::Heartbeat,
            kind::WELCOME => ReplicationMessage::Welcome { last_seq: c.u64()? },
            kind::BATCH_ACK => ReplicationMessage::BatchAck {
                through_seq: c.u64()?,
            },
            kind::REFUSE => ReplicationMessage::Refuse { reason: c.text()? },
            other => return Err(corrupt(format!("unknown replication message kind {other}"))),
        };
        if c.at != body.len() {
            return Err(corrupt(format!(
                "{} trailing bytes after a kind {kind} message",
                body.len() - c.at
            )));
        }
        Ok(message)
    }
}

fn decode_batch(c: &mut Cursor<'_>) -> Result<ReplicationMessage, LinkError> {
    let first_seq = c.u64()?;
    let count = c.u32()? as usize;
    let raw_len = c.u32()? as usize;
    let codec = c.u8()?;
    if c.take(3)? != [0, 0, 0] {
        return Err(corrupt("reserved batch bytes set"));
    }
    if first_seq == 0 {
        return Err(corrupt("batch starts at seq 0"));
    }
    if count == 0 || count > BATCH_RECORDS_MAX {
        return Err(corrupt(format!(
            "batch of {count} records (1..={BATCH_RECORDS_MAX})"
        )));
    }
    if raw_len > BATCH_RAW_BYTES_MAX || raw_len < count * RECORD_HEAD_LEN {
        return Err(corrupt(format!(
            "batch of {count} records claims {raw_len} raw bytes"
        )));
    }
    let rest = c.take(c.buf.len() - c.at)?;
    let raw: Bytes = match codec {
        CODEC_RAW => {
            if rest.len() != raw_len {
                return Err(corrupt(format!(
                    "raw batch holds {} bytes, its header says {raw_len}",
                    rest.len()
                )));
            }
            Bytes::copy_from_slice(rest)
        }
        CODEC_ZSTD => {
            // The capacity bounds what a hostile frame can make us allocate.
            let plain = zstd::bulk::decompress(rest, raw_len)
                .map_err(|e| corrupt(format!("batch does not decompress: {e}")))?;
            if plain.len() != raw_len {
                return Err(corrupt(format!(
                    "batch decompresses to {} bytes, its header says {raw_len}",
                    plain.len()
                )));
            }
            Bytes::from(plain)
        }
        other => return Err(corrupt(format!("unknown batch codec {other}"))),
    };
    let mut r = Cursor { buf: &raw, at: 0 };
    let mut records = Vec::with_capacity(count);
    let mut last_timestamp = 0;
    for i in 0..count {
        let seq = r.u64()?;
        let expected = first_seq
            .checked_add(i as u64)
            .ok_or_else(|| corrupt("batch seqs overflow"))?;
        if seq != expected {
            return Err(corrupt(format!(
                "batch record {i} has seq {seq}, expected {expected}"
            )));
        }
        let timestamp_ns = r.u64()?;
        if timestamp_ns < last_timestamp {
            return Err(corrupt(format!("seq {seq}: timestamp goes backwards")));
        }
        last_timestamp = timestamp_ns;
        let code = r.u8()?;
        let kind = ReplicatedKind::from_code(code)
            .ok_or_else(|| corrupt(format!("seq {seq}: unknown record kind {code}")))?;
        if r.take(3)? != [0, 0, 0] {
            return Err(corrupt(format!("seq {seq}: reserved record bytes set")));
        }
        let volume = r.u32()?;
        let source_seq = r.u64()?;
        let offset = r.u64()?;
        let length = r.u64()?;
        let payload_len = r.u32()? as usize;
        let at = r.at;
        r.take(payload_len)?;
        let payload = raw.slice(at..at + payload_len);
        let consistent = match kind {
            ReplicatedKind::Write => {
                length > 0 && payload_len as u64 == length && payload_len <= WRITE_PAYLOAD_MAX
            }
            ReplicatedKind::Trim | ReplicatedKind::Zero => length > 0 && payload_len == 0,
            ReplicatedKind::Bookmark => {
                payload_len <= BOOKMARK_PAYLOAD_MAX && length == 0 && offset == 0
            }
            ReplicatedKind::ResyncStart | ReplicatedKind::ResyncEnd => {
                payload_len == 0 && length == 0 && offset == 0
            }
        };
        if !consistent || offset.checked_add(length).is_none() {
            return Err(corrupt(format!(
                "seq {seq}: {kind:?} with offset {offset}, length {length}, payload {payload_len}"
            )));
        }
        records.push(ReplicatedRecord {
            seq,
            timestamp_ns,
            kind,
            volume,
            source_seq,
            offset,
            length,
            payload,
        });
    }
    if r.at != raw.len() {
        return Err(corrupt("trailing bytes after a batch's records"));
    }
    Ok(ReplicationMessage::Batch { records })
}

/// Bounds-checked little-endian reads; running off the end is corruption, never a panic.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LinkError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("message body too short"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, LinkError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, LinkError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, LinkError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn text(&mut self) -> Result<String, LinkError> {
        let len = self.u16()? as usize;
        if len > TEXT_LEN_MAX {
            return Err(corrupt(format!("text of {len} bytes")));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("text is not UTF-8"))
    }
}

fn encode_header(kind: u8, body: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6] = kind;
    header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[0..12]);
    crc.update(body);
    header[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    header
}

/// Validates magic, version, flags and length; returns (kind, body_len, crc).
fn decode_header(header: &[u8; HEADER_LEN]) -> Result<(u8, usize, u32), LinkError> {
    if header[0..4] != MAGIC {
        return Err(corrupt(format!(
            "bad replication frame magic {:02x?}",
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
        return Err(corrupt(format!(
            "reserved replication frame flags set: {:#x}",
            header[7]
        )));
    }
    let body_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if body_len > REPLICATION_FRAME_BODY_MAX {
        return Err(corrupt(format!(
            "replication frame body of {body_len} bytes exceeds {REPLICATION_FRAME_BODY_MAX}"
        )));
    }
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    Ok((header[6], body_len, crc))
}

/// Reads one whole, CRC-checked message. A clean end of stream before a header is `Closed`.
pub fn read_message(r: &mut impl Read) -> Result<ReplicationMessage, LinkError> {
    let mut header = [0u8; HEADER_LEN];
    let first = loop {
        match r.read(&mut header[..1]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    if first == 0 {
        return Err(LinkError::Closed);
    }
    r.read_exact(&mut header[1..])?;
    let (kind, body_len, stored) = decode_header(&header)?;
    // Bounded by decode_header.
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[0..12]);
    crc.update(&body);
    let actual = crc.finalize();
    if actual != stored {
        return Err(corrupt(format!(
            "replication frame CRC mismatch (kind {kind}): stored {stored:#010x}, computed {actual:#010x}"
        )));
    }
    ReplicationMessage::decode(kind, &body)
}

/// Writes one message (uncompressed batch codec; batches go through `encode` directly).
pub fn write_message(w: &mut impl Write, message: &ReplicationMessage) -> Result<(), LinkError> {
    w.write_all(&message.encode(BatchCodec::Raw).bytes)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, kind: ReplicatedKind, payload: &[u8]) -> ReplicatedRecord {
        ReplicatedRecord {
            seq,
            timestamp_ns: 1000 + seq,
            kind,
            volume: 1,
            source_seq: seq * 10,
            offset: if kind == ReplicatedKind::Bookmark {
                0
            } else {
                4096
            },
            length: if kind == ReplicatedKind::Bookmark {
                0
            } else {
                payload.len().max(512) as u64
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn roundtrip(m: &ReplicationMessage, codec: BatchCodec) -> ReplicationMessage {
        let bytes = m.encode(codec).bytes;
        read_message(&mut &bytes[..]).unwrap()
    }

    /// Goal: version 1 never changes. Method: encode fixed messages and compare every byte.
    #[test]
    fn golden_bytes_v1() {
        let ack = ReplicationMessage::BatchAck {
            through_seq: 0x0102,
        }
        .encode(BatchCodec::Raw)
        .bytes;
        assert_eq!(
            &ack[..12],
            &[b'C', b'D', b'P', b'R', 1, 0, 17, 0, 8, 0, 0, 0]
        );
        assert_eq!(&ack[16..], &[2, 1, 0, 0, 0, 0, 0, 0]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&ack[..12]);
        crc.update(&ack[16..]);
        assert_eq!(ack[12..16], crc.finalize().to_le_bytes());

        let batch = ReplicationMessage::Batch {
            records: vec![ReplicatedRecord {
                seq: 7,
                timestamp_ns: 9,
                kind: ReplicatedKind::Write,
                volume: 2,
                source_seq: 3,
                offset: 512,
                length: 2,
                payload: Bytes::from_static(b"ab"),
            }],
        }
        .encode(BatchCodec::Raw)
        .bytes;
        let body: Vec<u8> = [
            &7u64.to_le_bytes()[..],
            &1u32.to_le_bytes(),
            &54u32.to_le_bytes(),
            &[0, 0, 0, 0],
            &7u64.to_le_bytes(),
            &9u64.to_le_bytes(),
            &[1, 0, 0, 0],
            &2u32.to_le_bytes(),
            &3u64.to_le_bytes(),
            &512u64.to_le_bytes(),
            &2u64.to_le_bytes(),
            &2u32.to_le_bytes(),
            b"ab",
        ]
        .concat();
        assert_eq!(&batch[16..], &body[..]);
        assert_eq!(batch[6], 2);

        let hello = ReplicationMessage::Hello {
            group: "g".into(),
            source_group_id: 5,
            volumes: vec![HelloVolume {
                id: 1,
                size: 4096,
                name: "v".into(),
            }],
        }
        .encode(BatchCodec::Raw)
        .bytes;
        let body: Vec<u8> = [
            &[1, 0, b'g'][..],
            &5u64.to_le_bytes(),
            &[1, 0],
            &1u32.to_le_bytes(),
            &4096u64.to_le_bytes(),
            &[1, 0, b'v'],
        ]
        .concat();
        assert_eq!(&hello[16..], &body[..]);
    }

    #[test]
    fn every_message_round_trips_raw_and_compressed() {
        let data = vec![7u8; 100_000];
        let messages = vec![
            ReplicationMessage::Hello {
                group: "default".into(),
                source_group_id: u64::MAX,
                volumes: vec![
                    HelloVolume {
                        id: 1,
                        size: 1 << 30,
                        name: "vol0".into(),
                    },
                    HelloVolume {
                        id: 9,
                        size: 1 << 20,
                        name: "vol1".into(),
                    },
                ],
            },
            ReplicationMessage::Batch {
                records: vec![
                    record(1, ReplicatedKind::Write, &data),
                    record(2, ReplicatedKind::Zero, b""),
                    record(3, ReplicatedKind::Bookmark, b"CDPBname"),
                    ReplicatedRecord {
                        offset: 0,
                        length: 0,
                        ..record(4, ReplicatedKind::ResyncStart, b"")
                    },
                ],
            },
            ReplicationMessage::Heartbeat,
            ReplicationMessage::Welcome { last_seq: 42 },
            ReplicationMessage::BatchAck { through_seq: 43 },
            ReplicationMessage::Refuse {
                reason: "no such group".into(),
            },
        ];
        for m in &messages {
            assert_eq!(&roundtrip(m, BatchCodec::Raw), m);
            assert_eq!(&roundtrip(m, BatchCodec::Zstd(3)), m);
        }
        // Compressible batches shrink on the wire.
        let encoded = messages[1].encode(BatchCodec::Zstd(3));
        assert!(encoded.bytes.len() < encoded.raw_len / 10);
    }

    /// Goal: nothing a peer sends can panic the decoder or pass unnoticed. Method: flip every
    /// byte of a small batch frame and truncate it at every length.
    #[test]
    fn damage_is_an_error_never_a_panic() {
        let m = ReplicationMessage::Batch {
            records: vec![
                record(5, ReplicatedKind::Write, b"hello world"),
                record(6, ReplicatedKind::Trim, b""),
            ],
        };
        let bytes = m.encode(BatchCodec::Raw).bytes;
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(read_message(&mut &bad[..]).is_err(), "flip at {i} accepted");
        }
        for len in 0..bytes.len() {
            assert!(read_message(&mut &bytes[..len]).is_err());
        }
    }

    #[test]
    fn body_validation_rejects_contradictions() {
        let good = [record(5, ReplicatedKind::Write, b"abc")];
        let check = |records: &[ReplicatedRecord]| {
            let raw = encode_records(records);
            let mut body = Vec::new();
            body.extend_from_slice(&records[0].seq.to_le_bytes());
            body.extend_from_slice(&(records.len() as u32).to_le_bytes());
            body.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            body.extend_from_slice(&[0, 0, 0, 0]);
            body.extend_from_slice(&raw);
            ReplicationMessage::decode(kind::BATCH, &body)
        };
        let mut rec = good[0].clone();
        rec.length = 3;
        assert!(check(&[rec.clone()]).is_ok());
        // A gap in seqs.
        let mut second = rec.clone();
        second.seq = 7;
        assert!(check(&[rec.clone(), second]).is_err());
        // Timestamps going back.
        let mut second = rec.clone();
        second.seq = 6;
        second.timestamp_ns = 1;
        assert!(check(&[rec.clone(), second]).is_err());
        // A write whose payload is not its length.
        let mut bad = rec.clone();
        bad.length = 4;
        assert!(check(&[bad]).is_err());
        // A range past u64.
        let mut bad = rec.clone();
        bad.offset = u64::MAX;
        assert!(check(&[bad]).is_err());
        // A trim with a payload.
        let mut bad = rec.clone();
        bad.kind = ReplicatedKind::Trim;
        assert!(check(&[bad]).is_err());
        // A zstd frame claiming more than the limit is refused before decompressing.
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&(BATCH_RAW_BYTES_MAX as u32 + 1).to_le_bytes());
        body.extend_from_slice(&[1, 0, 0, 0]);
        assert!(ReplicationMessage::decode(kind::BATCH, &body).is_err());
        // Too many volumes in a Hello.
        let mut body = vec![1, 0, b'g'];
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&((HELLO_VOLUMES_MAX + 1) as u16).to_le_bytes());
        assert!(ReplicationMessage::decode(kind::HELLO, &body).is_err());
        // A split-link frame is not a replication frame.
        let split = crate::frame::encode_header(1, &[b""]);
        assert!(read_message(&mut &split[..]).is_err());
    }
}
