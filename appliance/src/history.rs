//! Which bytes every retained point of a group holds: a block index over the journal's
//! records (redo) and over the undo stream, and the plan that assembles a block at a point.
//!
//! A point `at` is read against the replica's state `distributed` (the seq the replica holds
//! exactly). For `at < distributed`, a block's bytes at `at` are the before-image saved when
//! the first write after `at` touching it was distributed (the undo stream); if no such write
//! was distributed, the replica still holds them. For `at ≥ distributed`, they are the
//! replica's bytes with the journal's writes in `(distributed, at]` laid over them in order.
//! So opening a point costs nothing, and reading a block costs a few lookups whatever the
//! journal's length.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use cdp_journal::{RecordKind, RecordLocation};

use crate::error::ApplianceError;

/// The index's unit: image reads assemble whole blocks.
pub const BLOCK_BYTES: u64 = 4096;
/// Records up to this long are indexed per block; longer ones per chunk, so a 1 GiB zero
/// costs 1024 entries instead of 262 144.
const FINE_RECORD_BYTES_MAX: u64 = 256 * 1024;
/// The coarse level's unit.
pub const CHUNK_BYTES: u64 = 1024 * 1024;
const BLOCKS_PER_CHUNK: u64 = CHUNK_BYTES / BLOCK_BYTES;

/// A journal record that changes volume bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedoRef {
    pub location: RecordLocation,
    pub kind: RecordKind,
    pub volume: u32,
    pub offset: u64,
    pub length: u64,
}

/// A before-image in the undo stream: what `[offset, offset + length)` held just before
/// redo record `redo_seq` was applied to the replica. Ranges are block-aligned (clipped
/// at the volume's end), so a record that overlaps a block covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRef {
    pub location: RecordLocation,
    pub redo_seq: u64,
    /// The range held only zeroes: the record has no payload.
    pub zero: bool,
    /// Consolidation dropped its payload (no kept point needs it): it is not in the block
    /// index, and a rollback skips it.
    pub dropped: bool,
    pub volume: u32,
    pub offset: u64,
    pub length: u64,
}

impl RedoRef {
    /// A journal record at `location`, or `None` if it changes no volume bytes.
    pub fn new(
        location: RecordLocation,
        kind: RecordKind,
        volume: u32,
        offset: u64,
        length: u64,
    ) -> Option<RedoRef> {
        kind.change_kind()?;
        Some(RedoRef {
            location,
            kind,
            volume,
            offset,
            length,
        })
    }
}

impl UndoRef {
    /// An undo-stream record at `location`: a zero record or a write holding the bytes,
    /// with the redo seq it serves in its `source_seq`.
    pub fn new(
        location: RecordLocation,
        kind: RecordKind,
        volume: u32,
        offset: u64,
        length: u64,
        redo_seq: u64,
    ) -> UndoRef {
        UndoRef {
            location,
            redo_seq,
            zero: kind == RecordKind::Zero,
            dropped: false,
            volume,
            offset,
            length,
        }
    }
}

/// How to assemble one block at a point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockPlan {
    /// Copy the block out of undo record `undo_seq`.
    Undo { undo_seq: u64, undo: UndoRef },
    /// Start from the replica's block (or, when `from_replica` is false, from zeroes that
    /// the first layer entirely covers), then apply each redo record in order.
    Layers {
        from_replica: bool,
        layers: Vec<(u64, RedoRef)>,
    },
}

impl BlockPlan {
    /// The replica alone holds the block.
    pub fn is_replica_only(&self) -> bool {
        matches!(self, BlockPlan::Layers { from_replica: true, layers } if layers.is_empty())
    }
}

/// Hashes a block or chunk number with one 128-bit multiply folded to 64 bits. The keys are
/// our own (not a peer's), so SipHash's flood resistance buys nothing, and it was most of
/// the index's rebuild time at open (measured by `benches/restart.rs`).
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, key: u64) {
        let product =
            u128::from(key ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

type BlockMap = HashMap<u64, Vec<u64>, BuildHasherDefault<BlockHasher>>;

/// Seqs of the records touching each block (fine) or chunk (coarse), ascending.
#[derive(Default)]
struct Levels {
    fine: BlockMap,
    coarse: BlockMap,
    /// Seqs held in both maps, kept as they change: status must not walk the index.
    entries: usize,
}

impl Levels {
    /// The level a record of `length` bytes is indexed in, and that level's unit.
    fn level(&mut self, length: u64) -> (&mut BlockMap, u64, &mut usize) {
        if length <= FINE_RECORD_BYTES_MAX {
            (&mut self.fine, BLOCK_BYTES, &mut self.entries)
        } else {
            (&mut self.coarse, CHUNK_BYTES, &mut self.entries)
        }
    }

    fn insert(&mut self, seq: u64, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let (map, unit, entries) = self.level(length);
        for key in offset / unit..=(offset + length - 1) / unit {
            let seqs = map.entry(key).or_default();
            // Appends arrive in seq order, so this is a push in all but rare cases.
            let at = seqs.partition_point(|&s| s < seq);
            if seqs.get(at) != Some(&seq) {
                seqs.insert(at, seq);
                *entries += 1;
            }
        }
    }

    fn remove(&mut self, seq: u64, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let (map, unit, entries) = self.level(length);
        for key in offset / unit..=(offset + length - 1) / unit {
            if let Some(seqs) = map.get_mut(&key) {
                let before = seqs.len();
                seqs.retain(|&s| s != seq);
                *entries -= before - seqs.len();
                if seqs.is_empty() {
                    map.remove(&key);
                }
            }
        }
    }

    /// The two candidate lists for `block` (the coarse one may hold records that touch the
    /// chunk but not the block).
    fn lists(&self, block: u64) -> [&[u64]; 2] {
        let fine = self.fine.get(&block).map_or(&[][..], |v| &v[..]);
        let coarse = self
            .coarse
            .get(&(block / BLOCKS_PER_CHUNK))
            .map_or(&[][..], |v| &v[..]);
        [fine, coarse]
    }
}

#[derive(Default)]
struct VolumeIndex {
    redo: Levels,
    /// Keyed by undo seq; undo seqs and their redo seqs rise together.
    undo: Levels,
}

/// The index of one group. Not thread-safe by itself: the group keeps it behind a mutex.
pub struct History {
    /// Seq of `redo[0]`; `redo` holds every seq from there on, `None` for records that
    /// change no bytes (bookmarks, markers).
    redo_first: u64,
    redo: VecDeque<Option<RedoRef>>,
    /// The `Some` entries of `redo`.
    redo_records: u64,
    /// Seq (in the undo stream) of `undo[0]`; the undo stream has no gaps.
    undo_first: u64,
    undo: VecDeque<UndoRef>,
    volumes: HashMap<u32, VolumeIndex>,
}

/// Entry counts, for status and the memory limit's arithmetic (part of `cdp status`).
pub use cdp_control::HistoryStats;

impl History {
    /// An empty index whose next redo record is `redo_next` and next undo record `undo_next`.
    pub fn new(redo_next: u64, undo_next: u64) -> History {
        History {
            redo_first: redo_next,
            redo: VecDeque::new(),
            redo_records: 0,
            undo_first: undo_next,
            undo: VecDeque::new(),
            volumes: HashMap::new(),
        }
    }

    /// The redo seq the next `note_redo` should carry.
    pub fn redo_next(&self) -> u64 {
        self.redo_first + self.redo.len() as u64
    }

    pub fn undo_next(&self) -> u64 {
        self.undo_first + self.undo.len() as u64
    }

    /// Records journal record `seq`. Seqs must rise; gaps (records appended around the
    /// index, such as bookmarks) are filled as byte-less.
    pub fn note_redo(&mut self, seq: u64, redo: Option<RedoRef>) {
        if seq < self.redo_next() {
            return;
        }
        while self.redo_next() < seq {
            self.redo.push_back(None);
        }
        let redo = redo.filter(|r| r.kind.change_kind().is_some() && r.length > 0);
        if let Some(r) = redo {
            self.volumes
                .entry(r.volume)
                .or_default()
                .redo
                .insert(seq, r.offset, r.length);
            self.redo_records += 1;
        }
        self.redo.push_back(redo);
    }

    /// Records undo record `undo_seq`, which must be the next one.
    pub fn note_undo(&mut self, undo_seq: u64, undo: UndoRef) -> Result<(), ApplianceError> {
        if undo_seq != self.undo_next() {
            return Err(ApplianceError::Corruption {
                path: "the undo stream".into(),
                what: format!(
                    "undo record {undo_seq} where {} was expected",
                    self.undo_next()
                ),
            });
        }
        if !undo.dropped {
            self.volumes.entry(undo.volume).or_default().undo.insert(
                undo_seq,
                undo.offset,
                undo.length,
            );
        }
        self.undo.push_back(undo);
        Ok(())
    }

    /// Consolidation rewrote redo record `seq` to `location`, maybe without its payload:
    /// a dropped record leaves the index (only points that do not need it remain).
    pub fn relocate_redo(&mut self, seq: u64, location: RecordLocation, dropped: bool) {
        let Some(i) = seq.checked_sub(self.redo_first) else {
            return;
        };
        let Some(slot) = self.redo.get_mut(i as usize) else {
            return;
        };
        let Some(r) = slot.as_mut() else { return };
        if dropped {
            let r = *r;
            *slot = None;
            self.redo_records -= 1;
            if let Some(v) = self.volumes.get_mut(&r.volume) {
                v.redo.remove(seq, r.offset, r.length);
            }
        } else {
            r.location = location;
        }
    }

    /// Consolidation rewrote undo record `undo_seq` to `location`, maybe without its
    /// payload: a dropped one leaves the block index and is marked for rollback to skip.
    pub fn relocate_undo(&mut self, undo_seq: u64, location: RecordLocation, dropped: bool) {
        let Some(i) = undo_seq.checked_sub(self.undo_first) else {
            return;
        };
        let Some(u) = self.undo.get_mut(i as usize) else {
            return;
        };
        u.location = location;
        if dropped && !u.dropped {
            u.dropped = true;
            let u = *u;
            if let Some(v) = self.volumes.get_mut(&u.volume) {
                v.undo.remove(undo_seq, u.offset, u.length);
            }
        }
    }

    /// The highest redo seq with a before-image in the undo stream (0 if none).
    pub fn undo_captured_through(&self) -> u64 {
        self.undo.back().map_or(0, |u| u.redo_seq)
    }

    pub fn redo_ref(&self, seq: u64) -> Option<RedoRef> {
        let i = seq.checked_sub(self.redo_first)?;
        self.redo.get(i as usize).copied().flatten()
    }

    pub fn undo_ref(&self, undo_seq: u64) -> Option<UndoRef> {
        let i = undo_seq.checked_sub(self.undo_first)?;
        self.undo.get(i as usize).copied()
    }

    /// Forgets redo records below `first` (released by retention).
    pub fn release_redo_before(&mut self, first: u64) {
        while self.redo_first < first {
            let Some(front) = self.redo.pop_front() else {
                self.redo_first = first;
                break;
            };
            if let Some(r) = front {
                self.redo_records -= 1;
                if let Some(v) = self.volumes.get_mut(&r.volume) {
                    v.redo.remove(self.redo_first, r.offset, r.length);
                }
            }
            self.redo_first += 1;
        }
    }

    /// Forgets undo records below `first` (released with the redo records they serve).
    pub fn release_undo_before(&mut self, first: u64) {
        while self.undo_first < first {
            let Some(u) = self.undo.pop_front() else {
                self.undo_first = first;
                break;
            };
            if !u.dropped {
                if let Some(v) = self.volumes.get_mut(&u.volume) {
                    v.undo.remove(self.undo_first, u.offset, u.length);
                }
            }
            self.undo_first += 1;
        }
    }

    /// The last undo seq whose before-image belongs to a redo record at or below
    /// `redo_through`: once redo is released through there, so can undo be.
    pub fn undo_release_point(&self, redo_through: u64) -> Option<u64> {
        let n = self.undo.partition_point(|u| u.redo_seq <= redo_through);
        (n > 0).then(|| self.undo_first + n as u64 - 1)
    }

    pub fn stats(&self) -> HistoryStats {
        HistoryStats {
            redo_records: self.redo_records,
            undo_records: self.undo.len() as u64,
            index_entries: self
                .volumes
                .values()
                .map(|v| (v.redo.entries + v.undo.entries) as u64)
                .sum(),
        }
    }

    /// The first seq whose record the index still holds (records before it were released).
    pub fn redo_first(&self) -> u64 {
        self.redo_first
    }

    /// Whether a record with seq in `(after, through]` changed bytes of block `block` of
    /// `volume` (writes, trims and zeroes alike). The caller checks that the index still
    /// holds every record after `after` (`redo_first`).
    pub fn changed(&self, volume: u32, block: u64, after: u64, through: u64) -> bool {
        let Some(index) = self.volumes.get(&volume) else {
            return false;
        };
        let start = block * BLOCK_BYTES;
        let end = start + BLOCK_BYTES;
        index.redo.lists(block).iter().any(|list| {
            let from = list.partition_point(|&s| s <= after);
            list[from..]
                .iter()
                .take_while(|&&s| s <= through)
                .any(|&s| {
                    self.redo_ref(s)
                        .is_some_and(|r| r.offset < end && start < r.offset + r.length)
                })
        })
    }

    /// How to assemble block `block` of `volume` as of point `at`, given that the replica
    /// holds exactly the state after `distributed`.
    pub fn plan(&self, volume: u32, block: u64, at: u64, distributed: u64) -> BlockPlan {
        let Some(index) = self.volumes.get(&volume) else {
            return BlockPlan::Layers {
                from_replica: true,
                layers: Vec::new(),
            };
        };
        let start = block * BLOCK_BYTES;
        let end = start + BLOCK_BYTES;
        let overlaps = |offset: u64, length: u64| offset < end && start < offset + length;
        if at < distributed {
            // The earliest before-image taken after `at`; redo seqs rise with undo seqs, so
            // each list is searched from its first entry past `at`.
            let mut best: Option<(u64, UndoRef)> = None;
            for list in index.undo.lists(block) {
                let from =
                    list.partition_point(|&u| self.undo_ref(u).is_none_or(|r| r.redo_seq <= at));
                for &u in &list[from..] {
                    let Some(r) = self.undo_ref(u) else { continue };
                    if overlaps(r.offset, r.length) {
                        if best.is_none_or(|(b, _)| u < b) {
                            best = Some((u, r));
                        }
                        break;
                    }
                }
            }
            if let Some((undo_seq, undo)) = best {
                if undo.redo_seq <= distributed {
                    return BlockPlan::Undo { undo_seq, undo };
                }
            }
            return BlockPlan::Layers {
                from_replica: true,
                layers: Vec::new(),
            };
        }
        let mut layers: Vec<(u64, RedoRef)> = Vec::new();
        for list in index.redo.lists(block) {
            let from = list.partition_point(|&s| s <= distributed);
            for &s in &list[from..] {
                if s > at {
                    break;
                }
                if let Some(r) = self.redo_ref(s) {
                    if overlaps(r.offset, r.length) {
                        layers.push((s, r));
                    }
                }
            }
        }
        layers.sort_unstable_by_key(|&(s, _)| s);
        let covers = |r: &RedoRef| r.offset <= start && r.offset + r.length >= end;
        match layers.iter().rposition(|(_, r)| covers(r)) {
            Some(last_full) => BlockPlan::Layers {
                from_replica: false,
                layers: layers.split_off(last_full),
            },
            None => BlockPlan::Layers {
                from_replica: true,
                layers,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redo(kind: RecordKind, offset: u64, length: u64) -> Option<RedoRef> {
        Some(RedoRef {
            location: RecordLocation {
                segment: 0,
                offset: 0,
            },
            kind,
            volume: 1,
            offset,
            length,
        })
    }

    /// The counters `stats` reports, recomputed by walking the whole index.
    fn counted(h: &History) -> (u64, u64) {
        let entries = h
            .volumes
            .values()
            .flat_map(|v| [&v.redo, &v.undo])
            .flat_map(|l| l.fine.values().chain(l.coarse.values()))
            .map(|seqs| seqs.len() as u64)
            .sum();
        let records = h.redo.iter().filter(|r| r.is_some()).count() as u64;
        (entries, records)
    }

    fn assert_counters(h: &History) {
        let stats = h.stats();
        assert_eq!(counted(h), (stats.index_entries, stats.redo_records));
    }

    #[test]
    fn changed_names_blocks_touched_between_two_seqs() {
        let mut h = History::new(1, 1);
        h.note_redo(1, redo(RecordKind::Write, 0, 512));
        h.note_redo(2, redo(RecordKind::Zero, 8192, 4096));
        h.note_redo(3, None);
        // A big trim is indexed per chunk: only the blocks it overlaps are changed.
        h.note_redo(4, redo(RecordKind::Trim, 3 * CHUNK_BYTES, CHUNK_BYTES / 2));
        assert_eq!(h.redo_first(), 1);
        assert!(h.changed(1, 0, 0, 1));
        assert!(!h.changed(1, 0, 1, 4));
        assert!(h.changed(1, 2, 1, 2));
        assert!(!h.changed(1, 1, 0, 4));
        let trimmed = 3 * CHUNK_BYTES / BLOCK_BYTES;
        assert!(h.changed(1, trimmed, 3, 4));
        assert!(!h.changed(1, trimmed + BLOCKS_PER_CHUNK / 2, 0, 4));
        assert!(!h.changed(1, trimmed, 0, 3));
        assert!(!h.changed(2, 0, 0, 4));
    }

    #[test]
    fn later_full_write_hides_earlier_layers() {
        let mut h = History::new(1, 1);
        h.note_redo(1, redo(RecordKind::Write, 0, 512));
        h.note_redo(2, redo(RecordKind::Write, 0, 8192));
        h.note_redo(3, None);
        h.note_redo(4, redo(RecordKind::Zero, 1024, 512));
        match h.plan(1, 0, 4, 0) {
            BlockPlan::Layers {
                from_replica,
                layers,
            } => {
                assert!(!from_replica);
                assert_eq!(layers.iter().map(|l| l.0).collect::<Vec<_>>(), vec![2, 4]);
            }
            p => panic!("{p:?}"),
        }
        assert!(h.plan(1, 0, 0, 0).is_replica_only());
        assert!(h.plan(1, 5, 4, 0).is_replica_only());
        match h.plan(1, 0, 1, 0) {
            BlockPlan::Layers {
                from_replica,
                layers,
            } => assert!(from_replica && layers.len() == 1),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn big_records_are_found_through_chunks() {
        let mut h = History::new(1, 1);
        h.note_redo(1, redo(RecordKind::Trim, 0, 64 * CHUNK_BYTES));
        h.note_redo(
            2,
            redo(RecordKind::Write, 3 * CHUNK_BYTES + 4096, 2 * CHUNK_BYTES),
        );
        let seqs = |h: &History, block| match h.plan(1, block, 2, 0) {
            BlockPlan::Layers { layers, .. } => layers.iter().map(|l| l.0).collect::<Vec<_>>(),
            p => panic!("{p:?}"),
        };
        assert_eq!(seqs(&h, 3 * BLOCKS_PER_CHUNK), vec![1]);
        assert_eq!(seqs(&h, 3 * BLOCKS_PER_CHUNK + 1), vec![2]);
        assert!(h.stats().index_entries < 100);
        assert_counters(&h);
        h.release_redo_before(2);
        assert_counters(&h);
        assert_eq!(seqs(&h, 0), Vec::<u64>::new());
    }

    #[test]
    fn undo_serves_points_before_the_replica() {
        let mut h = History::new(1, 1);
        for s in 1..=3 {
            h.note_redo(s, redo(RecordKind::Write, 0, 4096));
        }
        let undo = |redo_seq| UndoRef {
            location: RecordLocation {
                segment: 0,
                offset: redo_seq,
            },
            redo_seq,
            dropped: false,
            zero: false,
            volume: 1,
            offset: 0,
            length: 4096,
        };
        for s in 1..=3 {
            h.note_undo(s, undo(s)).unwrap();
        }
        assert!(h.note_undo(9, undo(9)).is_err());
        assert_eq!(h.undo_captured_through(), 3);
        // Replica at 3: point 1 is the before-image of write 2.
        assert_eq!(
            h.plan(1, 0, 1, 3),
            BlockPlan::Undo {
                undo_seq: 2,
                undo: undo(2)
            }
        );
        assert!(matches!(
            h.plan(1, 0, 0, 3),
            BlockPlan::Undo { undo_seq: 1, .. }
        ));
        // Replica at 2 (undo 3 captured, not applied): point 2 is the replica.
        assert!(h.plan(1, 0, 2, 2).is_replica_only());
        assert_eq!(h.undo_release_point(2), Some(2));
        assert_counters(&h);
        h.release_undo_before(3);
        assert_counters(&h);
        assert!(matches!(
            h.plan(1, 0, 2, 3),
            BlockPlan::Undo { undo_seq: 3, .. }
        ));
    }
}
