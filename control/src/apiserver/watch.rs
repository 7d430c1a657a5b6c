//! Watch: newline-delimited JSON events from a store watch, with selectors, initial events,
//! bookmarks and `410 Expired` for compacted revisions.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use super::handlers::{App, Query, decode};
use super::resources::Resource;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::table;
use super::watch_cache::{CachedEvent, EventGroup, WatchCache};
use crate::storage::{Revision, Store, StoreError, Versioned, WatchStream};

/// How often an idle watch that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(10);
/// Default and maximum watch duration (Kubernetes picks 30–60 min).
const MAX_WATCH: Duration = Duration::from_secs(3600);

struct Filter {
    res: &'static Resource,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn decode_match(&self, kv: &Versioned) -> Option<Value> {
        let o = decode(self.res, kv).ok()?;
        (self.labels.matches_object(&o) && self.fields.matches(&o)).then_some(o)
    }
}

struct Encoder {
    res: &'static Resource,
    table: bool,
    columns_sent: bool,
}

impl Encoder {
    fn event(&mut self, ty: &str, obj: Value) -> Bytes {
        let object = if self.table && ty != "BOOKMARK" && ty != "ERROR" {
            let meta = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null)});
            let t = table::table(self.res, &[obj], meta, !self.columns_sent);
            self.columns_sent = true;
            t
        } else {
            obj
        };
        let mut line = json!({"type": ty, "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }

    fn bookmark(&mut self, rev: Revision, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.event(
            "BOOKMARK",
            json!({"kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": meta}),
        )
    }
}

/// The watch event type of one decoded event for this filter, if it concerns it.
fn convert(f: &Filter, ev: &CachedEvent) -> Option<&'static str> {
    let matches = |o: &Value| f.labels.matches_object(o) && f.fields.matches(o);
    if ev.deleted {
        return matches(&ev.obj).then_some("DELETED");
    }
    let now = matches(&ev.obj);
    let was = ev.prev.as_ref().is_some_and(matches);
    match (now, was) {
        (true, true) => Some("MODIFIED"),
        (true, false) => Some("ADDED"),
        // It stopped matching: to this watcher it is gone.
        (false, true) => Some("DELETED"),
        (false, false) => None,
    }
}

fn expired(requested: Revision, oldest: Revision) -> Value {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {requested} ({oldest})"),
    )
    .status_json()
}

/// Serves `?watch=true`.
pub(crate) async fn serve_watch<S: Store>(
    app: Arc<App<S>>,
    res: &'static Resource,
    ns: Option<&str>,
    labels: LabelSelector,
    fields: FieldSelector,
    q: &Query,
    table: bool,
) -> Result<Response, ApiError> {
    let send_initial = q.flag("sendInitialEvents");
    let bookmarks = q.flag("allowWatchBookmarks");
    let rv = q.get("resourceVersion");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(MAX_WATCH)
        .min(MAX_WATCH);
    if send_initial && !bookmarks {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            vec![super::status::Cause::forbidden(
                "allowWatchBookmarks",
                "allowWatchBookmarks must be true when sendInitialEvents is set",
            )],
        ));
    }
    let filter = Filter {
        res,
        labels,
        fields,
    };
    let prefix = res.list_prefix(ns);
    // No resourceVersion (or "0"), or sendInitialEvents: start with the current state as ADDED.
    let initial_state = send_initial || rv.is_none() || rv == Some("0");
    let (initial, start) = if initial_state {
        let (kvs, rev) = app.store.list(&prefix).await?;
        (
            kvs.iter()
                .filter_map(|kv| filter.decode_match(kv))
                .collect::<Vec<_>>(),
            rev,
        )
    } else {
        let r = rv
            .unwrap_or_default()
            .parse::<Revision>()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
        (Vec::new(), r)
    };
    let pump = Pump {
        res,
        filter,
        enc: Encoder {
            res,
            table,
            columns_sent: false,
        },
        prefix,
        start,
        last: start,
        bookmarks,
        initial: initial.into(),
        initial_bookmark: send_initial,
        source: None,
        carry: None,
        done: false,
        store: app.store.clone(),
        cache: app.watch_cache.clone(),
        deadline: Box::pin(tokio::time::sleep(timeout)),
        tick: tokio::time::interval_at(
            tokio::time::Instant::now() + BOOKMARK_EVERY,
            BOOKMARK_EVERY,
        ),
    };
    // The body stream is the watch itself: hyper's connection task polls it, so an event
    // costs one task wake-up per watcher (a separate pump task feeding a channel cost two).
    let body = Body::from_stream(futures::stream::unfold(pump, |mut p| async move {
        let chunk = p.next_chunk().await?;
        Some((Ok::<Bytes, Infallible>(chunk), p))
    }));
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if table {
            "application/json;as=Table;v=v1;g=meta.k8s.io"
        } else {
            "application/json"
        }),
    );
    Ok(r)
}

/// Initial events are sent in chunks of about this size.
const INITIAL_CHUNK_BYTES: usize = 64 * 1024;
/// Events already waiting are sent together, up to this many per chunk (one TLS record and
/// one write instead of one each), and past it to the end of the last event's revision.
const BATCH_EVENTS: usize = 64;

/// The state of one watch response.
struct Pump<S: Store> {
    res: &'static Resource,
    filter: Filter,
    enc: Encoder,
    prefix: String,
    /// Events at or before this revision are not sent.
    start: Revision,
    /// The last revision seen, for bookmarks.
    last: Revision,
    bookmarks: bool,
    /// Current objects still to send as ADDED.
    initial: VecDeque<Value>,
    /// Send the `initial-events-end` bookmark after them.
    initial_bookmark: bool,
    /// Subscribed on first use, after the initial events.
    source: Option<Source>,
    /// An event taken from the source that starts the next chunk (it opened a new revision
    /// once the chunk was full).
    carry: Option<Arc<CachedEvent>>,
    /// The watch ended (an ERROR was sent).
    done: bool,
    store: S,
    cache: Arc<WatchCache<S>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    tick: tokio::time::Interval,
}

impl<S: Store> Pump<S> {
    /// The next bytes to send; `None` ends the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if let Some(first) = self.initial.pop_front() {
            let mut buf = self.enc.event("ADDED", first).to_vec();
            while buf.len() < INITIAL_CHUNK_BYTES
                && let Some(o) = self.initial.pop_front()
            {
                buf.extend_from_slice(&self.enc.event("ADDED", o));
            }
            return Some(Bytes::from(buf));
        }
        if std::mem::take(&mut self.initial_bookmark) {
            return Some(self.enc.bookmark(self.start, true));
        }
        if self.source.is_none() {
            // The shared cache serves recent revisions; older ones (or a restarting cache) go
            // to the store directly, which answers Compacted when they are gone.
            self.source = Some(match self.cache.subscribe(self.res, self.start).await {
                Some(sub) => Source::Cache {
                    replay: sub.replay.into(),
                    live: sub.live,
                },
                None => match self.store.watch(&self.prefix, self.start).await {
                    Ok(s) => Source::Store(s),
                    Err(StoreError::Compacted { requested, oldest }) => {
                        self.done = true;
                        return Some(self.enc.event("ERROR", expired(requested, oldest)));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(self.enc.event("ERROR", ApiError::from(e).status_json()));
                    }
                },
            });
        }
        let Pump {
            res,
            filter,
            enc,
            prefix,
            start,
            last,
            bookmarks,
            done,
            deadline,
            tick,
            carry,
            source: Some(source),
            ..
        } = self
        else {
            return None;
        };
        let res = *res;
        loop {
            let first = match carry.take() {
                Some(e) => Next::Event(e),
                None => tokio::select! {
                    _ = deadline.as_mut() => return None,
                    _ = tick.tick(), if *bookmarks => return Some(enc.bookmark(*last, false)),
                    ev = source.next(res) => ev,
                },
            };
            let mut chunk = Chunk::default();
            let mut next = Some(first);
            let mut n = 0;
            // The revision of the events taken so far: a chunk ends only between revisions,
            // so a client that reads it whole has every event of each revision it saw. The
            // source hands over a revision's events together (see `EventGroup`).
            let mut chunk_rev = None;
            while let Some(ev) = next.take() {
                match ev {
                    Next::Event(e) => {
                        if n >= BATCH_EVENTS && chunk_rev != Some(e.revision) {
                            *carry = Some(e);
                            break;
                        }
                        chunk_rev = Some(e.revision);
                        if e.revision > *start && e.key.starts_with(prefix.as_str()) {
                            *last = e.revision;
                            if let Some(ty) = convert(filter, &e) {
                                chunk.push(if enc.table {
                                    enc.event(ty, e.obj.clone())
                                } else {
                                    e.line(ty)
                                });
                            }
                        }
                    }
                    Next::Skip => {}
                    Next::Compacted(requested, oldest) => {
                        *done = true;
                        chunk.push(enc.event("ERROR", expired(requested, oldest)));
                        return chunk.finish();
                    }
                    // Lagging or a broken store watch: end the stream; clients re-list.
                    Next::End => {
                        *done = true;
                        return chunk.finish();
                    }
                }
                n += 1;
                next = source.ready(res);
            }
            if let Some(bytes) = chunk.finish() {
                return Some(bytes);
            }
        }
    }
}

/// The bytes of one or more events: one event is sent as its shared line (no copy).
#[derive(Default)]
struct Chunk {
    one: Option<Bytes>,
    many: Vec<u8>,
}

impl Chunk {
    fn push(&mut self, line: Bytes) {
        if self.one.is_none() && self.many.is_empty() {
            self.one = Some(line);
            return;
        }
        if let Some(first) = self.one.take() {
            self.many.extend_from_slice(&first);
        }
        self.many.extend_from_slice(&line);
    }

    fn finish(self) -> Option<Bytes> {
        match self.one {
            Some(b) => Some(b),
            None if !self.many.is_empty() => Some(Bytes::from(self.many)),
            None => None,
        }
    }
}

/// Where a watch's events come from.
enum Source {
    Cache {
        /// History to replay, then the rest of the last group received.
        replay: VecDeque<Arc<CachedEvent>>,
        live: tokio::sync::broadcast::Receiver<EventGroup>,
    },
    Store(WatchStream),
}

enum Next {
    Event(Arc<CachedEvent>),
    Skip,
    Compacted(Revision, Revision),
    End,
}

impl Source {
    /// The next event if one is already waiting (no waiting).
    fn ready(&mut self, res: &'static Resource) -> Option<Next> {
        match self {
            Source::Cache { replay, live } => {
                if let Some(e) = replay.pop_front() {
                    return Some(Next::Event(e));
                }
                match live.try_recv() {
                    Ok(group) => {
                        replay.extend(group.iter().cloned());
                        replay.pop_front().map(Next::Event).or(Some(Next::Skip))
                    }
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty) => None,
                    Err(_) => Some(Next::End),
                }
            }
            Source::Store(_) => self.next(res).now_or_never(),
        }
    }

    async fn next(&mut self, res: &'static Resource) -> Next {
        match self {
            Source::Cache { replay, live } => {
                if let Some(e) = replay.pop_front() {
                    return Next::Event(e);
                }
                match live.recv().await {
                    Ok(group) => {
                        replay.extend(group.iter().cloned());
                        replay.pop_front().map_or(Next::Skip, Next::Event)
                    }
                    Err(_) => Next::End,
                }
            }
            Source::Store(stream) => match stream.next().await {
                Some(Ok(ev)) => match CachedEvent::from_store(res, &ev) {
                    Some(e) => Next::Event(Arc::new(e)),
                    None => Next::Skip,
                },
                Some(Err(StoreError::Compacted { requested, oldest })) => {
                    Next::Compacted(requested, oldest)
                }
                Some(Err(_)) | None => Next::End,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::apiserver::resources::find;
    use crate::storage::MemStore;

    fn pump(
        store: &MemStore,
        cache: &Arc<WatchCache<MemStore>>,
        start: Revision,
    ) -> Pump<MemStore> {
        let res = find("", "v1", "pods").expect("pods");
        Pump {
            res,
            filter: Filter {
                res,
                labels: LabelSelector::parse("w=1").expect("selector"),
                fields: FieldSelector::parse("", "pods").expect("selector"),
            },
            enc: Encoder {
                res,
                table: false,
                columns_sent: false,
            },
            prefix: res.list_prefix(Some("default")),
            start,
            last: start,
            bookmarks: false,
            initial: VecDeque::new(),
            initial_bookmark: false,
            source: None,
            carry: None,
            done: false,
            store: store.clone(),
            cache: cache.clone(),
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(30))),
            tick: tokio::time::interval(BOOKMARK_EVERY),
        }
    }

    async fn put(store: &MemStore, name: &str, w: &str) -> Revision {
        let res = find("", "v1", "pods").expect("pods");
        let v = json!({"metadata": {"name": name, "namespace": "default", "labels": {"w": w}}});
        store
            .create(&res.key(Some("default"), name), Bytes::from(v.to_string()))
            .await
            .expect("create")
    }

    /// The revisions of a chunk's lines; every line must match the selector `w=1`.
    fn chunk_revisions(chunk: &[u8]) -> Vec<Revision> {
        std::str::from_utf8(chunk)
            .expect("utf-8")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("json line");
                assert_eq!(v["object"]["metadata"]["labels"]["w"], "1", "{v}");
                v["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .expect("resourceVersion")
            })
            .collect()
    }

    /// Writes `n` pods at one revision (one transaction, as a write batch does).
    async fn put_many(store: &MemStore, tag: &str, n: usize) -> Revision {
        let res = find("", "v1", "pods").expect("pods");
        let ops = (0..n)
            .map(|i| {
                let name = format!("{tag}-{i}");
                let v = json!({"metadata": {"name": name, "namespace": "default", "labels": {"w": "1"}}});
                crate::storage::TxnOp::Put {
                    key: res.key(Some("default"), &name),
                    value: Bytes::from(v.to_string()),
                }
            })
            .collect();
        store.txn(Vec::new(), ops).await.expect("txn")
    }

    /// A revision shared by more events than a chunk holds goes out whole, live and when
    /// replayed from the cache's history: a client that resumes from the resourceVersion of
    /// the last event it read would never see the rest of a split revision.
    #[tokio::test]
    async fn a_revision_is_never_split_across_chunks() {
        let store = MemStore::new();
        let cache = Arc::new(WatchCache::new(
            store.clone(),
            TaskTracker::new(),
            CancellationToken::new(),
        ));
        let res = find("", "v1", "pods").expect("pods");
        let (_, start) = store.list("/").await.expect("list");
        // Live: subscribed before the writes.
        let sub = cache.subscribe(res, start).await.expect("served");
        let mut live = pump(&store, &cache, start);
        live.source = Some(Source::Cache {
            replay: sub.replay.into(),
            live: sub.live,
        });
        let big = 2 * BATCH_EVENTS + 3;
        let r1 = put_many(&store, "a", big).await;
        let r2 = put_many(&store, "b", 5).await;
        let prefix = res.list_prefix(Some("default"));
        tokio::time::timeout(Duration::from_secs(10), async {
            while cache.snapshot(res, &prefix).await.map(|(_, r)| r) < Some(r2) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the cache catches up");
        // Replayed: a watch from before both revisions.
        let mut replayed = pump(&store, &cache, start);
        for p in [&mut live, &mut replayed] {
            let mut chunks = Vec::new();
            while chunks.iter().map(Vec::len).sum::<usize>() < big + 5 {
                let c = tokio::time::timeout(Duration::from_secs(10), p.next_chunk())
                    .await
                    .expect("in time")
                    .expect("a chunk");
                chunks.push(chunk_revisions(&c));
            }
            // Chunks never end inside a revision; the big one fills a chunk of its own.
            for pair in chunks.windows(2) {
                assert_ne!(pair[0].last(), pair[1].first(), "{chunks:?}");
            }
            assert_eq!(chunks[0], vec![r1; big]);
            assert_eq!(chunks.concat()[big..], [r2; 5]);
        }
    }

    /// Events already waiting go out as one chunk, filtered by the watcher's selector; a
    /// single event is the cache's shared line itself.
    #[tokio::test]
    async fn waiting_events_are_sent_together_and_filtered() {
        let store = MemStore::new();
        let cache = Arc::new(WatchCache::new(
            store.clone(),
            TaskTracker::new(),
            CancellationToken::new(),
        ));
        let res = find("", "v1", "pods").expect("pods");
        let (_, start) = store.list("/").await.expect("list");
        // The shared cache starts before the writes and has seen them all before the watch
        // asks: they are replayed from its history in one go.
        assert!(cache.subscribe(res, start).await.is_some());
        let mut p = pump(&store, &cache, start);
        put(&store, "a", "1").await;
        put(&store, "b", "2").await;
        let last = put(&store, "c", "1").await;
        let prefix = res.list_prefix(Some("default"));
        tokio::time::timeout(Duration::from_secs(10), async {
            while cache.snapshot(res, &prefix).await.map(|(_, r)| r) < Some(last) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the cache catches up");
        let chunk = tokio::time::timeout(Duration::from_secs(10), p.next_chunk())
            .await
            .expect("in time")
            .expect("a chunk");
        let lines: Vec<Value> = std::str::from_utf8(&chunk)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let names: Vec<&str> = lines
            .iter()
            .map(|l| l["object"]["metadata"]["name"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(names, ["a", "c"], "{lines:?}");
        assert!(lines.iter().all(|l| l["type"] == "ADDED"));

        // One live event: exactly one line.
        let rev = put(&store, "d", "1").await;
        let chunk = tokio::time::timeout(Duration::from_secs(10), p.next_chunk())
            .await
            .expect("in time")
            .expect("a chunk");
        let text = std::str::from_utf8(&chunk).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(
            line["object"]["metadata"]["resourceVersion"],
            json!(rev.to_string())
        );
    }
}
