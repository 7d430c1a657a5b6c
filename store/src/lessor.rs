//! Leader-side lease expiry. Only the leader measures TTLs (wall-clock via `tokio::time`);
//! an expired lease is revoked through Raft like a client revoke. A new leader starts every
//! lease's countdown afresh (etcd's `Promote`), so unavailability never expires a lease.
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

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
}

fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

impl Lessor {
    fn lock(&self) -> std::sync::MutexGuard<'_, LessorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes a lease; returns its TTL, or 0 when it already expired (its revoke may be
    /// committing: renewing it now would promise a TTL the revoke breaks, so, like etcd, the
    /// lease counts as gone).
    pub(crate) fn keep_alive(&self, id: i64, ttl: i64) -> i64 {
        let mut st = self.lock();
        let now = Instant::now();
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
                let left = at.saturating_duration_since(Instant::now()).as_secs();
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
        let now = Instant::now();
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
}
