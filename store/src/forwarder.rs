//! Follower side of group commit: client writes a follower receives go to the leader in
//! batches, one peer RPC for every write waiting (etcd forwards proposals over its Raft stream
//! the same way). One RPC per write cost the follower and the leader a gRPC round trip each,
//! the largest share of a forwarded write's CPU.
use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::EtcdError;
use crate::node::{ForwardRequest, ForwardResponse, Inner};
use crate::types::{Reply, WriteOp};

/// Forward RPCs in flight per member: while they travel, the next batch gathers.
const MAX_IN_FLIGHT: usize = 4;
/// Most writes per RPC.
const MAX_BATCH_OPS: usize = 256;
/// Most request bytes per RPC (peer messages may be much larger; this keeps them moderate).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

type Waiter = oneshot::Sender<Result<Reply, EtcdError>>;

/// One write waiting to be forwarded to the leader at `peer_url`.
pub(crate) struct Pending {
    peer_url: String,
    op: WriteOp,
    reply: Waiter,
}

/// Queue of writes to forward; drained by [`run`].
pub(crate) type ForwardQueue = mpsc::Sender<Pending>;

/// Creates the queue [`run`] drains.
pub(crate) fn queue() -> (ForwardQueue, mpsc::Receiver<Pending>) {
    mpsc::channel(4096)
}

/// Forwards `op` to the leader at `peer_url` with whatever else is waiting. Errors are those of
/// a forwarded write: `NotLeader` only when the leader certainly did not append it.
pub(crate) async fn submit(
    queue: &ForwardQueue,
    peer_url: &str,
    op: WriteOp,
) -> Result<Reply, EtcdError> {
    let (tx, rx) = oneshot::channel();
    queue
        .send(Pending {
            peer_url: peer_url.to_owned(),
            op,
            reply: tx,
        })
        .await
        .map_err(|_| EtcdError::Stopped)?;
    rx.await.map_err(|_| EtcdError::Stopped)?
}

fn op_bytes(op: &WriteOp) -> usize {
    match op {
        WriteOp::Put(b) | WriteOp::DeleteRange(b) | WriteOp::Txn(b) => b.len(),
        _ => 16,
    }
}

/// Drains the queue until the member stops.
pub(crate) async fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<Pending>) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Writes for another leader than the batch being gathered wait for the next batch.
    let mut held: VecDeque<Pending> = VecDeque::new();
    loop {
        let permit = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let first = match held.pop_front() {
            Some(p) => p,
            None => tokio::select! {
                _ = inner.cancel.cancelled() => return,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
            },
        };
        let url = first.peer_url.clone();
        let mut bytes = op_bytes(&first.op);
        let mut batch = vec![first];
        let mut rest = VecDeque::new();
        while let Some(p) = held.pop_front() {
            if p.peer_url == url && batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
                bytes += op_bytes(&p.op);
                batch.push(p);
            } else {
                rest.push_back(p);
            }
        }
        held = rest;
        while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) if p.peer_url == url => {
                    bytes += op_bytes(&p.op);
                    batch.push(p);
                }
                Ok(p) => held.push_back(p),
                Err(_) => break,
            }
        }
        let inner2 = inner.clone();
        inner.tracker.spawn(async move {
            let _permit = permit;
            let (ops, waiters): (Vec<WriteOp>, Vec<Waiter>) =
                batch.into_iter().map(|p| (p.op, p.reply)).unzip();
            let n = ops.len();
            let res = inner2
                .forward(&url, &ForwardRequest::Writes(ops), false)
                .await;
            match res {
                Ok(ForwardResponse::Writes(replies)) if replies.len() == n => {
                    for (w, r) in waiters.into_iter().zip(replies) {
                        let _ = w.send(r);
                    }
                }
                Ok(other) => {
                    let e = EtcdError::Internal(format!("unexpected forward reply {other:?}"));
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
