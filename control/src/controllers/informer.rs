//! A list+watch cache of one resource (client-go's reflector + store + informer, minimal):
//! objects by key, and a broadcast of changes for controllers to map onto their queues.
use std::collections::HashMap;
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

struct Inner {
    client: ApiClient,
    path: String,
    objects: RwLock<HashMap<String, Arc<Value>>>,
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
        let (tx, _) = broadcast::channel(4096);
        let (synced, _) = watch::channel(false);
        Informer {
            inner: Arc::new(Inner {
                client,
                path: path.into(),
                objects: RwLock::new(HashMap::new()),
                tx,
                synced,
            }),
        }
    }

    /// The cached object with this key.
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.read().get(key).cloned()
    }

    /// Every cached object.
    pub fn list(&self) -> Vec<Arc<Value>> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Value>>> {
        self.inner
            .objects
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Value>>> {
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
                let fresh: HashMap<String, Arc<Value>> = items
                    .into_iter()
                    .map(|o| (key_of(&o), Arc::new(o)))
                    .collect();
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
                        let old = self.write().insert(key, new.clone());
                        let _ = self.inner.tx.send(Change::Upsert { old, new });
                    }
                    "DELETED" => {
                        let key = key_of(&ev.object);
                        let removed = self.write().remove(&key);
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
