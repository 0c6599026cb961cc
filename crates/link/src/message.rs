//! Typed link messages and their frame bodies (fixed-width little-endian fields).
//!
//! Splitter to appliance: `Hello` once, then `Write`/`Trim`/`Zero` each with the splitter's
//! per-volume `source_seq` (contiguous, increasing), and `Flush` asking for durability of every
//! change up to a `source_seq`. Appliance to splitter: `Welcome` answers `Hello` with the highest
//! `source_seq` already journaled (so a reconnecting splitter resends only what is missing),
//! `Ack` says changes up to a `source_seq` are in the journal, `Durable` says they are synced,
//! and `Refuse` explains why the appliance will not take this volume.
//!
//! Verified seeding adds one exchange: `ChecksumRequest` asks for the checksums of the
//! replica's regions in a range, as the replica stands once every change journaled before the
//! request has been distributed; `Checksums` answers, in request order. Neither carries a
//! `source_seq` (they change nothing) nor a volume (a connection serves one volume). `Welcome`'s flags say whether the replica holds data.
//!
//! Liveness: each end sends `Heartbeat` at least every `link_deadline_ms / 4` (the
//! splitter's heartbeats carry nothing back; the appliance sends its own), so a peer that
//! receives nothing at all for the deadline knows the link or the peer is gone, even when no
//! change is in flight (see `codec.rs`, `FrameReader::set_idle_timeout`).
//!
//! Bodies added since the first release (integers little-endian):
//! ```text
//! Hello            size u64, splitter_id u64, name (u16 length + bytes), session u64. The
//!                  session counts this splitter process's connections for the volume, so
//!                  the appliance can tell a reconnect of the same splitter (replace the old,
//!                  half-open connection) from a second splitter (refuse). A Hello without it
//!                  decodes with session 0 (never replaces). Then flags u32 (bit 0: a resync
//!                  follows, because this splitter acknowledged host writes the journal may
//!                  lack; other bits must be 0) and marking_since_ns u64 (when it began
//!                  marking; 0: it cannot say). A Hello without them: no resync announced.
//! ResyncStart      source_seq u64, marking_since_ns u64: when this splitter began marking
//!                  the regions this resync copies (ns since the Unix epoch; 0: not after
//!                  marking, e.g. an initial copy). An 8-byte body decodes with 0.
//! Heartbeat        empty (kind 9, either direction)
//! Welcome          volume_id u32, last_source_seq u64, flags u32 (bit 0: replica holds data;
//!                  other bits must be 0). A 12-byte body (no flags) still decodes, flags 0.
//! ChecksumRequest  offset u64, length u64, region_bytes u32
//!                  region_bytes a power of two in CHECKSUM_REGION_BYTES_MIN..=MAX, offset a
//!                  multiple of it, 1..=CHECKSUMS_PER_REQUEST_MAX regions in length
//! Checksums        offset u64, region_bytes u32, count u32, count x 32-byte checksums
//! ```

use bytes::{Bytes, BytesMut};

use crate::checksum::RegionChecksum;
use crate::error::LinkError;
use crate::frame::{encode_header, HEADER_LEN};
use crate::limits::{
    CHECKSUMS_PER_REQUEST_MAX, CHECKSUM_BYTES, CHECKSUM_REGION_BYTES_MAX,
    CHECKSUM_REGION_BYTES_MIN, TEXT_LEN_MAX, WRITE_PAYLOAD_MAX,
};

/// `Welcome` flag: the replica has at least one data extent (or the journal already holds
/// changes of the volume), so a first initialization verifies instead of copying everything.
const WELCOME_FLAG_REPLICA_HOLDS_DATA: u32 = 1;

/// In a `Refuse`: the volume is held by another connection, of another splitter process.
/// A splitter restarted at once after a crash can meet its own old connection still open at
/// the appliance (its last changes still draining, or its close not yet seen); the appliance
/// drops that within its link deadline, so a starting splitter asks again until then.
pub const REFUSED_VOLUME_ALREADY_SPLIT: &str = "already has a connected splitter";

/// One message on the split link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        volume: String,
        size: u64,
        /// Random per splitter process; lets the appliance log restarts.
        splitter_id: u64,
        /// This connection's number among the splitter process's connections for the volume
        /// (1, 2, ...): a higher session of the same `splitter_id` replaces a stale one.
        session: u64,
        /// The splitter acknowledged host writes the journal may lack (it was marking, or
        /// restarted with dirty regions): its `ResyncStart` follows, and until the journal
        /// has it no point is recoverable. Some(when marking began, 0 if unknown).
        resync_follows: Option<u64>,
    },
    Write {
        source_seq: u64,
        offset: u64,
        data: Bytes,
    },
    Trim {
        source_seq: u64,
        offset: u64,
        length: u64,
    },
    Zero {
        source_seq: u64,
        offset: u64,
        length: u64,
    },
    Flush {
        source_seq: u64,
    },
    /// A resync of this volume begins; changes until `ResyncEnd` bring regions the journal
    /// lacks, so the journal is not consistent with production in between.
    ResyncStart {
        source_seq: u64,
        /// When the splitter began marking what this resync copies (ns since the Unix
        /// epoch), or 0: points from then on lack acknowledged host writes.
        marking_since_ns: u64,
    },
    ResyncEnd {
        source_seq: u64,
    },
    /// Asks for the checksums of the replica's `region_bytes` regions in
    /// `offset..offset + length` (the last one may be cut short by the volume's end).
    ChecksumRequest {
        offset: u64,
        length: u64,
        region_bytes: u32,
    },
    Welcome {
        volume_id: u32,
        last_source_seq: u64,
        /// The replica already holds data: a first initialization verifies it.
        replica_holds_data: bool,
    },
    /// Answers one `ChecksumRequest`: one checksum per region from `offset` on.
    Checksums {
        offset: u64,
        region_bytes: u32,
        sums: Vec<RegionChecksum>,
    },
    Ack {
        source_seq: u64,
    },
    Durable {
        source_seq: u64,
    },
    Refuse {
        reason: String,
    },
    /// Nothing else to send: proves the sender and the path alive (either direction).
    Heartbeat,
}

impl Message {
    /// The message's name for logs and errors (a `Write`'s Debug form would dump its payload).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Write { .. } => "Write",
            Message::Trim { .. } => "Trim",
            Message::Zero { .. } => "Zero",
            Message::Flush { .. } => "Flush",
            Message::ResyncStart { .. } => "ResyncStart",
            Message::ResyncEnd { .. } => "ResyncEnd",
            Message::ChecksumRequest { .. } => "ChecksumRequest",
            Message::Welcome { .. } => "Welcome",
            Message::Checksums { .. } => "Checksums",
            Message::Ack { .. } => "Ack",
            Message::Durable { .. } => "Durable",
            Message::Refuse { .. } => "Refuse",
            Message::Heartbeat => "Heartbeat",
        }
    }
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const TRIM: u8 = 3;
    pub const ZERO: u8 = 4;
    pub const FLUSH: u8 = 5;
    pub const RESYNC_START: u8 = 6;
    pub const RESYNC_END: u8 = 7;
    pub const CHECKSUM_REQUEST: u8 = 8;
    pub const HEARTBEAT: u8 = 9;
    pub const WELCOME: u8 = 16;
    pub const ACK: u8 = 17;
    pub const DURABLE: u8 = 18;
    pub const REFUSE: u8 = 19;
    pub const CHECKSUMS: u8 = 20;
}

/// A message ready for the socket: header, fixed fields, and the write payload kept zero-copy.
pub struct EncodedFrame {
    pub header: [u8; HEADER_LEN],
    pub fixed: Vec<u8>,
    pub data: Option<Bytes>,
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        HEADER_LEN + self.fixed.len() + self.data.as_ref().map_or(0, |d| d.len())
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

fn put_u64s(values: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 8);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn put_text(prefix: &[u8], text: &str) -> Vec<u8> {
    let text = &text.as_bytes()[..text.len().min(TEXT_LEN_MAX)];
    let mut out = Vec::with_capacity(prefix.len() + 2 + text.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text);
    out
}

impl Message {
    pub fn encode(&self) -> EncodedFrame {
        let (kind, fixed, data) = match self {
            Message::Hello {
                volume,
                size,
                splitter_id,
                session,
                resync_follows,
            } => {
                let mut fixed = put_text(&put_u64s(&[*size, *splitter_id]), volume);
                fixed.extend_from_slice(&session.to_le_bytes());
                let flags: u32 = u32::from(resync_follows.is_some());
                fixed.extend_from_slice(&flags.to_le_bytes());
                fixed.extend_from_slice(&resync_follows.unwrap_or(0).to_le_bytes());
                (kind::HELLO, fixed, None)
            }
            Message::Write {
                source_seq,
                offset,
                data,
            } => (
                kind::WRITE,
                put_u64s(&[*source_seq, *offset]),
                Some(data.clone()),
            ),
            Message::Trim {
                source_seq,
                offset,
                length,
            } => (kind::TRIM, put_u64s(&[*source_seq, *offset, *length]), None),
            Message::Zero {
                source_seq,
                offset,
                length,
            } => (kind::ZERO, put_u64s(&[*source_seq, *offset, *length]), None),
            Message::Flush { source_seq } => (kind::FLUSH, put_u64s(&[*source_seq]), None),
            Message::ResyncStart {
                source_seq,
                marking_since_ns,
            } => (
                kind::RESYNC_START,
                put_u64s(&[*source_seq, *marking_since_ns]),
                None,
            ),
            Message::Heartbeat => (kind::HEARTBEAT, Vec::new(), None),
            Message::ResyncEnd { source_seq } => (kind::RESYNC_END, put_u64s(&[*source_seq]), None),
            Message::ChecksumRequest {
                offset,
                length,
                region_bytes,
            } => {
                let mut fixed = put_u64s(&[*offset, *length]);
                fixed.extend_from_slice(&region_bytes.to_le_bytes());
                (kind::CHECKSUM_REQUEST, fixed, None)
            }
            Message::Welcome {
                volume_id,
                last_source_seq,
                replica_holds_data,
            } => {
                let mut fixed = volume_id.to_le_bytes().to_vec();
                fixed.extend_from_slice(&last_source_seq.to_le_bytes());
                let flags = if *replica_holds_data {
                    WELCOME_FLAG_REPLICA_HOLDS_DATA
                } else {
                    0
                };
                fixed.extend_from_slice(&flags.to_le_bytes());
                (kind::WELCOME, fixed, None)
            }
            Message::Checksums {
                offset,
                region_bytes,
                sums,
            } => {
                debug_assert!(sums.len() <= CHECKSUMS_PER_REQUEST_MAX);
                let mut fixed = Vec::with_capacity(16 + sums.len() * CHECKSUM_BYTES);
                fixed.extend_from_slice(&offset.to_le_bytes());
                fixed.extend_from_slice(&region_bytes.to_le_bytes());
                fixed.extend_from_slice(&(sums.len() as u32).to_le_bytes());
                for sum in sums {
                    fixed.extend_from_slice(sum);
                }
                (kind::CHECKSUMS, fixed, None)
            }
            Message::Ack { source_seq } => (kind::ACK, put_u64s(&[*source_seq]), None),
            Message::Durable { source_seq } => (kind::DURABLE, put_u64s(&[*source_seq]), None),
            Message::Refuse { reason } => (kind::REFUSE, put_text(&[], reason), None),
        };
        let header = match &data {
            Some(d) => encode_header(kind, &[&fixed, d]),
            None => encode_header(kind, &[&fixed]),
        };
        EncodedFrame {
            header,
            fixed,
            data,
        }
    }

    /// Parses a CRC-checked body. Every length is checked against the body before use.
    pub fn decode(kind: u8, body: BytesMut) -> Result<Message, LinkError> {
        let mut r = BodyReader {
            body: body.freeze(),
            at: 0,
            kind,
        };
        let message = match kind {
            kind::HELLO => {
                let size = r.u64()?;
                let splitter_id = r.u64()?;
                let volume = r.text()?;
                let session = if r.remaining() == 0 { 0 } else { r.u64()? };
                let resync_follows = if r.remaining() == 0 {
                    None
                } else {
                    let flags = r.u32()?;
                    let since = r.u64()?;
                    if flags & !1 != 0 {
                        return Err(LinkError::Protocol(format!(
                            "Hello with unknown flags {flags:#x}"
                        )));
                    }
                    (flags & 1 != 0).then_some(since)
                };
                Message::Hello {
                    volume,
                    size,
                    splitter_id,
                    session,
                    resync_follows,
                }
            }
            kind::WRITE => {
                let source_seq = r.u64()?;
                let offset = r.u64()?;
                let data = r.rest();
                if data.len() > WRITE_PAYLOAD_MAX {
                    return Err(LinkError::Protocol(format!(
                        "write payload of {} bytes exceeds {WRITE_PAYLOAD_MAX}",
                        data.len()
                    )));
                }
                return Ok(Message::Write {
                    source_seq,
                    offset,
                    data,
                });
            }
            kind::TRIM | kind::ZERO => {
                let source_seq = r.u64()?;
                let offset = r.u64()?;
                let length = r.u64()?;
                if kind == kind::TRIM {
                    Message::Trim {
                        source_seq,
                        offset,
                        length,
                    }
                } else {
                    Message::Zero {
                        source_seq,
                        offset,
                        length,
                    }
                }
            }
            kind::FLUSH => Message::Flush {
                source_seq: r.u64()?,
            },
            kind::RESYNC_START => {
                let source_seq = r.u64()?;
                // A ResyncStart from before the marking time: nothing is known about marking.
                let marking_since_ns = if r.remaining() == 0 { 0 } else { r.u64()? };
                Message::ResyncStart {
                    source_seq,
                    marking_since_ns,
                }
            }
            kind::HEARTBEAT => Message::Heartbeat,
            kind::RESYNC_END => Message::ResyncEnd {
                source_seq: r.u64()?,
            },
            kind::CHECKSUM_REQUEST => {
                let offset = r.u64()?;
                let length = r.u64()?;
                let region_bytes = r.u32()?;
                check_checksum_range(offset, region_bytes)?;
                let regions = length.div_ceil(u64::from(region_bytes));
                if regions == 0 || regions > CHECKSUMS_PER_REQUEST_MAX as u64 {
                    return Err(LinkError::Protocol(format!(
                        "checksum request for {regions} regions (1..={CHECKSUMS_PER_REQUEST_MAX} allowed)"
                    )));
                }
                Message::ChecksumRequest {
                    offset,
                    length,
                    region_bytes,
                }
            }
            kind::WELCOME => {
                let volume_id = r.u32()?;
                let last_source_seq = r.u64()?;
                // A Welcome from before the flags word: the replica's state is unknown, so
                // a first initialization copies everything, as it did then.
                let flags = if r.remaining() == 0 { 0 } else { r.u32()? };
                if flags & !WELCOME_FLAG_REPLICA_HOLDS_DATA != 0 {
                    return Err(LinkError::Protocol(format!(
                        "welcome has unknown flags {flags:#x}"
                    )));
                }
                Message::Welcome {
                    volume_id,
                    last_source_seq,
                    replica_holds_data: flags & WELCOME_FLAG_REPLICA_HOLDS_DATA != 0,
                }
            }
            kind::CHECKSUMS => {
                let offset = r.u64()?;
                let region_bytes = r.u32()?;
                check_checksum_range(offset, region_bytes)?;
                let count = r.u32()? as usize;
                if count == 0 || count > CHECKSUMS_PER_REQUEST_MAX {
                    return Err(LinkError::Protocol(format!(
                        "{count} checksums in one answer (1..={CHECKSUMS_PER_REQUEST_MAX} allowed)"
                    )));
                }
                let mut sums = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut sum = [0u8; CHECKSUM_BYTES];
                    sum.copy_from_slice(r.take(CHECKSUM_BYTES)?);
                    sums.push(sum);
                }
                Message::Checksums {
                    offset,
                    region_bytes,
                    sums,
                }
            }
            kind::ACK => Message::Ack {
                source_seq: r.u64()?,
            },
            kind::DURABLE => Message::Durable {
                source_seq: r.u64()?,
            },
            kind::REFUSE => Message::Refuse { reason: r.text()? },
            other => return Err(LinkError::Protocol(format!("unknown message kind {other}"))),
        };
        r.finish()?;
        Ok(message)
    }
}

/// Region size and alignment rules shared by checksum requests and answers.
fn check_checksum_range(offset: u64, region_bytes: u32) -> Result<(), LinkError> {
    if !region_bytes.is_power_of_two()
        || !(CHECKSUM_REGION_BYTES_MIN..=CHECKSUM_REGION_BYTES_MAX).contains(&region_bytes)
    {
        return Err(LinkError::Protocol(format!(
            "checksum region of {region_bytes} bytes is not a power of two in \
             {CHECKSUM_REGION_BYTES_MIN}..={CHECKSUM_REGION_BYTES_MAX}"
        )));
    }
    // A power of two (checked above), so the low bits are the remainder.
    if offset & (u64::from(region_bytes) - 1) != 0 {
        return Err(LinkError::Protocol(format!(
            "checksum offset {offset} is not a multiple of the {region_bytes} byte region"
        )));
    }
    Ok(())
}

struct BodyReader {
    body: Bytes,
    at: usize,
    kind: u8,
}

impl BodyReader {
    fn take(&mut self, n: usize) -> Result<&[u8], LinkError> {
        if self.body.len() - self.at < n {
            return Err(LinkError::Protocol(format!(
                "message kind {} body too short: {} bytes",
                self.kind,
                self.body.len()
            )));
        }
        let s = &self.body[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, LinkError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, LinkError> {
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(u32::from_le_bytes(a))
    }
    fn text(&mut self) -> Result<String, LinkError> {
        let b = self.take(2)?;
        let len = u16::from_le_bytes([b[0], b[1]]) as usize;
        if len > TEXT_LEN_MAX {
            return Err(LinkError::Protocol(format!("text of {len} bytes too long")));
        }
        let kind = self.kind;
        let raw = self.take(len)?.to_vec();
        String::from_utf8(raw)
            .map_err(|_| LinkError::Protocol(format!("message kind {kind}: text is not UTF-8")))
    }
    fn remaining(&self) -> usize {
        self.body.len() - self.at
    }
    fn rest(&mut self) -> Bytes {
        let rest = self.body.slice(self.at..);
        self.at = self.body.len();
        rest
    }
    fn finish(self) -> Result<(), LinkError> {
        if self.at != self.body.len() {
            return Err(LinkError::Protocol(format!(
                "message kind {} has {} trailing bytes",
                self.kind,
                self.body.len() - self.at
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_header, verify_crc};
    use proptest::prelude::*;

    fn round_trip(m: &Message) -> Message {
        let f = m.encode();
        let mut body = BytesMut::new();
        body.extend_from_slice(&f.fixed);
        if let Some(d) = &f.data {
            body.extend_from_slice(d);
        }
        let h = decode_header(&f.header).unwrap();
        verify_crc(&f.header, &h, &body).unwrap();
        Message::decode(h.kind, body).unwrap()
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                "[a-z0-9]{1,20}",
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<Option<u64>>()
            )
                .prop_map(|(v, s, i, n, r)| Message::Hello {
                    volume: v,
                    size: s,
                    splitter_id: i,
                    session: n,
                    resync_follows: r,
                }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(s, o, d)| Message::Write {
                    source_seq: s,
                    offset: o,
                    data: Bytes::from(d)
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(s, o, l)| Message::Trim {
                source_seq: s,
                offset: o,
                length: l
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(s, o, l)| Message::Zero {
                source_seq: s,
                offset: o,
                length: l
            }),
            any::<u64>().prop_map(|s| Message::Flush { source_seq: s }),
            (any::<u64>(), any::<u64>()).prop_map(|(s, m)| Message::ResyncStart {
                source_seq: s,
                marking_since_ns: m
            }),
            Just(Message::Heartbeat),
            any::<u64>().prop_map(|s| Message::ResyncEnd { source_seq: s }),
            (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(|(v, s, d)| Message::Welcome {
                volume_id: v,
                last_source_seq: s,
                replica_holds_data: d
            }),
            (0u64..1 << 20, 1u64..1 << 30, 16u32..=25).prop_map(|(o, l, shift)| {
                let region_bytes = 1u32 << shift;
                Message::ChecksumRequest {
                    offset: o * u64::from(region_bytes),
                    length: l.min(u64::from(region_bytes) * CHECKSUMS_PER_REQUEST_MAX as u64),
                    region_bytes,
                }
            }),
            (
                0u64..1 << 20,
                16u32..=25,
                proptest::collection::vec(any::<[u8; 32]>(), 1..40)
            )
                .prop_map(|(o, shift, sums)| Message::Checksums {
                    offset: o << shift,
                    region_bytes: 1 << shift,
                    sums
                }),
            any::<u64>().prop_map(|s| Message::Ack { source_seq: s }),
            any::<u64>().prop_map(|s| Message::Durable { source_seq: s }),
            ".{0,40}".prop_map(|r| Message::Refuse { reason: r }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in any_message()) {
            prop_assert_eq!(round_trip(&m), m);
        }

        #[test]
        fn arbitrary_bodies_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(kind, BytesMut::from(&body[..]));
        }
    }

    #[test]
    fn golden_ack_v1() {
        let f = Message::Ack { source_seq: 7 }.encode();
        assert_eq!(&f.header[0..12], b"CDPL\x01\x00\x11\x00\x08\x00\x00\x00");
        assert_eq!(f.fixed, 7u64.to_le_bytes().to_vec());
    }

    #[test]
    fn golden_welcome_with_flags_and_old_welcome() {
        let f = Message::Welcome {
            volume_id: 3,
            last_source_seq: 9,
            replica_holds_data: true,
        }
        .encode();
        assert_eq!(&f.header[0..12], b"CDPL\x01\x00\x10\x00\x10\x00\x00\x00");
        assert_eq!(
            f.fixed,
            [
                &3u32.to_le_bytes()[..],
                &9u64.to_le_bytes(),
                &1u32.to_le_bytes()
            ]
            .concat()
        );
        let old = [&3u32.to_le_bytes()[..], &9u64.to_le_bytes()].concat();
        assert_eq!(
            Message::decode(kind::WELCOME, BytesMut::from(&old[..])).unwrap(),
            Message::Welcome {
                volume_id: 3,
                last_source_seq: 9,
                replica_holds_data: false
            }
        );
        let unknown_flag = [&old[..], &2u32.to_le_bytes()].concat();
        assert!(Message::decode(kind::WELCOME, BytesMut::from(&unknown_flag[..])).is_err());
    }

    #[test]
    fn golden_heartbeat_hello_and_resync_start_with_old_bodies() {
        let f = Message::Heartbeat.encode();
        assert_eq!(&f.header[0..12], b"CDPL\x01\x00\x09\x00\x00\x00\x00\x00");
        let f = Message::ResyncStart {
            source_seq: 4,
            marking_since_ns: 5,
        }
        .encode();
        assert_eq!(
            f.fixed,
            [&4u64.to_le_bytes()[..], &5u64.to_le_bytes()].concat()
        );
        let old = 4u64.to_le_bytes();
        assert_eq!(
            Message::decode(kind::RESYNC_START, BytesMut::from(&old[..])).unwrap(),
            Message::ResyncStart {
                source_seq: 4,
                marking_since_ns: 0
            }
        );
        let old_hello = [&8u64.to_le_bytes()[..], &9u64.to_le_bytes(), &[1, 0], b"v"].concat();
        assert_eq!(
            Message::decode(kind::HELLO, BytesMut::from(&old_hello[..])).unwrap(),
            Message::Hello {
                volume: "v".into(),
                size: 8,
                splitter_id: 9,
                session: 0,
                resync_follows: None,
            }
        );
    }

    #[test]
    fn golden_checksum_request_and_answer() {
        let f = Message::ChecksumRequest {
            offset: 1 << 20,
            length: 3 << 20,
            region_bytes: 1 << 20,
        }
        .encode();
        assert_eq!(&f.header[0..12], b"CDPL\x01\x00\x08\x00\x14\x00\x00\x00");
        let f = Message::Checksums {
            offset: 0,
            region_bytes: 1 << 16,
            sums: vec![[0xab; 32]],
        }
        .encode();
        assert_eq!(&f.header[0..12], b"CDPL\x01\x00\x14\x00\x30\x00\x00\x00");
        assert_eq!(&f.fixed[8..16], &[0, 0, 1, 0, 1, 0, 0, 0]);
    }

    /// Encodes a checksum request body without the encoder's cooperation.
    fn checksum_request_body(offset: u64, length: u64, region_bytes: u32) -> BytesMut {
        let body = [
            &offset.to_le_bytes()[..],
            &length.to_le_bytes(),
            &region_bytes.to_le_bytes(),
        ]
        .concat();
        BytesMut::from(&body[..])
    }

    #[test]
    fn checksum_requests_out_of_bounds_are_protocol_errors() {
        let mib = 1u32 << 20;
        let decode =
            |o, l, r| Message::decode(kind::CHECKSUM_REQUEST, checksum_request_body(o, l, r));
        assert!(decode(0, u64::from(mib), mib).is_ok());
        // The last region may be short.
        assert!(decode(0, 1, mib).is_ok());
        let too_many = u64::from(mib) * CHECKSUMS_PER_REQUEST_MAX as u64 + 1;
        for (offset, length, region_bytes) in [
            (0, 0, mib),                        // nothing asked
            (0, too_many, mib),                 // more regions than one answer holds
            (0, u64::MAX, mib),                 // absurd length
            (4096, u64::from(mib), mib),        // unaligned offset
            (0, u64::from(mib), 3 * (1 << 16)), // not a power of two
            (0, u64::from(mib), 1 << 12),       // smaller than a bitmap region
            (0, u64::from(mib), 1 << 26),       // larger than a write payload
            (0, u64::from(mib), 0),             // zero
        ] {
            assert!(
                matches!(
                    decode(offset, length, region_bytes),
                    Err(LinkError::Protocol(_))
                ),
                "{offset} {length} {region_bytes}"
            );
        }
    }

    #[test]
    fn checksum_answers_out_of_bounds_are_protocol_errors() {
        let answer = |count: u32, sums: usize| {
            let mut body = [
                &0u64.to_le_bytes()[..],
                &(1u32 << 20).to_le_bytes(),
                &count.to_le_bytes(),
            ]
            .concat();
            body.extend_from_slice(&vec![7u8; sums * CHECKSUM_BYTES]);
            Message::decode(kind::CHECKSUMS, BytesMut::from(&body[..]))
        };
        assert!(answer(2, 2).is_ok());
        assert!(answer(0, 0).is_err());
        assert!(answer(3, 2).is_err()); // claims more than it carries
        assert!(answer(1, 2).is_err()); // trailing checksum
        assert!(answer(u32::MAX, 1).is_err()); // never allocates for the claim
        let too_many = CHECKSUMS_PER_REQUEST_MAX as u32 + 1;
        assert!(answer(too_many, too_many as usize).is_err());
    }

    #[test]
    fn short_and_trailing_bodies_are_protocol_errors() {
        assert!(matches!(
            Message::decode(kind::ACK, BytesMut::from(&[1u8, 2][..])),
            Err(LinkError::Protocol(_))
        ));
        assert!(matches!(
            Message::decode(kind::ACK, BytesMut::from(&[0u8; 9][..])),
            Err(LinkError::Protocol(_))
        ));
        assert!(Message::decode(200, BytesMut::new()).is_err());
    }
}
