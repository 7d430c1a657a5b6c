//! `flotilla server`: the Kubernetes-compatible API server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use control::apiserver::{ApiServer, ApiServerConfig};
use control::storage::MemStore;
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
    /// Store to use: `mem` keeps everything in memory (lost on exit; for development).
    #[arg(long, value_parser = ["mem"], conflicts_with = "store_endpoints")]
    store: Option<String>,
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
        anyhow::bail!(
            "--store-endpoints is not supported by this build yet (the etcd v3 RemoteStore is missing); use --store=mem"
        );
    }
    if args.store.as_deref() != Some("mem") {
        anyhow::bail!("choose a store: --store=mem or --store-endpoints URLS");
    }
    let server =
        ApiServer::new(config, MemStore::new()).context("failed to prepare the API server")?;
    if let Some(node) = &args.print_node_token {
        let pki = server
            .pki()
            .context("node tokens need the secure mode (drop --insecure-http-no-auth)")?;
        println!("{}", pki.node_token(node));
        return Ok(());
    }
    server
        .bootstrap()
        .await
        .context("failed to create the system namespaces")?;
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
    server
        .serve(listener, shutdown)
        .await
        .context("API server failed")
}
