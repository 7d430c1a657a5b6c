//! Batched linearizable reads (etcd's linearizable read loop): every read waiting when a round
//! starts shares one ReadIndex round trip, then waits until the local state machine has
//! applied up to the read index.
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use crate::error::EtcdError;

type Waiter = oneshot::Sender<Result<(), EtcdError>>;

/// Queue of reads waiting for the next ReadIndex round.
#[derive(Debug, Default)]
pub(crate) struct ReadQueue {
    waiters: Mutex<Vec<Waiter>>,
    notify: Notify,
}

impl ReadQueue {
    /// Waits until a ReadIndex round that started after this call has completed.
    pub(crate) async fn barrier(&self) -> Result<(), EtcdError> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        self.notify.notify_one();
        rx.await.map_err(|_| EtcdError::Stopped)?
    }

    /// Takes every waiting read, after waiting for at least one.
    pub(crate) async fn next_round(&self) -> Vec<Waiter> {
        loop {
            {
                let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
                if !w.is_empty() {
                    return std::mem::take(&mut *w);
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Resolves one round's waiters.
pub(crate) fn resolve(waiters: Vec<Waiter>, result: Result<(), EtcdError>) {
    for w in waiters {
        let _ = w.send(result.clone());
    }
}

/// Shared handle.
pub(crate) type Reads = Arc<ReadQueue>;
