//! Group commit: packs concurrent write requests into one Raft entry.
//!
//! openraft 0.9 waits for one leader log flush per entry, so one entry per request would cap
//! throughput at one request per fsync. The batcher keeps at most `MAX_IN_FLIGHT` entries in
//! flight and, while they commit, gathers the requests that arrive into the next entry, as
//! etcd does.
use std::sync::Arc;

use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::EtcdError;
use crate::stats::Stats;
use crate::types::{Reply, Request, TypeConfig, WriteOp};

/// One: the next entry gathers every write that arrives while this one commits. On two
/// cores shared by three members and the clients the machine runs out of CPU first, and
/// fewer, larger entries cost less per write: with one in flight instead of two, CPU per put
/// at 16 clients was 8-15 % lower in back-to-back runs; puts/s moved within the run-to-run
/// noise (1.40-1.74x etcd's against 1.45-1.59x).
const MAX_IN_FLIGHT: usize = 1;

type Waiter = oneshot::Sender<Result<Reply, EtcdError>>;
/// Writes that go into one Raft entry together (one, or a follower's forwarded batch).
type Pending = Vec<(WriteOp, Waiter)>;

/// How well batching works (exposed through `NodeMetrics`).
#[derive(Debug, Default)]
pub(crate) struct BatchCounters {
    /// Raft entries proposed by this member's batcher.
    pub(crate) entries: std::sync::atomic::AtomicU64,
    /// Client write requests they carried.
    pub(crate) ops: std::sync::atomic::AtomicU64,
}

/// Handle to submit writes to the local Raft leader.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Pending>,
    stats: Arc<Stats>,
    /// Held shared by every proposal in flight; held exclusively, it stops proposals (a
    /// leadership transfer lets the followers' leader lease run out).
    gate: Arc<RwLock<()>>,
}

impl Batcher {
    /// Starts the batching task; it ends when `cancel` fires.
    pub(crate) fn spawn(
        raft: Raft<TypeConfig>,
        max_batch_ops: usize,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
        counters: Arc<BatchCounters>,
        stats: Arc<Stats>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let gate = Arc::new(RwLock::new(()));
        let gauges = Gauges {
            counters,
            stats: stats.clone(),
        };
        tracker.spawn(run(
            raft,
            rx,
            max_batch_ops.max(1),
            cancel,
            tracker.clone(),
            gauges,
            gate.clone(),
        ));
        Self { tx, stats, gate }
    }

    /// Waits while proposals are paused; the guard keeps a pause from starting while it is
    /// held (for other requests that reach the followers, such as ReadIndex rounds).
    pub(crate) async fn open(&self) -> OwnedRwLockReadGuard<()> {
        self.gate.clone().read_owned().await
    }

    /// Waits for the proposals in flight to finish and holds back new ones until the guard
    /// is dropped (requests keep queueing meanwhile).
    pub(crate) async fn pause(&self) -> OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// Proposes `op` (this member must be the leader). `NotLeader` means the op was not
    /// appended and may be retried elsewhere.
    pub(crate) async fn submit(&self, op: WriteOp) -> Result<Reply, EtcdError> {
        let start = std::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(vec![(op, tx)])
            .await
            .map_err(|_| EtcdError::Stopped)?;
        let res = rx.await.map_err(|_| EtcdError::Stopped)?;
        self.stats
            .h_write
            .observe("write", start.elapsed(), self.stats.slow);
        res
    }

    /// Proposes `ops` in one Raft entry (a follower's forwarded batch: split over two
    /// entries, its answer would wait for the later one). One result per op, in order.
    pub(crate) async fn submit_group(&self, ops: Vec<WriteOp>) -> Vec<Result<Reply, EtcdError>> {
        let (group, answers): (Pending, Vec<_>) = ops
            .into_iter()
            .map(|op| {
                let (tx, rx) = oneshot::channel();
                ((op, tx), rx)
            })
            .unzip();
        let n = answers.len();
        if n == 0 {
            return Vec::new();
        }
        if self.tx.send(group).await.is_err() {
            return vec![Err(EtcdError::Stopped); n];
        }
        let mut out = Vec::with_capacity(n);
        for rx in answers {
            out.push(rx.await.unwrap_or(Err(EtcdError::Stopped)));
        }
        out
    }
}

/// Where the batcher counts what it does.
struct Gauges {
    counters: Arc<BatchCounters>,
    stats: Arc<Stats>,
}

async fn run(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::Receiver<Pending>,
    max_batch_ops: usize,
    cancel: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    gauges: Gauges,
    gate: Arc<RwLock<()>>,
) {
    let Gauges { counters, stats } = gauges;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        let mut batch = first;
        while batch.len() < max_batch_ops {
            match rx.try_recv() {
                Ok(m) => batch.extend(m),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        counters
            .entries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        counters
            .ops
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let stats = stats.clone();
        let gate = gate.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let _open = gate.read_owned().await;
            let (ops, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let n = ops.len();
            let start = std::time::Instant::now();
            let res = raft.client_write(Request { ops }).await;
            stats
                .proposals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Stats::record(&stats.proposal_ns, None, start);
            stats
                .h_proposal
                .observe("proposal", start.elapsed(), stats.slow);
            match res {
                Ok(resp) => {
                    let replies = resp.data.replies;
                    if replies.len() != n {
                        for w in waiters {
                            let _ =
                                w.send(Err(EtcdError::Internal("reply count mismatch".to_owned())));
                        }
                        return;
                    }
                    for (w, r) in waiters.into_iter().zip(replies) {
                        let _ = w.send(Ok(r));
                    }
                }
                Err(e) => {
                    let err = match e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                            EtcdError::NotLeader
                        }
                        RaftError::APIError(ClientWriteError::ChangeMembershipError(_)) => {
                            EtcdError::Internal("unexpected membership error".to_owned())
                        }
                        RaftError::Fatal(f) => {
                            tracing::error!(error = %f, "raft stopped");
                            EtcdError::Stopped
                        }
                    };
                    for w in waiters {
                        let _ = w.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}
