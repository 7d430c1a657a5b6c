//! Invariant checks over a recorded run (etcd-semantics §12).
use std::collections::{BTreeMap, HashMap, HashSet};

use super::history::{Input, Operation, Output};
use super::lease::{ClockJump, LeaseLife, LeaseStep, early_expiry_allowance};
use super::linearizability::{self, Verdict};
use super::workload::WatchLog;

/// A key as dumped from a member: `(key, value, mod_revision, create_revision, version)`.
pub type KvRow = (String, String, i64, i64, i64);

/// Everything a run observed, ready to be checked (shared by [`crate::run_scenario`] and
/// `flotilla chaos`).
#[derive(Debug)]
pub struct Observed<'a> {
    /// The client history, final reads included.
    pub history: &'a [Operation],
    /// Every member's keys after the heal (the first one gives the final state).
    pub dumps: &'a [Vec<KvRow>],
    /// What each watcher saw.
    pub logs: &'a [WatchLog],
    /// The revision the watchers had to reach.
    pub final_rev: i64,
    /// `(member, term, leader)` views.
    pub samples: &'a [(usize, u64, Option<u64>)],
    /// Lease lives, when the run had lease clients.
    pub leases: Option<&'a [LeaseLife]>,
    /// Lease clock jumps the nemesis made (F15; empty otherwise).
    pub clock_jumps: &'a [ClockJump],
}

/// Every invariant check over what a run observed, in report order.
pub fn check_all(o: &Observed<'_>) -> Vec<Check> {
    let final_kv: Vec<(String, String, i64)> = o
        .dumps
        .first()
        .map(|d| {
            d.iter()
                .filter(|(k, ..)| k.starts_with(super::workload::PREFIX))
                .map(|(k, v, r, _, _)| (k.clone(), v.clone(), *r))
                .collect()
        })
        .unwrap_or_default();
    let mut checks = vec![
        linearizable(o.history),
        no_lost_writes(o.history, &final_kv),
        monotonic_revisions(o.history),
        watch_guarantees(o.history, o.logs, o.final_rev),
        leader_ids_move_forward(o.samples),
        converged(o.dumps),
    ];
    if let Some(l) = o.leases {
        checks.push(lease_safety(l, o.clock_jumps));
    }
    checks
}

/// Result of one invariant.
#[derive(Debug, Clone)]
pub struct Check {
    /// Invariant name.
    pub name: &'static str,
    /// `Err(explanation)` on violation.
    pub result: Result<String, String>,
}

/// I1: per-key linearizability of the history.
pub fn linearizable(history: &[Operation]) -> Check {
    let result = match linearizability::check(history) {
        Verdict::Ok => Ok(format!("{} operations", history.len())),
        Verdict::Inconclusive { key } => Err(format!(
            "search budget exhausted on key {key:?} (inconclusive)"
        )),
        Verdict::Violation { key, history } => {
            let mut s = format!("key {key:?} is not linearizable; minimal failing history:\n");
            for op in history {
                s.push_str(&serde_json::to_string(&op).unwrap_or_default());
                s.push('\n');
            }
            Err(s)
        }
    };
    Check {
        name: "linearizability",
        result,
    }
}

/// I2: every acknowledged write (or a later one) is in the final state, and every value read or
/// present maps to a write attempt on that key.
pub fn no_lost_writes(history: &[Operation], final_kv: &[(String, String, i64)]) -> Check {
    let mut attempts: HashMap<&str, &str> = HashMap::new();
    let mut acked: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
    for op in history {
        if let Some(v) = op.input.written() {
            attempts.insert(v, op.input.key());
        }
        let rev = match &op.output {
            Output::Put { revision } => Some(*revision),
            Output::Cas {
                succeeded: true,
                revision,
            } => Some(*revision),
            _ => None,
        };
        if let (Some(r), Some(v)) = (rev, op.input.written()) {
            let e = acked.entry(op.input.key()).or_insert((r, v));
            if r > e.0 {
                *e = (r, v);
            }
        }
    }
    let finals: HashMap<&str, (&str, i64)> = final_kv
        .iter()
        .map(|(k, v, r)| (k.as_str(), (v.as_str(), *r)))
        .collect();
    let mut problems = Vec::new();
    for (k, (rev, v)) in &acked {
        match finals.get(k) {
            None => problems.push(format!(
                "{k}: acknowledged write {v:?}@{rev} lost (key absent)"
            )),
            Some((_, frev)) if frev < rev => problems.push(format!(
                "{k}: final mod revision {frev} older than acknowledged write {v:?}@{rev}"
            )),
            _ => {}
        }
    }
    for (k, v, _) in final_kv {
        if attempts.get(v.as_str()) != Some(&k.as_str()) {
            problems.push(format!("{k}: final value {v:?} was never written to it"));
        }
    }
    for op in history {
        if let (Input::Get { key, .. }, Output::Get { value: Some(v), .. }) =
            (&op.input, &op.output)
            && attempts.get(v.as_str()) != Some(&key.as_str())
        {
            problems.push(format!("{key}: read {v:?} that was never written to it"));
        }
    }
    Check {
        name: "no lost acknowledged writes",
        result: if problems.is_empty() {
            Ok(format!("{} keys with acknowledged writes", acked.len()))
        } else {
            Err(problems.join("\n"))
        },
    }
}

/// I3: per client and member, linearizable responses never show a lower header revision than
/// an earlier one; nor do serializable reads among themselves; `mod_revision <= revision`.
pub fn monotonic_revisions(history: &[Operation]) -> Check {
    let mut ops: Vec<&Operation> = history.iter().collect();
    ops.sort_by_key(|o| o.call);
    let mut last: HashMap<(u64, usize, bool), (i64, u64)> = HashMap::new();
    let mut problems = Vec::new();
    for op in ops {
        let Some(rev) = op.output.revision() else {
            continue;
        };
        if let Output::Get { mod_revision, .. } = &op.output
            && *mod_revision > rev
        {
            problems.push(format!(
                "mod revision {mod_revision} > header revision {rev}: {op:?}"
            ));
        }
        let serializable = matches!(
            op.input,
            Input::Get {
                serializable: true,
                ..
            }
        );
        let slot = last
            .entry((op.client, op.member, serializable))
            .or_insert((rev, op.ret));
        // Only responses that came back before this call are ordered with it.
        if slot.1 <= op.call && rev < slot.0 {
            problems.push(format!(
                "client {} on member {}: revision went from {} to {rev}",
                op.client, op.member, slot.0
            ));
        }
        if rev >= slot.0 {
            *slot = (rev, op.ret);
        }
    }
    Check {
        name: "monotonic revisions",
        result: if problems.is_empty() {
            Ok("per client and member".to_owned())
        } else {
            Err(problems.join("\n"))
        },
    }
}

/// I4: each watcher's events are strictly ordered by revision, unique, contiguous (watchers
/// cover every key, so every revision appears) except across compaction skips; events on the
/// workload's keys match the written values and agree between watchers.
pub fn watch_guarantees(history: &[Operation], logs: &[WatchLog], final_rev: i64) -> Check {
    let mut written: HashMap<&str, &str> = HashMap::new();
    for op in history {
        if let Some(v) = op.input.written() {
            written.insert(v, op.input.key());
        }
    }
    let mut by_rev: HashMap<i64, (String, String)> = HashMap::new();
    let mut problems = Vec::new();
    for (w, log) in logs.iter().enumerate() {
        let skips: HashSet<i64> = log.skips.iter().map(|(_, to)| *to).collect();
        let mut prev = 1i64; // revision 1 is the empty store.
        let mut keys_at_prev: HashSet<&str> = HashSet::new();
        for ev in &log.events {
            if ev.revision == prev && keys_at_prev.insert(ev.key.as_str()) {
                // Another key of the same multi-key revision (a Txn or a lease revoke).
                continue;
            }
            if ev.revision != prev {
                keys_at_prev.clear();
                keys_at_prev.insert(ev.key.as_str());
            }
            if ev.revision <= prev {
                problems.push(format!(
                    "watcher {w}: revision {} after {prev}",
                    ev.revision
                ));
            } else if ev.revision != prev + 1
                && !skips.iter().any(|s| *s > prev && *s <= ev.revision)
            {
                problems.push(format!("watcher {w}: gap from {prev} to {}", ev.revision));
            }
            prev = prev.max(ev.revision);
            if !ev.key.starts_with(super::workload::PREFIX) {
                // Leases and other clients: only ordering and contiguity apply.
                continue;
            }
            if written.get(ev.value.as_str()) != Some(&ev.key.as_str()) {
                problems.push(format!("watcher {w}: event {ev:?} matches no write"));
            }
            match by_rev.get(&ev.revision) {
                Some(other) if *other != (ev.key.clone(), ev.value.clone()) => {
                    problems.push(format!(
                        "watchers disagree at revision {}: {other:?} vs {ev:?}",
                        ev.revision
                    ))
                }
                _ => {
                    by_rev.insert(ev.revision, (ev.key.clone(), ev.value.clone()));
                }
            }
        }
        if prev < final_rev {
            problems.push(format!(
                "watcher {w}: stopped at {prev}, store at {final_rev}"
            ));
        }
    }
    // Acknowledged writes appear at their revision in every watcher that covered it.
    for op in history {
        let rev = match &op.output {
            Output::Put { revision }
            | Output::Cas {
                succeeded: true,
                revision,
            } => *revision,
            _ => continue,
        };
        if let (Some((k, v)), Some(val)) = (by_rev.get(&rev), op.input.written())
            && (k != op.input.key() || v != val)
        {
            problems.push(format!(
                "revision {rev}: acknowledged {}={val} but watchers saw {k}={v}",
                op.input.key()
            ));
        }
    }
    problems.truncate(20);
    Check {
        name: "watch guarantees",
        result: if problems.is_empty() {
            Ok(format!(
                "{} watchers, {} events, {} resumes, {} compaction skips",
                logs.len(),
                logs.iter().map(|l| l.events.len()).sum::<usize>(),
                logs.iter().map(|l| l.resumes).sum::<u64>(),
                logs.iter().map(|l| l.skips.len()).sum::<usize>()
            ))
        } else {
            Err(problems.join("\n"))
        },
    }
}

/// I5 (observable part). openraft 0.9 runs in its default "advanced leader id" mode: a leader
/// is identified by `(term, node id)` and a vote for a greater id replaces a vote for a smaller
/// one in the same term, so two members may lead one after the other within a term (standard
/// Raft's "one leader per term" needs its `single-term-leader` feature). What must hold is that
/// every member's view of the leader id only moves forward, so the check is that, per member,
/// `(term, leader)` never decreases; terms that saw several leaders are counted in the summary.
pub fn leader_ids_move_forward(samples: &[(usize, u64, Option<u64>)]) -> Check {
    let mut last: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let mut leaders: BTreeMap<u64, HashSet<u64>> = BTreeMap::new();
    let mut bad = Vec::new();
    for (member, term, leader) in samples {
        let Some(l) = leader else { continue };
        leaders.entry(*term).or_default().insert(*l);
        if let Some(prev) = last.get(member)
            && (*term, *l) < *prev
        {
            bad.push(format!(
                "member {member}: leader went back from (term {}, node {}) to (term {term}, node {l})",
                prev.0, prev.1
            ));
        }
        last.insert(*member, (*term, *l));
    }
    let shared = leaders.values().filter(|ls| ls.len() > 1).count();
    Check {
        name: "leader ids move forward",
        result: if bad.is_empty() {
            Ok(format!(
                "{} terms ({shared} with more than one leader id), {} samples",
                leaders.len(),
                samples.len()
            ))
        } else {
            Err(bad.join("\n"))
        },
    }
}

/// I6: identical contents on every member after heal.
pub fn converged(dumps: &[Vec<KvRow>]) -> Check {
    let result = match dumps.split_first() {
        Some((first, rest)) => {
            if let Some((i, d)) = rest.iter().enumerate().find(|(_, d)| *d != first) {
                let diff: Vec<_> = first
                    .iter()
                    .zip(d.iter())
                    .filter(|(a, b)| a != b)
                    .take(3)
                    .collect();
                Err(format!(
                    "member {} differs from member 0 ({} vs {} keys): {diff:?}",
                    i + 1,
                    d.len(),
                    first.len()
                ))
            } else {
                Ok(format!("{} members, {} keys", dumps.len(), first.len()))
            }
        }
        None => Err("no member to compare".to_owned()),
    };
    Check {
        name: "convergence",
        result,
    }
}

/// I7: a leased key is never gone before the TTL has run from the last renewal the store
/// acknowledged before the observation (the leader counts from when it saw the renewal,
/// which is after its call time), and a lease left to lapse is eventually revoked. With lease
/// clock jumps (F15) the TTL is the serving leader's: an expiry may come early by as much as
/// one member's clock jumped forward meanwhile ([`early_expiry_allowance`]), no more.
pub fn lease_safety(lives: &[LeaseLife], jumps: &[ClockJump]) -> Check {
    let mut observations = 0usize;
    let mut expired = 0usize;
    let mut problems = Vec::new();
    for life in lives {
        let ttl_ns = u64::try_from(life.ttl).unwrap_or(0) * 1_000_000_000;
        // (call, ret) of every acknowledged renewal; the grant finished before anything else.
        let mut renewals: Vec<(u64, u64)> = Vec::new();
        for step in &life.steps {
            let gone = match step {
                LeaseStep::Granted { call } => {
                    renewals.push((*call, 0));
                    None
                }
                LeaseStep::Renewed { call, ret } => {
                    renewals.push((*call, *ret));
                    None
                }
                LeaseStep::Read { present: true, .. } => {
                    observations += 1;
                    None
                }
                LeaseStep::Read {
                    call,
                    ret,
                    present: false,
                }
                | LeaseStep::Gone { call, ret } => Some((*call, *ret)),
                LeaseStep::Expired {
                    last_renewal,
                    gone_at,
                } => {
                    expired += 1;
                    if gone_at.is_none() {
                        problems.push(format!(
                            "lease {:x}: never revoked after renewals stopped at {:.3}s",
                            life.id,
                            *last_renewal as f64 / 1e9
                        ));
                    }
                    None
                }
            };
            let Some((call, ret)) = gone else { continue };
            observations += 1;
            let last = renewals
                .iter()
                .filter(|(_, r)| *r <= call)
                .map(|(c, _)| *c)
                .max()
                .unwrap_or(0);
            let allowance = early_expiry_allowance(jumps, last, ret);
            let allowed_from = (last + ttl_ns).saturating_sub(allowance);
            if ret < allowed_from {
                problems.push(format!(
                    "lease {:x} (TTL {} s): its key was gone by {:.3}s, but a renewal called at {:.3}s was acknowledged (expiry allowed from {:.3}s, clock jumps included)",
                    life.id,
                    life.ttl,
                    ret as f64 / 1e9,
                    last as f64 / 1e9,
                    allowed_from as f64 / 1e9
                ));
            }
        }
    }
    Check {
        name: "lease safety (I7)",
        result: if problems.is_empty() {
            Ok(format!(
                "{} leases, {observations} observations, {expired} lapsed and revoked",
                lives.len()
            ))
        } else {
            Err(problems.join("\n"))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WatchEvent;

    fn put(client: u64, call: u64, key: &str, value: &str, revision: i64) -> Operation {
        Operation {
            client,
            member: 0,
            call,
            ret: call + 5,
            input: Input::Put {
                key: key.into(),
                value: value.into(),
            },
            output: Output::Put { revision },
        }
    }

    #[test]
    fn lost_and_invented_writes_are_reported() {
        let h = vec![put(1, 0, "a", "v1", 2), put(1, 10, "a", "v2", 3)];
        let ok = vec![("a".to_owned(), "v2".to_owned(), 3)];
        assert!(no_lost_writes(&h, &ok).result.is_ok());
        // The last acknowledged write is gone: the member kept an older value.
        let lost = vec![("a".to_owned(), "v1".to_owned(), 2)];
        assert!(no_lost_writes(&h, &lost).result.is_err());
        assert!(no_lost_writes(&h, &[]).result.is_err());
        let invented = vec![("a".to_owned(), "zz".to_owned(), 9)];
        assert!(no_lost_writes(&h, &invented).result.is_err());
    }

    #[test]
    fn revisions_going_backwards_are_reported() {
        let h = vec![put(1, 0, "a", "v1", 5), put(1, 10, "b", "v2", 4)];
        assert!(monotonic_revisions(&h).result.is_err());
        let h = vec![put(1, 0, "a", "v1", 4), put(1, 10, "b", "v2", 5)];
        assert!(monotonic_revisions(&h).result.is_ok());
    }

    fn ev(revision: i64, key: &str, value: &str) -> WatchEvent {
        WatchEvent {
            revision,
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn watch_gaps_reorders_and_duplicates_are_reported() {
        let h = vec![
            put(1, 0, "fk/a", "v1", 2),
            put(1, 10, "fk/a", "v2", 3),
            put(1, 20, "fk/b", "v3", 4),
        ];
        let good = WatchLog {
            events: vec![
                ev(2, "fk/a", "v1"),
                ev(3, "fk/a", "v2"),
                ev(4, "fk/b", "v3"),
            ],
            ..WatchLog::default()
        };
        assert!(
            watch_guarantees(&h, std::slice::from_ref(&good), 4)
                .result
                .is_ok()
        );
        let gap = WatchLog {
            events: vec![ev(2, "fk/a", "v1"), ev(4, "fk/b", "v3")],
            ..WatchLog::default()
        };
        assert!(watch_guarantees(&h, &[gap], 4).result.is_err());
        // The same gap is fine when a compaction forced the watcher past revision 3.
        let skipped = WatchLog {
            events: vec![ev(2, "fk/a", "v1"), ev(4, "fk/b", "v3")],
            skips: vec![(2, 4)],
            resumes: 1,
        };
        assert!(watch_guarantees(&h, &[skipped], 4).result.is_ok());
        let dup = WatchLog {
            events: vec![
                ev(2, "fk/a", "v1"),
                ev(3, "fk/a", "v2"),
                ev(3, "fk/a", "v2"),
                ev(4, "fk/b", "v3"),
            ],
            ..WatchLog::default()
        };
        assert!(watch_guarantees(&h, &[dup], 4).result.is_err());
        let wrong = WatchLog {
            events: vec![
                ev(2, "fk/a", "v1"),
                ev(3, "fk/a", "v3"),
                ev(4, "fk/b", "v3"),
            ],
            ..WatchLog::default()
        };
        assert!(watch_guarantees(&h, &[wrong], 4).result.is_err());
        let short = WatchLog {
            events: vec![ev(2, "fk/a", "v1")],
            ..WatchLog::default()
        };
        assert!(watch_guarantees(&h, &[short], 4).result.is_err());
    }

    #[test]
    fn a_leader_id_going_back_and_diverged_members_are_reported() {
        assert!(
            leader_ids_move_forward(&[(0, 1, Some(7)), (1, 1, Some(7)), (2, 2, Some(9))])
                .result
                .is_ok()
        );
        // Two leader ids in one term, seen in their order: allowed in openraft's mode.
        assert!(
            leader_ids_move_forward(&[(0, 1, Some(7)), (1, 1, Some(9)), (0, 1, Some(9))])
                .result
                .is_ok()
        );
        assert!(
            leader_ids_move_forward(&[(0, 1, Some(9)), (0, 1, Some(7))])
                .result
                .is_err()
        );
        assert!(
            leader_ids_move_forward(&[(0, 2, Some(1)), (0, 1, Some(9))])
                .result
                .is_err()
        );
        let a: Vec<KvRow> = vec![("k".into(), "v".into(), 2, 2, 1)];
        let b: Vec<KvRow> = vec![("k".into(), "w".into(), 3, 2, 2)];
        assert!(converged(&[a.clone(), a.clone()]).result.is_ok());
        assert!(converged(&[a, b]).result.is_err());
    }

    #[test]
    fn lease_safety_flags_an_early_expiry_and_a_lease_never_revoked() {
        use crate::lease::{LeaseLife, LeaseStep};
        let s = 1_000_000_000u64;
        let ok = LeaseLife {
            id: 1,
            ttl: 2,
            steps: vec![
                LeaseStep::Granted { call: 0 },
                LeaseStep::Renewed {
                    call: s,
                    ret: s + 10,
                },
                LeaseStep::Read {
                    call: s + 20,
                    ret: s + 30,
                    present: true,
                },
                LeaseStep::Expired {
                    last_renewal: s,
                    gone_at: Some(4 * s),
                },
            ],
        };
        assert!(lease_safety(std::slice::from_ref(&ok), &[]).result.is_ok());
        let mut early = ok.clone();
        early.steps[2] = LeaseStep::Read {
            call: 2 * s,
            ret: 2 * s + 10,
            present: false,
        };
        assert!(
            lease_safety(std::slice::from_ref(&early), &[])
                .result
                .is_err()
        );
        // 1 s early: explained by one member's clock jumping 1.2 s forward after the renewal,
        // not by a jump before it, a backward one, or 0.6 s on each of two members.
        let jump = |at: u64, member: usize, delta_ms: i64| crate::lease::ClockJump {
            at,
            member,
            delta_ms,
        };
        let early = std::slice::from_ref(&early);
        assert!(
            lease_safety(early, &[jump(s + s / 2, 0, 1200)])
                .result
                .is_ok()
        );
        assert!(lease_safety(early, &[jump(s / 2, 0, 1200)]).result.is_err());
        assert!(
            lease_safety(early, &[jump(s + s / 2, 0, -1200)])
                .result
                .is_err()
        );
        let split = [jump(s + s / 2, 0, 600), jump(s + s / 2, 1, 600)];
        assert!(lease_safety(early, &split).result.is_err());
        let both = [jump(s + s / 4, 1, 600), jump(s + s / 2, 1, 600)];
        assert!(lease_safety(early, &both).result.is_ok());
        let mut never = ok;
        never.steps[3] = LeaseStep::Expired {
            last_renewal: s,
            gone_at: None,
        };
        assert!(lease_safety(&[never], &[]).result.is_err());
    }
}
