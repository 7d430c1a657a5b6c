//! `etcdserverpb.Watch`: one bidirectional stream multiplexing many watches.
//!
//! Every stream owns one subscription to the state machine's event feed. A new watch first
//! replays history from its start revision up to the revision the feed has reached, then
//! follows the feed, so events are ordered, never duplicated and never skipped. A feed that
//! lags (slow client) is re-joined the same way.
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::EtcdError;
use crate::mvcc::{RevEvents, in_range};
use crate::node::Inner;
use crate::pb::etcdserverpb::watch_server::Watch;
use crate::pb::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_create_request::FilterType,
    watch_request,
};
use crate::pb::mvccpb::Event;
use crate::pb::mvccpb::event::EventType;

/// Progress notifications for watches that asked for them.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Events per response during a history replay (responses stay well below gRPC limits).
const REPLAY_CHUNK: usize = 1000;

pub(crate) struct WatchService {
    inner: Arc<Inner>,
}

impl WatchService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Go clients set `hasleader=true` (WithRequireLeader): such streams must fail over when
        // this member loses its leader.
        let require_leader = request
            .metadata()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        // Events and header revisions come from local state.
        self.inner.local_read_barrier().await?;
        let input = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move {
            let mut s = Session::new(inner, tx);
            s.require_leader = require_leader;
            s.run(input).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// Next revision this watcher needs.
    next_rev: i64,
    /// Sent something since the last progress tick.
    active: bool,
}

impl Watcher {
    fn select(&self, events: &[Event]) -> Vec<Event> {
        events
            .iter()
            .filter(|e| {
                let key = e.kv.as_ref().map_or(&[][..], |kv| kv.key.as_slice());
                let put = e.r#type == EventType::Put as i32;
                in_range(key, &self.key, &self.range_end)
                    && !(put && self.no_put)
                    && (put || !self.no_delete)
            })
            // Copy `prev_kv` (a whole value) only for watchers that asked for it.
            .map(|e| Event {
                r#type: e.r#type,
                kv: e.kv.clone(),
                prev_kv: if self.prev_kv { e.prev_kv.clone() } else { None },
            })
            .collect()
    }
}

struct Session {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    feed: broadcast::Receiver<Arc<Vec<RevEvents>>>,
    /// Every revision up to this one has been handed to the watchers.
    feed_rev: i64,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    require_leader: bool,
    leaderless_since: Option<tokio::time::Instant>,
}

enum Flow {
    Continue,
    Stop,
}

impl Session {
    fn new(inner: Arc<Inner>, tx: mpsc::Sender<Result<WatchResponse, Status>>) -> Self {
        let (feed, feed_rev) = {
            let st = inner.sm.read();
            (inner.sm.events.subscribe(), st.mvcc.revision())
        };
        Self {
            inner,
            tx,
            feed,
            feed_rev,
            watchers: BTreeMap::new(),
            next_id: 0,
            require_leader: false,
            leaderless_since: None,
        }
    }

    async fn send(&self, resp: WatchResponse) -> Flow {
        if self.tx.send(Ok(resp)).await.is_err() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: self.inner.header(revision),
            watch_id,
            ..WatchResponse::default()
        }
    }

    async fn run(&mut self, mut input: Streaming<WatchRequest>) {
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.tick().await;
        let mut leader_check = tokio::time::interval(Duration::from_millis(500));
        let cancel = self.inner.cancel.clone();
        loop {
            let flow = tokio::select! {
                _ = cancel.cancelled() => Flow::Stop,
                msg = input.next() => match msg {
                    None | Some(Err(_)) => Flow::Stop,
                    Some(Ok(req)) => self.on_request(req).await,
                },
                batch = self.feed.recv() => match batch {
                    Ok(batch) => self.on_batch(&batch).await,
                    Err(RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "watch feed lagged; replaying from history");
                        self.rejoin().await
                    }
                    Err(RecvError::Closed) => Flow::Stop,
                },
                _ = progress.tick() => self.on_progress_tick().await,
                _ = leader_check.tick(), if self.require_leader => self.check_leader().await,
            };
            if matches!(flow, Flow::Stop) {
                return;
            }
        }
    }

    async fn on_request(&mut self, req: WatchRequest) -> Flow {
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    let mut r = self.response(c.watch_id, self.feed_rev);
                    r.canceled = true;
                    self.send(r).await
                } else {
                    Flow::Continue
                }
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                // Every watcher has been handed everything up to feed_rev.
                let r = self.response(-1, self.feed_rev);
                self.send(r).await
            }
            None => Flow::Continue,
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Flow {
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        if self.watchers.contains_key(&id) {
            let mut r = self.response(id, self.feed_rev);
            r.created = true;
            r.canceled = true;
            r.cancel_reason = "etcdserver: watch id already exists".to_owned();
            return self.send(r).await;
        }
        if c.key.is_empty() {
            let mut r = self.response(id, self.feed_rev);
            r.created = true;
            r.canceled = true;
            r.cancel_reason = EtcdError::EmptyKey.to_string();
            return self.send(r).await;
        }
        let compact = self.inner.sm.read().mvcc.compact_revision();
        let mut created = self.response(id, self.feed_rev);
        created.created = true;
        if let Flow::Stop = self.send(created).await {
            return Flow::Stop;
        }
        if c.start_revision > 0 && c.start_revision < compact {
            let mut r = self.response(id, self.feed_rev);
            r.canceled = true;
            r.compact_revision = compact;
            r.cancel_reason = EtcdError::Compacted.to_string();
            return self.send(r).await;
        }
        let w = Watcher {
            key: c.key.clone(),
            range_end: c.range_end.clone(),
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
            next_rev: if c.start_revision > 0 {
                c.start_revision
            } else {
                self.feed_rev + 1
            },
            active: false,
        };
        self.watchers.insert(id, w);
        self.catch_up(id, self.feed_rev).await
    }

    /// Replays history for watcher `id` up to `upto` (inclusive).
    async fn catch_up(&mut self, id: i64, upto: i64) -> Flow {
        let Some(w) = self.watchers.get(&id) else {
            return Flow::Continue;
        };
        if w.next_rev > upto {
            return Flow::Continue;
        }
        let (history, compact) = {
            let st = self.inner.sm.read();
            (
                st.mvcc
                    .events_between(w.next_rev, upto, &w.key, &w.range_end),
                st.mvcc.compact_revision(),
            )
        };
        if w.next_rev < compact {
            // Compacted while the watch was behind: etcd cancels it with compact_revision.
            self.watchers.remove(&id);
            let mut r = self.response(id, upto);
            r.canceled = true;
            r.compact_revision = compact;
            r.cancel_reason = EtcdError::Compacted.to_string();
            return self.send(r).await;
        }
        let mut pending: Vec<Event> = Vec::new();
        let mut last_rev = 0;
        for rev_events in &history {
            pending.extend(w.select(&rev_events.events));
            last_rev = rev_events.revision;
            if pending.len() >= REPLAY_CHUNK {
                let mut r = self.response(id, last_rev);
                r.events = std::mem::take(&mut pending);
                if let Flow::Stop = self.send(r).await {
                    return Flow::Stop;
                }
            }
        }
        if !pending.is_empty() {
            let mut r = self.response(id, last_rev);
            r.events = pending;
            if let Flow::Stop = self.send(r).await {
                return Flow::Stop;
            }
        }
        if let Some(w) = self.watchers.get_mut(&id) {
            w.next_rev = upto + 1;
            w.active |= last_rev > 0;
        }
        Flow::Continue
    }

    async fn on_batch(&mut self, batch: &[RevEvents]) -> Flow {
        let Some(last) = batch.last().map(|b| b.revision) else {
            // A snapshot replaced the state machine: replay what it brought from history.
            return self.rejoin().await;
        };
        let mut out: Vec<(i64, Vec<Event>)> = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            let mut events = Vec::new();
            for rev_events in batch {
                if rev_events.revision >= w.next_rev {
                    events.extend(w.select(&rev_events.events));
                }
            }
            w.next_rev = w.next_rev.max(last + 1);
            if !events.is_empty() {
                w.active = true;
                out.push((*id, events));
            }
        }
        self.feed_rev = self.feed_rev.max(last);
        for (id, events) in out {
            let mut r = self.response(id, last);
            r.events = events;
            if let Flow::Stop = self.send(r).await {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// After the feed lagged: subscribe again and replay what was missed from history.
    async fn rejoin(&mut self) -> Flow {
        let now = {
            let st = self.inner.sm.read();
            self.feed = self.inner.sm.events.subscribe();
            st.mvcc.revision()
        };
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            if let Flow::Stop = self.catch_up(id, now).await {
                return Flow::Stop;
            }
        }
        self.feed_rev = now;
        Flow::Continue
    }

    /// etcd cancels require-leader streams after about three election timeouts without one.
    async fn check_leader(&mut self) -> Flow {
        let has_leader = self.inner.raft.metrics().borrow().current_leader.is_some();
        if has_leader {
            self.leaderless_since = None;
            return Flow::Continue;
        }
        let since = *self
            .leaderless_since
            .get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() > self.inner.tunables.election_timeout * 3 {
            let _ = self.tx.send(Err(EtcdError::NoLeader.into())).await;
            return Flow::Stop;
        }
        Flow::Continue
    }

    async fn on_progress_tick(&mut self) -> Flow {
        let mut due = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if w.progress_notify && !w.active {
                due.push(*id);
            }
            w.active = false;
        }
        for id in due {
            let r = self.response(id, self.feed_rev);
            if let Flow::Stop = self.send(r).await {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::mvccpb::KeyValue;

    fn watcher(prev_kv: bool, no_put: bool) -> Watcher {
        Watcher {
            key: b"a/".to_vec(),
            range_end: b"a0".to_vec(),
            prev_kv,
            no_put,
            no_delete: false,
            progress_notify: false,
            next_rev: 1,
            active: false,
        }
    }

    fn put(key: &str, value: &str, prev: &str) -> Event {
        let kv = |v: &str| KeyValue {
            key: key.into(),
            value: v.into(),
            ..KeyValue::default()
        };
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv(value)),
            prev_kv: Some(kv(prev)),
        }
    }

    #[test]
    fn select_filters_by_range_and_type_and_copies_prev_kv_only_when_asked() {
        let events = [put("a/1", "new", "old"), put("b", "x", "y")];
        let plain = watcher(false, false).select(&events);
        assert_eq!(plain.len(), 1, "b is outside [a/, a0)");
        assert_eq!(
            plain[0].kv.as_ref().map(|kv| &kv.value[..]),
            Some(&b"new"[..])
        );
        assert_eq!(plain[0].prev_kv, None);
        let with_prev = watcher(true, false).select(&events);
        assert_eq!(with_prev, vec![events[0].clone()]);
        assert!(watcher(false, true).select(&events).is_empty(), "noput");
    }
}
