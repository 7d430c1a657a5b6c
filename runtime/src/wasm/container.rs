//! One running container: its store, WASI context, limits, and how its end is classified.
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Waker};
use std::time::{Instant, SystemTime};

use api::pod::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use wasmtime::{InstancePre, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::cli::{
    AsyncStdinStream, AsyncStdoutStream, IsTerminal, StdinStream, StdoutStream,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use super::cpu::{Governed, Quota};
use super::executor::Worker;
use super::logs::LogSink;
use super::modules::Prepared;
use super::time::rfc3339_nanos;

/// Exit code and reason of a container the node stopped gracefully (128 + SIGTERM).
pub(crate) const EXIT_STOPPED: i32 = 143;
/// Exit code of a container killed forcefully, out of memory or out of fuel (128 + SIGKILL).
pub(crate) const EXIT_KILLED: i32 = 137;
/// Exit code of a trapped guest (128 + SIGABRT, what `abort()` gives a native process).
pub(crate) const EXIT_TRAP: i32 = 134;

/// Store data of a container.
pub(crate) struct PodData {
    pub(crate) wasi: WasiP1Ctx,
    limiter: MemLimiter,
}

/// Store data of a WASI 0.2 component container.
pub(crate) struct ComponentData {
    ctx: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
    limiter: MemLimiter,
}

impl wasmtime_wasi::WasiView for ComponentData {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Store data with a memory limiter, whichever kind of guest it runs.
trait Limited: Send + 'static {
    fn mem_limiter(&mut self) -> &mut MemLimiter;
}

impl Limited for PodData {
    fn mem_limiter(&mut self) -> &mut MemLimiter {
        &mut self.limiter
    }
}

impl Limited for ComponentData {
    fn mem_limiter(&mut self) -> &mut MemLimiter {
        &mut self.limiter
    }
}

impl PodData {
    /// Data for a store that never runs a guest (used to enumerate the linker).
    pub(crate) fn placeholder() -> Self {
        PodData {
            wasi: WasiCtxBuilder::new().build_p1(),
            limiter: MemLimiter {
                limit: 0,
                memory: 0,
                tables: 0,
                shared: None,
            },
        }
    }
}

/// `limits.memory` over linear memories plus tables (a pointer per table element).
struct MemLimiter {
    limit: u64,
    memory: u64,
    tables: u64,
    shared: Option<Arc<ContainerShared>>,
}

impl MemLimiter {
    fn grow(&mut self, is_memory: bool, current: u64, desired: u64) -> bool {
        let (mine, other) = if is_memory {
            (self.memory, self.tables)
        } else {
            (self.tables, self.memory)
        };
        let new_mine = mine.saturating_sub(current).saturating_add(desired);
        if new_mine.saturating_add(other) > self.limit {
            if let Some(s) = &self.shared {
                s.oom.store(true, Ordering::Relaxed);
            }
            return false;
        }
        if is_memory {
            self.memory = new_mine;
        } else {
            self.tables = new_mine;
        }
        if let Some(s) = &self.shared {
            s.memory_bytes
                .store(self.memory + self.tables, Ordering::Relaxed);
        }
        true
    }
}

impl ResourceLimiter for MemLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(true, current as u64, desired as u64))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let per = std::mem::size_of::<usize>() as u64;
        Ok(self.grow(false, current as u64 * per, desired as u64 * per))
    }
}

/// The error an epoch callback raises to end a container the node is stopping.
#[derive(Debug, thiserror::Error)]
#[error("stopped by the node")]
struct Stopped;

/// State of a container shared between its task, the runtime's API and the epoch callback.
pub(crate) struct ContainerShared {
    pub(crate) name: String,
    pub(crate) image: String,
    state: Mutex<ContainerState>,
    done: Notify,
    /// Checked by the epoch callback: a spinning guest ends at the next tick.
    kill: AtomicBool,
    /// Wakes the container task wherever it waits (host call, throttle, fair-share turn).
    cancel: CancellationToken,
    /// An exec process rather than the container itself.
    is_exec: bool,
    pub(crate) cpu_ns: AtomicU64,
    pub(crate) fuel_used: AtomicU64,
    pub(crate) memory_bytes: AtomicU64,
    /// Host address of the guest's linear memory once instantiated (0 before).
    pub(crate) memory_base: AtomicUsize,
    /// Set by the epoch callback when the guest yields because its slice ended.
    pub(crate) yielded: AtomicBool,
    oom: AtomicBool,
    requested_at: Instant,
    first_instruction: OnceLock<(Instant, SystemTime)>,
    /// When the container's task was first polled, and whether on the caller's thread.
    picked_up: OnceLock<(Instant, bool)>,
    abort: Mutex<Option<AbortHandle>>,
    pub(crate) log: Arc<LogSink>,
    pub(crate) log_path: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ContainerShared {
    pub(crate) fn new(
        name: String,
        image: String,
        requested_at: Instant,
        log: Arc<LogSink>,
        log_path: PathBuf,
    ) -> Arc<Self> {
        Self::with_cancel(
            name,
            image,
            requested_at,
            log,
            log_path,
            CancellationToken::new(),
            false,
        )
    }

    /// State of an exec process in this container: stopping the container stops it too.
    pub(crate) fn exec_child(&self, requested_at: Instant) -> Arc<Self> {
        Self::with_cancel(
            format!("{}-exec", self.name),
            self.image.clone(),
            requested_at,
            self.log.clone(),
            self.log_path.clone(),
            self.cancel.child_token(),
            true,
        )
    }

    /// Whether the node asked this container (or, for an exec, its container) to stop.
    pub(crate) fn stop_requested(&self) -> bool {
        self.kill.load(Ordering::Relaxed) || self.cancel.is_cancelled()
    }

    fn with_cancel(
        name: String,
        image: String,
        requested_at: Instant,
        log: Arc<LogSink>,
        log_path: PathBuf,
        cancel: CancellationToken,
        is_exec: bool,
    ) -> Arc<Self> {
        Arc::new(ContainerShared {
            name,
            image,
            state: Mutex::new(ContainerState::Waiting(ContainerStateWaiting {
                reason: Some("ContainerCreating".into()),
                message: None,
            })),
            done: Notify::new(),
            kill: AtomicBool::new(false),
            cancel,
            is_exec,
            cpu_ns: AtomicU64::new(0),
            fuel_used: AtomicU64::new(0),
            memory_bytes: AtomicU64::new(0),
            memory_base: AtomicUsize::new(0),
            yielded: AtomicBool::new(false),
            oom: AtomicBool::new(false),
            requested_at,
            first_instruction: OnceLock::new(),
            picked_up: OnceLock::new(),
            abort: Mutex::new(None),
            log,
            log_path,
        })
    }

    pub(crate) fn state(&self) -> ContainerState {
        lock(&self.state).clone()
    }

    pub(crate) fn is_terminated(&self) -> bool {
        lock(&self.state).is_terminated()
    }

    /// Time from the `run_pod` call to the first guest instruction.
    pub(crate) fn start_latency(&self) -> Option<std::time::Duration> {
        self.first_instruction
            .get()
            .map(|(t, _)| t.duration_since(self.requested_at))
    }

    /// Start latency split at the moment the container's task was first polled.
    pub(crate) fn start_breakdown(&self) -> Option<super::StartBreakdown> {
        let (picked, inline) = *self.picked_up.get()?;
        let (first, _) = *self.first_instruction.get()?;
        Some(super::StartBreakdown {
            to_first_poll: picked.duration_since(self.requested_at),
            to_first_instruction: first.duration_since(picked),
            on_caller: inline,
        })
    }

    /// Graceful stop: the guest ends at its next epoch tick or wake-up.
    pub(crate) fn request_stop(&self) {
        self.kill.store(true, Ordering::Relaxed);
        self.cancel.cancel();
    }

    /// Forceful stop: drops the task at its next poll, whatever it awaits.
    pub(crate) fn abort(&self) {
        self.kill.store(true, Ordering::Relaxed);
        if let Some(a) = lock(&self.abort).as_ref() {
            a.abort();
        }
    }

    /// Waits until the container has terminated or `deadline` passes; true if terminated.
    pub(crate) async fn wait_terminated(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_terminated() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_terminated();
            }
        }
    }

    fn mark_running(&self) {
        let now = (Instant::now(), SystemTime::now());
        let _ = self.first_instruction.set(now);
        *lock(&self.state) = ContainerState::Running(ContainerStateRunning {
            started_at: Some(rfc3339_nanos(now.1)),
        });
    }

    fn finish(&self, exit_code: i32, reason: &str, message: Option<String>) {
        {
            let mut st = lock(&self.state);
            if st.is_terminated() {
                return;
            }
            *st = ContainerState::Terminated(ContainerStateTerminated {
                exit_code,
                reason: Some(reason.to_owned()),
                message,
                started_at: self.first_instruction.get().map(|(_, t)| rfc3339_nanos(*t)),
                finished_at: Some(rfc3339_nanos(SystemTime::now())),
            });
        }
        // An exec writes to its own buffers; the container's log stays open.
        if !self.is_exec {
            self.log.close();
        }
        self.done.notify_waiters();
    }
}

/// Where a guest's stdout and stderr go.
#[derive(Clone)]
pub(crate) enum Stdio {
    /// The container's CRI log file.
    Log,
    /// In-memory buffers (exec), each holding at most its capacity: past it, writes fail.
    Capture(MemoryOutputPipe, MemoryOutputPipe),
    /// A streaming exec session: each stream only if the client asked for it.
    Stream {
        stdin: Option<Shared<AsyncStdinStream>>,
        stdout: Option<Shared<AsyncStdoutStream>>,
        stderr: Option<Shared<AsyncStdoutStream>>,
    },
}

/// A clonable handle to a WASI stdio stream (the async stream types are not `Clone`, a
/// [`Launch`] is); every clone is the same stream.
pub(crate) struct Shared<T>(pub(crate) Arc<T>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T: IsTerminal> IsTerminal for Shared<T> {
    fn is_terminal(&self) -> bool {
        self.0.is_terminal()
    }
}

impl<T: StdinStream + Sync> StdinStream for Shared<T> {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::InputStream> {
        self.0.p2_stream()
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        self.0.async_stream()
    }
}

impl<T: StdoutStream + Sync> StdoutStream for Shared<T> {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        self.0.p2_stream()
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        self.0.async_stream()
    }
}

/// What a guest instance runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// The WASI command's `_start`.
    Start,
    /// An exported function taking nothing and returning nothing or an `i32` exit code, called
    /// after `_initialize` if the module has one.
    Export { name: String, returns_code: bool },
}

/// Everything needed to start one container (or one exec in it).
#[derive(Clone)]
pub(crate) struct Launch {
    pub(crate) pre: Prepared,
    pub(crate) entry: Entry,
    pub(crate) argv: Vec<String>,
    /// Bytes the guest reads from stdin, then end of file; `None` is an empty stdin.
    pub(crate) stdin: Option<bytes::Bytes>,
    /// A container with `stdin: true` and no stdin data: its stdin stays open and is fed by
    /// `kubectl attach -i` (the writer end is the pod's attach point).
    pub(crate) live_stdin: Option<Shared<AsyncStdinStream>>,
    pub(crate) stdio: Stdio,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: Option<String>,
    pub(crate) preopens: Vec<(PathBuf, String, FsPerms)>,
    pub(crate) memory_limit: u64,
    pub(crate) fuel_limit: Option<u64>,
    pub(crate) cpu_limit_millis: Option<u64>,
    pub(crate) shares: u64,
    /// `requests.cpu` (defaulted from `limits.cpu`), for placement.
    pub(crate) request_millis: u64,
}

/// Releases the container's slot when its task ends, however it ends.
struct ExitGuard {
    shared: Arc<ContainerShared>,
    worker: Arc<Worker>,
    live: Arc<AtomicUsize>,
    /// How the container ended; `None` if its task was aborted or dropped.
    end: Option<End>,
    request_millis: u64,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        // Release the slot before publishing the end, so whoever waits for the end sees it free.
        self.worker.load.fetch_sub(1, Ordering::Relaxed);
        self.worker
            .millis
            .fetch_sub(self.request_millis, Ordering::Relaxed);
        self.live.fetch_sub(1, Ordering::Relaxed);
        let (code, reason, message) =
            self.end
                .take()
                .unwrap_or((EXIT_KILLED, "Error", Some("killed by the node".into())));
        self.shared.finish(code, reason, message);
    }
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// Starts the container on `worker`. The caller has counted it in `live` and `worker.load`.
///
/// When the worker has no runnable container (it is idle, so probably parked), the task's first
/// poll runs right here on the caller's thread, inside the worker's runtime context, and only
/// then is the task handed to the worker. Waking a parked executor thread costs about 50 µs on
/// this kind of machine, four times the runtime's own start work; running the first slice here
/// takes nothing from the worker's other containers (none is runnable), is accounted and
/// throttled by [`Governed`] like every slice, and is bounded by one epoch tick. Every later
/// poll happens on the worker, so fair sharing among its containers is unchanged.
pub(crate) fn spawn(
    launch: Launch,
    shared: Arc<ContainerShared>,
    worker: Arc<Worker>,
    live: Arc<AtomicUsize>,
) {
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    let task_shared = shared.clone();
    let handle = worker.handle.clone();
    let inline = worker.sched.is_idle();
    let task = async move {
        let shared = task_shared;
        let _ = shared.picked_up.set((Instant::now(), inline));
        let mut guard = ExitGuard {
            shared: shared.clone(),
            worker,
            live,
            end: None,
            request_millis: launch.request_millis,
        };
        let quota = launch
            .cpu_limit_millis
            .map(|m| Quota::new(m, Instant::now()));
        let shares = launch.shares;
        let guest = Governed::new(
            run_guest(launch, shared.clone()),
            shared.clone(),
            quota,
            guard.worker.sched.clone(),
            key,
            shares,
        );
        let end = tokio::select! {
            biased;
            () = shared.cancel.cancelled() => {
                (EXIT_STOPPED, "Error", Some("stopped by the node".to_owned()))
            }
            end = guest => end,
        };
        guard.end = Some(end);
        drop(guard);
    };
    let mut task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(task);
    if inline {
        // Timers, IO and blocking work the guest starts belong to the worker's runtime.
        let _ctx = handle.enter();
        // Nothing is lost by a no-op waker: the task is polled again as soon as it is spawned,
        // which registers the worker's waker wherever the guest waits.
        let mut cx = Context::from_waker(Waker::noop());
        if task.as_mut().poll(&mut cx).is_ready() {
            return;
        }
    }
    let join = handle.spawn(task);
    *lock(&shared.abort) = Some(join.abort_handle());
}

pub(crate) type End = (i32, &'static str, Option<String>);

async fn run_guest(l: Launch, shared: Arc<ContainerShared>) -> End {
    let mut b = WasiCtxBuilder::new();
    b.args(&l.argv).envs(&l.env);
    match &l.stdio {
        Stdio::Log => {
            b.stdout(shared.log.stdout()).stderr(shared.log.stderr());
        }
        Stdio::Capture(out, err) => {
            b.stdout(out.clone()).stderr(err.clone());
        }
        Stdio::Stream {
            stdin,
            stdout,
            stderr,
        } => {
            if let Some(s) = stdin {
                b.stdin(s.clone());
            }
            if let Some(s) = stdout {
                b.stdout(s.clone());
            }
            if let Some(s) = stderr {
                b.stderr(s.clone());
            }
        }
    }
    if let Some(input) = &l.stdin {
        b.stdin(MemoryInputPipe::new(input.clone()));
    } else if let Some(live) = &l.live_stdin {
        b.stdin(live.clone());
    }
    // Never block the executor thread: file IO goes to the blocking pool, and sleeps (which
    // this flag would turn into thread::sleep) stay timers.
    b.allow_blocking_current_thread(false);
    if let Some(cwd) = &l.cwd {
        b.initial_cwd(cwd);
    }
    for (host, guest, perms) in &l.preopens {
        if let Err(e) = b.preopened_dir(host, guest, *perms) {
            return (
                1,
                "StartError",
                Some(format!("cannot open volume {}: {e}", host.display())),
            );
        }
    }
    let limiter = MemLimiter {
        limit: l.memory_limit,
        memory: 0,
        tables: 0,
        shared: Some(shared.clone()),
    };
    let initial_fuel = l.fuel_limit.unwrap_or(u64::MAX);
    let result = match &l.pre {
        Prepared::Module(pre) => {
            let data = PodData {
                wasi: b.build_p1(),
                limiter,
            };
            let mut store = match guest_store(pre.module().engine(), data, &shared, initial_fuel) {
                Ok(s) => s,
                Err(end) => return end,
            };
            let result = run_module(pre, &l.entry, &mut store, &shared).await;
            record_fuel(&store, &shared, initial_fuel);
            result
        }
        Prepared::Component(pre) => {
            let data = ComponentData {
                ctx: b.build(),
                table: wasmtime::component::ResourceTable::new(),
                limiter,
            };
            let mut store = match guest_store(pre.engine(), data, &shared, initial_fuel) {
                Ok(s) => s,
                Err(end) => return end,
            };
            let result = async {
                let command = pre.instantiate_async(&mut store).await?;
                shared.mark_running();
                // `wasi:cli/run` returns `result`: its error carries no code, so exit 1.
                let ended = command.wasi_cli_run().call_run(&mut store).await?;
                Ok(if ended.is_ok() { 0 } else { 1 })
            }
            .await;
            record_fuel(&store, &shared, initial_fuel);
            result
        }
    };
    classify(result, &shared, l.memory_limit)
}

/// A store with the container's memory limit, fuel and epoch deadline (stop, yield, metering).
fn guest_store<T: Limited>(
    engine: &wasmtime::Engine,
    data: T,
    shared: &Arc<ContainerShared>,
    initial_fuel: u64,
) -> Result<Store<T>, End> {
    let mut store = Store::new(engine, data);
    store.limiter(|d| d.mem_limiter());
    if let Err(e) = store.set_fuel(initial_fuel) {
        return Err((1, "StartError", Some(format!("cannot set fuel: {e}"))));
    }
    store.set_epoch_deadline(1);
    let cb_shared = shared.clone();
    store.epoch_deadline_callback(move |ctx| {
        if cb_shared.stop_requested() {
            return Err(wasmtime::Error::new(Stopped));
        }
        if let Ok(left) = ctx.get_fuel() {
            cb_shared
                .fuel_used
                .store(initial_fuel - left, Ordering::Relaxed);
        }
        cb_shared.yielded.store(true, Ordering::Relaxed);
        Ok(UpdateDeadline::Yield(1))
    });
    Ok(store)
}

fn record_fuel<T>(store: &Store<T>, shared: &ContainerShared, initial_fuel: u64) {
    if let Ok(left) = store.get_fuel() {
        shared
            .fuel_used
            .store(initial_fuel - left, Ordering::Relaxed);
    }
}

/// Instantiates a core module and runs its entry.
async fn run_module(
    pre: &InstancePre<PodData>,
    entry: &Entry,
    store: &mut Store<PodData>,
    shared: &ContainerShared,
) -> wasmtime::Result<i32> {
    let instance = pre.instantiate_async(&mut *store).await?;
    if !shared.is_exec
        && let Some(mem) = instance.get_memory(&mut *store, "memory")
    {
        // Only the address is kept, for the node's own memory accounting.
        let base = mem.data_ptr(&*store) as usize;
        shared.memory_base.store(base, Ordering::Relaxed);
    }
    match entry {
        Entry::Start => {
            let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
            shared.mark_running();
            start.call_async(&mut *store, ()).await.map(|()| 0)
        }
        Entry::Export { name, returns_code } => {
            let init = instance
                .get_typed_func::<(), ()>(&mut *store, "_initialize")
                .ok();
            shared.mark_running();
            if let Some(init) = init {
                init.call_async(&mut *store, ()).await?;
            }
            if *returns_code {
                let f = instance.get_typed_func::<(), i32>(&mut *store, name)?;
                f.call_async(&mut *store, ()).await
            } else {
                let f = instance.get_typed_func::<(), ()>(&mut *store, name)?;
                f.call_async(&mut *store, ()).await.map(|()| 0)
            }
        }
    }
}

fn classify(result: wasmtime::Result<i32>, shared: &ContainerShared, memory_limit: u64) -> End {
    let oom = shared.oom.load(Ordering::Relaxed);
    let oom_message = || Some(format!("memory limit of {memory_limit} bytes reached"));
    let e = match result {
        Ok(0) => return (0, "Completed", None),
        Ok(code) => return (code, "Error", None),
        Err(e) => e,
    };
    if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
        return match (*code, oom) {
            (0, _) => (0, "Completed", None),
            (_, true) => (EXIT_KILLED, "OOMKilled", oom_message()),
            (c, false) => (c, "Error", None),
        };
    }
    if e.is::<Stopped>() {
        return (EXIT_STOPPED, "Error", Some("stopped by the node".into()));
    }
    if let Some(Trap::OutOfFuel) = e.downcast_ref::<Trap>() {
        return (
            EXIT_KILLED,
            "FuelExhausted",
            Some("fuel limit exhausted".into()),
        );
    }
    if oom {
        return (EXIT_KILLED, "OOMKilled", oom_message());
    }
    let mut message = match e.downcast_ref::<Trap>() {
        Some(trap) => format!("wasm trap: {trap}"),
        None => format!("{e}"),
    };
    // The chain carries the wasm backtrace; keep its first lines as the message's detail.
    let detail = format!("{e:?}");
    for line in detail
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .take(3)
    {
        message.push_str("\n  ");
        message.push_str(line.trim());
    }
    message.truncate(4096);
    (EXIT_TRAP, "Error", Some(message))
}
