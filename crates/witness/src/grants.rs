//! The witness's decisions: which request gets a lease, on the witness's own clock (passed in,
//! so tests drive it), with every change that a grant depends on persisted before the grant
//! is answered.
//!
//! Per group the witness keeps the highest generation granted, the holder, when it last
//! granted (its clock) and the duration. Rules:
//! - a site other than the holder gets the lease only after `granted + D + m` (the lease
//!   rule), only with a generation *above* the group's (a new holder is a new failover
//!   generation), and never during a restart hold of another holder;
//! - the holder renews or re-acquires at its generation (or moves it up) at any time;
//! - a request below the group's generation is refused (`stale_generation`): once a site was
//!   granted generation g+1, no renewal at g succeeds;
//! - after a restart, every persisted holder keeps its group for `start + D + m` (the
//!   restart hold), since the witness forgot when it granted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::WitnessError;
use crate::grants_file::{self, StoredGrant};
use crate::lease_rule::Margin;
use crate::limits::{GROUPS_MAX, NAME_BYTES_MAX};
use crate::protocol::{RefuseReason, Reply, Request};

struct GroupLease {
    generation: u64,
    holder: Option<String>,
    duration_ms: u64,
    /// Until when (witness clock) other sites are kept out: the last grant's `D + m`, or the
    /// restart hold. `None`: nobody is kept out.
    exclusive_until: Option<Instant>,
    /// Set while the exclusion comes from a restart (for `query` and the refusal reason).
    restart_hold: bool,
}

/// Every group's lease, and where they are persisted.
pub struct Grants {
    data_dir: PathBuf,
    margin: Margin,
    duration_ms_max: u64,
    groups: BTreeMap<String, GroupLease>,
}

fn refused(
    reason: RefuseReason,
    lease: Option<&GroupLease>,
    retry: Duration,
    message: String,
) -> Reply {
    Reply::Refused {
        reason,
        holder: lease.and_then(|l| l.holder.clone()),
        generation: lease.map_or(0, |l| l.generation),
        retry_after_ms: retry.as_millis() as u64,
        message,
    }
}

/// What is wrong with a group or site name, if anything (the refusal's message).
fn name_problem(what: &str, name: &str) -> Option<String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Some(format!("{what} must be 1 to {NAME_BYTES_MAX} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Some(format!("{what} holds a control character"));
    }
    None
}

impl Grants {
    /// Loads the persisted grants; every holder found gets a restart hold from `now`.
    pub fn open(
        data_dir: PathBuf,
        margin: Margin,
        duration_ms_max: u64,
        now: Instant,
    ) -> Result<Grants, WitnessError> {
        let stored = grants_file::load(&data_dir)?;
        let mut groups = BTreeMap::new();
        for g in stored {
            let hold = g
                .holder
                .as_ref()
                .map(|_| now + margin.witness_exclusion(Duration::from_millis(g.duration_ms)));
            groups.insert(
                g.group,
                GroupLease {
                    generation: g.generation,
                    holder: g.holder,
                    duration_ms: g.duration_ms,
                    exclusive_until: hold,
                    restart_hold: hold.is_some(),
                },
            );
        }
        Ok(Grants {
            data_dir,
            margin,
            duration_ms_max,
            groups,
        })
    }

    fn persist(&self) -> Result<(), WitnessError> {
        let list: Vec<StoredGrant> = self
            .groups
            .iter()
            .map(|(id, l)| StoredGrant {
                group: id.clone(),
                generation: l.generation,
                holder: l.holder.clone(),
                duration_ms: l.duration_ms,
            })
            .collect();
        grants_file::store(&self.data_dir, &list)
    }

    /// Decides one request at `now`. `Err` is a failure to persist: the request must then
    /// be answered with an error and no grant (the caller closes the connection).
    pub fn decide(&mut self, request: &Request, now: Instant) -> Result<Reply, WitnessError> {
        match request {
            Request::Acquire {
                group,
                site,
                generation,
                duration_ms,
            } => self.grant(group, site, *generation, *duration_ms, false, now),
            Request::Renew {
                group,
                site,
                generation,
                duration_ms,
            } => self.grant(group, site, *generation, *duration_ms, true, now),
            Request::Release {
                group,
                site,
                generation,
            } => self.release(group, site, *generation),
            Request::Query { group } => Ok(self.query(group, now)),
        }
    }

    fn grant(
        &mut self,
        group: &str,
        site: &str,
        generation: u64,
        duration_ms: u64,
        renew_only: bool,
        now: Instant,
    ) -> Result<Reply, WitnessError> {
        let bad = |m: String| Ok(refused(RefuseReason::BadRequest, None, Duration::ZERO, m));
        if let Some(m) = name_problem("group", group).or_else(|| name_problem("site", site)) {
            return bad(m);
        }
        if duration_ms == 0 || duration_ms > self.duration_ms_max {
            return bad(format!(
                "duration_ms = {duration_ms}: this witness grants 1 to {} ms",
                self.duration_ms_max
            ));
        }
        if self
            .margin
            .holder_validity(Duration::from_millis(duration_ms))
            .is_none()
        {
            return bad(format!(
                "duration_ms = {duration_ms} is not longer than its margin ({} ms)",
                self.margin
                    .for_duration(Duration::from_millis(duration_ms))
                    .as_millis()
            ));
        }
        if !self.groups.contains_key(group) && self.groups.len() >= GROUPS_MAX {
            return bad(format!("this witness already holds {GROUPS_MAX} groups"));
        }
        let margin = self.margin;
        let lease = self.groups.entry(group.to_string()).or_insert(GroupLease {
            generation: 0,
            holder: None,
            duration_ms: 0,
            exclusive_until: None,
            restart_hold: false,
        });
        if let Some(until) = lease.exclusive_until {
            if until <= now {
                lease.exclusive_until = None;
                lease.restart_hold = false;
            }
        }
        let is_holder = lease.holder.as_deref() == Some(site);
        if generation < lease.generation {
            return Ok(refused(
                RefuseReason::StaleGeneration,
                Some(lease),
                Duration::ZERO,
                format!(
                    "group {group:?} is at generation {} (held by {}); generation {generation} is over",
                    lease.generation,
                    lease.holder.as_deref().unwrap_or("nobody")
                ),
            ));
        }
        if renew_only && !(is_holder && generation == lease.generation) {
            return Ok(refused(
                RefuseReason::NotHolder,
                Some(lease),
                Duration::ZERO,
                format!("site {site:?} does not hold group {group:?} at generation {generation}"),
            ));
        }
        if !is_holder {
            if let Some(until) = lease.exclusive_until {
                let reason = if lease.restart_hold {
                    RefuseReason::RestartHold
                } else {
                    RefuseReason::HeldByOther
                };
                return Ok(refused(
                    reason,
                    Some(lease),
                    until - now,
                    format!(
                        "group {group:?} is leased to {} at generation {} for up to {} ms more",
                        lease.holder.as_deref().unwrap_or("?"),
                        lease.generation,
                        (until - now).as_millis()
                    ),
                ));
            }
            if (lease.holder.is_some() || lease.generation > 0) && generation <= lease.generation {
                return Ok(refused(
                    RefuseReason::StaleGeneration,
                    Some(lease),
                    Duration::ZERO,
                    format!(
                        "group {group:?} was last granted at generation {}; another site \
                             needs a higher generation",
                        lease.generation
                    ),
                ));
            }
        }
        let changed =
            !is_holder || generation != lease.generation || duration_ms > lease.duration_ms;
        if changed {
            let before = (lease.generation, lease.holder.clone(), lease.duration_ms);
            if !is_holder || generation != lease.generation {
                lease.duration_ms = duration_ms;
            } else {
                lease.duration_ms = lease.duration_ms.max(duration_ms);
            }
            lease.generation = generation;
            lease.holder = Some(site.to_string());
            if let Err(e) = self.persist() {
                // Undo in memory: the grant was not answered, and the file still holds the
                // old facts, which is what a restart would read.
                let lease = self.groups.get_mut(group).expect("just inserted");
                (lease.generation, lease.holder, lease.duration_ms) = before;
                return Err(e);
            }
            tracing::info!(
                "group {group:?} leased to site {site:?} at generation {generation} ({duration_ms} ms)"
            );
        }
        let lease = self.groups.get_mut(group).expect("just inserted");
        // The holder's own exclusion only ever grows: a shorter renewal never shortens what
        // an earlier, longer grant promised to keep others out for.
        let until = now + margin.witness_exclusion(Duration::from_millis(duration_ms));
        lease.exclusive_until = Some(lease.exclusive_until.map_or(until, |u| u.max(until)));
        Ok(Reply::Granted {
            generation,
            duration_ms,
            margin,
        })
    }

    fn release(&mut self, group: &str, site: &str, generation: u64) -> Result<Reply, WitnessError> {
        let Some(lease) = self.groups.get_mut(group) else {
            return Ok(Reply::Released);
        };
        if lease.holder.as_deref() != Some(site) || lease.generation != generation {
            return Ok(refused(
                RefuseReason::NotHolder,
                Some(lease),
                Duration::ZERO,
                format!("site {site:?} does not hold group {group:?} at generation {generation}"),
            ));
        }
        let before = lease.holder.take();
        let (until, hold) = (lease.exclusive_until.take(), lease.restart_hold);
        lease.restart_hold = false;
        if let Err(e) = self.persist() {
            let lease = self.groups.get_mut(group).expect("present");
            lease.holder = before;
            lease.exclusive_until = until;
            lease.restart_hold = hold;
            return Err(e);
        }
        tracing::info!("group {group:?} released by site {site:?} at generation {generation}");
        Ok(Reply::Released)
    }

    fn query(&self, group: &str, now: Instant) -> Reply {
        match self.groups.get(group) {
            None => Reply::Lease {
                holder: None,
                generation: 0,
                remaining_ms: 0,
                restart_hold_ms: 0,
            },
            Some(l) => {
                let remaining = l
                    .exclusive_until
                    .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
                Reply::Lease {
                    holder: l.holder.clone(),
                    generation: l.generation,
                    remaining_ms: remaining.as_millis() as u64,
                    restart_hold_ms: if l.restart_hold {
                        remaining.as_millis() as u64
                    } else {
                        0
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(site: &str, generation: u64) -> Request {
        Request::Acquire {
            group: "g".into(),
            site: site.into(),
            generation,
            duration_ms: 1000,
        }
    }

    fn reason(r: &Reply) -> Option<RefuseReason> {
        match r {
            Reply::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn second_site_waits_for_the_exclusion_and_a_higher_generation() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut g = Grants::open(dir.path().into(), Margin::default(), 60_000, t0).unwrap();
        assert!(matches!(
            g.decide(&acquire("a", 1), t0).unwrap(),
            Reply::Granted { .. }
        ));
        // D + m = 1000 + 10 + 100 ms.
        let r = g
            .decide(&acquire("b", 2), t0 + Duration::from_millis(1109))
            .unwrap();
        assert_eq!(reason(&r), Some(RefuseReason::HeldByOther));
        let r = g
            .decide(&acquire("b", 1), t0 + Duration::from_millis(1110))
            .unwrap();
        assert_eq!(reason(&r), Some(RefuseReason::StaleGeneration));
        let r = g
            .decide(&acquire("b", 2), t0 + Duration::from_millis(1110))
            .unwrap();
        assert!(matches!(r, Reply::Granted { generation: 2, .. }), "{r:?}");
        // A's renewal at generation 1 is over for good.
        let renew = Request::Renew {
            group: "g".into(),
            site: "a".into(),
            generation: 1,
            duration_ms: 1000,
        };
        let r = g.decide(&renew, t0 + Duration::from_millis(5000)).unwrap();
        assert_eq!(reason(&r), Some(RefuseReason::StaleGeneration));
    }

    #[test]
    fn a_restart_holds_the_previous_holders_lease_for_a_full_exclusion() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut g = Grants::open(dir.path().into(), Margin::default(), 60_000, t0).unwrap();
        assert!(matches!(
            g.decide(&acquire("a", 1), t0).unwrap(),
            Reply::Granted { .. }
        ));
        drop(g);
        let t1 = t0 + Duration::from_secs(100);
        let mut g = Grants::open(dir.path().into(), Margin::default(), 60_000, t1).unwrap();
        let r = g
            .decide(&acquire("b", 2), t1 + Duration::from_millis(1109))
            .unwrap();
        assert_eq!(reason(&r), Some(RefuseReason::RestartHold));
        // The holder itself may renew meanwhile.
        let r = g
            .decide(&acquire("a", 1), t1 + Duration::from_millis(10))
            .unwrap();
        assert!(matches!(r, Reply::Granted { .. }));
        let r = g
            .decide(&acquire("b", 2), t1 + Duration::from_millis(1200))
            .unwrap();
        assert!(matches!(r, Reply::Granted { .. }), "{r:?}");
    }

    #[test]
    fn release_frees_the_group_at_once_and_keeps_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut g = Grants::open(dir.path().into(), Margin::default(), 60_000, t0).unwrap();
        g.decide(&acquire("a", 3), t0).unwrap();
        let rel = Request::Release {
            group: "g".into(),
            site: "a".into(),
            generation: 3,
        };
        assert_eq!(g.decide(&rel, t0).unwrap(), Reply::Released);
        let r = g.decide(&acquire("b", 3), t0).unwrap();
        assert_eq!(reason(&r), Some(RefuseReason::StaleGeneration));
        assert!(matches!(
            g.decide(&acquire("b", 4), t0).unwrap(),
            Reply::Granted { .. }
        ));
        drop(g);
        let g = Grants::open(dir.path().into(), Margin::default(), 60_000, t0).unwrap();
        assert_eq!(g.groups["g"].generation, 4);
        assert_eq!(g.groups["g"].holder.as_deref(), Some("b"));
    }

    #[test]
    fn limits_are_refused_as_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut g = Grants::open(dir.path().into(), Margin::default(), 5_000, t0).unwrap();
        for (site, d) in [("a", 0), ("a", 5_001), ("a", 100), ("", 1000)] {
            let r = g
                .decide(
                    &Request::Acquire {
                        group: "g".into(),
                        site: site.into(),
                        generation: 1,
                        duration_ms: d,
                    },
                    t0,
                )
                .unwrap();
            assert_eq!(reason(&r), Some(RefuseReason::BadRequest), "{site:?} {d}");
        }
    }
}
