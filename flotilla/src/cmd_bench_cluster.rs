//! `flotilla bench scheduler` and `flotilla bench startup`, each printing a table.
//!
//! - scheduler: throughput against a real in-process API server (MemStore, HTTPS on loopback)
//!   with many registered nodes. The nodes are registered through the API (Ready, with
//!   allocatable resources) but have no agents: the run measures placement and binding only
//!   (the scheduler's informers' initial list included), not pod start-up. Bindings are
//!   observed through a watch on the pods.
//! - startup: one node with the wasm agent; pod created → `Running` seen by a watch.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use control::apiserver::{ApiServer, ApiServerConfig};
use control::controllers::ApiClient;
use control::scheduler::SchedulerConfig;
use control::storage::MemStore;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Arguments of `flotilla bench scheduler`.
#[derive(clap::Args)]
pub(crate) struct BenchSchedulerArgs {
    /// Node counts to run with, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    nodes: Vec<usize>,
    /// Pods scheduled per run.
    #[arg(long, default_value_t = 5000)]
    pods: usize,
}

/// Runs the benchmark and prints the table.
pub(crate) fn run(args: BenchSchedulerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(async {
        println!("| nodes | pods | constraints | seconds | pods/s |");
        println!("|---:|---:|---|---:|---:|");
        for &n in &args.nodes {
            for constrained in [false, true] {
                let (secs, rate) = one_run(n, args.pods, constrained).await?;
                println!(
                    "| {n} | {} | {} | {secs:.2} | {rate:.0} |",
                    args.pods,
                    if constrained {
                        "node affinity + taints"
                    } else {
                        "requests only"
                    }
                );
            }
        }
        Ok(())
    })
}

async fn one_run(nodes: usize, pods: usize, constrained: bool) -> anyhow::Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-bench-scheduler-{}-{nodes}-{constrained}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let server = ApiServer::new(ApiServerConfig::new(&dir), MemStore::new())?;
    server.bootstrap().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let pki = server.pki().context("secure mode")?.clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let srv = tokio::spawn(async move { server.serve(listener, stop).await });
    let url = format!("https://127.0.0.1:{}", addr.port());
    let client = ApiClient::new(&url, Some(&pki.admin_token), Some(&pki.ca_pem))?;

    let node_objs = (0..nodes).map(|i| {
        let mut spec = json!({});
        if constrained && i % 10 == 0 {
            spec["taints"] =
                json!([{"key": "dedicated", "value": "infra", "effect": "NoSchedule"}]);
        }
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("hollow-{i}"), "labels": {
                "kubernetes.io/hostname": format!("hollow-{i}"),
                "topology.kubernetes.io/zone": format!("zone-{}", i % 3),
            }},
            "spec": spec,
            "status": {
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            },
        })
    });
    create_all(&client, "/api/v1/nodes", node_objs).await?;
    let pod_objs = (0..pods).map(|i| {
        let mut spec = json!({"containers": [{"name": "c", "image": "/srv/app.wasm",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]});
        if constrained {
            spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone-0", "zone-1"]}]}]}}});
            spec["tolerations"] =
                json!([{"key": "example.com/other", "operator": "Exists", "effect": "NoSchedule"}]);
        }
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("p-{i}"), "namespace": "default"}, "spec": spec})
    });
    create_all(&client, "/api/v1/namespaces/default/pods", pod_objs).await?;

    // Bindings are counted from a watch (a poll of 5,000 pods would load the API server the
    // scheduler is measured against).
    let (_, rv) = client
        .list("/api/v1/namespaces/default/pods?limit=1")
        .await?;
    let mut w = client
        .watch(&format!(
            "/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"
        ))
        .await?;
    let started = Instant::now();
    let sched_stop = shutdown.child_token();
    let sched = tokio::spawn(control::scheduler::run(
        client.clone(),
        SchedulerConfig::default(),
        sched_stop.clone(),
    ));
    let mut bound = std::collections::HashSet::new();
    while bound.len() < pods {
        let left = Duration::from_secs(600).saturating_sub(started.elapsed());
        let ev = tokio::time::timeout(left, w.next()).await;
        let Ok(Some(Ok(ev))) = ev else {
            anyhow::bail!("only {}/{pods} pods bound after 600 s", bound.len());
        };
        if ev
            .object
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
        {
            bound.insert(
                ev.object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    sched_stop.cancel();
    let _ = sched.await;
    shutdown.cancel();
    let _ = srv.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((secs, pods as f64 / secs))
}

async fn create_all(
    client: &ApiClient,
    path: &str,
    objs: impl Iterator<Item = Value>,
) -> anyhow::Result<()> {
    let mut results =
        futures::stream::iter(objs.map(|o| async move { client.create(path, &o).await }))
            .buffer_unordered(64);
    while let Some(r) = results.next().await {
        r.with_context(|| format!("creating objects at {path}"))?;
    }
    Ok(())
}

/// Arguments of `flotilla bench startup`.
#[derive(clap::Args)]
pub(crate) struct BenchStartupArgs {
    /// Pods started, one after another.
    #[arg(long, default_value_t = 200)]
    pods: usize,
    /// The wasm module every pod runs (default: the `sleeper` guest of this build).
    #[arg(long)]
    image: Option<String>,
}

/// End-to-end pod start-up on a one-node cluster: pod created → `Running` seen by a watch.
pub(crate) fn run_startup(args: BenchStartupArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(startup(args))
}

async fn startup(args: BenchStartupArgs) -> anyhow::Result<()> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| runtime::wasm::guests::path("sleeper").display().to_string());
    let dir = std::env::temp_dir().join(format!("flotilla-bench-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let server = ApiServer::new(ApiServerConfig::new(&dir), MemStore::new())?;
    server.bootstrap().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let pki = server.pki().context("secure mode")?.clone();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let srv = tokio::spawn(async move { server.serve(listener, stop).await });
    let url = format!("https://127.0.0.1:{}", addr.port());
    let client = ApiClient::new(&url, Some(&pki.admin_token), Some(&pki.ca_pem))?;
    let sched = tokio::spawn(control::scheduler::run(
        client.clone(),
        SchedulerConfig::default(),
        shutdown.clone(),
    ));
    let mut acfg = runtime::node::AgentConfig::new("bench-node", &url);
    acfg.token = Some(pki.node_token("bench-node"));
    acfg.ca_pem = Some(pki.ca_pem.clone());
    acfg.capacity.pods = u32::try_from(args.pods + 10).unwrap_or(u32::MAX);
    let rt = crate::cmd_agent::wasm_runtime(&dir.join("agent"), acfg.capacity.pods, None)?;
    let agent = runtime::node::Agent::new(acfg, rt)?;
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    // Wait for the node, then warm the module cache with one pod.
    loop {
        if client.get("/api/v1/nodes/bench-node").await?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pod = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
               "spec": {"containers": [{"name": "c", "image": image, "args": ["100000"]}]}})
    };
    let mut lat = Vec::with_capacity(args.pods);
    for i in 0..=args.pods {
        let name = format!("start-{i}");
        let (_, rv) = client
            .list("/api/v1/namespaces/default/pods?limit=1")
            .await?;
        let mut w = client
            .watch(&format!(
                "/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3D{name}"
            ))
            .await?;
        let t0 = Instant::now();
        client
            .create("/api/v1/namespaces/default/pods", &pod(&name))
            .await?;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), w.next())
                .await
                .context("pod did not start within 60 s")?;
            let Some(Ok(ev)) = ev else {
                anyhow::bail!("watch ended");
            };
            if ev
                .object
                .pointer("/status/containerStatuses/0/state/running")
                .is_some()
            {
                break;
            }
        }
        // The first pod compiles the module: not counted.
        if i > 0 {
            lat.push(t0.elapsed());
        }
    }
    lat.sort();
    let pct = |p: f64| {
        let idx = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat.get(idx).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!("| pods | p50 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {:.2} | {:.2} | {:.2} |",
        lat.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    shutdown.cancel();
    let _ = sched.await;
    let _ = agent_task.await;
    let _ = srv.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
