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
    server
        .serve(listener, shutdown)
        .await
        .context("API server failed")
}
