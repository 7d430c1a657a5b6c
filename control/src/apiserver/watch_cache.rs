//! The shared watch cache: one store watch per resource type feeds every API watch of that
//! type. Events are decoded once and kept in a bounded history so watches that start at a
//! recent resourceVersion are served without touching the store. The cache also mirrors the
//! current objects (stored bytes), so lists are served from it when a cheap store probe shows
//! nothing under the listed prefix changed since the cache's revision (Kubernetes serves
//! consistent lists from its watch cache the same way: check freshness, then read memory).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handlers::decode;
use super::resources::Resource;
use crate::storage::{Revision, Store, Versioned, WatchEvent};

/// Events kept per resource type for watches that start in the recent past.
const HISTORY: usize = 10_000;
/// Fan-out buffer in groups of events; a watcher further behind than this is disconnected
/// (its client re-lists).
const FANOUT: usize = 4096;
/// A published group grows past this many events only to finish its last revision.
const GROUP_EVENTS: usize = 1024;

/// Events published together: whole revisions only, in revision order. A batched write puts
/// many objects at one revision; delivering them as one unit lets the watch server keep them
/// in one chunk (a client resuming from that resourceVersion would miss any it had not seen).
pub(crate) type EventGroup = Arc<[Arc<CachedEvent>]>;

/// One decoded store event.
#[derive(Debug)]
pub(crate) struct CachedEvent {
    pub revision: Revision,
    pub key: String,
    pub deleted: bool,
    /// The new object, or for deletions the deleted object (with the deletion revision).
    pub obj: Value,
    /// The object before this change, if it existed.
    pub prev: Option<Value>,
    /// The JSON watch line per event type (ADDED, MODIFIED, DELETED), encoded once and shared
    /// by every plain-JSON watcher: with a thousand watchers, encoding per watcher was most of
    /// the fan-out work.
    lines: [OnceLock<Bytes>; 3],
}

impl CachedEvent {
    /// `{"type":ty,"object":obj}` plus newline, as a plain-JSON watch sends it.
    pub(crate) fn line(&self, ty: &str) -> Bytes {
        let i = match ty {
            "ADDED" => 0,
            "MODIFIED" => 1,
            _ => 2,
        };
        self.lines[i]
            .get_or_init(|| {
                let mut out = Vec::with_capacity(256);
                out.extend_from_slice(b"{\"type\":");
                out.extend_from_slice(Value::String(ty.to_string()).to_string().as_bytes());
                out.extend_from_slice(b",\"object\":");
                // Serializing a Value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut out, &self.obj);
                out.extend_from_slice(b"}\n");
                Bytes::from(out)
            })
            .clone()
    }

    /// Decodes a store event; `None` for undecodable values (logged by the caller's absence).
    pub(crate) fn from_store(res: &Resource, ev: &WatchEvent) -> Option<CachedEvent> {
        match ev {
            WatchEvent::Put { kv, prev } => Some(CachedEvent {
                revision: kv.mod_revision,
                key: kv.key.clone(),
                deleted: false,
                obj: decode(res, kv).ok()?,
                prev: prev.as_ref().and_then(|p| decode(res, p).ok()),
                lines: Default::default(),
            }),
            WatchEvent::Delete {
                key,
                revision,
                prev,
            } => {
                let mut obj = decode(res, prev.as_ref()?).ok()?;
                obj["metadata"]["resourceVersion"] = json!(revision.to_string());
                Some(CachedEvent {
                    revision: *revision,
                    key: key.clone(),
                    deleted: true,
                    obj: obj.clone(),
                    prev: Some(obj),
                    lines: Default::default(),
                })
            }
        }
    }
}

struct Inner {
    history: VecDeque<Arc<CachedEvent>>,
    /// Every event after this revision is in `history` (or still to come).
    complete_after: Revision,
    /// Every object of the type, as stored, as of `revision`.
    objects: BTreeMap<String, Versioned>,
    /// The store revision `objects` reflects (the initial list's or the last event's).
    revision: Revision,
}

struct ResourceCache {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<EventGroup>,
}

/// A subscription: past events to replay, then the live feed.
pub(crate) struct Subscription {
    pub replay: Vec<Arc<CachedEvent>>,
    pub live: broadcast::Receiver<EventGroup>,
}

/// Watch caches of every resource type, started on first use.
pub(crate) struct WatchCache<S> {
    store: S,
    caches: Mutex<HashMap<&'static str, Arc<ResourceCache>>>,
    /// One start at a time per type: a thousand watches arriving together must not each list
    /// the whole type and open a store watch (they wait for the first and share its cache).
    starting: Mutex<HashMap<&'static str, Arc<tokio::sync::Mutex<()>>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl<S: Store> WatchCache<S> {
    pub(crate) fn new(store: S, tasks: TaskTracker, shutdown: CancellationToken) -> WatchCache<S> {
        WatchCache {
            store,
            caches: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashMap::new()),
            tasks,
            shutdown,
        }
    }

    /// Subscribes to changes of `res` after revision `after`; `None` if the cache cannot serve
    /// that revision (too old, or the cache is (re)starting): the caller then watches the store.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        res: &'static Resource,
        after: Revision,
    ) -> Option<Subscription> {
        let cache = self.cache_for(res).await?;
        let inner = cache.inner.lock().ok()?;
        if after < inner.complete_after {
            return None;
        }
        let replay = inner
            .history
            .iter()
            .filter(|e| e.revision > after)
            .cloned()
            .collect();
        // Subscribing under the lock: no event falls between replay and live feed.
        let live = cache.tx.subscribe();
        Some(Subscription { replay, live })
    }

    /// The cached objects under `prefix` (a prefix of `res`'s keys) and the revision they are
    /// current at; `None` while the cache cannot serve (starting, or its store watch broke).
    pub(crate) async fn snapshot(
        self: &Arc<Self>,
        res: &'static Resource,
        prefix: &str,
    ) -> Option<(Vec<Versioned>, Revision)> {
        let cache = self.cache_for(res).await?;
        let inner = cache.inner.lock().ok()?;
        let items = inner
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Some((items, inner.revision))
    }

    async fn cache_for(self: &Arc<Self>, res: &'static Resource) -> Option<Arc<ResourceCache>> {
        if let Some(c) = self.caches.lock().ok()?.get(res.plural) {
            return Some(c.clone());
        }
        let gate = self
            .starting
            .lock()
            .ok()?
            .entry(res.plural)
            .or_default()
            .clone();
        let _starting = gate.lock().await;
        if let Some(c) = self.caches.lock().ok()?.get(res.plural) {
            return Some(c.clone());
        }
        let prefix = res.prefix();
        // Every object as of `start`; everything after it comes from the watch.
        let (items, start) = self.store.list(&prefix).await.ok()?;
        let stream = self.store.watch(&prefix, start).await.ok()?;
        let (tx, _) = broadcast::channel(FANOUT);
        let cache = Arc::new(ResourceCache {
            inner: Mutex::new(Inner {
                history: VecDeque::new(),
                complete_after: start,
                objects: items.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
                revision: start,
            }),
            tx,
        });
        {
            let mut caches = self.caches.lock().ok()?;
            if let Some(existing) = caches.get(res.plural) {
                // Another watch started it meanwhile; use that one.
                return Some(existing.clone());
            }
            caches.insert(res.plural, cache.clone());
        }
        let me = self.clone();
        let feed = cache.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut stream = stream;
            // The first event of the next group, read while finishing this one.
            let mut carry: Option<WatchEvent> = None;
            loop {
                let first = match carry.take() {
                    Some(e) => Some(Ok(e)),
                    None => tokio::select! {
                        _ = shutdown.cancelled() => break,
                        ev = stream.next() => ev,
                    },
                };
                let Some(Ok(first)) = first else {
                    tracing::info!(
                        resource = res.plural,
                        "store watch ended; watch cache restarts on next use"
                    );
                    break;
                };
                // The store sends each revision's events together (one etcd watch response),
                // so what is ready now ends on a revision boundary.
                let mut events = vec![first];
                let mut broken = false;
                loop {
                    match stream.next().now_or_never() {
                        None => break,
                        Some(Some(Ok(e))) => {
                            let same = events.last().is_some_and(|l| l.revision() == e.revision());
                            if events.len() >= GROUP_EVENTS && !same {
                                carry = Some(e);
                                break;
                            }
                            events.push(e);
                        }
                        Some(Some(Err(_)) | None) => {
                            broken = true;
                            break;
                        }
                    }
                }
                // Decoded before taking the lock that lists and new watches wait for.
                let group: Vec<Arc<CachedEvent>> = events
                    .iter()
                    .filter_map(|ev| CachedEvent::from_store(res, ev).map(Arc::new))
                    .collect();
                let Ok(mut inner) = feed.inner.lock() else {
                    break;
                };
                for ev in events {
                    inner.revision = inner.revision.max(ev.revision());
                    match ev {
                        WatchEvent::Put { kv, .. } => {
                            inner.objects.insert(kv.key.clone(), kv);
                        }
                        WatchEvent::Delete { key, .. } => {
                            inner.objects.remove(&key);
                        }
                    }
                }
                inner.history.extend(group.iter().cloned());
                while inner.history.len() > HISTORY {
                    if let Some(old) = inner.history.pop_front() {
                        inner.complete_after = old.revision;
                    }
                }
                // Sent under the lock, so `subscribe` sees each group either in the history
                // or on the live feed, never both or neither.
                if !group.is_empty() {
                    // No receivers is fine.
                    let _ = feed.tx.send(group.into());
                }
                drop(inner);
                if broken {
                    tracing::info!(
                        resource = res.plural,
                        "store watch ended; watch cache restarts on next use"
                    );
                    break;
                }
            }
            // Drop this cache: its watchers' feeds close and their clients re-watch.
            if let Ok(mut caches) = me.caches.lock()
                && caches
                    .get(res.plural)
                    .is_some_and(|c| Arc::ptr_eq(c, &feed))
            {
                caches.remove(res.plural);
            }
        });
        Some(cache)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::apiserver::resources::find;
    use crate::storage::MemStore;

    #[tokio::test]
    async fn one_store_watch_feeds_many_subscribers() {
        let store = MemStore::new();
        let res = find("", "v1", "pods").expect("pods");
        let key = res.key(Some("default"), "a");
        let early = store
            .create(
                &res.key(Some("default"), "early"),
                Bytes::from_static(b"{\"metadata\":{\"name\":\"early\"}}"),
            )
            .await
            .expect("create");
        let cache = Arc::new(WatchCache::new(
            store.clone(),
            TaskTracker::new(),
            CancellationToken::new(),
        ));
        let (_, now) = store.list("/").await.expect("list");
        let mut subs = Vec::new();
        for _ in 0..50 {
            subs.push(
                cache
                    .subscribe(res, now)
                    .await
                    .expect("served from the cache"),
            );
        }
        assert!(
            cache.subscribe(res, early - 1).await.is_none(),
            "older than the cache window"
        );
        let rev = store
            .create(&key, Bytes::from_static(b"{\"metadata\":{\"name\":\"a\"}}"))
            .await
            .expect("create");
        for sub in &mut subs {
            let group = tokio::time::timeout(Duration::from_secs(10), sub.live.recv())
                .await
                .expect("in time")
                .expect("event");
            let [ev] = &group[..] else {
                panic!("one event: {group:?}")
            };
            assert_eq!(
                (ev.revision, ev.deleted, ev.obj["metadata"]["name"].as_str()),
                (rev, false, Some("a"))
            );
        }
        // The mirror follows the store: the snapshot equals a store list once it caught up.
        let prefix = res.list_prefix(Some("default"));
        let (stored, _) = store.list(&prefix).await.expect("list");
        let (mirrored, at) = cache.snapshot(res, &prefix).await.expect("snapshot");
        assert_eq!(mirrored, stored);
        assert_eq!(at, rev);
        let probe = store.probe(&prefix, at).await.expect("probe");
        assert!(!probe.written_after && probe.count == mirrored.len());
        // A late subscriber from `now` gets the event replayed from history.
        let late = cache.subscribe(res, now).await.expect("served");
        assert_eq!(late.replay.len(), 1);
        assert_eq!(
            late.replay[0].obj["metadata"]["resourceVersion"],
            json!(rev.to_string())
        );
    }
}
