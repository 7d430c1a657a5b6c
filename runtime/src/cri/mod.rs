//! [`CriRuntime`]: OCI container pods through a CRI (`runtime.v1`) endpoint such as containerd,
//! spoken to over its Unix socket as the kubelet does.
//!
//! A pod is one sandbox (`RunPodSandbox`) plus one container per spec container
//! (`CreateContainer` + `StartContainer`); the [`PodId`] is the sandbox id. All state lives in
//! the CRI runtime: sandboxes and containers carry labels naming the pod and this runtime
//! instance ([`convert::LABEL_INSTANCE`]), so `list_pods` after an agent restart reports (and
//! thereby re-adopts) the pods an earlier agent process started.
//!
//! - [`pb`]: the generated `runtime.v1` subset (`proto/runtime/v1/cri.proto`), clients and
//!   servers.
//! - [`convert`]: pod → CRI config mappings, state mapping, pull policy.
//! - `fake` (feature `test-util`): `FakeCriServer`, a scripted CRI server for tests.
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pod_runtime::{
    ContainerStats, ContainerStatus, PodConfig, PodId, PodRuntime, PodStats, PodStatus,
    RuntimeError, SandboxState, SessionIo,
};

pub mod convert;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;

pub use convert::PullPolicy;
use convert::{LABEL_CONTAINER_INDEX, LABEL_CONTAINER_NAME, LABEL_INSTANCE, LABEL_MANAGED};

/// Generated CRI `runtime.v1` code (the subset in `proto/runtime/v1/cri.proto`).
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    reason = "generated"
)]
pub mod pb {
    tonic::include_proto!("runtime.v1");
}

use pb::image_service_client::ImageServiceClient;
use pb::runtime_service_client::RuntimeServiceClient;

/// Default CRI endpoint, the kubelet's `--container-runtime-endpoint` default.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// How to reach the CRI runtime and where pod files go.
#[derive(Debug, Clone)]
pub struct CriRuntimeConfig {
    /// The CRI socket: `unix:///abs/path.sock` or an absolute path.
    pub endpoint: String,
    /// Node directory for pod logs (`<root>/logs/<ns>_<name>_<uid>/<container>/0.log`) and
    /// emptyDir volumes (`<root>/volumes/...`). Must be absolute: containerd resolves it.
    pub root_dir: PathBuf,
    /// Name of this runtime instance (normally the node name); only sandboxes labelled with it
    /// are listed and adopted.
    pub instance: String,
    /// Run pods in the host network namespace (no CNI needed).
    pub host_network: bool,
    /// Root of pod cgroups with the cgroupfs driver (e.g. `/flotilla`); `None` leaves the
    /// choice to the runtime. Pod cgroup directories are removed with the pod.
    pub cgroup_root: Option<String>,
    /// CRI runtime handler (`""` for the runtime's default, e.g. `runc`).
    pub runtime_handler: String,
    /// Grace period `remove_pod` gives containers that still run.
    pub remove_grace: Duration,
}

impl CriRuntimeConfig {
    /// Host-network pods, default handler, no cgroup root, instance `flotilla`.
    pub fn new(endpoint: impl Into<String>, root_dir: impl Into<PathBuf>) -> Self {
        CriRuntimeConfig {
            endpoint: endpoint.into(),
            root_dir: root_dir.into(),
            instance: "flotilla".into(),
            host_network: true,
            cgroup_root: None,
            runtime_handler: String::new(),
            remove_grace: Duration::ZERO,
        }
    }
}

/// The socket path of a CRI endpoint given as `unix:///abs/path` or `/abs/path`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, RuntimeError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(RuntimeError::Config(format!(
            "CRI endpoint {endpoint:?} must be unix:///absolute/path or an absolute path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// What the CRI runtime says about itself (`Version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriVersion {
    /// e.g. `containerd`.
    pub runtime_name: String,
    /// e.g. `1.6.20~ds1`.
    pub runtime_version: String,
    /// e.g. `v1`.
    pub runtime_api_version: String,
}

pub use crate::pod_runtime::ExecOutput;

/// Pods as OCI containers in a CRI runtime. Cheap to clone.
#[derive(Clone)]
pub struct CriRuntime {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    config: CriRuntimeConfig,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    version: CriVersion,
}

impl std::fmt::Debug for CriRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriRuntime")
            .field("endpoint", &self.inner.config.endpoint)
            .field("version", &self.inner.version)
            .finish_non_exhaustive()
    }
}

/// Maps a failed CRI call to a [`RuntimeError`]; `NotFound` is mapped by callers that know
/// what was not found.
fn rpc_err(call: &'static str, s: &tonic::Status) -> RuntimeError {
    let msg = format!("CRI {call}: {}: {}", s.code(), s.message());
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            RuntimeError::Transient(msg)
        }
        Code::InvalidArgument => RuntimeError::InvalidSpec(msg),
        _ => RuntimeError::Internal(msg),
    }
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> RuntimeError {
    RuntimeError::Internal(format!("{what} {}: {e}", path.display()))
}

/// A container of a pod, as listed.
struct PodContainer {
    id: String,
    name: String,
    index: usize,
    state: pb::ContainerState,
}

impl CriRuntime {
    /// Connects to the CRI endpoint and checks that it answers `Version`.
    pub async fn connect(config: CriRuntimeConfig) -> Result<Self, RuntimeError> {
        let path = socket_path(&config.endpoint)?;
        if !config.root_dir.is_absolute() {
            return Err(RuntimeError::Config(format!(
                "CRI root dir {} must be absolute",
                config.root_dir.display()
            )));
        }
        // The URI is required by tonic but unused: the connector always dials the socket.
        let channel =
            Endpoint::from_static("http://cri.local")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| {
                    // tonic's own message is only "transport error"; the cause is below it.
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(cause) = src {
                        msg = format!("{msg}: {cause}");
                        src = cause.source();
                    }
                    RuntimeError::Transient(format!(
                        "cannot connect to CRI endpoint {}: {msg}",
                        config.endpoint
                    ))
                })?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let images = ImageServiceClient::new(channel);
        let v = tokio::time::timeout(
            Duration::from_secs(10),
            runtime.version(pb::VersionRequest {
                version: "v1".into(),
            }),
        )
        .await
        .map_err(|_| {
            RuntimeError::Transient(format!(
                "CRI endpoint {} did not answer Version within 10 s",
                config.endpoint
            ))
        })?
        .map_err(|s| rpc_err("Version", &s))?
        .into_inner();
        let version = CriVersion {
            runtime_name: v.runtime_name,
            runtime_version: v.runtime_version,
            runtime_api_version: v.runtime_api_version,
        };
        tracing::info!(endpoint = %config.endpoint, ?version, "connected to CRI runtime");
        Ok(CriRuntime {
            inner: std::sync::Arc::new(Inner {
                config,
                runtime,
                images,
                version,
            }),
        })
    }

    /// What the runtime reported at connect time.
    pub fn version(&self) -> &CriVersion {
        &self.inner.version
    }

    /// The configuration.
    pub fn config(&self) -> &CriRuntimeConfig {
        &self.inner.config
    }

    fn rt(&self) -> RuntimeServiceClient<Channel> {
        self.inner.runtime.clone()
    }

    /// Makes sure `image` is on the node according to `policy`.
    pub async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), RuntimeError> {
        let spec = pb::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        };
        let present = if policy == PullPolicy::Always {
            false
        } else {
            self.inner
                .images
                .clone()
                .image_status(pb::ImageStatusRequest {
                    image: Some(spec.clone()),
                    verbose: false,
                })
                .await
                .map_err(|s| rpc_err("ImageStatus", &s))?
                .into_inner()
                .image
                .is_some()
        };
        if present {
            return Ok(());
        }
        if policy == PullPolicy::Never {
            // Kubernetes' ErrImageNeverPull.
            return Err(RuntimeError::ImageNotFound {
                image: image.to_owned(),
                reason: format!(
                    "ErrImageNeverPull: Container image {image:?} is not present with pull \
                     policy of Never"
                ),
            });
        }
        self.inner
            .images
            .clone()
            .pull_image(pb::PullImageRequest {
                image: Some(spec),
                auth: None,
                sandbox_config: None,
            })
            .await
            .map_err(|s| RuntimeError::ImageNotFound {
                image: image.to_owned(),
                reason: format!("ErrImagePull: {}", s.message()),
            })?;
        Ok(())
    }

    /// The user an image runs as, from `ImageStatus`: `(uid, username)`; `None` if the image
    /// is not on the node.
    async fn image_user(&self, image: &str) -> Result<Option<(Option<i64>, String)>, RuntimeError> {
        let status = self
            .inner
            .images
            .clone()
            .image_status(pb::ImageStatusRequest {
                image: Some(pb::ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(|s| rpc_err("ImageStatus", &s))?
            .into_inner();
        Ok(status.image.map(|i| (i.uid.map(|u| u.value), i.username)))
    }

    /// A ready sandbox this instance already runs for the pod's uid: left by an earlier agent
    /// process, or started while the agent could not see it. Running it again would double
    /// the pod.
    async fn running_sandbox_of(&self, pod: &PodConfig) -> Result<Option<PodId>, RuntimeError> {
        let items = self
            .rt()
            .list_pod_sandbox(pb::ListPodSandboxRequest {
                filter: Some(pb::PodSandboxFilter {
                    label_selector: [
                        (convert::LABEL_POD_UID.to_owned(), pod.uid.clone()),
                        (
                            LABEL_INSTANCE.to_owned(),
                            self.inner.config.instance.clone(),
                        ),
                    ]
                    .into_iter()
                    .collect(),
                    state: Some(pb::PodSandboxStateValue {
                        state: pb::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| rpc_err("ListPodSandbox", &s))?
            .into_inner()
            .items;
        Ok(items
            .into_iter()
            .filter(|s| self.is_ours(&s.labels))
            .filter(|s| s.state == pb::PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at)
            .map(|s| PodId(s.id)))
    }

    /// Status of a sandbox, `None` if the runtime does not know it.
    async fn sandbox(&self, id: &PodId) -> Result<Option<pb::PodSandboxStatus>, RuntimeError> {
        match self
            .rt()
            .pod_sandbox_status(pb::PodSandboxStatusRequest {
                pod_sandbox_id: id.0.clone(),
                verbose: false,
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().status),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc_err("PodSandboxStatus", &s)),
        }
    }

    /// Our sandbox `id`, or `NotFound` (also for sandboxes of other instances or not ours).
    async fn own_sandbox(&self, id: &PodId) -> Result<pb::PodSandboxStatus, RuntimeError> {
        match self.sandbox(id).await? {
            Some(s) if self.is_ours(&s.labels) => Ok(s),
            _ => Err(RuntimeError::NotFound(id.clone())),
        }
    }

    fn is_ours(&self, labels: &std::collections::HashMap<String, String>) -> bool {
        labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
            && labels.get(LABEL_INSTANCE) == Some(&self.inner.config.instance)
    }

    /// Containers of a sandbox in spec order.
    async fn containers(&self, id: &PodId) -> Result<Vec<PodContainer>, RuntimeError> {
        let list = self
            .rt()
            .list_containers(pb::ListContainersRequest {
                filter: Some(pb::ContainerFilter {
                    pod_sandbox_id: id.0.clone(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| rpc_err("ListContainers", &s))?
            .into_inner()
            .containers;
        let mut out: Vec<PodContainer> = list
            .into_iter()
            .map(|c| PodContainer {
                name: c
                    .labels
                    .get(LABEL_CONTAINER_NAME)
                    .cloned()
                    .or_else(|| c.metadata.as_ref().map(|m| m.name.clone()))
                    .unwrap_or_default(),
                index: c
                    .labels
                    .get(LABEL_CONTAINER_INDEX)
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(usize::MAX),
                state: pb::ContainerState::try_from(c.state)
                    .unwrap_or(pb::ContainerState::ContainerUnknown),
                id: c.id,
            })
            .collect();
        out.sort_by(|a, b| (a.index, &a.name).cmp(&(b.index, &b.name)));
        Ok(out)
    }

    async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<pb::ContainerStatus>, RuntimeError> {
        match self
            .rt()
            .container_status(pb::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().status),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc_err("ContainerStatus", &s)),
        }
    }

    async fn status_of(&self, sandbox: pb::PodSandboxStatus) -> Result<PodStatus, RuntimeError> {
        let id = PodId(sandbox.id.clone());
        let mut containers = Vec::new();
        for c in self.containers(&id).await? {
            let Some(s) = self.container_status(&c.id).await? else {
                continue; // removed between list and status
            };
            containers.push(ContainerStatus {
                name: c.name,
                image: s
                    .annotations
                    .get(convert::ANNOTATION_IMAGE)
                    .cloned()
                    .or_else(|| s.image.as_ref().map(|i| i.image.clone()))
                    .unwrap_or_default(),
                state: convert::container_state(&s),
            });
        }
        let meta = sandbox.metadata.unwrap_or_default();
        let sandbox_ready = sandbox.state == pb::PodSandboxState::SandboxReady as i32;
        // The pause process outlives the containers, so "Ready" means some container may
        // still run, as the PodRuntime contract defines it.
        let any_live = containers.iter().any(|c| !c.state.is_terminated());
        Ok(PodStatus {
            id,
            name: meta.name,
            namespace: meta.namespace,
            state: if sandbox_ready && any_live {
                SandboxState::Ready
            } else {
                SandboxState::NotReady
            },
            containers,
        })
    }

    /// The pod's IP: the CNI address of a pod-network sandbox, `None` for host-network pods
    /// (whose IP is the node's).
    pub async fn pod_ip(&self, id: &PodId) -> Result<Option<String>, RuntimeError> {
        let s = self.own_sandbox(id).await?;
        Ok(s.network.map(|n| n.ip).filter(|ip| !ip.is_empty()))
    }

    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`), for the Node's conditions:
    /// `(type, status, reason: message)`.
    pub async fn conditions(&self) -> Result<Vec<(String, bool, String)>, RuntimeError> {
        let st = self
            .rt()
            .status(pb::StatusRequest { verbose: false })
            .await
            .map_err(|s| rpc_err("Status", &s))?
            .into_inner();
        Ok(st
            .status
            .map(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let detail = match (c.reason.is_empty(), c.message.is_empty()) {
                    (true, true) => String::new(),
                    (false, true) => c.reason,
                    (true, false) => c.message,
                    (false, false) => format!("{}: {}", c.reason, c.message),
                };
                (c.r#type, c.status, detail)
            })
            .collect())
    }

    /// Runs `cmd` in a container of a pod and waits for it (exec probes, `kubectl exec`).
    pub async fn exec_sync(
        &self,
        id: &PodId,
        container: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.own_sandbox(id).await?;
        let c = self.find_container(id, container).await?;
        let r = self
            .rt()
            .exec_sync(pb::ExecSyncRequest {
                container_id: c.id,
                cmd,
                timeout: convert::stop_timeout_secs(timeout),
            })
            .await
            .map_err(|s| rpc_err("ExecSync", &s))?
            .into_inner();
        Ok(ExecOutput {
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
        })
    }

    /// `kubectl exec` through the CRI `Exec` RPC: the runtime's streaming server (containerd's,
    /// `v4.channel.k8s.io` over SPDY/3.1, else over a WebSocket) is relayed to `io`.
    pub async fn exec_streaming(
        &self,
        id: &PodId,
        container: &str,
        cmd: Vec<String>,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        self.own_sandbox(id).await?;
        let c = self.find_container(id, container).await?;
        let url = self
            .rt()
            .exec(pb::ExecRequest {
                container_id: c.id,
                cmd,
                tty: io.tty,
                stdin: io.stdin.is_some(),
                stdout: io.stdout.is_some(),
                stderr: io.stderr.is_some() && !io.tty,
            })
            .await
            .map_err(|s| rpc_err("Exec", &s))?
            .into_inner()
            .url;
        relay(&url, io).await
    }

    /// `kubectl attach` through the CRI `Attach` RPC, relayed as [`CriRuntime::exec_streaming`].
    pub async fn attach_streaming(
        &self,
        id: &PodId,
        container: &str,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        self.own_sandbox(id).await?;
        let c = self.find_container(id, container).await?;
        let url = self
            .rt()
            .attach(pb::AttachRequest {
                container_id: c.id,
                stdin: io.stdin.is_some(),
                tty: io.tty,
                stdout: io.stdout.is_some(),
                stderr: io.stderr.is_some() && !io.tty,
            })
            .await
            .map_err(|s| rpc_err("Attach", &s))?
            .into_inner()
            .url;
        relay(&url, io).await
    }

    async fn find_container(&self, id: &PodId, name: &str) -> Result<PodContainer, RuntimeError> {
        self.containers(id)
            .await?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or_else(|| RuntimeError::ContainerNotFound {
                pod: id.clone(),
                container: name.to_owned(),
            })
    }

    /// Next sandbox attempt for a pod uid: one past the highest the runtime still has, so a
    /// re-run never collides with a stopped but not yet removed sandbox of the same pod.
    async fn next_attempt(&self, pod: &PodConfig) -> Result<u32, RuntimeError> {
        let items = self
            .rt()
            .list_pod_sandbox(pb::ListPodSandboxRequest {
                filter: Some(pb::PodSandboxFilter {
                    label_selector: [(convert::LABEL_POD_UID.to_owned(), pod.uid.clone())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| rpc_err("ListPodSandbox", &s))?
            .into_inner()
            .items;
        Ok(items
            .iter()
            .filter_map(|s| s.metadata.as_ref())
            .filter(|m| m.name == pod.name && m.namespace == pod.namespace)
            .map(|m| m.attempt.saturating_add(1))
            .max()
            .unwrap_or(0))
    }

    async fn create_and_start(
        &self,
        sandbox_id: &str,
        sandbox: &pb::PodSandboxConfig,
        configs: Vec<pb::ContainerConfig>,
        paths: &convert::PodPaths,
    ) -> Result<(), RuntimeError> {
        for cfg in configs {
            let name = cfg
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            let log_parent = paths.log_dir.join(&name);
            tokio::fs::create_dir_all(&log_parent)
                .await
                .map_err(|e| io_err("creating log directory", &log_parent, &e))?;
            let image = cfg
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default();
            let created = self
                .rt()
                .create_container(pb::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.to_owned(),
                    config: Some(cfg),
                    sandbox_config: Some(sandbox.clone()),
                })
                .await
                .map_err(|s| match s.code() {
                    Code::NotFound => RuntimeError::ImageNotFound {
                        image,
                        reason: s.message().to_owned(),
                    },
                    _ => rpc_err("CreateContainer", &s),
                })?
                .into_inner();
            self.rt()
                .start_container(pb::StartContainerRequest {
                    container_id: created.container_id,
                })
                .await
                .map_err(|s| match s.code() {
                    Code::Unavailable | Code::DeadlineExceeded => rpc_err("StartContainer", &s),
                    // Kubernetes' StartError / RunContainerError: a missing executable, a
                    // bad working dir... the spec has to change.
                    _ => RuntimeError::InvalidSpec(format!(
                        "container {name} failed to start: {}",
                        s.message()
                    )),
                })?;
        }
        Ok(())
    }

    /// Removes the pod's cgroup directories left behind by the runtime (containerd-cri.md
    /// §8.3: pod-level `cgroup_parent` dirs survive `RemovePodSandbox`).
    fn remove_pod_cgroups(&self, parent: &str) {
        if parent.is_empty() || self.inner.config.cgroup_root.is_none() {
            return;
        }
        let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for ctrl in controllers.flatten() {
            let dir = ctrl.path().join(parent.trim_start_matches('/'));
            if dir.is_dir()
                && let Err(e) = std::fs::remove_dir(&dir)
            {
                tracing::debug!(dir = %dir.display(), error = %e, "pod cgroup not removed");
            }
        }
    }

    async fn remove_pod_files(&self, meta: &pb::PodSandboxMetadata) {
        let paths = convert::PodPaths::new(
            &self.inner.config.root_dir,
            &meta.namespace,
            &meta.name,
            &meta.uid,
        );
        for dir in [paths.log_dir, paths.volume_dir] {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "pod files not removed"),
            }
        }
    }

    /// Stops and removes a sandbox and everything in it, ignoring what is already gone.
    async fn teardown(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        self.stop_containers(id, grace).await?;
        for c in self.containers(id).await? {
            match self
                .rt()
                .remove_container(pb::RemoveContainerRequest { container_id: c.id })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(rpc_err("RemoveContainer", &s)),
            }
        }
        self.stop_sandbox(id).await?;
        match self
            .rt()
            .remove_pod_sandbox(pb::RemovePodSandboxRequest {
                pod_sandbox_id: id.0.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc_err("RemovePodSandbox", &s)),
        }
    }

    async fn stop_containers(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        let timeout = convert::stop_timeout_secs(grace);
        let stops = self
            .containers(id)
            .await?
            .into_iter()
            .filter(|c| c.state != pb::ContainerState::ContainerExited)
            .map(|c| self.stop_container(c.id, timeout));
        // Containers of a pod stop concurrently, so the pod's stop takes one grace period.
        for r in futures::future::join_all(stops).await {
            r?;
        }
        Ok(())
    }

    /// `StopContainer`, tolerating a container that exits by itself meanwhile: containerd
    /// then fails the kill (`ttrpc: closed`, `process already finished`) although the
    /// container is stopped, which is all the caller asked for.
    async fn stop_container(&self, id: String, timeout: i64) -> Result<(), RuntimeError> {
        let stop = |id: String| {
            let mut rt = self.rt();
            async move {
                rt.stop_container(pb::StopContainerRequest {
                    container_id: id,
                    timeout,
                })
                .await
            }
        };
        let first = match stop(id.clone()).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::NotFound => return Ok(()),
            Err(s) => s,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match self.container_status(&id).await? {
                None => return Ok(()),
                Some(st) if st.state == pb::ContainerState::ContainerExited as i32 => {
                    return Ok(());
                }
                Some(_) if tokio::time::Instant::now() >= deadline => break,
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        tracing::warn!(container = %id, error = %first.message(), "StopContainer failed; retrying");
        match stop(id).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc_err("StopContainer", &s)),
        }
    }

    async fn stop_sandbox(&self, id: &PodId) -> Result<(), RuntimeError> {
        match self
            .rt()
            .stop_pod_sandbox(pb::StopPodSandboxRequest {
                pod_sandbox_id: id.0.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc_err("StopPodSandbox", &s)),
        }
    }

    /// Removes every sandbox of this instance that `keep` does not name (orphans of pods the
    /// API server no longer has), returning the removed ids.
    pub async fn remove_orphans(&self, keep: &[PodId]) -> Result<Vec<PodId>, RuntimeError> {
        let mut removed = Vec::new();
        for s in self.list_sandboxes().await? {
            let id = PodId(s.id);
            if !keep.contains(&id) {
                self.remove_pod(&id).await?;
                removed.push(id);
            }
        }
        Ok(removed)
    }

    /// Ids of every sandbox and container labelled with this instance, whatever their
    /// state: what `ListPodSandbox` and `ListContainers` report (tests check that a deleted pod
    /// leaves nothing behind).
    pub async fn inventory(&self) -> Result<(Vec<String>, Vec<String>), RuntimeError> {
        let selector: std::collections::HashMap<String, String> = [(
            LABEL_INSTANCE.to_owned(),
            self.inner.config.instance.clone(),
        )]
        .into_iter()
        .collect();
        let sandboxes = self
            .rt()
            .list_pod_sandbox(pb::ListPodSandboxRequest {
                filter: Some(pb::PodSandboxFilter {
                    label_selector: selector.clone(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| rpc_err("ListPodSandbox", &s))?
            .into_inner()
            .items
            .into_iter()
            .map(|s| s.id)
            .collect();
        let containers = self
            .rt()
            .list_containers(pb::ListContainersRequest {
                filter: Some(pb::ContainerFilter {
                    label_selector: selector,
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| rpc_err("ListContainers", &s))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        Ok((sandboxes, containers))
    }

    async fn list_sandboxes(&self) -> Result<Vec<pb::PodSandbox>, RuntimeError> {
        Ok(self
            .rt()
            .list_pod_sandbox(pb::ListPodSandboxRequest {
                filter: Some(pb::PodSandboxFilter {
                    label_selector: [
                        (LABEL_MANAGED.to_owned(), "true".to_owned()),
                        (LABEL_INSTANCE.to_owned(), self.inner.config.instance.clone()),
                    ]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| rpc_err("ListPodSandbox", &s))?
            .into_inner()
            .items
            .into_iter()
            // Filters are a runtime's promise; check the labels ourselves too.
            .filter(|s| self.is_ours(&s.labels))
            .collect())
    }
}

/// Relays a session to a CRI streaming URL: SPDY (which carries the end of stdin) if the
/// server takes it, else the WebSocket channel protocol (v4, no end of stdin).
async fn relay(url: &str, io: SessionIo) -> Result<i32, RuntimeError> {
    match crate::spdy::stream_client(url, io).await? {
        Ok(code) => Ok(code),
        Err(io) => crate::websocket::ChannelClient::relay(url, io).await,
    }
}

impl PodRuntime for CriRuntime {
    fn name(&self) -> &'static str {
        "cri"
    }

    async fn exec(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.exec_sync(id, container, command, timeout).await
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
        self.attach_streaming(id, container, io).await
    }

    async fn run_pod(&self, pod: &PodConfig) -> Result<PodId, RuntimeError> {
        if pod.spec.containers.is_empty() {
            return Err(RuntimeError::InvalidSpec("pod has no containers".into()));
        }
        let mut names = std::collections::HashSet::new();
        if let Some(c) = pod
            .spec
            .containers
            .iter()
            .find(|c| !names.insert(c.name.as_str()))
        {
            return Err(RuntimeError::InvalidSpec(format!(
                "container name {:?} is repeated",
                c.name
            )));
        }
        if !pod.spec.init_containers.is_empty() {
            return Err(RuntimeError::InvalidSpec(
                "init containers are not supported by the CRI runtime yet".into(),
            ));
        }
        let paths = convert::PodPaths::new(
            &self.inner.config.root_dir,
            &pod.namespace,
            &pod.name,
            &pod.uid,
        );
        // Everything that can be checked without side effects comes first.
        let configs = (0..pod.spec.containers.len())
            .map(|i| {
                convert::container_config(
                    pod,
                    i,
                    &paths,
                    &self.inner.config.instance,
                    self.inner.config.host_network,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(id) = self.running_sandbox_of(pod).await? {
            tracing::info!(pod = %pod.name, sandbox = %id, "adopting the pod's running sandbox");
            return Ok(id);
        }
        for c in &pod.spec.containers {
            let policy = convert::pull_policy(c, &pod.annotations)?;
            self.ensure_image(&c.image, policy).await?;
            if convert::run_as_non_root(&pod.spec, c) {
                let uid = convert::run_as_user(&pod.spec, c);
                let image_user = if uid.is_none() {
                    self.image_user(&c.image).await?
                } else {
                    None
                };
                convert::verify_non_root(c, uid, image_user)?;
            }
        }
        for v in &pod.spec.volumes {
            if v.empty_dir.is_some() {
                let dir = paths.volume_dir.join(&v.name);
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|e| io_err("creating emptyDir", &dir, &e))?;
            }
        }
        tokio::fs::create_dir_all(&paths.log_dir)
            .await
            .map_err(|e| io_err("creating pod log directory", &paths.log_dir, &e))?;

        let attempt = self.next_attempt(pod).await?;
        let sandbox = convert::sandbox_config(
            pod,
            &paths,
            &convert::SandboxOptions {
                instance: &self.inner.config.instance,
                host_network: self.inner.config.host_network,
                cgroup_root: self.inner.config.cgroup_root.as_deref(),
                attempt,
            },
        );
        let sandbox_id = self
            .rt()
            .run_pod_sandbox(pb::RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: pod
                    .annotations
                    .get(convert::ANNOTATION_RUNTIME_HANDLER)
                    .filter(|h| !h.is_empty())
                    .unwrap_or(&self.inner.config.runtime_handler)
                    .clone(),
            })
            .await
            .map_err(|s| rpc_err("RunPodSandbox", &s))?
            .into_inner()
            .pod_sandbox_id;
        let id = PodId(sandbox_id);
        if let Err(e) = self
            .create_and_start(&id.0, &sandbox, configs, &paths)
            .await
        {
            // A failed create leaves the sandbox running (containerd-cri.md §8.3): undo it all.
            tracing::warn!(pod = %pod.name, sandbox = %id, error = %e, "pod start failed; tearing down");
            if let Err(te) = self.remove_pod(&id).await {
                tracing::error!(sandbox = %id, error = %te, "teardown after failed start failed");
            }
            return Err(e);
        }
        Ok(id)
    }

    async fn stop_pod(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        match self.own_sandbox(id).await {
            Ok(_) => {}
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        self.stop_containers(id, grace).await?;
        self.stop_sandbox(id).await
    }

    async fn remove_pod(&self, id: &PodId) -> Result<(), RuntimeError> {
        let sandbox = match self.own_sandbox(id).await {
            Ok(s) => s,
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.teardown(id, self.inner.config.remove_grace).await?;
        if let Some(meta) = &sandbox.metadata {
            self.remove_pod_files(meta).await;
            if let Some(root) = &self.inner.config.cgroup_root {
                // The QoS class is not recorded in the sandbox; try each possible parent.
                for qos in [
                    api::pod::QosClass::Guaranteed,
                    api::pod::QosClass::Burstable,
                    api::pod::QosClass::BestEffort,
                ] {
                    self.remove_pod_cgroups(&convert::cgroup_parent(root, qos, &meta.uid));
                }
            }
        }
        Ok(())
    }

    async fn pod_status(&self, id: &PodId) -> Result<PodStatus, RuntimeError> {
        let sandbox = self.own_sandbox(id).await?;
        self.status_of(sandbox).await
    }

    async fn list_pods(&self) -> Result<Vec<PodStatus>, RuntimeError> {
        let mut out = Vec::new();
        for s in self.list_sandboxes().await? {
            let id = PodId(s.id);
            match self.pod_status(&id).await {
                Ok(st) => out.push(st),
                Err(RuntimeError::NotFound(_)) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn logs(&self, id: &PodId, container: &str) -> Result<String, RuntimeError> {
        self.own_sandbox(id).await?;
        let c = self.find_container(id, container).await?;
        let Some(status) = self.container_status(&c.id).await? else {
            return Err(RuntimeError::ContainerNotFound {
                pod: id.clone(),
                container: container.to_owned(),
            });
        };
        let path = PathBuf::from(&status.log_path);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(io_err("reading container log", &path, &e)),
        }
    }

    async fn stats(&self, id: &PodId) -> Result<PodStats, RuntimeError> {
        let sandbox = self.own_sandbox(id).await?;
        let mut containers = Vec::new();
        for c in self.containers(id).await? {
            let mut st = ContainerStats {
                name: c.name,
                ..ContainerStats::default()
            };
            // From sandbox creation (right after the image check of run_pod) to the
            // container's start, both on the runtime's clock.
            if let Some(cs) = self.container_status(&c.id).await?
                && cs.started_at > 0
                && sandbox.created_at > 0
            {
                st.start_latency = u64::try_from(cs.started_at - sandbox.created_at)
                    .ok()
                    .map(Duration::from_nanos);
            }
            // Exited containers have no live metrics; report them as zero.
            if let Ok(r) = self
                .rt()
                .container_stats(pb::ContainerStatsRequest { container_id: c.id })
                .await
                && let Some(s) = r.into_inner().stats
            {
                st.cpu_ns = s
                    .cpu
                    .and_then(|c| c.usage_core_nano_seconds)
                    .map_or(0, |v| v.value);
                st.memory_bytes = s
                    .memory
                    .and_then(|m| m.working_set_bytes)
                    .map_or(0, |v| v.value);
            }
            containers.push(st);
        }
        Ok(PodStats { containers })
    }
}

#[cfg(test)]
mod tests;
