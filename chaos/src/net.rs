//! A controllable Raft transport and a slowable log store for in-process clusters.
//!
//! Every member's Raft RPCs (AppendEntries, Vote, InstallSnapshot) go through a shared
//! [`Router`] that can cut links per direction, drop a fraction of messages, delay (and so
//! reorder) them and deliver them twice. A cut request never reaches the peer; a cut response
//! is computed by the peer and then lost, which is what a one-way partition looks like.
//!
//! The member-to-member forwarding of client requests (a follower relaying a write or a
//! ReadIndex to the leader) travels on the store's own peer channels; the store consults
//! [`Router::forward_filter`] for each one, so a cut link cuts forwarding too.
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, StorageError, Vote};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use store::{Member, SledLogStore, TonicNetworkFactory, TypeConfig};

/// Current network faults.
#[derive(Debug, Clone, Default)]
pub struct NetFaults {
    /// Directed links `(from, to)` (member indexes) that lose every message.
    pub cut: HashSet<(usize, usize)>,
    /// Probability of losing a message on any link.
    pub drop: f64,
    /// Extra per-message delay, uniformly in `[min, max]` (reorders messages).
    pub delay: Option<(Duration, Duration)>,
    /// Probability of delivering a request twice.
    pub duplicate: f64,
    /// Probability that the answer to a client request a follower forwarded to the leader is
    /// lost after the leader executed it (the client sees an unknown outcome; F18).
    pub lose_forward_response: f64,
    /// Paused members (F14, a SIGSTOP): messages from or to them are held, not lost, and
    /// delivered late once they resume; requests they forward hang.
    pub paused: HashSet<usize>,
}

#[derive(Debug)]
struct RouterState {
    faults: NetFaults,
    ids: HashMap<u64, usize>,
    urls: HashMap<String, usize>,
    rng: StdRng,
    delivered: u64,
    lost: u64,
    duplicated: u64,
}

/// The shared switchboard of one test cluster.
#[derive(Debug, Clone)]
pub struct Router {
    state: Arc<Mutex<RouterState>>,
}

/// Per-message decision.
#[derive(Debug, Clone, Copy)]
struct Plan {
    lose_request: bool,
    lose_response: bool,
    delay: Duration,
    duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("fault injection: {0}")]
struct Injected(&'static str);

impl Router {
    /// A router with no faults; `seed` drives every random decision.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(RouterState {
                faults: NetFaults::default(),
                ids: HashMap::new(),
                urls: HashMap::new(),
                rng: StdRng::seed_from_u64(seed),
                delivered: 0,
                lost: 0,
                duplicated: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the router which member index a Raft id belongs to.
    pub fn register(&self, id: u64, index: usize) {
        self.lock().ids.insert(id, index);
    }

    /// Tells the router which member index a peer URL belongs to (forwarded requests).
    pub fn register_url(&self, url: &str, index: usize) {
        self.lock().urls.insert(url.to_owned(), index);
    }

    /// The forwarding filter of member `from`: a cut link loses the request (or, cut only on
    /// the way back, the response); `lose_forward_response` loses answers at random. Random
    /// drops and delays apply to Raft messages only, so client requests are not turned into
    /// timeouts wholesale.
    pub fn forward_filter(&self, from: usize) -> store::ForwardFilter {
        let router = self.clone();
        std::sync::Arc::new(move |url: &str| {
            let mut s = router.lock();
            let to = s.urls.get(url).copied().unwrap_or(usize::MAX);
            let lose = s.faults.lose_forward_response;
            if s.faults.cut.contains(&(from, to))
                || s.faults.paused.contains(&from)
                || s.faults.paused.contains(&to)
            {
                store::LinkFate::LoseRequest
            } else if s.faults.cut.contains(&(to, from))
                || (lose > 0.0 && s.rng.random_bool(lose.min(1.0)))
            {
                store::LinkFate::LoseResponse
            } else {
                store::LinkFate::Deliver
            }
        })
    }

    /// Replaces the faults.
    pub fn set(&self, faults: NetFaults) {
        self.lock().faults = faults;
    }

    /// Changes the faults in place.
    pub fn update(&self, f: impl FnOnce(&mut NetFaults)) {
        f(&mut self.lock().faults);
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.set(NetFaults::default());
    }

    /// `(delivered, lost, duplicated)` message counts.
    pub fn counters(&self) -> (u64, u64, u64) {
        let s = self.lock();
        (s.delivered, s.lost, s.duplicated)
    }

    /// Whether a message from member `from` to Raft id `target` must be held (either end
    /// paused).
    fn held(&self, from: usize, target: u64) -> bool {
        let s = self.lock();
        let to = s.ids.get(&target).copied().unwrap_or(usize::MAX);
        s.faults.paused.contains(&from) || s.faults.paused.contains(&to)
    }

    fn plan(&self, from: usize, target: u64) -> Plan {
        let mut s = self.lock();
        let to = s.ids.get(&target).copied().unwrap_or(usize::MAX);
        let f = s.faults.clone();
        let lose = |s: &mut RouterState, dir_cut: bool| {
            dir_cut || (f.drop > 0.0 && s.rng.random_bool(f.drop.min(1.0)))
        };
        let lose_request = lose(&mut s, f.cut.contains(&(from, to)));
        let lose_response = !lose_request && lose(&mut s, f.cut.contains(&(to, from)));
        let delay = match f.delay {
            Some((lo, hi)) if hi > lo => s.rng.random_range(lo..=hi),
            Some((lo, _)) => lo,
            None => Duration::ZERO,
        };
        let duplicate =
            !lose_request && f.duplicate > 0.0 && s.rng.random_bool(f.duplicate.min(1.0));
        if lose_request || lose_response {
            s.lost += 1;
        } else {
            s.delivered += 1;
        }
        if duplicate {
            s.duplicated += 1;
        }
        Plan {
            lose_request,
            lose_response,
            delay,
            duplicate,
        }
    }

    /// The Raft transport of member `index`.
    pub fn factory(&self, index: usize) -> FaultyNetwork {
        FaultyNetwork {
            from: index,
            router: self.clone(),
            inner: TonicNetworkFactory::new(8 * 1024 * 1024),
        }
    }
}

/// `RaftNetworkFactory` that sends through a [`Router`].
#[derive(Debug, Clone)]
pub struct FaultyNetwork {
    from: usize,
    router: Router,
    inner: TonicNetworkFactory,
}

/// One routed peer connection.
#[derive(Debug)]
pub struct FaultyConnection {
    from: usize,
    target: u64,
    router: Router,
    inner: <TonicNetworkFactory as RaftNetworkFactory<TypeConfig>>::Network,
}

impl RaftNetworkFactory<TypeConfig> for FaultyNetwork {
    type Network = FaultyConnection;

    async fn new_client(&mut self, target: u64, node: &Member) -> FaultyConnection {
        FaultyConnection {
            from: self.from,
            target,
            router: self.router.clone(),
            inner: self.inner.new_client(target, node).await,
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<u64, Member, RaftError<u64, E>>>;

#[allow(clippy::result_large_err, reason = "openraft's error type")]
fn unreachable<T, E: std::error::Error>(what: &'static str) -> RpcResult<T, E> {
    Err(RPCError::Unreachable(Unreachable::new(&Injected(what))))
}

impl FaultyConnection {
    /// Delays per the plan; `None` when the request is lost.
    async fn before(&self) -> Option<Plan> {
        while self.router.held(self.from, self.target) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let plan = self.router.plan(self.from, self.target);
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        if plan.lose_request {
            // Look like a lost packet: the sender waits a little before learning nothing.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return None;
        }
        Some(plan)
    }
}

/// Sends `$rpc` through `$conn.inner.$method` per the router's plan.
macro_rules! route {
    ($conn:ident, $method:ident, $rpc:ident, $option:ident) => {{
        let Some(plan) = $conn.before().await else {
            return unreachable("request lost");
        };
        if plan.duplicate {
            let _ = $conn.inner.$method($rpc.clone(), $option.clone()).await;
        }
        let resp = $conn.inner.$method($rpc, $option).await;
        if plan.lose_response {
            return unreachable("response lost");
        }
        resp
    }};
}

impl RaftNetwork<TypeConfig> for FaultyConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        route!(self, append_entries, rpc, option)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        route!(self, install_snapshot, rpc, option)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        route!(self, vote, rpc, option)
    }
}

/// Storage faults shared with a member's log store wrapper.
#[derive(Debug, Clone, Default)]
pub struct DiskFaults {
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl DiskFaults {
    /// Every append and vote save waits `d` before reaching sled (a slow fsync).
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// While paused, appends and vote saves wait (a stopped process writes nothing).
    pub fn set_paused(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The sled log store behind a [`DiskFaults`] switch.
#[derive(Debug, Clone)]
pub struct SlowLog {
    inner: SledLogStore,
    faults: DiskFaults,
}

impl SlowLog {
    /// Wraps `inner`.
    pub fn new(inner: SledLogStore, faults: DiskFaults) -> Self {
        Self { inner, faults }
    }

    async fn stall(&self) {
        while self.faults.paused() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = self.faults.delay();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

impl RaftLogReader<TypeConfig> for SlowLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        self.inner.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for SlowLog {
    type LogReader = <SledLogStore as RaftLogStorage<TypeConfig>>::LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.inner.get_log_reader().await
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.stall().await;
        self.inner.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.inner.read_vote().await
    }

    async fn save_committed(&mut self, c: Option<LogId<u64>>) -> Result<(), StorageError<u64>> {
        self.inner.save_committed(c).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        self.inner.read_committed().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        self.stall().await;
        self.inner.append(entries, callback).await
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.inner.truncate(log_id).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.inner.purge(log_id).await
    }
}
