//! Shared harness for Flotilla's cross-crate tests: an in-process cluster (API server on a
//! `MemStore` over HTTPS on a loopback port 0, scheduler, controllers) and node agents running
//! real wasm pods, each joined with the node token the server wrote.
#![warn(missing_docs)]

/// The store fault-injection harness, re-exported under its old path for the `faults` tests.
pub use chaos as faults;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use control::apiserver::{ApiServer, ApiServerConfig};
use control::controllers::{ApiClient, ControllerConfig};
use control::scheduler::SchedulerConfig;
use control::storage::MemStore;
use runtime::node::{Agent, AgentConfig, JoinToken, NodeCapacity, NodeRuntime};
use runtime::{AnyRuntime, WasmRuntime, WasmRuntimeConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Timing knobs of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Controller settings (short node grace periods for node-loss tests).
    pub controllers: ControllerConfig,
    /// Scheduler settings.
    pub scheduler: SchedulerConfig,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            controllers: ControllerConfig {
                node_monitor_period: Duration::from_millis(250),
                gc_interval: Duration::from_secs(1),
                ..ControllerConfig::default()
            },
            scheduler: SchedulerConfig {
                retry_interval: Duration::from_secs(2),
                ..SchedulerConfig::default()
            },
        }
    }
}

/// A running agent.
pub struct AgentHandle {
    /// Node name.
    pub name: String,
    /// The agent's runtime, to count what really runs.
    pub runtime: std::sync::Arc<AnyRuntime>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _root: tempfile::TempDir,
}

impl AgentHandle {
    /// Stops the agent as if its process died: no more heartbeats, its pods gone, nothing
    /// reported.
    pub async fn kill(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// An in-process control plane.
pub struct Cluster {
    /// Data dir (kubeconfig.yaml, node-token, pki/).
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// Admin client.
    pub admin: ApiClient,
    /// Agents by start order.
    pub agents: Vec<AgentHandle>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    cache_dir: PathBuf,
}

/// One compiled-module cache per test binary, so each guest compiles once.
fn shared_cache() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
        .to_owned()
}

/// Path of a built wasm-examples guest (`sleeper`, `exit_code`, `memory_hog`, ...).
pub fn guest(name: &str) -> String {
    runtime::wasm::guests::path(name).display().to_string()
}

impl Cluster {
    /// Starts API server, scheduler and controllers.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let mut config = ApiServerConfig::new(dir.path());
        // Audited as an operator would run it, so exec, logs and watches go through the layer.
        config.audit = Some(control::apiserver::AuditConfig::new(
            dir.path().join("audit.log"),
        ));
        let server = ApiServer::new(config, MemStore::new())?;
        server.bootstrap().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        server.write_kubeconfig(addr)?;
        control::controllers::write_node_token(dir.path())?;
        let pki = server.pki().context("secure mode has a PKI")?.clone();
        let url = format!("https://127.0.0.1:{}", addr.port());
        let admin = ApiClient::new(&url, Some(&pki.admin_token), Some(&pki.ca_pem))?;
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, stop).await {
                tracing::error!(error = %e, "API server failed");
            }
        });
        tasks.spawn(control::controllers::run_all(
            admin.clone(),
            opts.controllers,
            shutdown.clone(),
        ));
        tasks.spawn(control::scheduler::run(
            admin.clone(),
            opts.scheduler,
            shutdown.clone(),
        ));
        Ok(Cluster {
            dir,
            server: url,
            admin,
            agents: Vec::new(),
            shutdown,
            tasks,
            cache_dir: shared_cache(),
        })
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    /// The agent configuration every e2e agent starts from: joined with the server's node
    /// token and CA, 4 CPUs, 8 GiB and 110 pods, a heartbeat every 500 ms and pod polls every
    /// 100 ms. Callers adjust the rest (back-off, labels, runtime classes, eviction).
    pub fn agent_config(&self, name: &str) -> anyhow::Result<AgentConfig> {
        let token_text = std::fs::read_to_string(self.dir.path().join("node-token"))?;
        let join = JoinToken::parse(&token_text).context("node-token parses")?;
        let mut cfg = AgentConfig::new(name, &self.server);
        cfg.token = Some(join.node_token(name));
        cfg.ca_pem = join.ca_pem.clone();
        cfg.capacity = NodeCapacity {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            pods: 110,
        };
        cfg.heartbeat_interval = Duration::from_millis(500);
        cfg.poll_interval = Duration::from_millis(100);
        Ok(cfg)
    }

    /// Joins a node with the server's node token and the wasm runtime; `tweak` adjusts its
    /// config (capacity, labels, taints, timings).
    pub async fn add_agent(
        &mut self,
        name: &str,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> anyhow::Result<()> {
        let mut cfg = self.agent_config(name)?;
        cfg.backoff_initial = Duration::from_secs(1);
        cfg.backoff_max = Duration::from_secs(8);
        cfg.labels = BTreeMap::new();
        tweak(&mut cfg);
        let root = tempfile::tempdir()?;
        let mut rcfg = WasmRuntimeConfig::new(root.path());
        rcfg.cache_dir = Some(self.cache_dir.clone());
        rcfg.max_pods = 128;
        rcfg.executor_threads = 1;
        let rt = AnyRuntime::Wasm(WasmRuntime::new(rcfg)?);
        let stop = self.shutdown.child_token();
        let (runtime, task) = spawn_agent(cfg, rt, &stop)?;
        self.agents.push(AgentHandle {
            name: name.to_string(),
            runtime,
            stop,
            task: Some(task),
            _root: root,
        });
        Ok(())
    }

    /// The agent named `name`.
    pub fn agent(&mut self, name: &str) -> Option<&mut AgentHandle> {
        self.agents.iter_mut().find(|a| a.name == name)
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        for a in &mut self.agents {
            a.kill().await;
        }
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }

    /// Pods of a namespace.
    pub async fn pods(&self, ns: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .admin
            .list(&format!("/api/v1/namespaces/{ns}/pods"))
            .await?
            .0)
    }

    /// Applies (creates) an object at a collection path.
    pub async fn create(&self, path: &str, obj: &Value) -> anyhow::Result<Value> {
        Ok(self.admin.create(path, obj).await?)
    }
}

/// Runs an agent over `runtime` until `stop`: its runtime (to inspect what runs) and task.
pub fn spawn_agent<R: NodeRuntime>(
    cfg: AgentConfig,
    runtime: R,
    stop: &CancellationToken,
) -> anyhow::Result<(std::sync::Arc<R>, tokio::task::JoinHandle<()>)> {
    let name = cfg.node_name.clone();
    let agent = Agent::new(cfg, runtime)?;
    let rt = agent.runtime();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = agent.run(s).await {
            tracing::error!(node = %name, error = %e, "agent failed");
        }
    });
    Ok((rt, task))
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with the last observation.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(why)) => why,
            Err(e) => format!("error: {e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Phase of a pod.
pub fn phase(p: &Value) -> &str {
    p.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Node of a pod.
pub fn node_of(p: &Value) -> &str {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Whether a pod is being deleted.
pub fn deleting(p: &Value) -> bool {
    p.pointer("/metadata/deletionTimestamp").is_some()
}

/// The venv kubectl installed by `scripts/kubectl`, if present.
pub fn kubectl() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/kubectl");
    p.exists().then_some(p)
}
