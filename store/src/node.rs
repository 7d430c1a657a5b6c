//! Starting, running and stopping one store member.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, InitializeError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::storage::RaftLogStorage;
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher::{BatchCounters, Batcher};
use crate::commit_gate::CommitGate;
use crate::config::{AutoCompaction, ClusterState, StoreConfig, Tunables, cluster_id, member_id};
use crate::error::{EtcdError, StoreError};
use crate::faults::{FaultHooks, LinkFate};
use crate::forwarder::{self, ForwardQueue};
use crate::lessor::Lessor;
use crate::log_store::SledLogStore;
use crate::network::{PeerStream, StreamPool, StreamRpc, TonicNetworkFactory, peer_channel};
use crate::pb::etcdserverpb::ResponseHeader;
use crate::pb::raftpb::raft_peer_client::RaftPeerClient;
use crate::read_index::{ReadQueue, Reads, resolve};
use crate::service;
use crate::state_machine::{Shared, SledStateMachine};
use crate::stats::Stats;
use crate::types::{Member, Reply, TypeConfig, WriteOp, decode, encode};

/// Requests only the leader can serve; followers forward them over the peer service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardRequest {
    Write(WriteOp),
    ReadIndex,
    LeaseKeepAlive(i64),
    LeaseTimeToLive(i64),
    MemberAdd {
        peer_url: String,
        learner: bool,
    },
    MemberRemove(u64),
    MemberPromote(u64),
    Publish {
        id: u64,
        name: String,
        client_url: String,
    },
    /// Writes a follower batched (see `forwarder`).
    Writes(Vec<WriteOp>),
    /// A member's new peer URL (`etcdctl member update`); it keeps its id.
    MemberUpdate {
        id: u64,
        peer_url: String,
    },
    /// Sent by a leader handing over leadership to the member it chose: campaign now.
    Campaign,
    /// Sent by a leader handing over leadership to the other voters: do not campaign for
    /// this many milliseconds (so the chosen member wins).
    HoldElections(u64),
}

/// Leader answers to [`ForwardRequest`]s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardResponse {
    Write(Reply),
    ReadIndex(u64),
    /// Remaining TTL in seconds.
    Ttl(i64),
    MemberAdded(u64),
    Done,
    /// One result per write of [`ForwardRequest::Writes`], in order.
    Writes(Vec<Result<Reply, EtcdError>>),
}

/// Entry point for starting a member.
#[derive(Debug)]
pub struct Node;

/// A point-in-time view of a member's Raft state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMetrics {
    /// This member's id.
    pub id: u64,
    /// Current leader as this member knows it.
    pub leader: Option<u64>,
    /// Current Raft term.
    pub term: u64,
    /// Index of the last applied log entry.
    pub last_applied: u64,
    /// Index of the last entry in this member's log (synced or not).
    pub last_log: u64,
    /// Current store revision.
    pub revision: i64,
    /// Last log index included in this member's latest snapshot (0 = none).
    pub snapshot: u64,
    /// Last purged log index (0 = none).
    pub purged: u64,
    /// Raft entries this member's group-commit batcher proposed (while leader).
    pub proposed_entries: u64,
    /// Client writes those entries carried.
    pub proposed_writes: u64,
    /// ReadIndex rounds run for linearizable reads.
    pub read_index_rounds: u64,
    /// Linearizable reads served through those rounds.
    pub linearizable_reads: u64,
    /// Voter ids of the current membership.
    pub voters: BTreeSet<u64>,
    /// Learner ids of the current membership.
    pub learners: BTreeSet<u64>,
}

/// State shared by the services and background tasks of one member.
pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) cluster_id: u64,
    pub(crate) token: String,
    pub(crate) client_url: String,
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) sm: Arc<Shared>,
    pub(crate) tunables: Tunables,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    batcher: Batcher,
    /// Writes this member forwards to the leader (batched).
    forward_queue: ForwardQueue,
    batch_counters: Arc<BatchCounters>,
    reads: Reads,
    read_rounds: std::sync::atomic::AtomicU64,
    linearizable_reads: std::sync::atomic::AtomicU64,
    lessor: Lessor,
    peers: Mutex<HashMap<String, RaftPeerClient<tonic::transport::Channel>>>,
    /// Idle `ForwardStream`s per leader peer URL: a forwarded request costs one DATA frame
    /// each way on one of them, where a unary call cost three client writes and a server task.
    /// Eight per peer, more than the forwarder keeps in flight, so steady traffic opens none.
    forward_streams: StreamPool,
    pub(crate) stats: Arc<Stats>,
    fault_hooks: FaultHooks,
    /// Set once a ReadIndex round has completed since start (see [`Inner::local_read_barrier`]).
    local_reads_ready: AtomicBool,
    /// Until when (ms since `started`) this member holds back its own campaigns, at a
    /// leader's request during a leadership transfer.
    elections_held_until_ms: Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
    /// The vote's term and the last log index on disk when this member started.
    restored: RestoredLog,
    /// One membership change at a time from this member: openraft refuses (and logs at
    /// ERROR) a change proposed while another is uncommitted, which every multi-member start
    /// hit as the members published their client URLs together.
    membership_changes: tokio::sync::Mutex<()>,
}

/// What a member found on disk at start (see [`Inner::restored`]).
#[derive(Debug, Clone, Copy)]
struct RestoredLog {
    term: u64,
    last_index: u64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A running member. Dropping it does not stop the member: call [`NodeHandle::shutdown`].
#[derive(Debug, Clone)]
pub struct NodeHandle {
    inner: Arc<Inner>,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
}

/// sled's page cache. The MVCC model lives in memory anyway, so sled is read only on start;
/// a small cache keeps the resident set close to the model's own size.
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StoreError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StoreError::Bind { addr, what, source })
}

pub(crate) async fn open_db(path: &std::path::Path) -> Result<sled::Db, StoreError> {
    // Right after an in-process restart the previous instance's file lock may linger briefly
    // (sled releases it when its last handle and flusher thread are gone).
    let mut attempts = 0;
    loop {
        // sled 0.34 can panic on a corrupt file (sled#1533): refuse to start instead.
        let opened = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(path)
                .cache_capacity(SLED_CACHE_BYTES)
                // No background flusher: it runs `fsync` on sled's file every 500 ms even when
                // nothing changed, and each one (on all members sharing a disk) held up the Raft
                // log's `fdatasync`s behind a journal commit: a stall every 500 ms, the write
                // tail. sled holds only Raft metadata; what must be durable (vote, purge point)
                // is flushed explicitly, and the commit index may lag (see `save_committed`).
                .flush_every_ms(None)
                .open()
        });
        let res = match opened {
            Ok(r) => r,
            Err(_) => {
                return Err(StoreError::Corrupt {
                    what: "sled database",
                    detail: format!("sled panicked while opening {}", path.display()),
                });
            }
        };
        match res {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                attempts += 1;
                if attempts > 50 {
                    return Err(StoreError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// The data dir's identity records: member name, cluster token, member id.
fn identity_tree(
    db: &sled::Db,
    config: &StoreConfig,
) -> Result<(sled::Tree, impl Fn(sled::Error) -> StoreError), StoreError> {
    let data_dir = config.data_dir.clone();
    let open_err = move |source| StoreError::Open {
        path: data_dir.clone(),
        source,
    };
    let t = db.open_tree("identity").map_err(&open_err)?;
    Ok((t, open_err))
}

/// Checks (or records, on first start) which member and cluster the data dir belongs to.
pub(crate) fn check_identity(db: &sled::Db, config: &StoreConfig) -> Result<(), StoreError> {
    let (t, open_err) = identity_tree(db, config)?;
    let get = |k: &str| -> Result<Option<String>, StoreError> {
        Ok(t.get(k)
            .map_err(&open_err)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    };
    match (get("name")?, get("token")?) {
        (Some(name), Some(token)) => {
            if name != config.name || token != config.initial_cluster_token {
                return Err(StoreError::IdentityMismatch {
                    path: config.data_dir.clone(),
                    found_member: name,
                    found_cluster: token,
                    want_member: config.name.clone(),
                    want_cluster: config.initial_cluster_token.clone(),
                });
            }
        }
        _ => {
            t.insert("name", config.name.as_bytes())
                .map_err(&open_err)?;
            t.insert("token", config.initial_cluster_token.as_bytes())
                .map_err(&open_err)?;
            t.flush().map_err(&open_err)?;
        }
    }
    Ok(())
}

/// Turns the leader's heartbeats off until dropped (also on an early return).
struct HeartbeatsOff<'a>(&'a Raft<TypeConfig>);

impl<'a> HeartbeatsOff<'a> {
    fn new(raft: &'a Raft<TypeConfig>) -> Self {
        raft.runtime_config().heartbeat(false);
        Self(raft)
    }
}

impl Drop for HeartbeatsOff<'_> {
    fn drop(&mut self) {
        self.0.runtime_config().heartbeat(true);
    }
}

/// The member's id: the one recorded in the data dir, or `derived` (from the cluster token
/// and the peer URL), recorded now, on the first start. An id is for life, as in etcd: a
/// member whose peer URL was changed with `member update` restarts with its new URL and
/// keeps the id the cluster knows it by.
fn persistent_member_id(
    db: &sled::Db,
    config: &StoreConfig,
    derived: u64,
) -> Result<u64, StoreError> {
    let (t, open_err) = identity_tree(db, config)?;
    let Some(v) = t.get("id").map_err(&open_err)? else {
        t.insert("id", &derived.to_be_bytes()).map_err(&open_err)?;
        t.flush().map_err(&open_err)?;
        return Ok(derived);
    };
    let bytes = <[u8; 8]>::try_from(v.as_ref()).map_err(|_| StoreError::Corrupt {
        what: "member id",
        detail: format!("{} bytes in {}", v.len(), config.data_dir.display()),
    })?;
    let id = u64::from_be_bytes(bytes);
    if id != derived {
        tracing::info!(
            id = format_args!("{id:x}"),
            "keeping the member id recorded in the data dir (the peer URL was updated since it was created)"
        );
    }
    Ok(id)
}

impl Node {
    /// Binds the configured addresses and starts the member.
    pub async fn start(config: StoreConfig) -> Result<NodeHandle, StoreError> {
        let client = bind(config.listen_client_addr, "client").await?;
        let peer = bind(config.listen_peer_addr, "peer").await?;
        Self::start_with_listeners(config, client, peer).await
    }

    /// Starts the member on already-bound listeners (tests bind port 0 first).
    pub async fn start_with_listeners(
        config: StoreConfig,
        client: TcpListener,
        peer: TcpListener,
    ) -> Result<NodeHandle, StoreError> {
        let network = TonicNetworkFactory::new(config.tunables.max_request_bytes * 4);
        Self::start_with(config, client, peer, network).await
    }

    /// Starts the member with a caller-provided Raft transport (for fault injection).
    pub async fn start_with<N>(
        config: StoreConfig,
        client: TcpListener,
        peer: TcpListener,
        network: N,
    ) -> Result<NodeHandle, StoreError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        Self::start_wrapped(config, client, peer, network, |log| log).await
    }

    /// Starts the member with a caller-provided transport and a wrapper around the sled log
    /// store (fault injection: slow or failing appends, crash points).
    pub async fn start_wrapped<N, LS, W>(
        config: StoreConfig,
        client: TcpListener,
        peer: TcpListener,
        network: N,
        wrap_log: W,
    ) -> Result<NodeHandle, StoreError>
    where
        N: RaftNetworkFactory<TypeConfig>,
        LS: RaftLogStorage<TypeConfig>,
        W: FnOnce(SledLogStore) -> LS,
    {
        config.validate()?;
        let client_addr = client.local_addr().map_err(|source| StoreError::Bind {
            addr: config.listen_client_addr,
            what: "client",
            source,
        })?;
        let peer_addr = peer.local_addr().map_err(|source| StoreError::Bind {
            addr: config.listen_peer_addr,
            what: "peer",
            source,
        })?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StoreError::Open {
            path: config.data_dir.clone(),
            source: sled::Error::Io(e),
        })?;
        let hooks = config.fault_hooks.clone();
        let fault_hooks = hooks.clone();
        if hooks.ack_before_flush {
            tracing::warn!("PLANTED BUG enabled: log appends are acknowledged before the flush");
        }
        let db = open_db(&config.data_dir).await?;
        check_identity(&db, &config)?;
        let stats = Arc::new(Stats {
            slow: crate::stats::SlowPhase(config.tunables.slow_phase),
            ..Stats::default()
        });
        let mut log = SledLogStore::new(&db, &config.data_dir)
            .map_err(|source| StoreError::Open {
                path: config.data_dir.clone(),
                source,
            })?
            .with(stats.clone(), hooks.clone());
        let sm = SledStateMachine::open(&db, &config.data_dir)?
            .with(stats.clone(), hooks)
            .with_trash(log.trash())
            .with_log_durability(log.durability());
        let raft_err = |e: &dyn std::fmt::Display| StoreError::Raft(e.to_string());
        let (fresh, restored) = {
            let state = log.get_log_state().await.map_err(|e| raft_err(&e))?;
            let vote = log.read_vote().await.map_err(|e| raft_err(&e))?;
            let restored = RestoredLog {
                term: vote.map_or(0, |v| v.leader_id().term),
                last_index: state.last_log_id.map_or(0, |l| l.index),
            };
            (state.last_log_id.is_none() && vote.is_none(), restored)
        };

        // The id must match the one `initialize` (or `member add`) derives from the listed URL,
        // so an entry for this member in the initial cluster wins over the listen address
        // (which may be port 0 for an embedded single member).
        let my_peer_url = match (
            &config.advertise_peer_url,
            config
                .initial_cluster
                .iter()
                .find(|(n, _)| *n == config.name),
        ) {
            (Some(u), _) => u.clone(),
            (None, Some((_, u))) => u.clone(),
            (None, None) => format!("http://{peer_addr}"),
        };
        let id = persistent_member_id(
            &db,
            &config,
            member_id(&config.initial_cluster_token, &my_peer_url),
        )?;
        let t = &config.tunables;
        let election_ms = t.election_timeout.as_millis() as u64;
        // openraft 0.9 lets a follower campaign only after its leader lease (= the maximum
        // election timeout) plus a random election timeout, and a voter refuses votes during
        // its lease: campaigning starts 0.9–1.2 × election_timeout after the last heartbeat.
        // The random part spans two election ticks (1.5 heartbeats each), so two followers
        // rarely campaign in the same tick and split the vote.
        let raft_config = openraft::Config {
            cluster_name: config.initial_cluster_token.clone(),
            heartbeat_interval: t.heartbeat_interval.as_millis() as u64,
            election_timeout_min: election_ms * 3 / 10,
            election_timeout_max: election_ms * 3 / 5,
            install_snapshot_timeout: election_ms.max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_count),
            max_in_snapshot_log_to_keep: t.snapshot_catchup_entries,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_err(&e))?;
        let shared = sm.shared();
        let log = log.for_member(id).map_err(|e| raft_err(&e))?;
        let network = CommitGate::new(network, log.clone(), !fault_hooks.ack_before_flush);
        let raft = Raft::new(id, Arc::new(raft_config), network, wrap_log(log), sm)
            .await
            .map_err(|e| raft_err(&e))?;

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let batch_counters = Arc::new(BatchCounters::default());
        let batcher = Batcher::spawn(
            raft.clone(),
            t.max_batch_ops,
            cancel.clone(),
            &tracker,
            batch_counters.clone(),
            stats.clone(),
        );
        let (forward_queue, forward_rx) = forwarder::queue();
        let inner = Arc::new(Inner {
            id,
            name: config.name.clone(),
            cluster_id: cluster_id(&config.initial_cluster_token),
            token: config.initial_cluster_token.clone(),
            client_url: config
                .advertise_client_url
                .clone()
                .unwrap_or_else(|| format!("http://{client_addr}")),
            raft: raft.clone(),
            sm: shared,
            tunables: config.tunables.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            batcher,
            forward_queue,
            batch_counters,
            reads: Arc::new(ReadQueue::default()),
            read_rounds: Default::default(),
            linearizable_reads: Default::default(),
            lessor: Lessor::new(fault_hooks.clock_offset_ms.clone()),
            peers: Mutex::new(HashMap::new()),
            forward_streams: StreamPool::new(8),
            stats,
            fault_hooks,
            local_reads_ready: AtomicBool::new(false),
            elections_held_until_ms: Default::default(),
            started: std::time::Instant::now(),
            restored,
            membership_changes: tokio::sync::Mutex::new(()),
        });

        service::serve(inner.clone(), client, peer);

        if fresh && config.initial_cluster_state == ClusterState::New {
            let members = config.initial_members();
            tracing::info!(member = %config.name, id = format_args!("{id:x}"), size = members.len(), "bootstrapping a new cluster");
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(raft_err(&e)),
            }
        } else if fresh {
            tracing::info!(member = %config.name, id = format_args!("{id:x}"), "joining an existing cluster; waiting for the leader");
        } else {
            tracing::info!(member = %config.name, id = format_args!("{id:x}"), "restarting from {}", config.data_dir.display());
        }

        tracker.spawn(forwarder::run(inner.clone(), forward_rx));
        tracker.spawn(read_loop(inner.clone()));
        tracker.spawn(leader_loop(inner.clone()));
        tracker.spawn(log_leadership(inner.clone()));
        tracker.spawn(publish_loop(inner.clone()));
        tracker.spawn(stats_loop(inner.clone()));
        tracker.spawn(auto_compaction_loop(inner.clone()));

        Ok(NodeHandle {
            inner,
            client_addr,
            peer_addr,
        })
    }
}

impl NodeHandle {
    /// Address serving the etcd v3 API.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Address serving Raft traffic.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// This member's id (as shown by `etcdctl member list`).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Current Raft view of this member.
    pub fn metrics(&self) -> NodeMetrics {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        NodeMetrics {
            id: self.inner.id,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            last_log: m.last_log_index.unwrap_or(0),
            revision: self.inner.sm.read().mvcc.revision(),
            snapshot: m.snapshot.map_or(0, |l| l.index),
            purged: m.purged.map_or(0, |l| l.index),
            proposed_entries: self.inner.batch_counters.entries.load(Ordering::Relaxed),
            proposed_writes: self.inner.batch_counters.ops.load(Ordering::Relaxed),
            read_index_rounds: self.inner.read_rounds.load(Ordering::Relaxed),
            linearizable_reads: self.inner.linearizable_reads.load(Ordering::Relaxed),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Stops serving, stops Raft and closes the data dir.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        // Bounded: a Raft core stuck in a storage call must not wedge the caller.
        match tokio::time::timeout(Duration::from_secs(10), self.inner.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "raft shutdown"),
            Err(_) => tracing::error!("raft did not shut down within 10 s; abandoning it"),
        }
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 5s");
        }
        self.inner.sm.flush();
    }
}

impl Inner {
    /// etcd response header at `revision`.
    pub(crate) fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term: self.raft.metrics().borrow().current_term,
        })
    }

    pub(crate) fn current_revision(&self) -> i64 {
        self.sm.read().mvcc.revision()
    }

    fn leader(&self) -> Option<(u64, Member)> {
        // Borrow, do not clone: this runs for every client write and linearizable read.
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let leader = m.current_leader?;
        let node = m
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()?;
        Some((leader, node))
    }

    /// Runs `req` on the leader: here when this member leads, else over the peer service.
    /// Retries while there is no leader or leadership moves, up to the request timeout.
    pub(crate) async fn leader_call(
        &self,
        req: ForwardRequest,
    ) -> Result<ForwardResponse, EtcdError> {
        let deadline = tokio::time::Instant::now() + self.tunables.request_timeout;
        let idempotent = !matches!(
            req,
            ForwardRequest::Write(_) | ForwardRequest::Writes(_) | ForwardRequest::MemberAdd { .. }
        );
        let mut last_err = EtcdError::Timeout;
        while tokio::time::Instant::now() < deadline {
            if self.cancel.is_cancelled() {
                return Err(EtcdError::Stopped);
            }
            let Some((leader, node)) = self.leader() else {
                last_err = EtcdError::NoLeader;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let res = match &req {
                _ if leader == self.id => self.handle_as_leader(req.clone()).await,
                ForwardRequest::Write(op) => {
                    // Bounded here too: a batch may wait for RPCs to a leader that stopped
                    // answering. The outcome is then unknown (not retried).
                    let submit = forwarder::submit(&self.forward_queue, &node.peer_url, op.clone());
                    tokio::time::timeout_at(deadline, submit)
                        .await
                        .unwrap_or(Err(EtcdError::Timeout))
                        .map(ForwardResponse::Write)
                }
                _ => self.forward(&node.peer_url, &req, idempotent).await,
            };
            match res {
                Err(EtcdError::NotLeader) | Err(EtcdError::NoLeader) => {
                    last_err = EtcdError::LeaderChanged;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
        Err(match last_err {
            EtcdError::NoLeader | EtcdError::LeaderChanged => EtcdError::Timeout,
            e => e,
        })
    }

    pub(crate) async fn forward(
        &self,
        peer_url: &str,
        req: &ForwardRequest,
        idempotent: bool,
    ) -> Result<ForwardResponse, EtcdError> {
        let client = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            match peers.get(peer_url) {
                Some(c) => c.clone(),
                None => {
                    let ch = peer_channel(peer_url)
                        .map_err(|e| EtcdError::Internal(format!("bad peer url: {e}")))?;
                    let c = RaftPeerClient::new(ch)
                        .max_decoding_message_size(64 * 1024 * 1024)
                        .max_encoding_message_size(64 * 1024 * 1024);
                    peers.insert(peer_url.to_owned(), c.clone());
                    c
                }
            }
        };
        let data = encode(req).map_err(|e| EtcdError::Internal(e.to_string()))?;
        let mut client = client;
        let fate = self.fault_hooks.forward_fate(peer_url);
        if fate == LinkFate::LoseRequest {
            // A partitioned link: the request hangs until the caller gives up.
            tokio::time::sleep(self.tunables.request_timeout).await;
            return Err(if idempotent {
                EtcdError::NotLeader
            } else {
                EtcdError::TimeoutDueToConnectionLost
            });
        }
        let pooled = self.forward_streams.take(peer_url);
        let res = tokio::time::timeout(self.tunables.request_timeout, async {
            let mut stream = match pooled {
                Some(s) => s,
                None => PeerStream::open(&mut client, StreamRpc::Forward).await?,
            };
            let reply = stream.exchange(data).await?;
            Ok::<_, tonic::Status>((stream, reply))
        })
        .await;
        if fate == LinkFate::LoseResponse {
            return Err(if idempotent {
                EtcdError::NotLeader
            } else {
                EtcdError::TimeoutDueToConnectionLost
            });
        }
        match res {
            Err(_) => Err(EtcdError::Timeout),
            Ok(Ok((stream, reply))) => {
                self.forward_streams.give_back(peer_url, stream);
                decode::<Result<ForwardResponse, EtcdError>>(&reply)
                    .map_err(|e| EtcdError::Internal(e.to_string()))?
            }
            Ok(Err(status)) => {
                // A refused connection never reached the leader: safe to retry anything.
                let never_sent = status.code() == tonic::Code::Unavailable
                    && status.message().contains("connect");
                if idempotent || never_sent {
                    Err(EtcdError::NotLeader)
                } else {
                    Err(EtcdError::TimeoutDueToConnectionLost)
                }
            }
        }
    }

    /// Serves a request another member sent over the peer port: the leader's requests
    /// (forwarded writes, ReadIndex, ...) and the two a leader sends its followers while it
    /// hands over leadership (see [`Inner::move_leader`]).
    pub(crate) async fn handle_forwarded(
        &self,
        req: ForwardRequest,
    ) -> Result<ForwardResponse, EtcdError> {
        match req {
            ForwardRequest::Campaign => {
                tracing::info!(member = %self.name, "campaigning: the leader is handing over leadership");
                self.raft
                    .trigger()
                    .elect()
                    .await
                    .map_err(|_| EtcdError::Stopped)?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::HoldElections(ms) => {
                self.hold_elections(Duration::from_millis(ms));
                Ok(ForwardResponse::Done)
            }
            req => self.handle_as_leader(req).await,
        }
    }

    /// Serves a leader-only request; `NotLeader` when this member does not lead.
    pub(crate) async fn handle_as_leader(
        &self,
        req: ForwardRequest,
    ) -> Result<ForwardResponse, EtcdError> {
        if self.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(EtcdError::NotLeader);
        }
        // The hot requests need no copy of the metrics.
        let req = match req {
            ForwardRequest::Write(op) => {
                return Ok(ForwardResponse::Write(self.batcher.submit(op).await?));
            }
            ForwardRequest::Writes(ops) => {
                // One group, so they share one Raft entry.
                let replies = self.batcher.submit_group(ops).await;
                return Ok(ForwardResponse::Writes(replies));
            }
            ForwardRequest::ReadIndex => {
                // Its quorum round sends heartbeats, which would renew the followers' lease
                // during a leadership transfer: wait for the transfer instead.
                let _open = self.batcher.open().await;
                let (read, _applied) = self
                    .raft
                    .get_read_log_id()
                    .await
                    .map_err(|_| EtcdError::NotLeader)?;
                let mut index = read.map_or(0, |l| l.index);
                // openraft 0.9 restarts a member that was leader as leader of the same term,
                // with no new blank entry, and its commit index starts from the last durably
                // recorded one, which may be behind what was acknowledged before a crash
                // (chaos f9, power cut). Such a leader's read index must cover its whole log
                // as found at start: a leader never truncates its own log, so all of it
                // commits while it stays leader. A leader elected after start campaigned in a
                // higher term and has its own blank entry.
                if self.raft.metrics().borrow().current_term == self.restored.term {
                    index = index.max(self.restored.last_index);
                }
                return Ok(ForwardResponse::ReadIndex(index));
            }
            other => other,
        };
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        match req {
            ForwardRequest::Write(_) | ForwardRequest::Writes(_) | ForwardRequest::ReadIndex => {
                Err(EtcdError::Internal("handled above".to_owned()))
            }
            ForwardRequest::LeaseKeepAlive(id) => {
                // A leader cut off from the quorum must not renew: its successor counts the
                // TTL from its own promotion and would expire the lease early. A quorum round
                // proves leadership; no successor can be elected within the followers' leader
                // lease after it, and a successor restarts every TTL anyway. Held during a
                // leadership transfer, as ReadIndex is.
                let _open = self.batcher.open().await;
                tokio::time::timeout(
                    self.tunables.request_timeout,
                    self.raft.ensure_linearizable(),
                )
                .await
                .map_err(|_| EtcdError::Timeout)?
                .map_err(|_| EtcdError::NotLeader)?;
                let ttl = self.sm.read().mvcc.lease(id).map(|l| l.ttl);
                let ttl = ttl.ok_or(EtcdError::LeaseNotFound)?;
                Ok(ForwardResponse::Ttl(self.lessor.keep_alive(id, ttl)))
            }
            ForwardRequest::LeaseTimeToLive(id) => {
                let ttl = self.sm.read().mvcc.lease(id).map(|l| l.ttl);
                let ttl = ttl.ok_or(EtcdError::LeaseNotFound)?;
                Ok(ForwardResponse::Ttl(self.lessor.remaining(id, ttl)))
            }
            ForwardRequest::MemberAdd { peer_url, learner } => {
                let id = member_id(&self.token, &peer_url);
                if membership
                    .nodes()
                    .any(|(nid, n)| *nid == id || n.peer_url == peer_url)
                {
                    return Err(EtcdError::PeerUrlExist);
                }
                let member = Member {
                    name: String::new(),
                    peer_url,
                    client_url: String::new(),
                    promote_when_ready: !learner,
                };
                tracing::info!(id = format_args!("{id:x}"), %member, learner, "adding member as learner");
                // add_learner(.., blocking = false), with InProgress waited out.
                self.change_membership(
                    ChangeMembers::AddNodes(BTreeMap::from([(id, member)])),
                    true,
                )
                .await?;
                Ok(ForwardResponse::MemberAdded(id))
            }
            ForwardRequest::MemberRemove(id) => {
                if membership.get_node(&id).is_none() {
                    return Err(EtcdError::MemberNotFound);
                }
                let is_voter = membership.voter_ids().any(|v| v == id);
                tracing::info!(id = format_args!("{id:x}"), is_voter, "removing member");
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.change_membership(change, false).await?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::MemberPromote(id) => {
                if membership.get_node(&id).is_none() {
                    return Err(EtcdError::MemberNotFound);
                }
                if membership.voter_ids().any(|v| v == id) {
                    return Err(EtcdError::MemberNotLearner);
                }
                if !learner_caught_up(&m, id) {
                    return Err(EtcdError::LearnerNotReady);
                }
                tracing::info!(id = format_args!("{id:x}"), "promoting learner to voter");
                self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
                    .await?;
                Ok(ForwardResponse::Done)
            }
            ForwardRequest::Campaign | ForwardRequest::HoldElections(_) => {
                Err(EtcdError::Internal(
                    "a leadership hand-over request reached the leader path".to_owned(),
                ))
            }
            ForwardRequest::MemberUpdate { id, peer_url } => {
                let Some(old) = membership.get_node(&id) else {
                    return Err(EtcdError::MemberNotFound);
                };
                if old.peer_url == peer_url {
                    return Ok(ForwardResponse::Done);
                }
                if membership
                    .nodes()
                    .any(|(nid, n)| *nid != id && n.peer_url == peer_url)
                {
                    return Err(EtcdError::PeerUrlExist);
                }
                tracing::info!(
                    id = format_args!("{id:x}"),
                    from = %old.peer_url,
                    to = %peer_url,
                    "updating member's peer URL"
                );
                let updated = Member {
                    peer_url,
                    ..old.clone()
                };
                self.replace_member(id, updated).await
            }
            ForwardRequest::Publish {
                id,
                name,
                client_url,
            } => {
                let Some(old) = membership.get_node(&id) else {
                    return Err(EtcdError::MemberNotFound);
                };
                if old.name == name && old.client_url == client_url {
                    return Ok(ForwardResponse::Done);
                }
                let updated = Member {
                    name,
                    client_url,
                    ..old.clone()
                };
                self.replace_member(id, updated).await
            }
        }
    }

    /// Replaces member `id`'s attributes (it keeps its id and voter/learner role).
    async fn replace_member(&self, id: u64, updated: Member) -> Result<ForwardResponse, EtcdError> {
        self.change_membership(
            ChangeMembers::SetNodes(BTreeMap::from([(id, updated)])),
            true,
        )
        .await?;
        Ok(ForwardResponse::Done)
    }

    /// Hands leadership to the voter `target` (etcd's MoveLeader); called on the leader.
    ///
    /// openraft 0.9 has no TimeoutNow message, and a voter refuses to vote while its leader's
    /// lease lasts, so the leader stops proposing and heartbeating, waits until the lease has
    /// run out on the followers (`election_timeout_max` after the last heartbeat they got),
    /// then asks the target, whose log it has checked is complete, to campaign. The other
    /// voters are asked first to hold back their own campaigns for a while, so they do not
    /// race the target. Writes wait (queued, not failed) for the ~0.7 election timeout this takes, then
    /// go to the new leader.
    pub(crate) async fn move_leader(&self, target: u64) -> Result<(), EtcdError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            return Err(EtcdError::NotLeader);
        }
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == target) {
            return Err(EtcdError::BadLeaderTransferee);
        }
        if target == self.id {
            return Ok(());
        }
        let peer_url = membership
            .get_node(&target)
            .map(|n| n.peer_url.clone())
            .ok_or(EtcdError::BadLeaderTransferee)?;
        let deadline = tokio::time::Instant::now() + self.tunables.request_timeout;
        tracing::info!(
            target = format_args!("{target:x}"),
            "moving leadership: pausing proposals and heartbeats"
        );
        // The other voters hold back their own campaigns meanwhile (if this leader dies
        // mid-way, they campaign again when the hold runs out).
        let hold = 2 * self.raft.config().election_timeout_max
            + 2 * self.raft.config().election_timeout_min;
        let others = membership
            .nodes()
            .filter(|(id, _)| **id != self.id && **id != target)
            .filter(|(id, _)| membership.voter_ids().any(|v| v == **id));
        for (id, node) in others {
            let hold_req = ForwardRequest::HoldElections(hold);
            if let Err(e) = self.forward(&node.peer_url, &hold_req, true).await {
                tracing::warn!(member = format_args!("{id:x}"), error = %e, "could not ask a voter to hold its campaigns");
            }
        }
        let paused = tokio::time::timeout_at(deadline, self.batcher.pause())
            .await
            .map_err(|_| EtcdError::LeaderTransferTimeout)?;
        let heartbeats = HeartbeatsOff::new(&self.raft);
        // The target must hold the whole log, or it could not win.
        let caught_up = || {
            let m = self.raft.metrics().borrow().clone();
            let last = m.last_log_index;
            m.replication
                .as_ref()
                .and_then(|r| r.get(&target).cloned().flatten())
                .is_some_and(|l| Some(l.index) == last)
        };
        while !caught_up() {
            if tokio::time::Instant::now() >= deadline {
                return Err(EtcdError::LeaderTransferTimeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The followers' lease: openraft counts it from the last heartbeat each accepted,
        // at most one interval before heartbeats stopped.
        let lease = Duration::from_millis(self.raft.config().election_timeout_max)
            + self.tunables.heartbeat_interval
            + Duration::from_millis(20);
        tokio::time::sleep(lease).await;
        let mut asked = 0;
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            if leader == Some(target) {
                break;
            }
            if leader.is_some_and(|l| l != self.id) {
                // Someone else campaigned first; leadership moved, not where it was asked.
                tracing::warn!(leader = ?leader, "leadership moved to another member than asked");
                return Err(EtcdError::LeaderTransferTimeout);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EtcdError::LeaderTransferTimeout);
            }
            // Asked again after a while: a vote can still be refused right at the lease's end.
            if asked % 20 == 0 {
                let _ = self
                    .forward(&peer_url, &ForwardRequest::Campaign, true)
                    .await;
            }
            asked += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(heartbeats);
        drop(paused);
        tracing::info!(target = format_args!("{target:x}"), "leadership moved");
        Ok(())
    }

    /// Stops this member from campaigning for `for_`, then lets it again (unless a later
    /// hold reaches further).
    fn hold_elections(&self, for_: Duration) {
        let until = self.started.elapsed() + for_;
        self.elections_held_until_ms
            .fetch_max(until.as_millis() as u64, Ordering::Relaxed);
        self.raft.runtime_config().elect(false);
        tracing::info!(member = %self.name, ?for_, "holding back campaigns: leadership is being handed over");
        let raft = self.raft.clone();
        let held = self.elections_held_until_ms.clone();
        let started = self.started;
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(for_) => {}
            }
            if started.elapsed().as_millis() as u64 >= held.load(Ordering::Relaxed) {
                raft.runtime_config().elect(true);
            }
        });
    }

    /// Membership change that waits out another change still in progress (a publish or an
    /// automatic promotion may be committing).
    async fn change_membership(
        &self,
        change: ChangeMembers<u64, Member>,
        retain: bool,
    ) -> Result<(), EtcdError> {
        let deadline = tokio::time::Instant::now() + self.tunables.request_timeout;
        let _one_at_a_time = tokio::time::timeout_at(deadline, self.membership_changes.lock())
            .await
            .map_err(|_| EtcdError::Timeout)?;
        loop {
            match self.raft.change_membership(change.clone(), retain).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(map_membership_err(e)),
            }
        }
    }

    /// A write: proposed on the leader, acknowledged once committed and applied.
    pub(crate) async fn write(&self, op: WriteOp) -> Result<Reply, EtcdError> {
        match self.leader_call(ForwardRequest::Write(op)).await? {
            ForwardResponse::Write(r) => Ok(r),
            other => Err(EtcdError::Internal(format!("unexpected {other:?}"))),
        }
    }

    /// Waits until this member's state reflects every write committed before the call
    /// (ReadIndex, batched across concurrent reads).
    pub(crate) async fn linearizable_barrier(&self) -> Result<(), EtcdError> {
        self.reads.barrier().await
    }

    /// Waits, once per start, until this member has applied everything committed before the
    /// start, so that what it serves from local state (serializable reads, watches) never goes
    /// back behind what it served before a crash. Applying persists nothing: after a crash
    /// openraft re-applies only up to the last durably recorded commit index, which may be
    /// below what was visible, until the leader tells it more.
    pub(crate) async fn local_read_barrier(&self) -> Result<(), EtcdError> {
        if self.local_reads_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.linearizable_barrier().await?;
        self.local_reads_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Lease keep-alive on the leader; returns the TTL.
    pub(crate) async fn lease_keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        match self.leader_call(ForwardRequest::LeaseKeepAlive(id)).await? {
            ForwardResponse::Ttl(t) => Ok(t),
            other => Err(EtcdError::Internal(format!("unexpected {other:?}"))),
        }
    }

    /// Remaining lease TTL as the leader counts it.
    pub(crate) async fn lease_remaining(&self, id: i64) -> Result<i64, EtcdError> {
        match self
            .leader_call(ForwardRequest::LeaseTimeToLive(id))
            .await?
        {
            ForwardResponse::Ttl(t) => Ok(t),
            other => Err(EtcdError::Internal(format!("unexpected {other:?}"))),
        }
    }
}

fn map_membership_err(e: RaftError<u64, ClientWriteError<u64, Member>>) -> EtcdError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => EtcdError::NotLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            tracing::warn!(error = %e, "membership change refused");
            EtcdError::Unhealthy
        }
        RaftError::Fatal(_) => EtcdError::Stopped,
    }
}

fn learner_caught_up(m: &openraft::RaftMetrics<u64, Member>, id: u64) -> bool {
    let Some(last) = m.last_log_index else {
        return false;
    };
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned())
        .flatten()
        .map(|l| l.index);
    matched.is_some_and(|i| i + 100 >= last)
}

/// etcd's linearizable read loop: one ReadIndex round per batch of waiting reads.
async fn read_loop(inner: Arc<Inner>) {
    loop {
        let waiters = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            w = inner.reads.next_round() => w,
        };
        inner.read_rounds.fetch_add(1, Ordering::Relaxed);
        inner
            .linearizable_reads
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        let result = async {
            let idx = match inner.leader_call(ForwardRequest::ReadIndex).await? {
                ForwardResponse::ReadIndex(i) => i,
                other => return Err(EtcdError::Internal(format!("unexpected {other:?}"))),
            };
            inner
                .raft
                .wait(Some(inner.tunables.request_timeout))
                .applied_index_at_least(Some(idx), "linearizable read")
                .await
                .map_err(|_| EtcdError::Timeout)?;
            Ok(())
        }
        .await;
        resolve(waiters, result);
    }
}

/// Leader duties: lease expiry and promotion of caught-up learners added as voters.
async fn leader_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let promoting = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = inner.raft.metrics().borrow().clone();
        let leader_term = (m.state == ServerState::Leader).then_some(m.current_term);
        let leases: Vec<(i64, i64)> = inner.sm.read().mvcc.leases().collect();
        for id in inner.lessor.tick(leader_term, &leases) {
            let inner2 = inner.clone();
            inner.tracker.spawn(async move {
                tracing::info!(lease = format_args!("{id:x}"), "lease expired; revoking");
                // Proposed here only, never forwarded: the expiry was decided by this leader's
                // countdown, and a successor keeps its own (a deposed leader's revoke retried
                // on the new leader would cut leases renewed there short).
                let res = inner2
                    .handle_as_leader(ForwardRequest::Write(WriteOp::LeaseRevoke { id }))
                    .await;
                if let Err(e) = res {
                    tracing::warn!(lease = id, error = %e, "lease revoke failed");
                }
                inner2.lessor.revoke_done(id);
            });
        }
        if leader_term.is_none() {
            continue;
        }
        let membership = m.membership_config.membership().clone();
        for id in membership.learner_ids() {
            let wants = membership
                .get_node(&id)
                .is_some_and(|n| n.promote_when_ready);
            if !wants || !learner_caught_up(&m, id) {
                continue;
            }
            if !promoting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id)
            {
                continue;
            }
            let inner2 = inner.clone();
            let promoting = promoting.clone();
            inner.tracker.spawn(async move {
                tracing::info!(
                    id = format_args!("{id:x}"),
                    "learner caught up; promoting to voter"
                );
                let res = inner2
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
                    .await;
                if let Err(e) = res {
                    tracing::warn!(error = %e, "promotion failed; will retry");
                }
                promoting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }
}

/// Logs leader changes and elections (and why they happen), and counts leader changes.
async fn log_leadership(inner: Arc<Inner>) {
    // The server metrics change only with the vote, the role, the leader or the membership;
    // the full metrics change with every append, ack and apply, and waking this task (and
    // cloning them) for each cost every write a wakeup.
    let mut rx = inner.raft.server_metrics();
    let mut last = (None, 0u64, ServerState::Learner);
    // The last leader seen, across leaderless spells: etcd counts a change to a new leader,
    // the first one included.
    let mut last_leader = None;
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let m = rx.borrow_and_update().clone();
        let term = m.vote.leader_id().get_term();
        let now = (m.current_leader, term, m.state);
        if now == last {
            continue;
        }
        if m.state == ServerState::Candidate && last.2 != ServerState::Candidate {
            tracing::warn!(
                member = %inner.name,
                term,
                previous_leader = ?last.0.map(|l| format!("{l:x}")),
                "starting election: no heartbeat from a leader within the election timeout"
            );
        }
        if now.0 != last.0 || now.1 != last.1 {
            match m.current_leader {
                Some(l) => {
                    if last_leader != Some(l) {
                        last_leader = Some(l);
                        inner.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
                    }
                    let name = m
                        .membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.name.clone())
                        .unwrap_or_default();
                    tracing::info!(
                        member = %inner.name,
                        leader = format_args!("{l:x}"),
                        leader_name = %name,
                        term,
                        is_me = l == inner.id,
                        "raft leader elected"
                    );
                }
                None => tracing::info!(member = %inner.name, term, "no leader"),
            }
        }
        last = now;
    }
}

/// Publishes this member's name and client URL into the membership (like etcd's publish).
async fn publish_loop(inner: Arc<Inner>) {
    loop {
        let published = {
            let m = inner.raft.metrics().borrow().clone();
            m.membership_config
                .membership()
                .get_node(&inner.id)
                .map(|n| n.name == inner.name && n.client_url == inner.client_url)
        };
        if published == Some(true) {
            return;
        }
        if published.is_some() {
            let req = ForwardRequest::Publish {
                id: inner.id,
                name: inner.name.clone(),
                client_url: inner.client_url.clone(),
            };
            if let Err(e) = inner.leader_call(req).await {
                tracing::debug!(error = %e, "publish failed; retrying");
            }
        }
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Logs the write-path counters every 10 s while they move (target `store::stats`, debug).
async fn stats_loop(inner: Arc<Inner>) {
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        let now = inner.stats.summary();
        if now != last {
            tracing::debug!(target: "store::stats", member = %inner.name, "{now}");
            last = now;
        }
    }
}

/// Compacts the history as `Tunables::auto_compaction` says, while this member leads (as
/// etcd's compactor runs on the leader only). Samples are dropped when leadership is lost: a
/// new leader starts its own window.
async fn auto_compaction_loop(inner: Arc<Inner>) {
    let (step, period) = match inner.tunables.auto_compaction {
        AutoCompaction::Off => return,
        AutoCompaction::Periodic(retention) => {
            let period = retention.min(Duration::from_secs(3600));
            ((period / 10).max(Duration::from_millis(10)), period)
        }
        AutoCompaction::Revision { every, .. } => {
            let every = every.max(Duration::from_millis(10));
            (every, every)
        }
    };
    // (when, revision) samples of the periodic mode, oldest first.
    let mut samples: std::collections::VecDeque<(tokio::time::Instant, i64)> = Default::default();
    let mut last_attempt = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(step) => {}
        }
        let leading = {
            let m = inner.raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader
        };
        if !leading {
            samples.clear();
            continue;
        }
        let now = tokio::time::Instant::now();
        let (current, compacted) = {
            let st = inner.sm.read();
            (st.mvcc.revision(), st.mvcc.compact_revision())
        };
        let target = match inner.tunables.auto_compaction {
            AutoCompaction::Off => None,
            AutoCompaction::Periodic(retention) => {
                samples.push_back((now, current));
                // The front becomes the newest sample at least `retention` old.
                while samples.len() >= 2 && now.duration_since(samples[1].0) >= retention {
                    samples.pop_front();
                }
                if now.duration_since(last_attempt) < period {
                    continue;
                }
                samples
                    .front()
                    .filter(|(at, _)| now.duration_since(*at) >= retention)
                    .map(|(_, rev)| *rev)
            }
            AutoCompaction::Revision { keep, .. } => Some(current - keep.max(0)),
        };
        last_attempt = now;
        let Some(target) = target.filter(|t| *t > compacted.max(0) && *t <= current) else {
            continue;
        };
        tracing::info!(revision = target, mode = ?inner.tunables.auto_compaction, "auto-compaction: compacting the history below this revision");
        let res = inner
            .handle_as_leader(ForwardRequest::Write(WriteOp::Compact(target)))
            .await;
        if let Err(e) = res {
            tracing::warn!(revision = target, error = %e, "auto-compaction failed; trying again next period");
        }
    }
}
