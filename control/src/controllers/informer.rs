//! A list+watch cache of one resource (client-go's reflector + store + informer, minimal):
//! objects by key, and a broadcast of changes for controllers to map onto their queues.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::client::ApiClient;

/// One observed change.
#[derive(Debug, Clone)]
pub enum Change {
    /// Created or modified; `old` is the previous cached object.
    Upsert {
        /// The previous object, if cached.
        old: Option<Arc<Value>>,
        /// The new object.
        new: Arc<Value>,
    },
    /// Deleted.
    Delete {
        /// The last known object.
        old: Arc<Value>,
    },
    /// The cache was rebuilt from a fresh list (after a watch error): re-check everything.
    Resync,
}

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn key_of(obj: &Value) -> String {
    let m = obj.get("metadata");
    let name = m
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    match m.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

/// Computes an object's index value (e.g. its managing controller's uid), if it has one.
pub type IndexFn = fn(&Value) -> Option<String>;

/// The cached objects and, if the informer has an [`IndexFn`], their keys by index value.
#[derive(Default)]
struct Objects {
    by_key: HashMap<String, Arc<Value>>,
    by_index: HashMap<String, HashSet<String>>,
}

impl Objects {
    fn insert(
        &mut self,
        index: Option<IndexFn>,
        key: String,
        obj: Arc<Value>,
    ) -> Option<Arc<Value>> {
        if let Some(v) = index.and_then(|f| f(&obj)) {
            self.by_index.entry(v).or_default().insert(key.clone());
        }
        let old = self.by_key.insert(key.clone(), obj.clone());
        self.unindex(index, &key, old.as_deref(), Some(&obj));
        old
    }

    fn remove(&mut self, index: Option<IndexFn>, key: &str) -> Option<Arc<Value>> {
        let old = self.by_key.remove(key);
        self.unindex(index, key, old.as_deref(), None);
        old
    }

    /// Drops `key` from `old`'s index entry unless `new` has the same index value.
    fn unindex(
        &mut self,
        index: Option<IndexFn>,
        key: &str,
        old: Option<&Value>,
        new: Option<&Value>,
    ) {
        let (Some(f), Some(old)) = (index, old) else {
            return;
        };
        let Some(v) = f(old) else { return };
        if new.and_then(f).as_ref() == Some(&v) {
            return;
        }
        if let Some(keys) = self.by_index.get_mut(&v) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_index.remove(&v);
            }
        }
    }
}

struct Inner {
    client: ApiClient,
    path: String,
    objects: RwLock<Objects>,
    index: Option<IndexFn>,
    tx: broadcast::Sender<Change>,
    synced: watch::Sender<bool>,
}

/// A clonable handle to a cache kept in sync by [`Informer::run`].
#[derive(Clone)]
pub struct Informer {
    inner: Arc<Inner>,
}

impl Informer {
    /// A cache of the collection at `path` (e.g. `/api/v1/pods`).
    pub fn new(client: ApiClient, path: impl Into<String>) -> Informer {
        Self::build(client, path.into(), None)
    }

    /// A cache that also keeps its objects' keys by `index` value (client-go's indexers):
    /// [`Informer::by_index`] then finds, say, one controller's pods without a scan of all.
    pub fn with_index(client: ApiClient, path: impl Into<String>, index: IndexFn) -> Informer {
        Self::build(client, path.into(), Some(index))
    }

    fn build(client: ApiClient, path: String, index: Option<IndexFn>) -> Informer {
        let (tx, _) = broadcast::channel(4096);
        let (synced, _) = watch::channel(false);
        Informer {
            inner: Arc::new(Inner {
                client,
                path,
                objects: RwLock::new(Objects::default()),
                index,
                tx,
                synced,
            }),
        }
    }

    /// The cached object with this key.
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.read().by_key.get(key).cloned()
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<Value>> {
        self.read().by_key.values().cloned().collect()
    }

    /// The cached objects whose index value is `value` (none if the informer has no index).
    pub fn by_index(&self, value: &str) -> Vec<Arc<Value>> {
        let objects = self.read();
        objects
            .by_index
            .get(value)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| objects.by_key.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects> {
        self.inner
            .objects
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Objects> {
        self.inner
            .objects
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.tx.subscribe()
    }

    /// Waits until the first list has been loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Lists and watches until `shutdown`, re-listing after any watch failure.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        'relist: loop {
            if shutdown.is_cancelled() {
                return;
            }
            let listed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.inner.client.list(&self.inner.path) => r,
            };
            let (items, rv) = match listed {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(path = %self.inner.path, error = %e, "list failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            {
                let index = self.inner.index;
                let mut fresh = Objects::default();
                for o in items {
                    fresh.insert(index, key_of(&o), Arc::new(o));
                }
                *self.write() = fresh;
            }
            self.inner.synced.send_replace(true);
            let _ = self.inner.tx.send(Change::Resync);
            let sep = if self.inner.path.contains('?') {
                '&'
            } else {
                '?'
            };
            let url = format!(
                "{}{sep}watch=true&allowWatchBookmarks=true&resourceVersion={rv}",
                self.inner.path
            );
            let mut w = match self.inner.client.watch(&url).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(path = %self.inner.path, error = %e, "watch failed; re-listing");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = w.next() => ev,
                };
                let Some(Ok(ev)) = ev else {
                    continue 'relist;
                };
                match ev.kind.as_str() {
                    "ADDED" | "MODIFIED" => {
                        let key = key_of(&ev.object);
                        let new = Arc::new(ev.object);
                        let old = self.write().insert(self.inner.index, key, new.clone());
                        let _ = self.inner.tx.send(Change::Upsert { old, new });
                    }
                    "DELETED" => {
                        let key = key_of(&ev.object);
                        let removed = self.write().remove(self.inner.index, &key);
                        let old = removed.unwrap_or_else(|| Arc::new(ev.object));
                        let _ = self.inner.tx.send(Change::Delete { old });
                    }
                    "ERROR" => continue 'relist,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::labels::{orphans_in, owner_index};
    use serde_json::json;

    fn pod(name: &str, owner: Option<&str>) -> Arc<Value> {
        let mut p = json!({"metadata": {"name": name, "namespace": "ns"}});
        if let Some(uid) = owner {
            p["metadata"]["ownerReferences"] =
                json!([{"kind": "ReplicaSet", "name": "rs", "uid": uid, "controller": true}]);
        }
        Arc::new(p)
    }

    fn keys(o: &Objects, v: &str) -> Vec<String> {
        let mut k: Vec<String> = o.by_index.get(v).into_iter().flatten().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn index_follows_inserts_owner_changes_and_removals() {
        let ix = Some(owner_index as IndexFn);
        let mut o = Objects::default();
        o.insert(ix, "ns/a".into(), pod("a", Some("u1")));
        o.insert(ix, "ns/b".into(), pod("b", Some("u1")));
        o.insert(ix, "ns/c".into(), pod("c", None));
        assert_eq!(keys(&o, "u1"), ["ns/a", "ns/b"]);
        assert_eq!(keys(&o, &orphans_in("ns")), ["ns/c"]);
        // Same owner again: still indexed once.
        o.insert(ix, "ns/a".into(), pod("a", Some("u1")));
        assert_eq!(keys(&o, "u1"), ["ns/a", "ns/b"]);
        // Adopted: moves from the orphans to its new owner.
        o.insert(ix, "ns/c".into(), pod("c", Some("u2")));
        assert!(keys(&o, &orphans_in("ns")).is_empty());
        assert_eq!(keys(&o, "u2"), ["ns/c"]);
        o.remove(ix, "ns/a");
        o.remove(ix, "ns/b");
        assert!(!o.by_index.contains_key("u1"), "empty entries are dropped");
        assert_eq!(o.by_key.len(), 1);
    }
}
