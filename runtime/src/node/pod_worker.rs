//! One task per pod bound to the node: runs it through the `PodRuntime`, applies the restart
//! policy with exponential back-off, reports the pod's status and carries out graceful deletion.
//!
//! The worker is level-triggered: each turn compares the latest pod object from the API server
//! with what the runtime reports, acts, and writes the status only when it changed.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::pod::{ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodSpec};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::ApiClient;
use super::heartbeat::now_rfc3339;
use crate::pod_runtime::{PodConfig, PodId, PodStatus, RuntimeError};

/// What a worker shares with the agent.
pub(crate) struct WorkerContext<R> {
    pub client: ApiClient,
    pub runtime: Arc<R>,
    pub node_name: String,
    pub host_ip: String,
    pub poll_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Root of configMap and secret volume files.
    pub volume_dir: std::path::PathBuf,
    /// Where a replaced sandbox's logs go (`kubectl logs --previous`).
    pub logs: super::server::LogArchive,
    /// Pods the eviction manager chose (`node::eviction`).
    pub evictions: super::eviction::Evictions,
}

/// Per-container bookkeeping that survives restarts of the pod's sandbox.
#[derive(Debug, Clone, Default)]
struct ContainerBook {
    restart_count: i64,
    last_state: Option<ContainerStateTerminated>,
}

/// Why the pod is not running right now, if it is not.
#[derive(Debug, Clone)]
enum Waiting {
    /// Not started yet.
    Creating,
    /// Back-off after a crash (`CrashLoopBackOff`) or a start failure.
    BackOff {
        until: Instant,
        reason: &'static str,
        message: String,
        /// The image whose pull failed: only its containers show `reason`, the others are
        /// still `ContainerCreating`; after the first report `ErrImagePull` becomes
        /// `ImagePullBackOff`, as the kubelet shows it.
        image: Option<String>,
        /// When the failure happened.
        since: Instant,
    },
}

/// How long a failed pull shows `ErrImagePull` before `ImagePullBackOff`.
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(1);

/// Kubernetes' waiting reason and message for an image failure (`ErrImagePull`,
/// `ErrImageNeverPull`), from the runtime's error.
fn image_failure(e: &RuntimeError) -> Option<(&'static str, String, String)> {
    match e {
        RuntimeError::ImageNotFound { image, reason } => {
            if let Some(msg) = reason.strip_prefix("ErrImageNeverPull: ") {
                Some(("ErrImageNeverPull", msg.to_owned(), image.clone()))
            } else {
                let msg = reason.strip_prefix("ErrImagePull: ").unwrap_or(reason);
                Some(("ErrImagePull", msg.to_owned(), image.clone()))
            }
        }
        RuntimeError::ImageRefused { image, reason } => {
            Some(("ErrImagePull", reason.clone(), image.clone()))
        }
        _ => None,
    }
}

pub(crate) struct PodWorker<R> {
    ctx: Arc<WorkerContext<R>>,
    /// The pod's uid (names its volume directory).
    uid: String,
    /// The address of the sandbox it was read for: its own (CNI) IP, `None` for the node's.
    pod_ip: Option<(PodId, Option<String>)>,
    /// The pod's namespace and name (names its archived logs).
    ns_name: (String, String),
    rx: watch::Receiver<Option<Value>>,
    shutdown: CancellationToken,
    sandbox: Option<PodId>,
    books: BTreeMap<String, ContainerBook>,
    waiting: Waiting,
    backoff: Duration,
    /// The pod ended for good (restart policy says no more runs).
    finished: Option<PodStatus>,
    last_status: Value,
    start_time: Option<String>,
    sandbox_started: Option<Instant>,
    transitions: BTreeMap<String, (String, String)>,
    /// Probes of the current sandbox (`node::probes`).
    probes: Option<super::probes::Probes>,
}

fn meta<'a>(pod: &'a Value, f: &str) -> &'a str {
    pod.get("metadata")
        .and_then(|m| m.get(f))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn pod_path(pod: &Value) -> String {
    format!(
        "/api/v1/namespaces/{}/pods/{}",
        meta(pod, "namespace"),
        meta(pod, "name")
    )
}

/// Records an Event about `pod` from the agent, as the kubelet does (best effort).
async fn event(client: &ApiClient, node: &str, pod: &Value, ty: &str, reason: &str, message: &str) {
    let ns = meta(pod, "namespace");
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("{}.{:x}", meta(pod, "name"), now.timestamp_nanos_opt().unwrap_or(0)), "namespace": ns},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta(pod, "name"), "namespace": ns,
                           "uid": meta(pod, "uid"), "fieldPath": "spec.containers"},
        "reason": reason, "message": message, "type": ty,
        "source": {"component": "kubelet", "host": node},
        "reportingComponent": "kubelet", "reportingInstance": node,
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
    });
    if let Err(e) = client
        .create(&format!("/api/v1/namespaces/{ns}/events"), &ev)
        .await
    {
        tracing::debug!(error = %e, %reason, "failed to record event");
    }
}

impl<R: super::NodeRuntime> PodWorker<R> {
    async fn event(&self, pod: &Value, ty: &str, reason: &str, message: &str) {
        event(
            &self.ctx.client,
            &self.ctx.node_name,
            pod,
            ty,
            reason,
            message,
        )
        .await;
    }

    pub(crate) fn new(
        ctx: Arc<WorkerContext<R>>,
        rx: watch::Receiver<Option<Value>>,
        adopted: Option<PodId>,
        shutdown: CancellationToken,
    ) -> Self {
        let pod = rx.borrow().clone().unwrap_or(Value::Null);
        // Restart counts and last states survive an agent restart through the API status.
        let mut books = BTreeMap::new();
        if let Some(list) = pod
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array)
        {
            for cs in list {
                let name = cs.get("name").and_then(Value::as_str).unwrap_or_default();
                books.insert(
                    name.to_string(),
                    ContainerBook {
                        restart_count: cs.get("restartCount").and_then(Value::as_i64).unwrap_or(0),
                        last_state: cs
                            .pointer("/lastState/terminated")
                            .and_then(|t| serde_json::from_value(t.clone()).ok()),
                    },
                );
            }
        }
        let start_time = pod
            .pointer("/status/startTime")
            .and_then(Value::as_str)
            .map(str::to_string);
        let terminal = matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        PodWorker {
            ctx,
            uid: meta(&pod, "uid").to_string(),
            pod_ip: None,
            ns_name: (
                meta(&pod, "namespace").to_string(),
                meta(&pod, "name").to_string(),
            ),
            rx,
            shutdown,
            sandbox: adopted,
            books,
            waiting: Waiting::Creating,
            backoff: Duration::ZERO,
            finished: None,
            last_status: if terminal {
                pod.get("status").cloned().unwrap_or(Value::Null)
            } else {
                Value::Null
            },
            start_time,
            sandbox_started: None,
            transitions: BTreeMap::new(),
            probes: None,
        }
        .with_terminal(terminal)
    }

    fn with_terminal(mut self, terminal: bool) -> Self {
        if terminal && self.sandbox.is_none() {
            // Already reported Succeeded/Failed: never run again.
            self.finished = Some(PodStatus {
                id: PodId(String::new()),
                name: String::new(),
                namespace: String::new(),
                state: crate::pod_runtime::SandboxState::NotReady,
                containers: Vec::new(),
            });
        }
        self
    }

    /// Runs until the pod is gone from the API server (or the agent shuts down).
    pub(crate) async fn run(mut self) {
        loop {
            let pod = self.rx.borrow_and_update().clone();
            let Some(pod) = pod else {
                // Deleted from the API (or no longer bound here): drop whatever runs.
                self.remove_sandbox().await;
                super::volumes::remove(&self.ctx.volume_dir, &self.uid).await;
                self.forget_logs();
                return;
            };
            if pod.pointer("/metadata/deletionTimestamp").is_some() {
                self.terminate(&pod).await;
                super::volumes::remove(&self.ctx.volume_dir, &self.uid).await;
                self.forget_logs();
                return;
            }
            let wait = self.step(&pod).await;
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // The agent dropped the sender: it is shutting down.
                        return;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Drops the archived logs of this pod (it is gone).
    fn forget_logs(&self) {
        self.ctx.logs.forget_pod(&self.ns_name.0, &self.ns_name.1);
    }

    async fn remove_sandbox(&mut self) {
        self.probes = None;
        if let Some(id) = self.sandbox.take()
            && let Err(e) = self.ctx.runtime.remove_pod(&id).await
        {
            tracing::warn!(pod = %id, error = %e, "failed to remove pod");
        }
    }

    /// Graceful deletion: stop within the grace period, report, remove, then delete the API
    /// object for good (`gracePeriodSeconds: 0`, guarded by the uid).
    async fn terminate(&mut self, pod: &Value) {
        let grace = pod
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30)
            .max(0);
        let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
        if let Some(id) = self.sandbox.clone() {
            let msg = format!("Stopping pod (grace period {}s)", grace.as_secs());
            self.event(pod, "Normal", "Killing", &msg).await;
            if let Err(e) = self.ctx.runtime.stop_pod(&id, grace).await {
                tracing::warn!(pod = %id, error = %e, "failed to stop pod");
            }
            if let Ok(st) = self.ctx.runtime.pod_status(&id).await {
                let status = self.compose(pod, Some(&st));
                self.write_status(pod, status).await;
            }
        }
        self.remove_sandbox().await;
        let opts = json!({
            "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta(pod, "uid")},
        });
        if let Err(e) = self.ctx.client.delete(&pod_path(pod), Some(&opts)).await {
            tracing::warn!(pod = %pod_path(pod), error = %e, "failed to finish pod deletion");
        }
    }

    /// Hard eviction (`node::eviction`): kill at once, report `Failed`/`Evicted`, never rerun.
    async fn evict(&mut self, pod: &Value, message: &str) {
        self.probes = None;
        // As the kubelet's eviction manager: the event first, then the kill.
        self.event(pod, "Warning", "Evicted", message).await;
        let mut st = None;
        if let Some(id) = self.sandbox.clone() {
            if let Err(e) = self.ctx.runtime.stop_pod(&id, Duration::ZERO).await {
                tracing::warn!(pod = %id, error = %e, "failed to stop evicted pod");
            }
            st = self.ctx.runtime.pod_status(&id).await.ok();
        }
        self.finished = Some(st.clone().unwrap_or(PodStatus {
            id: PodId(String::new()),
            name: String::new(),
            namespace: String::new(),
            state: crate::pod_runtime::SandboxState::NotReady,
            containers: Vec::new(),
        }));
        let mut status = self.compose(pod, st.as_ref());
        status["phase"] = json!("Failed");
        status["reason"] = json!("Evicted");
        status["message"] = json!(message);
        self.write_status(pod, status).await;
        self.remove_sandbox().await;
    }

    fn restart_policy(pod: &Value) -> &str {
        pod.pointer("/spec/restartPolicy")
            .and_then(Value::as_str)
            .unwrap_or("Always")
    }

    /// One level-triggered turn; returns how long to wait before the next one.
    async fn step(&mut self, pod: &Value) -> Duration {
        let poll = self.ctx.poll_interval;
        if self.finished.is_none()
            && let Some(message) = self.ctx.evictions.take(&self.uid)
        {
            self.evict(pod, &message).await;
        }
        if self.finished.is_some() {
            if self.last_status.is_null() {
                let st = self.finished.clone();
                let status = self.compose(pod, st.as_ref());
                self.write_status(pod, status).await;
            }
            return Duration::from_secs(3600);
        }
        if self.sandbox.is_none() {
            if let Waiting::BackOff { until, .. } = &self.waiting {
                let (until, now) = (*until, Instant::now());
                if until > now {
                    let status = self.compose(pod, None);
                    self.write_status(pod, status).await;
                    if let Waiting::BackOff {
                        reason: reason @ "ErrImagePull",
                        message,
                        image: Some(image),
                        since,
                        ..
                    } = &mut self.waiting
                    {
                        // ErrImagePull shows for a moment (the kubelet's next sync), then
                        // ImagePullBackOff for the rest of the back-off.
                        let switch = *since + ERR_IMAGE_PULL_SHOWN;
                        if now < switch {
                            return (switch - now).min(until - now);
                        }
                        *message =
                            format!("Back-off pulling image {image:?}: ErrImagePull: {message}");
                        *reason = "ImagePullBackOff";
                        let status = self.compose(pod, None);
                        self.write_status(pod, status).await;
                    }
                    return (until - now).min(poll.max(Duration::from_millis(50)) * 20);
                }
            }
            self.start(pod).await;
            if self.sandbox.is_none() {
                let status = self.compose(pod, None);
                self.write_status(pod, status).await;
                return poll;
            }
        }
        let Some(id) = self.sandbox.clone() else {
            return poll;
        };
        let mut st = match self.ctx.runtime.pod_status(&id).await {
            Ok(st) => st,
            Err(RuntimeError::NotFound(_)) => {
                // The runtime lost the pod (e.g. removed behind our back): start it again.
                self.sandbox = None;
                return Duration::ZERO;
            }
            Err(e) => {
                tracing::warn!(pod = %id, error = %e, "pod status failed");
                return poll;
            }
        };
        if self.pod_ip.as_ref().is_none_or(|(of, _)| of != &id) {
            let ip = self.ctx.runtime.pod_ip(&id).await;
            self.pod_ip = Some((id.clone(), ip));
        }
        if self.check_probes(pod, &id).await {
            // Killed by a failed probe: the restart policy below sees it terminated.
            match self.ctx.runtime.pod_status(&id).await {
                Ok(s) => st = s,
                Err(_) => return Duration::ZERO,
            }
        }
        let policy = Self::restart_policy(pod).to_string();
        let terminated: Vec<_> = st
            .containers
            .iter()
            .filter_map(|c| c.state.terminated().map(|t| (c.name.clone(), t.clone())))
            .collect();
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => terminated.iter().any(|(_, t)| t.exit_code != 0),
            _ => !terminated.is_empty(),
        };
        if restart {
            // The runtime runs whole pods: restart the sandbox, counting a restart for every
            // container that ended on its own.
            for (name, t) in &terminated {
                let b = self.books.entry(name.clone()).or_default();
                b.restart_count += 1;
                b.last_state = Some(t.clone());
            }
            let ran_long = self
                .sandbox_started
                .is_some_and(|s| s.elapsed() > self.ctx.backoff_max * 2);
            if ran_long {
                self.backoff = Duration::ZERO;
            }
            // The runtime forgets the logs with the sandbox: keep them for `--previous`.
            for c in &st.containers {
                if let Ok(raw) = self.ctx.runtime.logs(&id, &c.name).await {
                    self.ctx
                        .logs
                        .put(meta(pod, "namespace"), meta(pod, "name"), &c.name, raw);
                }
            }
            self.remove_sandbox().await;
            let delay = self.backoff;
            self.backoff = if self.backoff.is_zero() {
                self.ctx.backoff_initial
            } else {
                (self.backoff * 2).min(self.ctx.backoff_max)
            };
            let failed = terminated
                .iter()
                .find(|(_, t)| t.exit_code != 0)
                .or(terminated.first())
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            self.waiting = Waiting::BackOff {
                until: Instant::now() + delay,
                reason: "CrashLoopBackOff",
                message: format!(
                    "back-off {}s restarting failed container={failed} pod={}_{}({})",
                    delay.as_secs(),
                    meta(pod, "name"),
                    meta(pod, "namespace"),
                    meta(pod, "uid"),
                ),
                image: None,
                since: Instant::now(),
            };
            if delay.is_zero() {
                // First restart: immediate, as the kubelet does; no back-off to show.
                return Duration::ZERO;
            }
            let msg = format!(
                "Back-off restarting failed container {failed} in pod {}_{}({})",
                meta(pod, "name"),
                meta(pod, "namespace"),
                meta(pod, "uid")
            );
            self.event(pod, "Warning", "BackOff", &msg).await;
            let status = self.compose(pod, None);
            self.write_status(pod, status).await;
            return delay.min(poll * 20);
        }
        if st.all_terminated() {
            self.finished = Some(st.clone());
            // Nothing runs any more: stop probing (the kubelet probes running containers only).
            self.probes = None;
        }
        let status = self.compose(pod, Some(&st));
        self.write_status(pod, status).await;
        let starting = st
            .containers
            .iter()
            .any(|c| matches!(c.state, ContainerState::Waiting(_)));
        if starting {
            // Just started: report Running as soon as the guest runs, not a poll later.
            return poll.min(Duration::from_millis(2));
        }
        poll
    }

    /// Starts the probes of a new sandbox and posts their events; stops the sandbox when a
    /// liveness or startup probe failed for good (returns `true` then).
    async fn check_probes(&mut self, pod: &Value, id: &PodId) -> bool {
        if self.probes.as_ref().is_none_or(|p| p.id() != id) {
            // Probes reach the pod at its own (CNI) address, else at the node's.
            let host = match &self.pod_ip {
                Some((of, Some(ip))) if of == id => ip.clone(),
                _ => self.ctx.host_ip.clone(),
            };
            let rt = self.ctx.runtime.clone();
            self.probes = Some(super::probes::Probes::start(rt, id.clone(), pod, &host));
        }
        let Some(p) = &self.probes else { return false };
        let (events, failure) = (p.take_events(), p.liveness_failure());
        let probe_grace = p.kill_grace_seconds();
        for (reason, msg) in events {
            self.event(pod, "Warning", reason, &msg).await;
        }
        let Some((container, why)) = failure else {
            return false;
        };
        let kind = if why.starts_with("Startup") {
            "startup"
        } else {
            "liveness"
        };
        let msg = format!("Container {container} failed {kind} probe, will be restarted");
        self.event(pod, "Normal", "Killing", &msg).await;
        self.probes = None;
        let grace = probe_grace
            .and_then(|g| u64::try_from(g).ok())
            .or_else(|| {
                pod.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_u64)
            })
            .unwrap_or(30);
        if let Err(e) = self
            .ctx
            .runtime
            .stop_pod(id, Duration::from_secs(grace))
            .await
        {
            tracing::warn!(pod = %id, error = %e, "failed to stop pod after a failed probe");
        }
        true
    }

    async fn start(&mut self, pod: &Value) {
        let mut spec: PodSpec = match pod
            .get("spec")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
        {
            Ok(Some(s)) => s,
            Ok(None) | Err(_) => {
                self.fail_start("CreateContainerConfigError", "pod spec unreadable".into());
                return;
            }
        };
        let mut annotations: BTreeMap<String, String> = pod
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        match self.runtime_handler(&spec).await {
            Ok(Some(h)) => {
                annotations.insert(super::runtimes::ANNOTATION_RUNTIME_HANDLER.to_owned(), h);
            }
            Ok(None) => {}
            Err(msg) => {
                tracing::warn!(pod = %pod_path(pod), error = %msg, "no runtime handler for pod");
                self.event(pod, "Warning", "FailedCreatePodSandBox", &msg)
                    .await;
                self.fail_start("CreateContainerConfigError", msg);
                return;
            }
        }
        if super::volumes::needed(&spec)
            && let Err(e) = super::volumes::materialise(
                &self.ctx.client,
                &self.ctx.volume_dir,
                meta(pod, "namespace"),
                meta(pod, "uid"),
                &mut spec,
            )
            .await
        {
            // As the kubelet: the pod stays ContainerCreating and a FailedMount event says why.
            self.event(pod, "Warning", "FailedMount", &e.to_string())
                .await;
            self.fail_start("ContainerCreating", e.to_string());
            return;
        }
        let cfg = PodConfig {
            name: meta(pod, "name").to_string(),
            namespace: meta(pod, "namespace").to_string(),
            uid: meta(pod, "uid").to_string(),
            annotations,
            spec,
        };
        match self.ctx.runtime.run_pod(&cfg).await {
            Ok(id) => {
                self.sandbox = Some(id);
                self.sandbox_started = Some(Instant::now());
                self.waiting = Waiting::Creating;
                if self.start_time.is_none() {
                    self.start_time = Some(now_rfc3339());
                }
                let names: Vec<&str> = cfg
                    .spec
                    .containers
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect();
                let msg = format!("Started container {}", names.join(", "));
                self.event(pod, "Normal", "Started", &msg).await;
            }
            Err(e) => {
                if let Some((reason, message, image)) = image_failure(&e) {
                    tracing::warn!(pod = %pod_path(pod), %image, error = %message, "image failure");
                    let msg = if reason == "ErrImageNeverPull" {
                        message.clone()
                    } else {
                        format!("Failed to pull image {image:?}: {message}")
                    };
                    self.event(pod, "Warning", "Failed", &msg).await;
                    self.fail_start(reason, message);
                    if let Waiting::BackOff { image: img, .. } = &mut self.waiting {
                        *img = Some(image);
                    }
                    return;
                }
                let reason = match &e {
                    RuntimeError::InvalidSpec(_)
                    | RuntimeError::Quantity(_)
                    | RuntimeError::CantHandle(_) => "CreateContainerConfigError",
                    _ => "CreateContainerError",
                };
                tracing::warn!(pod = %pod_path(pod), error = %e, "failed to start pod");
                self.event(pod, "Warning", "Failed", &format!("Error: {e}"))
                    .await;
                self.fail_start(reason, e.to_string());
            }
        }
    }

    fn fail_start(&mut self, reason: &'static str, message: String) {
        let delay = if self.backoff.is_zero() {
            self.ctx.backoff_initial
        } else {
            self.backoff
        };
        self.backoff = (delay * 2).min(self.ctx.backoff_max);
        self.waiting = Waiting::BackOff {
            until: Instant::now() + delay,
            reason,
            message,
            image: None,
            since: Instant::now(),
        };
    }

    /// The runtime handler of the pod's RuntimeClass (`None` without `runtimeClassName`).
    /// A class with no RuntimeClass object is taken as a handler name (`wasm` meaning
    /// `wasmtime`), which is how pods named runtimes before RuntimeClass objects existed.
    async fn runtime_handler(&self, spec: &PodSpec) -> Result<Option<String>, String> {
        let Some(name) = spec.runtime_class_name.as_deref().filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        let path = format!("/apis/node.k8s.io/v1/runtimeclasses/{name}");
        match self.ctx.client.get(&path).await {
            Ok(Some(rc)) => match rc.get("handler").and_then(Value::as_str) {
                Some(h) if !h.is_empty() => Ok(Some(h.to_owned())),
                _ => Err(format!("RuntimeClass {name:?} has no handler")),
            },
            Ok(None) if name == super::runtimes::LEGACY_WASM_CLASS => {
                Ok(Some(super::runtimes::HANDLER_WASMTIME.to_owned()))
            }
            Ok(None) => Ok(Some(name.to_owned())),
            Err(e) => Err(format!("failed to get RuntimeClass {name:?}: {e}")),
        }
    }

    /// Keeps `lastTransitionTime` stable while a condition's status does not change.
    fn condition(&mut self, ty: &str, ok: bool, reason: Option<&str>) -> Value {
        let status = if ok { "True" } else { "False" };
        let entry = self
            .transitions
            .entry(ty.to_string())
            .or_insert_with(|| (status.to_string(), now_rfc3339()));
        if entry.0 != status {
            *entry = (status.to_string(), now_rfc3339());
        }
        let mut c = json!({"type": ty, "status": status, "lastProbeTime": null, "lastTransitionTime": entry.1});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        c
    }

    /// The full pod status from the runtime's view (`None` = no sandbox right now).
    fn compose(&mut self, pod: &Value, st: Option<&PodStatus>) -> Value {
        let spec_containers: Vec<(String, String)> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        (
                            c.get("name")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            c.get("image")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut statuses = Vec::new();
        let mut all_running = !spec_containers.is_empty();
        let mut all_terminated = !spec_containers.is_empty();
        let mut all_succeeded = true;
        let mut any_started = false;
        for (name, image) in &spec_containers {
            let from_rt = st.and_then(|s| s.containers.iter().find(|c| &c.name == name));
            let state = match (from_rt, &self.waiting) {
                (Some(c), _) => c.state.clone(),
                (
                    None,
                    Waiting::BackOff {
                        reason,
                        message,
                        image: failed_image,
                        ..
                    },
                ) if failed_image.as_ref().is_none_or(|i| i == image) => {
                    ContainerState::Waiting(ContainerStateWaiting {
                        reason: Some((*reason).to_string()),
                        message: Some(message.clone()),
                    })
                }
                (None, Waiting::BackOff { .. }) => ContainerState::Waiting(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                (None, Waiting::Creating) => ContainerState::Waiting(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
            };
            let running = state.is_running();
            // Probes refine both: startup gates `started`, readiness gates `ready`.
            let (started, ready) = match &self.probes {
                Some(p) => (running && p.started(name), running && p.ready(name)),
                None => (running, running),
            };
            all_running &= ready;
            any_started |= running || state.is_terminated();
            match state.terminated() {
                Some(t) => all_succeeded &= t.exit_code == 0,
                None => all_terminated = false,
            }
            let book = self.books.get(name).cloned().unwrap_or_default();
            let last_state = match &book.last_state {
                Some(t) => json!({"terminated": t}),
                None => json!({}),
            };
            // `<runtime>://<id>` as the kubelet reports it; the id is the pod's runtime id
            // (`wasm:...`, `cri:<sandbox>`) and the container name.
            let container_id = st.map(|s| {
                let scheme = if s.id.0.starts_with("cri:") {
                    "containerd"
                } else {
                    "wasm"
                };
                format!("{scheme}://{}/{name}", s.id)
            });
            let mut cs = json!({
                "name": name,
                "image": image,
                "imageID": "",
                "ready": ready,
                "started": started,
                "restartCount": book.restart_count,
                "state": state,
                "lastState": last_state,
            });
            if let Some(id) = container_id {
                cs["containerID"] = json!(id);
            }
            statuses.push(cs);
        }
        let phase = if all_terminated && self.finished.is_some() {
            if all_succeeded { "Succeeded" } else { "Failed" }
        } else if any_started || self.books.values().any(|b| b.restart_count > 0) {
            // As the kubelet: Running once a container runs (or has run and is restarting).
            "Running"
        } else {
            "Pending"
        };
        let ready = all_running && phase == "Running";
        let conditions = vec![
            self.condition(
                "PodReadyToStartContainers",
                self.sandbox.is_some() || phase != "Pending",
                None,
            ),
            self.condition("Initialized", true, None),
            self.condition("Ready", ready, (!ready).then_some("ContainersNotReady")),
            self.condition(
                "ContainersReady",
                ready,
                (!ready).then_some("ContainersNotReady"),
            ),
            self.condition("PodScheduled", true, None),
        ];
        let qos = pod
            .pointer("/status/qosClass")
            .cloned()
            .or_else(|| {
                pod.get("spec")
                    .cloned()
                    .and_then(|s| serde_json::from_value::<PodSpec>(s).ok())
                    .and_then(|s| serde_json::to_value(api::pod::qos_class(&s)).ok())
            })
            .unwrap_or(Value::Null);
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
            "containerStatuses": statuses,
            "qosClass": qos,
        });
        if let Some(t) = &self.start_time {
            status["startTime"] = json!(t);
        }
        if let Some(id) = &self.sandbox {
            // The pod's own (CNI) address, else the node's, which it shares (as hostNetwork
            // pods report it).
            let ip = match &self.pod_ip {
                Some((of, Some(ip))) if of == id => ip.clone(),
                _ => self.ctx.host_ip.clone(),
            };
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        status
    }

    async fn write_status(&mut self, pod: &Value, status: Value) {
        if status == self.last_status {
            return;
        }
        let path = format!("{}/status", pod_path(pod));
        match self
            .ctx
            .client
            .merge_patch(&path, &json!({"status": status}))
            .await
        {
            Ok(_) => self.last_status = status,
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(pod = %path, error = %e, "failed to write pod status"),
        }
    }
}
