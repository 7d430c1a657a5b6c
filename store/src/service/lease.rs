//! `etcdserverpb.Lease`: Grant, Revoke, KeepAlive (stream), TimeToLive, Leases.
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::EtcdError;
use crate::node::Inner;
use crate::pb::etcdserverpb::lease_server::Lease;
use crate::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::types::WriteOp;

/// etcd's `MaxLeaseTTL`.
const MAX_LEASE_TTL: i64 = 9_000_000_000;

pub(crate) struct LeaseService {
    inner: Arc<Inner>,
}

impl LeaseService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// etcd's minimum TTL: ceil(1.5 x election timeout), so a lease outlives a leader change.
    fn min_ttl(&self) -> i64 {
        let ms = self.inner.tunables.election_timeout.as_millis() as i64 * 3 / 2;
        ((ms + 999) / 1000).max(1)
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let r = request.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        let ttl = r.ttl.max(self.min_ttl());
        let id = if r.id == 0 {
            // Positive 63-bit ids, like etcd's generator.
            (rand::random::<u64>() >> 1).max(1) as i64
        } else {
            r.id
        };
        let reply = self.inner.write(WriteOp::LeaseGrant { id, ttl }).await?;
        reply.result.map_err(Status::from)?;
        Ok(Response::new(LeaseGrantResponse {
            header: self.inner.header(reply.revision),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let r = request.into_inner();
        let reply = self.inner.write(WriteOp::LeaseRevoke { id: r.id }).await?;
        reply.result.map_err(Status::from)?;
        Ok(Response::new(LeaseRevokeResponse {
            header: self.inner.header(reply.revision),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut input = request.into_inner();
        let inner = self.inner.clone();
        let cancel = inner.cancel.clone();
        let output = async_stream(
            move |tx| async move {
                loop {
                    let msg = tokio::select! {
                        _ = cancel.cancelled() => return,
                        m = input.next() => m,
                    };
                    let req = match msg {
                        None | Some(Err(_)) => return,
                        Some(Ok(r)) => r,
                    };
                    let ttl = match inner.lease_keep_alive(req.id).await {
                        Ok(t) => t,
                        // etcd answers an unknown lease with TTL 0, not an error.
                        Err(EtcdError::LeaseNotFound) => 0,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    let resp = LeaseKeepAliveResponse {
                        header: inner.header(inner.current_revision()),
                        id: req.id,
                        ttl,
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            },
            &self.inner,
        );
        Ok(Response::new(output))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = request.into_inner();
        // Attached keys come from local state: make it current first.
        self.inner.linearizable_barrier().await?;
        let remaining = match self.inner.lease_remaining(r.id).await {
            Ok(t) => t,
            Err(EtcdError::LeaseNotFound) => {
                return Ok(Response::new(LeaseTimeToLiveResponse {
                    header: self.inner.header(self.inner.current_revision()),
                    id: r.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                }));
            }
            Err(e) => return Err(e.into()),
        };
        let st = self.inner.sm.read();
        let (granted, keys) = match st.mvcc.lease(r.id) {
            Some(l) => (
                l.ttl,
                if r.keys {
                    l.keys.iter().map(|k| k.to_vec()).collect()
                } else {
                    Vec::new()
                },
            ),
            None => (0, Vec::new()),
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.inner.header(st.mvcc.revision()),
            id: r.id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.inner.linearizable_barrier().await?;
        let st = self.inner.sm.read();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.inner.header(st.mvcc.revision()),
            leases: st.mvcc.leases().map(|(id, _)| LeaseStatus { id }).collect(),
        }))
    }
}

/// A response stream fed by a task on the member's tracker.
pub(crate) fn async_stream<T, F, Fut>(
    f: F,
    inner: &Inner,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    inner.tracker.spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
