//! The replication link between a local and a remote appliance: frames, messages, batches of journal records.
//!
//! Its frames use the split link's header codec (`frame.rs`) with their own magic, so that a
//! replication peer that dials a split-link port (or the reverse) is refused at the first
//! header instead of being misparsed. Blocking helpers (`write_message`, `read_message`) run on the shipper and
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
//!
//! Frame version 2 (deduplicated batches). The header is version 1's with `version` 2, and
//! the body bound is `REPLICATION_FRAME_BODY_MAX_V2`. Only `Batch` frames of a shipper with
//! dedup on use it (every other message is a version 1 frame, so a remote that reads only
//! version 1 refuses the first batch with a version error, which the shipper shows as its
//! last error; with `dedup = false` the two still talk). Receivers read both. Batch body:
//! ```text
//!  0 8 first_seq        8 4 record_count     12 4 raw_len (the records' version 1 layout)
//! 16 1 codec (0 raw, 1 zstd)                  17 3 reserved zero
//! 20 4 stream_len (the deduplicated records, before compression)
//! 24 4 window_blocks (the window's size in 4 KiB blocks; constant for a connection)
//! 28 8 window_next (blocks the window received before this batch; both ends check it)
//! 36 .. the stream: raw (stream_len bytes) or one zstd frame that decompresses to it
//! ```
//! In the stream each record is its 52-byte head (as above, `payload_len` the real payload's
//! length), then its payload. A Write's payload is cut at the volume's 4 KiB boundaries:
//! the part before the first boundary and the part after the last one travel as bytes; each
//! whole aligned block is a tag: 0 = literal (4096 bytes follow; the block enters the window),
//! 1 = all zeros, 2 = reference (u64 block number the window still holds). Other kinds carry
//! their payload as bytes. The receiver rebuilds exactly the version 1 records (the window
//! rules are in `dedup_window.rs`). A version 1 batch may follow version 2 ones on the same
//! connection (the shipper pauses dedup on data that does not repeat); it leaves the window
//! as it is.

use std::io::{Read, Write};

use bytes::Bytes;

use crate::dedup_window::{
    BlockToken, BlockWindow, DedupIndex, DEDUP_BLOCK_BYTES, DEDUP_WINDOW_BLOCKS_MAX,
};
use crate::error::LinkError;
use crate::frame::{self, FrameSpec};
use crate::limits::{TEXT_LEN_MAX, WRITE_PAYLOAD_MAX};

pub const MAGIC: [u8; 4] = *b"CDPR";
/// Frames without dedup (and everything a receiver sends).
pub const VERSION: u16 = 1;
/// Frames of a shipper that deduplicates its batches.
pub const VERSION_DEDUP: u16 = 2;
pub const HEADER_LEN: usize = frame::HEADER_LEN;

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

/// Largest deduplicated stream: every whole block of a maximal raw batch as a literal costs
/// one tag byte more than the raw form.
pub const BATCH_STREAM_BYTES_MAX: usize =
    BATCH_RAW_BYTES_MAX + BATCH_RAW_BYTES_MAX / DEDUP_BLOCK_BYTES;

/// Largest version 2 frame body: a deduplicated stream plus the batch's fixed fields.
pub const REPLICATION_FRAME_BODY_MAX_V2: usize = BATCH_STREAM_BYTES_MAX + 64;

/// Bytes of a version 2 batch's fixed fields before its stream.
const BATCH_V2_FIELDS_LEN: usize = 36;

const _: () = assert!(BATCH_RAW_BYTES_TARGET <= BATCH_RAW_BYTES_MAX);
const _: () = assert!(WRITE_PAYLOAD_MAX + RECORD_HEAD_LEN <= BATCH_RAW_BYTES_MAX);
const _: () = assert!(
    HELLO_VOLUMES_MAX * (12 + 2 + TEXT_LEN_MAX)
        + LINEAGE_GENERATIONS_MAX * (16 + 2 + TEXT_LEN_MAX)
        + 64
        <= REPLICATION_FRAME_BODY_MAX
);
const _: () = assert!(REPLICATION_FRAME_BODY_MAX <= u32::MAX as usize);
const _: () = assert!(REPLICATION_FRAME_BODY_MAX <= REPLICATION_FRAME_BODY_MAX_V2);
const _: () =
    assert!(BATCH_STREAM_BYTES_MAX + BATCH_V2_FIELDS_LEN <= REPLICATION_FRAME_BODY_MAX_V2);
const _: () = assert!(REPLICATION_FRAME_BODY_MAX_V2 <= u32::MAX as usize);
const _: () = assert!(BATCH_V1_FIELDS_LEN <= BATCH_V2_FIELDS_LEN);

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

/// One generation of a copy's history: the copy at `site` was primary from `first_seq` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireGeneration {
    pub generation: u64,
    pub first_seq: u64,
    pub site: String,
}

/// What a copy says of itself when a link opens: its generation history and its journal's
/// last seq, from which the two sides decide up to date, behind, or diverged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    pub history: Vec<WireGeneration>,
    pub last_seq: u64,
}

/// Generations in one lineage on the wire.
pub const LINEAGE_GENERATIONS_MAX: usize = 256;

/// One message on the replication link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    Hello {
        group: String,
        source_group_id: u64,
        volumes: Vec<HelloVolume>,
        /// The source's lineage (empty from a source older than roles).
        lineage: Lineage,
    },
    Batch {
        records: Vec<ReplicatedRecord>,
    },
    Heartbeat,
    Welcome {
        last_seq: u64,
        /// The remote copy's generation history.
        history: Vec<WireGeneration>,
        /// The remote copy is being reprotected: the source resynchronises it by regions
        /// (`ResyncBegin`) instead of sending batches.
        resync: bool,
    },
    /// Old primary -> secondary, the first message of a handover connection (planned
    /// failover): `lineage` is the history with the new generation the secondary is to
    /// begin, and the journal end both copies hold. Answered `Promoted` or `Refuse`.
    Promote {
        group: String,
        lineage: Lineage,
    },
    /// Secondary -> old primary: the promotion is durable here.
    Promoted {
        generation: u64,
    },
    /// Remote -> source, instead of `Welcome`: the copy here is primary in a newer
    /// generation, so the source's copy is no longer primary (it demotes itself).
    Demote {
        lineage: Lineage,
        reason: String,
    },
    BatchAck {
        through_seq: u64,
    },
    Refuse {
        reason: String,
    },
    /// Source -> remote, instead of batches, when the source released history the remote
    /// never got: the remote sends `ResyncSums` of its whole replica, the source sends the
    /// regions whose bytes differ at `through_seq` (`ResyncData`), then `ResyncEnd`; the
    /// remote's history restarts after `through_seq` and it acks `through_seq`.
    ResyncBegin {
        through_seq: u64,
        region_bytes: u32,
    },
    /// Remote -> source: BLAKE3-256 of consecutive regions of one volume (source's id) from
    /// `offset`; the last region may be short (the volume's end).
    ResyncSums {
        volume: u32,
        offset: u64,
        sums: Vec<[u8; 32]>,
    },
    /// Source -> remote: the bytes of one region at `through_seq`.
    ResyncData {
        volume: u32,
        offset: u64,
        data: Bytes,
    },
    ResyncEnd {
        through_seq: u64,
    },
}

/// Sums in one `ResyncSums` message.
pub const RESYNC_SUMS_PER_MESSAGE_MAX: usize = 1024;
/// Bytes in one `ResyncData` message (one region).
pub const RESYNC_REGION_BYTES_MAX: u32 = 4 * 1024 * 1024;

mod kind {
    pub const HELLO: u8 = 1;
    pub const BATCH: u8 = 2;
    pub const HEARTBEAT: u8 = 3;
    pub const RESYNC_BEGIN: u8 = 4;
    pub const RESYNC_DATA: u8 = 5;
    pub const RESYNC_END: u8 = 6;
    pub const PROMOTE: u8 = 7;
    pub const WELCOME: u8 = 16;
    pub const BATCH_ACK: u8 = 17;
    pub const REFUSE: u8 = 18;
    pub const RESYNC_SUMS: u8 = 19;
    pub const PROMOTED: u8 = 20;
    pub const DEMOTE: u8 = 21;
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
    /// Record bytes in the version 1 layout, before dedup and compression (batches only; 0
    /// otherwise).
    pub raw_len: usize,
    /// Record bytes after dedup, before compression (`raw_len` for a version 1 batch).
    pub stream_len: usize,
    /// The stream went out zstd-compressed (it saved bytes).
    pub compressed: bool,
}

/// How the whole blocks of deduplicated batches travelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DedupCounts {
    /// Sent as bytes (and added to the window).
    pub literal_blocks: u64,
    /// All zeros: a one-byte tag.
    pub zero_blocks: u64,
    /// The same bytes as a block the window holds: a 9-byte reference.
    pub reference_blocks: u64,
}

/// A batch's records laid out for the wire, before compression: the version 1 layout, or
/// the deduplicated version 2 stream built against the sender's window.
pub struct BatchStream {
    first_seq: u64,
    record_count: usize,
    raw_len: usize,
    /// Version 2 only: the window's size in blocks and its next number before this batch.
    window: Option<(u32, u64)>,
    /// The frame being built: room for the header and the batch's fixed fields (filled in by
    /// `encode`), then the stream, so an uncompressed batch is sent without another copy.
    buf: Vec<u8>,
    pub counts: DedupCounts,
}

/// Bytes of a version 1 batch's fixed fields before its records.
const BATCH_V1_FIELDS_LEN: usize = 20;

fn batch_prefix_len(deduplicated: bool) -> usize {
    HEADER_LEN
        + if deduplicated {
            BATCH_V2_FIELDS_LEN
        } else {
            BATCH_V1_FIELDS_LEN
        }
}

impl BatchStream {
    /// The version 1 layout. Panics only on a caller's broken invariant (an empty or
    /// over-long batch).
    pub fn plain(records: &[ReplicatedRecord]) -> BatchStream {
        assert!(!records.is_empty() && records.len() <= BATCH_RECORDS_MAX);
        let raw_len: usize = records
            .iter()
            .map(|r| RECORD_HEAD_LEN + r.payload.len())
            .sum();
        assert!(raw_len <= BATCH_RAW_BYTES_MAX);
        let prefix = batch_prefix_len(false);
        let mut buf = Vec::with_capacity(prefix + raw_len);
        buf.resize(prefix, 0);
        for r in records {
            put_record_head(&mut buf, r);
            buf.extend_from_slice(&r.payload);
        }
        BatchStream {
            first_seq: records[0].seq,
            record_count: records.len(),
            raw_len,
            window: None,
            buf,
            counts: DedupCounts::default(),
        }
    }

    /// The version 2 layout: whole aligned blocks of writes become zero tags or references
    /// to `index`'s window where they can; literals enter the window. The batch must then be
    /// sent (or the connection dropped): the receiver's window follows only what it reads.
    pub fn deduplicated(records: &[ReplicatedRecord], index: &mut DedupIndex) -> BatchStream {
        assert!(!records.is_empty() && records.len() <= BATCH_RECORDS_MAX);
        let raw_len: usize = records
            .iter()
            .map(|r| RECORD_HEAD_LEN + r.payload.len())
            .sum();
        assert!(raw_len <= BATCH_RAW_BYTES_MAX);
        let window = (index.window().slots() as u32, index.window().next_number());
        let prefix = batch_prefix_len(true);
        let mut stream = Vec::with_capacity(prefix + raw_len + raw_len / DEDUP_BLOCK_BYTES);
        stream.resize(prefix, 0);
        let mut counts = DedupCounts::default();
        for r in records {
            put_record_head(&mut stream, r);
            if r.kind != ReplicatedKind::Write {
                stream.extend_from_slice(&r.payload);
                continue;
            }
            let head_len = unaligned_head_len(r.offset, r.payload.len());
            stream.extend_from_slice(&r.payload[..head_len]);
            let mut blocks = r.payload[head_len..].chunks_exact(DEDUP_BLOCK_BYTES);
            for block in &mut blocks {
                match index.token_for(block) {
                    BlockToken::Literal => {
                        counts.literal_blocks += 1;
                        stream.push(BLOCK_LITERAL);
                        stream.extend_from_slice(block);
                    }
                    BlockToken::Zero => {
                        counts.zero_blocks += 1;
                        stream.push(BLOCK_ZERO);
                    }
                    BlockToken::Reference(number) => {
                        counts.reference_blocks += 1;
                        stream.push(BLOCK_REFERENCE);
                        stream.extend_from_slice(&number.to_le_bytes());
                    }
                }
            }
            stream.extend_from_slice(blocks.remainder());
        }
        assert!(stream.len() - prefix <= BATCH_STREAM_BYTES_MAX);
        BatchStream {
            first_seq: records[0].seq,
            record_count: records.len(),
            raw_len,
            window: Some(window),
            buf: stream,
            counts,
        }
    }

    /// Record bytes in the version 1 layout.
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// Bytes of the stream before compression.
    pub fn stream_len(&self) -> usize {
        self.buf.len() - batch_prefix_len(self.window.is_some())
    }

    /// Frames the batch; the stream is compressed with `codec` only if that saves bytes.
    pub fn encode(self, codec: BatchCodec) -> EncodedMessage {
        let prefix = batch_prefix_len(self.window.is_some());
        let stream_len = self.stream_len();
        let compressed = match codec {
            BatchCodec::Raw => None,
            BatchCodec::Zstd(level) => zstd::bulk::compress(&self.buf[prefix..], level)
                .ok()
                .filter(|z| z.len() < stream_len),
        };
        let is_compressed = compressed.is_some();
        let mut bytes = match compressed {
            Some(z) => {
                let mut bytes = Vec::with_capacity(prefix + z.len());
                bytes.resize(prefix, 0);
                bytes.extend_from_slice(&z);
                bytes
            }
            None => self.buf,
        };
        let mut fields = Vec::with_capacity(BATCH_V2_FIELDS_LEN);
        fields.extend_from_slice(&self.first_seq.to_le_bytes());
        fields.extend_from_slice(&(self.record_count as u32).to_le_bytes());
        fields.extend_from_slice(&(self.raw_len as u32).to_le_bytes());
        let codec_code = if is_compressed { CODEC_ZSTD } else { CODEC_RAW };
        fields.extend_from_slice(&[codec_code, 0, 0, 0]);
        let version = match self.window {
            None => VERSION,
            Some((blocks, next)) => {
                fields.extend_from_slice(&(stream_len as u32).to_le_bytes());
                fields.extend_from_slice(&blocks.to_le_bytes());
                fields.extend_from_slice(&next.to_le_bytes());
                VERSION_DEDUP
            }
        };
        bytes[HEADER_LEN..prefix].copy_from_slice(&fields);
        assert!(bytes.len() - HEADER_LEN <= body_max(version));
        let header = encode_header(version, kind::BATCH, &bytes[HEADER_LEN..]);
        bytes[..HEADER_LEN].copy_from_slice(&header);
        EncodedMessage {
            bytes,
            raw_len: self.raw_len,
            stream_len,
            compressed: is_compressed,
        }
    }
}

/// Bytes of a write before its first 4 KiB boundary on the volume (all of it if it ends
/// first): they travel as bytes, never as a block.
fn unaligned_head_len(offset: u64, len: usize) -> usize {
    let to_boundary =
        (DEDUP_BLOCK_BYTES as u64 - offset % DEDUP_BLOCK_BYTES as u64) % DEDUP_BLOCK_BYTES as u64;
    (to_boundary as usize).min(len)
}

const BLOCK_LITERAL: u8 = 0;
const BLOCK_ZERO: u8 = 1;
const BLOCK_REFERENCE: u8 = 2;

fn corrupt(what: impl Into<String>) -> LinkError {
    LinkError::Corrupt(what.into())
}

fn put_history(out: &mut Vec<u8>, history: &[WireGeneration]) {
    // Longer histories are cut to their newest entries: comparisons need the recent ones.
    let skip = history.len().saturating_sub(LINEAGE_GENERATIONS_MAX);
    out.extend_from_slice(&((history.len() - skip) as u16).to_le_bytes());
    for g in &history[skip..] {
        out.extend_from_slice(&g.generation.to_le_bytes());
        out.extend_from_slice(&g.first_seq.to_le_bytes());
        put_text(out, &g.site);
    }
}

fn put_lineage(out: &mut Vec<u8>, lineage: &Lineage) {
    put_history(out, &lineage.history);
    out.extend_from_slice(&lineage.last_seq.to_le_bytes());
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

fn put_record_head(out: &mut Vec<u8>, r: &ReplicatedRecord) {
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.timestamp_ns.to_le_bytes());
    out.push(r.kind as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&r.volume.to_le_bytes());
    out.extend_from_slice(&r.source_seq.to_le_bytes());
    out.extend_from_slice(&r.offset.to_le_bytes());
    out.extend_from_slice(&r.length.to_le_bytes());
    out.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
}

/// Encodes the records of a batch back to back (the raw form, before compression).
pub fn encode_records(records: &[ReplicatedRecord]) -> Vec<u8> {
    let len: usize = records
        .iter()
        .map(|r| RECORD_HEAD_LEN + r.payload.len())
        .sum();
    let mut out = Vec::with_capacity(len);
    for r in records {
        put_record_head(&mut out, r);
        out.extend_from_slice(&r.payload);
    }
    out
}

impl ReplicationMessage {
    /// Encodes the message as one version 1 frame (version 2 batches need the sender's
    /// window: `BatchStream::deduplicated`). Batches are compressed with `codec` when that
    /// makes them smaller. Panics only on a caller's broken invariant (an over-long batch).
    pub fn encode(&self, codec: BatchCodec) -> EncodedMessage {
        let mut body = Vec::new();
        let kind = match self {
            ReplicationMessage::Hello {
                group,
                source_group_id,
                volumes,
                lineage,
            } => {
                put_text(&mut body, group);
                body.extend_from_slice(&source_group_id.to_le_bytes());
                body.extend_from_slice(&(volumes.len() as u16).to_le_bytes());
                for v in volumes {
                    body.extend_from_slice(&v.id.to_le_bytes());
                    body.extend_from_slice(&v.size.to_le_bytes());
                    put_text(&mut body, &v.name);
                }
                put_lineage(&mut body, lineage);
                kind::HELLO
            }
            ReplicationMessage::Promote { group, lineage } => {
                put_text(&mut body, group);
                put_lineage(&mut body, lineage);
                kind::PROMOTE
            }
            ReplicationMessage::Promoted { generation } => {
                body.extend_from_slice(&generation.to_le_bytes());
                kind::PROMOTED
            }
            ReplicationMessage::Demote { lineage, reason } => {
                put_lineage(&mut body, lineage);
                put_text(&mut body, reason);
                kind::DEMOTE
            }
            ReplicationMessage::Batch { records } => {
                return BatchStream::plain(records).encode(codec);
            }
            ReplicationMessage::Heartbeat => kind::HEARTBEAT,
            ReplicationMessage::Welcome {
                last_seq,
                history,
                resync,
            } => {
                body.extend_from_slice(&last_seq.to_le_bytes());
                put_history(&mut body, history);
                body.push(u8::from(*resync));
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
            ReplicationMessage::ResyncBegin {
                through_seq,
                region_bytes,
            } => {
                body.extend_from_slice(&through_seq.to_le_bytes());
                body.extend_from_slice(&region_bytes.to_le_bytes());
                kind::RESYNC_BEGIN
            }
            ReplicationMessage::ResyncSums {
                volume,
                offset,
                sums,
            } => {
                body.extend_from_slice(&volume.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&(sums.len() as u32).to_le_bytes());
                for sum in sums {
                    body.extend_from_slice(sum);
                }
                kind::RESYNC_SUMS
            }
            ReplicationMessage::ResyncData {
                volume,
                offset,
                data,
            } => {
                body.extend_from_slice(&volume.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&(data.len() as u32).to_le_bytes());
                body.extend_from_slice(data);
                kind::RESYNC_DATA
            }
            ReplicationMessage::ResyncEnd { through_seq } => {
                body.extend_from_slice(&through_seq.to_le_bytes());
                kind::RESYNC_END
            }
        };
        EncodedMessage {
            bytes: frame(VERSION, kind, &body),
            raw_len: 0,
            stream_len: 0,
            compressed: false,
        }
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
                // A source older than roles sends no lineage.
                let lineage = if c.at < body.len() {
                    c.lineage()?
                } else {
                    Lineage::default()
                };
                ReplicationMessage::Hello {
                    group,
                    source_group_id,
                    volumes,
                    lineage,
                }
            }
            kind::PROMOTE => ReplicationMessage::Promote {
                group: c.text()?,
                lineage: c.lineage()?,
            },
            kind::PROMOTED => ReplicationMessage::Promoted {
                generation: c.u64()?,
            },
            kind::DEMOTE => ReplicationMessage::Demote {
                lineage: c.lineage()?,
                reason: c.text()?,
            },
            kind::BATCH => decode_batch(&mut c)?,
            kind::HEARTBEAT => ReplicationMessage::Heartbeat,
            kind::WELCOME => {
                let last_seq = c.u64()?;
                let (history, resync) = if c.at < body.len() {
                    let history = c.history()?;
                    let resync = match c.u8()? {
                        0 => false,
                        1 => true,
                        other => return Err(corrupt(format!("Welcome resync flag {other}"))),
                    };
                    (history, resync)
                } else {
                    (Vec::new(), false)
                };
                ReplicationMessage::Welcome {
                    last_seq,
                    history,
                    resync,
                }
            }
            kind::BATCH_ACK => ReplicationMessage::BatchAck {
                through_seq: c.u64()?,
            },
            kind::REFUSE => ReplicationMessage::Refuse { reason: c.text()? },
            kind::RESYNC_BEGIN => {
                let through_seq = c.u64()?;
                let region_bytes = c.u32()?;
                if region_bytes == 0 || region_bytes > RESYNC_REGION_BYTES_MAX {
                    return Err(corrupt(format!("resync region of {region_bytes} bytes")));
                }
                ReplicationMessage::ResyncBegin {
                    through_seq,
                    region_bytes,
                }
            }
            kind::RESYNC_SUMS => {
                let volume = c.u32()?;
                let offset = c.u64()?;
                let count = c.u32()? as usize;
                if count == 0 || count > RESYNC_SUMS_PER_MESSAGE_MAX {
                    return Err(corrupt(format!("{count} resync sums in one message")));
                }
                let mut sums = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut sum = [0u8; 32];
                    sum.copy_from_slice(c.take(32)?);
                    sums.push(sum);
                }
                ReplicationMessage::ResyncSums {
                    volume,
                    offset,
                    sums,
                }
            }
            kind::RESYNC_DATA => {
                let volume = c.u32()?;
                let offset = c.u64()?;
                let len = c.u32()?;
                if len == 0 || len > RESYNC_REGION_BYTES_MAX {
                    return Err(corrupt(format!("resync data of {len} bytes")));
                }
                let data = Bytes::copy_from_slice(c.take(len as usize)?);
                ReplicationMessage::ResyncData {
                    volume,
                    offset,
                    data,
                }
            }
            kind::RESYNC_END => ReplicationMessage::ResyncEnd {
                through_seq: c.u64()?,
            },
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

/// Checks a batch's counts before anything is allocated for it.
fn check_batch_fields(first_seq: u64, count: usize, raw_len: usize) -> Result<(), LinkError> {
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
    Ok(())
}

/// The rest of the body as the `len` bytes it stands for: raw, or decompressed (never
/// more than `len`, which the caller bounded).
fn take_stream<'a>(
    c: &mut Cursor<'a>,
    codec: u8,
    len: usize,
) -> Result<std::borrow::Cow<'a, [u8]>, LinkError> {
    let rest = c.take(c.buf.len() - c.at)?;
    match codec {
        CODEC_RAW => {
            if rest.len() != len {
                return Err(corrupt(format!(
                    "raw batch holds {} bytes, its header says {len}",
                    rest.len()
                )));
            }
            // Borrowed: a version 2 batch is rebuilt into its own buffer anyway.
            Ok(std::borrow::Cow::Borrowed(rest))
        }
        CODEC_ZSTD => {
            // The capacity bounds what a hostile frame can make us allocate.
            let plain = zstd::bulk::decompress(rest, len)
                .map_err(|e| corrupt(format!("batch does not decompress: {e}")))?;
            if plain.len() != len {
                return Err(corrupt(format!(
                    "batch decompresses to {} bytes, its header says {len}",
                    plain.len()
                )));
            }
            Ok(std::borrow::Cow::Owned(plain))
        }
        other => Err(corrupt(format!("unknown batch codec {other}"))),
    }
}

/// A record's fixed fields, checked against each other and against the batch.
struct RecordHead {
    seq: u64,
    timestamp_ns: u64,
    kind: ReplicatedKind,
    volume: u32,
    source_seq: u64,
    offset: u64,
    length: u64,
    payload_len: usize,
}

impl RecordHead {
    /// Reads record `i`'s head: its seq must be `first_seq + i`, its time not before
    /// `last_timestamp`, its kind, range and payload length must agree.
    fn read(
        r: &mut Cursor<'_>,
        first_seq: u64,
        i: usize,
        last_timestamp: &mut u64,
    ) -> Result<RecordHead, LinkError> {
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
        if timestamp_ns < *last_timestamp {
            return Err(corrupt(format!("seq {seq}: timestamp goes backwards")));
        }
        *last_timestamp = timestamp_ns;
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
        Ok(RecordHead {
            seq,
            timestamp_ns,
            kind,
            volume,
            source_seq,
            offset,
            length,
            payload_len,
        })
    }

    fn into_record(self, payload: Bytes) -> ReplicatedRecord {
        ReplicatedRecord {
            seq: self.seq,
            timestamp_ns: self.timestamp_ns,
            kind: self.kind,
            volume: self.volume,
            source_seq: self.source_seq,
            offset: self.offset,
            length: self.length,
            payload,
        }
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
    check_batch_fields(first_seq, count, raw_len)?;
    let raw = Bytes::from(take_stream(c, codec, raw_len)?.into_owned());
    let mut r = Cursor { buf: &raw, at: 0 };
    let mut records = Vec::with_capacity(count);
    let mut last_timestamp = 0;
    for i in 0..count {
        let head = RecordHead::read(&mut r, first_seq, i, &mut last_timestamp)?;
        let at = r.at;
        r.take(head.payload_len)?;
        let payload = raw.slice(at..at + head.payload_len);
        records.push(head.into_record(payload));
    }
    if r.at != raw.len() {
        return Err(corrupt("trailing bytes after a batch's records"));
    }
    Ok(ReplicationMessage::Batch { records })
}

/// Decodes a version 2 batch, rebuilding every payload from the stream and `window` (which
/// the batch's literals extend, as they did the sender's).
fn decode_batch_v2(
    c: &mut Cursor<'_>,
    window: &mut Option<BlockWindow>,
) -> Result<ReplicationMessage, LinkError> {
    let first_seq = c.u64()?;
    let count = c.u32()? as usize;
    let raw_len = c.u32()? as usize;
    let codec = c.u8()?;
    if c.take(3)? != [0, 0, 0] {
        return Err(corrupt("reserved batch bytes set"));
    }
    let stream_len = c.u32()? as usize;
    let window_blocks = c.u32()? as usize;
    let window_next = c.u64()?;
    check_batch_fields(first_seq, count, raw_len)?;
    if stream_len > BATCH_STREAM_BYTES_MAX || stream_len < count * RECORD_HEAD_LEN {
        return Err(corrupt(format!(
            "batch of {count} records claims a {stream_len}-byte stream"
        )));
    }
    if window_blocks == 0 || window_blocks > DEDUP_WINDOW_BLOCKS_MAX {
        return Err(corrupt(format!(
            "dedup window of {window_blocks} blocks (1..={DEDUP_WINDOW_BLOCKS_MAX})"
        )));
    }
    let window = window.get_or_insert_with(|| BlockWindow::new(window_blocks));
    if window.slots() != window_blocks {
        return Err(corrupt(format!(
            "dedup window of {window_blocks} blocks, earlier batches said {}",
            window.slots()
        )));
    }
    if window.next_number() != window_next {
        return Err(corrupt(format!(
            "batch at seq {first_seq} follows dedup block {window_next}, this end is at block {}",
            window.next_number()
        )));
    }
    let stream = take_stream(c, codec, stream_len)?;
    let mut r = Cursor {
        buf: &stream,
        at: 0,
    };
    // raw_len was bounded above, so this allocation is too.
    let payload_total = raw_len - count * RECORD_HEAD_LEN;
    let mut payloads: Vec<u8> = Vec::with_capacity(payload_total);
    let mut heads = Vec::with_capacity(count);
    let mut last_timestamp = 0;
    for i in 0..count {
        let head = RecordHead::read(&mut r, first_seq, i, &mut last_timestamp)?;
        let start = payloads.len();
        if head.payload_len > payload_total - start {
            return Err(corrupt(format!(
                "seq {}: payloads exceed the batch's {raw_len} raw bytes",
                head.seq
            )));
        }
        if head.kind == ReplicatedKind::Write {
            rebuild_write(&mut r, &head, window, &mut payloads)?;
        } else {
            payloads.extend_from_slice(r.take(head.payload_len)?);
        }
        heads.push((head, start));
    }
    if r.at != stream.len() {
        return Err(corrupt("trailing bytes after a batch's records"));
    }
    if payloads.len() != payload_total {
        return Err(corrupt(format!(
            "batch records hold {} payload bytes, its header says {payload_total}",
            payloads.len()
        )));
    }
    let payloads = Bytes::from(payloads);
    let records = heads
        .into_iter()
        .map(|(head, start)| {
            let end = start + head.payload_len;
            head.into_record(payloads.slice(start..end))
        })
        .collect();
    Ok(ReplicationMessage::Batch { records })
}

/// Appends a write's payload to `out` from its stream form: unaligned head bytes, one tag
/// per whole aligned block (literal, zero or reference), unaligned tail bytes.
fn rebuild_write(
    r: &mut Cursor<'_>,
    head: &RecordHead,
    window: &mut BlockWindow,
    out: &mut Vec<u8>,
) -> Result<(), LinkError> {
    let head_len = unaligned_head_len(head.offset, head.payload_len);
    out.extend_from_slice(r.take(head_len)?);
    let mut left = head.payload_len - head_len;
    while left >= DEDUP_BLOCK_BYTES {
        match r.u8()? {
            BLOCK_LITERAL => {
                let block = r.take(DEDUP_BLOCK_BYTES)?;
                window.insert(block);
                out.extend_from_slice(block);
            }
            BLOCK_ZERO => out.resize(out.len() + DEDUP_BLOCK_BYTES, 0),
            BLOCK_REFERENCE => {
                let number = r.u64()?;
                let block = window.get(number).ok_or_else(|| {
                    corrupt(format!(
                        "seq {}: reference to dedup block {number}, the window holds {}..{}",
                        head.seq,
                        window.next_number().saturating_sub(window.slots() as u64),
                        window.next_number()
                    ))
                })?;
                out.extend_from_slice(block);
            }
            other => {
                return Err(corrupt(format!(
                    "seq {}: unknown dedup block tag {other}",
                    head.seq
                )))
            }
        }
        left -= DEDUP_BLOCK_BYTES;
    }
    out.extend_from_slice(r.take(left)?);
    Ok(())
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
    fn history(&mut self) -> Result<Vec<WireGeneration>, LinkError> {
        let count = self.u16()? as usize;
        if count > LINEAGE_GENERATIONS_MAX {
            return Err(corrupt(format!("a history of {count} generations")));
        }
        let mut history: Vec<WireGeneration> = Vec::with_capacity(count);
        for _ in 0..count {
            let generation = self.u64()?;
            let first_seq = self.u64()?;
            let site = self.text()?;
            if let Some(prev) = history.last() {
                if generation <= prev.generation || first_seq < prev.first_seq {
                    return Err(corrupt(format!(
                        "generation {generation} from seq {first_seq} does not follow generation {} from seq {}",
                        prev.generation, prev.first_seq
                    )));
                }
            }
            history.push(WireGeneration {
                generation,
                first_seq,
                site,
            });
        }
        Ok(history)
    }
    fn lineage(&mut self) -> Result<Lineage, LinkError> {
        Ok(Lineage {
            history: self.history()?,
            last_seq: self.u64()?,
        })
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

/// Header plus body. Panics only on a caller's broken invariant (an over-long body).
fn frame(version: u16, kind: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() <= body_max(version));
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(&encode_header(version, kind, body));
    bytes.extend_from_slice(body);
    bytes
}

fn body_max(version: u16) -> usize {
    if version == VERSION_DEDUP {
        REPLICATION_FRAME_BODY_MAX_V2
    } else {
        REPLICATION_FRAME_BODY_MAX
    }
}

/// The replication link's frames: the split link's header codec with its own magic.
const FRAMES: FrameSpec = FrameSpec {
    name: "replication frame",
    magic: MAGIC,
    versions: &[VERSION, VERSION_DEDUP],
    body_max,
};

fn encode_header(version: u16, kind: u8, body: &[u8]) -> [u8; HEADER_LEN] {
    frame::encode_header_with(&FRAMES, version, kind, &[body])
}

/// Reads one whole, CRC-checked message. A clean end of stream before a header is `Closed`.
/// A deduplicated (version 2) batch is refused: it needs a `BatchDecoder`.
pub fn read_message(r: &mut impl Read) -> Result<ReplicationMessage, LinkError> {
    read_frame(r, None)
}

/// The receiving end of one connection: reads messages, rebuilding deduplicated batches
/// against the window this connection built so far.
#[derive(Default)]
pub struct BatchDecoder {
    window: Option<BlockWindow>,
}

impl BatchDecoder {
    pub fn new() -> BatchDecoder {
        BatchDecoder::default()
    }

    /// As `read_message`, accepting version 2 batches. After an error the decoder's window
    /// may be out of step with the sender's: end the connection.
    pub fn read_message(&mut self, r: &mut impl Read) -> Result<ReplicationMessage, LinkError> {
        read_frame(r, Some(&mut self.window))
    }

    /// Decodes a frame body whose header and CRC were already checked.
    pub fn decode(
        &mut self,
        version: u16,
        kind: u8,
        body: &[u8],
    ) -> Result<ReplicationMessage, LinkError> {
        decode_frame(version, kind, body, Some(&mut self.window))
    }
}

fn read_frame(
    r: &mut impl Read,
    window: Option<&mut Option<BlockWindow>>,
) -> Result<ReplicationMessage, LinkError> {
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
    let h = frame::decode_header_with(&FRAMES, &header)?;
    // Bounded by decode_header_with.
    let mut body = vec![0u8; h.body_len as usize];
    r.read_exact(&mut body)?;
    frame::verify_crc_with(&FRAMES, &header, &h, &body)?;
    decode_frame(h.version, h.kind, &body, window)
}

fn decode_frame(
    version: u16,
    kind: u8,
    body: &[u8],
    window: Option<&mut Option<BlockWindow>>,
) -> Result<ReplicationMessage, LinkError> {
    if version != VERSION_DEDUP || kind != kind::BATCH {
        return ReplicationMessage::decode(kind, body);
    }
    let Some(window) = window else {
        return Err(LinkError::Protocol(
            "a deduplicated batch where none is expected".into(),
        ));
    };
    let mut c = Cursor { buf: body, at: 0 };
    let message = decode_batch_v2(&mut c, window)?;
    if c.at != body.len() {
        return Err(corrupt("trailing bytes after a batch"));
    }
    Ok(message)
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

    /// Goal: sharing `frame.rs`'s header codec left the wire unchanged. Method: a whole
    /// Heartbeat frame, CRC included, as literal bytes, read back through `read_message`;
    /// the same bytes with the split link's magic are refused.
    #[test]
    fn golden_header_through_the_shared_codec() {
        let heartbeat = ReplicationMessage::Heartbeat.encode(BatchCodec::Raw).bytes;
        assert_eq!(
            heartbeat,
            [b'C', b'D', b'P', b'R', 1, 0, 3, 0, 0, 0, 0, 0, 138, 84, 55, 245]
        );
        assert!(matches!(
            read_message(&mut &heartbeat[..]),
            Ok(ReplicationMessage::Heartbeat)
        ));
        let mut split = heartbeat.clone();
        split[3] = b'L';
        assert!(matches!(
            read_message(&mut &split[..]),
            Err(LinkError::Corrupt(_))
        ));
        let mut v3 = heartbeat;
        v3[4] = 3;
        assert!(matches!(
            read_message(&mut &v3[..]),
            Err(LinkError::Version {
                theirs: 3,
                ours: VERSION_DEDUP
            })
        ));
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
            lineage: Lineage::default(),
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
            &[0, 0],
            &0u64.to_le_bytes(),
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
                lineage: Lineage {
                    history: vec![
                        WireGeneration {
                            generation: 1,
                            first_seq: 1,
                            site: "a".into(),
                        },
                        WireGeneration {
                            generation: 2,
                            first_seq: 77,
                            site: "b".into(),
                        },
                    ],
                    last_seq: 90,
                },
            },
            ReplicationMessage::Promote {
                group: "default".into(),
                lineage: Lineage {
                    history: vec![WireGeneration {
                        generation: 3,
                        first_seq: 91,
                        site: "b".into(),
                    }],
                    last_seq: 90,
                },
            },
            ReplicationMessage::Promoted { generation: 3 },
            ReplicationMessage::Demote {
                lineage: Lineage::default(),
                reason: "newer".into(),
            },
            ReplicationMessage::Welcome {
                last_seq: 42,
                history: vec![WireGeneration {
                    generation: 1,
                    first_seq: 1,
                    site: "a".into(),
                }],
                resync: true,
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
            ReplicationMessage::Welcome {
                last_seq: 42,
                history: Vec::new(),
                resync: false,
            },
            ReplicationMessage::BatchAck { through_seq: 43 },
            ReplicationMessage::Refuse {
                reason: "no such group".into(),
            },
            ReplicationMessage::ResyncBegin {
                through_seq: 99,
                region_bytes: 1 << 20,
            },
            ReplicationMessage::ResyncSums {
                volume: 2,
                offset: 3 << 20,
                sums: vec![[7u8; 32], [9u8; 32]],
            },
            ReplicationMessage::ResyncData {
                volume: 2,
                offset: 4096,
                data: Bytes::from_static(b"region bytes"),
            },
            ReplicationMessage::ResyncEnd { through_seq: 99 },
        ];
        for m in &messages {
            assert_eq!(&roundtrip(m, BatchCodec::Raw), m);
            assert_eq!(&roundtrip(m, BatchCodec::Zstd(3)), m);
        }
        // Compressible batches shrink on the wire.
        let batch = messages
            .iter()
            .find(|m| matches!(m, ReplicationMessage::Batch { .. }))
            .expect("a batch among the messages");
        let encoded = batch.encode(BatchCodec::Zstd(3));
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

    // --- version 2: deduplicated batches ---

    fn write_at(seq: u64, offset: u64, payload: Vec<u8>) -> ReplicatedRecord {
        ReplicatedRecord {
            seq,
            timestamp_ns: 1000 + seq,
            kind: ReplicatedKind::Write,
            volume: 1,
            source_seq: seq,
            offset,
            length: payload.len() as u64,
            payload: Bytes::from(payload),
        }
    }

    fn dedup_frame(
        records: &[ReplicatedRecord],
        index: &mut DedupIndex,
        codec: BatchCodec,
    ) -> Vec<u8> {
        BatchStream::deduplicated(records, index)
            .encode(codec)
            .bytes
    }

    /// Goal: version 2 batches never change. Method: a write 2 bytes before a 4 KiB boundary
    /// spanning a literal, a zero block, a reference and a 3-byte tail; compare every byte.
    #[test]
    fn golden_bytes_v2() {
        let block_a = vec![0xaa; DEDUP_BLOCK_BYTES];
        let payload = [
            &b"hd"[..],
            &block_a,
            &[0u8; DEDUP_BLOCK_BYTES],
            &block_a,
            b"tl!",
        ]
        .concat();
        let record = write_at(7, 4094, payload.clone());
        let mut index = DedupIndex::new(8 * DEDUP_BLOCK_BYTES);
        let stream = BatchStream::deduplicated(std::slice::from_ref(&record), &mut index);
        assert_eq!(
            stream.counts,
            DedupCounts {
                literal_blocks: 1,
                zero_blocks: 1,
                reference_blocks: 1
            }
        );
        let bytes = stream.encode(BatchCodec::Raw).bytes;
        assert_eq!(&bytes[..8], &[b'C', b'D', b'P', b'R', 2, 0, 2, 0]);
        let raw_len = RECORD_HEAD_LEN + payload.len();
        let records: Vec<u8> = [
            &7u64.to_le_bytes()[..],
            &1007u64.to_le_bytes(),
            &[1, 0, 0, 0],
            &1u32.to_le_bytes(),
            &7u64.to_le_bytes(),
            &4094u64.to_le_bytes(),
            &(payload.len() as u64).to_le_bytes(),
            &(payload.len() as u32).to_le_bytes(),
            b"hd",
            &[BLOCK_LITERAL],
            &block_a,
            &[BLOCK_ZERO],
            &[BLOCK_REFERENCE],
            &0u64.to_le_bytes(),
            b"tl!",
        ]
        .concat();
        let body: Vec<u8> = [
            &7u64.to_le_bytes()[..],
            &1u32.to_le_bytes(),
            &(raw_len as u32).to_le_bytes(),
            &[0, 0, 0, 0],
            &(records.len() as u32).to_le_bytes(),
            &8u32.to_le_bytes(),
            &0u64.to_le_bytes(),
            &records,
        ]
        .concat();
        assert_eq!(&bytes[16..], &body[..]);
        let mut decoder = BatchDecoder::new();
        assert_eq!(
            decoder.read_message(&mut &bytes[..]).unwrap(),
            ReplicationMessage::Batch {
                records: vec![record]
            }
        );
    }

    /// A hand-made version 2 batch body of one write at offset 0 whose stream is `payload_stream`.
    fn v2_body(
        window_blocks: u32,
        window_next: u64,
        payload_len: usize,
        payload_stream: &[u8],
    ) -> Vec<u8> {
        let mut stream = Vec::new();
        put_record_head(
            &mut stream,
            &ReplicatedRecord {
                payload: Bytes::from(vec![0; payload_len]),
                ..write_at(1, 0, vec![0; payload_len])
            },
        );
        stream.extend_from_slice(payload_stream);
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&((RECORD_HEAD_LEN + payload_len) as u32).to_le_bytes());
        body.extend_from_slice(&[0, 0, 0, 0]);
        body.extend_from_slice(&(stream.len() as u32).to_le_bytes());
        body.extend_from_slice(&window_blocks.to_le_bytes());
        body.extend_from_slice(&window_next.to_le_bytes());
        body.extend_from_slice(&stream);
        body
    }

    fn decode_v2(decoder: &mut BatchDecoder, body: &[u8]) -> Result<ReplicationMessage, String> {
        decoder
            .decode(VERSION_DEDUP, kind::BATCH, body)
            .map_err(|e| e.to_string())
    }

    /// Goal: a peer's malformed version 2 batch is a precise error, never a panic or a wrong
    /// block. Method: hand-made bodies with each kind of damage.
    #[test]
    fn v2_malformed_batches_are_precise_errors() {
        let literal = [&[BLOCK_LITERAL][..], &[5u8; DEDUP_BLOCK_BYTES]].concat();
        // Sanity: a literal decodes.
        let mut d = BatchDecoder::new();
        assert!(decode_v2(&mut d, &v2_body(4, 0, DEDUP_BLOCK_BYTES, &literal)).is_ok());
        // A reference past the window's end (block 1 was never sent).
        let reference = |n: u64| [&[BLOCK_REFERENCE][..], &n.to_le_bytes()].concat();
        let mut d = BatchDecoder::new();
        let e = decode_v2(&mut d, &v2_body(4, 0, DEDUP_BLOCK_BYTES, &reference(0))).unwrap_err();
        assert!(
            e.contains("reference to dedup block 0, the window holds 0..0"),
            "{e}"
        );
        // A reference to an evicted block: window of 1 block, two literals, then block 0.
        let mut d = BatchDecoder::new();
        let two = [&literal[..], &literal].concat();
        let mut body = v2_body(1, 0, 2 * DEDUP_BLOCK_BYTES, &two);
        assert!(decode_v2(&mut d, &body).is_ok());
        body = v2_body(1, 2, DEDUP_BLOCK_BYTES, &reference(0));
        let e = decode_v2(&mut d, &body).unwrap_err();
        assert!(
            e.contains("reference to dedup block 0, the window holds 1..2"),
            "{e}"
        );
        // The window out of step, or resized, within a connection.
        let mut d = BatchDecoder::new();
        assert!(decode_v2(&mut d, &v2_body(4, 0, DEDUP_BLOCK_BYTES, &literal)).is_ok());
        let e = decode_v2(&mut d, &v2_body(4, 0, DEDUP_BLOCK_BYTES, &literal)).unwrap_err();
        assert!(
            e.contains("follows dedup block 0, this end is at block 1"),
            "{e}"
        );
        let e = decode_v2(&mut d, &v2_body(8, 1, DEDUP_BLOCK_BYTES, &literal)).unwrap_err();
        assert!(e.contains("earlier batches said 4"), "{e}");
        // A window past the limit, an unknown tag, a truncated literal, a short payload.
        let e = decode_v2(
            &mut BatchDecoder::new(),
            &v2_body(
                DEDUP_WINDOW_BLOCKS_MAX as u32 + 1,
                0,
                DEDUP_BLOCK_BYTES,
                &literal,
            ),
        )
        .unwrap_err();
        assert!(e.contains("dedup window of"), "{e}");
        let e = decode_v2(
            &mut BatchDecoder::new(),
            &v2_body(4, 0, DEDUP_BLOCK_BYTES, &[7]),
        )
        .unwrap_err();
        assert!(e.contains("unknown dedup block tag 7"), "{e}");
        let e = decode_v2(
            &mut BatchDecoder::new(),
            &v2_body(4, 0, DEDUP_BLOCK_BYTES, &literal[..100]),
        )
        .unwrap_err();
        assert!(e.contains("too short"), "{e}");
        // raw_len that disagrees with the rebuilt records.
        let mut body = v2_body(4, 0, DEDUP_BLOCK_BYTES, &literal);
        body[12..16]
            .copy_from_slice(&((RECORD_HEAD_LEN + 2 * DEDUP_BLOCK_BYTES) as u32).to_le_bytes());
        let e = decode_v2(&mut BatchDecoder::new(), &body).unwrap_err();
        assert!(e.contains("payload bytes, its header says"), "{e}");
        // A stream claiming more than the limit is refused before decompressing.
        let mut body = v2_body(4, 0, DEDUP_BLOCK_BYTES, &literal);
        body[16] = CODEC_ZSTD;
        body[20..24].copy_from_slice(&(BATCH_STREAM_BYTES_MAX as u32 + 1).to_le_bytes());
        let e = decode_v2(&mut BatchDecoder::new(), &body).unwrap_err();
        assert!(e.contains("-byte stream"), "{e}");
        // A deduplicated batch read without a decoder (by a shipper) is a protocol error.
        let mut index = DedupIndex::new(1 << 20);
        let frame = dedup_frame(
            &[write_at(1, 0, vec![1; 8192])],
            &mut index,
            BatchCodec::Raw,
        );
        assert!(matches!(
            read_message(&mut &frame[..]),
            Err(LinkError::Protocol(_))
        ));
        // An unknown version is a version error.
        let mut bad = frame.clone();
        bad[4] = 3;
        assert!(matches!(
            BatchDecoder::new().read_message(&mut &bad[..]),
            Err(LinkError::Version { theirs: 3, .. })
        ));
        // Every flipped bit and every truncation is caught.
        for i in 0..frame.len().min(200) {
            let mut bad = frame.clone();
            bad[i] ^= 0x08;
            assert!(
                BatchDecoder::new().read_message(&mut &bad[..]).is_err(),
                "flip at {i}"
            );
        }
        for len in 0..frame.len() {
            assert!(BatchDecoder::new()
                .read_message(&mut &frame[..len])
                .is_err());
        }
    }

    /// Goal: plain (version 1) batches may come between deduplicated ones (the shipper
    /// pauses dedup) without moving either window. Method: v2, v1, v2 through one decoder,
    /// the last referring to a block of the first.
    #[test]
    fn version_1_batches_between_version_2_ones_leave_the_window() {
        let block = vec![9u8; DEDUP_BLOCK_BYTES];
        let mut index = DedupIndex::new(16 * DEDUP_BLOCK_BYTES);
        let mut decoder = BatchDecoder::new();
        let first = [write_at(1, 0, block.clone())];
        let plain = [write_at(2, 8192, [block.clone(), vec![3; 100]].concat())];
        let last = [write_at(3, 4096, block.clone())];
        let frames = [
            dedup_frame(&first, &mut index, BatchCodec::Raw),
            ReplicationMessage::Batch {
                records: plain.to_vec(),
            }
            .encode(BatchCodec::Zstd(3))
            .bytes,
            dedup_frame(&last, &mut index, BatchCodec::Zstd(3)),
        ];
        assert_eq!(index.window().next_number(), 1);
        for (frame, records) in frames.iter().zip([&first[..], &plain, &last]) {
            assert_eq!(
                decoder.read_message(&mut &frame[..]).unwrap(),
                ReplicationMessage::Batch {
                    records: records.to_vec()
                }
            );
        }
    }

    mod v2_properties {
        use super::*;
        use proptest::prelude::*;

        /// A batch drawn from a small pool of blocks (so repeats are common), with zero
        /// blocks, unaligned offsets and lengths, and other record kinds between writes.
        /// (record kind selector, offset, payload) per record, per batch.
        type Batches = Vec<Vec<(u8, u64, Vec<u8>)>>;

        fn batches() -> impl Strategy<Value = (Batches, usize, i32)> {
            let piece = (0u8..6, 0u64..3, 1usize..4);
            let record = (
                0u8..8,
                0u64..64,
                0u64..4096,
                prop::collection::vec(piece, 1..5),
                0usize..4096,
            )
                .prop_map(|(kind, block, shift, pieces, tail)| {
                    // Pool block p: all zero for p == 0, else a pattern of p.
                    let mut payload = Vec::new();
                    for (p, salt, n) in pieces {
                        for _ in 0..n {
                            let mut b = vec![0u8; DEDUP_BLOCK_BYTES];
                            if p != 0 {
                                for (i, x) in b.iter_mut().enumerate() {
                                    *x = (i as u8) ^ p ^ (salt as u8).wrapping_mul(31);
                                }
                            }
                            payload.extend_from_slice(&b);
                        }
                    }
                    payload.truncate(payload.len() - tail.min(payload.len() - 1));
                    // Mostly aligned writes, some shifted by a few bytes.
                    let offset = block * 4096 + if shift < 3000 { 0 } else { shift };
                    (kind, offset, payload)
                });
            (
                prop::collection::vec(prop::collection::vec(record, 1..12), 1..6),
                1usize..24,
                0i32..4,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Goal: whatever the repeats, window size and codec, the receiver rebuilds
            /// exactly the records sent. Method: several batches through one sender index and
            /// one receiver decoder (a small window, so blocks are evicted), compared with the
            /// input; the block counts add up to the whole blocks sent.
            #[test]
            fn deduplicated_batches_round_trip(
                (batches, window_blocks, level) in batches()
            ) {
                let mut index = DedupIndex::new(window_blocks * DEDUP_BLOCK_BYTES);
                let mut decoder = BatchDecoder::new();
                let mut seq = 1;
                for batch in batches {
                    let mut records = Vec::new();
                    for (kind, offset, payload) in batch {
                        let r = if kind == 7 {
                            ReplicatedRecord { offset: 0, length: 0, ..record(seq, ReplicatedKind::Bookmark, b"CDPBmark") }
                        } else if kind == 6 {
                            ReplicatedRecord { offset, length: 4096, ..record(seq, ReplicatedKind::Trim, b"") }
                        } else {
                            write_at(seq, offset, payload)
                        };
                        records.push(r);
                        seq += 1;
                    }
                    let codec = if level == 0 { BatchCodec::Raw } else { BatchCodec::Zstd(level) };
                    let stream = BatchStream::deduplicated(&records, &mut index);
                    let whole_blocks: u64 = records
                        .iter()
                        .filter(|r| r.kind == ReplicatedKind::Write)
                        .map(|r| ((r.payload.len() - unaligned_head_len(r.offset, r.payload.len())) / DEDUP_BLOCK_BYTES) as u64)
                        .sum();
                    let c = stream.counts;
                    prop_assert_eq!(c.literal_blocks + c.zero_blocks + c.reference_blocks, whole_blocks);
                    let encoded = stream.encode(codec);
                    prop_assert_eq!(encoded.raw_len, encode_records(&records).len());
                    let decoded = decoder.read_message(&mut &encoded.bytes[..]).unwrap();
                    prop_assert_eq!(decoded, ReplicationMessage::Batch { records });
                }
            }

            /// Goal: no body a peer sends can panic the version 2 decoder. Method: random
            /// bytes after a plausible header.
            #[test]
            fn random_v2_bodies_never_panic(tail in prop::collection::vec(any::<u8>(), 0..300), blocks in 0u32..5, next in 0u64..3) {
                let mut body = Vec::new();
                body.extend_from_slice(&1u64.to_le_bytes());
                body.extend_from_slice(&1u32.to_le_bytes());
                body.extend_from_slice(&(tail.len() as u32).to_le_bytes());
                body.extend_from_slice(&[0, 0, 0, 0]);
                body.extend_from_slice(&(tail.len() as u32).to_le_bytes());
                body.extend_from_slice(&blocks.to_le_bytes());
                body.extend_from_slice(&next.to_le_bytes());
                body.extend_from_slice(&tail);
                let _ = BatchDecoder::new().decode(VERSION_DEDUP, kind::BATCH, &body);
            }
        }
    }
}
