//! `flotilla.raft.v1.RaftPeer`: Raft messages and leader-forwarded requests between members.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::node::{ForwardRequest, Inner};
use crate::pb::raftpb::RaftBytes;
use crate::pb::raftpb::raft_peer_server::RaftPeer;
use crate::types::{decode, encode};

pub(crate) struct PeerService {
    inner: Arc<Inner>,
}

impl PeerService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// Serves a streamed RPC: each request goes through `handle` and is answered in order,
    /// one at a time, inside the response stream's own task (the peer sends the next request
    /// only after the answer). The stream ends when the member stops: the peer keeps it open,
    /// and the server's graceful shutdown waits for open streams, whose handlers hold the
    /// member (and with it the data dir's lock).
    fn serve_stream<F, Fut>(
        &self,
        request: Request<Streaming<RaftBytes>>,
        handle: F,
    ) -> Response<ReplyStream>
    where
        F: Fn(Arc<Inner>, RaftBytes) -> Fut + Send + 'static,
        Fut: Future<Output = Result<RaftBytes, Status>> + Send + 'static,
    {
        let inner = self.inner.clone();
        let replies = request.into_inner().then(move |msg| {
            let reply = msg.map(|m| handle(inner.clone(), m));
            async move { reply?.await }
        });
        let stopped = self.inner.cancel.clone().cancelled_owned();
        Response::new(Box::pin(replies.take_until(stopped)))
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<RaftBytes, Status> {
    let data = encode(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(RaftBytes { data })
}

/// Hands one AppendEntries message to Raft; the unary and the streamed RPC share it.
async fn append_entries(inner: &Inner, data: &[u8]) -> Result<RaftBytes, Status> {
    let start = std::time::Instant::now();
    let req = decode(data).map_err(bad)?;
    let res = reply(&inner.raft.append_entries(req).await);
    inner
        .stats
        .h_follower_append
        .observe("follower append", start.elapsed(), inner.stats.slow);
    res
}

/// Serves one forwarded request; the unary and the streamed RPC share it.
async fn forward(inner: &Inner, data: &[u8]) -> Result<RaftBytes, Status> {
    let req: ForwardRequest = decode(data).map_err(bad)?;
    reply(&inner.handle_forwarded(req).await)
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<RaftBytes, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        append_entries(&self.inner, &request.into_inner().data)
            .await
            .map(Response::new)
    }

    type AppendEntriesStreamStream = ReplyStream;

    async fn append_entries_stream(
        &self,
        request: Request<Streaming<RaftBytes>>,
    ) -> Result<Response<ReplyStream>, Status> {
        Ok(self.serve_stream(request, |inner, msg| async move {
            append_entries(&inner, &msg.data).await
        }))
    }

    async fn vote(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.inner.raft.vote(req).await).map(Response::new)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.inner.raft.install_snapshot(req).await).map(Response::new)
    }

    async fn forward(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        forward(&self.inner, &request.into_inner().data)
            .await
            .map(Response::new)
    }

    type ForwardStreamStream = ReplyStream;

    async fn forward_stream(
        &self,
        request: Request<Streaming<RaftBytes>>,
    ) -> Result<Response<ReplyStream>, Status> {
        Ok(self.serve_stream(request, |inner, msg| async move {
            forward(&inner, &msg.data).await
        }))
    }
}
