//! Raft transport over tonic (`flotilla.raft.v1.RaftPeer`), behind openraft's
//! `RaftNetworkFactory` so tests can wrap or replace it (fault injection).
//!
//! AppendEntries go over long-lived bidirectional gRPC streams (one DATA frame per message each
//! way): a replication stream keeps one, and the one-message connections of ReadIndex rounds
//! borrow an idle one; votes and snapshots are unary calls.
//!
//! Every RPC is bounded by `RPCOption::soft_ttl()`: without a deadline a partition can wedge a
//! replication stream forever.
use std::collections::HashMap;
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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::pb::raftpb::RaftBytes;
use crate::pb::raftpb::raft_peer_client::RaftPeerClient;
use crate::types::{Member, TypeConfig, decode, encode};

/// Creates tonic connections to peers from their `Member::peer_url`.
///
/// Channels are cached per URL: openraft asks for a new client for every replication stream
/// and for every ReadIndex round, and one HTTP/2 connection per peer carries them all.
#[derive(Debug, Clone)]
pub struct TonicNetworkFactory {
    max_message_bytes: usize,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    idle_streams: IdleStreams,
}

/// AppendEntries streams no connection is using. openraft opens a connection per ReadIndex
/// round (one heartbeat per follower); taking an open stream from here makes that heartbeat
/// one DATA frame each way instead of a unary call (a new HTTP/2 stream, headers and
/// trailers, a server task). Four per peer cover the rounds that overlap.
type IdleStreams = Arc<StreamPool>;

/// Idle `PeerStream`s per peer URL, at most `cap` each: borrowed for one exchange or one
/// connection's life, then given back.
#[derive(Debug)]
pub(crate) struct StreamPool {
    idle: Mutex<HashMap<String, Vec<PeerStream>>>,
    cap: usize,
}

impl StreamPool {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            idle: Mutex::default(),
            cap,
        }
    }

    /// An idle stream to `url` that can still take a request. One whose connection closed
    /// while idle is dropped here, before a request goes out on it: a fresh stream then
    /// tells a refused connection (safe to retry) from a lost answer.
    pub(crate) fn take(&self, url: &str) -> Option<PeerStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let streams = idle.get_mut(url)?;
        while let Some(mut s) = streams.pop() {
            if s.reusable() {
                return Some(s);
            }
        }
        None
    }

    /// Gives `stream` back, unless it cannot take another request or `url` already has `cap`
    /// idle ones.
    pub(crate) fn give_back(&self, url: &str, mut stream: PeerStream) {
        if !stream.reusable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let streams = idle.entry(url.to_owned()).or_default();
        if streams.len() < self.cap {
            streams.push(stream);
        }
    }
}

impl TonicNetworkFactory {
    /// A factory whose clients accept messages up to `max_message_bytes` (snapshot chunks and
    /// log batches).
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes,
            channels: Arc::default(),
            idle_streams: Arc::new(StreamPool::new(4)),
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

/// One peer connection, as openraft holds it: one per replication stream, or one per
/// ReadIndex round or election. Its AppendEntries go over a stream, reused across
/// connections (see [`IdleStreams`]).
#[derive(Debug)]
pub struct TonicConnection {
    target: u64,
    url: String,
    client: Option<RaftPeerClient<Channel>>,
    error: Option<String>,
    append_stream: Option<PeerStream>,
    /// Where `append_stream` goes back when the connection is dropped.
    idle_streams: IdleStreams,
}

impl Drop for TonicConnection {
    fn drop(&mut self) {
        if let Some(stream) = self.append_stream.take() {
            self.idle_streams.give_back(&self.url, stream);
        }
    }
}

/// Request/response exchanges over one long-lived bidirectional stream
/// (`AppendEntriesStream`, `ForwardStream`): the next request waits for the answer to the
/// previous. Each message is one HTTP/2 DATA frame.
#[derive(Debug)]
pub(crate) struct PeerStream {
    requests: mpsc::Sender<RaftBytes>,
    replies: tonic::Streaming<RaftBytes>,
    /// Set while a request is out: a call cancelled then (a timeout) leaves its answer in the
    /// stream, so the stream is dropped rather than reused.
    awaiting_reply: bool,
}

/// The streamed RPCs of `RaftPeer`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StreamRpc {
    AppendEntries,
    Forward,
}

impl PeerStream {
    /// Opens a `rpc` stream to the member `client` talks to.
    pub(crate) async fn open(
        client: &mut RaftPeerClient<Channel>,
        rpc: StreamRpc,
    ) -> Result<Self, tonic::Status> {
        let (requests, rx) = mpsc::channel(1);
        let rx = ReceiverStream::new(rx);
        let replies = match rpc {
            StreamRpc::AppendEntries => client.append_entries_stream(rx).await?,
            StreamRpc::Forward => client.forward_stream(rx).await?,
        }
        .into_inner();
        Ok(Self {
            requests,
            replies,
            awaiting_reply: false,
        })
    }

    /// Whether the stream can take another request: no answer is outstanding (a cancelled
    /// exchange leaves one behind) and it has not ended, as it does when its connection
    /// closes while idle.
    pub(crate) fn reusable(&mut self) -> bool {
        use futures::FutureExt as _;
        // Polling once and dropping the future loses nothing: `message` only polls the
        // stream.
        !self.awaiting_reply && self.replies.message().now_or_never().is_none()
    }

    /// Sends one request and waits for its answer.
    pub(crate) async fn exchange(&mut self, data: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
        self.awaiting_reply = true;
        self.requests
            .send(RaftBytes { data })
            .await
            .map_err(|_| tonic::Status::unavailable("peer stream closed"))?;
        match self.replies.message().await? {
            Some(m) => {
                self.awaiting_reply = false;
                Ok(m.data)
            }
            None => Err(tonic::Status::unavailable("peer stream ended by the peer")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetworkFactory<TypeConfig> for TonicNetworkFactory {
    type Network = TonicConnection;

    async fn new_client(&mut self, target: u64, node: &Member) -> TonicConnection {
        match self.channel(&node.peer_url) {
            Ok(ch) => {
                let max = self.max_message_bytes.max(64 * 1024 * 1024);
                TonicConnection {
                    target,
                    url: node.peer_url.clone(),
                    client: Some(
                        RaftPeerClient::new(ch)
                            .max_decoding_message_size(max)
                            .max_encoding_message_size(max),
                    ),
                    error: None,
                    append_stream: None,
                    idle_streams: self.idle_streams.clone(),
                }
            }
            Err(e) => TonicConnection {
                target,
                url: node.peer_url.clone(),
                client: None,
                error: Some(format!("bad peer url {:?}: {e}", node.peer_url)),
                append_stream: None,
                idle_streams: self.idle_streams.clone(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl TonicConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, Member, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
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
        let res = tokio::time::timeout(option.soft_ttl(), self.exchange(rpc, client, data)).await;
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
            Ok(Ok(data)) => data,
        };
        let result: Result<Resp, RaftError<u64, E>> = decode(&resp)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn exchange(
        &mut self,
        rpc: Rpc,
        mut client: RaftPeerClient<Channel>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, tonic::Status> {
        let unary = match rpc {
            Rpc::AppendEntries => return self.append_streamed(client, data).await,
            Rpc::Vote => client.vote(RaftBytes { data }).await,
            Rpc::InstallSnapshot => client.install_snapshot(RaftBytes { data }).await,
        };
        unary.map(|r| r.into_inner().data)
    }

    async fn append_streamed(
        &mut self,
        mut client: RaftPeerClient<Channel>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, tonic::Status> {
        if self.append_stream.as_mut().is_some_and(|s| !s.reusable()) {
            self.append_stream = None;
        }
        if self.append_stream.is_none() {
            self.append_stream = self.idle_streams.take(&self.url);
        }
        if let Some(stream) = self.append_stream.as_mut() {
            match stream.exchange(data.clone()).await {
                Ok(reply) => return Ok(reply),
                // An idle stream can die with its connection (a peer restart). Raft tolerates
                // a repeated AppendEntries, so send it once more on a fresh stream.
                Err(_) => self.append_stream = None,
            }
        }
        let mut stream = PeerStream::open(&mut client, StreamRpc::AppendEntries).await?;
        let reply = stream.exchange(data).await?;
        self.append_stream = Some(stream);
        Ok(reply)
    }
}

impl RaftNetwork<TypeConfig> for TonicConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
