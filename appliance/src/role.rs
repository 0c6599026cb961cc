//! A copy's role and generation history: the persisted facts (`role.state`), the comparison of two histories, and the runtime view `cdp status` shows.
//!
//! A history is a list of `(generation, first_seq, site)` entries, ascending: generation g
//! covers the seqs from its `first_seq` to the next entry's `first_seq - 1`. A new local
//! group starts as primary with `[(1, 1, site)]`; a new remote copy starts secondary with an
//! empty history and adopts its primary's on the first link. Every promotion appends an
//! entry (`generation + 1`, the first seq the new primary will write, its site).
//!
//! Two histories agree while one is a prefix of the other and the shorter side holds no
//! record past where the longer one's next generation begins; otherwise they **diverged at
//! seq S**, the first seq whose record may differ. Divergence is reported (status, error
//! log) and refused on the link, never resolved silently.
//!
//! Body of `role.state` (kind `ROLE`, version 1, integers little-endian, `str` = u32 length
//! + UTF-8):
//! ```text
//! role u32 (1 primary, 2 secondary)   resync_pending u64 (0/1)   divergence_seq u64 (0: none)
//! count u32, then count x (generation u64, first_seq u64, site str)
//! has_failover u32 (0/1), then: kind str, generation u64, first_seq u64, at_ns u64,
//!     pause_ms u64 (u64::MAX: none), lost_first u64 (0: none), lost_last u64 (0: none),
//!     lost_after_ns u64 (0: none)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cdp_control::{
    CopyRole, FailoverRecord, GenerationEntry, HistoryComparison, LostRange, RoleStatus,
};
use cdp_link::replication::{Lineage, WireGeneration};
use tokio::sync::watch;

use crate::error::ApplianceError;
use crate::state_file::{self, StateKind};

/// What `role.state` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleFacts {
    pub role: CopyRole,
    pub history: Vec<GenerationEntry>,
    /// `cdp reprotect` ran: the next link from the primary resynchronises this diverged
    /// copy by regions (its own records past the divergence were kept as an image).
    pub resync_pending: bool,
    pub divergence_seq: Option<u64>,
    pub last_failover: Option<FailoverRecord>,
}

impl RoleFacts {
    /// A new copy: a local group is primary in generation 1 from seq 1; a remote copy is a
    /// secondary that has not met its primary yet.
    pub fn new(primary: bool, site: &str) -> RoleFacts {
        RoleFacts {
            role: if primary {
                CopyRole::Primary
            } else {
                CopyRole::Secondary
            },
            history: if primary {
                vec![GenerationEntry {
                    generation: 1,
                    first_seq: 1,
                    site: site.to_string(),
                }]
            } else {
                Vec::new()
            },
            resync_pending: false,
            divergence_seq: None,
            last_failover: None,
        }
    }

    pub fn generation(&self) -> u64 {
        self.history.last().map_or(0, |e| e.generation)
    }

    /// Appends the entry of a promotion; the caller checked it extends the history.
    pub fn push_generation(&mut self, entry: GenerationEntry) {
        if self.history.last() != Some(&entry) {
            self.history.push(entry);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let u32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
        let u64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
        let text = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        u32(
            &mut b,
            match self.role {
                CopyRole::Primary => 1,
                CopyRole::Secondary => 2,
            },
        );
        u64(&mut b, u64::from(self.resync_pending));
        u64(&mut b, self.divergence_seq.unwrap_or(0));
        u32(&mut b, self.history.len() as u32);
        for e in &self.history {
            u64(&mut b, e.generation);
            u64(&mut b, e.first_seq);
            text(&mut b, &e.site);
        }
        match &self.last_failover {
            None => u32(&mut b, 0),
            Some(f) => {
                u32(&mut b, 1);
                text(&mut b, &f.kind);
                u64(&mut b, f.generation);
                u64(&mut b, f.first_seq);
                u64(&mut b, f.at_ns);
                u64(&mut b, f.pause_ms.unwrap_or(u64::MAX));
                let lost = f.lost.as_ref();
                u64(&mut b, lost.map_or(0, |l| l.first_seq));
                u64(&mut b, lost.and_then(|l| l.last_seq).unwrap_or(0));
                u64(&mut b, lost.and_then(|l| l.after_ns).unwrap_or(0));
            }
        }
        b
    }

    pub fn decode(body: &[u8]) -> Result<RoleFacts, String> {
        let mut c = Cursor(body);
        let role = match c.u32()? {
            1 => CopyRole::Primary,
            2 => CopyRole::Secondary,
            other => return Err(format!("role {other} (1 primary, 2 secondary)")),
        };
        let resync_pending = match c.u64()? {
            0 => false,
            1 => true,
            other => return Err(format!("resync flag {other}")),
        };
        let divergence_seq = Some(c.u64()?).filter(|&s| s != 0);
        let count = c.u32()? as usize;
        if count.saturating_mul(20) > c.0.len() {
            return Err(format!("{count} generations do not fit the body"));
        }
        let mut history = Vec::with_capacity(count);
        for _ in 0..count {
            let generation = c.u64()?;
            let first_seq = c.u64()?;
            let site = c.text()?;
            if let Some(prev) = history
                .last()
                .map(|e: &GenerationEntry| (e.generation, e.first_seq))
            {
                if generation <= prev.0 || first_seq < prev.1 {
                    return Err(format!(
                        "generation {generation} from seq {first_seq} does not follow generation {} from seq {}",
                        prev.0, prev.1
                    ));
                }
            }
            history.push(GenerationEntry {
                generation,
                first_seq,
                site,
            });
        }
        let last_failover = match c.u32()? {
            0 => None,
            1 => {
                let kind = c.text()?;
                let generation = c.u64()?;
                let first_seq = c.u64()?;
                let at_ns = c.u64()?;
                let pause_ms = Some(c.u64()?).filter(|&p| p != u64::MAX);
                let lost_first = c.u64()?;
                let lost_last = c.u64()?;
                let lost_after = c.u64()?;
                Some(FailoverRecord {
                    kind,
                    generation,
                    first_seq,
                    at_ns,
                    pause_ms,
                    lost: (lost_first != 0).then(|| LostRange {
                        first_seq: lost_first,
                        last_seq: Some(lost_last).filter(|&s| s != 0),
                        after_ns: Some(lost_after).filter(|&s| s != 0),
                    }),
                })
            }
            other => return Err(format!("failover flag {other}")),
        };
        if !c.0.is_empty() {
            return Err(format!("{} bytes after the last field", c.0.len()));
        }
        Ok(RoleFacts {
            role,
            history,
            resync_pending,
            divergence_seq,
            last_failover,
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "body ends early ({} bytes left, {n} needed)",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn text(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?.to_vec();
        String::from_utf8(bytes).map_err(|_| "a site name is not UTF-8".to_string())
    }
}

/// Compares this copy's history and last seq with its peer's (DRBD's generation UUIDs,
/// with seqs): what this copy is relative to the other.
pub fn compare(
    ours: &[GenerationEntry],
    our_last: u64,
    theirs: &[GenerationEntry],
    their_last: u64,
) -> HistoryComparison {
    let by_seq = || match our_last.cmp(&their_last) {
        std::cmp::Ordering::Equal => HistoryComparison::UpToDate,
        std::cmp::Ordering::Less => HistoryComparison::Behind,
        std::cmp::Ordering::Greater => HistoryComparison::Ahead,
    };
    // A copy that never met a primary (no history) holds nothing of its own only if it is
    // empty, or if it was a remote copy before histories existed (bound by source id).
    if ours.is_empty() || theirs.is_empty() {
        return by_seq();
    }
    if ours[0] != theirs[0] {
        return HistoryComparison::Diverged {
            seq: 1,
            reason: format!(
                "different lineages: generation {} began at site {:?} here, at site {:?} there",
                ours[0].generation, ours[0].site, theirs[0].site
            ),
        };
    }
    let common = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
    match (ours.get(common), theirs.get(common)) {
        (None, None) => by_seq(),
        (None, Some(next)) => {
            if our_last >= next.first_seq {
                HistoryComparison::Diverged {
                    seq: next.first_seq,
                    reason: format!(
                        "this copy holds records from seq {} on that generation {} (site {:?}) replaced",
                        next.first_seq, next.generation, next.site
                    ),
                }
            } else {
                by_seq()
            }
        }
        (Some(next), None) => {
            if their_last >= next.first_seq {
                HistoryComparison::Diverged {
                    seq: next.first_seq,
                    reason: format!(
                        "the peer holds records from seq {} on that generation {} (site {:?}) here replaced",
                        next.first_seq, next.generation, next.site
                    ),
                }
            } else {
                by_seq()
            }
        }
        (Some(a), Some(b)) => HistoryComparison::Diverged {
            seq: a.first_seq.min(b.first_seq),
            reason: format!(
                "both copies were promoted after generation {}: generation {} at site {:?} from seq {} here, generation {} at site {:?} from seq {} there",
                common, a.generation, a.site, a.first_seq, b.generation, b.site, b.first_seq
            ),
        },
    }
}

/// A group's role at run time: the persisted facts, a watch of the role for the data path
/// (split-link connections, the shipper, the receiver) and the planned failover's drain.
///
/// `facts` is a leaf lock: nothing else is taken while it is held, and it is never held
/// across I/O other than writing `role.state`.
pub struct GroupRole {
    dir: PathBuf,
    site: String,
    fencing: &'static str,
    facts: Mutex<RoleFacts>,
    role: watch::Sender<CopyRole>,
    /// A planned failover is draining this copy: new host changes wait (not refused).
    draining: watch::Sender<bool>,
    /// What the replication link last learnt of the peer.
    peer: Mutex<PeerView>,
    /// Shared by each journal append of host changes, exclusive for a demotion: once the
    /// demotion holds it, no host change is half-way into the journal.
    append_gate: std::sync::RwLock<()>,
}

/// The peer as the last replication link saw it.
#[derive(Clone, Debug, Default)]
pub struct PeerView {
    pub role: Option<CopyRole>,
    pub generation: Option<u64>,
    pub comparison: Option<HistoryComparison>,
}

impl GroupRole {
    /// Loads `role.state` from the group's directory, or starts the copy's history: a
    /// local group (`primary_default`) is primary in generation 1, a remote copy secondary.
    pub fn open(
        dir: &Path,
        primary_default: bool,
        site: &str,
        fencing: &'static str,
    ) -> Result<GroupRole, ApplianceError> {
        let facts = match state_file::load_body(dir, StateKind::Role)? {
            Some(body) => RoleFacts::decode(&body).map_err(|what| ApplianceError::Corruption {
                path: state_file::path(dir, StateKind::Role).display().to_string(),
                what,
            })?,
            None => {
                let facts = RoleFacts::new(primary_default, site);
                state_file::store_raw_body(dir, StateKind::Role, &facts.encode())?;
                facts
            }
        };
        let (role, _) = watch::channel(facts.role);
        let (draining, _) = watch::channel(false);
        Ok(GroupRole {
            dir: dir.to_path_buf(),
            site: site.to_string(),
            fencing,
            facts: Mutex::new(facts),
            role,
            draining,
            peer: Mutex::new(PeerView::default()),
            append_gate: std::sync::RwLock::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoleFacts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn role(&self) -> CopyRole {
        *self.role.borrow()
    }

    pub fn is_primary(&self) -> bool {
        self.role() == CopyRole::Primary
    }

    pub fn subscribe(&self) -> watch::Receiver<CopyRole> {
        self.role.subscribe()
    }

    pub fn facts(&self) -> RoleFacts {
        self.lock().clone()
    }

    pub fn history(&self) -> Vec<GenerationEntry> {
        self.lock().history.clone()
    }

    pub fn lineage(&self, last_seq: u64) -> Lineage {
        Lineage {
            history: to_wire(&self.lock().history),
            last_seq,
        }
    }

    /// Changes the facts with `change` and persists them before anyone sees the change.
    pub fn update(&self, change: impl FnOnce(&mut RoleFacts)) -> Result<RoleFacts, ApplianceError> {
        let mut facts = self.lock();
        let mut next = facts.clone();
        change(&mut next);
        state_file::store_raw_body(&self.dir, StateKind::Role, &next.encode())?;
        *facts = next.clone();
        drop(facts);
        self.role.send_if_modified(|r| {
            let changed = *r != next.role;
            *r = next.role;
            changed
        });
        Ok(next)
    }

    /// Taken (shared) around each append of host changes; never across an await.
    pub fn append_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.append_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken by a demotion: no host change is being appended while it is held.
    pub fn exclusive_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.append_gate.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.send_replace(on);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Waits while a planned failover drains this copy; `false` if this copy was demoted
    /// meanwhile (its changes must then be refused, never journaled).
    pub async fn wait_not_draining(&self) -> bool {
        let mut draining = self.draining.subscribe();
        let _ = draining.wait_for(|d| !*d).await;
        self.is_primary()
    }

    pub fn note_peer(&self, view: PeerView) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    pub fn status(&self) -> RoleStatus {
        let facts = self.facts();
        let peer = self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        RoleStatus {
            role: facts.role,
            site: self.site.clone(),
            generation: facts.generation(),
            history: facts.history,
            peer_role: peer.role,
            peer_generation: peer.generation,
            comparison: peer.comparison,
            divergence_seq: facts.divergence_seq,
            last_failover: facts.last_failover,
            draining: self.is_draining(),
            fencing: self.fencing.to_string(),
        }
    }
}

pub fn to_wire(history: &[GenerationEntry]) -> Vec<WireGeneration> {
    history
        .iter()
        .map(|e| WireGeneration {
            generation: e.generation,
            first_seq: e.first_seq,
            site: e.site.clone(),
        })
        .collect()
}

pub fn from_wire(history: &[WireGeneration]) -> Vec<GenerationEntry> {
    history
        .iter()
        .map(|e| GenerationEntry {
            generation: e.generation,
            first_seq: e.first_seq,
            site: e.site.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(generation: u64, first_seq: u64, site: &str) -> GenerationEntry {
        GenerationEntry {
            generation,
            first_seq,
            site: site.into(),
        }
    }

    #[test]
    fn role_facts_round_trip_and_refuse_a_bad_history() {
        let mut facts = RoleFacts::new(true, "A");
        facts.push_generation(e(2, 101, "B"));
        facts.role = CopyRole::Secondary;
        facts.resync_pending = true;
        facts.divergence_seq = Some(101);
        facts.last_failover = Some(FailoverRecord {
            kind: "planned".into(),
            generation: 2,
            first_seq: 101,
            at_ns: 5,
            pause_ms: Some(12),
            lost: Some(LostRange {
                first_seq: 101,
                last_seq: None,
                after_ns: Some(9),
            }),
        });
        let body = facts.encode();
        assert_eq!(RoleFacts::decode(&body).expect("decodes"), facts);
        assert!(RoleFacts::decode(&body[..body.len() - 1]).is_err());
        let mut bad = RoleFacts::new(true, "A");
        bad.history.push(e(1, 5, "B"));
        assert!(
            RoleFacts::decode(&bad.encode()).is_err(),
            "generations must grow"
        );
        let mut bytes = facts.encode();
        bytes[0] = 7;
        assert!(RoleFacts::decode(&bytes).unwrap_err().contains("role 7"));
    }

    #[test]
    fn histories_compare_as_up_to_date_behind_ahead_or_diverged() {
        let a1 = vec![e(1, 1, "A")];
        let a2 = vec![e(1, 1, "A"), e(2, 101, "B")];
        assert_eq!(compare(&a1, 50, &a1, 50), HistoryComparison::UpToDate);
        assert_eq!(compare(&a1, 40, &a1, 50), HistoryComparison::Behind);
        assert_eq!(compare(&a1, 60, &a1, 50), HistoryComparison::Ahead);
        // Planned failover at 100: the old primary holds exactly what preceded generation 2.
        assert_eq!(compare(&a1, 100, &a2, 130), HistoryComparison::Behind);
        assert_eq!(compare(&a2, 130, &a1, 100), HistoryComparison::Ahead);
        // Unplanned: the old primary wrote 101..=120 that generation 2 replaced.
        assert!(matches!(
            compare(&a1, 120, &a2, 130),
            HistoryComparison::Diverged { seq: 101, .. }
        ));
        assert!(matches!(
            compare(&a2, 130, &a1, 120),
            HistoryComparison::Diverged { seq: 101, .. }
        ));
        // Both promoted: split brain from the lower first seq.
        let a2c = vec![e(1, 1, "A"), e(2, 90, "C")];
        assert!(matches!(
            compare(&a2, 130, &a2c, 95),
            HistoryComparison::Diverged { seq: 90, .. }
        ));
        // Unrelated groups of the same name.
        assert!(matches!(
            compare(&a1, 1, &[e(1, 1, "Z")], 1),
            HistoryComparison::Diverged { seq: 1, .. }
        ));
        // A fresh remote copy adopts.
        assert_eq!(compare(&[], 0, &a2, 130), HistoryComparison::Behind);
    }
}
