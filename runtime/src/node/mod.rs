//! The node agent (Flotilla's kubelet): registers the Node, heartbeats its Lease, watches the
//! pods bound to it and runs them through a [`PodRuntime`].
//!
//! It talks to the API server only (HTTPS REST with the node's bearer token), never to the
//! store: the Kubernetes invariant that keeps the store's client count and the auth surface
//! small.
//!
//! # Layout
//! - [`client`]: a small Kubernetes REST client (JSON over HTTP/2, watches).
//! - [`join`]: the node join token file and the per-node token derived from it.
//! - `heartbeat`: Node registration, node status and the Lease heartbeat.
//! - `pod_worker`: one task per pod: run, restart with back-off, report status, delete.
//! - [`runtimes`]: [`NodeRuntimes`], wasm and CRI behind one runtime, chosen per pod by its
//!   RuntimeClass handler or its image, with the CRI endpoint rechecked while it is down.
//! - `volumes`: configMap and secret volumes written for the pod and mounted read-only.
//! - [`server`]: the kubelet-style HTTPS server the API server calls for `kubectl logs` and
//!   `kubectl exec` (self-signed certificate pinned through the Node, kubelet token derived
//!   from the node token), advertised in `status.daemonEndpoints.kubeletEndpoint.Port`.
//! - `eviction`: memory-pressure eviction by QoS class, the `MemoryPressure` condition and
//!   the `node.kubernetes.io/memory-pressure` taint.
//! - `probes`: liveness, readiness and startup probes (exec, httpGet, tcpSocket) feeding the
//!   pod worker's `ready`/`started` and liveness restarts.
//!
//! When the agent stops, wasm pods (which live inside the agent process) stop with it; CRI
//! pods keep running in the container runtime, as they outlive a kubelet. After an agent
//! restart the pods bound to the node are matched by namespace/name against
//! [`PodRuntime::list_pods`]: pods the runtime still runs are adopted, the others are started
//! again, with restart counts carried over from the API status; runtime pods no API pod claims
//! are removed, at start and whenever a runtime comes (back), as its offer changes. No pod is
//! doubled.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pod_runtime::{PodId, PodRuntime};

/// The Kubernetes REST client, shared with the other side of the API (crate `apiclient`).
pub use apiclient as client;
pub mod eviction;
mod heartbeat;
pub mod join;
mod pod_worker;
mod probes;
pub mod runtimes;
pub mod server;
mod volumes;

pub use client::{ApiClient, ClientError};
pub use heartbeat::{CRI_CONDITION, RUNTIME_CLASSES_ANNOTATION};
pub use join::JoinToken;
pub use runtimes::{CriSettings, NodeRuntime, NodeRuntimes, RuntimeOffer};

use pod_worker::{PodWorker, WorkerContext};

/// What the node offers to pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Maximum number of pods.
    pub pods: u32,
}

impl NodeCapacity {
    /// This machine: every core, the memory in `/proc/meminfo` (4 GiB if unreadable), 110 pods.
    pub fn detect() -> NodeCapacity {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(4 << 30, |kb| kb * 1024);
        NodeCapacity {
            cpu_millis: u64::try_from(cores).unwrap_or(1) * 1000,
            memory_bytes: memory,
            pods: 110,
        }
    }
}

/// Node agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (also `kubernetes.io/hostname`).
    pub node_name: String,
    /// API server URL (`https://host:port`), or several servers of one control plane,
    /// comma-separated; the agent also learns the others from the cluster and fails over
    /// between them (see [`ApiClient`]).
    pub server: String,
    /// The node's bearer token (see [`JoinToken::node_token`]).
    pub token: Option<String>,
    /// PEM of the cluster CA (required for `https://`).
    pub ca_pem: Option<String>,
    /// Address reported as the node's `InternalIP` and the pods' `hostIP`.
    pub address: String,
    /// Extra node labels.
    pub labels: BTreeMap<String, String>,
    /// Taints set when the node is first registered (`[{key, value, effect}]`).
    pub register_taints: Vec<Value>,
    /// Runtime classes offered (written to the `flotilla.dev/runtime-classes` annotation) by a
    /// runtime without an offer of its own; [`NodeRuntimes`] advertise their handlers and the
    /// RuntimeClasses naming them instead.
    pub runtime_classes: Vec<String>,
    /// Capacity reported (allocatable is the same).
    pub capacity: NodeCapacity,
    /// How often the Lease is renewed (Kubernetes: 10 s).
    pub heartbeat_interval: Duration,
    /// `leaseDurationSeconds` written into the Lease (Kubernetes: 40 s).
    pub lease_duration: Duration,
    /// The node status is re-posted every this many heartbeats.
    pub status_every_heartbeats: u32,
    /// How often each running pod's status is polled from the runtime.
    pub poll_interval: Duration,
    /// Where configMap and secret volumes are written (`<dir>/<pod uid>/<volume>`), to be
    /// mounted read-only into the pod's containers.
    pub volume_dir: std::path::PathBuf,
    /// First restart back-off after a crash (Kubernetes: 10 s); doubles each time.
    pub backoff_initial: Duration,
    /// Back-off cap (Kubernetes: 300 s).
    pub backoff_max: Duration,
    /// Port of the kubelet-style HTTPS server for logs and exec ([`server`]); `Some(0)` picks
    /// a free port (advertised on the Node either way), `None` serves nothing.
    pub serving_port: Option<u16>,
    /// Hard eviction threshold on `memory.available` in bytes (the kubelet's
    /// `--eviction-hard=memory.available<100Mi`, its default); 0 disables eviction.
    pub eviction_memory_available: u64,
    /// How often memory is checked for eviction (the kubelet's housekeeping period, 10 s).
    pub eviction_interval: Duration,
    /// How long `MemoryPressure` (and its taint) stays after the threshold was last met (the
    /// kubelet's `--eviction-pressure-transition-period`, 5 min).
    pub eviction_pressure_transition_period: Duration,
}

impl AgentConfig {
    /// Defaults as the kubelet's, for node `node_name` of the API server at `server`.
    pub fn new(node_name: impl Into<String>, server: impl Into<String>) -> AgentConfig {
        let node_name: String = node_name.into();
        AgentConfig {
            volume_dir: std::env::temp_dir()
                .join("flotilla-agent")
                .join(&node_name)
                .join("volumes"),
            node_name,
            server: server.into(),
            token: None,
            ca_pem: None,
            address: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            register_taints: Vec::new(),
            runtime_classes: vec!["wasm".into()],
            capacity: NodeCapacity::detect(),
            heartbeat_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            status_every_heartbeats: 6,
            poll_interval: Duration::from_millis(200),
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            serving_port: Some(0),
            eviction_memory_available: 100 << 20,
            eviction_interval: Duration::from_secs(10),
            eviction_pressure_transition_period: Duration::from_secs(300),
        }
    }
}

/// Failures that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The API client could not be built (bad URL or CA).
    #[error("API client")]
    Client(#[source] ClientError),
    /// The runtime failed while listing pods at start-up.
    #[error("pod runtime")]
    Runtime(#[from] crate::pod_runtime::RuntimeError),
    /// The logs/exec server could not start.
    #[error("agent server")]
    Server(#[from] server::ServerError),
}

/// A node agent over runtime `R`.
pub struct Agent<R: PodRuntime> {
    config: AgentConfig,
    client: ApiClient,
    runtime: Arc<R>,
    /// Logs of replaced container instances (`kubectl logs --previous`).
    archive: server::LogArchive,
    /// Pods the eviction manager chose, for their workers to evict.
    evictions: eviction::Evictions,
}

struct WorkerSlot {
    tx: watch::Sender<Option<Value>>,
    /// The pod's namespace and name, which runtime pods carry.
    key: (String, String),
}

impl<R: NodeRuntime> Agent<R> {
    /// Prepares an agent; nothing is contacted until [`Agent::run`].
    pub fn new(config: AgentConfig, runtime: R) -> Result<Agent<R>, AgentError> {
        let client = ApiClient::new(
            &config.server,
            config.token.as_deref(),
            config.ca_pem.as_deref(),
        )
        .map_err(AgentError::Client)?;
        Ok(Agent {
            config,
            client,
            runtime: Arc::new(runtime),
            archive: server::LogArchive::default(),
            evictions: eviction::Evictions::default(),
        })
    }

    /// The runtime (tests inspect it).
    pub fn runtime(&self) -> Arc<R> {
        self.runtime.clone()
    }

    /// Registers the node and keeps it and its pods in sync until `shutdown`. On shutdown the
    /// agent stops heartbeating and removes its runtime's pods without reporting anything, as
    /// a stopped kubelet process would leave them for the control plane to notice.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let cfg = Arc::new(self.config.clone());
        let rt_name = self.runtime.name();
        let offer = self.runtime.offer();
        let advertised = match &offer {
            Some(rx) => {
                let o = rx.borrow().clone();
                heartbeat::Advertised::from_offer(&self.client, &o).await
            }
            None => heartbeat::Advertised::fixed(&cfg, rt_name),
        };
        // Bound before registering, so a taken port fails the start; needs the node token.
        let node_server = match (cfg.serving_port, &cfg.token) {
            (Some(port), Some(token)) => Some(
                server::NodeServer::bind(
                    &cfg.address,
                    port,
                    token,
                    self.runtime.clone(),
                    self.archive.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        // Register, retrying until the API server answers.
        let mut delay = Duration::from_millis(200);
        loop {
            match heartbeat::register(&self.client, &cfg, &advertised).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "node registration failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::info!(node = %cfg.node_name, server = %self.client.server(), "node registered");
        // Every server of the control plane, to fail over to if this one goes.
        refresh_servers(&self.client).await;
        let mut tasks = JoinSet::new();
        let (pressure, pressure_rx) = watch::channel(false);
        {
            let manager = eviction::EvictionManager {
                client: self.client.clone(),
                runtime: self.runtime.clone(),
                cfg: cfg.clone(),
                evictions: self.evictions.clone(),
                pressure,
            };
            let stop = shutdown.clone();
            tasks.spawn(async move { manager.run(stop).await });
        }
        {
            let client = self.client.clone();
            let cfg = cfg.clone();
            let stop = shutdown.clone();
            let hb = Heartbeat {
                client,
                cfg,
                rt_name,
                offer,
                advertised,
                pressure: Some(pressure_rx),
            };
            tasks.spawn(async move { hb.run(stop).await });
        }
        if let Some(srv) = node_server {
            let (client, node, stop) =
                (self.client.clone(), cfg.node_name.clone(), shutdown.clone());
            tasks.spawn(async move {
                server::advertise(&client, &node, srv.port(), srv.fingerprint(), &stop).await;
                srv.run(stop).await;
            });
        }
        let result = self.sync_pods(shutdown.clone()).await;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        // Like a killed process: the pods that live in the agent die with it, nothing is
        // reported; CRI pods keep running in the container runtime, as they outlive a
        // kubelet, and the next agent adopts them.
        if let Ok(pods) = self.runtime.list_pods().await {
            for p in pods {
                if !self.runtime.outlives_agent(&p.id) {
                    let _ = self.runtime.remove_pod(&p.id).await;
                }
            }
        }
        result
    }

    async fn sync_pods(&self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let ctx = Arc::new(WorkerContext {
            client: self.client.clone(),
            runtime: self.runtime.clone(),
            node_name: self.config.node_name.clone(),
            host_ip: self.config.address.clone(),
            poll_interval: self.config.poll_interval,
            backoff_initial: self.config.backoff_initial,
            backoff_max: self.config.backoff_max,
            volume_dir: self.config.volume_dir.clone(),
            logs: self.archive.clone(),
            evictions: self.evictions.clone(),
        });
        let mut offer = self.runtime.offer();
        // What the runtime still runs from a previous agent life, by namespace/name.
        let mut adoptable: HashMap<(String, String), PodId> = HashMap::new();
        for p in self.runtime.list_pods().await? {
            adoptable.insert((p.namespace.clone(), p.name.clone()), p.id);
        }
        let mut workers: HashMap<String, WorkerSlot> = HashMap::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let selector = client::encode_query(&format!("spec.nodeName={}", ctx.node_name));
        let mut first = true;
        let mut delay = Duration::from_millis(100);
        'relist: loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Reap finished workers so their slots can be reused.
            while let Some(r) = tasks.try_join_next() {
                if let Err(e) = r
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "pod worker panicked");
                }
            }
            workers.retain(|_, w| !w.tx.is_closed());
            let (items, rv) = match self
                .client
                .list(&format!("/api/v1/pods?fieldSelector={selector}"))
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "listing pods failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            let mut seen = std::collections::HashSet::new();
            for pod in items {
                let uid = pod_uid(&pod);
                seen.insert(uid.clone());
                self.dispatch(
                    &ctx,
                    &mut workers,
                    &mut tasks,
                    &mut adoptable,
                    pod,
                    &shutdown,
                );
            }
            for (uid, w) in &workers {
                if !seen.contains(uid) {
                    w.tx.send_replace(None);
                }
            }
            if first {
                first = false;
                // Runtime pods no API pod claims: left over from pods deleted while we were down.
                for (_, id) in adoptable.drain() {
                    tracing::info!(pod = %id, "removing orphaned runtime pod");
                    let _ = self.runtime.remove_pod(&id).await;
                }
            }
            let mut rv = rv;
            let watch_path = |rv: &str| {
                format!(
                    "/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={rv}&fieldSelector={selector}"
                )
            };
            let mut watch = match self.client.watch(&watch_path(&rv)).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "watching pods failed; re-listing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => break 'relist,
                    ev = watch.next() => ev,
                    changed = offer_changed(&mut offer) => {
                        if changed {
                            // A runtime came (back): what it runs that no pod of ours claims
                            // (deleted while it was out of sight) goes.
                            self.remove_unclaimed(&workers).await;
                        } else {
                            offer = None;
                        }
                        continue;
                    }
                };
                let Some(Ok(ev)) = ev else {
                    // The stream ended (its server may have died): resume from the last
                    // resourceVersion seen, on whichever server answers now; re-list only if
                    // that fails (410 Gone comes back as an ERROR event, handled below).
                    match self.client.watch(&watch_path(&rv)).await {
                        Ok(w) => {
                            watch = w;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "resuming the pod watch failed; re-listing");
                            continue 'relist;
                        }
                    }
                };
                if let Some(v) = ev
                    .object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .filter(|v| !v.is_empty())
                    && ev.kind != "ERROR"
                {
                    rv = v.to_string();
                }
                match ev.kind.as_str() {
                    "ADDED" | "MODIFIED" => {
                        self.dispatch(
                            &ctx,
                            &mut workers,
                            &mut tasks,
                            &mut adoptable,
                            ev.object,
                            &shutdown,
                        );
                    }
                    "DELETED" => {
                        if let Some(w) = workers.get(&pod_uid(&ev.object)) {
                            w.tx.send_replace(None);
                        }
                    }
                    "ERROR" => continue 'relist,
                    _ => {}
                }
            }
        }
        drop(workers);
        tasks.shutdown().await;
        Ok(())
    }

    fn dispatch(
        &self,
        ctx: &Arc<WorkerContext<R>>,
        workers: &mut HashMap<String, WorkerSlot>,
        tasks: &mut JoinSet<()>,
        adoptable: &mut HashMap<(String, String), PodId>,
        pod: Value,
        shutdown: &CancellationToken,
    ) {
        let uid = pod_uid(&pod);
        if let Some(w) = workers.get(&uid)
            && !w.tx.is_closed()
        {
            w.tx.send_replace(Some(pod));
            return;
        }
        let key = (
            pod.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            pod.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        );
        let adopted = adoptable.remove(&key);
        let (tx, rx) = watch::channel(Some(pod));
        let worker = PodWorker::new(ctx.clone(), rx, adopted, shutdown.child_token());
        tasks.spawn(worker.run());
        workers.insert(uid, WorkerSlot { tx, key });
    }
}

impl<R: NodeRuntime> Agent<R> {
    /// Removes the runtime's pods that no live worker claims by namespace/name.
    async fn remove_unclaimed(&self, workers: &HashMap<String, WorkerSlot>) {
        let claimed: std::collections::HashSet<&(String, String)> = workers
            .values()
            .filter(|w| !w.tx.is_closed())
            .map(|w| &w.key)
            .collect();
        let pods = match self.runtime.list_pods().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing runtime pods for clean-up failed");
                return;
            }
        };
        for p in pods {
            if !claimed.contains(&(p.namespace.clone(), p.name.clone())) {
                tracing::info!(pod = %p.id, name = %p.name, "removing orphaned runtime pod");
                if let Err(e) = self.runtime.remove_pod(&p.id).await {
                    tracing::warn!(pod = %p.id, error = %e, "removing orphaned runtime pod failed");
                }
            }
        }
    }
}

/// Waits for the runtime's offer to change: `true` when it did, `false` when it never will.
async fn offer_changed(offer: &mut Option<watch::Receiver<RuntimeOffer>>) -> bool {
    match offer {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Waits for the memory-pressure verdict to change: `true` when it did, `false` when it never
/// will.
async fn pressure_changed(rx: &mut Option<watch::Receiver<bool>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Learns the API servers from the `default/kubernetes` Endpoints (see
/// [`ApiClient::refresh_servers`]); a failure keeps the servers known.
async fn refresh_servers(client: &ApiClient) {
    match client.refresh_servers().await {
        Ok(servers) => tracing::debug!(?servers, "API servers"),
        Err(e) => tracing::debug!(error = %e, "learning the API servers failed"),
    }
}

fn pod_uid(pod: &Value) -> String {
    pod.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The Lease heartbeat, the periodic node status, and the runtime classes annotation, which
/// is rewritten as soon as the runtime's offer changes.
struct Heartbeat {
    client: ApiClient,
    cfg: Arc<AgentConfig>,
    rt_name: &'static str,
    offer: Option<watch::Receiver<RuntimeOffer>>,
    advertised: heartbeat::Advertised,
    /// The eviction manager's `MemoryPressure` verdict (`None` once it stopped).
    pressure: Option<watch::Receiver<bool>>,
}

impl Heartbeat {
    async fn refresh(&mut self) {
        let adv = match &self.offer {
            Some(rx) => {
                let o = rx.borrow().clone();
                heartbeat::Advertised::from_offer(&self.client, &o).await
            }
            None => heartbeat::Advertised::fixed(&self.cfg, self.rt_name),
        };
        if adv.classes != self.advertised.classes {
            match heartbeat::post_classes(&self.client, &self.cfg, &adv).await {
                Ok(()) => tracing::info!(classes = %adv.classes, "runtime classes advertised"),
                Err(e) => {
                    tracing::warn!(error = %e, "runtime classes update failed");
                    return;
                }
            }
        }
        self.advertised = adv;
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut n: u32 = 0;
        loop {
            if let Err(e) = heartbeat::renew_lease(&self.client, &self.cfg).await {
                tracing::warn!(error = %e, "lease renewal failed");
            }
            n = n.wrapping_add(1);
            if self.cfg.status_every_heartbeats > 0
                && n.is_multiple_of(self.cfg.status_every_heartbeats)
            {
                self.post().await;
                refresh_servers(&self.client).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.heartbeat_interval) => {}
                changed = offer_changed(&mut self.offer) => {
                    if changed {
                        self.post().await;
                    } else {
                        self.offer = None;
                    }
                }
                changed = pressure_changed(&mut self.pressure) => {
                    if changed {
                        self.post().await;
                    } else {
                        self.pressure = None;
                    }
                }
            }
        }
    }

    async fn post(&mut self) {
        self.refresh().await;
        self.advertised.memory_pressure = self.pressure.as_ref().is_some_and(|rx| *rx.borrow());
        if let Err(e) = heartbeat::post_status(&self.client, &self.cfg, &self.advertised).await {
            tracing::warn!(error = %e, "node status update failed");
        }
    }
}
