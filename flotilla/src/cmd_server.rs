//! `flotilla server`: the Kubernetes-compatible API server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use control::apiserver::{ApiServer, ApiServerConfig};
use control::storage::{MemStore, RemoteStore, Store};
use tokio_util::sync::CancellationToken;

/// Arguments of `flotilla server`.
#[derive(clap::Args)]
pub(crate) struct ServerArgs {
    /// Directory for the CA, serving certificate, tokens and `kubeconfig.yaml`.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:6443", env = "FLOTILLA_LISTEN")]
    listen: SocketAddr,
    /// Store to use without `--store-endpoints`: `embedded` (default) runs a one-member
    /// Flotilla store under DATA_DIR/store; `mem` keeps everything in memory (lost on exit).
    #[arg(long, value_parser = ["embedded", "mem"], conflicts_with = "store_endpoints")]
    store: Option<String>,
    /// Client (etcd v3) address of the embedded store.
    #[arg(long, default_value = "127.0.0.1:12379")]
    embedded_store_client: String,
    /// Peer (Raft) address of the embedded store.
    #[arg(long, default_value = "127.0.0.1:12380")]
    embedded_store_peer: String,
    /// etcd v3 endpoints of the Flotilla store (or a real etcd), comma-separated URLs.
    #[arg(long, value_delimiter = ',', env = "FLOTILLA_STORE_ENDPOINTS")]
    store_endpoints: Vec<String>,
    /// Extra DNS names or IPs for the serving certificate (only used when it is first created).
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Print the bearer token for node NAME (to give to its agent) and exit.
    #[arg(long, value_name = "NAME")]
    print_node_token: Option<String>,
    /// DEVELOPMENT ONLY: serve plain HTTP with no authentication at all.
    #[arg(long)]
    insecure_http_no_auth: bool,
    /// How often node health is checked, in milliseconds (kube-controller-manager's
    /// `--node-monitor-period`).
    #[arg(long, default_value_t = 5_000)]
    node_monitor_period_ms: u64,
    /// Node lease age after which a node is `Unknown`, in milliseconds
    /// (`--node-monitor-grace-period`, 40 s as in Kubernetes).
    #[arg(long, default_value_t = 40_000)]
    node_monitor_grace_period_ms: u64,
}

/// Runs the API server until Ctrl-C.
pub(crate) fn run(args: ServerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let mut config = ApiServerConfig::new(&args.data_dir);
    config.insecure_http = args.insecure_http_no_auth;
    config.extra_sans = args.tls_san.clone();
    if !args.store_endpoints.is_empty() {
        let store =
            RemoteStore::connect(&args.store_endpoints).context("invalid --store-endpoints")?;
        return serve_on(args, config, store).await;
    }
    match args.store.as_deref() {
        Some("mem") => serve_on(args, config, MemStore::new()).await,
        Some("embedded") | None => {
            let dir = args.data_dir.join("store");
            let node = control::storage::embedded::start_on(
                &dir,
                &args.embedded_store_client,
                &args.embedded_store_peer,
            )
            .await
            .context("failed to start the embedded store")?;
            println!("embedded store: etcd v3 API on {}", node.client_addr());
            let store = RemoteStore::connect(&[format!("http://{}", node.client_addr())])
                .context("failed to connect to the embedded store")?;
            let result = serve_on(args, config, store).await;
            node.shutdown().await;
            result
        }
        Some(other) => anyhow::bail!("unknown --store {other:?}"),
    }
}

async fn serve_on<S: Store>(
    args: ServerArgs,
    config: ApiServerConfig,
    store: S,
) -> anyhow::Result<()> {
    let server = ApiServer::new(config, store).context("failed to prepare the API server")?;
    if let Some(node) = &args.print_node_token {
        let pki = server
            .pki()
            .context("node tokens need the secure mode (drop --insecure-http-no-auth)")?;
        println!("{}", pki.node_token(node));
        return Ok(());
    }
    // The store may still be electing a leader: retry the bootstrap writes for a while.
    let mut attempt = 0;
    loop {
        match server.bootstrap().await {
            Ok(()) => break,
            Err(e) if attempt < 30 => {
                attempt += 1;
                tracing::info!(error = %e, "store not ready yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("failed to create the system namespaces"),
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let kubeconfig = server
        .write_kubeconfig(addr)
        .context("failed to write the kubeconfig")?;
    if args.insecure_http_no_auth {
        tracing::warn!("serving plain HTTP WITHOUT authentication (development only)");
    }
    println!("flotilla API server listening on {addr}");
    println!("kubeconfig: {}", kubeconfig.display());
    println!(
        "try: kubectl --kubeconfig {} get namespaces",
        kubeconfig.display()
    );
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signal.cancel();
    });
    // Scheduler and controllers (issue 5), under leader election; writes DATA_DIR/node-token.
    let control_loops = server.pki().cloned().map(|pki| {
        let (dir, stop) = (args.data_dir.clone(), shutdown.clone());
        println!("node join token: {}", dir.join("node-token").display());
        let controllers = control::controllers::ControllerConfig {
            node_monitor_period: std::time::Duration::from_millis(
                args.node_monitor_period_ms.max(100),
            ),
            node_monitor_grace_period: std::time::Duration::from_millis(
                args.node_monitor_grace_period_ms.max(100),
            ),
            ..Default::default()
        };
        tokio::spawn(async move {
            control::controllers::run_with_server(
                &dir,
                &pki,
                addr,
                controllers,
                Default::default(),
                stop,
            )
            .await
        })
    });
    if control_loops.is_none() {
        tracing::warn!("no scheduler or controllers without authentication (insecure mode)");
    }
    let served = server.serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(task) = control_loops
        && let Ok(Err(e)) = task.await
    {
        tracing::error!(error = %e, "scheduler/controllers failed");
    }
    served.context("API server failed")
}

/// Arguments of `flotilla bench api`.
#[derive(clap::Args)]
pub(crate) struct BenchApiArgs {
    /// Members of the Flotilla store cluster.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// etcd 3.4 binary for the comparison column (skipped with `--no-etcd`).
    #[arg(long, default_value = "etcd")]
    etcd: String,
    /// Leave out the etcd column.
    #[arg(long)]
    no_etcd: bool,
    /// Pods stored before timing LIST.
    #[arg(long, default_value_t = 10_000)]
    list_pods: usize,
    /// Concurrent watchers.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Mutating calls at 100 clients (in total).
    #[arg(long, default_value_t = 3000)]
    mutations: usize,
}

/// Runs the API benchmark on a Flotilla store cluster and on etcd 3.4, then prints the table.
pub(crate) fn run_bench(args: BenchApiArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(bench(args))
}

async fn bench(args: BenchApiArgs) -> anyhow::Result<()> {
    let cfg = control::bench::BenchConfig {
        list_pods: args.list_pods,
        watchers: args.watchers,
        mutations_hundred_clients: args.mutations,
        ..Default::default()
    };
    let mut results = Vec::new();
    {
        let dir = BenchDir::new("store")?;
        let nodes =
            control::storage::embedded::start_cluster(&dir.path().join("store"), args.members)
                .await
                .context("failed to start the store cluster")?;
        let endpoints: Vec<String> = nodes
            .iter()
            .map(|n| format!("http://{}", n.client_addr()))
            .collect();
        let store = RemoteStore::connect(&endpoints)?;
        eprintln!("benchmarking on a {}-member Flotilla store…", args.members);
        let r = control::bench::run_on(
            &format!("flotilla store ({})", args.members),
            store,
            dir.path(),
            &cfg,
        )
        .await;
        for n in &nodes {
            n.shutdown().await;
        }
        results.push(r.context("benchmark on the Flotilla store failed")?);
    }
    if !args.no_etcd {
        let dir = BenchDir::new("etcd")?;
        let (endpoints, mut children) =
            start_etcd_cluster(&args.etcd, dir.path(), args.members).await?;
        let store = RemoteStore::connect(&endpoints)?;
        eprintln!("benchmarking on a {}-member etcd…", args.members);
        let r = control::bench::run_on(
            &format!("etcd 3.4 ({})", args.members),
            store,
            dir.path(),
            &cfg,
        )
        .await;
        for c in &mut children {
            let _ = c.kill().await;
        }
        results.push(r.context("benchmark on etcd failed")?);
    }
    print!("{}", control::bench::table(&results));
    Ok(())
}

async fn start_etcd_cluster(
    bin: &str,
    dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<(Vec<String>, Vec<tokio::process::Child>)> {
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let mut ports = Vec::new();
    for _ in 0..n {
        ports.push((free()?, free()?));
    }
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
        .collect();
    let mut children = Vec::new();
    let mut endpoints = Vec::new();
    for (i, (c, p)) in ports.iter().enumerate() {
        let client = format!("http://127.0.0.1:{c}");
        let child = tokio::process::Command::new(bin)
            .arg(format!("--name=e{i}"))
            .arg(format!(
                "--data-dir={}",
                dir.join(format!("e{i}")).display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{p}"
            ))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("failed to run {bin} (install etcd-server, or pass --no-etcd)")
            })?;
        children.push(child);
        endpoints.push(client);
    }
    Ok((endpoints, children))
}

/// A scratch directory removed on drop.
struct BenchDir(std::path::PathBuf);

impl BenchDir {
    fn new(tag: &str) -> anyhow::Result<BenchDir> {
        let p = std::env::temp_dir().join(format!("flotilla-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(BenchDir(p))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
