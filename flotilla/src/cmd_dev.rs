//! `flotilla dev`: a whole single-node cluster in one process (embedded store, API server,
//! scheduler, controllers, a local agent with the wasm runtime), plus a demo Deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use control::apiserver::{ApiServer, ApiServerConfig};
use control::controllers::{ApiClient, ControllerConfig};
use control::scheduler::SchedulerConfig;
use control::storage::{MemStore, RemoteStore, Store};
use runtime::node::{Agent, AgentConfig, JoinToken};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Arguments of `flotilla dev`.
#[derive(clap::Args)]
pub(crate) struct DevArgs {
    /// Directory for the cluster's state (store, certificates, kubeconfig, pod logs).
    #[arg(long, default_value = ".flotilla-dev")]
    data_dir: PathBuf,
    /// Address of the API server (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// `embedded` (a one-member Flotilla store under DATA_DIR/store) or `mem` (in memory).
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "mem"])]
    store: String,
    /// Replicas of the demo Deployment (0 = no demo).
    #[arg(long, default_value_t = 3)]
    demo_replicas: u32,
    /// Node name of the local agent.
    #[arg(long, default_value = "dev-node")]
    node_name: String,
    /// Threads running wasm pods (default: one per core).
    #[arg(long)]
    executor_threads: Option<usize>,
    /// A CRI endpoint (`unix:///run/containerd/containerd.sock`) for OCI container pods;
    /// without it the local node runs wasm pods only.
    #[arg(long)]
    container_runtime_endpoint: Option<String>,
}

/// Runs the dev cluster until Ctrl-C.
pub(crate) fn run(args: DevArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(dev(args))
}

fn step(msg: &str) {
    println!("==> {msg}");
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("failed to create {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    step(&format!("data directory {}", data_dir.display()));
    let config = ApiServerConfig::new(&data_dir);
    if args.store == "mem" {
        step("store: in memory (--store mem): the cluster is lost on exit");
        return serve(args, data_dir, config, MemStore::new()).await;
    }
    // The store's member identity follows its addresses: free ports are picked on the first
    // start and kept in DATA_DIR/store-addresses so a restart finds the same member.
    let addr_file = data_dir.join("store-addresses");
    let saved = std::fs::read_to_string(&addr_file).ok();
    let (client, peer) = saved
        .as_deref()
        .and_then(|t| t.split_once(' '))
        .map_or(("127.0.0.1:0", "127.0.0.1:0"), |(c, p)| {
            (c.trim(), p.trim())
        });
    let started = control::storage::embedded::start_on(&data_dir.join("store"), client, peer).await;
    match started {
        Ok(node) => {
            if saved.is_none() {
                std::fs::write(
                    &addr_file,
                    format!("{} {}\n", node.client_addr(), node.peer_addr()),
                )
                .with_context(|| format!("failed to write {}", addr_file.display()))?;
            }
            step(&format!(
                "store: embedded one-member Flotilla store (etcd v3 API on {}), data in {}",
                node.client_addr(),
                data_dir.join("store").display()
            ));
            let store = RemoteStore::connect(&[format!("http://{}", node.client_addr())])
                .context("failed to connect to the embedded store")?;
            let result = serve(args, data_dir, config, store).await;
            node.shutdown().await;
            result
        }
        Err(e) => {
            step(&format!(
                "store: the embedded store failed to start ({e}); FALLING BACK to an in-memory store (lost on exit)"
            ));
            serve(args, data_dir, config, MemStore::new()).await
        }
    }
}

async fn serve<S: Store>(
    args: DevArgs,
    data_dir: PathBuf,
    config: ApiServerConfig,
    store: S,
) -> anyhow::Result<()> {
    let server = ApiServer::new(config, store).context("failed to prepare the API server")?;
    let mut attempt = 0;
    loop {
        match server.bootstrap().await {
            Ok(()) => break,
            Err(e) if attempt < 40 => {
                attempt += 1;
                tracing::debug!(error = %e, "store not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).context("failed to create the system namespaces"),
        }
    }
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            step(&format!(
                "{} is busy ({e}); using a free port instead",
                args.listen
            ));
            tokio::net::TcpListener::bind((args.listen.ip(), 0)).await?
        }
    };
    let addr = listener.local_addr()?;
    let kubeconfig = server
        .write_kubeconfig(addr)
        .context("failed to write the kubeconfig")?;
    let pki = server
        .pki()
        .context("the dev cluster runs in secure mode")?
        .clone();
    let url = format!("https://127.0.0.1:{}", addr.port());
    step(&format!("API server on {url} (HTTPS, bearer tokens)"));

    // The scheduler and controllers call the server's router in-process, as the admin.
    let client = server.local_client(Some(&pki.admin_token));
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, stop).await {
                tracing::error!(error = %e, "API server failed");
            }
        });
    }
    {
        let (dir, stop) = (data_dir.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = control::controllers::run_with_server(
                &dir,
                client,
                ControllerConfig::default(),
                SchedulerConfig::default(),
                stop,
            )
            .await
            {
                tracing::error!(error = %e, "controllers failed");
            }
        });
    }
    step("scheduler and controllers (ReplicaSet, Deployment, node lifecycle, GC) running");

    // The local agent joins with the node token, exactly as a remote one would. It stops
    // before the API server it reports to, as a drained node would.
    let agent_stop = CancellationToken::new();
    let token_path = data_dir.join("node-token");
    let token_text = wait_for_file(&token_path).await?;
    let join = JoinToken::parse(&token_text).context("node-token is malformed")?;
    let mut acfg = AgentConfig::new(&args.node_name, &url);
    acfg.token = Some(join.node_token(&args.node_name));
    acfg.ca_pem = join.ca_pem.clone();
    let agent_dir = data_dir.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    acfg.volume_dir = agent_dir.join("pod-volumes");
    let runtime = crate::cmd_agent::node_runtimes(
        &agent_dir,
        &args.node_name,
        acfg.capacity.pods,
        args.executor_threads,
        args.container_runtime_endpoint
            .as_deref()
            .map(|e| (e, crate::cmd_agent::CriOptions::default())),
        agent_stop.clone(),
    )
    .await?;
    let agent = Agent::new(acfg, runtime).context("invalid agent configuration")?;
    let agent_task = {
        let stop = agent_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = agent.run(stop).await {
                tracing::error!(error = %e, "agent failed");
            }
        })
    };
    let runtimes = match &args.container_runtime_endpoint {
        Some(e) => format!("wasm runtime and CRI at {e}"),
        None => "wasm runtime".to_owned(),
    };
    step(&format!(
        "node agent {} started ({runtimes}, data in {})",
        args.node_name,
        agent_dir.display()
    ));
    let admin = ApiClient::new(&url, Some(&pki.admin_token), Some(&pki.ca_pem))?;

    let demo = async {
        if args.demo_replicas > 0 {
            demo(&admin, args.demo_replicas).await
        } else {
            Ok(())
        }
    };
    let interrupted = tokio::select! {
        r = demo => {
            if let Err(e) = r {
                step(&format!("demo Deployment not ready: {e:#}"));
            }
            false
        }
        _ = tokio::signal::ctrl_c() => true,
    };
    if !interrupted {
        println!();
        println!("Flotilla dev cluster is ready. In another terminal:");
        println!();
        println!("  export KUBECONFIG={}", kubeconfig.display());
        println!("  kubectl get nodes");
        println!("  kubectl get pods -o wide");
        println!("  kubectl scale deployment/hello-wasm --replicas=5");
        println!("  kubectl get events");
        println!();
        println!(
            "(kubectl 1.37.1 can be installed with scripts/kubectl into target/tools/venv/bin)"
        );
        println!("A remote node can join with:");
        println!(
            "  flotilla agent --server https://<this-host>:{} --token-file {} --name <node> --data-dir <dir>",
            addr.port(),
            token_path.display()
        );
        println!();
        println!("Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    step("shutting down");
    agent_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent_task).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    step("stopped");
    Ok(())
}

async fn wait_for_file(path: &Path) -> anyhow::Result<String> {
    for _ in 0..100 {
        if let Ok(t) = std::fs::read_to_string(path) {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{} was not written", path.display())
}

/// The `sleeper` guest: next to the binary, where this build's guests were built, or built now.
fn sleeper_module() -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        for p in [
            dir.join("sleeper.wasm"),
            dir.join("wasm-guests/sleeper.wasm"),
        ] {
            if p.exists() {
                return Ok(p);
            }
        }
    }
    let built = runtime::wasm::guests::path("sleeper");
    if built.exists() {
        return Ok(built);
    }
    // A source checkout: build the guests the way the runtime's build script does.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let target = workspace.join("target/wasm-guests");
    // rust-toolchain.toml lists the target, yet on a fresh machine whose toolchain was
    // already installed rustup did not add it, and the README's first command stopped here.
    if wasm_target_missing(&workspace) {
        step("adding the rust target the guests need (rustup target add wasm32-wasip1)");
        let added = std::process::Command::new("rustup")
            .current_dir(&workspace)
            .args(["target", "add", "wasm32-wasip1"])
            .status()
            .context("failed to run rustup to add the wasm32-wasip1 target")?;
        if !added.success() {
            anyhow::bail!(
                "`rustup target add wasm32-wasip1` failed ({added}); add the target by hand and \
                 run flotilla dev again"
            );
        }
    }
    step(
        "building the wasm-examples guests (cargo build --release --target wasm32-wasip1 -p wasm-examples)",
    );
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&workspace)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "-p",
                "wasm-examples",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .context("failed to run cargo to build the wasm guests")?;
    let p = target.join("wasm32-wasip1/release/sleeper.wasm");
    if status.success() && p.exists() {
        Ok(p)
    } else {
        anyhow::bail!(
            "could not build the sleeper guest ({status}); is the target installed (`rustup target add wasm32-wasip1`)?"
        )
    }
}

/// Whether rustup is here and says the workspace's toolchain lacks `wasm32-wasip1`.
fn wasm_target_missing(workspace: &Path) -> bool {
    std::process::Command::new("rustup")
        .current_dir(workspace)
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && !String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.trim() == "wasm32-wasip1")
        })
}

/// Applies the demo Deployment and waits until its pods run, printing progress.
async fn demo(admin: &ApiClient, replicas: u32) -> anyhow::Result<()> {
    let module = tokio::task::spawn_blocking(sleeper_module).await??;
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "hello-wasm", "namespace": "default", "labels": {"app": "hello-wasm"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "hello-wasm"}},
            "template": {
                "metadata": {"labels": {"app": "hello-wasm"}},
                "spec": {"containers": [{
                    "name": "sleeper",
                    "image": module.display().to_string(),
                    "args": ["1000"],
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
                }]},
            },
        },
    });
    let path = "/apis/apps/v1/namespaces/default/deployments";
    match admin.create(path, &deployment).await {
        Ok(_) => step(&format!(
            "applied Deployment hello-wasm: {replicas} replicas of {}",
            module.display()
        )),
        Err(e) if e.is_conflict() => step("Deployment hello-wasm already exists (kept as is)"),
        Err(e) => return Err(e).context("failed to create the demo Deployment"),
    }
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (pods, _) = admin
            .list("/api/v1/namespaces/default/pods?labelSelector=app%3Dhello-wasm")
            .await?;
        let count = |ph: &str| {
            pods.iter()
                .filter(|p| {
                    p.pointer("/status/phase")
                        .and_then(Value::as_str)
                        .unwrap_or("Pending")
                        == ph
                })
                .count()
        };
        let (mut running, pending) = (count("Running"), count("Pending"));
        let ready = pods
            .iter()
            .filter(|p| {
                p.pointer("/status/containerStatuses/0/ready")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            })
            .count();
        running = running.min(ready);
        let line = format!("pods: {running} Running, {pending} Pending");
        if line != last {
            step(&line);
            last.clone_from(&line);
        }
        let want = usize::try_from(replicas).unwrap_or(usize::MAX);
        let want_now = admin
            .get(&format!("{path}/hello-wasm"))
            .await?
            .and_then(|d| d.pointer("/spec/replicas").and_then(Value::as_u64))
            .and_then(|r| usize::try_from(r).ok())
            .unwrap_or(want);
        if running >= want_now {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{line} after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
