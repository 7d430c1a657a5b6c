//! Raft transport over tonic (`flotilla.raft.v1.RaftPeer`), behind openraft's
//! `RaftNetworkFactory` so tests can wrap or replace it (fault injection).
//!
//! Every RPC is bounded by `RPCOption::soft_ttl()`: without a deadline a partition can wedge a
//! replication stream forever.
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::pb::raftpb::RaftBytes;
use crate::pb::raftpb::raft_peer_client::RaftPeerClient;
use crate::types::{Member, TypeConfig, decode, encode};

/// Creates tonic connections to peers from their `Member::peer_url`.
///
/// Channels are cached per URL: openraft asks for a new client for every replication stream
/// and for every ReadIndex round, and one HTTP/2 connection per peer carries them all.
#[derive(Debug, Clone, Default)]
pub struct TonicNetworkFactory {
    max_message_bytes: usize,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl TonicNetworkFactory {
    /// A factory whose clients accept messages up to `max_message_bytes` (snapshot chunks and
    /// log batches).
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            channels: Arc::default(),
        }
    }

    fn channel(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(url) {
            return Ok(ch.clone());
        }
        let ch = peer_channel(url)?;
        map.insert(url.to_owned(), ch.clone());
        Ok(ch)
    }
}

/// Opens a lazily connecting channel to a peer URL.
pub(crate) fn peer_channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// One peer connection.
#[derive(Debug)]
pub struct TonicConnection {
    target: u64,
    client: Option<RaftPeerClient<Channel>>,
    error: Option<String>,
}

impl RaftNetworkFactory<TypeConfig> for TonicNetworkFactory {
    type Network = TonicConnection;

    async fn new_client(&mut self, target: u64, node: &Member) -> TonicConnection {
        match self.channel(&node.peer_url) {
            Ok(ch) => {
                let max = self.max_message_bytes.max(64 * 1024 * 1024);
                TonicConnection {
                    target,
                    client: Some(
                        RaftPeerClient::new(ch)
                            .max_decoding_message_size(max)
                            .max_encoding_message_size(max),
                    ),
                    error: None,
                }
            }
            Err(e) => TonicConnection {
                target,
                client: None,
                error: Some(format!("bad peer url {:?}: {e}", node.peer_url)),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl TonicConnection {
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        f: F,
    ) -> Result<Resp, RPCError<u64, Member, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, RaftBytes) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftBytes>, tonic::Status>>,
    {
        let Some(client) = self.client.clone() else {
            let msg = self.error.clone().unwrap_or_default();
            return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                msg,
            ))));
        };
        let data = encode(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        let start = std::time::Instant::now();
        let res = tokio::time::timeout(option.soft_ttl(), f(client, RaftBytes { data })).await;
        if start.elapsed() >= Duration::from_millis(20) {
            tracing::debug!(target: "store::stats", phase = "peer rpc", to = self.target,
                ms = start.elapsed().as_secs_f64() * 1e3, "slow");
        }
        let resp = match res {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&TransportError(
                    format!(
                        "rpc to {} timed out after {:?}",
                        self.target,
                        option.soft_ttl()
                    ),
                ))));
            }
            Ok(Err(status)) => {
                let e = TransportError(format!("rpc to {}: {status}", self.target));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<u64, E>> = decode(&resp.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for TonicConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(&rpc, &option, |mut c, b| async move {
            c.append_entries(b).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(&rpc, &option, |mut c, b| async move {
            c.install_snapshot(b).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(&rpc, &option, |mut c, b| async move { c.vote(b).await })
            .await
    }
}
