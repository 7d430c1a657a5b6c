//! Pods as WASI modules in wasmtime, with requests and limits enforced in the sandbox.
//!
//! Layout: `image` fetches modules (path, `file://`, `http://`, `https://`) into a
//! content-addressed cache; `modules` compiles them once (artifacts on disk keyed by content and
//! engine) and keeps an `InstancePre` per module; `executor` runs one current-thread Tokio
//! runtime per core; `cpu` accounts, throttles and fair-shares CPU per container; `container`
//! builds the store and classifies how a guest ended; `logs` writes the CRI log files.
//!
//! One `Engine` per node with epoch interruption (a 1 ms ticker thread) and fuel metering; the
//! pooling allocator is sized to [`WasmRuntimeConfig::max_pods`], and pods past it are refused.
//!
//! What a pod spec means here:
//! - `image`: a WASI preview 1 command module, or a WASI 0.2 command component (exporting
//!   `wasi:cli/run`; it gets the same memory limiter, fuel and epochs, and one component may
//!   take several of the pool's core-instance slots). Exec by exported function is for core
//!   modules only.
//! - `command` + `args`: argv (`argv[0]` defaults to the container name); `env`, `workingDir`.
//! - `stdin: true`: the container reads [`STDIN_ANNOTATION`] (or its per-container form) from
//!   stdin, then end of file; otherwise stdin is empty.
//! - `volumeMounts`: emptyDir (read-write) and hostPath (read-only unless `readOnly: false`)
//!   as preopened directories; nothing else of the host is reachable.
//! - `limits.memory`, `limits.cpu`, `requests.cpu`, [`FUEL_LIMIT_ANNOTATION`]: see `cpu` and
//!   `container`.
//! - exec ([`PodRuntime::exec`]): a fresh instance of the container's module with its env,
//!   volumes and limits, `argv` = the command, or a call of the exported function the command
//!   names; output captured (up to [`EXEC_OUTPUT_LIMIT`] per stream), the timeout enforced at
//!   epoch ticks, CPU and instructions charged to the container.
//!
//! Start latency: when the executor a container is placed on has nothing runnable, the
//! container's first slice runs on the `run_pod` caller's thread (see `container::spawn`), so a
//! start does not wait for a parked executor thread to wake up.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::pod::{Container, PodSpec};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi::FsPerms;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::pod_runtime::{
    ContainerStats, ContainerStatus, ExecOutput, PodConfig, PodId, PodRuntime, PodStats, PodStatus,
    RuntimeError, SandboxState, SessionIo,
};

mod container;
mod cpu;
mod executor;
mod image;
mod logs;
mod modules;
pub(crate) mod time;

/// A name for a temporary file unique within this process and across processes.
pub(crate) fn temp_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

use container::{ContainerShared, Launch, Shared};

/// Annotation: fuel (executed wasm instructions) budget for every container of the pod.
pub const FUEL_LIMIT_ANNOTATION: &str = "flotilla.dev/fuel-limit";

/// Annotation: the bytes containers with `stdin: true` read from standard input, then end of
/// file. `flotilla.dev/stdin.<container>` sets it for one container and wins over the pod-wide
/// one. A container with `stdin: true` and neither annotation reads an empty stdin; one with
/// `stdin: false` (the default) always does, as in Kubernetes.
pub const STDIN_ANNOTATION: &str = "flotilla.dev/stdin";

/// Output an exec keeps per stream; writes past it fail in the guest.
pub const EXEC_OUTPUT_LIMIT: usize = 16 << 20;

/// Settings of a [`WasmRuntime`].
#[derive(Debug, Clone)]
pub struct WasmRuntimeConfig {
    /// Node state: image cache, compiled modules, pod volumes and logs.
    pub root_dir: PathBuf,
    /// Image cache and compiled modules; defaults to `root_dir`. Several runtimes (tests) may
    /// share one.
    pub cache_dir: Option<PathBuf>,
    /// Most containers alive at once; sizes the pooling allocator. Pods past it are refused.
    pub max_pods: u32,
    /// Modules larger than this are refused.
    pub max_module_bytes: u64,
    /// Largest linear memory a container may have; also the limit of containers without
    /// `limits.memory`.
    pub max_memory_bytes: u64,
    /// Executor threads (one current-thread runtime each); 0 means one per core.
    pub executor_threads: usize,
    /// Epoch tick: the time slice and the granularity of stops and throttling.
    pub epoch_tick: Duration,
    /// Rotate a container log past this size.
    pub log_max_bytes: u64,
    /// Log files kept per container, the current one included.
    pub log_max_files: u32,
    /// A PEM file of CA certificates trusted for `https://` images besides the system bundle
    /// (a private registry, tests).
    pub extra_ca_bundle: Option<PathBuf>,
}

impl WasmRuntimeConfig {
    /// Defaults: 1024 pods, 100 MiB modules, 1 GiB memory, a thread per core, 1 ms ticks,
    /// 10 MiB × 5 log files.
    pub fn new(root_dir: impl Into<PathBuf>) -> Self {
        WasmRuntimeConfig {
            root_dir: root_dir.into(),
            cache_dir: None,
            max_pods: 1024,
            max_module_bytes: 100 << 20,
            max_memory_bytes: 1 << 30,
            executor_threads: 0,
            epoch_tick: Duration::from_millis(1),
            log_max_bytes: 10 << 20,
            log_max_files: 5,
            extra_ca_bundle: None,
        }
    }
}

/// Where a container's start latency went (see [`WasmRuntime::start_breakdown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartBreakdown {
    /// `run_pod` call → first poll of the container's task: the runtime's own work before it,
    /// plus the wake-up of the executor thread when the task was handed over.
    pub to_first_poll: Duration,
    /// First poll → the guest's first instruction (WASI context, store, instantiation).
    pub to_first_instruction: Duration,
    /// The first poll ran on the `run_pod` caller's thread (the placed executor was idle).
    pub on_caller: bool,
}

/// The writer end of a container's open stdin.
type AttachStdin = Arc<tokio::sync::Mutex<Option<tokio::io::DuplexStream>>>;

struct WasmPod {
    id: PodId,
    name: String,
    namespace: String,
    dir: PathBuf,
    containers: Vec<Arc<ContainerShared>>,
    /// How each container was launched, the template of an exec in it.
    launches: Vec<Launch>,
    /// Per container with an open stdin (`stdin: true`, no stdin data): the writer end,
    /// which an `attach` session writes to. The end of the attached input closes it, as
    /// Kubernetes' `stdinOnce: true` (`kubectl run -i`) does; `None` inside once closed.
    attach_stdin: Vec<Option<AttachStdin>>,
}

struct Inner {
    config: WasmRuntimeConfig,
    images: image::ImageStore,
    modules: modules::Modules,
    executors: executor::Executors,
    pods: Mutex<HashMap<PodId, Arc<WasmPod>>>,
    live: Arc<AtomicUsize>,
    next_id: AtomicU64,
    ticker_stop: Arc<AtomicBool>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A spinning guest only notices a stop at an epoch tick: stop every guest and the
        // executors first, and the ticker last.
        for pod in self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            for c in &pod.containers {
                c.request_stop();
            }
        }
        self.executors.shutdown();
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self
            .ticker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

/// The wasm [`PodRuntime`]. Cheap to clone; dropping the last clone stops every pod.
#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

/// Memory mappings the node needs for `max_pods` (wasmtime-notes §8: pooling ≈ 2.5 per slot up
/// front plus ≈ 3.5 per live pod), with headroom for the rest of the process.
fn mappings_needed(max_pods: u32) -> u64 {
    4096 + 7 * u64::from(max_pods)
}

fn check_map_count(max_pods: u32) -> Result<(), RuntimeError> {
    let Some(limit) = read_max_map_count() else {
        return Ok(());
    };
    let used = std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count() as u64)
        .unwrap_or(0);
    let need = used + mappings_needed(max_pods);
    if need > limit {
        return Err(RuntimeError::Config(format!(
            "{max_pods} pods need about {need} memory mappings but vm.max_map_count is {limit}; \
             raise it (as root: `sysctl -w vm.max_map_count={}`) or lower max_pods to {}",
            need.next_power_of_two(),
            limit.saturating_sub(used + 4096) / 7
        )));
    }
    Ok(())
}

/// Current `vm.max_map_count`, if readable.
pub fn read_max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl WasmRuntime {
    /// Builds the engine, pool, executors and epoch ticker; checks `vm.max_map_count`.
    pub fn new(config: WasmRuntimeConfig) -> Result<Self, RuntimeError> {
        if config.max_pods == 0 {
            return Err(RuntimeError::Config("max_pods must be at least 1".into()));
        }
        check_map_count(config.max_pods)?;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(config.max_pods)
            .total_memories(config.max_pods)
            .total_tables(config.max_pods)
            .total_stacks(config.max_pods)
            .total_component_instances(config.max_pods)
            .max_memory_size(usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX));
        let mut wc = wasmtime::Config::new();
        wc.epoch_interruption(true)
            .consume_fuel(true)
            .parallel_compilation(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wc)
            .map_err(|e| RuntimeError::Config(format!("cannot create the wasm engine: {e:#}")))?;
        let root = &config.root_dir;
        // Pods do not survive the node agent: start from a clean pods directory.
        let pods_dir = root.join("pods");
        let _ = std::fs::remove_dir_all(&pods_dir);
        std::fs::create_dir_all(&pods_dir).map_err(|e| {
            RuntimeError::Config(format!("cannot create {}: {e}", pods_dir.display()))
        })?;
        let cache = config.cache_dir.clone().unwrap_or_else(|| root.clone());
        let images = image::ImageStore::new(
            cache.join("images/sha256"),
            config.max_module_bytes,
            config.extra_ca_bundle.clone(),
        )?;
        let modules = modules::Modules::new(engine.clone(), cache.join("modules"))?;
        let threads = match config.executor_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let executors = executor::Executors::new(threads)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("flotilla-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| RuntimeError::Config(format!("cannot spawn the epoch ticker: {e}")))?
        };
        Ok(WasmRuntime {
            inner: Arc::new(Inner {
                config,
                images,
                modules,
                executors,
                pods: Mutex::new(HashMap::new()),
                live: Arc::new(AtomicUsize::new(0)),
                next_id: AtomicU64::new(1),
                ticker_stop,
                ticker: Mutex::new(Some(ticker)),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &WasmRuntimeConfig {
        &self.inner.config
    }

    /// Containers currently holding a pool slot.
    pub fn live_containers(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Number of executor threads.
    pub fn executor_threads(&self) -> usize {
        self.inner.executors.len()
    }

    /// CPU time consumed so far by the executor threads (from `/proc/self/task/*/schedstat`),
    /// i.e. by guests plus the runtime's own per-slice work: an independent check of the
    /// per-container accounting.
    pub fn executor_cpu_ns(&self) -> u64 {
        self.inner.executors.cpu_ns()
    }

    /// Waits until every container of the pod has terminated, or `timeout` passes.
    pub async fn wait_pod(&self, id: &PodId, timeout: Duration) -> Result<PodStatus, RuntimeError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        for c in &pod.containers {
            if !c.wait_terminated(deadline).await {
                return Err(RuntimeError::Transient(format!(
                    "pod {id} still runs after {timeout:?}"
                )));
            }
        }
        Ok(status_of(&pod))
    }

    /// `(host address, size)` of the linear memory of every instantiated container, for
    /// measuring how much of the node's RSS is guest memory.
    pub fn linear_memory_ranges(&self) -> Vec<(usize, usize)> {
        let pods = self
            .inner
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pods.values()
            .flat_map(|p| p.containers.iter())
            .filter_map(|c| {
                let base = c.memory_base.load(Ordering::Relaxed);
                let len = c.memory_bytes.load(Ordering::Relaxed);
                (base != 0).then(|| (base, usize::try_from(len).unwrap_or(usize::MAX)))
            })
            .collect()
    }

    /// Start latency of each container of a pod split in two: `run_pod` call → first poll of
    /// the container's task, and → the guest's first instruction.
    pub fn start_breakdown(&self, id: &PodId) -> Result<Vec<Option<StartBreakdown>>, RuntimeError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        Ok(pod.containers.iter().map(|c| c.start_breakdown()).collect())
    }

    /// Time the executor threads spent runnable but waiting for a CPU (scheduler statistics,
    /// nanoseconds): CPU the node did not get, which no throttle can hand out.
    pub fn executor_runqueue_wait_ns(&self) -> u64 {
        self.inner.executors.runqueue_wait_ns()
    }

    /// Fetches and compiles an image ahead of time (what `run_pod` does on a cold image).
    pub async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        self.prepare(image).await.map(|_| ())
    }

    async fn prepare(&self, image: &str) -> Result<modules::Prepared, RuntimeError> {
        let inner = &self.inner;
        if let Some(digest) = inner.images.cached(image)
            && let Some(pre) = inner.modules.get(&digest)
        {
            return Ok(pre);
        }
        let inner = self.inner.clone();
        let image = image.to_owned();
        // Fetching, hashing and Cranelift are blocking and CPU-heavy: keep them off the reactor.
        tokio::task::spawn_blocking(move || {
            let (digest, path) = inner.images.pull(&image)?;
            inner.modules.prepare(&image, &digest, &path)
        })
        .await
        .map_err(|e| RuntimeError::Internal(format!("image preparation task failed: {e}")))?
    }

    fn pod(&self, id: &PodId) -> Option<Arc<WasmPod>> {
        self.inner
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn launch(
        &self,
        pod: &PodConfig,
        c: &Container,
        pre: modules::Prepared,
        pod_dir: &Path,
    ) -> Result<Launch, RuntimeError> {
        let cfg = &self.inner.config;
        let res = &c.resources;
        let memory_limit = res.memory_limit_bytes()?.unwrap_or(cfg.max_memory_bytes);
        if memory_limit > cfg.max_memory_bytes {
            return Err(RuntimeError::InvalidSpec(format!(
                "container {:?}: limits.memory {memory_limit} exceeds the node's per-pod maximum of {}",
                c.name, cfg.max_memory_bytes
            )));
        }
        let cpu_limit_millis = res.cpu_limit_millis()?;
        if cpu_limit_millis == Some(0) {
            return Err(RuntimeError::InvalidSpec(format!(
                "container {:?}: limits.cpu is 0",
                c.name
            )));
        }
        // API defaulting copies limits into unset requests; do the same for the share weight.
        let request = res.cpu_request_millis()?.or(cpu_limit_millis);
        let fuel_limit = fuel_limit(&pod.annotations, &c.name)?;
        let stdin = stdin_data(&pod.annotations, c)?;
        let mut argv = if c.command.is_empty() {
            vec![c.name.clone()]
        } else {
            c.command.clone()
        };
        argv.extend(c.args.iter().cloned());
        let mut env: Vec<(String, String)> = c
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        if let Some(wd) = &c.working_dir {
            env.push(("PWD".into(), wd.clone()));
        }
        let mut preopens = Vec::new();
        for m in &c.volume_mounts {
            let v = pod
                .spec
                .volumes
                .iter()
                .find(|v| v.name == m.name)
                .ok_or_else(|| {
                    RuntimeError::InvalidSpec(format!(
                        "container {:?} mounts unknown volume {:?}",
                        c.name, m.name
                    ))
                })?;
            let (host, writable_default) = match (&v.empty_dir, &v.host_path) {
                (Some(_), None) => (pod_dir.join("volumes").join(&v.name), true),
                (None, Some(h)) => (PathBuf::from(&h.path), false),
                _ => {
                    return Err(RuntimeError::InvalidSpec(format!(
                        "volume {:?}: exactly one of emptyDir and hostPath is supported",
                        v.name
                    )));
                }
            };
            let writable = !m.read_only.unwrap_or(!writable_default);
            let perms = if writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            preopens.push((host, m.mount_path.clone(), perms));
        }
        Ok(Launch {
            pre,
            entry: container::Entry::Start,
            argv,
            stdin,
            live_stdin: None,
            stdio: container::Stdio::Log,
            env,
            cwd: c.working_dir.clone(),
            preopens,
            memory_limit,
            fuel_limit,
            cpu_limit_millis,
            shares: cpu::shares(request),
            request_millis: request.unwrap_or(0),
        })
    }
}

fn fuel_limit(
    annotations: &BTreeMap<String, String>,
    container: &str,
) -> Result<Option<u64>, RuntimeError> {
    if annotations.is_empty() {
        return Ok(None);
    }
    let specific = format!("{FUEL_LIMIT_ANNOTATION}.{container}");
    let Some(v) = annotations
        .get(&specific)
        .or_else(|| annotations.get(FUEL_LIMIT_ANNOTATION))
    else {
        return Ok(None);
    };
    let clean: String = v.chars().filter(|c| *c != '_').collect();
    clean.trim().parse::<u64>().map(Some).map_err(|_| {
        RuntimeError::InvalidSpec(format!(
            "annotation {FUEL_LIMIT_ANNOTATION}: {v:?} is not a whole number"
        ))
    })
}

fn stdin_data(
    annotations: &BTreeMap<String, String>,
    c: &Container,
) -> Result<Option<bytes::Bytes>, RuntimeError> {
    if annotations.is_empty() {
        return Ok(None);
    }
    let specific = format!("{STDIN_ANNOTATION}.{}", c.name);
    if !c.stdin {
        if annotations.contains_key(&specific) {
            return Err(RuntimeError::InvalidSpec(format!(
                "annotation {specific} is set but container {:?} does not have `stdin: true`",
                c.name
            )));
        }
        return Ok(None);
    }
    Ok(annotations
        .get(&specific)
        .or_else(|| annotations.get(STDIN_ANNOTATION))
        .map(|v| bytes::Bytes::from(v.clone().into_bytes())))
}

fn validate(spec: &PodSpec) -> Result<(), RuntimeError> {
    if spec.containers.is_empty() {
        return Err(RuntimeError::InvalidSpec("pod has no containers".into()));
    }
    if !spec.init_containers.is_empty() {
        return Err(RuntimeError::InvalidSpec(
            "the wasm runtime does not run init containers yet".into(),
        ));
    }
    let mut names = HashSet::new();
    for c in &spec.containers {
        if c.name.is_empty() || !names.insert(c.name.as_str()) {
            return Err(RuntimeError::InvalidSpec(format!(
                "container name {:?} is empty or repeated",
                c.name
            )));
        }
        if c.name.contains('/') || c.name.contains("..") {
            return Err(RuntimeError::InvalidSpec(format!(
                "container name {:?} is not a DNS label",
                c.name
            )));
        }
    }
    for v in &spec.volumes {
        if v.name.contains('/') || v.name.contains("..") || v.name.is_empty() {
            return Err(RuntimeError::InvalidSpec(format!(
                "volume name {:?} is not a DNS label",
                v.name
            )));
        }
    }
    Ok(())
}

impl PodRuntime for WasmRuntime {
    fn name(&self) -> &'static str {
        "wasm"
    }

    async fn run_pod(&self, pod: &PodConfig) -> Result<PodId, RuntimeError> {
        let requested_at = Instant::now();
        validate(&pod.spec)?;
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let id = PodId(format!("wasm-{n}"));
        let pod_dir = self.inner.config.root_dir.join("pods").join(&id.0);
        let mut launches = Vec::with_capacity(pod.spec.containers.len());
        let mut attach_stdin = Vec::with_capacity(pod.spec.containers.len());
        for c in &pod.spec.containers {
            let pre = self.prepare(&c.image).await?;
            let mut launch = self.launch(pod, c, pre, &pod_dir)?;
            if c.stdin && launch.stdin.is_none() {
                let (w, r) = tokio::io::duplex(64 * 1024);
                launch.live_stdin = Some(Shared(Arc::new(AsyncStdinStream::new(r))));
                attach_stdin.push(Some(Arc::new(tokio::sync::Mutex::new(Some(w)))));
            } else {
                attach_stdin.push(None);
            }
            launches.push(launch);
        }
        let want = launches.len();
        let cap = self.inner.config.max_pods as usize;
        let reserved = self
            .inner
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                (live + want <= cap).then_some(live + want)
            });
        if let Err(live) = reserved {
            return Err(RuntimeError::AtCapacity(format!(
                "{live} of {cap} wasm containers are running (max_pods); pod {:?} needs {want} more",
                pod.name
            )));
        }
        if pod.spec.volumes.iter().any(|v| v.empty_dir.is_some()) {
            for v in pod.spec.volumes.iter().filter(|v| v.empty_dir.is_some()) {
                if let Err(e) = std::fs::create_dir_all(pod_dir.join("volumes").join(&v.name)) {
                    self.inner.live.fetch_sub(want, Ordering::AcqRel);
                    return Err(RuntimeError::Internal(format!(
                        "cannot create emptyDir {:?}: {e}",
                        v.name
                    )));
                }
            }
        }
        let policy = logs::LogPolicy {
            max_bytes: self.inner.config.log_max_bytes,
            max_files: self.inner.config.log_max_files,
        };
        let shared: Vec<Arc<ContainerShared>> = pod
            .spec
            .containers
            .iter()
            .map(|c| {
                let log_path = pod_dir.join("logs").join(&c.name).join("0.log");
                let sink = logs::LogSink::new(log_path.clone(), policy.clone());
                ContainerShared::new(
                    c.name.clone(),
                    c.image.clone(),
                    requested_at,
                    sink,
                    log_path,
                )
            })
            .collect();
        let entry = Arc::new(WasmPod {
            id: id.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            dir: pod_dir,
            containers: shared.clone(),
            launches: launches.clone(),
            attach_stdin,
        });
        self.inner
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone(), entry);
        for (launch, s) in launches.into_iter().zip(shared) {
            let worker = self.inner.executors.place(launch.request_millis);
            container::spawn(launch, s, worker, self.inner.live.clone());
        }
        Ok(id)
    }

    async fn stop_pod(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        let Some(pod) = self.pod(id) else {
            return Ok(());
        };
        for c in &pod.containers {
            c.request_stop();
        }
        let deadline = tokio::time::Instant::now() + grace;
        for c in &pod.containers {
            if !c.wait_terminated(deadline).await {
                c.abort();
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for c in &pod.containers {
            if !c.wait_terminated(deadline).await {
                return Err(RuntimeError::Internal(format!(
                    "container {:?} of pod {id} did not stop after being aborted",
                    c.name
                )));
            }
        }
        Ok(())
    }

    async fn remove_pod(&self, id: &PodId) -> Result<(), RuntimeError> {
        let Some(pod) = self.pod(id) else {
            return Ok(());
        };
        self.stop_pod(id, Duration::ZERO).await?;
        self.inner
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        let dir = pod.dir.clone();
        if dir.exists() {
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
                .await
                .map_err(|e| RuntimeError::Internal(format!("cleanup task failed: {e}")))?
                .map_err(|e| RuntimeError::Internal(format!("cannot remove pod directory: {e}")))?;
        }
        Ok(())
    }

    async fn pod_status(&self, id: &PodId) -> Result<PodStatus, RuntimeError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        Ok(status_of(&pod))
    }

    async fn list_pods(&self) -> Result<Vec<PodStatus>, RuntimeError> {
        let pods: Vec<Arc<WasmPod>> = self
            .inner
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        Ok(pods.iter().map(|p| status_of(p)).collect())
    }

    async fn logs(&self, id: &PodId, container: &str) -> Result<String, RuntimeError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        let c = pod
            .containers
            .iter()
            .find(|c| c.name == container)
            .ok_or_else(|| RuntimeError::ContainerNotFound {
                pod: id.clone(),
                container: container.to_owned(),
            })?;
        let path = c.log_path.clone();
        let files = self.inner.config.log_max_files;
        tokio::task::spawn_blocking(move || logs::read_all(&path, files))
            .await
            .map_err(|e| RuntimeError::Internal(format!("log read task failed: {e}")))?
            .map_err(|e| RuntimeError::Internal(format!("cannot read log: {e}")))
    }

    async fn exec(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.exec_instance(id, container, command, timeout).await
    }

    async fn exec_stream(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        self.exec_streaming(id, container, command, io).await
    }

    async fn attach(
        &self,
        id: &PodId,
        container: &str,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        self.attach_container(id, container, io).await
    }

    async fn stats(&self, id: &PodId) -> Result<PodStats, RuntimeError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        Ok(PodStats {
            containers: pod
                .containers
                .iter()
                .map(|c| ContainerStats {
                    name: c.name.clone(),
                    cpu_ns: c.cpu_ns.load(Ordering::Relaxed),
                    instructions: Some(c.fuel_used.load(Ordering::Relaxed)),
                    memory_bytes: c.memory_bytes.load(Ordering::Relaxed),
                    start_latency: c.start_latency(),
                })
                .collect(),
        })
    }
}

/// Stops an exec instance whose session went away (its future dropped).
struct StopOnDrop(Option<Arc<ContainerShared>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.request_stop();
        }
    }
}

impl WasmRuntime {
    /// The pod and the index of its container `container`.
    fn container_of(
        &self,
        id: &PodId,
        container: &str,
    ) -> Result<(Arc<WasmPod>, usize), RuntimeError> {
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        let index = pod
            .containers
            .iter()
            .position(|c| c.name == container)
            .ok_or_else(|| RuntimeError::ContainerNotFound {
                pod: id.clone(),
                container: container.to_owned(),
            })?;
        if pod.containers[index].is_terminated() {
            return Err(RuntimeError::InvalidSpec(format!(
                "container {container:?} of pod {id} is not running"
            )));
        }
        Ok((pod, index))
    }

    /// [`PodRuntime::exec_stream`]: a fresh instance of the container's module, as
    /// [`PodRuntime::exec`], with WASI stdin, stdout and stderr wired to the session. WASI has
    /// no terminals: with a TTY stderr joins stdout and resizes are ignored.
    async fn exec_streaming(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        let requested_at = Instant::now();
        let (pod, index) = self.container_of(id, container)?;
        let parent = &pod.containers[index];
        if command.is_empty() {
            return Err(RuntimeError::InvalidSpec("exec needs a command".into()));
        }
        let mut launch = pod.launches[index].clone();
        launch.entry = exec_entry(&launch.pre, &command[0]);
        launch.argv = command;
        launch.stdin = None;
        launch.live_stdin = None;
        // Small write budgets: output leaves as soon as the guest writes it.
        let out = |w| Shared(Arc::new(AsyncStdoutStream::new(8 * 1024, w)));
        // No terminal driver here: a TTY client (raw mode) needs "\r\n" line ends.
        let stdout = io
            .stdout
            .map(|w| if io.tty { onlcr(w) } else { w })
            .map(out);
        let stderr = match (io.tty, io.stderr) {
            (true, _) => stdout.clone(),
            (false, Some(w)) => Some(out(w)),
            (false, None) => None,
        };
        launch.stdio = container::Stdio::Stream {
            stdin: io.stdin.map(|r| Shared(Arc::new(AsyncStdinStream::new(r)))),
            stdout,
            stderr,
        };
        let cap = self.inner.config.max_pods as usize;
        if let Err(live) =
            self.inner
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                    (live < cap).then_some(live + 1)
                })
        {
            return Err(RuntimeError::AtCapacity(format!(
                "{live} of {cap} wasm instances are running (max_pods); exec needs one more"
            )));
        }
        let exec = parent.exec_child(requested_at);
        let worker = self.inner.executors.place(launch.request_millis);
        container::spawn(launch, exec.clone(), worker, self.inner.live.clone());
        let mut guard = StopOnDrop(Some(exec.clone()));
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        while !exec.wait_terminated(far).await {}
        guard.0 = None;
        parent
            .cpu_ns
            .fetch_add(exec.cpu_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        parent
            .fuel_used
            .fetch_add(exec.fuel_used.load(Ordering::Relaxed), Ordering::Relaxed);
        let Some(t) = exec.state().terminated().cloned() else {
            return Err(RuntimeError::Internal("exec ended without a state".into()));
        };
        Ok(t.exit_code)
    }

    /// [`PodRuntime::attach`]: the container's output from now on (tapped from its log
    /// sink), and its open stdin if it has one (`stdin: true` without stdin data).
    async fn attach_container(
        &self,
        id: &PodId,
        container: &str,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        use tokio::io::AsyncWriteExt as _;
        let (pod, index) = self.container_of(id, container)?;
        let c = pod.containers[index].clone();
        let mut taps = c.log.subscribe();
        let SessionIo {
            stdin,
            mut stdout,
            mut stderr,
            tty,
            resize: _,
        } = io;
        let feeder = match (stdin, pod.attach_stdin[index].clone()) {
            (Some(mut input), Some(sink)) => Some(tokio::spawn(async move {
                // One attached writer at a time.
                let mut w = sink.lock().await;
                if let Some(pipe) = w.as_mut()
                    && tokio::io::copy(&mut input, pipe).await.is_ok()
                {
                    // End of the attached input: end of file for the container.
                    if let Some(mut pipe) = w.take() {
                        let _ = pipe.shutdown().await;
                    }
                }
            })),
            _ => None,
        };
        let _feeder = AbortOnDrop(feeder);
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let ended = c.wait_terminated(far);
        tokio::pin!(ended);
        loop {
            tokio::select! {
                m = taps.recv() => match m {
                    Ok((stream, bytes)) => {
                        let w = if stream == 0 || tty { stdout.as_mut() } else { stderr.as_mut() };
                        if let Some(w) = w {
                            let _ = w.write_all(&bytes).await;
                            let _ = w.flush().await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                done = &mut ended => if done { break },
            }
        }
        // Output written just before the end.
        while let Ok((stream, bytes)) = taps.try_recv() {
            let w = if stream == 0 || tty {
                stdout.as_mut()
            } else {
                stderr.as_mut()
            };
            if let Some(w) = w {
                let _ = w.write_all(&bytes).await;
            }
        }
        Ok(c.state().terminated().map_or(0, |t| t.exit_code))
    }

    /// [`PodRuntime::exec`]: a fresh instance of the container's module in the same sandbox.
    async fn exec_instance(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let requested_at = Instant::now();
        let pod = self
            .pod(id)
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        let index = pod
            .containers
            .iter()
            .position(|c| c.name == container)
            .ok_or_else(|| RuntimeError::ContainerNotFound {
                pod: id.clone(),
                container: container.to_owned(),
            })?;
        let parent = &pod.containers[index];
        if parent.is_terminated() {
            return Err(RuntimeError::InvalidSpec(format!(
                "cannot exec in container {container:?} of pod {id}: it is not running"
            )));
        }
        if command.is_empty() {
            return Err(RuntimeError::InvalidSpec("exec needs a command".into()));
        }
        let mut launch = pod.launches[index].clone();
        launch.entry = exec_entry(&launch.pre, &command[0]);
        launch.argv = command;
        launch.stdin = None;
        launch.live_stdin = None;
        let (out, err) = (
            MemoryOutputPipe::new(EXEC_OUTPUT_LIMIT),
            MemoryOutputPipe::new(EXEC_OUTPUT_LIMIT),
        );
        launch.stdio = container::Stdio::Capture(out.clone(), err.clone());
        let cap = self.inner.config.max_pods as usize;
        if let Err(live) =
            self.inner
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                    (live < cap).then_some(live + 1)
                })
        {
            return Err(RuntimeError::AtCapacity(format!(
                "{live} of {cap} wasm instances are running (max_pods); exec needs one more"
            )));
        }
        let exec = parent.exec_child(requested_at);
        let worker = self.inner.executors.place(launch.request_millis);
        container::spawn(launch, exec.clone(), worker, self.inner.live.clone());
        // Zero means no timeout, as in CRI's ExecSync.
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let deadline = match timeout {
            Duration::ZERO => far,
            t => tokio::time::Instant::now() + t,
        };
        let timed_out = !exec.wait_terminated(deadline).await;
        if timed_out {
            // Ends at the next epoch tick or wake-up; abort if it somehow does not.
            exec.request_stop();
            if !exec
                .wait_terminated(tokio::time::Instant::now() + Duration::from_secs(5))
                .await
            {
                exec.abort();
            }
        }
        // The exec ran in the container's sandbox: charge its CPU and instructions there.
        parent
            .cpu_ns
            .fetch_add(exec.cpu_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        parent
            .fuel_used
            .fetch_add(exec.fuel_used.load(Ordering::Relaxed), Ordering::Relaxed);
        if timed_out {
            return Err(RuntimeError::Transient(format!(
                "exec in container {container:?} of pod {id} timed out after {timeout:?}"
            )));
        }
        let Some(t) = exec.state().terminated().cloned() else {
            return Err(RuntimeError::Internal("exec ended without a state".into()));
        };
        let mut stderr = err.contents().to_vec();
        if t.exit_code != 0
            && let Some(m) = &t.message
        {
            // A trap or a stop leaves no output of its own; say why, as a shell would.
            stderr.extend_from_slice(
                format!("{}: {m}\n", t.reason.as_deref().unwrap_or("Error")).as_bytes(),
            );
        }
        Ok(ExecOutput {
            exit_code: t.exit_code,
            stdout: out.contents().to_vec(),
            stderr,
        })
    }
}

/// A writer that turns each `\n` into `\r\n` on its way to `w`, as a terminal's ONLCR does.
fn onlcr(w: crate::pod_runtime::SessionWriter) -> crate::pod_runtime::SessionWriter {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tx, mut rx) = tokio::io::duplex(8 * 1024);
    tokio::spawn(async move {
        let mut w = w;
        let mut b = vec![0u8; 8 * 1024];
        let mut out = Vec::with_capacity(16 * 1024);
        loop {
            let n = match rx.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            out.clear();
            for &c in &b[..n] {
                if c == b'\n' {
                    out.push(b'\r');
                }
                out.push(c);
            }
            if w.write_all(&out).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
        // Dropping `w` ends the session's output once everything is through.
    });
    Box::pin(tx)
}

/// Aborts a helper task when the session using it ends.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// What an exec of `name` runs: the exported function of that name if the module has one
/// that takes nothing and returns nothing or an `i32`, else the command's `_start`.
fn exec_entry(pre: &modules::Prepared, name: &str) -> container::Entry {
    if name != "_start"
        && let Some(module) = pre.module()
        && let Some(wasmtime::ExternType::Func(f)) = module.get_export(name)
        && f.params().len() == 0
    {
        let results: Vec<_> = f.results().collect();
        match results.as_slice() {
            [] => {
                return container::Entry::Export {
                    name: name.to_owned(),
                    returns_code: false,
                };
            }
            [wasmtime::ValType::I32] => {
                return container::Entry::Export {
                    name: name.to_owned(),
                    returns_code: true,
                };
            }
            _ => {}
        }
    }
    container::Entry::Start
}

fn status_of(pod: &WasmPod) -> PodStatus {
    let containers: Vec<ContainerStatus> = pod
        .containers
        .iter()
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone(),
            state: c.state(),
        })
        .collect();
    let ready = containers.iter().any(|c| !c.state.is_terminated());
    PodStatus {
        id: pod.id.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        state: if ready {
            SandboxState::Ready
        } else {
            SandboxState::NotReady
        },
        containers,
    }
}

#[cfg(test)]
mod onlcr_tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn newlines_become_crlf_and_the_end_passes_through() {
        let (w, mut r) = tokio::io::duplex(1024);
        let mut t = super::onlcr(Box::pin(w));
        t.write_all(b"a\nb\n\nc").await.expect("write");
        drop(t);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"a\r\nb\r\n\r\nc");
    }
}

/// Paths of the `wasm-examples` guests built for this crate by its build script.
pub mod guests {
    use std::path::PathBuf;

    /// The built guest `name` (`hello`, `exit_code`, `spinner`, `memory_hog`, `sleeper`,
    /// `log_spammer`, `file_writer`, `upper`, `toolbox`).
    pub fn path(name: &str) -> PathBuf {
        PathBuf::from(env!("FLOTILLA_GUESTS_DIR")).join(format!("{name}.wasm"))
    }
}
