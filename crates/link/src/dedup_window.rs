//! The window of recent 4 KiB blocks both ends of a replication link keep in lockstep, so a repeated block travels as a reference.
//!
//! Rules both ends follow, so their windows hold the same blocks at the same numbers without
//! ever exchanging them: a window starts empty with each connection; every block sent as
//! *literal* in a version 2 batch is appended, in the order the batch stream carries it, and
//! gets the next number (0, 1, 2, ...); the window keeps the last `slots` numbers (first in,
//! first out: a reference does not refresh a block). A reference names a number the window
//! still holds; all-zero blocks are never stored (they travel as a one-byte tag).
//!
//! The sender finds candidates by the block's CRC32 (crc32fast: several GB/s, where BLAKE3 made
//! the encoder 1.5x slower) and compares the bytes before referencing, so a collision (or a
//! host crafting them) can only cost a missed reference, never a wrong block.

use std::collections::HashMap;

/// Dedup works on volume-aligned blocks of this size.
pub const DEDUP_BLOCK_BYTES: usize = 4096;

/// The largest window either end accepts: it costs this much memory per link at each end
/// (plus about 20 bytes per block for the sender's index).
pub const DEDUP_WINDOW_BYTES_MAX: usize = 256 * 1024 * 1024;

/// The default window: 8 full batches of history.
pub const DEDUP_WINDOW_BYTES_DEFAULT: usize = 64 * 1024 * 1024;

/// Most blocks a window holds.
pub const DEDUP_WINDOW_BLOCKS_MAX: usize = DEDUP_WINDOW_BYTES_MAX / DEDUP_BLOCK_BYTES;

const _: () = assert!(DEDUP_WINDOW_BYTES_DEFAULT <= DEDUP_WINDOW_BYTES_MAX);
const _: () = assert!(DEDUP_WINDOW_BLOCKS_MAX <= u32::MAX as usize);

/// The blocks themselves, as a ring of `slots` blocks; block number `n` lives in slot
/// `n % slots`. Grows as blocks arrive, so a short link never allocates the whole window.
pub struct BlockWindow {
    slots: usize,
    ring: Vec<u8>,
    next: u64,
}

impl BlockWindow {
    /// A window of `slots` blocks (clamped to 1..=DEDUP_WINDOW_BLOCKS_MAX).
    pub fn new(slots: usize) -> BlockWindow {
        BlockWindow {
            slots: slots.clamp(1, DEDUP_WINDOW_BLOCKS_MAX),
            ring: Vec::new(),
            next: 0,
        }
    }

    /// How many blocks the window keeps.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The number the next inserted block gets (= blocks inserted so far).
    pub fn next_number(&self) -> u64 {
        self.next
    }

    /// Whether block `number` is still held.
    pub fn holds(&self, number: u64) -> bool {
        number < self.next && self.next - number <= self.slots as u64
    }

    /// The bytes of block `number`, if the window still holds it.
    pub fn get(&self, number: u64) -> Option<&[u8]> {
        if !self.holds(number) {
            return None;
        }
        let at = (number % self.slots as u64) as usize * DEDUP_BLOCK_BYTES;
        self.ring.get(at..at + DEDUP_BLOCK_BYTES)
    }

    /// Appends a block (exactly `DEDUP_BLOCK_BYTES`); returns its number.
    pub fn insert(&mut self, block: &[u8]) -> u64 {
        assert_eq!(block.len(), DEDUP_BLOCK_BYTES);
        let number = self.next;
        let at = (number % self.slots as u64) as usize * DEDUP_BLOCK_BYTES;
        if at == self.ring.len() {
            if self.ring.capacity() == 0 {
                // Address space only: pages are touched (and count) as blocks arrive, and
                // the ring never moves while it grows.
                self.ring.reserve_exact(self.slots * DEDUP_BLOCK_BYTES);
            }
            self.ring.extend_from_slice(block);
        } else {
            self.ring[at..at + DEDUP_BLOCK_BYTES].copy_from_slice(block);
        }
        self.next += 1;
        number
    }
}

/// How the sender sends one aligned block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockToken {
    /// The bytes travel (and enter the window).
    Literal,
    /// All zero bytes.
    Zero,
    /// The window's block of this number holds the same bytes.
    Reference(u64),
}

/// The sender's side: the window plus an index from block content to its newest number.
pub struct DedupIndex {
    window: BlockWindow,
    by_hash: HashMap<u32, u64>,
    /// The hash of each slot's block, so an evicted block leaves the index without rehashing.
    slot_hashes: Vec<u32>,
}

impl DedupIndex {
    /// An empty index over a window of `window_bytes` (rounded down to whole blocks).
    pub fn new(window_bytes: usize) -> DedupIndex {
        let window = BlockWindow::new(window_bytes / DEDUP_BLOCK_BYTES);
        DedupIndex {
            by_hash: HashMap::new(),
            slot_hashes: Vec::new(),
            window,
        }
    }

    pub fn window(&self) -> &BlockWindow {
        &self.window
    }

    /// Decides how `block` travels; a literal is appended to the window (as the receiver
    /// will append it when it decodes the block).
    pub fn token_for(&mut self, block: &[u8]) -> BlockToken {
        if is_zero(block) {
            return BlockToken::Zero;
        }
        let hash = block_hash(block);
        if let Some(&number) = self.by_hash.get(&hash) {
            // Never trust the hash alone (a 32-bit CRC collides): the bytes must match.
            if self.window.get(number) == Some(block) {
                return BlockToken::Reference(number);
            }
        }
        let slot = (self.window.next_number() % self.window.slots() as u64) as usize;
        if slot < self.slot_hashes.len() {
            let evicted = self.window.next_number() - self.window.slots() as u64;
            let old = self.slot_hashes[slot];
            if self.by_hash.get(&old) == Some(&evicted) {
                self.by_hash.remove(&old);
            }
            self.slot_hashes[slot] = hash;
        } else {
            self.slot_hashes.push(hash);
        }
        let number = self.window.insert(block);
        self.by_hash.insert(hash, number);
        BlockToken::Literal
    }
}

fn block_hash(block: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(block);
    crc.finalize()
}

/// True if every byte is zero (a word at a time, without branching per byte).
pub fn is_zero(block: &[u8]) -> bool {
    let words = block.chunks_exact(8);
    let tail = words.remainder();
    let ored = words.fold(0u64, |acc, w| {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        acc | u64::from_ne_bytes(word)
    });
    ored == 0 && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> Vec<u8> {
        vec![byte; DEDUP_BLOCK_BYTES]
    }

    #[test]
    fn repeats_become_references_until_evicted() {
        let mut index = DedupIndex::new(2 * DEDUP_BLOCK_BYTES);
        assert_eq!(index.token_for(&block(0)), BlockToken::Zero);
        assert_eq!(index.token_for(&block(1)), BlockToken::Literal);
        assert_eq!(index.token_for(&block(1)), BlockToken::Reference(0));
        assert_eq!(index.token_for(&block(2)), BlockToken::Literal);
        assert_eq!(index.token_for(&block(1)), BlockToken::Reference(0));
        // A third literal evicts block 0 (first in, first out).
        assert_eq!(index.token_for(&block(3)), BlockToken::Literal);
        assert_eq!(index.token_for(&block(1)), BlockToken::Literal);
        assert_eq!(index.token_for(&block(1)), BlockToken::Reference(3));
        assert_eq!(index.token_for(&block(3)), BlockToken::Reference(2));
        let w = index.window();
        assert!(!w.holds(1) && w.holds(2) && w.holds(3) && !w.holds(4));
        assert_eq!(w.get(3), Some(&block(1)[..]));
        assert!(index.by_hash.len() <= 2);
    }

    #[test]
    fn zero_detection() {
        let mut b = block(0);
        assert!(is_zero(&b));
        b[4095] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]));
    }
}
