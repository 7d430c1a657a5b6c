//! Periodic compaction of the store's history, as kube-apiserver does
//! (`--etcd-compaction-interval`, 5 minutes by default).
//!
//! Without it the store keeps every version of every key: each pod's create, bind and status
//! writes and every node Lease heartbeat stay in memory for good (the Flotilla store keeps its
//! history in memory, as etcd keeps it on disk until compacted).
//!
//! Each tick compacts to the store revision seen at the previous tick, so one to two intervals
//! of history stay available to watches resuming from an older `resourceVersion`. Several API
//! servers on one store agree through one key, as Kubernetes' `compact_rev_key`: a tick only
//! compacts if it wins a guarded write of that key, so one server compacts per interval.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Guard, Revision, Store, StoreError, TxnOp};

/// Kubernetes' default compaction interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// The key the API servers of one store compact through (Kubernetes' name for it).
pub const COMPACT_KEY: &str = "compact_rev_key";

/// What the compactor remembers between ticks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compactor {
    /// The revision of [`COMPACT_KEY`] last seen (0: absent).
    key_revision: Revision,
    /// The store revision at the last tick: the next compaction's target.
    target: Option<Revision>,
}

impl Compactor {
    /// One tick: compacts to the previous tick's revision if this server wins the round;
    /// returns the revision compacted to, if any.
    pub async fn tick<S: Store>(&mut self, store: &S) -> Result<Option<Revision>, StoreError> {
        let seen = store
            .get(COMPACT_KEY)
            .await?
            .map_or(0, |kv| kv.mod_revision);
        let mut compacted = None;
        match self.target {
            Some(target) if seen == self.key_revision => {
                let claim = store
                    .txn(
                        vec![Guard {
                            key: COMPACT_KEY.into(),
                            mod_revision: seen,
                        }],
                        vec![TxnOp::Put {
                            key: COMPACT_KEY.into(),
                            value: Bytes::from(target.to_string()),
                        }],
                    )
                    .await;
                match claim {
                    Ok(rev) => {
                        self.key_revision = rev;
                        store.compact(target).await?;
                        compacted = Some(target);
                    }
                    // Another server compacted this round.
                    Err(StoreError::Conflict { .. }) => {
                        self.key_revision = store
                            .get(COMPACT_KEY)
                            .await?
                            .map_or(0, |kv| kv.mod_revision);
                    }
                    Err(e) => return Err(e),
                }
            }
            // Someone else moved the key since our last tick: follow, compact next round.
            _ => self.key_revision = seen,
        }
        self.target = Some(store.probe(COMPACT_KEY, 0).await?.revision);
        Ok(compacted)
    }
}

/// Compacts `store` every `interval` until `shutdown`; failures are logged and retried at the
/// next tick.
pub async fn run<S: Store>(store: S, interval: Duration, shutdown: CancellationToken) {
    let mut c = Compactor::default();
    loop {
        match c.tick(&store).await {
            Ok(Some(rev)) => tracing::info!(revision = rev, "compacted the store history"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "store compaction failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStore;

    #[tokio::test]
    async fn compacts_to_the_previous_tick_and_one_server_per_round() {
        let store = MemStore::new();
        let key = "/registry/core/pods/default/p";
        let r1 = store
            .create(key, Bytes::from_static(b"1"))
            .await
            .expect("create");
        let (mut a, mut b) = (Compactor::default(), Compactor::default());
        // First ticks only note where the store is.
        assert_eq!(a.tick(&store).await.expect("tick"), None);
        assert_eq!(b.tick(&store).await.expect("tick"), None);
        let seen = a.target.expect("target");
        store
            .update(key, Bytes::from_static(b"2"), r1)
            .await
            .expect("update");
        // A wins the round and compacts to what it saw; B, a step behind, only follows.
        assert_eq!(a.tick(&store).await.expect("tick"), Some(seen));
        assert_eq!(b.tick(&store).await.expect("tick"), None);
        assert!(matches!(
            store.watch("/registry/", r1 - 1).await.err(),
            Some(StoreError::Compacted { .. })
        ));
        // The current value survives; history after the target is still there.
        let got = store.get(key).await.expect("get").expect("present");
        assert_eq!(got.value.as_ref(), b"2");
        assert!(store.watch("/registry/", seen).await.is_ok());
    }
}
