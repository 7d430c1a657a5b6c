//! `flotilla agent`: the node agent, joining a cluster with the server's node token.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use runtime::cri::{CriRuntimeConfig, DEFAULT_ENDPOINT};
use runtime::node::{Agent, AgentConfig, CriSettings, JoinToken, NodeCapacity, NodeRuntimes};
use runtime::{AnyRuntime, WasmRuntime, WasmRuntimeConfig};
use tokio_util::sync::CancellationToken;

/// Arguments of `flotilla agent`.
#[derive(clap::Args)]
pub(crate) struct AgentArgs {
    /// API server URL, e.g. `https://10.0.0.1:6443`, or several, comma-separated. The agent
    /// also learns every server of an HA control plane from the cluster and, when the one in
    /// use stops answering, moves to the next.
    #[arg(long, env = "FLOTILLA_SERVER")]
    server: String,
    /// The server's `DATA_DIR/node-token` (join secret + cluster CA), or a file holding a
    /// node bearer token.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    token_file: PathBuf,
    /// CA certificate (PEM) of the cluster, if the token file does not carry it.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Directory for pod logs, volumes and the compiled-module cache.
    #[arg(long, env = "FLOTILLA_AGENT_DATA_DIR")]
    data_dir: PathBuf,
    /// Address reported as the node's InternalIP.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Port of the agent's HTTPS server for `kubectl logs`/`exec` (kubelet: 10250), bound on
    /// `--address`; 0 picks a free port (advertised on the Node either way).
    #[arg(long, default_value_t = runtime::node::server::DEFAULT_SERVING_PORT)]
    serving_port: u16,
    /// Extra node labels, `key=value`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Node lease renewal interval in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_interval_ms: u64,
    /// CPU to offer, in millicores (default: every core).
    #[arg(long)]
    cpu_millis: Option<u64>,
    /// Memory to offer, in MiB (default: the machine's).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Most pods on this node.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// Threads running wasm pods (default: one per core).
    #[arg(long)]
    executor_threads: Option<usize>,
    /// The CRI endpoint running OCI container pods (the kubelet's flag). If it does not
    /// answer, the node offers wasm pods only, says so in its conditions, and keeps checking.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    container_runtime_endpoint: String,
    /// CRI runtime handlers the endpoint is configured with (containerd `runtimes.<name>`).
    #[arg(long, value_delimiter = ',', default_value = "runc")]
    cri_runtime_handlers: Vec<String>,
    /// Root of the pod cgroups (cgroupfs driver), by QoS class below it.
    #[arg(long, default_value = "/flotilla")]
    cgroup_root: String,
    /// How often an unreachable CRI endpoint is retried, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    cri_recheck_interval_ms: u64,
    /// Network of OCI pods: `host` (the node's namespace) or `cni` (a pod namespace set up by
    /// the CRI runtime's CNI configuration; the pod's IP is reported as its podIP).
    #[arg(long, default_value = "host", value_parser = ["host", "cni"])]
    pod_network: String,
    /// Hard eviction threshold, the kubelet's syntax: `memory.available<100Mi` or
    /// `memory.available<10%` (of the node's memory); `memory.available<0` disables eviction.
    #[arg(long, default_value = "memory.available<100Mi")]
    eviction_hard: String,
    /// A PEM file of extra CA certificates trusted for `https://` wasm images (a private
    /// registry), besides the system bundle.
    #[arg(long)]
    image_ca_file: Option<PathBuf>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "flotilla-node".into())
}

/// Builds the agent's configuration from the command line.
fn agent_config(args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let name = args.name.clone().unwrap_or_else(host_name);
    let text = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("failed to read {}", args.token_file.display()))?;
    let join = JoinToken::parse(&text).with_context(|| {
        format!(
            "{} is neither a node token file written by `flotilla server` nor a node bearer token",
            args.token_file.display()
        )
    })?;
    let ca = match &args.ca_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("failed to read {}", p.display()))?,
        ),
        None => join.ca_pem.clone(),
    };
    let mut cfg = AgentConfig::new(&name, &args.server);
    cfg.volume_dir = args.data_dir.join("pod-volumes");
    cfg.token = Some(join.node_token(&name));
    cfg.ca_pem = ca;
    cfg.address = args.address.clone();
    cfg.serving_port = Some(args.serving_port);
    cfg.heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms.max(100));
    let mut cap = NodeCapacity::detect();
    if let Some(c) = args.cpu_millis {
        cap.cpu_millis = c;
    }
    if let Some(m) = args.memory_mib {
        cap.memory_bytes = m * 1024 * 1024;
    }
    cap.pods = args.max_pods;
    cfg.eviction_memory_available =
        runtime::node::eviction::parse_eviction_hard(&args.eviction_hard, cap.memory_bytes)
            .context("bad --eviction-hard")?;
    cfg.capacity = cap;
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?} is not key=value"))?;
        cfg.labels.insert(k.to_string(), v.to_string());
    }
    Ok(cfg)
}

/// The node's wasm runtime under `data_dir`.
pub(crate) fn wasm_runtime(
    data_dir: &std::path::Path,
    max_pods: u32,
    executor_threads: Option<usize>,
) -> anyhow::Result<AnyRuntime> {
    wasm_runtime_with_ca(data_dir, max_pods, executor_threads, None)
}

/// [`wasm_runtime`] trusting the CA certificates in `image_ca_file` for `https://` images.
fn wasm_runtime_with_ca(
    data_dir: &std::path::Path,
    max_pods: u32,
    executor_threads: Option<usize>,
    image_ca_file: Option<PathBuf>,
) -> anyhow::Result<AnyRuntime> {
    let mut rcfg = WasmRuntimeConfig::new(data_dir.join("pods"));
    rcfg.extra_ca_bundle = image_ca_file;
    rcfg.cache_dir = Some(data_dir.join("module-cache"));
    rcfg.max_pods = max_pods;
    if let Some(n) = executor_threads {
        rcfg.executor_threads = n.max(1);
    }
    Ok(AnyRuntime::Wasm(
        WasmRuntime::new(rcfg).context("failed to start the wasm runtime")?,
    ))
}

/// The node's runtimes: wasm under `data_dir`, and CRI at `endpoint` (if given) with pod files
/// under `data_dir/cri`, pods labelled with `node_name`.
pub(crate) async fn node_runtimes(
    data_dir: &std::path::Path,
    node_name: &str,
    max_pods: u32,
    executor_threads: Option<usize>,
    cri: Option<(&str, CriOptions)>,
    shutdown: CancellationToken,
) -> anyhow::Result<NodeRuntimes> {
    node_runtimes_with_ca(
        data_dir,
        node_name,
        max_pods,
        executor_threads,
        cri,
        None,
        shutdown,
    )
    .await
}

/// [`node_runtimes`] whose wasm runtime trusts the CA certificates in `image_ca_file`.
async fn node_runtimes_with_ca(
    data_dir: &std::path::Path,
    node_name: &str,
    max_pods: u32,
    executor_threads: Option<usize>,
    cri: Option<(&str, CriOptions)>,
    image_ca_file: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<NodeRuntimes> {
    let AnyRuntime::Wasm(wasm) =
        wasm_runtime_with_ca(data_dir, max_pods, executor_threads, image_ca_file)?
    else {
        anyhow::bail!("wasm_runtime returned another runtime");
    };
    let data_dir = std::fs::canonicalize(data_dir)
        .with_context(|| format!("failed to resolve {}", data_dir.display()))?;
    let settings = cri.map(|(endpoint, opts)| {
        let mut config = CriRuntimeConfig::new(endpoint, data_dir.join("cri"));
        config.instance = node_name.to_owned();
        config.cgroup_root = Some(opts.cgroup_root);
        config.host_network = opts.host_network;
        let mut s = CriSettings::new(config);
        s.handlers = opts.handlers;
        s.recheck = opts.recheck;
        s
    });
    Ok(NodeRuntimes::start(wasm, settings, shutdown).await)
}

/// CRI settings from the command line.
pub(crate) struct CriOptions {
    pub(crate) handlers: Vec<String>,
    pub(crate) cgroup_root: String,
    pub(crate) recheck: Duration,
    pub(crate) host_network: bool,
}

impl Default for CriOptions {
    fn default() -> Self {
        CriOptions {
            handlers: vec!["runc".into()],
            cgroup_root: "/flotilla".into(),
            recheck: Duration::from_secs(10),
            host_network: true,
        }
    }
}

/// Runs the agent until Ctrl-C.
pub(crate) fn run(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = agent_config(&args)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("failed to create {}", args.data_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let cri = CriOptions {
            handlers: args.cri_runtime_handlers.clone(),
            cgroup_root: args.cgroup_root.clone(),
            recheck: Duration::from_millis(args.cri_recheck_interval_ms.max(100)),
            host_network: args.pod_network == "host",
        };
        if let Some(p) = &args.image_ca_file {
            std::fs::read_to_string(p)
                .with_context(|| format!("failed to read --image-ca-file {}", p.display()))?;
        }
        let runtime = node_runtimes_with_ca(
            &args.data_dir,
            &cfg.node_name,
            cfg.capacity.pods,
            args.executor_threads,
            Some((&args.container_runtime_endpoint, cri)),
            args.image_ca_file.clone(),
            shutdown.clone(),
        )
        .await?;
        let offer = runtime.current_offer();
        match offer.cri.as_ref().and_then(|c| c.error.as_ref()) {
            Some(e) => println!(
                "flotilla agent: CRI endpoint {} unavailable ({e}); offering wasm pods only until it answers",
                args.container_runtime_endpoint
            ),
            None => println!(
                "flotilla agent: CRI endpoint {} ({})",
                args.container_runtime_endpoint, offer.runtime_version
            ),
        }
        println!(
            "flotilla agent: node {} joining {}",
            cfg.node_name, cfg.server
        );
        let agent = Agent::new(cfg, runtime).context("invalid agent configuration")?;
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            signal.cancel();
        });
        agent.run(shutdown).await.context("agent failed")
    })
}
