//! Short-lived cache of what admission reads on every create: namespaces, LimitRanges and
//! ResourceQuotas (Kubernetes' admission plugins read informer caches for the same reason).
//!
//! Writes through this server invalidate it at once; writes through another server are seen
//! within [`TTL`] plus one store read. A namespace that is not cached is always read from the
//! store, so a create right after its namespace's creation works from any server.
//!
//! When an entry expires, one caller refreshes it while the others keep using the old value
//! (for at most [`STALE_LIMIT`]): with a hundred creates in flight, letting them all miss at
//! once sent a hundred reads to a store busy with their writes, and those calls were the
//! mutating benchmark's slowest (30–50 ms in the namespace and quota phases).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// How long an entry is trusted.
const TTL: Duration = Duration::from_secs(1);
/// How long an expired entry may still be served while one caller refreshes it.
const STALE_LIMIT: Duration = Duration::from_secs(2);

/// Resource types whose writes invalidate the cache.
pub(crate) const CACHED: &[&str] = &["namespaces", "limitranges", "resourcequotas"];

struct Entry {
    fetched: Instant,
    value: Arc<Vec<(Value, i64)>>,
    /// A caller was told to refresh the expired entry.
    refreshing: bool,
}

#[derive(Default)]
pub(crate) struct AdmissionCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl AdmissionCache {
    /// The cached value, or `None`: the caller reads the store and [`put`](Self::put)s it.
    /// Past [`TTL`] the first caller gets `None` and the others the old value until that
    /// caller's `put` (or [`STALE_LIMIT`], should it never come).
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Vec<(Value, i64)>>> {
        let mut entries = self.entries.lock().ok()?;
        let e = entries.get_mut(key)?;
        let age = e.fetched.elapsed();
        if age < TTL || (age < STALE_LIMIT && e.refreshing) {
            return Some(e.value.clone());
        }
        e.refreshing = true;
        None
    }

    pub(crate) fn put(&self, key: String, v: Arc<Vec<(Value, i64)>>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                key,
                Entry {
                    fetched: Instant::now(),
                    value: v,
                    refreshing: false,
                },
            );
        }
    }

    /// Drops everything after a write to one of the [`CACHED`] types.
    pub(crate) fn invalidate(&self, plural: &str) {
        if CACHED.contains(&plural)
            && let Ok(mut entries) = self.entries.lock()
        {
            entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_caller_refreshes_an_expired_entry_while_others_use_it() {
        let c = AdmissionCache::default();
        let v = Arc::new(vec![(Value::from(1), 1)]);
        assert!(c.get("k").is_none(), "absent");
        c.put("k".into(), v.clone());
        assert!(c.get("k").is_some());
        tokio::time::advance(TTL).await;
        assert!(
            c.get("k").is_none(),
            "the first caller after expiry refreshes"
        );
        assert!(
            c.get("k").is_some(),
            "the others keep the old value meanwhile"
        );
        c.put("k".into(), Arc::new(vec![(Value::from(2), 2)]));
        assert_eq!(c.get("k").map(|v| v[0].1), Some(2));
        // A refresh that never comes: after the stale limit everyone reads.
        tokio::time::advance(TTL).await;
        assert!(c.get("k").is_none());
        tokio::time::advance(STALE_LIMIT).await;
        assert!(c.get("k").is_none());
        assert!(c.get("k").is_none());
        c.invalidate("namespaces");
        assert!(c.get("k").is_none(), "invalidated");
    }
}
