//! A small cache of journal and undo payloads for image reads: reading a big write block by
//! block would otherwise read and CRC-check the whole record once per block.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::limits::{IMAGE_RECORD_CACHE_BYTES_MAX, IMAGE_RECORD_CACHE_ENTRIES_MAX};

/// Which of a group's two record streams a seq belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Redo,
    Undo,
}

/// Most recently inserted payloads, evicted oldest first once over the byte budget.
#[derive(Default)]
pub struct RecordCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    payloads: HashMap<(Stream, u64), Bytes>,
    order: VecDeque<(Stream, u64)>,
    bytes: usize,
}

impl RecordCache {
    pub fn get(&self, stream: Stream, seq: u64) -> Option<Bytes> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.payloads.get(&(stream, seq)).cloned()
    }

    pub fn insert(&self, stream: Stream, seq: u64, payload: Bytes) {
        if payload.len() > IMAGE_RECORD_CACHE_BYTES_MAX / 2 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let len = payload.len();
        if inner.payloads.insert((stream, seq), payload).is_some() {
            return;
        }
        inner.order.push_back((stream, seq));
        inner.bytes += len;
        while inner.bytes > IMAGE_RECORD_CACHE_BYTES_MAX
            || inner.order.len() > IMAGE_RECORD_CACHE_ENTRIES_MAX
        {
            let Some(key) = inner.order.pop_front() else {
                break;
            };
            if let Some(b) = inner.payloads.remove(&key) {
                inner.bytes -= b.len();
            }
        }
    }
}
