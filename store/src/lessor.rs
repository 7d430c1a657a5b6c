//! Leader-side lease expiry. Only the leader measures TTLs (wall-clock via `tokio::time`);
//! an expired lease is revoked through Raft like a client revoke. A new leader starts every
//! lease's countdown afresh (etcd's `Promote`), so unavailability never expires a lease.
//!
//! Clock bounds (F15): a TTL is measured on the serving leader's clock only. If that clock
//! jumps forward by `J` while a lease counts down, the lease expires up to `J` early in real
//! time (and a backward jump delays its expiry by the jump); other members' clocks do not
//! matter until one of them is promoted, which restarts every countdown. Fault tests move the
//! clock through [`FaultHooks::clock_offset_ms`](crate::FaultHooks::clock_offset_ms).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::{Duration, Instant};

#[derive(Debug, Default)]
struct LessorState {
    /// Term the expiry map belongs to (0 = not leader).
    term: u64,
    expiry: HashMap<i64, Instant>,
    revoking: HashSet<i64>,
}

/// Expiry deadlines of the leases, valid while this member leads.
#[derive(Debug, Default)]
pub(crate) struct Lessor {
    state: Mutex<LessorState>,
    /// Fault tests' clock offset in ms (F15); `None` in production.
    clock_offset_ms: Option<Arc<AtomicI64>>,
}

fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

impl Lessor {
    /// A lessor reading its clock with the fault hook's offset, if any.
    pub(crate) fn new(clock_offset_ms: Option<Arc<AtomicI64>>) -> Self {
        Self {
            state: Mutex::default(),
            clock_offset_ms,
        }
    }

    /// The lease clock: Tokio's, moved by the fault offset when one is set.
    fn now(&self) -> Instant {
        let now = Instant::now();
        let Some(offset) = &self.clock_offset_ms else {
            return now;
        };
        let ms = offset.load(Ordering::Relaxed);
        let by = Duration::from_millis(ms.unsigned_abs());
        if ms >= 0 {
            now + by
        } else {
            // Before the runtime's start the clock cannot go: it stops there.
            now.checked_sub(by).unwrap_or(now)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LessorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes a lease; returns its TTL, or 0 when it already expired (its revoke may be
    /// committing: renewing it now would promise a TTL the revoke breaks, so, like etcd, the
    /// lease counts as gone).
    pub(crate) fn keep_alive(&self, id: i64, ttl: i64) -> i64 {
        let mut st = self.lock();
        let now = self.now();
        if st.revoking.contains(&id) || st.expiry.get(&id).is_some_and(|at| *at <= now) {
            return 0;
        }
        st.expiry.insert(id, now + ttl_duration(ttl));
        ttl
    }

    /// Seconds left (the granted TTL when this leader has not started counting yet).
    pub(crate) fn remaining(&self, id: i64, ttl: i64) -> i64 {
        match self.lock().expiry.get(&id) {
            Some(at) => {
                let left = at.saturating_duration_since(self.now()).as_secs();
                i64::try_from(left).unwrap_or(i64::MAX)
            }
            None => ttl,
        }
    }

    /// Reconciles with the replicated lease set and returns the leases to revoke now.
    pub(crate) fn tick(&self, leader_term: Option<u64>, leases: &[(i64, i64)]) -> Vec<i64> {
        let mut st = self.lock();
        let Some(term) = leader_term else {
            *st = LessorState::default();
            return Vec::new();
        };
        if st.term != term {
            // New leadership: every lease gets a full TTL again.
            st.expiry.clear();
            st.revoking.clear();
            st.term = term;
        }
        let now = self.now();
        let live: HashSet<i64> = leases.iter().map(|(id, _)| *id).collect();
        st.expiry.retain(|id, _| live.contains(id));
        st.revoking.retain(|id| live.contains(id));
        for (id, ttl) in leases {
            st.expiry
                .entry(*id)
                .or_insert_with(|| now + ttl_duration(*ttl));
        }
        let expired: Vec<i64> = st
            .expiry
            .iter()
            .filter(|(id, at)| **at <= now && !st.revoking.contains(id))
            .map(|(id, _)| *id)
            .collect();
        st.revoking.extend(expired.iter().copied());
        expired
    }

    /// A revoke attempt finished (successfully or not); retry on a later tick if still live.
    pub(crate) fn revoke_done(&self, id: i64) {
        self.lock().revoking.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_only_on_leader_and_extends_on_new_term() {
        let l = Lessor::default();
        let leases = [(7, 2)];
        assert!(l.tick(None, &leases).is_empty());
        assert!(l.tick(Some(1), &leases).is_empty());
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(l.tick(Some(1), &leases).is_empty());
        // A new term restarts the countdown.
        assert!(l.tick(Some(2), &leases).is_empty());
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(l.tick(Some(2), &leases).is_empty());
        assert_eq!(l.keep_alive(7, 2), 2);
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(l.tick(Some(2), &leases).is_empty());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(l.tick(Some(2), &leases), vec![7]);
        // Not returned twice while the revoke is in flight.
        assert!(l.tick(Some(2), &leases).is_empty());
        // An expiring lease cannot be renewed any more.
        assert_eq!(l.keep_alive(7, 2), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn clock_jumps_move_expiry_by_the_jump_and_a_new_term_restarts_it() {
        let ms = Duration::from_millis;
        let clock = Arc::new(AtomicI64::new(-300));
        let l = Lessor::new(Some(clock.clone()));
        let leases = [(7, 2)];
        assert!(l.tick(Some(1), &leases).is_empty());
        tokio::time::advance(ms(500)).await;
        // Forward 1 s: the lease has 0.5 s left instead of 1.5 s.
        clock.store(700, Ordering::Relaxed);
        assert_eq!(l.remaining(7, 2), 0);
        tokio::time::advance(ms(400)).await;
        assert!(l.tick(Some(1), &leases).is_empty());
        tokio::time::advance(ms(100)).await;
        assert_eq!(l.tick(Some(1), &leases), vec![7], "1 s early in real time");
        l.revoke_done(7);

        // A new leader counts afresh on its own clock; backward 1.5 s delays the expiry.
        assert!(l.tick(Some(2), &leases).is_empty());
        assert_eq!(l.keep_alive(7, 2), 2);
        clock.store(-800, Ordering::Relaxed);
        tokio::time::advance(ms(3400)).await;
        assert!(l.tick(Some(2), &leases).is_empty());
        assert_eq!(l.remaining(7, 2), 0, "0.1 s left, whole seconds");
        tokio::time::advance(ms(200)).await;
        assert_eq!(l.tick(Some(2), &leases), vec![7]);
    }
}
