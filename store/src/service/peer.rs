//! `flotilla.raft.v1.RaftPeer`: Raft messages and leader-forwarded requests between members.
use std::sync::Arc;

use tonic::{Request, Response, Status};

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
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftBytes>, Status> {
    let data = encode(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftBytes { data }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        let start = std::time::Instant::now();
        let req = decode(&request.into_inner().data).map_err(bad)?;
        let res = reply(&self.inner.raft.append_entries(req).await);
        self.inner
            .stats
            .h_follower_append
            .observe("follower append", start.elapsed());
        res
    }

    async fn vote(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.inner.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        let req = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.inner.raft.install_snapshot(req).await)
    }

    async fn forward(&self, request: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let req: ForwardRequest = decode(&request.into_inner().data).map_err(bad)?;
        reply(&self.inner.handle_as_leader(req).await)
    }
}
