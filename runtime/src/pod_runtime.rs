//! The `PodRuntime` seam: what the node agent asks of any way of running pods.
//!
//! Shaped after the CRI `RuntimeService`, folded to pod granularity because Flotilla's node agent
//! never manages containers of a pod separately:
//!
//! | `PodRuntime` | CRI calls |
//! |---|---|
//! | [`PodRuntime::run_pod`] | `RunPodSandbox` + `CreateContainer` + `StartContainer` per container |
//! | [`PodRuntime::stop_pod`] | `StopContainer(timeout)` per container + `StopPodSandbox` |
//! | [`PodRuntime::remove_pod`] | `RemoveContainer` per container + `RemovePodSandbox` |
//! | [`PodRuntime::pod_status`] | `PodSandboxStatus` + `ContainerStatus` per container |
//! | [`PodRuntime::list_pods`] | `ListPodSandbox` + `ListContainers` |
//! | [`PodRuntime::logs`] | reading the container's CRI log file |
//! | [`PodRuntime::stats`] | `ContainerStats` per container |
//! | [`PodRuntime::exec`] | `ExecSync` (probes) |
//! | [`PodRuntime::exec_stream`] | `Exec` + its streaming URL (`kubectl exec`) |
//! | [`PodRuntime::attach`] | `Attach` + its streaming URL (`kubectl attach`) |
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use api::pod::{ContainerState, PodSpec, QuantityError};

/// Identifier of a pod on one runtime, assigned by `run_pod`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId(pub String);

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything a runtime needs to run a pod: CRI's `PodSandboxConfig` plus the container configs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodConfig {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.annotations`; e.g. `flotilla.dev/fuel-limit`.
    pub annotations: BTreeMap<String, String>,
    /// The pod spec.
    pub spec: PodSpec,
}

impl PodConfig {
    /// A pod named `name` in namespace `default` with the given spec.
    pub fn new(name: impl Into<String>, spec: PodSpec) -> Self {
        let name = name.into();
        PodConfig {
            uid: format!("uid-{name}"),
            name,
            namespace: "default".into(),
            annotations: BTreeMap::new(),
            spec,
        }
    }

    /// Adds an annotation.
    #[must_use]
    pub fn with_annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }
}

/// Pod sandbox phase, as CRI's `PodSandboxState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// Running or able to run containers.
    Ready,
    /// Stopped: no container runs any more.
    NotReady,
}

/// Status of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    /// Container name from the spec.
    pub name: String,
    /// Image as given in the spec.
    pub image: String,
    /// Kubernetes container state.
    pub state: ContainerState,
}

/// Status of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    /// Runtime id.
    pub id: PodId,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// Sandbox state: `Ready` while any container may still run.
    pub state: SandboxState,
    /// One entry per container, in spec order.
    pub containers: Vec<ContainerStatus>,
}

impl PodStatus {
    /// Whether every container has terminated.
    pub fn all_terminated(&self) -> bool {
        self.containers.iter().all(|c| c.state.is_terminated())
    }
}

/// Resource usage of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// Container name.
    pub name: String,
    /// CPU time used, in nanoseconds.
    pub cpu_ns: u64,
    /// Executed wasm instructions (fuel consumed); `None` where the runtime cannot count them.
    pub instructions: Option<u64>,
    /// Memory charged to the container (for wasm: linear memory plus tables), in bytes.
    pub memory_bytes: u64,
    /// Time from the `run_pod` call to the container's first instruction, if known.
    pub start_latency: Option<Duration>,
}

/// Resource usage of one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodStats {
    /// One entry per container.
    pub containers: Vec<ContainerStats>,
}

/// Result of [`PodRuntime::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code of the command.
    pub exit_code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// Size of a terminal, as sent on the resize channel (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// A byte source of a session (the client's stdin).
pub type SessionReader = Pin<Box<dyn tokio::io::AsyncRead + Send + Sync>>;
/// A byte sink of a session (towards the client's stdout or stderr).
pub type SessionWriter = Pin<Box<dyn tokio::io::AsyncWrite + Send + Sync>>;

/// The client's side of a streaming exec or attach: what the process reads and where its
/// output goes, each present only if the client asked for it.
#[derive(Default)]
pub struct SessionIo {
    /// The client's stdin; end of file when the client closes it.
    pub stdin: Option<SessionReader>,
    /// Where stdout goes (with a TTY, stderr too).
    pub stdout: Option<SessionWriter>,
    /// Where stderr goes (never set with a TTY).
    pub stderr: Option<SessionWriter>,
    /// The client asked for a terminal.
    pub tty: bool,
    /// Terminal size changes, when `tty`.
    pub resize: Option<tokio::sync::mpsc::Receiver<TerminalSize>>,
}

impl std::fmt::Debug for SessionIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("tty", &self.tty)
            .finish()
    }
}

/// Why a runtime call failed. Variants say what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No pod with this id (never created, or removed).
    #[error("pod {0} not found")]
    NotFound(PodId),
    /// The pod has no container of this name.
    #[error("pod {pod} has no container {container:?}")]
    ContainerNotFound {
        /// The pod.
        pod: PodId,
        /// The missing container name.
        container: String,
    },
    /// This runtime does not run this kind of pod; try another.
    #[error("runtime cannot handle this pod: {0}")]
    CantHandle(&'static str),
    /// The image could not be found or fetched.
    #[error("image {image:?} not found: {reason}")]
    ImageNotFound {
        /// The image reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// The image was found but refused (invalid module, unknown import, too large, digest
    /// mismatch); retrying will not help until the image changes.
    #[error("image {image:?} refused: {reason}")]
    ImageRefused {
        /// The image reference.
        image: String,
        /// Why, naming the offending import or limit.
        reason: String,
    },
    /// The pod spec is invalid for this runtime.
    #[error("invalid pod spec: {0}")]
    InvalidSpec(String),
    /// A malformed resource quantity.
    #[error("invalid resource quantity")]
    Quantity(#[from] QuantityError),
    /// The node is at its pod capacity; retry later or elsewhere.
    #[error("node is at capacity: {0}")]
    AtCapacity(String),
    /// A temporary failure; retrying may succeed.
    #[error("transient runtime failure: {0}")]
    Transient(String),
    /// The runtime's configuration does not fit this node (e.g. `vm.max_map_count` too low).
    #[error("runtime configuration: {0}")]
    Config(String),
    /// A bug or an environment failure (IO on the node's own directories, ...).
    #[error("internal runtime failure: {0}")]
    Internal(String),
}

/// A way of running pods on this node (wasm in-process, OCI through CRI, a fake in tests).
///
/// # Contract (checked by `testing::conformance::run_all`, feature `test-util`)
///
/// - `run_pod` returns once every container has been created and started (or has already
///   ended); images are fetched and prepared first, and refused images fail the call before
///   anything runs.
/// - `stop_pod` and `remove_pod` are idempotent: calling them again, or on an id that was already
///   removed or never existed, succeeds. `stop_pod` returns once every container has terminated;
///   `grace` bounds the graceful phase, after which the runtime kills forcefully. `remove_pod`
///   stops the pod first if it still runs.
/// - `pod_status`, `stats` and `logs` on an unknown id fail with [`RuntimeError::NotFound`].
/// - `list_pods` reports what really exists in the runtime (pods that a restart lost are absent;
///   pods that outlive the node agent, as CRI pods do, are present), stopped but not yet removed
///   pods included with [`SandboxState::NotReady`].
pub trait PodRuntime: Send + Sync + 'static {
    /// Short name of the runtime class (`wasm`, `cri`, `fake`).
    fn name(&self) -> &'static str;

    /// Creates the sandbox and starts every container of the pod.
    fn run_pod(&self, pod: &PodConfig) -> impl Future<Output = Result<PodId, RuntimeError>> + Send;

    /// Stops every container: graceful for at most `grace`, then forceful.
    fn stop_pod(
        &self,
        id: &PodId,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Stops (if needed) and forgets the pod, releasing its resources and logs.
    fn remove_pod(&self, id: &PodId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Current status of a pod.
    fn pod_status(
        &self,
        id: &PodId,
    ) -> impl Future<Output = Result<PodStatus, RuntimeError>> + Send;

    /// All pods that exist in the runtime.
    fn list_pods(&self) -> impl Future<Output = Result<Vec<PodStatus>, RuntimeError>> + Send;

    /// The container's log in the CRI format (`<RFC3339Nano> <stdout|stderr> <F|P> <line>`),
    /// rotated files first.
    fn logs(
        &self,
        id: &PodId,
        container: &str,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    /// Resource usage of a pod's containers.
    fn stats(&self, id: &PodId) -> impl Future<Output = Result<PodStats, RuntimeError>> + Send;

    /// Runs `command` inside a running container and waits at most `timeout` for it
    /// (`kubectl exec`, exec probes). Runtimes that cannot exec say so with
    /// [`RuntimeError::CantHandle`].
    fn exec(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> impl Future<Output = Result<ExecOutput, RuntimeError>> + Send {
        let _ = (id, container, command, timeout);
        async {
            Err(RuntimeError::CantHandle(
                "this runtime cannot exec into containers",
            ))
        }
    }

    /// Runs `command` inside a running container with its stdio wired to `io` as it runs
    /// (`kubectl exec [-i] [-t]`) and returns its exit code. No timeout: the session ends it.
    /// The default runs [`PodRuntime::exec`] to completion and then writes its output (no
    /// stdin), for runtimes without a streaming path.
    fn exec_stream(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        io: SessionIo,
    ) -> impl Future<Output = Result<i32, RuntimeError>> + Send {
        async move {
            use tokio::io::AsyncWriteExt as _;
            let out = self.exec(id, container, command, Duration::ZERO).await?;
            let mut io = io;
            let tty = io.tty;
            if let Some(w) = io.stdout.as_mut() {
                let _ = w.write_all(&out.stdout).await;
                if tty {
                    let _ = w.write_all(&out.stderr).await;
                }
                let _ = w.flush().await;
            }
            if let Some(w) = io.stderr.as_mut() {
                let _ = w.write_all(&out.stderr).await;
                let _ = w.flush().await;
            }
            Ok(out.exit_code)
        }
    }

    /// Attaches `io` to a running container's own stdio (`kubectl attach`): its output from
    /// now on, and stdin if the container has `stdin: true`. Returns the container's exit code
    /// when it ends; the caller ends a session the client left by dropping the future.
    fn attach(
        &self,
        id: &PodId,
        container: &str,
        io: SessionIo,
    ) -> impl Future<Output = Result<i32, RuntimeError>> + Send {
        let _ = (id, container, io);
        async {
            Err(RuntimeError::CantHandle(
                "this runtime cannot attach to containers",
            ))
        }
    }
}
