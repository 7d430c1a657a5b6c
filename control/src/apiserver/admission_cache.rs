//! Short-lived cache of what admission reads on every create: namespaces, LimitRanges and
//! ResourceQuotas (Kubernetes' admission plugins read informer caches for the same reason).
//!
//! Writes through this server invalidate it at once; writes through another server are seen
//! within [`TTL`]. A namespace that is not cached is always read from the store, so a create
//! right after its namespace's creation works from any server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// How long an entry is trusted.
const TTL: Duration = Duration::from_secs(1);

/// Resource types whose writes invalidate the cache.
pub(crate) const CACHED: &[&str] = &["namespaces", "limitranges", "resourcequotas"];

type Entry = (Instant, Arc<Vec<(Value, i64)>>);

#[derive(Default)]
pub(crate) struct AdmissionCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl AdmissionCache {
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Vec<(Value, i64)>>> {
        let entries = self.entries.lock().ok()?;
        let (at, v) = entries.get(key)?;
        (at.elapsed() < TTL).then(|| v.clone())
    }

    pub(crate) fn put(&self, key: String, v: Arc<Vec<(Value, i64)>>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(key, (Instant::now(), v));
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
