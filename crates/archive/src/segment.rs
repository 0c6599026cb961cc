//! Checks one sealed segment's bytes record by record (the journal's own header and CRC
//! rules) and hands back its records; used before upload and again on restore.

use cdp_journal::format::{
    RecordHeader, SegmentHeader, RECORD_FLAG_ZSTD, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use cdp_journal::RecordKind;

/// What a valid segment holds, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    pub index: u64,
    pub group_id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub records: u64,
    /// (name, seq, timestamp) of each bookmark record.
    pub bookmarks: Vec<(String, u64, u64)>,
}

/// One record with its payload decompressed.
pub struct SegmentRecord<'a> {
    pub header: RecordHeader,
    pub payload: std::borrow::Cow<'a, [u8]>,
}

/// Where and why a segment's bytes are not valid.
#[derive(Debug)]
pub struct SegmentDamage {
    pub offset: u64,
    pub what: String,
}

fn damage<T>(offset: u64, what: impl Into<String>) -> Result<T, SegmentDamage> {
    Err(SegmentDamage {
        offset,
        what: what.into(),
    })
}

/// Checks every record of a sealed segment (header CRC, each record's CRC bound to the
/// group and segment, contiguous seqs, whole records to the end), calling `each` with every
/// record whose payload is decompressed. A dropped payload (consolidation) is damage here:
/// an archived segment must replay exactly.
pub fn scan_segment(
    bytes: &[u8],
    expect_group: Option<u64>,
    mut each: impl FnMut(SegmentRecord<'_>) -> Result<(), SegmentDamage>,
) -> Result<SegmentSummary, SegmentDamage> {
    let header = SegmentHeader::decode(bytes).or_else(|c| damage(0, c.0))?;
    if let Some(g) = expect_group {
        if header.group_id != g {
            return damage(
                0,
                format!("segment of group {:#x}, not {g:#x}", header.group_id),
            );
        }
    }
    let mut summary = SegmentSummary {
        index: header.segment_index,
        group_id: header.group_id,
        first_seq: header.first_seq,
        last_seq: header.first_seq.saturating_sub(1),
        first_ns: 0,
        last_ns: 0,
        records: 0,
        bookmarks: Vec::new(),
    };
    let mut at = SEGMENT_HEADER_LEN;
    while at < bytes.len() {
        let off = at as u64;
        if bytes.len() - at < RECORD_HEADER_LEN {
            return damage(off, "trailing bytes shorter than a record header");
        }
        let head = &bytes[at..at + RECORD_HEADER_LEN];
        let h = RecordHeader::decode(head).or_else(|c| damage(off, c.0))?;
        let end = at + h.encoded_len() as usize;
        if end > bytes.len() {
            return damage(off, "record runs past the end of the segment");
        }
        let payload = &bytes[at + RECORD_HEADER_LEN..end];
        h.verify(head, header.group_id, header.segment_index, payload)
            .or_else(|c| damage(off, c.0))?;
        if h.seq != summary.last_seq + 1 {
            return damage(off, format!("seq {} follows {}", h.seq, summary.last_seq));
        }
        if h.payload_dropped() {
            return damage(
                off,
                "a consolidated record (payload dropped) cannot be archived",
            );
        }
        if summary.records == 0 {
            summary.first_ns = h.timestamp_ns;
        }
        summary.last_seq = h.seq;
        summary.last_ns = h.timestamp_ns;
        summary.records += 1;
        if h.kind == RecordKind::Bookmark {
            let name = bookmark_name(payload);
            summary.bookmarks.push((name, h.seq, h.timestamp_ns));
        }
        let payload = if h.kind == RecordKind::Write && h.flags & RECORD_FLAG_ZSTD != 0 {
            let plain = zstd::bulk::decompress(payload, h.length as usize)
                .or_else(|e| damage(off, format!("zstd payload: {e}")))?;
            if plain.len() as u64 != h.length {
                return damage(off, "zstd payload decompresses to the wrong length");
            }
            std::borrow::Cow::Owned(plain)
        } else {
            std::borrow::Cow::Borrowed(payload)
        };
        each(SegmentRecord { header: h, payload })?;
        at = end;
    }
    if summary.records == 0 {
        return damage(
            SEGMENT_HEADER_LEN as u64,
            "a sealed segment without records",
        );
    }
    Ok(summary)
}

/// `scan_segment` without looking at the records.
pub fn verify_segment(
    bytes: &[u8],
    expect_group: Option<u64>,
) -> Result<SegmentSummary, SegmentDamage> {
    scan_segment(bytes, expect_group, |_| Ok(()))
}

/// The name in a Bookmark record's payload: the appliance's `CDPB` payload (versions 1 and
/// 2, see appliance/src/bookmark.rs) or, for journals written without it, the bytes as is.
fn bookmark_name(payload: &[u8]) -> String {
    if payload.len() >= 12 && payload[..4] == *b"CDPB" {
        let len = u16::from_le_bytes([payload[6], payload[7]]) as usize;
        let at = if payload[4] == 2 { 16 } else { 12 };
        if let Some(name) = payload.get(at..at + len) {
            return String::from_utf8_lossy(name).into_owned();
        }
    }
    String::from_utf8_lossy(payload).into_owned()
}
