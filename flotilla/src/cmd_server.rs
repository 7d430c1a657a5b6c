//! `flotilla server`: store member + API server + scheduler + controllers.
//!
//! The first server of a cluster creates the CA, the tokens and a one-member embedded store;
//! more servers join it into an HA control plane with `--join https://FIRST:6443 --token-file
//! FIRST_DATA_DIR/server-token` (see `control::apiserver::fetch_join`): each receives the
//! shared credentials, adds its embedded store member to the cluster (etcd `MemberAdd`, learner
//! first) and issues its own serving certificate from the shared CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use control::apiserver::{ApiServer, ApiServerConfig, ServerToken, StoreJoinInfo};
use control::storage::{MemStore, RemoteStore, Store};
use tokio_util::sync::CancellationToken;

use crate::cmd_bench_store::{Kind, ProcCluster};

/// Arguments of `flotilla server`.
#[derive(clap::Args)]
pub(crate) struct ServerArgs {
    /// Directory for the CA, serving certificate, tokens and `kubeconfig.yaml`.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:6443", env = "FLOTILLA_LISTEN")]
    listen: SocketAddr,
    /// Join the cluster of the server at this URL (`https://HOST:PORT`) as another control-plane
    /// server, with its server token (`--token-file`). Needed only on the first start: a
    /// restart with the same data dir rejoins by itself.
    #[arg(long, value_name = "URL", env = "FLOTILLA_JOIN")]
    join: Option<String>,
    /// File holding the server join token for `--join` (the first server's DATA_DIR/server-token).
    #[arg(long, value_name = "PATH", requires = "join", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The server join token for `--join` itself (`K10<ca-hash>::server:<secret>`).
    #[arg(
        long,
        env = "FLOTILLA_TOKEN",
        requires = "join",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Address other servers reach this one's embedded store at (the host of its advertised
    /// peer and client URLs; also added to the serving certificate), and agents reach its API at
    /// (published in the `default/kubernetes` Endpoints). Default: the listen address, or
    /// 127.0.0.1 when that is 0.0.0.0.
    #[arg(long, value_name = "IP")]
    advertise_address: Option<String>,
    /// Store to use without `--store-endpoints`: `embedded` (default) runs a Flotilla store
    /// member under DATA_DIR/store; `mem` keeps everything in memory (lost on exit).
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
    /// Extra DNS names or IPs for the serving certificate (besides localhost, loopback and a
    /// specific --listen IP); the certificate is re-issued when the names change.
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Print the bearer token for node NAME (to give to its agent) and exit.
    #[arg(long, value_name = "NAME")]
    print_node_token: Option<String>,
    /// DEVELOPMENT ONLY: serve plain HTTP with no authentication at all.
    #[arg(long, conflicts_with = "join")]
    insecure_http_no_auth: bool,
    /// How often node health is checked, in milliseconds (kube-controller-manager's
    /// `--node-monitor-period`).
    #[arg(long, default_value_t = 5_000)]
    node_monitor_period_ms: u64,
    /// Node lease age after which a node is `Unknown`, in milliseconds
    /// (`--node-monitor-grace-period`, 40 s as in Kubernetes).
    #[arg(long, default_value_t = 40_000)]
    node_monitor_grace_period_ms: u64,
    /// Write an audit log (`audit.k8s.io/v1` Events, one JSON object per line) to this file;
    /// `-` writes to standard output. As kube-apiserver's `--audit-log-path`.
    #[arg(long, value_name = "PATH")]
    audit_log_path: Option<std::path::PathBuf>,
    /// Audit policy (Kubernetes' `audit.k8s.io/v1` Policy, YAML or JSON): which requests
    /// are recorded and at what level. Default: every request at `Metadata` level.
    #[arg(long, value_name = "PATH", requires = "audit_log_path")]
    audit_policy_file: Option<std::path::PathBuf>,
    /// Rotate the audit log when it would grow past this many MiB (0: never).
    #[arg(long, default_value_t = 0, requires = "audit_log_path")]
    audit_log_maxsize: u64,
    /// Rotated audit logs to keep (0: all).
    #[arg(long, default_value_t = 0, requires = "audit_log_path")]
    audit_log_maxbackup: usize,
}

/// Runs the server until Ctrl-C.
pub(crate) fn run(args: ServerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(serve(args))
}

/// The store member of this server, as recorded in `DATA_DIR/join.json` once it joined a
/// cluster: a restart reuses it instead of joining again.
struct JoinRecord {
    /// The server it joined through (informational).
    joined_through: String,
    /// Store member name, unique in the cluster.
    store_name: Option<String>,
    /// Advertised store peer URL (the member id derives from it).
    store_peer_url: Option<String>,
    /// The store's cluster token.
    store_cluster_token: Option<String>,
}

const JOIN_RECORD: &str = "join.json";
/// The embedded store's cluster token when it was not joined (the store's default).
const DEFAULT_CLUSTER_TOKEN: &str = "flotilla-cluster";

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let mut config = ApiServerConfig::new(&args.data_dir);
    config.insecure_http = args.insecure_http_no_auth;
    let mut sans = args.tls_san.clone();
    if !args.listen.ip().is_unspecified() {
        sans.push(args.listen.ip().to_string());
    }
    sans.extend(args.advertise_address.clone());
    config.extra_sans = sans;
    if let Some(path) = &args.audit_log_path {
        let mut audit = control::apiserver::AuditConfig::new(path);
        if let Some(policy) = &args.audit_policy_file {
            audit.policy = control::apiserver::AuditPolicy::from_file(policy)?;
        }
        audit.max_size_mb = args.audit_log_maxsize;
        audit.max_backups = args.audit_log_maxbackup;
        config.audit = Some(audit);
    }

    // Bound before anything joins: a server that cannot serve must not become a store member.
    let listener = match args.print_node_token {
        Some(_) => None,
        None => Some(
            tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("failed to listen on {}", args.listen))?,
        ),
    };
    let record = read_join_record(&args.data_dir)?;
    let joining = match (&record, &args.join) {
        (Some(r), Some(url)) => {
            println!(
                "already joined through {} (DATA_DIR/{JOIN_RECORD}); ignoring --join {url}",
                r.joined_through
            );
            None
        }
        (None, Some(url)) => Some(url.clone()),
        _ => None,
    };
    let answer = match &joining {
        Some(url) => Some(join_credentials(&args, url).await?),
        None => None,
    };

    if !args.store_endpoints.is_empty() {
        if let Some(url) = &joining {
            write_join_record(
                &args.data_dir,
                &JoinRecord {
                    joined_through: url.clone(),
                    store_name: None,
                    store_peer_url: None,
                    store_cluster_token: None,
                },
            )?;
        }
        let store =
            RemoteStore::connect(&args.store_endpoints).context("invalid --store-endpoints")?;
        return serve_on(args, listener, config, store, None).await;
    }
    match args.store.as_deref() {
        Some("mem") if joining.is_some() || record.is_some() => {
            anyhow::bail!("--store=mem cannot be shared with other servers; drop --join")
        }
        Some("mem") => serve_on(args, listener, config, MemStore::new(), None).await,
        Some("embedded") | None => {
            let join_store = match (&joining, &answer) {
                (Some(url), Some(a)) => Some((
                    url.clone(),
                    a.store.clone().with_context(|| {
                        format!(
                            "the server at {url} uses an external store (--store-endpoints): \
                             start this server with the same --store-endpoints"
                        )
                    })?,
                )),
                _ => None,
            };
            let (node, cluster_token) =
                start_store(&args, record.as_ref(), join_store.as_ref()).await?;
            println!("embedded store: etcd v3 API on {}", node.client_addr());
            let client_url = format!(
                "http://{}",
                advertised(&args, node.client_addr(), "--embedded-store-client")?
            );
            let store = RemoteStore::connect(&[format!("http://{}", node.client_addr())])
                .context("failed to connect to the embedded store")?;
            let join_info = StoreJoinInfo {
                client_urls: vec![client_url],
                cluster_token,
            };
            let result = serve_on(args, listener, config, store, Some(join_info)).await;
            node.shutdown().await;
            result
        }
        Some(other) => anyhow::bail!("unknown --store {other:?}"),
    }
}

impl JoinRecord {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "joinedThrough": self.joined_through,
            "storeName": self.store_name,
            "storePeerUrl": self.store_peer_url,
            "storeClusterToken": self.store_cluster_token,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<JoinRecord> {
        let opt = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        Some(JoinRecord {
            joined_through: opt("joinedThrough")?,
            store_name: opt("storeName"),
            store_peer_url: opt("storePeerUrl"),
            store_cluster_token: opt("storeClusterToken"),
        })
    }
}

fn read_join_record(dir: &Path) -> anyhow::Result<Option<JoinRecord>> {
    let path = dir.join(JOIN_RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .ok()
                .as_ref()
                .and_then(JoinRecord::from_json)
                .with_context(|| format!("{} is not valid", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_join_record(dir: &Path, record: &JoinRecord) -> anyhow::Result<()> {
    let path = dir.join(JOIN_RECORD);
    let tmp = dir.join(format!("{JOIN_RECORD}.tmp"));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(&tmp, serde_json::to_vec_pretty(&record.to_json())?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads the server token, fetches the cluster credentials from `url` and installs them under
/// the data dir.
async fn join_credentials(
    args: &ServerArgs,
    url: &str,
) -> anyhow::Result<control::apiserver::JoinAnswer> {
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read --token-file {} (the first server writes DATA_DIR/server-token)",
                path.display()
            )
        })?,
        (None, None) => anyhow::bail!(
            "--join needs the server token: --token-file FIRST_DATA_DIR/server-token (or --token)"
        ),
    };
    let token = ServerToken::parse(&text).map_err(|e| anyhow::anyhow!("bad server token: {e}"))?;
    if args.data_dir.join("store").exists() {
        anyhow::bail!(
            "{} already holds a store of its own (it started a cluster, or joined another one); \
             use a fresh --data-dir to join {url}",
            args.data_dir.display()
        );
    }
    if let Ok(pem) = std::fs::read_to_string(args.data_dir.join("pki/ca.crt"))
        && control::apiserver::ca_hash(&pem).ok().as_deref() != Some(token.ca_hash.as_str())
    {
        anyhow::bail!(
            "{} already holds the CA of another cluster; use a fresh --data-dir to join {url}",
            args.data_dir.display()
        );
    }
    // The first server may be starting too: wait a little for it, not for ever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match control::apiserver::fetch_join(url, &token).await {
            Ok(a) => break a,
            Err(e @ control::apiserver::JoinError::Unreachable { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(error = %e, "waiting for the server to join");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    answer
        .bundle
        .install(&args.data_dir)
        .context("failed to store the cluster credentials")?;
    println!("joined the control plane of {url}: cluster credentials received");
    Ok(answer)
}

/// `addr` as other servers should reach it: with `--advertise-address` as host, or the listen
/// IP unless it is unspecified (then 127.0.0.1).
fn advertised(args: &ServerArgs, addr: SocketAddr, flag: &str) -> anyhow::Result<String> {
    Ok(match &args.advertise_address {
        Some(host) if host.contains(':') => format!("[{host}]:{}", addr.port()),
        Some(host) => format!("{host}:{}", addr.port()),
        None if addr.ip().is_unspecified() => {
            tracing::warn!(
                "{flag} listens on {addr}: advertising 127.0.0.1 (set --advertise-address for \
                 servers on other hosts)"
            );
            format!("127.0.0.1:{}", addr.port())
        }
        None => addr.to_string(),
    })
}

async fn bind(addr: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let parsed: SocketAddr = addr
        .parse()
        .with_context(|| format!("{flag}: {addr:?} is not an IP:PORT address"))?;
    tokio::net::TcpListener::bind(parsed)
        .await
        .with_context(|| format!("{flag}: cannot listen on {parsed}"))
}

/// Starts the embedded store member: the first member of a new cluster, a member added to the
/// cluster of `join`, or a restart of either. Returns it with the store's cluster token.
async fn start_store(
    args: &ServerArgs,
    record: Option<&JoinRecord>,
    join: Option<&(String, StoreJoinInfo)>,
) -> anyhow::Result<(store::NodeHandle, String)> {
    let client = bind(&args.embedded_store_client, "--embedded-store-client").await?;
    let peer = bind(&args.embedded_store_peer, "--embedded-store-peer").await?;
    let client_addr = client.local_addr()?;
    let peer_addr = peer.local_addr()?;
    let mut config = store::StoreConfig {
        data_dir: args.data_dir.join("store"),
        listen_client_addr: client_addr,
        listen_peer_addr: peer_addr,
        ..store::StoreConfig::default()
    };
    let joined = record.and_then(|r| {
        Some((
            r.store_name.clone()?,
            r.store_peer_url.clone()?,
            r.store_cluster_token.clone()?,
        ))
    });
    if let Some((name, peer_url, token)) = joined {
        // A restart of a joined member: same name, peer URL and cluster; no new MemberAdd.
        let now = format!(
            "http://{}",
            advertised(args, peer_addr, "--embedded-store-peer")?
        );
        if now != peer_url {
            anyhow::bail!(
                "this server's store member joined as {peer_url}, but would now advertise {now}: \
                 start it with the same --embedded-store-peer/--advertise-address"
            );
        }
        config.name = name.clone();
        config.initial_cluster = vec![(name, peer_url.clone())];
        config.advertise_peer_url = Some(peer_url);
        config.initial_cluster_state = store::ClusterState::Existing;
        config.initial_cluster_token = token;
    } else if let Some((url, info)) = join {
        let peer_url = format!(
            "http://{}",
            advertised(args, peer_addr, "--embedded-store-peer")?
        );
        let name = member_name(peer_addr.port());
        member_add(url, info, &peer_url).await?;
        write_join_record(
            &args.data_dir,
            &JoinRecord {
                joined_through: url.clone(),
                store_name: Some(name.clone()),
                store_peer_url: Some(peer_url.clone()),
                store_cluster_token: Some(info.cluster_token.clone()),
            },
        )?;
        config.name = name.clone();
        config.initial_cluster = vec![(name, peer_url.clone())];
        config.advertise_peer_url = Some(peer_url);
        config.initial_cluster_state = store::ClusterState::Existing;
        config.initial_cluster_token = info.cluster_token.clone();
    } else {
        // The first server: a one-member cluster named as it always was, so data dirs made by
        // earlier versions restart as the same member.
        let peer_url = match &args.advertise_address {
            Some(_) => format!(
                "http://{}",
                advertised(args, peer_addr, "--embedded-store-peer")?
            ),
            None => format!("http://{peer_addr}"),
        };
        config.name = "embedded".into();
        config.initial_cluster = vec![("embedded".into(), peer_url)];
        config.initial_cluster_token = DEFAULT_CLUSTER_TOKEN.into();
    }
    config.advertise_client_url = Some(format!(
        "http://{}",
        advertised(args, client_addr, "--embedded-store-client")?
    ));
    let token = config.initial_cluster_token.clone();
    let node = store::Node::start_with_listeners(config, client, peer)
        .await
        .context("failed to start the embedded store")?;
    Ok((node, token))
}

/// A store member name unique in the cluster: the host name and the peer port.
fn member_name(peer_port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "flotilla".into());
    format!("{host}-{peer_port}")
}

/// Asks the joined cluster's store to add this member (as a learner, promoted once caught up,
/// so the cluster keeps its quorum while the new member copies the data).
async fn member_add(url: &str, info: &StoreJoinInfo, peer_url: &str) -> anyhow::Result<()> {
    use store::pb::etcdserverpb::MemberAddRequest;
    use store::pb::etcdserverpb::cluster_client::ClusterClient;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no store client URL in the join answer");
    loop {
        for endpoint in &info.client_urls {
            let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
                Ok(e) => e
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(15))
                    .connect_lazy(),
                Err(e) => {
                    last = format!("{endpoint}: {e}");
                    continue;
                }
            };
            let request = MemberAddRequest {
                peer_ur_ls: vec![peer_url.to_string()],
                is_learner: false,
            };
            match ClusterClient::new(channel).member_add(request).await {
                Ok(r) => {
                    let members = r.into_inner().members.len();
                    println!("store: added member {peer_url} ({members} members)");
                    return Ok(());
                }
                // A previous attempt added it, then stopped before starting the member.
                Err(s) if s.message().contains("Peer URLs already exists") => {
                    println!("store: member {peer_url} was already added");
                    return Ok(());
                }
                Err(s) => last = format!("{endpoint}: {}", s.message()),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the store of the server at {url} did not add this member ({last}); check that \
                 its store client URL is reachable from here (--embedded-store-client and \
                 --advertise-address on that server)"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn serve_on<S: Store>(
    args: ServerArgs,
    listener: Option<tokio::net::TcpListener>,
    config: ApiServerConfig,
    store: S,
    store_join: Option<StoreJoinInfo>,
) -> anyhow::Result<()> {
    let mut server = ApiServer::new(config, store).context("failed to prepare the API server")?;
    if let Some(node) = &args.print_node_token {
        let pki = server
            .pki()
            .context("node tokens need the secure mode (drop --insecure-http-no-auth)")?;
        println!("{}", pki.node_token(node));
        return Ok(());
    }
    if let Some(pki) = server.pki() {
        let path = pki
            .write_server_token(&args.data_dir)
            .context("failed to write the server token")?;
        println!("server join token: {}", path.display());
    }
    if let Some(info) = store_join {
        server.set_store_join(info);
    }
    // The store may still be electing a leader (or, on a joining server, copying the data):
    // retry the bootstrap writes for a while.
    let mut attempt = 0;
    loop {
        match server.bootstrap().await {
            Ok(()) => break,
            Err(e) if attempt < 60 => {
                attempt += 1;
                tracing::info!(error = %e, "store not ready yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("failed to create the system namespaces"),
        }
    }
    let listener =
        listener.context("invariant: the listener is bound unless --print-node-token")?;
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
        // In-process calls of this server's router, authenticated as the admin.
        let client = server.local_client(Some(&pki.admin_token));
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
                client,
                controllers,
                Default::default(),
                stop,
            )
            .await
        })
    });
    // This server's address in `default/kubernetes`, where agents learn every server.
    let publisher = server.pki().cloned().map(|pki| {
        let ip = match &args.advertise_address {
            Some(ip) => ip.clone(),
            None if addr.ip().is_unspecified() => "127.0.0.1".into(),
            None => addr.ip().to_string(),
        };
        let local = if addr.ip().is_unspecified() || addr.ip().is_loopback() {
            format!("https://127.0.0.1:{}", addr.port())
        } else {
            format!("https://{addr}")
        };
        let cfg =
            control::apiserver::endpoint_reconciler::EndpointReconcilerConfig::new(ip, addr.port());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            match control::controllers::ApiClient::new(
                &local,
                Some(&pki.admin_token),
                Some(&pki.ca_pem),
            ) {
                Ok(client) => {
                    control::apiserver::endpoint_reconciler::run(client, cfg, stop).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot publish the API server address"),
            }
        })
    });
    if control_loops.is_none() {
        tracing::warn!("no scheduler or controllers without authentication (insecure mode)");
    }
    let served = server.serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(task) = publisher {
        let _ = task.await;
    }
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
    /// Mutating calls in the saturating 100-client run (in total).
    #[arg(long, default_value_t = control::bench::DEFAULT_SATURATING_CALLS)]
    mutations: usize,
    /// Aggregate rate of the paced 100-client run (calls/s). The default is 100 clients at
    /// client-go's default rate limit of 5 QPS; raise it to see where the p99 bends.
    #[arg(long, default_value_t = 500.0)]
    paced_rate: f64,
    /// Length of the paced run, in seconds. Its slow calls come in clusters of 10-50, so the
    /// p99 of a short run is decided by one or two of them; 20 s (10,000 calls at 500/s)
    /// gives a steadier figure.
    #[arg(long, default_value_t = control::bench::DEFAULT_PACED_SECONDS)]
    paced_seconds: u64,
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
    if !(args.paced_rate.is_finite() && args.paced_rate > 0.0) {
        anyhow::bail!(
            "--paced-rate {} is not a rate: give calls per second, e.g. --paced-rate 2000",
            args.paced_rate
        );
    }
    if args.paced_seconds == 0 {
        anyhow::bail!(
            "--paced-seconds 0 leaves no paced run: give at least 1 (the default is {})",
            control::bench::DEFAULT_PACED_SECONDS
        );
    }
    let cfg = control::bench::BenchConfig {
        list_pods: args.list_pods,
        watchers: args.watchers,
        mutations_hundred_clients: args.mutations,
        paced_rate: args.paced_rate,
        paced_duration: std::time::Duration::from_secs(args.paced_seconds),
        ..Default::default()
    };
    let mut results = Vec::new();
    // Both data dirs live until the table is printed: deleting one before the other system
    // runs would make that run pay for the file system's discards (with `discard` mounts, the
    // paced p99 of a run right after a deletion went from 3-8 ms to 39-51 ms).
    let flotilla_dir = BenchDir::new("store")?;
    let etcd_dir = BenchDir::new("etcd")?;
    {
        let dir = &flotilla_dir;
        crate::cmd_bench_store::settle_disk().await;
        // Member processes, as etcd's are: members sharing the API server's runtime competed
        // with it (and with each other) for its worker threads.
        let mut cluster =
            ProcCluster::start(Kind::Flotilla, args.members, &dir.path().join("store"))
                .await
                .context("failed to start the store cluster")?;
        let store = RemoteStore::connect(&cluster.urls())?;
        eprintln!("benchmarking on a {}-member Flotilla store…", args.members);
        let r = control::bench::run_on(
            &format!("flotilla store ({})", args.members),
            store,
            dir.path(),
            &cfg,
        )
        .await;
        cluster.shutdown().await;
        results.push(r.context("benchmark on the Flotilla store failed")?);
    }
    if !args.no_etcd {
        let dir = &etcd_dir;
        crate::cmd_bench_store::settle_disk().await;
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
