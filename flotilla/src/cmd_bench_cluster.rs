//! `flotilla bench scheduler` and `flotilla bench startup`, each printing a table.
//!
//! - scheduler: throughput against a real in-process API server (MemStore) with many
//!   registered nodes. The scheduler calls the server's router in-process, as in `flotilla
//!   server`; the bench creates the objects and watches the bindings over HTTPS on loopback.
//!   The nodes are registered through the API (Ready, with allocatable resources) but have no
//!   agents: the run measures placement and binding only (the scheduler's informers' initial
//!   list included), not pod start-up. Bindings are observed through a watch on the pods.
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
        println!(
            "| nodes | pods | constraints | seconds | pods/s | CPU s | pods/CPU s | events written (s) | load |"
        );
        println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
        for &n in &args.nodes {
            for constrained in [false, true] {
                let (secs, rate, cpu, events) = one_run(n, args.pods, constrained).await?;
                let events = events.map_or_else(|| "n/a".into(), |e| format!("{e:.2}"));
                let (cpu, per_cpu) = match cpu {
                    Some(c) => (format!("{c:.2}"), format!("{:.0}", args.pods as f64 / c)),
                    None => ("n/a".into(), "n/a".into()),
                };
                println!(
                    "| {n} | {} | {} | {secs:.2} | {rate:.0} | {cpu} | {per_cpu} | {events} | {} |",
                    args.pods,
                    if constrained {
                        "node affinity + taints"
                    } else {
                        "requests only"
                    },
                    loadavg()
                );
            }
        }
        Ok(())
    })
}

/// CPU time (user + system) this process used so far, from `/proc/self/stat`; with other
/// work on the machine it says more than wall-clock time about the cost per pod.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may contain spaces) start at `state`, field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux architecture the binary targets.
    Some(ticks / 100.0)
}

/// One timed run: seconds until every pod is bound, pods/s, the CPU seconds the process used
/// meanwhile, and the seconds until every pod's `Scheduled` event was written too (the
/// scheduler posts them in the background; `None` if they were not all written within 60 s).
async fn one_run(
    nodes: usize,
    pods: usize,
    constrained: bool,
) -> anyhow::Result<(f64, f64, Option<f64>, Option<f64>)> {
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
    // The scheduler talks to the server in-process, as in `flotilla server`.
    let sched_client = server.local_client(Some(&pki.admin_token));
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
    let cpu0 = cpu_seconds();
    let (posted0, dropped0) = control::scheduler::event_counts();
    let started = Instant::now();
    // For `perf report --time`: the timed phase in CLOCK_MONOTONIC (Instant's Debug shows it).
    tracing::debug!(at = ?started, "timed phase starts");
    let sched_stop = shutdown.child_token();
    let sched = tokio::spawn(control::scheduler::run(
        sched_client,
        SchedulerConfig::default(),
        sched_stop.clone(),
    ));
    let mut bound = std::collections::HashSet::new();
    let is_bound = |pod: &Value| {
        pod.pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
    };
    let name_of = |pod: &Value| {
        pod.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    while bound.len() < pods {
        let left = Duration::from_secs(600).saturating_sub(started.elapsed());
        match tokio::time::timeout(left, w.next()).await {
            Err(_) => anyhow::bail!("only {}/{pods} pods bound after 600 s", bound.len()),
            Ok(Some(Ok(ev))) => {
                if is_bound(&ev.object) {
                    bound.insert(name_of(&ev.object));
                }
            }
            // The watch ended (e.g. the server restarted its watch cache under the load):
            // re-list and watch again from there, as any client does.
            Ok(_) => {
                let (items, rv) = client.list("/api/v1/namespaces/default/pods").await?;
                bound.extend(items.iter().filter(|p| is_bound(p)).map(name_of));
                w = client
                    .watch(&format!(
                        "/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"
                    ))
                    .await?;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let events_at = loop {
        let (posted, dropped) = control::scheduler::event_counts();
        if posted - posted0 >= pods as u64 {
            break Some(started.elapsed().as_secs_f64());
        }
        if dropped > dropped0 || started.elapsed().as_secs_f64() > secs + 60.0 {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tracing::debug!(at = ?Instant::now(), "timed phase ends");
    sched_stop.cancel();
    let _ = sched.await;
    shutdown.cancel();
    let _ = srv.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((secs, pods as f64 / secs, cpu, events_at))
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

/// Arguments of `flotilla bench cluster`.
#[derive(clap::Args)]
pub(crate) struct BenchClusterArgs {
    /// Hollow nodes of the large clusters.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Pods of the placement run (the figure is 100,000).
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Pods of the RSS run (the figure is 10,000).
    #[arg(long, default_value_t = 10_000)]
    rss_pods: usize,
    /// Hollow nodes of the node-failure run.
    #[arg(long, default_value_t = 20)]
    failure_nodes: usize,
    /// Replicas of the node-failure run.
    #[arg(long, default_value_t = 400)]
    failure_pods: usize,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Phases to run, comma-separated: rss, failure, placement.
    #[arg(long, value_delimiter = ',', default_value = "rss,failure,placement")]
    phases: Vec<String>,
}

/// One row of the final table.
struct Row {
    what: String,
    measured: String,
    target: String,
    verdict: String,
}

/// `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "n/a".into())
}

fn progress(msg: &str) {
    eprintln!("[bench cluster] {msg}");
}

/// What the hollow agents know about one pod.
#[derive(Default, Clone)]
struct HollowPod {
    node: String,
    running: bool,
    deleting: bool,
    patched: bool,
}

/// kubemark-style hollow agents sharing one process: each node heartbeats its Lease and
/// reports its bound pods Running with a status patch. They share ONE cluster-wide pod watch
/// (1,000 per-node watches would measure the watch fan-out, not the cluster).
struct Fleet {
    /// Connections of the fleet: real kubelets each have their own; one shared HTTP/2
    /// connection would make its single TLS stream the bottleneck.
    clients: Vec<ApiClient>,
    /// Round-robin over `clients`.
    next_client: std::sync::atomic::AtomicUsize,
    alive: std::sync::Mutex<std::collections::HashSet<String>>,
    pods: std::sync::Mutex<std::collections::HashMap<String, HollowPod>>,
    /// Status writes in flight at once: as many as nodes (a kubelet's status manager writes
    /// one pod status at a time).
    patches: tokio::sync::Semaphore,
    patch_limit: usize,
    stats: FleetStats,
}

/// Counters of the hollow nodes' status writes, for the progress lines.
#[derive(Default)]
struct FleetStats {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    /// Sum of the successful writes' latencies.
    ok_micros: std::sync::atomic::AtomicU64,
}

/// Connections the hollow fleet spreads its requests over.
const FLEET_CONNECTIONS: usize = 16;

impl Fleet {
    fn client(&self) -> &ApiClient {
        let i = self
            .next_client
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.clients[i % self.clients.len()]
    }

    fn is_alive(&self, node: &str) -> bool {
        self.alive
            .lock()
            .expect("invariant: lock not poisoned")
            .contains(node)
    }

    /// Pods Running, not being deleted, on a live node.
    fn running(&self) -> (usize, usize, usize) {
        // Lock order everywhere: `pods`, then `alive`.
        let pods = self.pods.lock().expect("invariant: lock not poisoned");
        let alive = self.alive.lock().expect("invariant: lock not poisoned");
        let live = pods.values().filter(|p| !p.deleting);
        let (mut total, mut bound, mut running) = (0, 0, 0);
        for p in live {
            total += 1;
            if !p.node.is_empty() {
                bound += 1;
                if p.running && alive.contains(&p.node) {
                    running += 1;
                }
            }
        }
        (total, bound, running)
    }

    fn observe(self: &std::sync::Arc<Self>, obj: &Value, deleted: bool) {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let key = format!("{ns}/{name}");
        let mut pods = self.pods.lock().expect("invariant: lock not poisoned");
        if deleted {
            pods.remove(&key);
            return;
        }
        let e = pods.entry(key.clone()).or_default();
        e.node = obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        e.running = obj.pointer("/status/phase").and_then(Value::as_str) == Some("Running");
        e.deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
        if e.node.is_empty() || e.running || e.deleting || e.patched || !self.is_alive(&e.node) {
            return;
        }
        e.patched = true;
        let node = e.node.clone();
        let fleet = self.clone();
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
        tokio::spawn(async move {
            // A failed write is retried here: nothing else changes a bound pod, so waiting
            // for its next watch event would leave it Pending for good.
            let mut delay = Duration::from_millis(500);
            for _ in 0..20 {
                let r = {
                    let Ok(_permit) = fleet.patches.acquire().await else {
                        return;
                    };
                    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                    let patch = json!({"status": {
                        "phase": "Running", "startTime": now,
                        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                        "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0,
                            "image": "hollow.wasm", "imageID": "", "started": true,
                            "state": {"running": {"startedAt": now}}}],
                    }});
                    let t0 = Instant::now();
                    let r = fleet.client().merge_patch(&path, &patch).await;
                    let st = &fleet.stats;
                    if r.is_ok() {
                        st.ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                        st.ok_micros
                            .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        st.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    r
                };
                match r {
                    Ok(_) => return,
                    Err(e) if e.is_not_found() => break,
                    Err(e) => tracing::debug!(error = %e, %path, "hollow status patch failed"),
                }
                if !fleet.is_alive(&node) {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            // Given up: the next event for this pod tries again.
            if let Some(p) = fleet
                .pods
                .lock()
                .expect("invariant: lock not poisoned")
                .get_mut(&key)
            {
                p.patched = false;
            }
        });
    }
}

/// The watch loop of the fleet: list, then watch from the list's revision; on any break, again.
async fn fleet_watch(fleet: std::sync::Arc<Fleet>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let (items, rv) = match fleet.clients[0].list("/api/v1/pods").await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "hollow fleet list failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for p in &items {
            fleet.observe(p, false);
        }
        let Ok(mut w) = fleet.clients[0]
            .watch(&format!("/api/v1/pods?watch=true&resourceVersion={rv}"))
            .await
        else {
            continue;
        };
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = w.next() => ev,
            };
            match ev {
                Some(Ok(ev)) if ev.kind == "ADDED" || ev.kind == "MODIFIED" => {
                    fleet.observe(&ev.object, false);
                }
                Some(Ok(ev)) if ev.kind == "DELETED" => fleet.observe(&ev.object, true),
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    }
}

/// A real control plane (embedded one-member store, API server, scheduler, every controller)
/// in this process, plus a fleet of hollow nodes. As in `flotilla server`, the scheduler and
/// the controllers call the API server's router in-process; the hollow nodes use HTTPS.
struct Cluster {
    dir: std::path::PathBuf,
    url: String,
    client: ApiClient,
    fleet: std::sync::Arc<Fleet>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    store: store::NodeHandle,
}

impl Cluster {
    async fn start(
        tag: &str,
        nodes: usize,
        heartbeat: Duration,
        controllers: control::controllers::ControllerConfig,
    ) -> anyhow::Result<Cluster> {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-bench-cluster-{}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let store_node =
            control::storage::embedded::start_on(&dir.join("store"), "127.0.0.1:0", "127.0.0.1:0")
                .await
                .context("embedded store")?;
        let store = control::storage::RemoteStore::connect(&[format!(
            "http://{}",
            store_node.client_addr()
        )])
        .context("connecting to the embedded store")?;
        let server = ApiServer::new(ApiServerConfig::new(&dir), store)?;
        let mut tries = 0;
        while let Err(e) = server.bootstrap().await {
            tries += 1;
            if tries > 100 {
                return Err(e).context("bootstrap");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        control::controllers::write_node_token(&dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let pki = server.pki().context("secure mode")?.clone();
        // The scheduler and the controllers call the router in-process, as in `flotilla server`.
        let local = server.local_client(Some(&pki.admin_token));
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let s = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(listener, s).await {
                tracing::error!(error = %e, "API server failed");
            }
        });
        let url = format!("https://127.0.0.1:{}", addr.port());
        let client = ApiClient::new(&url, Some(&pki.admin_token), Some(&pki.ca_pem))?;
        let mut clients = Vec::with_capacity(FLEET_CONNECTIONS);
        for _ in 0..FLEET_CONNECTIONS {
            clients.push(ApiClient::new(
                &url,
                Some(&pki.admin_token),
                Some(&pki.ca_pem),
            )?);
        }
        let patch_limit = nodes.max(1);
        let fleet = std::sync::Arc::new(Fleet {
            clients,
            next_client: Default::default(),
            alive: Default::default(),
            pods: Default::default(),
            patches: tokio::sync::Semaphore::new(patch_limit),
            patch_limit,
            stats: FleetStats::default(),
        });
        progress(&format!("{tag}: registering {nodes} hollow nodes"));
        let names: Vec<String> = (0..nodes).map(|i| format!("hollow-{i}")).collect();
        let node_objs = names.iter().map(|n| {
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n, "labels": {"kubernetes.io/hostname": n,
                    "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
                    "annotations": {"flotilla.dev/runtime-classes": "wasm"}},
                "status": {
                    "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                    "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                },
            })
        });
        create_all(&client, "/api/v1/nodes", node_objs).await?;
        let leases = names.iter().map(|n| {
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": n, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": n, "leaseDurationSeconds": 40,
                    "renewTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}})
        });
        create_all(
            &client,
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            leases,
        )
        .await?;
        fleet
            .alive
            .lock()
            .expect("invariant: lock not poisoned")
            .extend(names.iter().cloned());
        for (i, n) in names.into_iter().enumerate() {
            let (fleet, s) = (fleet.clone(), stop.clone());
            // Spread the heartbeats over one interval, as independent kubelets would be.
            let offset = heartbeat.mul_f64(i as f64 / nodes.max(1) as f64);
            tasks.spawn(async move {
                let path =
                    format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{n}");
                tokio::time::sleep(offset).await;
                while fleet.is_alive(&n) {
                    let now =
                        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                    if let Err(e) = fleet
                        .client()
                        .merge_patch(&path, &json!({"spec": {"renewTime": now}}))
                        .await
                    {
                        tracing::debug!(error = %e, node = %n, "hollow heartbeat failed");
                    }
                    tokio::select! {
                        _ = s.cancelled() => return,
                        _ = tokio::time::sleep(heartbeat) => {}
                    }
                }
            });
        }
        tasks.spawn(fleet_watch(fleet.clone(), stop.clone()));
        let s = stop.clone();
        tasks.spawn(control::scheduler::run(
            local.clone(),
            SchedulerConfig::default(),
            s,
        ));
        let s = stop.clone();
        tasks.spawn(control::controllers::run_all(local, controllers, s));
        Ok(Cluster {
            dir,
            url,
            client,
            fleet,
            stop,
            tasks,
            store: store_node,
        })
    }

    /// Deployments totalling `pods` replicas (at most 10,000 each).
    async fn deploy(&self, prefix: &str, pods: usize, extra_spec: &Value) -> anyhow::Result<()> {
        let mut left = pods;
        let mut i = 0;
        while left > 0 {
            let n = left.min(10_000);
            left -= n;
            let name = format!("{prefix}-{i}");
            i += 1;
            let mut spec = json!({"containers": [{"name": "c", "image": "/srv/hollow.wasm",
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]});
            if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
                s.extend(extra.clone());
            }
            let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"replicas": n, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}});
            self.client
                .create("/apis/apps/v1/namespaces/default/deployments", &d)
                .await?;
        }
        Ok(())
    }

    /// Waits until `want` pods are Running on live nodes; `Err` with the count on timeout.
    /// Every 5 s prints the counts, the rates over the interval, the hollow nodes' status
    /// writes (done, failed, mean latency, in flight), RSS and the load average.
    async fn wait_running(&self, want: usize, timeout: Duration) -> Result<Duration, usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let t0 = Instant::now();
        let mut last = Instant::now();
        let st = &self.fleet.stats;
        let mut prev = (0, 0, 0, st.ok.load(Relaxed), st.failed.load(Relaxed));
        let mut prev_micros = st.ok_micros.load(Relaxed);
        loop {
            let (total, bound, running) = self.fleet.running();
            if running >= want {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                return Err(running);
            }
            if last.elapsed() >= Duration::from_secs(5) {
                let dt = last.elapsed().as_secs_f64();
                last = Instant::now();
                let (ok, failed, micros) = (
                    st.ok.load(Relaxed),
                    st.failed.load(Relaxed),
                    st.ok_micros.load(Relaxed),
                );
                let rate = |now: usize, before: usize| now.saturating_sub(before) as f64 / dt;
                let writes = ok.saturating_sub(prev.3);
                let mean_ms = if writes == 0 {
                    0.0
                } else {
                    micros.saturating_sub(prev_micros) as f64 / writes as f64 / 1000.0
                };
                let in_flight = self
                    .fleet
                    .patch_limit
                    .saturating_sub(self.fleet.patches.available_permits());
                progress(&format!(
                    "  {:>6.1} s: {total} pods (+{:.0}/s), {bound} bound (+{:.0}/s), {running}/{want} Running (+{:.0}/s); status writes +{writes} ok, +{} failed, mean {mean_ms:.0} ms, {in_flight} in flight; RSS {}; load {}",
                    t0.elapsed().as_secs_f64(),
                    rate(total, prev.0),
                    rate(bound, prev.1),
                    rate(running, prev.2),
                    failed.saturating_sub(prev.4),
                    mib(proc_kib("self", "VmRSS")),
                    loadavg(),
                ));
                prev = (total, bound, running, ok, failed);
                prev_micros = micros;
            }
            // Counting walks every pod: often enough to time the run, rarely enough to cost
            // little of the CPU the cluster is measured on (at 100,000 pods every 250 ms it
            // took ~5% of the samples of a profile).
            let poll = if want > 20_000 { 1000 } else { 250 };
            tokio::time::sleep(Duration::from_millis(poll)).await;
        }
    }

    async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.store.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the real `flotilla agent` binary against `cluster`; its VmRSS once registered and settled.
async fn agent_rss(cluster: &Cluster) -> anyhow::Result<Option<u64>> {
    let exe = std::env::current_exe()?;
    let data = cluster.dir.join("real-agent");
    std::fs::create_dir_all(&data)?;
    let mut child = tokio::process::Command::new(exe)
        .args(["agent", "--server", &cluster.url, "--name", "real-agent"])
        .arg("--token-file")
        .arg(cluster.dir.join("node-token"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--serving-port", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting flotilla agent")?;
    let pid = child.id().context("agent pid")?.to_string();
    let t0 = Instant::now();
    loop {
        if cluster
            .client
            .get("/api/v1/nodes/real-agent")
            .await?
            .is_some()
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("the agent did not register within 60 s");
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the agent exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: a couple of heartbeats and its pod watch established.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = proc_kib(&pid, "VmRSS");
    let _ = child.kill().await;
    Ok(rss)
}

fn verdict(ok: bool) -> String {
    if ok { "ok".into() } else { "MISSED".into() }
}

/// `flotilla bench cluster`: the placement, node-failure and RSS rows.
pub(crate) fn run_cluster(args: BenchClusterArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    rt.block_on(cluster_bench(args))
}

async fn cluster_bench(args: BenchClusterArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut rows = Vec::new();
    let phase = |p: &str| args.phases.iter().any(|x| x == p);
    if phase("rss") {
        let cfg = control::controllers::ControllerConfig::default();
        let c = Cluster::start("rss", args.nodes, Duration::from_secs(10), cfg).await?;
        progress(&format!(
            "rss: {} pods on {} nodes",
            args.rss_pods, args.nodes
        ));
        c.deploy("rss", args.rss_pods, &json!({})).await?;
        match c.wait_running(args.rss_pods, timeout).await {
            Ok(t) => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let rss = proc_kib("self", "VmRSS");
                rows.push(Row {
                    what: format!(
                        "control-plane RSS, {} nodes + {} pods (whole bench process)",
                        args.nodes, args.rss_pods
                    ),
                    measured: format!(
                        "{} (all Running in {:.1} s; load {})",
                        mib(rss),
                        t.as_secs_f64(),
                        loadavg()
                    ),
                    target: "(report)".into(),
                    verdict: "-".into(),
                });
            }
            Err(n) => rows.push(Row {
                what: format!(
                    "control-plane RSS, {} nodes + {} pods",
                    args.nodes, args.rss_pods
                ),
                measured: format!("only {n} Running after {} s", timeout.as_secs()),
                target: "(report)".into(),
                verdict: "DID NOT FINISH".into(),
            }),
        }
        progress("rss: starting a real `flotilla agent` process");
        let (measured, ok) = match agent_rss(&c).await {
            Ok(Some(k)) => (mib(Some(k)), k <= 30 * 1024),
            Ok(None) => ("n/a".into(), false),
            Err(e) => (format!("failed: {e:#}"), false),
        };
        rows.push(Row {
            what: "agent RSS, no pods (real `flotilla agent`, wasm runtime)".into(),
            measured,
            target: "<= 30 MiB".into(),
            verdict: verdict(ok),
        });
        c.shutdown().await;
    }
    if phase("failure") {
        let grace = Duration::from_secs(4);
        let cfg = control::controllers::ControllerConfig {
            node_monitor_period: Duration::from_secs(1),
            node_monitor_grace_period: grace,
            ..Default::default()
        };
        let c = Cluster::start("failure", args.failure_nodes, Duration::from_secs(1), cfg).await?;
        let tol = json!({"tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5},
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]});
        c.deploy("fail", args.failure_pods, &tol).await?;
        let what = format!(
            "node failure -> replacements Running (tolerationSeconds 5, grace {} s, hb 1 s)",
            grace.as_secs()
        );
        match c.wait_running(args.failure_pods, timeout).await {
            Err(n) => rows.push(Row {
                what,
                measured: format!("setup: only {n} Running"),
                target: "<= 15 s".into(),
                verdict: "DID NOT FINISH".into(),
            }),
            Ok(_) => {
                // The node with the most pods stops heartbeating (and reporting).
                let victim = {
                    let pods = c.fleet.pods.lock().expect("invariant: lock not poisoned");
                    let mut count = std::collections::HashMap::<&str, usize>::new();
                    for p in pods.values() {
                        *count.entry(p.node.as_str()).or_default() += 1;
                    }
                    count
                        .into_iter()
                        .max_by_key(|(_, n)| *n)
                        .map(|(n, k)| (n.to_string(), k))
                        .unwrap_or_default()
                };
                progress(&format!(
                    "failure: stopping {} ({} pods)",
                    victim.0, victim.1
                ));
                c.fleet
                    .alive
                    .lock()
                    .expect("invariant: lock not poisoned")
                    .remove(&victim.0);
                match c.wait_running(args.failure_pods, timeout).await {
                    Ok(t) => rows.push(Row {
                        what,
                        measured: format!("{:.2} s for {} pods", t.as_secs_f64(), victim.1),
                        target: "<= 15 s".into(),
                        verdict: verdict(t <= Duration::from_secs(15)),
                    }),
                    Err(n) => rows.push(Row {
                        what,
                        measured: format!("only {n}/{} Running", args.failure_pods),
                        target: "<= 15 s".into(),
                        verdict: "MISSED".into(),
                    }),
                }
            }
        }
        c.shutdown().await;
    }
    if phase("placement") {
        let cfg = control::controllers::ControllerConfig::default();
        let c = Cluster::start("placement", args.nodes, Duration::from_secs(10), cfg).await?;
        progress(&format!(
            "placement: {} pods on {} nodes",
            args.pods, args.nodes
        ));
        let t0 = Instant::now();
        c.deploy("big", args.pods, &json!({})).await?;
        let what = format!(
            "{} wasm pods placed + Running on {} hollow nodes",
            args.pods, args.nodes
        );
        match c.wait_running(args.pods, timeout).await {
            Ok(_) => {
                let t = t0.elapsed();
                rows.push(Row {
                    what: what.clone(),
                    measured: format!(
                        "{:.1} s ({:.0} pods/s; load {})",
                        t.as_secs_f64(),
                        args.pods as f64 / t.as_secs_f64(),
                        loadavg()
                    ),
                    target: "(report)".into(),
                    verdict: "-".into(),
                });
            }
            Err(n) => rows.push(Row {
                what: what.clone(),
                measured: format!("only {n} Running after {} s", timeout.as_secs()),
                target: "(report)".into(),
                verdict: "DID NOT FINISH".into(),
            }),
        }
        rows.push(Row {
            what: "  peak RSS of the bench process (VmHWM, all phases so far)".into(),
            measured: mib(proc_kib("self", "VmHWM")),
            target: "(report)".into(),
            verdict: "-".into(),
        });
        c.shutdown().await;
    }
    println!("| measurement | measured | target | verdict |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.what, r.measured, r.target, r.verdict
        );
    }
    Ok(())
}
