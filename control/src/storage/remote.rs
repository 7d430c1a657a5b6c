//! [`Store`] over the etcd v3 gRPC API: the Flotilla store or a real etcd 3.4.
//!
//! Writes are transactions guarded by the key's mod revision (`ModRevision == expected`, or
//! `== 0` for create), like Kubernetes' etcd3 storage, so stale writers get `Conflict`.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use store::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchRequest, compare, kv_client::KvClient, request_op, response_op,
    watch_client::WatchClient, watch_request,
};
use store::pb::mvccpb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::{Revision, Store, StoreError, Versioned, WatchEvent, WatchStream};

/// Per-call limit: past it the store counts as unavailable (the API answers 503).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Large lists (10k pods) exceed tonic's 4 MiB default.
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// Store client over etcd v3. Clones share the connection.
#[derive(Clone)]
pub struct RemoteStore {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
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
            _ => Channel::balance_list(eps.into_iter()),
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
        }
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, StoreError> {
        let mut kv = self.kv.clone();
        call(kv.txn(req)).await
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
        let mut kv = self.kv.clone();
        let resp = call(kv.range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        }))
        .await?;
        Ok(resp.kvs.into_iter().next().map(versioned))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Versioned>, Revision), StoreError> {
        let mut kv = self.kv.clone();
        let resp = call(kv.range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        }))
        .await?;
        let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        Ok((resp.kvs.into_iter().map(versioned).collect(), rev))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        let resp = self
            .txn(TxnRequest {
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
            .txn(TxnRequest {
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
                self.txn(TxnRequest {
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
                self.txn(TxnRequest {
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
