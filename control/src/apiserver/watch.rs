//! Watch: newline-delimited JSON events from a store watch, with selectors, initial events,
//! bookmarks and `410 Expired` for compacted revisions.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::handlers::{App, Query, decode};
use super::resources::Resource;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::table;
use super::watch_cache::CachedEvent;
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
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut enc = Encoder {
        res,
        table,
        columns_sent: false,
    };
    let store = app.store.clone();
    let cache = app.watch_cache.clone();
    app.tasks.spawn(async move {
        for o in initial {
            if tx.send(enc.event("ADDED", o)).await.is_err() {
                return;
            }
        }
        if send_initial && tx.send(enc.bookmark(start, true)).await.is_err() {
            return;
        }
        // The shared cache serves recent revisions; older ones (or a restarting cache) go to
        // the store directly, which answers Compacted when they are gone.
        let mut source = match cache.subscribe(res, start).await {
            Some(sub) => Source::Cache {
                replay: sub.replay.into(),
                live: sub.live,
            },
            None => match store.watch(&prefix, start).await {
                Ok(s) => Source::Store(s),
                Err(StoreError::Compacted { requested, oldest }) => {
                    let _ = tx
                        .send(enc.event("ERROR", expired(requested, oldest)))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(enc.event("ERROR", ApiError::from(e).status_json()))
                        .await;
                    return;
                }
            },
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        let mut last = start;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    if tx.send(enc.bookmark(last, false)).await.is_err() {
                        return;
                    }
                }
                ev = source.next(res) => {
                    let ev = match ev {
                        Next::Event(ev) => ev,
                        Next::Skip => continue,
                        Next::Compacted(requested, oldest) => {
                            let _ = tx.send(enc.event("ERROR", expired(requested, oldest))).await;
                            return;
                        }
                        // Lagging or a broken store watch: end the stream; clients re-list.
                        Next::End => return,
                    };
                    if ev.revision <= start || !ev.key.starts_with(&prefix) {
                        continue;
                    }
                    last = ev.revision;
                    let Some(ty) = convert(&filter, &ev) else {
                        continue;
                    };
                    let line = if enc.table {
                        enc.event(ty, ev.obj.clone())
                    } else {
                        ev.line(ty)
                    };
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>),
    );
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

/// Where a watch's events come from.
enum Source {
    Cache {
        replay: std::collections::VecDeque<Arc<CachedEvent>>,
        live: tokio::sync::broadcast::Receiver<Arc<CachedEvent>>,
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
    async fn next(&mut self, res: &'static Resource) -> Next {
        match self {
            Source::Cache { replay, live } => {
                if let Some(e) = replay.pop_front() {
                    return Next::Event(e);
                }
                match live.recv().await {
                    Ok(e) => Next::Event(e),
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
