//! The controller loop: a de-duplicating work queue of object keys with delayed requeues and
//! per-key exponential back-off on errors, drained by a few workers calling `reconcile`.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What to do with a key after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the next change.
    Done,
    /// Look again after this long (time-based conditions such as lease expiry).
    RequeueAfter(Duration),
}

/// A failed reconcile; the key is retried with back-off.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReconcileError(pub String);

impl From<super::client::ClientError> for ReconcileError {
    fn from(e: super::client::ClientError) -> Self {
        ReconcileError(e.to_string())
    }
}

/// A level-triggered, idempotent reconciler of one kind of object.
pub trait Reconciler: Send + Sync + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Brings the world in line with the object named `key` (which may no longer exist).
    fn reconcile(&self, key: &str) -> impl Future<Output = Result<Action, ReconcileError>> + Send;
}

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    queued: HashSet<String>,
    processing: HashSet<String>,
    /// Added while being processed: queued again when done.
    dirty: HashSet<String>,
    delayed: BTreeMap<(Instant, u64), String>,
    seq: u64,
    failures: HashMap<String, u32>,
}

/// A clonable handle to a work queue.
#[derive(Clone, Default)]
pub struct WorkQueue {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl WorkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `key` unless it is already queued.
    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        {
            let mut s = self.lock();
            if s.processing.contains(&key) {
                s.dirty.insert(key);
                return;
            }
            if !s.queued.insert(key.clone()) {
                return;
            }
            s.queue.push_back(key);
        }
        self.notify.notify_one();
    }

    /// Queues `key` after `after`.
    pub fn add_after(&self, key: impl Into<String>, after: Duration) {
        if after.is_zero() {
            self.add(key);
            return;
        }
        {
            let mut s = self.lock();
            s.seq += 1;
            let seq = s.seq;
            s.delayed.insert((Instant::now() + after, seq), key.into());
        }
        self.notify.notify_one();
    }

    /// Moves due delayed keys into the queue; returns the next deadline.
    fn promote(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut s = self.lock();
            while let Some(entry) = s.delayed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            s.delayed.keys().next().map(|(t, _)| *t)
        };
        for k in due {
            self.add(k);
        }
        next
    }

    /// Waits for the next key; `None` on shutdown.
    async fn next(&self, shutdown: &CancellationToken) -> Option<String> {
        loop {
            let next_deadline = self.promote();
            {
                let mut s = self.lock();
                if let Some(k) = s.queue.pop_front() {
                    s.queued.remove(&k);
                    s.processing.insert(k.clone());
                    return Some(k);
                }
            }
            let sleep = async {
                match next_deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.notify.notified() => {}
                _ = sleep => {}
            }
        }
    }

    fn done(&self, key: &str) {
        let requeue = {
            let mut s = self.lock();
            s.processing.remove(key);
            s.dirty.remove(key)
        };
        if requeue {
            self.add(key.to_string());
        }
    }

    fn failed(&self, key: &str) -> Duration {
        let n = {
            let mut s = self.lock();
            let n = s.failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        // 50 ms doubling, capped at 30 s.
        Duration::from_millis(50)
            .saturating_mul(1u32 << n.min(10))
            .min(Duration::from_secs(30))
    }

    fn forget(&self, key: &str) {
        self.lock().failures.remove(key);
    }
}

/// Runs `workers` workers draining `queue` into `r` until `shutdown`.
pub async fn run<R: Reconciler>(
    r: Arc<R>,
    queue: WorkQueue,
    workers: usize,
    shutdown: CancellationToken,
) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (r, queue, shutdown) = (r.clone(), queue.clone(), shutdown.clone());
        set.spawn(async move {
            while let Some(key) = queue.next(&shutdown).await {
                match r.reconcile(&key).await {
                    Ok(action) => {
                        queue.forget(&key);
                        queue.done(&key);
                        if let Action::RequeueAfter(d) = action {
                            queue.add_after(key, d);
                        }
                    }
                    Err(e) => {
                        let delay = queue.failed(&key);
                        tracing::debug!(controller = r.name(), %key, error = %e, ?delay, "reconcile failed; retrying");
                        queue.done(&key);
                        queue.add_after(key, delay);
                    }
                }
            }
        });
    }
    while let Some(res) = set.join_next().await {
        if let Err(e) = res
            && e.is_panic()
        {
            tracing::error!(controller = r.name(), error = %e, "controller worker panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deduplicates_and_delays() {
        let q = WorkQueue::default();
        let stop = CancellationToken::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.next(&stop).await.as_deref(), Some("a"));
        // Added while processing: comes back once done, not twice.
        q.add("a");
        q.add("a");
        assert_eq!(q.next(&stop).await.as_deref(), Some("b"));
        q.done("b");
        q.done("a");
        assert_eq!(q.next(&stop).await.as_deref(), Some("a"));
        q.done("a");
        q.add_after("c", Duration::from_millis(30));
        let t = Instant::now();
        assert_eq!(q.next(&stop).await.as_deref(), Some("c"));
        assert!(t.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let q = WorkQueue::default();
        let a = q.failed("k");
        let b = q.failed("k");
        assert!(b > a);
        for _ in 0..20 {
            q.failed("k");
        }
        assert_eq!(q.failed("k"), Duration::from_secs(30));
        q.forget("k");
        assert_eq!(q.failed("k"), a);
    }
}
