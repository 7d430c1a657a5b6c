//! In-memory [`Store`]: a `BTreeMap`, a revision counter and a broadcast channel. Used by unit
//! tests, the `--store=mem` server mode and the API tests.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{
    Guard, PrefixProbe, Revision, Store, StoreError, TxnOp, Versioned, WatchEvent, WatchStream,
};

/// Events kept for watches that start in the past; older starts get `Compacted`.
const HISTORY: usize = 20_000;

/// In-memory store. Clones share the same data.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    /// Fault hook: while set every call fails with `Unavailable` (tests of the 503 path).
    down: Arc<AtomicBool>,
    /// Fault hook: a key and how many more of its reads another writer races (see
    /// [`MemStore::race_reads`]).
    raced: Arc<Mutex<Option<(String, u32)>>>,
    /// The events of one revision per message: a watcher never sees part of a transaction
    /// without the rest (the store and etcd send a revision in one watch response too).
    events: broadcast::Sender<Arc<Vec<WatchEvent>>>,
}

struct Inner {
    data: BTreeMap<String, Versioned>,
    revision: Revision,
    history: VecDeque<WatchEvent>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store at revision 1 (like a fresh etcd).
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(8192);
        MemStore {
            inner: Arc::new(Mutex::new(Inner {
                data: BTreeMap::new(),
                revision: 1,
                history: VecDeque::new(),
            })),
            down: Arc::new(AtomicBool::new(false)),
            raced: Arc::default(),
            events,
        }
    }

    /// Fault hook: each of the next `reads` reads of `key` is followed, before the reader can
    /// write, by another writer's update of it (same value, new revision), as a controller's
    /// status update lands between an API server's read and its write. Tests of the retries
    /// of read-modify-write paths.
    pub fn race_reads(&self, key: &str, reads: u32) {
        if let Ok(mut r) = self.raced.lock() {
            *r = Some((key.to_string(), reads));
        }
    }

    /// Applies the racing write [`MemStore::race_reads`] asked for after a read of `key`.
    fn race_after_read(&self, key: &str, inner: &mut Inner) {
        let Ok(mut raced) = self.raced.lock() else {
            return;
        };
        let Some((k, left)) = raced.as_mut() else {
            return;
        };
        if k != key || *left == 0 {
            return;
        }
        *left -= 1;
        let Some(prev) = inner.data.get(key).cloned() else {
            return;
        };
        inner.revision += 1;
        let kv = Versioned {
            mod_revision: inner.revision,
            ..prev.clone()
        };
        inner.data.insert(key.to_string(), kv.clone());
        self.record(
            inner,
            WatchEvent::Put {
                kv,
                prev: Some(prev),
            },
        );
    }

    /// Simulates a store outage (`true`) or its end (`false`).
    pub fn set_unavailable(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Drops the watch history up to the current revision, like an etcd compaction.
    pub fn compact(&self) {
        if let Ok(mut inner) = self.lock() {
            inner.history.clear();
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "store is down (fault injected)".into(),
            ));
        }
        self.inner
            .lock()
            .map_err(|_| StoreError::Internal("store lock poisoned".into()))
    }

    fn record(&self, inner: &mut Inner, event: WatchEvent) {
        self.record_all(inner, vec![event]);
    }

    /// Records the events of one revision and publishes them together.
    fn record_all(&self, inner: &mut Inner, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        inner.history.extend(events.iter().cloned());
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        // No receivers is fine: nobody watches.
        let _ = self.events.send(Arc::new(events));
    }
}

impl Inner {
    /// Oldest revision a watch may start after.
    fn oldest(&self) -> Revision {
        self.history
            .front()
            .map(|e| e.revision() - 1)
            .unwrap_or(self.revision)
    }
}

fn event_key(event: &WatchEvent) -> &str {
    match event {
        WatchEvent::Put { kv, .. } => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let mut inner = self.lock()?;
        let found = inner.data.get(key).cloned();
        self.race_after_read(key, &mut inner);
        Ok(found)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Versioned>, Revision), StoreError> {
        let inner = self.lock()?;
        let items = inner
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((items, inner.revision))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        let mut inner = self.lock()?;
        if inner.data.contains_key(key) {
            return Err(StoreError::AlreadyExists);
        }
        inner.revision += 1;
        let kv = Versioned {
            key: key.to_string(),
            value,
            mod_revision: inner.revision,
        };
        inner.data.insert(key.to_string(), kv.clone());
        let rev = inner.revision;
        self.record(&mut inner, WatchEvent::Put { kv, prev: None });
        Ok(rev)
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> Result<Revision, StoreError> {
        let mut inner = self.lock()?;
        let Some(prev) = inner.data.get(key).cloned() else {
            return Err(StoreError::NotFound);
        };
        if prev.mod_revision != expected {
            return Err(StoreError::Conflict {
                current: Some(prev),
            });
        }
        inner.revision += 1;
        let kv = Versioned {
            key: key.to_string(),
            value,
            mod_revision: inner.revision,
        };
        inner.data.insert(key.to_string(), kv.clone());
        let rev = inner.revision;
        self.record(
            &mut inner,
            WatchEvent::Put {
                kv,
                prev: Some(prev),
            },
        );
        Ok(rev)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let mut inner = self.lock()?;
        let Some(prev) = inner.data.get(key).cloned() else {
            return Err(StoreError::NotFound);
        };
        if let Some(expected) = expected
            && prev.mod_revision != expected
        {
            return Err(StoreError::Conflict {
                current: Some(prev),
            });
        }
        inner.data.remove(key);
        inner.revision += 1;
        let revision = inner.revision;
        self.record(
            &mut inner,
            WatchEvent::Delete {
                key: key.to_string(),
                revision,
                prev: Some(prev),
            },
        );
        Ok(revision)
    }

    async fn probe(&self, prefix: &str, after: Revision) -> Result<PrefixProbe, StoreError> {
        let inner = self.lock()?;
        let mut count = 0;
        let mut written_after = false;
        for (_, v) in inner
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            count += 1;
            written_after |= v.mod_revision > after;
        }
        Ok(PrefixProbe {
            count,
            written_after,
            revision: inner.revision,
        })
    }

    async fn txn(&self, guards: Vec<Guard>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        let mut inner = self.lock()?;
        let holds = guards
            .iter()
            .all(|g| inner.data.get(&g.key).map_or(0, |v| v.mod_revision) == g.mod_revision);
        if !holds {
            return Err(StoreError::Conflict { current: None });
        }
        if ops.is_empty() {
            return Ok(inner.revision);
        }
        inner.revision += 1;
        let revision = inner.revision;
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Put { key, value } => {
                    let kv = Versioned {
                        key: key.clone(),
                        value,
                        mod_revision: revision,
                    };
                    let prev = inner.data.insert(key, kv.clone());
                    events.push(WatchEvent::Put { kv, prev });
                }
                TxnOp::Delete { key } => {
                    if let Some(prev) = inner.data.remove(&key) {
                        events.push(WatchEvent::Delete {
                            key,
                            revision,
                            prev: Some(prev),
                        });
                    }
                }
            }
        }
        self.record_all(&mut inner, events);
        Ok(revision)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        while inner
            .history
            .front()
            .is_some_and(|e| e.revision() <= revision)
        {
            inner.history.pop_front();
        }
        Ok(())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let inner = self.lock()?;
        if after < inner.oldest() {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: inner.oldest(),
            });
        }
        let replay: Vec<WatchEvent> = inner
            .history
            .iter()
            .filter(|e| e.revision() > after && event_key(e).starts_with(prefix))
            .cloned()
            .collect();
        // Subscribing under the lock means no event falls between replay and live stream.
        let rx = self.events.subscribe();
        let last = replay
            .last()
            .map(|e| e.revision())
            .unwrap_or(after)
            .max(inner.revision);
        drop(inner);
        let prefix = prefix.to_string();
        let live = BroadcastStream::new(rx).flat_map(move |item| {
            let out: Vec<Result<WatchEvent, StoreError>> = match item {
                Ok(events) => events
                    .iter()
                    .filter(|e| e.revision() > last && event_key(e).starts_with(&prefix))
                    .cloned()
                    .map(Ok)
                    .collect(),
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    vec![Err(StoreError::Unavailable(format!(
                        "watcher lagged by {n} revisions"
                    )))]
                }
            };
            futures::stream::iter(out)
        });
        Ok(Box::pin(
            futures::stream::iter(replay.into_iter().map(Ok)).chain(live),
        ))
    }

    async fn ready(&self) -> bool {
        self.lock().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        crate::storage::conformance::run_all(MemStore::new()).await;
    }

    #[tokio::test]
    async fn outage_and_compaction() {
        let s = MemStore::new();
        s.create("/a", Bytes::from_static(b"1"))
            .await
            .expect("create");
        s.set_unavailable(true);
        assert!(matches!(s.get("/a").await, Err(StoreError::Unavailable(_))));
        s.set_unavailable(false);
        s.compact();
        assert!(matches!(
            s.watch("/", 1).await,
            Err(StoreError::Compacted { .. })
        ));
        assert!(s.watch("/", 2).await.is_ok());
    }
}
