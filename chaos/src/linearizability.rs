//! A WGL (Wing & Gong, with Lowe's memoisation, as in porcupine) linearizability checker for
//! single-key etcd histories, run per key (P-compositionality).
//!
//! Model per key: the current value (or absent) and its mod revision. A write that failed or
//! timed out may or may not have happened: it gets a return time of +infinity, so it may be
//! linearised anywhere after its invocation, including after everything else (= never
//! observed). Serializable reads are not linearizable by definition and failed reads carry no
//! information; both are left out.
use std::collections::{BTreeMap, HashSet};

use super::history::{Input, Operation, Output};

/// Model state of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct KeyState {
    value: Option<String>,
    /// Mod revision of the current value, or a strict lower bound when `exact` is false (after
    /// a write whose revision we never learnt).
    revision: i64,
    exact: bool,
}

impl KeyState {
    const EMPTY: KeyState = KeyState {
        value: None,
        revision: 0,
        exact: true,
    };

    /// Whether a write acknowledged at `rev` may follow this state.
    fn rev_after(&self, rev: i64) -> bool {
        rev > self.revision
    }

    fn step(&self, input: &Input, output: &Output) -> Option<KeyState> {
        match (input, output) {
            (Input::Put { value, .. }, Output::Put { revision }) => {
                self.rev_after(*revision).then(|| KeyState {
                    value: Some(value.clone()),
                    revision: *revision,
                    exact: true,
                })
            }
            (Input::Put { value, .. }, Output::Unknown { .. }) => Some(KeyState {
                value: Some(value.clone()),
                revision: self.revision,
                exact: false,
            }),
            (Input::Cas { expect, value, .. }, Output::Unknown { .. }) => {
                if *expect == self.value {
                    Some(KeyState {
                        value: Some(value.clone()),
                        revision: self.revision,
                        exact: false,
                    })
                } else {
                    Some(self.clone())
                }
            }
            (
                Input::Cas { expect, value, .. },
                Output::Cas {
                    succeeded,
                    revision,
                },
            ) => {
                let holds = *expect == self.value;
                if holds != *succeeded {
                    return None;
                }
                if !holds {
                    // The header revision of a failed Txn is the store revision then, at least
                    // the key's mod revision.
                    return (!self.exact || *revision >= self.revision).then(|| self.clone());
                }
                self.rev_after(*revision).then(|| KeyState {
                    value: Some(value.clone()),
                    revision: *revision,
                    exact: true,
                })
            }
            (
                Input::Get { .. },
                Output::Get {
                    value,
                    mod_revision,
                    ..
                },
            ) => {
                if *value != self.value {
                    return None;
                }
                let rev_ok = if self.exact {
                    *mod_revision == self.revision
                } else {
                    *mod_revision > self.revision
                };
                rev_ok.then(|| KeyState {
                    value: value.clone(),
                    revision: *mod_revision,
                    exact: true,
                })
            }
            _ => None,
        }
    }
}

/// Outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's history is linearizable.
    Ok,
    /// A key's history is not; `history` is a small failing sub-history of that key.
    Violation {
        /// The key.
        key: String,
        /// A minimal (by greedy removal) non-linearizable sub-history.
        history: Vec<Operation>,
    },
    /// The search budget ran out on this key (neither proven nor refuted).
    Inconclusive {
        /// The key.
        key: String,
    },
}

/// Search steps allowed per key before giving up.
const BUDGET: u64 = 2_000_000;

/// Whether `op` takes part in the linearizability check.
fn relevant(op: &Operation) -> bool {
    !matches!(
        (&op.input, &op.output),
        (
            Input::Get {
                serializable: true,
                ..
            },
            _
        ) | (Input::Get { .. }, Output::Unknown { .. })
    )
}

/// Checks a whole history, key by key.
pub fn check(history: &[Operation]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for op in history.iter().filter(|o| relevant(o)) {
        by_key.entry(op.input.key()).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        match check_key(&ops) {
            Some(true) => {}
            Some(false) => {
                return Verdict::Violation {
                    key: key.to_owned(),
                    history: shrink(ops),
                };
            }
            None => {
                return Verdict::Inconclusive {
                    key: key.to_owned(),
                };
            }
        }
    }
    Verdict::Ok
}

/// Greedily drops operations while the rest stays non-linearizable (bounded work).
fn shrink(mut ops: Vec<Operation>) -> Vec<Operation> {
    if ops.len() > 400 {
        return ops;
    }
    let mut i = 0;
    while i < ops.len() {
        let mut fewer = ops.clone();
        fewer.remove(i);
        if check_key(&fewer) == Some(false) {
            ops = fewer;
        } else {
            i += 1;
        }
    }
    ops
}

#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
}

/// WGL search over one key. `Some(true)`: linearizable; `Some(false)`: not; `None`: budget.
fn check_key(ops: &[Operation]) -> Option<bool> {
    let n = ops.len();
    if n == 0 {
        return Some(true);
    }
    let mut events: Vec<(u64, u8, Event)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        let ret = if matches!(op.output, Output::Unknown { .. }) {
            u64::MAX
        } else {
            op.ret.max(op.call)
        };
        // Calls sort before returns at equal times: the more permissive order.
        events.push((
            op.call,
            0,
            Event {
                op: i,
                is_call: true,
            },
        ));
        events.push((
            ret,
            1,
            Event {
                op: i,
                is_call: false,
            },
        ));
    }
    events.sort_by_key(|(t, k, e)| (*t, *k, e.op));
    // Doubly linked list over event slots; slot 0 is the head sentinel.
    let len = events.len() + 1;
    let mut next: Vec<usize> = (1..=len).collect();
    let mut prev: Vec<usize> = (0..len).map(|i| i.saturating_sub(1)).collect();
    next[len - 1] = usize::MAX;
    let ev = |slot: usize| events[slot - 1].2;
    let mut ret_slot = vec![0usize; n];
    for slot in 1..len {
        let e = ev(slot);
        if !e.is_call {
            ret_slot[e.op] = slot;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, s: usize| {
        let (p, nx) = (prev[s], next[s]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, s: usize| {
        let (p, nx) = (prev[s], next[s]);
        next[p] = s;
        if nx != usize::MAX {
            prev[nx] = s;
        }
    };

    let mut state = KeyState::EMPTY;
    let mut linearized = vec![0u64; n.div_ceil(64)];
    let mut cache: HashSet<(Vec<u64>, KeyState)> = HashSet::new();
    let mut stack: Vec<(usize, KeyState)> = Vec::new();
    let mut entry = next[0];
    let mut steps = 0u64;
    while next[0] != usize::MAX {
        steps += 1;
        if steps > BUDGET {
            return None;
        }
        if entry == usize::MAX {
            // Ran off the end without meeting a return: cannot happen with paired events,
            // but treat it as a dead end.
            let (slot, s) = stack.pop()?;
            let op = ev(slot).op;
            state = s;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, ret_slot[op]);
            relink(&mut next, &mut prev, slot);
            entry = next[slot];
            continue;
        }
        let e = ev(entry);
        if e.is_call {
            let op = &ops[e.op];
            if let Some(new_state) = state.step(&op.input, &op.output) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin.clone(), new_state.clone())) {
                    stack.push((entry, state));
                    state = new_state;
                    linearized = lin;
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, ret_slot[e.op]);
                    entry = next[0];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return whose call is not linearised yet: backtrack.
            let Some((slot, s)) = stack.pop() else {
                return Some(false);
            };
            let op = ev(slot).op;
            state = s;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut next, &mut prev, ret_slot[op]);
            relink(&mut next, &mut prev, slot);
            entry = next[slot];
        }
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, call: u64, ret: u64, input: Input, output: Output) -> Operation {
        Operation {
            client,
            member: 0,
            call,
            ret,
            input,
            output,
        }
    }
    fn put(v: &str) -> Input {
        Input::Put {
            key: "k".into(),
            value: v.into(),
        }
    }
    fn get() -> Input {
        Input::Get {
            key: "k".into(),
            serializable: false,
        }
    }
    fn cas(expect: Option<&str>, v: &str) -> Input {
        Input::Cas {
            key: "k".into(),
            expect: expect.map(Into::into),
            value: v.into(),
        }
    }
    fn put_ok(r: i64) -> Output {
        Output::Put { revision: r }
    }
    fn read(v: Option<&str>, m: i64) -> Output {
        Output::Get {
            value: v.map(Into::into),
            mod_revision: m,
            revision: m.max(1),
        }
    }
    fn unknown() -> Output {
        Output::Unknown {
            error: "timeout".into(),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(1, 20, 30, get(), read(Some("a"), 2)),
            op(
                1,
                40,
                50,
                cas(Some("a"), "b"),
                Output::Cas {
                    succeeded: true,
                    revision: 3,
                },
            ),
            op(2, 60, 70, get(), read(Some("b"), 3)),
            op(
                2,
                80,
                90,
                cas(Some("a"), "c"),
                Output::Cas {
                    succeeded: false,
                    revision: 3,
                },
            ),
        ];
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn stale_read_after_acknowledged_write_is_caught() {
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(1, 20, 30, put("b"), put_ok(3)),
            // Strictly after the write of b returned, someone still reads a.
            op(2, 40, 50, get(), read(Some("a"), 2)),
        ];
        match check(&h) {
            Verdict::Violation { key, history } => {
                assert_eq!(key, "k");
                // Shrinking keeps the stale read (without its writes it reads a ghost).
                assert!(!history.is_empty() && history.len() <= 3, "{history:?}");
                assert!(history.iter().any(|o| o.call == 40), "{history:?}");
            }
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn concurrent_reads_may_see_either_value() {
        // The read overlaps the write: old or new value are both fine.
        let old = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(1, 20, 60, put("b"), put_ok(3)),
            op(2, 30, 50, get(), read(Some("a"), 2)),
        ];
        let new = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(1, 20, 60, put("b"), put_ok(3)),
            op(2, 30, 50, get(), read(Some("b"), 3)),
        ];
        assert_eq!(check(&old), Verdict::Ok);
        assert_eq!(check(&new), Verdict::Ok);
    }

    #[test]
    fn reads_must_not_go_back_in_time() {
        // Both reads overlap the write, but once one read saw b a later read cannot see a.
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(1, 20, 100, put("b"), put_ok(3)),
            op(2, 30, 40, get(), read(Some("b"), 3)),
            op(3, 50, 60, get(), read(Some("a"), 2)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn timed_out_write_may_or_may_not_have_happened() {
        let seen = vec![
            op(1, 0, 10, put("a"), unknown()),
            op(2, 100, 110, get(), read(Some("a"), 5)),
        ];
        let unseen = vec![
            op(1, 0, 10, put("a"), unknown()),
            op(2, 100, 110, get(), read(None, 0)),
        ];
        assert_eq!(check(&seen), Verdict::Ok);
        assert_eq!(check(&unseen), Verdict::Ok);
        // But once it has been observed, it cannot un-happen.
        let flicker = vec![
            op(1, 0, 10, put("a"), unknown()),
            op(2, 100, 110, get(), read(Some("a"), 5)),
            op(2, 120, 130, get(), read(None, 0)),
        ];
        assert!(matches!(check(&flicker), Verdict::Violation { .. }));
    }

    #[test]
    fn values_nobody_wrote_are_caught() {
        let h = vec![op(2, 0, 10, get(), read(Some("ghost"), 4))];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(2, 20, 30, get(), read(None, 0)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn cas_outcomes_must_match_the_state() {
        // Two create-if-absent Txns both succeeding: a double create.
        let h = vec![
            op(
                1,
                0,
                10,
                cas(None, "a"),
                Output::Cas {
                    succeeded: true,
                    revision: 2,
                },
            ),
            op(
                2,
                20,
                30,
                cas(None, "b"),
                Output::Cas {
                    succeeded: true,
                    revision: 3,
                },
            ),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
        // Concurrent: exactly one wins.
        let ok = vec![
            op(
                1,
                0,
                30,
                cas(None, "a"),
                Output::Cas {
                    succeeded: false,
                    revision: 3,
                },
            ),
            op(
                2,
                0,
                30,
                cas(None, "b"),
                Output::Cas {
                    succeeded: true,
                    revision: 3,
                },
            ),
            op(3, 40, 50, get(), read(Some("b"), 3)),
        ];
        assert_eq!(check(&ok), Verdict::Ok);
    }

    #[test]
    fn revisions_must_grow_with_real_time() {
        // Two sequential acknowledged writes whose revisions go backwards.
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(5)),
            op(1, 20, 30, put("b"), put_ok(4)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
        // A read must report the mod revision of the write it saw.
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(5)),
            op(1, 20, 30, get(), read(Some("a"), 6)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn serializable_and_failed_reads_are_not_checked() {
        let h = vec![
            op(1, 0, 10, put("a"), put_ok(2)),
            op(
                2,
                20,
                30,
                Input::Get {
                    key: "k".into(),
                    serializable: true,
                },
                read(None, 0),
            ),
            op(2, 40, 50, get(), unknown()),
        ];
        assert_eq!(check(&h), Verdict::Ok);
    }

    #[test]
    fn larger_concurrent_history_checks_quickly() {
        // 6 clients x 40 sequential writes each with overlapping windows; reads trail.
        let mut h = Vec::new();
        let mut rev = 1;
        for round in 0..40u64 {
            for c in 0..6u64 {
                rev += 1;
                let t = round * 100 + c;
                let v = format!("v{round}-{c}");
                h.push(op(c, t, t + 50, put(&v), put_ok(rev)));
            }
            let t = round * 100 + 60;
            h.push(op(
                9,
                t,
                t + 5,
                get(),
                read(Some(&format!("v{round}-5")), rev),
            ));
        }
        assert_eq!(check(&h), Verdict::Ok);
    }
}
