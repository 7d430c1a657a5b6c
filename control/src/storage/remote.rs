//! [`Store`] over the etcd v3 gRPC API: the Flotilla store or a real etcd 3.4.
//!
//! Writes are transactions guarded by the key's mod revision (`ModRevision == expected`, or
//! `== 0` for create), like Kubernetes' etcd3 storage, so stale writers get `Conflict`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use store::pb::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    StatusRequest, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest, compare,
    kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, response_op,
    watch_client::WatchClient, watch_request,
};
use store::pb::mvccpb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::{
    Guard, PrefixProbe, Revision, Store, StoreError, TxnOp, Versioned, WatchEvent, WatchStream,
};

/// Per-call limit: past it the store counts as unavailable (the API answers 503).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Large lists (10k pods) exceed tonic's 4 MiB default.
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// How often the leader is looked up again (leadership moves rarely; a stale choice only
/// costs the follower's forwarding hop).
const LEADER_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Store client over etcd v3. Clones share the connection.
#[derive(Clone)]
pub struct RemoteStore {
    /// Balanced over every endpoint: the fallback while no leader is known.
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    /// Per-member clients, to send requests to the leader (multi-endpoint stores only).
    members: Option<Arc<Members>>,
}

/// KV requests go to the Raft leader when it is known: a follower would forward each one
/// over another gRPC hop (Flotilla store) or a Raft message (etcd), work that competes for
/// the same few CPUs as the cluster itself.
struct Members {
    kv: Vec<KvClient<Channel>>,
    maintenance: Vec<MaintenanceClient<Channel>>,
    state: Mutex<LeaderChoice>,
    probing: AtomicBool,
}

#[derive(Default)]
struct LeaderChoice {
    leader: Option<usize>,
    probed_at: Option<tokio::time::Instant>,
}

impl Members {
    /// The leader's client if known; starts a background probe when the choice is stale.
    fn preferred(self: &Arc<Self>) -> Option<(usize, KvClient<Channel>)> {
        let (leader, stale) = match self.state.lock() {
            Ok(st) => (
                st.leader,
                st.probed_at
                    .is_none_or(|t| t.elapsed() >= LEADER_PROBE_EVERY),
            ),
            Err(_) => return None,
        };
        if stale
            && !self.probing.swap(true, Ordering::AcqRel)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let me = self.clone();
            rt.spawn(async move {
                let found = me.probe().await;
                if let Ok(mut st) = me.state.lock() {
                    st.leader = found;
                    st.probed_at = Some(tokio::time::Instant::now());
                }
                me.probing.store(false, Ordering::Release);
            });
        }
        leader.and_then(|i| self.kv.get(i).map(|c| (i, c.clone())))
    }

    /// Asks every member for its status; the leader is the member whose own id is the
    /// leader id it reports.
    async fn probe(&self) -> Option<usize> {
        let asks = self.maintenance.iter().enumerate().map(|(i, m)| {
            let mut m = m.clone();
            async move {
                let r = tokio::time::timeout(Duration::from_secs(1), m.status(StatusRequest {}))
                    .await
                    .ok()?
                    .ok()?
                    .into_inner();
                let me = r.header.as_ref()?.member_id;
                (r.leader != 0 && r.leader == me).then_some(i)
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .next()
    }

    /// Forgets a leader that failed a call, so the next calls use the balanced channel.
    fn failed(&self, index: usize) {
        if let Ok(mut st) = self.state.lock()
            && st.leader == Some(index)
        {
            st.leader = None;
            st.probed_at = None;
        }
    }
}

impl RemoteStore {
    /// Connects lazily to `endpoints` (`http://host:port`, comma-free list); calls fail with
    /// `Unavailable` until a member answers.
    pub fn connect(endpoints: &[String]) -> Result<RemoteStore, StoreError> {
        let mut eps = Vec::new();
        for e in endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            let ep = Endpoint::from_shared(url.clone())
                .map_err(|err| {
                    StoreError::Internal(format!("invalid store endpoint {url:?}: {err}"))
                })?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            eps.push(ep);
        }
        let channel = match eps.len() {
            0 => return Err(StoreError::Internal("no store endpoints given".into())),
            1 => eps.remove(0).connect_lazy(),
            _ => {
                let singles: Vec<Channel> = eps.iter().map(|e| e.connect_lazy()).collect();
                let mut s = Self::from_channel(Channel::balance_list(eps.into_iter()));
                s.members = Some(Arc::new(Members {
                    kv: singles
                        .iter()
                        .map(|c| {
                            KvClient::new(c.clone())
                                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                        })
                        .collect(),
                    maintenance: singles.into_iter().map(MaintenanceClient::new).collect(),
                    state: Mutex::new(LeaderChoice::default()),
                    probing: AtomicBool::new(false),
                }));
                return Ok(s);
            }
        };
        Ok(Self::from_channel(channel))
    }

    /// Uses a caller-built channel (tests, custom transports).
    pub fn from_channel(channel: Channel) -> RemoteStore {
        RemoteStore {
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            watch: WatchClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            members: None,
        }
    }

    /// The client for one KV call: the leader's when known, else the balanced one.
    fn kv_client(&self) -> (Option<usize>, KvClient<Channel>) {
        match self.members.as_ref().and_then(Members::preferred) {
            Some((i, c)) => (Some(i), c),
            None => (None, self.kv.clone()),
        }
    }

    /// Runs one KV call on the preferred member, forgetting it if it is unreachable.
    async fn kv_call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (member, client) = self.kv_client();
        let r = call(f(client)).await;
        if let (Err(StoreError::Unavailable(_)), Some(i), Some(m)) = (&r, member, &self.members) {
            m.failed(i);
        }
        r
    }

    async fn raw_txn(&self, req: TxnRequest) -> Result<TxnResponse, StoreError> {
        self.kv_call(|mut kv| async move { kv.txn(req).await })
            .await
    }
}

fn map_status(s: &tonic::Status) -> StoreError {
    use tonic::Code;
    match s.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => StoreError::Unavailable(s.message().to_string()),
        _ => StoreError::Internal(format!("{:?}: {}", s.code(), s.message())),
    }
}

async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(map_status(&s)),
        Err(_) => Err(StoreError::Unavailable("store call timed out".into())),
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn versioned(kv: mvccpb::KeyValue) -> Versioned {
    Versioned {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: Bytes::from(kv.value),
        mod_revision: kv.mod_revision,
    }
}

fn mod_equals(key: &str, rev: Revision) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(compare::TargetUnion::ModRevision(rev)),
        range_end: Vec::new(),
    }
}

fn put_op(key: &str, value: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })),
    }
}

fn get_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

fn revision_of(resp: &TxnResponse) -> Result<Revision, StoreError> {
    resp.header
        .as_ref()
        .map(|h| h.revision)
        .ok_or_else(|| StoreError::Internal("response without header".into()))
}

/// The current value from a failed guarded write's `Else(Get)`.
fn failure_current(resp: TxnResponse) -> Option<Versioned> {
    resp.responses.into_iter().find_map(|r| match r.response {
        Some(response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next().map(versioned),
        _ => None,
    })
}

impl Store for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let req = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let resp = self
            .kv_call(|mut kv| async move { kv.range(req).await })
            .await?;
        Ok(resp.kvs.into_iter().next().map(versioned))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Versioned>, Revision), StoreError> {
        let req = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        let resp = self
            .kv_call(|mut kv| async move { kv.range(req).await })
            .await?;
        let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        Ok((resp.kvs.into_iter().map(versioned).collect(), rev))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        let resp = self
            .raw_txn(TxnRequest {
                compare: vec![mod_equals(key, 0)],
                success: vec![put_op(key, value)],
                failure: Vec::new(),
            })
            .await?;
        if !resp.succeeded {
            return Err(StoreError::AlreadyExists);
        }
        revision_of(&resp)
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Revision,
    ) -> Result<Revision, StoreError> {
        let resp = self
            .raw_txn(TxnRequest {
                compare: vec![mod_equals(key, expected)],
                success: vec![put_op(key, value)],
                failure: vec![get_op(key)],
            })
            .await?;
        if resp.succeeded {
            return revision_of(&resp);
        }
        match failure_current(resp) {
            None => Err(StoreError::NotFound),
            Some(cur) => Err(StoreError::Conflict { current: Some(cur) }),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let del = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                },
            )),
        };
        let resp = match expected {
            Some(rev) => {
                self.raw_txn(TxnRequest {
                    compare: vec![mod_equals(key, rev)],
                    success: vec![del],
                    failure: vec![get_op(key)],
                })
                .await?
            }
            None => {
                // "exists" = mod revision greater than 0.
                let exists = Compare {
                    result: compare::CompareResult::Greater as i32,
                    ..mod_equals(key, 0)
                };
                self.raw_txn(TxnRequest {
                    compare: vec![exists],
                    success: vec![del],
                    failure: Vec::new(),
                })
                .await?
            }
        };
        if resp.succeeded {
            return revision_of(&resp);
        }
        match failure_current(resp) {
            None => Err(StoreError::NotFound),
            Some(cur) => Err(StoreError::Conflict { current: Some(cur) }),
        }
    }

    async fn probe(&self, prefix: &str, after: Revision) -> Result<PrefixProbe, StoreError> {
        // etcd counts the range before the mod-revision filter and applies `limit` after it,
        // so `count` is every key and `kvs` holds one key written after `after`, if any.
        let req = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            min_mod_revision: after + 1,
            keys_only: true,
            limit: 1,
            ..Default::default()
        };
        let resp = self
            .kv_call(|mut kv| async move { kv.range(req).await })
            .await?;
        Ok(PrefixProbe {
            count: usize::try_from(resp.count).unwrap_or(0),
            written_after: !resp.kvs.is_empty(),
            revision: resp.header.as_ref().map(|h| h.revision).unwrap_or(0),
        })
    }

    async fn txn(&self, guards: Vec<Guard>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        let resp = self
            .raw_txn(TxnRequest {
                compare: guards
                    .iter()
                    .map(|g| mod_equals(&g.key, g.mod_revision))
                    .collect(),
                success: ops
                    .into_iter()
                    .map(|op| match op {
                        TxnOp::Put { key, value } => put_op(&key, value),
                        TxnOp::Delete { key } => RequestOp {
                            request: Some(request_op::Request::RequestDeleteRange(
                                DeleteRangeRequest {
                                    key: key.into_bytes(),
                                    ..Default::default()
                                },
                            )),
                        },
                    })
                    .collect(),
                failure: Vec::new(),
            })
            .await?;
        if !resp.succeeded {
            return Err(StoreError::Conflict { current: None });
        }
        revision_of(&resp)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let req = CompactionRequest {
            revision,
            physical: false,
        };
        match self
            .kv_call(|mut kv| async move { kv.compact(req).await })
            .await
        {
            Ok(_) => Ok(()),
            // etcd: "mvcc: required revision has been compacted" (already done).
            Err(StoreError::Internal(m)) if m.contains("compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::channel::<WatchRequest>(4);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision: after + 1,
                    prev_kv: true,
                    ..Default::default()
                },
            )),
        };
        tx.send(create)
            .await
            .map_err(|_| StoreError::Internal("watch request channel closed".into()))?;
        let mut client = self.watch.clone();
        let mut responses =
            call(client.watch(tokio_stream::wrappers::ReceiverStream::new(rx))).await?;
        // The first answer confirms the watch, or cancels it because `after` was compacted.
        let first = tokio::time::timeout(CALL_TIMEOUT, responses.next())
            .await
            .map_err(|_| StoreError::Unavailable("watch creation timed out".into()))?;
        let first = match first {
            Some(Ok(r)) => r,
            Some(Err(s)) => return Err(map_status(&s)),
            None => return Err(StoreError::Unavailable("watch stream closed".into())),
        };
        if first.compact_revision > 0 && first.canceled {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: first.compact_revision,
            });
        }
        if first.canceled {
            return Err(StoreError::Internal(format!(
                "watch canceled: {}",
                first.cancel_reason
            )));
        }
        let pending: Vec<Result<WatchEvent, StoreError>> = convert_events(first.events);
        // `tx` lives in the stream state: dropping it would end the watch on the server.
        let stream = futures::stream::iter(pending).chain(
            futures::stream::unfold(
                (responses, tx, false),
                move |(mut responses, tx, done)| async move {
                    if done {
                        return None;
                    }
                    loop {
                        match responses.next().await {
                            Some(Ok(r)) if r.canceled && r.compact_revision > 0 => {
                                let e = Err(StoreError::Compacted {
                                    requested: after,
                                    oldest: r.compact_revision,
                                });
                                return Some((
                                    futures::stream::iter(vec![e]),
                                    (responses, tx, true),
                                ));
                            }
                            Some(Ok(r)) if r.canceled => {
                                let e = Err(StoreError::Unavailable(format!(
                                    "watch canceled: {}",
                                    r.cancel_reason
                                )));
                                return Some((
                                    futures::stream::iter(vec![e]),
                                    (responses, tx, true),
                                ));
                            }
                            Some(Ok(r)) if r.events.is_empty() => continue,
                            Some(Ok(r)) => {
                                return Some((
                                    futures::stream::iter(convert_events(r.events)),
                                    (responses, tx, false),
                                ));
                            }
                            Some(Err(s)) => {
                                return Some((
                                    futures::stream::iter(vec![Err(map_status(&s))]),
                                    (responses, tx, true),
                                ));
                            }
                            None => return None,
                        }
                    }
                },
            )
            .flatten(),
        );
        Ok(Box::pin(stream))
    }

    async fn ready(&self) -> bool {
        self.get("/registry/health").await.is_ok()
    }
}

fn convert_events(events: Vec<mvccpb::Event>) -> Vec<Result<WatchEvent, StoreError>> {
    events
        .into_iter()
        .filter_map(|e| {
            let kv = e.kv?;
            let prev = e.prev_kv.filter(|p| p.mod_revision > 0).map(versioned);
            Some(Ok(if e.r#type == mvccpb::event::EventType::Delete as i32 {
                WatchEvent::Delete {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    revision: kv.mod_revision,
                    prev,
                }
            } else {
                WatchEvent::Put {
                    kv: versioned(kv),
                    prev,
                }
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    /// Conformance against an embedded one-member Flotilla store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_embedded_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::storage::embedded::start(dir.path())
            .await
            .expect("store starts");
        let s = RemoteStore::connect(&[format!("http://{}", node.client_addr())]).expect("connect");
        crate::storage::conformance::run_all(s).await;
        node.shutdown().await;
    }
}
