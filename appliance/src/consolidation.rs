//! Consolidation policy: which points of old history stay recoverable, and which journal
//! and undo-stream payloads those points need; the persisted record of kept points.
//!
//! Every point younger than `keep_all_s` stays. Older history keeps, per tier, the last
//! point of each `every_s` bucket (UTC-aligned, so an hourly bucket lies inside one daily
//! bucket and the points a coarser tier keeps were kept by the finer one), plus bookmarks
//! marked to keep, plus the oldest point and the region's end. Everything here is pure; the
//! group applies the decisions (`Group::consolidate`) and `cdp_journal` rewrites the files.
//!
//! Which payloads a kept set needs, per 4 KiB block `b` (a record is kept if any of its
//! blocks needs it):
//! - an undo record, the before-image of redo write `s`, is what an image at point `k`
//!   reads for `b` when `s` is the first write to `b` after `k`: it is needed if some kept
//!   `k` lies in `[p, s)`, `p` being the previous write to `b` (any kind);
//! - a redo record `s` is what rolling the replica forward from a kept point replays: it is
//!   needed if some kept `k` lies in `[s, f)`, `f` being the next write that covers all of
//!   `b` (a partial write does not hide `s`'s bytes). The region's end is kept, so the last
//!   writes of the region always stay.
//!
//! Replaying only the needed redo records from a kept point gives the exact state at every
//! later kept point, and the first needed before-image after a kept point is the true one:
//! a dropped record is always overwritten in full before the next kept point.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use cdp_journal::RecordKind;
use serde::{Deserialize, Serialize};

use crate::error::ApplianceError;
use crate::history::BLOCK_BYTES;
use crate::state_file::{self, ConsolidationPromise, StateFileError};

const NS_PER_S: u64 = 1_000_000_000;
/// Tiers a policy may have.
pub const TIERS_MAX: usize = 8;

/// `[group.consolidation]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsolidationConfig {
    /// Every point younger than this many seconds stays recoverable.
    pub keep_all_s: u64,
    /// Coarser and coarser intervals for older history, youngest first. History older than
    /// all tiers keeps the last tier's interval.
    #[serde(default)]
    pub tier: Vec<TierConfig>,
    /// Seconds between automatic passes (default 600). `cdp journal consolidate` runs one now.
    #[serde(default = "interval_default")]
    pub interval_s: u64,
}

fn interval_default() -> u64 {
    600
}

/// One tier: keep one point per `every_s` for `for_s` seconds of history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub every_s: u64,
    pub for_s: u64,
}

impl ConsolidationConfig {
    /// Refuses policies that cannot mean what they say.
    pub fn validate(&self, group: &str) -> Result<(), ApplianceError> {
        let bad = |why: String| {
            Err(ApplianceError::Config(format!(
                "group {group:?}: [group.consolidation]: {why}"
            )))
        };
        if self.tier.is_empty() {
            return bad("at least one [[group.consolidation.tier]] is needed (e.g. every_s = 3600, for_s = 86400)".into());
        }
        if self.tier.len() > TIERS_MAX {
            return bad(format!("at most {TIERS_MAX} tiers"));
        }
        if self.interval_s == 0 {
            return bad("interval_s must be at least 1".into());
        }
        let mut prev_every = 0;
        for (i, t) in self.tier.iter().enumerate() {
            if t.every_s == 0 || t.for_s == 0 {
                return bad(format!(
                    "tier {}: every_s and for_s must be at least 1",
                    i + 1
                ));
            }
            if t.every_s < prev_every || (prev_every > 0 && t.every_s % prev_every != 0) {
                return bad(format!(
                    "tier {}: every_s = {} must be a multiple of the previous tier's {prev_every}, so coarser points were kept by the finer tier",
                    i + 1,
                    t.every_s
                ));
            }
            prev_every = t.every_s;
        }
        Ok(())
    }

    /// The bucket a point of time `ts_ns` falls in at `now_ns`: `None` while every point is
    /// kept, else (tier, bucket number).
    fn bucket(&self, ts_ns: u64, now_ns: u64) -> Option<(usize, u64)> {
        let age = now_ns.saturating_sub(ts_ns);
        let mut edge = self.keep_all_s.saturating_mul(NS_PER_S);
        if age < edge {
            return None;
        }
        for (i, t) in self.tier.iter().enumerate() {
            edge = edge.saturating_add(t.for_s.saturating_mul(NS_PER_S));
            if age < edge || i + 1 == self.tier.len() {
                return Some((i, ts_ns / t.every_s.saturating_mul(NS_PER_S)));
            }
        }
        None
    }
}

/// A journal record as consolidation sees it (its header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointRecord {
    pub seq: u64,
    pub timestamp_ns: u64,
    pub kind: RecordKind,
    pub volume: u32,
    pub offset: u64,
    pub length: u64,
}

/// What consolidation promised so far, stored in the group directory before any file is
/// rewritten: points below `consolidated_below` are recoverable only if in `kept`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolidationState {
    pub consolidated_below: u64,
    pub kept: BTreeSet<u64>,
}

impl ConsolidationState {
    /// Reads `consolidation.state` (kind `CONS` in `state_file.rs`); absent means no pass
    /// ever ran.
    pub fn load(dir: &Path) -> Result<ConsolidationState, StateFileError> {
        Ok(state_file::load_consolidation(dir)?
            .map(|c| ConsolidationState {
                consolidated_below: c.consolidated_below,
                kept: c.kept,
            })
            .unwrap_or_default())
    }

    pub fn store(&self, dir: &Path) -> Result<(), StateFileError> {
        state_file::store_consolidation(
            dir,
            &ConsolidationPromise {
                consolidated_below: self.consolidated_below,
                kept: self.kept.clone(),
            },
        )
    }

    /// Whether point `seq` can still be shown exactly.
    pub fn is_kept(&self, seq: u64) -> bool {
        seq >= self.consolidated_below || self.kept.contains(&seq)
    }

    /// The nearest kept points below and above `seq` (for an error message).
    pub fn neighbours(&self, seq: u64) -> (Option<u64>, Option<u64>) {
        let below = self.kept.range(..seq).next_back().copied();
        let above = self
            .kept
            .range(seq..)
            .next()
            .copied()
            .or(Some(self.consolidated_below));
        (below, above)
    }

    /// Forgets kept points retention released.
    pub fn prune_below(&mut self, oldest: u64) {
        self.kept = self.kept.split_off(&oldest);
    }
}

/// The points kept in the region `[oldest, through]` (`records` are the region's records in
/// seq order, `oldest` is the oldest point, the state before the first of them). A point
/// consolidated away by an earlier pass (`prev`) never comes back.
pub fn kept_points(
    config: &ConsolidationConfig,
    records: &[PointRecord],
    oldest: u64,
    through: u64,
    now_ns: u64,
    keep_bookmarks: &BTreeSet<u64>,
    prev: &ConsolidationState,
) -> BTreeSet<u64> {
    let mut kept = BTreeSet::new();
    kept.insert(oldest);
    kept.insert(through);
    for (i, r) in records.iter().enumerate() {
        let next = records.get(i + 1);
        let keep = match config.bucket(r.timestamp_ns, now_ns) {
            None => true,
            Some(b) => next.is_none_or(|n| config.bucket(n.timestamp_ns, now_ns) != Some(b)),
        };
        if keep || keep_bookmarks.contains(&r.seq) {
            kept.insert(r.seq);
        }
    }
    kept.retain(|&k| k >= oldest && k <= through && prev.is_kept(k));
    kept
}

/// The payloads kept points need, by redo seq: journal (redo) records, and redo records
/// whose before-images (undo records) are needed. `records` are every record from the
/// journal's first to the region's end, in seq order; `kept` the region's kept points.
pub fn needed_payloads(records: &[PointRecord], kept: &BTreeSet<u64>) -> Needed {
    #[derive(Default)]
    struct Block {
        /// The last write of any kind (for the undo rule).
        last_any: u64,
        /// Writes since (and including) the last one covering the whole block, whose redo
        /// payload is still undecided.
        open: Vec<u64>,
    }
    let kept: Vec<u64> = kept.iter().copied().collect();
    // Some kept point k with lo <= k < hi.
    let kept_in = |lo: u64, hi: u64| {
        let i = kept.partition_point(|&k| k < lo);
        kept.get(i).is_some_and(|&k| k < hi)
    };
    let mut blocks: HashMap<(u32, u64), Block> = HashMap::new();
    let mut needed = Needed::default();
    for r in records {
        if r.kind.change_kind().is_none() || r.length == 0 {
            continue;
        }
        let end = r.offset + r.length;
        for block in r.offset / BLOCK_BYTES..end.div_ceil(BLOCK_BYTES) {
            let start = block * BLOCK_BYTES;
            let covers = r.offset <= start && end >= start + BLOCK_BYTES;
            let b = blocks.entry((r.volume, block)).or_default();
            if kept_in(b.last_any, r.seq) {
                needed.undo.insert(r.seq);
            }
            b.last_any = r.seq;
            if covers {
                for s in b.open.drain(..) {
                    if kept_in(s, r.seq) {
                        needed.redo.insert(s);
                    }
                }
            }
            b.open.push(r.seq);
        }
    }
    // The region's end is kept: the last writes to every block are needed.
    for b in blocks.into_values() {
        needed.redo.extend(b.open);
    }
    needed
}

/// See `needed_payloads`.
#[derive(Debug, Default)]
pub struct Needed {
    pub redo: HashSet<u64>,
    pub undo: HashSet<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> ConsolidationConfig {
        ConsolidationConfig {
            keep_all_s: 10,
            tier: vec![
                TierConfig {
                    every_s: 2,
                    for_s: 20,
                },
                TierConfig {
                    every_s: 10,
                    for_s: 100,
                },
            ],
            interval_s: 1,
        }
    }

    fn write(seq: u64, ts_s: u64, offset: u64, length: u64) -> PointRecord {
        PointRecord {
            seq,
            timestamp_ns: ts_s * NS_PER_S,
            kind: RecordKind::Write,
            volume: 1,
            offset,
            length,
        }
    }

    /// Young points all stay; older ones keep the last of each bucket of their tier.
    #[test]
    fn tiers_keep_the_last_point_of_each_bucket() {
        let now = 100 * NS_PER_S;
        // One record per second from t=50 to t=99 (seq = t - 49).
        let records: Vec<_> = (50..100).map(|t| write(t - 49, t, 0, 4096)).collect();
        let kept = kept_points(
            &policy(),
            &records,
            0,
            50,
            now,
            &BTreeSet::from([3]),
            &ConsolidationState::default(),
        );
        // Age < 10 s (t > 90): all kept. 10..30 s (t 71..=90): every 2 s. Older: every 10 s.
        for t in 91..100 {
            assert!(kept.contains(&(t - 49)), "t={t}");
        }
        assert!(kept.contains(&(89 - 49)) && !kept.contains(&(88 - 49)));
        assert!(kept.contains(&(69 - 49)) && !kept.contains(&(68 - 49)));
        assert!(kept.contains(&(59 - 49)) && !kept.contains(&(58 - 49)));
        // Bookmark, oldest and region end.
        assert!(kept.contains(&3) && kept.contains(&0) && kept.contains(&50));
        // A point dropped before never comes back.
        let prev = ConsolidationState {
            consolidated_below: 46,
            kept: kept.iter().copied().filter(|&k| k <= 45).collect(),
        };
        let again = kept_points(&policy(), &records, 0, 50, now, &BTreeSet::new(), &prev);
        assert!(again.is_subset(&kept));
    }

    /// The form docs/cli.md shows parses, with the volumes after the policy's tables.
    #[test]
    fn documented_config_parses() {
        let text = r#"
name = "db"
[consolidation]
keep_all_s = 86400
interval_s = 600
[[consolidation.tier]]
every_s = 3600
for_s = 604800
[[consolidation.tier]]
every_s = 86400
for_s = 2592000
[[volume]]
name = "vol0"
size = 1048576
replica = "/r"
"#;
        let g: crate::config::GroupConfig = toml::from_str(text).unwrap();
        let c = g.consolidation.unwrap();
        assert_eq!((c.keep_all_s, c.interval_s, c.tier.len()), (86400, 600, 2));
        assert_eq!(g.volume.len(), 1);
        c.validate("db").unwrap();
    }

    #[test]
    fn policy_validation() {
        let mut p = policy();
        assert!(p.validate("g").is_ok());
        p.tier[1].every_s = 3;
        assert!(p
            .validate("g")
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        p.tier.clear();
        assert!(p.validate("g").unwrap_err().to_string().contains("tier"));
    }

    /// Block contents under a list of (seq, offset, length, byte) writes.
    fn replay(writes: &[(u64, u64, u64, u8)], through: u64, blocks: u64) -> Vec<u8> {
        let mut v = vec![0u8; (blocks * BLOCK_BYTES) as usize];
        for &(s, o, l, b) in writes {
            if s <= through {
                v[o as usize..(o + l) as usize].fill(b);
            }
        }
        v
    }

    proptest! {
        /// The two rules, checked against their purpose: replaying only the needed redo
        /// records from any kept point reaches every later kept point exactly, and for every
        /// kept point and block, the first write after it has its before-image kept.
        #[test]
        fn needed_payloads_reconstruct_every_kept_point(
            ops in prop::collection::vec((0u64..8 * 4096, 1u64..3 * 4096, 1u8..255), 1..60),
            keep_mask in prop::collection::vec(any::<bool>(), 61),
        ) {
            let blocks = 12;
            let writes: Vec<(u64, u64, u64, u8)> = ops
                .iter()
                .enumerate()
                .map(|(i, &(o, l, b))| (i as u64 + 1, o, l, b))
                .collect();
            let last = writes.len() as u64;
            let records: Vec<_> = writes.iter().map(|&(s, o, l, _)| write(s, s, o, l)).collect();
            let mut kept: BTreeSet<u64> = (0..=last).filter(|&k| keep_mask[k as usize]).collect();
            kept.insert(0);
            kept.insert(last);
            let needed = needed_payloads(&records, &kept);
            let kept_writes: Vec<_> = writes
                .iter()
                .copied()
                .filter(|w| needed.redo.contains(&w.0))
                .collect();
            for &from in &kept {
                let mut state = replay(&writes, from, blocks);
                let mut at = from;
                for &to in kept.range(from + 1..) {
                    for &(s, o, l, b) in &kept_writes {
                        if s > at && s <= to {
                            state[o as usize..(o + l) as usize].fill(b);
                        }
                    }
                    prop_assert_eq!(&state, &replay(&writes, to, blocks), "from {} to {}", from, to);
                    at = to;
                }
            }
            for &k in &kept {
                for block in 0..blocks {
                    let (start, end) = (block * BLOCK_BYTES, (block + 1) * BLOCK_BYTES);
                    let first_after = writes
                        .iter()
                        .find(|&&(s, o, l, _)| s > k && o < end && start < o + l);
                    if let Some(&(s, ..)) = first_after {
                        prop_assert!(needed.undo.contains(&s), "k {} block {} s {}", k, block, s);
                    }
                }
            }
        }
    }
}
