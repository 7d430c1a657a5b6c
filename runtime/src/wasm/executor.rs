//! One current-thread Tokio runtime per core, with containers placed on the least-loaded one.
//!
//! A work-stealing pool does not rebalance busy tasks that wake themselves (wasmtime-notes §6:
//! max/min CPU 1.7–3.0 between equal spinners); a current-thread runtime round-robins its tasks,
//! and [`super::cpu::Governed`] weights them by `requests.cpu`.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::cpu::Sched;
use crate::pod_runtime::RuntimeError;

pub(crate) struct Worker {
    pub(crate) handle: Handle,
    /// Containers placed here and not yet ended.
    pub(crate) load: AtomicUsize,
    /// Sum of the CPU requests (millicores) of those containers.
    pub(crate) millis: AtomicU64,
    pub(crate) sched: Arc<Sched>,
    /// `/proc/self/task/<tid>` of the worker thread, for its CPU time.
    task_dir: Arc<OnceLock<PathBuf>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

pub(crate) struct Executors {
    workers: Vec<Arc<Worker>>,
}

impl Executors {
    pub(crate) fn new(threads: usize) -> Result<Self, RuntimeError> {
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("flotilla-wasm-blocking-{i}"))
                .build()
                .map_err(|e| RuntimeError::Config(format!("cannot build executor runtime: {e}")))?;
            let handle = rt.handle().clone();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let task_dir = Arc::new(OnceLock::new());
            let my_task_dir = task_dir.clone();
            let thread = std::thread::Builder::new()
                .name(format!("flotilla-wasm-{i}"))
                .spawn(move || {
                    if let Ok(link) = std::fs::read_link("/proc/thread-self")
                        && let Some(tid) = link.file_name()
                    {
                        let _ = my_task_dir.set(PathBuf::from("/proc/self/task").join(tid));
                    }
                    // Runs until the runtime is dropped; remaining tasks (pods) are dropped with it.
                    let _ = rt.block_on(stop_rx);
                })
                .map_err(|e| RuntimeError::Config(format!("cannot spawn executor thread: {e}")))?;
            workers.push(Arc::new(Worker {
                handle,
                load: AtomicUsize::new(0),
                millis: AtomicU64::new(0),
                sched: Arc::new(Sched::default()),
                task_dir,
                stop: Mutex::new(Some(stop_tx)),
                thread: Mutex::new(Some(thread)),
            }));
        }
        Ok(Executors { workers })
    }

    /// The least-loaded worker (by requested CPU, then by container count), with the new
    /// container already counted in its load.
    pub(crate) fn place(&self, request_millis: u64) -> Arc<Worker> {
        let w = self
            .workers
            .iter()
            .min_by_key(|w| {
                (
                    w.millis.load(Ordering::Relaxed),
                    w.load.load(Ordering::Relaxed),
                )
            })
            .expect("invariant: at least one worker");
        w.load.fetch_add(1, Ordering::Relaxed);
        w.millis.fetch_add(request_millis, Ordering::Relaxed);
        w.clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// CPU time of all worker threads so far (scheduler statistics, nanoseconds).
    pub(crate) fn cpu_ns(&self) -> u64 {
        self.schedstat_field(0)
    }

    /// Time all worker threads spent waiting on a run queue (nanoseconds).
    pub(crate) fn runqueue_wait_ns(&self) -> u64 {
        self.schedstat_field(1)
    }

    fn schedstat_field(&self, field: usize) -> u64 {
        self.workers
            .iter()
            .filter_map(|w| w.task_dir.get())
            .filter_map(|d| std::fs::read_to_string(d.join("schedstat")).ok())
            .filter_map(|s| {
                s.split_whitespace()
                    .nth(field)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum()
    }

    /// Stops every worker thread, dropping the containers still running on them.
    pub(crate) fn shutdown(&self) {
        for w in &self.workers {
            if let Some(tx) = w
                .stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                let _ = tx.send(());
            }
        }
        for w in &self.workers {
            let t = w
                .thread
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(t) = t
                && t.thread().id() != std::thread::current().id()
            {
                let _ = t.join();
            }
        }
    }
}
