//! Typed link messages and their frame bodies (fixed-width little-endian fields).
//!
//! Splitter to appliance: `Hello` once, then `Write`/`Trim`/`Zero` each with the splitter's
//! per-volume `source_seq` (contiguous, increasing), and `Flush` asking for durability of every
//! change up to a `source_seq`. Appliance to splitter: `Welcome` answers `Hello` with the highest
//! `source_seq` already journaled (so a reconnecting splitter resends only what is missing),
//! `Ack` says changes up to a `source_seq` are in the journal, `Durable` says they are synced,
//! and `Refuse` explains why the appliance will not take this volume.

use bytes::{Bytes, BytesMut};

use crate::error::LinkError;
use crate::frame::{encode_header, HEADER_LEN};
use crate::limits::{TEXT_LEN_MAX, WRITE_PAYLOAD_MAX};

/// One message on the split link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        volume: String,
        size: u64,
        /// Random per splitter process; lets the appliance log restarts.
        splitter_id: u64,
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
    },
    ResyncEnd {
        source_seq: u64,
    },
    Welcome {
        volume_id: u32,
        last_source_seq: u64,
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
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const TRIM: u8 = 3;
    pub const ZERO: u8 = 4;
    pub const FLUSH: u8 = 5;
    pub const RESYNC_START: u8 = 6;
    pub const RESYNC_END: u8 = 7;
    pub const WELCOME: u8 = 16;
    pub const ACK: u8 = 17;
    pub const DURABLE: u8 = 18;
    pub const REFUSE: u8 = 19;
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
            } => (
                kind::HELLO,
                put_text(&put_u64s(&[*size, *splitter_id]), volume),
                None,
            ),
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
            Message::ResyncStart { source_seq } => {
                (kind::RESYNC_START, put_u64s(&[*source_seq]), None)
            }
            Message::ResyncEnd { source_seq } => (kind::RESYNC_END, put_u64s(&[*source_seq]), None),
            Message::Welcome {
                volume_id,
                last_source_seq,
            } => {
                let mut fixed = volume_id.to_le_bytes().to_vec();
                fixed.extend_from_slice(&last_source_seq.to_le_bytes());
                (kind::WELCOME, fixed, None)
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
                Message::Hello {
                    volume,
                    size,
                    splitter_id,
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
            kind::RESYNC_START => Message::ResyncStart {
                source_seq: r.u64()?,
            },
            kind::RESYNC_END => Message::ResyncEnd {
                source_seq: r.u64()?,
            },
            kind::WELCOME => {
                let volume_id = r.u32()?;
                let last_source_seq = r.u64()?;
                Message::Welcome {
                    volume_id,
                    last_source_seq,
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
            ("[a-z0-9]{1,20}", any::<u64>(), any::<u64>()).prop_map(|(v, s, i)| Message::Hello {
                volume: v,
                size: s,
                splitter_id: i
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
            any::<u64>().prop_map(|s| Message::ResyncStart { source_seq: s }),
            any::<u64>().prop_map(|s| Message::ResyncEnd { source_seq: s }),
            (any::<u32>(), any::<u64>()).prop_map(|(v, s)| Message::Welcome {
                volume_id: v,
                last_source_seq: s
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
