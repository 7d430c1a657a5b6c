//! [`NodeRuntimes`]: the pod runtimes of one node, wasm in-process and OCI containers through
//! CRI, behind one [`PodRuntime`], and the [`NodeRuntime`] facts the agent advertises.
//!
//! A pod goes to the runtime its handler names ([`ANNOTATION_RUNTIME_HANDLER`], set by the
//! agent from the pod's RuntimeClass); without a handler, to wasm when every image is a `.wasm`
//! module and to CRI otherwise. The CRI endpoint may be down: the node then offers wasm only,
//! says why in its [`RuntimeOffer`], and rechecks periodically; pods that need CRI fail with
//! [`RuntimeError::Transient`] meanwhile and are retried by the agent's back-off.
//!
//! Pod ids carry their runtime (`wasm:<id>`, `cri:<sandbox id>`), so every later call goes
//! to the runtime that ran the pod.
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::cri::convert::ANNOTATION_RUNTIME_HANDLER;
use crate::cri::{CriRuntime, CriRuntimeConfig};
use crate::pod_runtime::{
    ExecOutput, PodConfig, PodId, PodRuntime, PodStats, PodStatus, RuntimeError, SessionIo,
};
use crate::wasm::WasmRuntime;

/// Handler name of the in-process wasm runtime.
pub const HANDLER_WASMTIME: &str = "wasmtime";
/// Handler name of runc behind the CRI endpoint (containerd's default runtime name).
pub const HANDLER_RUNC: &str = "runc";
/// The class name wasm pods used before RuntimeClass objects; still accepted for wasmtime.
pub const LEGACY_WASM_CLASS: &str = "wasm";

const WASM_PREFIX: &str = "wasm:";
const CRI_PREFIX: &str = "cri:";

/// What the node's runtimes offer right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeOffer {
    /// Handlers that can run pods now (`wasmtime`, `runc`, ...).
    pub handlers: Vec<String>,
    /// The CRI endpoint's state; `None` when the node has no CRI endpoint configured.
    pub cri: Option<CriState>,
    /// `nodeInfo.containerRuntimeVersion` (`containerd://1.6.20~ds1`, `wasm://flotilla`).
    pub runtime_version: String,
}

/// Reachability of the CRI endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriState {
    /// The endpoint, as configured.
    pub endpoint: String,
    /// Why it cannot be used, `None` while it answers.
    pub error: Option<String>,
}

/// What the node agent needs from its runtime beyond [`PodRuntime`].
pub trait NodeRuntime: PodRuntime {
    /// The runtime's current offer and its changes; `None` for a fixed runtime, whose classes
    /// come from `AgentConfig::runtime_classes`.
    fn offer(&self) -> Option<watch::Receiver<RuntimeOffer>> {
        None
    }

    /// Whether the pod keeps running when the agent process stops (CRI pods live in the
    /// container runtime, wasm pods inside the agent).
    fn outlives_agent(&self, id: &PodId) -> bool {
        let _ = id;
        false
    }

    /// The pod's own address (a CNI pod network's), `None` when it shares the node's network.
    fn pod_ip(&self, id: &PodId) -> impl Future<Output = Option<String>> + Send {
        let _ = id;
        async { None }
    }
}

impl NodeRuntime for WasmRuntime {}

#[cfg(any(test, feature = "test-util"))]
impl NodeRuntime for crate::testing::FakeRuntime {}

impl NodeRuntime for CriRuntime {
    fn outlives_agent(&self, _id: &PodId) -> bool {
        true
    }

    async fn pod_ip(&self, id: &PodId) -> Option<String> {
        CriRuntime::pod_ip(self, id).await.ok().flatten()
    }
}

impl NodeRuntime for crate::any::AnyRuntime {
    fn outlives_agent(&self, _id: &PodId) -> bool {
        matches!(self, crate::any::AnyRuntime::Cri(_))
    }

    async fn pod_ip(&self, id: &PodId) -> Option<String> {
        match self {
            crate::any::AnyRuntime::Cri(rt) => CriRuntime::pod_ip(rt, id).await.ok().flatten(),
            _ => None,
        }
    }
}

/// How the node reaches its CRI runtime.
#[derive(Debug, Clone)]
pub struct CriSettings {
    /// Endpoint, root dir, instance label, cgroup root...
    pub config: CriRuntimeConfig,
    /// Handlers the CRI runtime is configured with (containerd's `runtimes.<name>`).
    pub handlers: Vec<String>,
    /// How often an unreachable endpoint is retried and a reachable one checked.
    pub recheck: Duration,
}

impl CriSettings {
    /// The `runc` handler, rechecked every 10 s.
    pub fn new(config: CriRuntimeConfig) -> Self {
        CriSettings {
            config,
            handlers: vec![HANDLER_RUNC.into()],
            recheck: Duration::from_secs(10),
        }
    }
}

pub use api::pod::is_wasm_image;

/// The node's runtimes. Cheap to clone.
#[derive(Clone)]
pub struct NodeRuntimes {
    inner: Arc<Inner>,
}

struct Inner {
    wasm: WasmRuntime,
    cri_settings: Option<CriSettings>,
    /// The client, once connected (kept when later checks fail: tonic reconnects by itself).
    cri: RwLock<Option<CriRuntime>>,
    offer: watch::Sender<RuntimeOffer>,
}

impl std::fmt::Debug for NodeRuntimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRuntimes")
            .field("offer", &*self.inner.offer.borrow())
            .finish_non_exhaustive()
    }
}

fn wasm_offer() -> RuntimeOffer {
    RuntimeOffer {
        handlers: vec![HANDLER_WASMTIME.into()],
        cri: None,
        runtime_version: "wasm://flotilla".into(),
    }
}

impl NodeRuntimes {
    /// The node's runtimes: `wasm`, and CRI when `cri` is given. Tries the CRI endpoint once
    /// before returning and, until `shutdown`, rechecks it every `cri.recheck` in a task.
    pub async fn start(
        wasm: WasmRuntime,
        cri: Option<CriSettings>,
        shutdown: CancellationToken,
    ) -> NodeRuntimes {
        let (offer, _) = watch::channel(wasm_offer());
        let rts = NodeRuntimes {
            inner: Arc::new(Inner {
                wasm,
                cri_settings: cri,
                cri: RwLock::new(None),
                offer,
            }),
        };
        if rts.inner.cri_settings.is_some() {
            rts.check_cri().await;
            let me = rts.clone();
            tokio::spawn(async move { me.monitor(shutdown).await });
        }
        rts
    }

    /// The wasm runtime.
    pub fn wasm(&self) -> &WasmRuntime {
        &self.inner.wasm
    }

    /// The CRI runtime, if it has been reached.
    pub fn cri(&self) -> Option<CriRuntime> {
        self.inner
            .cri
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The current offer.
    pub fn current_offer(&self) -> RuntimeOffer {
        self.inner.offer.borrow().clone()
    }

    async fn monitor(self, shutdown: CancellationToken) {
        let Some(every) = self.inner.cri_settings.as_ref().map(|s| s.recheck) else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.check_cri().await;
        }
    }

    /// Connects or re-checks the CRI endpoint and publishes the offer.
    async fn check_cri(&self) {
        let Some(settings) = &self.inner.cri_settings else {
            return;
        };
        let endpoint = settings.config.endpoint.clone();
        let result = match self.cri() {
            Some(rt) => {
                match tokio::time::timeout(Duration::from_secs(10), rt.conditions()).await {
                    Ok(Ok(conds)) => match conds.iter().find(|(t, _, _)| t == "RuntimeReady") {
                        Some((_, false, why)) => Err(format!("RuntimeReady is false: {why}")),
                        _ => Ok(rt),
                    },
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("CRI Status did not answer within 10 s".into()),
                }
            }
            None => CriRuntime::connect(settings.config.clone())
                .await
                .inspect(|rt| {
                    *self
                        .inner
                        .cri
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(rt.clone());
                })
                .map_err(|e| match e {
                    RuntimeError::Transient(m) | RuntimeError::Config(m) => m,
                    e => e.to_string(),
                }),
        };
        let mut handlers = vec![HANDLER_WASMTIME.to_owned()];
        let offer = match result {
            Ok(rt) => {
                handlers.extend(settings.handlers.iter().cloned());
                let v = rt.version();
                RuntimeOffer {
                    handlers,
                    cri: Some(CriState {
                        endpoint,
                        error: None,
                    }),
                    runtime_version: format!("{}://{}", v.runtime_name, v.runtime_version),
                }
            }
            Err(error) => RuntimeOffer {
                handlers,
                cri: Some(CriState {
                    endpoint,
                    error: Some(error),
                }),
                runtime_version: "wasm://flotilla".into(),
            },
        };
        let changed = self.inner.offer.send_if_modified(|cur| {
            if *cur == offer {
                false
            } else {
                *cur = offer.clone();
                true
            }
        });
        if changed {
            match &offer.cri {
                Some(CriState {
                    endpoint,
                    error: Some(e),
                }) => tracing::warn!(
                    %endpoint, error = %e,
                    "CRI endpoint unavailable: this node offers wasm pods only until it answers"
                ),
                Some(CriState { endpoint, .. }) => tracing::info!(
                    %endpoint, version = %offer.runtime_version, handlers = ?offer.handlers,
                    "CRI endpoint available: this node runs OCI container pods"
                ),
                None => {}
            }
        }
    }

    /// The CRI runtime if it is usable now, else why not.
    fn usable_cri(&self) -> Result<CriRuntime, RuntimeError> {
        let offer = self.inner.offer.borrow().clone();
        match (&offer.cri, self.cri()) {
            (Some(CriState { error: None, .. }), Some(rt)) => Ok(rt),
            (Some(CriState { endpoint, error }), _) => Err(RuntimeError::Transient(format!(
                "the CRI endpoint {endpoint} is unavailable ({}); this node runs wasm pods only",
                error.as_deref().unwrap_or("not connected")
            ))),
            (None, _) => Err(RuntimeError::CantHandle(
                "this node has no CRI endpoint: it runs wasm pods only",
            )),
        }
    }

    /// Which runtime runs `pod`: by its handler, else by its images.
    fn route(&self, pod: &PodConfig) -> Result<Route, RuntimeError> {
        match pod
            .annotations
            .get(ANNOTATION_RUNTIME_HANDLER)
            .filter(|h| !h.is_empty())
        {
            Some(h) if h == HANDLER_WASMTIME => Ok(Route::Wasm),
            Some(h) => {
                let known = self
                    .inner
                    .cri_settings
                    .as_ref()
                    .is_some_and(|s| s.handlers.contains(h));
                if known {
                    Ok(Route::Cri)
                } else {
                    Err(RuntimeError::InvalidSpec(format!(
                        "runtime handler {h:?} is not offered by this node"
                    )))
                }
            }
            None => {
                let images = pod.spec.containers.iter().chain(&pod.spec.init_containers);
                let wasm = images.clone().filter(|c| is_wasm_image(&c.image)).count();
                match (wasm, images.count()) {
                    (0, _) => Ok(Route::Cri),
                    (w, n) if w == n => Ok(Route::Wasm),
                    _ => Err(RuntimeError::InvalidSpec(
                        "the pod mixes wasm modules and OCI images; a pod runs on one runtime"
                            .into(),
                    )),
                }
            }
        }
    }

    fn split(&self, id: &PodId) -> Result<Target, RuntimeError> {
        if let Some(inner) = id.0.strip_prefix(WASM_PREFIX) {
            Ok(Target::Wasm(PodId(inner.to_owned())))
        } else if let Some(inner) = id.0.strip_prefix(CRI_PREFIX) {
            Ok(Target::Cri(self.usable_cri()?, PodId(inner.to_owned())))
        } else {
            Err(RuntimeError::NotFound(id.clone()))
        }
    }

    /// Removes every CRI pod of this node whose pod `keep` does not name by namespace/name
    /// (orphans of pods deleted while the node could not see them); returns their ids.
    pub async fn remove_cri_orphans(
        &self,
        keep: &std::collections::HashSet<(String, String)>,
    ) -> Result<Vec<PodId>, RuntimeError> {
        let Ok(cri) = self.usable_cri() else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for p in cri.list_pods().await? {
            if !keep.contains(&(p.namespace.clone(), p.name.clone())) {
                cri.remove_pod(&p.id).await?;
                removed.push(wrap(CRI_PREFIX, p.id));
            }
        }
        Ok(removed)
    }
}

enum Route {
    Wasm,
    Cri,
}

enum Target {
    Wasm(PodId),
    Cri(CriRuntime, PodId),
}

fn wrap(prefix: &str, id: PodId) -> PodId {
    PodId(format!("{prefix}{}", id.0))
}

fn wrap_status(prefix: &str, mut st: PodStatus) -> PodStatus {
    st.id = wrap(prefix, st.id);
    st
}

/// Maps an inner runtime's `NotFound` back to the caller's (prefixed) id.
fn outer_err(id: &PodId, e: RuntimeError) -> RuntimeError {
    match e {
        RuntimeError::NotFound(_) => RuntimeError::NotFound(id.clone()),
        RuntimeError::ContainerNotFound { container, .. } => RuntimeError::ContainerNotFound {
            pod: id.clone(),
            container,
        },
        e => e,
    }
}

impl PodRuntime for NodeRuntimes {
    fn name(&self) -> &'static str {
        "node"
    }

    async fn run_pod(&self, pod: &PodConfig) -> Result<PodId, RuntimeError> {
        match self.route(pod)? {
            Route::Wasm => Ok(wrap(WASM_PREFIX, self.inner.wasm.run_pod(pod).await?)),
            Route::Cri => Ok(wrap(CRI_PREFIX, self.usable_cri()?.run_pod(pod).await?)),
        }
    }

    async fn stop_pod(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        match self.split(id) {
            Ok(Target::Wasm(i)) => self.inner.wasm.stop_pod(&i, grace).await,
            Ok(Target::Cri(rt, i)) => rt.stop_pod(&i, grace).await,
            // Unknown ids: stop is idempotent.
            Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn remove_pod(&self, id: &PodId) -> Result<(), RuntimeError> {
        match self.split(id) {
            Ok(Target::Wasm(i)) => self.inner.wasm.remove_pod(&i).await,
            Ok(Target::Cri(rt, i)) => rt.remove_pod(&i).await,
            Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn pod_status(&self, id: &PodId) -> Result<PodStatus, RuntimeError> {
        match self.split(id)? {
            Target::Wasm(i) => self
                .inner
                .wasm
                .pod_status(&i)
                .await
                .map(|s| wrap_status(WASM_PREFIX, s)),
            Target::Cri(rt, i) => rt.pod_status(&i).await.map(|s| wrap_status(CRI_PREFIX, s)),
        }
        .map_err(|e| outer_err(id, e))
    }

    async fn list_pods(&self) -> Result<Vec<PodStatus>, RuntimeError> {
        let mut out: Vec<PodStatus> = self
            .inner
            .wasm
            .list_pods()
            .await?
            .into_iter()
            .map(|s| wrap_status(WASM_PREFIX, s))
            .collect();
        if let Ok(cri) = self.usable_cri() {
            match cri.list_pods().await {
                Ok(pods) => out.extend(pods.into_iter().map(|s| wrap_status(CRI_PREFIX, s))),
                // The endpoint went away since the last check: its pods are re-adopted by
                // `run_pod` (it finds a pod's running sandbox) once it answers again.
                Err(e) => tracing::warn!(error = %e, "listing CRI pods failed"),
            }
        }
        Ok(out)
    }

    async fn logs(&self, id: &PodId, container: &str) -> Result<String, RuntimeError> {
        match self.split(id)? {
            Target::Wasm(i) => self.inner.wasm.logs(&i, container).await,
            Target::Cri(rt, i) => rt.logs(&i, container).await,
        }
        .map_err(|e| outer_err(id, e))
    }

    async fn stats(&self, id: &PodId) -> Result<PodStats, RuntimeError> {
        match self.split(id)? {
            Target::Wasm(i) => self.inner.wasm.stats(&i).await,
            Target::Cri(rt, i) => rt.stats(&i).await,
        }
        .map_err(|e| outer_err(id, e))
    }

    async fn exec(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        match self.split(id)? {
            Target::Wasm(i) => self.inner.wasm.exec(&i, container, command, timeout).await,
            Target::Cri(rt, i) => rt.exec(&i, container, command, timeout).await,
        }
        .map_err(|e| outer_err(id, e))
    }

    async fn exec_stream(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        match self.split(id)? {
            Target::Wasm(i) => {
                self.inner
                    .wasm
                    .exec_stream(&i, container, command, io)
                    .await
            }
            Target::Cri(rt, i) => rt.exec_stream(&i, container, command, io).await,
        }
        .map_err(|e| outer_err(id, e))
    }

    async fn attach(
        &self,
        id: &PodId,
        container: &str,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        match self.split(id)? {
            Target::Wasm(i) => self.inner.wasm.attach(&i, container, io).await,
            Target::Cri(rt, i) => rt.attach(&i, container, io).await,
        }
        .map_err(|e| outer_err(id, e))
    }
}

impl NodeRuntime for NodeRuntimes {
    fn offer(&self) -> Option<watch::Receiver<RuntimeOffer>> {
        Some(self.inner.offer.subscribe())
    }

    fn outlives_agent(&self, id: &PodId) -> bool {
        id.0.starts_with(CRI_PREFIX)
    }

    async fn pod_ip(&self, id: &PodId) -> Option<String> {
        match self.split(id) {
            Ok(Target::Cri(rt, i)) => CriRuntime::pod_ip(&rt, &i).await.ok().flatten(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
