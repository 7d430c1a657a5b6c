//! Binds coalesced into store transactions (group commit).
//!
//! The scheduler keeps many binding requests in flight; each used to be one store `Txn`
//! (one Raft commit on the Flotilla store, one fsync-backed round on etcd). Here each bind's
//! guarded write (`ModRevision(pod) == expected` then `Put(pod)`) joins a queue; one flusher
//! turns whatever has queued up into a single `Txn` of up to [`MAX_BATCH`] compares and
//! puts. There is no timer: while one transaction is in flight the next batch gathers, so a
//! lone bind goes out at once and a busy scheduler's binds share commits.
//!
//! If the batch's transaction fails a compare nothing was written, and every bind of the batch
//! is retried on its own, so each request gets exactly the answer a lone write would have
//! given (`Conflict` with the current value for the one that lost, success for the others).
//!
//! [`MAX_BATCH`] stays within etcd's default `--max-txn-ops` (128 compares and 128 ops per
//! `Txn`, also the Flotilla store's default), so the API server runs unchanged on etcd 3.4.
//! A key appears at most once per transaction (etcd rejects duplicate keys in a `Txn`).
//!
//! The binds of one batch share one revision, so a watcher sees several pods modified at the
//! same `resourceVersion`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::storage::{Guard, Revision, Store, StoreError, TxnOp};

/// Most binds per store transaction: etcd's default `--max-txn-ops`.
pub(crate) const MAX_BATCH: usize = 128;

/// Transactions in flight at once: a second one overlaps the first's commit round trip.
const MAX_FLUSHERS: usize = 2;

/// One queued guarded write and where its answer goes.
struct Pending {
    key: String,
    value: Bytes,
    expected: Revision,
    reply: oneshot::Sender<Result<Revision, StoreError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    /// Flushers running now (at most [`MAX_FLUSHERS`]).
    flushers: usize,
}

/// Coalesces guarded single-key writes into shared store transactions. One per API server.
pub(crate) struct BindBatcher<S> {
    store: S,
    queue: Mutex<Queue>,
}

impl<S: Store> BindBatcher<S> {
    /// A batcher writing to `store`.
    pub(crate) fn new(store: S) -> Arc<Self> {
        Arc::new(BindBatcher {
            store,
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Replaces `key` if its mod revision is still `expected`: the answer of
    /// [`Store::update`], written together with other binds queued meanwhile.
    pub(crate) async fn update(
        self: &Arc<Self>,
        key: String,
        value: Bytes,
        expected: Revision,
    ) -> Result<Revision, StoreError> {
        let (reply, answer) = oneshot::channel();
        let start_flusher = {
            let mut q = self.lock()?;
            q.waiting.push(Pending {
                key,
                value,
                expected,
                reply,
            });
            let start = q.flushers < MAX_FLUSHERS;
            if start {
                q.flushers += 1;
            }
            start
        };
        if start_flusher {
            // A task of its own: a request handler that is cancelled (client gone) must not
            // take the other requests' writes with it.
            let me = self.clone();
            tokio::spawn(async move { me.flush().await });
        }
        answer
            .await
            .map_err(|_| StoreError::Internal("bind batch dropped".into()))?
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Queue>, StoreError> {
        self.queue
            .lock()
            .map_err(|_| StoreError::Internal("bind batch queue poisoned".into()))
    }

    /// Writes batches until the queue is empty.
    async fn flush(self: Arc<Self>) {
        loop {
            let batch = {
                let Ok(mut q) = self.lock() else { return };
                if q.waiting.is_empty() {
                    q.flushers -= 1;
                    return;
                }
                take_batch(&mut q.waiting)
            };
            self.write(batch).await;
        }
    }

    async fn write(&self, batch: Vec<Pending>) {
        if batch.len() == 1 {
            for p in batch {
                let r = self.store.update(&p.key, p.value, p.expected).await;
                let _ = p.reply.send(r);
            }
            return;
        }
        let guards = batch
            .iter()
            .map(|p| Guard {
                key: p.key.clone(),
                mod_revision: p.expected,
            })
            .collect();
        let ops = batch
            .iter()
            .map(|p| TxnOp::Put {
                key: p.key.clone(),
                value: p.value.clone(),
            })
            .collect();
        match self.store.txn(guards, ops).await {
            Ok(rev) => {
                for p in batch {
                    let _ = p.reply.send(Ok(rev));
                }
            }
            Err(StoreError::Conflict { .. }) => {
                // Some compare failed and nothing was written: each on its own, for its own
                // exact answer (and the others still succeed).
                let alone = batch.into_iter().map(|p| async move {
                    let r = self.store.update(&p.key, p.value, p.expected).await;
                    let _ = p.reply.send(r);
                });
                futures::future::join_all(alone).await;
            }
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Takes up to [`MAX_BATCH`] waiting writes in arrival order, each key at most once (a later
/// write of a key already taken waits for the next batch).
fn take_batch(waiting: &mut Vec<Pending>) -> Vec<Pending> {
    let mut keys = HashSet::new();
    let mut batch = Vec::new();
    let mut rest = Vec::new();
    for p in waiting.drain(..) {
        if batch.len() < MAX_BATCH && keys.insert(p.key.clone()) {
            batch.push(p);
        } else {
            rest.push(p);
        }
    }
    *waiting = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStore;

    async fn seed(store: &MemStore, n: usize) -> Vec<(String, Revision)> {
        let mut out = Vec::new();
        for i in 0..n {
            let key = format!("/registry/core/pods/default/p-{i}");
            let rev = store
                .create(&key, Bytes::from_static(b"{}"))
                .await
                .expect("create");
            out.push((key, rev));
        }
        out
    }

    // One thread: every bind is queued before the first flusher runs, so batching is certain.
    #[tokio::test]
    async fn concurrent_binds_share_transactions_and_all_land() {
        let store = MemStore::new();
        let pods = seed(&store, 500).await;
        let (_, before) = store.list("/registry/").await.expect("list");
        let b = BindBatcher::new(store.clone());
        let writes = pods.iter().map(|(k, rev)| {
            let b = b.clone();
            let (k, rev) = (k.clone(), *rev);
            async move { b.update(k, Bytes::from_static(b"{\"bound\":1}"), rev).await }
        });
        let revs: Vec<Revision> = futures::future::join_all(writes)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("every bind succeeds");
        let (kvs, after) = store.list("/registry/").await.expect("list");
        assert!(kvs.iter().all(|kv| kv.value.as_ref() == b"{\"bound\":1}"));
        // Full batches: one revision per transaction.
        let distinct: HashSet<Revision> = revs.into_iter().collect();
        assert_eq!(distinct.len(), pods.len().div_ceil(MAX_BATCH));
        assert_eq!(after - before, distinct.len() as i64);
    }

    #[tokio::test]
    async fn a_stale_bind_gets_its_own_conflict_and_the_rest_succeed() {
        let store = MemStore::new();
        let pods = seed(&store, 300).await;
        // Someone else wrote pod 7 after its revision was read.
        let (k7, r7) = pods[7].clone();
        store
            .update(&k7, Bytes::from_static(b"{\"other\":1}"), r7)
            .await
            .expect("update");
        let b = BindBatcher::new(store.clone());
        let writes = pods.iter().map(|(k, rev)| {
            let b = b.clone();
            let (k, rev) = (k.clone(), *rev);
            async move { b.update(k, Bytes::from_static(b"{\"bound\":1}"), rev).await }
        });
        let results = futures::future::join_all(writes).await;
        for (i, r) in results.iter().enumerate() {
            if i == 7 {
                match r {
                    Err(StoreError::Conflict { current: Some(cur) }) => {
                        assert_eq!(cur.value.as_ref(), b"{\"other\":1}");
                    }
                    other => panic!("pod 7: {other:?}"),
                }
            } else {
                assert!(r.is_ok(), "pod {i}: {r:?}");
            }
        }
        let got = store.get(&k7).await.expect("get").expect("present");
        assert_eq!(got.value.as_ref(), b"{\"other\":1}");
    }

    #[test]
    fn a_batch_has_each_key_once_and_at_most_max_batch() {
        let mut waiting = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..(MAX_BATCH + 10) {
            let (reply, rx) = oneshot::channel();
            rxs.push(rx);
            // Keys 0 and 1 are written twice.
            let key = format!("k{}", if i == 5 || i == 6 { i - 5 } else { i });
            waiting.push(Pending {
                key,
                value: Bytes::new(),
                expected: 1,
                reply,
            });
        }
        let batch = take_batch(&mut waiting);
        assert_eq!(batch.len(), MAX_BATCH);
        let keys: HashSet<&str> = batch.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys.len(), MAX_BATCH);
        assert_eq!(waiting.len(), 10);
        assert!(waiting.iter().any(|p| p.key == "k0"));
    }
}
