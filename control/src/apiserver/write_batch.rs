//! Guarded single-key writes coalesced into store transactions (group commit).
//!
//! Binds from the scheduler, status writes from agents, lease renewals, every other update
//! guarded by a resourceVersion, and plain creates arrive many at a time; each used to be one
//! store `Txn` (one Raft commit on the Flotilla store, one fsync-backed round on etcd). Here
//! each guarded write (`ModRevision(key) == expected`, or `== 0` for a create, then
//! `Put(key)`) joins a queue; a flusher turns
//! whatever has queued up into a single `Txn` of up to [`MAX_BATCH`] compares and puts. There
//! is no timer: while one transaction is in flight the next batch gathers, so a lone write
//! goes out at once and busy writers share commits.
//!
//! Every caller gets exactly the answer a lone [`Store::update`] (or [`Store::create`]) would
//! have given. If the
//! batch's transaction fails a compare, nothing was written: the batch's keys are read, the
//! writes whose key moved on are answered from that read (`Conflict` with the current value,
//! or `NotFound`), and the rest are written again together; should that fail too (a key moved
//! between the read and the write), each is retried on its own.
//!
//! [`MAX_BATCH`] stays within etcd's default `--max-txn-ops` (128 compares and 128 ops per
//! `Txn`, also the Flotilla store's default) and [`MAX_BATCH_BYTES`] within its default
//! `--max-request-bytes` (1.5 MiB), so the API server runs unchanged on etcd 3.4. A key appears
//! at most once per transaction (etcd rejects duplicate keys in a `Txn`); a later write of a
//! key waits for the next batch, so one key's writes keep their order.
//!
//! The writes of one batch share one revision, so a watcher sees several objects modified at
//! the same `resourceVersion` (see the watch server for how it keeps such a revision whole).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::storage::{Guard, Revision, Store, StoreError, TxnOp};

/// Most writes per store transaction: etcd's default `--max-txn-ops`.
pub(crate) const MAX_BATCH: usize = 128;

/// Most key and value bytes per store transaction: under etcd's default
/// `--max-request-bytes` (1.5 MiB) with room for the compares and framing. A single larger
/// write still goes out, alone.
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Transactions in flight at once: a second one overlaps the first's commit round trip.
const MAX_FLUSHERS: usize = 2;

/// One queued guarded write and where its answer goes.
struct Pending {
    key: String,
    value: Bytes,
    /// The key's mod revision the write expects; 0 for a create (the key must be absent).
    expected: Revision,
    reply: oneshot::Sender<Result<Revision, StoreError>>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    /// Flushers running now (at most [`MAX_FLUSHERS`]).
    flushers: usize,
}

/// Coalesces guarded single-key writes into shared store transactions. One per API server.
pub(crate) struct WriteBatcher<S> {
    store: S,
    queue: Mutex<Queue>,
}

impl<S: Store> WriteBatcher<S> {
    /// A batcher writing to `store`.
    pub(crate) fn new(store: S) -> Arc<Self> {
        Arc::new(WriteBatcher {
            store,
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Replaces `key` if its mod revision is still `expected`: the answer of
    /// [`Store::update`], written together with other writes queued meanwhile.
    pub(crate) async fn update(
        self: &Arc<Self>,
        key: String,
        value: Bytes,
        expected: Revision,
    ) -> Result<Revision, StoreError> {
        if expected <= 0 {
            // Revisions start at 1; 0 is this queue's mark for a create.
            return self.store.update(&key, value, expected).await;
        }
        self.queue_write(key, value, expected).await
    }

    /// Creates `key`, which must not exist: the answer of [`Store::create`], written together
    /// with other writes queued meanwhile.
    pub(crate) async fn create(
        self: &Arc<Self>,
        key: String,
        value: Bytes,
    ) -> Result<Revision, StoreError> {
        self.queue_write(key, value, 0).await
    }

    async fn queue_write(
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
            .map_err(|_| StoreError::Internal("write batch dropped".into()))?
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Queue>, StoreError> {
        self.queue
            .lock()
            .map_err(|_| StoreError::Internal("write batch queue poisoned".into()))
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
            self.alone(batch).await;
            return;
        }
        match self.txn(&batch).await {
            Ok(rev) => answer_all(batch, Ok(rev)),
            Err(StoreError::Conflict { .. }) => {
                // Nothing was written. Answer the stale writes from a read of their keys and
                // write the others together again.
                let fresh = self.answer_stale(batch).await;
                match fresh.len() {
                    0 => {}
                    1 => self.alone(fresh).await,
                    _ => match self.txn(&fresh).await {
                        Ok(rev) => answer_all(fresh, Ok(rev)),
                        // A key moved between the read and this write: one by one.
                        Err(StoreError::Conflict { .. }) => self.alone(fresh).await,
                        Err(e) => answer_all(fresh, Err(e)),
                    },
                }
            }
            // The store refused the transaction itself (say a smaller `--max-txn-ops`): each
            // write on its own gets the answer it would have had.
            Err(StoreError::Internal(_)) => self.alone(batch).await,
            // Unavailable: a lone write would fail the same way; retrying 128 of them would
            // only load a store that is already struggling.
            Err(e) => answer_all(batch, Err(e)),
        }
    }

    async fn txn(&self, batch: &[Pending]) -> Result<Revision, StoreError> {
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
        self.store.txn(guards, ops).await
    }

    /// Each write as its own [`Store::update`] or [`Store::create`], concurrently.
    async fn alone(&self, batch: Vec<Pending>) {
        let alone = batch.into_iter().map(|p| async move {
            let r = if p.expected == 0 {
                self.store.create(&p.key, p.value).await
            } else {
                self.store.update(&p.key, p.value, p.expected).await
            };
            let _ = p.reply.send(r);
        });
        futures::future::join_all(alone).await;
    }

    /// Reads every key of `batch`; answers the writes whose key is gone or moved on (what
    /// [`Store::update`] answers: `NotFound`, or `Conflict` with the current value) or, for
    /// creates, exists (`AlreadyExists`), and returns the others. A write whose read fails is
    /// answered by a lone write.
    async fn answer_stale(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let reads = batch.iter().map(|p| self.store.get(&p.key));
        let current = futures::future::join_all(reads).await;
        let mut fresh = Vec::new();
        let mut unread = Vec::new();
        for (p, cur) in batch.into_iter().zip(current) {
            let answer = match cur {
                Ok(Some(kv)) if kv.mod_revision == p.expected => {
                    fresh.push(p);
                    continue;
                }
                Ok(None) if p.expected == 0 => {
                    fresh.push(p);
                    continue;
                }
                Ok(Some(_)) if p.expected == 0 => StoreError::AlreadyExists,
                Ok(Some(kv)) => StoreError::Conflict { current: Some(kv) },
                Ok(None) => StoreError::NotFound,
                Err(_) => {
                    unread.push(p);
                    continue;
                }
            };
            let _ = p.reply.send(Err(answer));
        }
        if !unread.is_empty() {
            self.alone(unread).await;
        }
        fresh
    }
}

fn answer_all(batch: Vec<Pending>, r: Result<Revision, StoreError>) {
    for p in batch {
        let _ = p.reply.send(r.clone());
    }
}

/// Takes waiting writes in arrival order, up to [`MAX_BATCH`] of them and [`MAX_BATCH_BYTES`]
/// (the first always), each key at most once: a later write of a key already taken, or one
/// that does not fit, waits for the next batch.
fn take_batch(waiting: &mut Vec<Pending>) -> Vec<Pending> {
    // Keys taken or left waiting: a key's later writes never overtake its earlier ones.
    let mut seen = HashSet::new();
    let mut batch = Vec::new();
    let mut rest = Vec::new();
    let mut bytes = 0;
    for p in waiting.drain(..) {
        let fits = batch.is_empty() || bytes + p.bytes() <= MAX_BATCH_BYTES;
        let first_of_key = seen.insert(p.key.clone());
        if batch.len() < MAX_BATCH && fits && first_of_key {
            bytes += p.bytes();
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

    // One thread: every write is queued before the first flusher runs, so batching is certain.
    #[tokio::test]
    async fn concurrent_writes_share_transactions_and_all_land() {
        let store = MemStore::new();
        let pods = seed(&store, 500).await;
        let (_, before) = store.list("/registry/").await.expect("list");
        let b = WriteBatcher::new(store.clone());
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
    async fn a_stale_write_gets_its_own_conflict_and_the_rest_succeed() {
        let store = MemStore::new();
        let pods = seed(&store, 300).await;
        // Someone else wrote pod 7 after its revision was read.
        let (k7, r7) = pods[7].clone();
        store
            .update(&k7, Bytes::from_static(b"{\"other\":1}"), r7)
            .await
            .expect("update");
        let b = WriteBatcher::new(store.clone());
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
        // The stale write's batch-mates were written together again, not one by one: the
        // 299 writes took three transactions (127 + 128 + 44).
        let distinct: HashSet<Revision> = results.iter().filter_map(|r| r.clone().ok()).collect();
        assert_eq!(distinct.len(), 3, "{distinct:?}");
    }

    /// Two writers of one key with the same resourceVersion, one of a deleted key, and other
    /// updates queued together: each caller gets what a lone update would have answered.
    #[tokio::test]
    async fn each_caller_gets_its_own_answer() {
        let store = MemStore::new();
        let pods = seed(&store, 20).await;
        let (gone, gone_rev) = pods[19].clone();
        store.delete(&gone, None).await.expect("delete");
        let b = WriteBatcher::new(store.clone());
        let (k0, r0) = pods[0].clone();
        let mut writes = vec![
            (k0.clone(), r0, "first"),
            (k0.clone(), r0, "second"),
            (gone.clone(), gone_rev, "late"),
        ];
        for (k, rev) in &pods[1..19] {
            writes.push((k.clone(), *rev, "status"));
        }
        let results = futures::future::join_all(writes.into_iter().map(|(k, rev, v)| {
            let b = b.clone();
            async move { b.update(k, Bytes::from(v), rev).await }
        }))
        .await;
        let first = results[0].clone().expect("the first writer of k0 wins");
        match &results[1] {
            Err(StoreError::Conflict { current: Some(cur) }) => {
                assert_eq!(
                    (cur.value.as_ref(), cur.mod_revision),
                    (&b"first"[..], first)
                );
            }
            other => panic!("second writer of k0: {other:?}"),
        }
        assert_eq!(results[2], Err(StoreError::NotFound));
        // The other 18 went out with the first writer, after the stale ones were answered.
        for r in &results[3..] {
            assert_eq!(r, &Ok(first));
        }
        assert!(store.get(&gone).await.expect("get").is_none());
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

    #[test]
    fn a_batch_stays_under_max_batch_bytes_and_keeps_each_keys_order() {
        let big = Bytes::from(vec![b'x'; 400 * 1024]);
        let mut waiting = Vec::new();
        let mut rxs = Vec::new();
        // a, b fit; c does not; a small later write of c must not overtake it; d fits.
        for (key, value) in [
            ("a", big.clone()),
            ("b", big.clone()),
            ("c", big.clone()),
            ("c", Bytes::from_static(b"small")),
            ("d", Bytes::from_static(b"small")),
        ] {
            let (reply, rx) = oneshot::channel();
            rxs.push(rx);
            waiting.push(Pending {
                key: key.into(),
                value,
                expected: 1,
                reply,
            });
        }
        let batch = take_batch(&mut waiting);
        let keys: Vec<&str> = batch.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "d"]);
        assert!(batch.iter().map(Pending::bytes).sum::<usize>() <= MAX_BATCH_BYTES);
        let rest: Vec<usize> = waiting.iter().map(|p| p.value.len()).collect();
        assert_eq!(rest, [400 * 1024, 5]);
        // A write larger than the limit still goes out, alone.
        let (reply, _rx) = oneshot::channel();
        let mut huge = vec![Pending {
            key: "h".into(),
            value: Bytes::from(vec![b'x'; 2 * MAX_BATCH_BYTES]),
            expected: 1,
            reply,
        }];
        assert_eq!(take_batch(&mut huge).len(), 1);
    }
}
