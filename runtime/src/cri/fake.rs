//! `FakeCriServer`: a scripted CRI `RuntimeService` + `ImageService` on a Unix socket, for
//! testing [`super::CriRuntime`] without containerd.
//!
//! Images are scripted with a [`FakeCriBehavior`]; containers run no process, their state
//! follows the script and the clock. It behaves like containerd 1.6 where the client depends
//! on it (containerd-cri.md §8.3): `NotFound` for unknown ids, a failed `CreateContainer`
//! leaves the sandbox running, `ImageStatus` of an absent image has no `image`, log lines
//! in the CRI format at `<log_directory>/<log_path>`. Every call is recorded, and a call can
//! be made to fail once with [`FakeCriServer::fail_next`].
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use super::convert::now_ns;
use super::pb;
use super::pb::image_service_server::{ImageService, ImageServiceServer};
use super::pb::runtime_service_server::{RuntimeService, RuntimeServiceServer};

/// What a fake container does, chosen by its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCriBehavior {
    /// Runs until stopped; a stop ends it with 137 (killed after the timeout, as a PID 1 that
    /// ignores SIGTERM).
    RunForever,
    /// Writes `stdout` to its log at start and exits with `code` after `after`.
    Exit {
        /// Exit code.
        code: i32,
        /// Time from start to exit.
        after: Duration,
        /// Lines written to stdout.
        stdout: String,
        /// CRI reason (`OOMKilled`, ...); empty means `Completed`/`Error` by code.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Exited,
}

struct FakeContainer {
    sandbox_id: String,
    config: pb::ContainerConfig,
    log_path: PathBuf,
    behavior: FakeCriBehavior,
    phase: Phase,
    created_at: i64,
    started: Option<Instant>,
    started_at: i64,
    finished_at: i64,
    exit_code: i32,
    reason: String,
}

impl FakeContainer {
    /// Applies the script's natural exit if its time has come.
    fn advance(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        if let (
            FakeCriBehavior::Exit {
                code,
                after,
                reason,
                ..
            },
            Some(started),
        ) = (&self.behavior, self.started)
            && started.elapsed() >= *after
        {
            self.phase = Phase::Exited;
            self.exit_code = *code;
            self.reason = if !reason.is_empty() {
                reason.clone()
            } else if *code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            };
            let ns = i64::try_from(after.as_nanos()).unwrap_or(i64::MAX);
            self.finished_at = self.started_at.saturating_add(ns);
        }
    }

    fn kill(&mut self) {
        self.advance();
        if self.phase != Phase::Exited {
            self.phase = Phase::Exited;
            self.exit_code = 137;
            self.reason = "Error".into();
            self.finished_at = now_ns();
        }
    }

    fn cri_state(&self) -> pb::ContainerState {
        match self.phase {
            Phase::Created => pb::ContainerState::ContainerCreated,
            Phase::Running => pb::ContainerState::ContainerRunning,
            Phase::Exited => pb::ContainerState::ContainerExited,
        }
    }
}

struct FakeSandbox {
    config: pb::PodSandboxConfig,
    ready: bool,
    created_at: i64,
    runtime_handler: String,
}

#[derive(Default)]
struct State {
    images: HashMap<String, FakeCriBehavior>,
    pullable: HashMap<String, FakeCriBehavior>,
    sandboxes: HashMap<String, FakeSandbox>,
    containers: HashMap<String, FakeContainer>,
    calls: Vec<String>,
    /// Method → (calls to let pass first, the failure).
    failures: HashMap<String, (usize, Status)>,
    next_id: u64,
}

impl State {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{:016x}", self.next_id)
    }
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock already failed the test; keep serving for its report.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the call and returns an injected failure, if any.
    fn enter(&self, call: &str, detail: String) -> Result<MutexGuard<'_, State>, Status> {
        let mut st = self.lock();
        st.calls.push(if detail.is_empty() {
            call.to_owned()
        } else {
            format!("{call}({detail})")
        });
        match st.failures.get_mut(call) {
            Some((0, _)) => match st.failures.remove(call) {
                Some((_, s)) => Err(s),
                None => Ok(st),
            },
            Some((skip, _)) => {
                *skip -= 1;
                Ok(st)
            }
            None => Ok(st),
        }
    }
}

/// The fake CRI server; stops serving when dropped.
pub struct FakeCriServer {
    shared: Shared,
    socket: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCriServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

fn not_found(what: &str, id: &str) -> Status {
    Status::not_found(format!(
        "an error occurred when try to find {what} {id:?}: not found"
    ))
}

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl FakeCriServer {
    /// Serves on a new Unix socket at `socket` (its directory must exist).
    pub async fn start(socket: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        let shared = Shared::default();
        let cancel = CancellationToken::new();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        let server = tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(RuntimeSvc(shared.clone())))
            .add_service(ImageServiceServer::new(ImageSvc(shared.clone())))
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "fake CRI server failed");
            }
        });
        Ok(FakeCriServer {
            shared,
            socket: socket.to_owned(),
            cancel,
            task,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The endpoint URI (`unix:///...`).
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Makes `image` present on the "node", behaving as `behavior`.
    pub fn add_image(&self, image: impl Into<String>, behavior: FakeCriBehavior) {
        self.shared.lock().images.insert(image.into(), behavior);
    }

    /// Makes `image` pullable: absent until `PullImage`.
    pub fn add_pullable(&self, image: impl Into<String>, behavior: FakeCriBehavior) {
        self.shared.lock().pullable.insert(image.into(), behavior);
    }

    /// Whether `image` is present.
    pub fn has_image(&self, image: &str) -> bool {
        self.shared.lock().images.contains_key(image)
    }

    /// The next call of `method` (e.g. `"StartContainer"`) fails with `code` and `message`.
    pub fn fail_next(&self, method: &str, code: Code, message: &str) {
        self.fail_after(method, 0, code, message);
    }

    /// Like [`FakeCriServer::fail_next`], after letting `skip` calls of `method` succeed.
    pub fn fail_after(&self, method: &str, skip: usize, code: Code, message: &str) {
        self.shared
            .lock()
            .failures
            .insert(method.to_owned(), (skip, Status::new(code, message)));
    }

    /// Calls received so far, e.g. `StopContainer(timeout=2)`.
    pub fn calls(&self) -> Vec<String> {
        self.shared.lock().calls.clone()
    }

    /// Number of sandboxes and containers the fake holds.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.shared.lock();
        (st.sandboxes.len(), st.containers.len())
    }

    /// Configs of the containers created so far (for mapping checks).
    pub fn container_configs(&self) -> Vec<pb::ContainerConfig> {
        self.shared
            .lock()
            .containers
            .values()
            .map(|c| c.config.clone())
            .collect()
    }

    /// Runtime handlers the live sandboxes were created with.
    pub fn sandbox_handlers(&self) -> Vec<String> {
        self.shared
            .lock()
            .sandboxes
            .values()
            .map(|s| s.runtime_handler.clone())
            .collect()
    }

    /// Configs of the live sandboxes.
    pub fn sandbox_configs(&self) -> Vec<pb::PodSandboxConfig> {
        self.shared
            .lock()
            .sandboxes
            .values()
            .map(|s| s.config.clone())
            .collect()
    }
}

struct RuntimeSvc(Shared);
struct ImageSvc(Shared);

fn sandbox_item(id: &str, s: &FakeSandbox) -> pb::PodSandbox {
    pb::PodSandbox {
        id: id.to_owned(),
        metadata: s.config.metadata.clone(),
        state: if s.ready {
            pb::PodSandboxState::SandboxReady
        } else {
            pb::PodSandboxState::SandboxNotready
        } as i32,
        created_at: s.created_at,
        labels: s.config.labels.clone(),
        annotations: s.config.annotations.clone(),
        runtime_handler: s.runtime_handler.clone(),
    }
}

#[tonic::async_trait]
impl RuntimeService for RuntimeSvc {
    async fn version(
        &self,
        _r: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let _st = self.0.enter("Version", String::new())?;
        Ok(Response::new(pb::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "fake-cri".into(),
            runtime_version: "0.1.0".into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn status(
        &self,
        _r: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let _st = self.0.enter("Status", String::new())?;
        let cond = |t: &str| pb::RuntimeCondition {
            r#type: t.into(),
            status: true,
            ..Default::default()
        };
        Ok(Response::new(pb::StatusResponse {
            status: Some(pb::RuntimeStatus {
                conditions: vec![cond("RuntimeReady"), cond("NetworkReady")],
            }),
            info: HashMap::new(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        r: Request<pb::RunPodSandboxRequest>,
    ) -> Result<Response<pb::RunPodSandboxResponse>, Status> {
        let r = r.into_inner();
        let mut st = self.0.enter("RunPodSandbox", String::new())?;
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("sandbox config is required"))?;
        let meta = config.metadata.clone().unwrap_or_default();
        let name = format!(
            "{}_{}_{}_{}",
            meta.name, meta.namespace, meta.uid, meta.attempt
        );
        if st.sandboxes.values().any(|s| {
            s.config.metadata.as_ref().is_some_and(|m| {
                format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt) == name
            })
        }) {
            return Err(Status::unknown(format!(
                "failed to reserve sandbox name {name:?}: name is reserved"
            )));
        }
        let id = st.id("sb");
        st.sandboxes.insert(
            id.clone(),
            FakeSandbox {
                config,
                ready: true,
                created_at: now_ns(),
                runtime_handler: r.runtime_handler,
            },
        );
        Ok(Response::new(pb::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<pb::StopPodSandboxRequest>,
    ) -> Result<Response<pb::StopPodSandboxResponse>, Status> {
        let id = r.into_inner().pod_sandbox_id;
        let mut st = self.0.enter("StopPodSandbox", String::new())?;
        let Some(sb) = st.sandboxes.get_mut(&id) else {
            return Err(not_found("sandbox", &id));
        };
        sb.ready = false;
        for c in st.containers.values_mut().filter(|c| c.sandbox_id == id) {
            c.kill();
        }
        Ok(Response::new(pb::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<pb::RemovePodSandboxRequest>,
    ) -> Result<Response<pb::RemovePodSandboxResponse>, Status> {
        let id = r.into_inner().pod_sandbox_id;
        let mut st = self.0.enter("RemovePodSandbox", String::new())?;
        if st.sandboxes.remove(&id).is_none() {
            return Err(not_found("sandbox", &id));
        }
        st.containers.retain(|_, c| c.sandbox_id != id);
        Ok(Response::new(pb::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<pb::PodSandboxStatusRequest>,
    ) -> Result<Response<pb::PodSandboxStatusResponse>, Status> {
        let id = r.into_inner().pod_sandbox_id;
        let st = self.0.enter("PodSandboxStatus", String::new())?;
        let sb = st
            .sandboxes
            .get(&id)
            .ok_or_else(|| not_found("sandbox", &id))?;
        let item = sandbox_item(&id, sb);
        Ok(Response::new(pb::PodSandboxStatusResponse {
            status: Some(pb::PodSandboxStatus {
                id,
                metadata: item.metadata,
                state: item.state,
                created_at: item.created_at,
                network: Some(pb::PodSandboxNetworkStatus::default()),
                labels: item.labels,
                annotations: item.annotations,
                runtime_handler: item.runtime_handler,
            }),
            info: HashMap::new(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<pb::ListPodSandboxRequest>,
    ) -> Result<Response<pb::ListPodSandboxResponse>, Status> {
        let filter = r.into_inner().filter.unwrap_or_default();
        let st = self.0.enter("ListPodSandbox", String::new())?;
        let items = st
            .sandboxes
            .iter()
            .map(|(id, s)| sandbox_item(id, s))
            .filter(|i| filter.id.is_empty() || i.id == filter.id)
            .filter(|i| filter.state.is_none_or(|s| s.state == i.state))
            .filter(|i| labels_match(&i.labels, &filter.label_selector))
            .collect();
        Ok(Response::new(pb::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        r: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::CreateContainerResponse>, Status> {
        let r = r.into_inner();
        let mut st = self.0.enter("CreateContainer", String::new())?;
        let sb = st
            .sandboxes
            .get(&r.pod_sandbox_id)
            .ok_or_else(|| not_found("sandbox", &r.pod_sandbox_id))?;
        if !sb.ready {
            return Err(Status::unknown("sandbox is not ready"));
        }
        let log_dir = PathBuf::from(&sb.config.log_directory);
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("container config is required"))?;
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let behavior = st.images.get(&image).cloned().ok_or_else(|| {
            Status::not_found(format!("failed to resolve image {image:?}: not found"))
        })?;
        let id = st.id("ct");
        st.containers.insert(
            id.clone(),
            FakeContainer {
                sandbox_id: r.pod_sandbox_id,
                log_path: log_dir.join(&config.log_path),
                config,
                behavior,
                phase: Phase::Created,
                created_at: now_ns(),
                started: None,
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
            },
        );
        Ok(Response::new(pb::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        r: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        let id = r.into_inner().container_id;
        let mut st = self.0.enter("StartContainer", String::new())?;
        let c = st
            .containers
            .get_mut(&id)
            .ok_or_else(|| not_found("container", &id))?;
        if c.phase != Phase::Created {
            return Err(Status::failed_precondition(
                "container is not in created state",
            ));
        }
        c.phase = Phase::Running;
        c.started = Some(Instant::now());
        c.started_at = now_ns();
        if let FakeCriBehavior::Exit { stdout, .. } = &c.behavior {
            let ts = crate::wasm::time::rfc3339_nanos(std::time::SystemTime::now());
            let mut text = String::new();
            for line in stdout.lines() {
                text.push_str(&format!("{ts} stdout F {line}\n"));
            }
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&c.log_path)
                .and_then(|mut f| f.write_all(text.as_bytes()));
            if let Err(e) = written {
                return Err(Status::unknown(format!(
                    "failed to create container log {}: {e}",
                    c.log_path.display()
                )));
            }
        }
        Ok(Response::new(pb::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        r: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::StopContainerResponse>, Status> {
        let r = r.into_inner();
        let mut st = self
            .0
            .enter("StopContainer", format!("timeout={}", r.timeout))?;
        let c = st
            .containers
            .get_mut(&r.container_id)
            .ok_or_else(|| not_found("container", &r.container_id))?;
        c.kill();
        Ok(Response::new(pb::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        r: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        let id = r.into_inner().container_id;
        let mut st = self.0.enter("RemoveContainer", String::new())?;
        if st.containers.remove(&id).is_none() {
            return Err(not_found("container", &id));
        }
        Ok(Response::new(pb::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        r: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let f = r.into_inner().filter.unwrap_or_default();
        let mut st = self.0.enter("ListContainers", String::new())?;
        let containers = st
            .containers
            .iter_mut()
            .map(|(id, c)| {
                c.advance();
                pb::Container {
                    id: id.clone(),
                    pod_sandbox_id: c.sandbox_id.clone(),
                    metadata: c.config.metadata.clone(),
                    image: c.config.image.clone(),
                    image_ref: String::new(),
                    state: c.cri_state() as i32,
                    created_at: c.created_at,
                    labels: c.config.labels.clone(),
                    annotations: c.config.annotations.clone(),
                }
            })
            .filter(|c| f.id.is_empty() || c.id == f.id)
            .filter(|c| f.pod_sandbox_id.is_empty() || c.pod_sandbox_id == f.pod_sandbox_id)
            .filter(|c| f.state.is_none_or(|s| s.state == c.state))
            .filter(|c| labels_match(&c.labels, &f.label_selector))
            .collect();
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        r: Request<pb::ContainerStatusRequest>,
    ) -> Result<Response<pb::ContainerStatusResponse>, Status> {
        let id = r.into_inner().container_id;
        let mut st = self.0.enter("ContainerStatus", String::new())?;
        let c = st
            .containers
            .get_mut(&id)
            .ok_or_else(|| not_found("container", &id))?;
        c.advance();
        Ok(Response::new(pb::ContainerStatusResponse {
            status: Some(pb::ContainerStatus {
                id,
                metadata: c.config.metadata.clone(),
                state: c.cri_state() as i32,
                created_at: c.created_at,
                started_at: c.started_at,
                finished_at: c.finished_at,
                exit_code: c.exit_code,
                image: c.config.image.clone(),
                image_ref: String::new(),
                reason: c.reason.clone(),
                message: String::new(),
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
                mounts: c.config.mounts.clone(),
                log_path: c.log_path.display().to_string(),
            }),
            info: HashMap::new(),
        }))
    }

    async fn exec(
        &self,
        _r: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        // No streaming server here: the real-containerd tier covers streaming exec.
        Err(Status::unimplemented(
            "the fake CRI server has no streaming server",
        ))
    }

    async fn attach(
        &self,
        _r: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        Err(Status::unimplemented(
            "the fake CRI server has no streaming server",
        ))
    }

    async fn exec_sync(
        &self,
        r: Request<pb::ExecSyncRequest>,
    ) -> Result<Response<pb::ExecSyncResponse>, Status> {
        let r = r.into_inner();
        let mut st = self.0.enter("ExecSync", r.cmd.join(" "))?;
        let c = st
            .containers
            .get_mut(&r.container_id)
            .ok_or_else(|| not_found("container", &r.container_id))?;
        c.advance();
        if c.phase != Phase::Running {
            return Err(Status::failed_precondition("container is not running"));
        }
        // The fake "shell" echoes its command line.
        Ok(Response::new(pb::ExecSyncResponse {
            stdout: format!("{}\n", r.cmd.join(" ")).into_bytes(),
            stderr: Vec::new(),
            exit_code: 0,
        }))
    }

    async fn container_stats(
        &self,
        r: Request<pb::ContainerStatsRequest>,
    ) -> Result<Response<pb::ContainerStatsResponse>, Status> {
        let id = r.into_inner().container_id;
        let mut st = self.0.enter("ContainerStats", String::new())?;
        let c = st
            .containers
            .get_mut(&id)
            .ok_or_else(|| not_found("container", &id))?;
        c.advance();
        let running = c.phase == Phase::Running;
        let value = |v: u64| Some(pb::UInt64Value { value: v });
        Ok(Response::new(pb::ContainerStatsResponse {
            stats: Some(pb::ContainerStats {
                attributes: Some(pb::ContainerAttributes {
                    id,
                    metadata: c.config.metadata.clone(),
                    labels: c.config.labels.clone(),
                    annotations: c.config.annotations.clone(),
                }),
                cpu: running.then(|| pb::CpuUsage {
                    timestamp: now_ns(),
                    usage_core_nano_seconds: value(1_000_000),
                    usage_nano_cores: value(0),
                }),
                memory: running.then(|| pb::MemoryUsage {
                    timestamp: now_ns(),
                    working_set_bytes: value(1 << 20),
                    ..Default::default()
                }),
            }),
        }))
    }
}

fn image_of(image: &str) -> pb::Image {
    pb::Image {
        id: format!("sha256:{:064x}", image.len()),
        repo_tags: vec![image.to_owned()],
        size: 1 << 20,
        spec: Some(pb::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ImageService for ImageSvc {
    async fn list_images(
        &self,
        _r: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let st = self.0.enter("ListImages", String::new())?;
        let mut names: Vec<&String> = st.images.keys().collect();
        names.sort();
        Ok(Response::new(pb::ListImagesResponse {
            images: names.into_iter().map(|n| image_of(n)).collect(),
        }))
    }

    async fn image_status(
        &self,
        r: Request<pb::ImageStatusRequest>,
    ) -> Result<Response<pb::ImageStatusResponse>, Status> {
        let image = r.into_inner().image.unwrap_or_default().image;
        let st = self.0.enter("ImageStatus", image.clone())?;
        Ok(Response::new(pb::ImageStatusResponse {
            image: st.images.contains_key(&image).then(|| image_of(&image)),
            info: HashMap::new(),
        }))
    }

    async fn pull_image(
        &self,
        r: Request<pb::PullImageRequest>,
    ) -> Result<Response<pb::PullImageResponse>, Status> {
        let image = r.into_inner().image.unwrap_or_default().image;
        let mut st = self.0.enter("PullImage", image.clone())?;
        let Some(b) = st.pullable.get(&image).cloned() else {
            return Err(Status::unknown(format!(
                "failed to pull and unpack image {image:?}: failed to resolve reference \
                 {image:?}: {image}: not found"
            )));
        };
        st.images.insert(image.clone(), b);
        Ok(Response::new(pb::PullImageResponse {
            image_ref: image_of(&image).id,
        }))
    }
}
