//! A small cache of journal and undo payloads for image reads: reading a big write block by
//! block would otherwise read and CRC-check the whole record once per block.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

use crate::limits::IMAGE_RECORD_CACHE_BYTES_MAX;

/// Which of a group's two record streams a seq belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Redo,
    Undo,
}

/// Most recently inserted payloads, evicted oldest first once over the byte budget.
#[derive(Default)]
pub struct RecordCache {
    entries: Mutex<VecDeque<(Stream, u64, Bytes)>>,
}

impl RecordCache {
    pub fn get(&self, stream: Stream, seq: u64) -> Option<Bytes> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .rev()
            .find(|(s, q, _)| *s == stream && *q == seq)
            .map(|(_, _, b)| b.clone())
    }

    pub fn insert(&self, stream: Stream, seq: u64, payload: Bytes) {
        if payload.len() > IMAGE_RECORD_CACHE_BYTES_MAX / 2 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.push_back((stream, seq, payload));
        let mut total: usize = entries.iter().map(|(_, _, b)| b.len()).sum();
        while total > IMAGE_RECORD_CACHE_BYTES_MAX || entries.len() > 256 {
            match entries.pop_front() {
                Some((_, _, b)) => total -= b.len(),
                None => break,
            }
        }
    }

    /// Forgets every undo payload: a rollback rewrote what they describe.
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
