//! `flotilla bench store`: a 3-member Flotilla store and a 3-member etcd 3.4 on loopback,
//! driven by one load generator over the etcd v3 gRPC API, printed side by side.
//!
//! Also home of [`ProcCluster`], the process-level cluster (current binary's `store`
//! subcommand, or `/usr/bin/etcd`) that `flotilla chaos --spawn` reuses.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use store::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use store::pb::etcdserverpb::kv_client::KvClient;
use store::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use store::pb::etcdserverpb::request_op::Request as OpRequest;
use store::pb::etcdserverpb::watch_client::WatchClient;
use store::pb::etcdserverpb::watch_request::RequestUnion;
use store::pb::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest, WatchCreateRequest,
    WatchRequest,
};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// Which server a [`ProcCluster`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `flotilla store` (this binary).
    Flotilla,
    /// etcd 3.4 (`/usr/bin/etcd`).
    Etcd,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Flotilla => "flotilla",
            Kind::Etcd => "etcd",
        }
    }
}

/// One member process.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    pub(crate) child: Option<Child>,
    generation: u32,
    /// Fault-injection admin address (`--fault-admin`), when enabled.
    admin: Option<String>,
}

/// A cluster of member processes this command started (killed when dropped).
#[derive(Debug)]
pub(crate) struct ProcCluster {
    pub(crate) kind: Kind,
    pub(crate) members: Vec<Proc>,
    initial: String,
    log_dir: PathBuf,
}

/// A free loopback port, never the same one twice in this process, below Linux's ephemeral
/// range (32768+; the chaos harness uses 20000-31999): port 0 may hand out a port just
/// released (two members got the same one), and a member restarted after a kill must be able
/// to re-bind a port that meanwhile may be the local end of an outgoing connection.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 40 * 250;
    for _ in 0..10_000 {
        let port = 10_000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 10_000;
        let port = u16::try_from(port).expect("invariant: below 20000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in 10000-19999")
}

/// A lazily connecting channel with a request deadline.
pub(crate) fn channel(url: &str, timeout: Duration) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// `(member id, leader id, raft term, raft index)` of the member at `url`.
pub(crate) async fn status(url: &str) -> Option<(u64, u64, u64, u64)> {
    let mut m = MaintenanceClient::new(channel(url, Duration::from_secs(1)).ok()?);
    let s = m.status(StatusRequest {}).await.ok()?.into_inner();
    Some((
        s.header?.member_id,
        s.leader,
        s.raft_term,
        s.raft_applied_index,
    ))
}

/// Index of the member every reachable member agrees leads.
pub(crate) async fn agreed_leader(urls: &[String], timeout: Duration) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for u in urls {
            seen.push(status(u).await);
        }
        let up: Vec<(u64, u64, u64, u64)> = seen.iter().flatten().copied().collect();
        if let Some((_, l, _, _)) = up.first()
            && *l != 0
            && up.iter().all(|s| s.1 == *l)
            && let Some(i) = seen.iter().position(|s| s.is_some_and(|s| s.0 == *l))
        {
            return Ok(i);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("no agreed leader within {timeout:?} among {urls:?}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl ProcCluster {
    /// Starts `n` members with data dirs and logs under `dir`.
    pub(crate) async fn start(kind: Kind, n: usize, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_admin(kind, n, dir, false).await
    }

    /// Fault admin addresses of the members (empty unless started with them).
    pub(crate) fn admin_addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .filter_map(|m| m.admin.clone())
            .collect()
    }

    /// Like [`ProcCluster::start`]; `admin` also serves each Flotilla member's fault-injection
    /// endpoint (`flotilla store --fault-admin`).
    pub(crate) async fn start_with_admin(
        kind: Kind,
        n: usize,
        dir: &Path,
        admin: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Proc {
                name: format!("{}{i}", kind.label()),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                data_dir: dir.join(format!("{}{i}", kind.label())),
                child: None,
                generation: 0,
                admin: (admin && kind == Kind::Flotilla)
                    .then(|| free_port().map(|p| format!("127.0.0.1:{p}")))
                    .transpose()?,
            });
        }
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            kind,
            members,
            initial,
            log_dir: dir.to_path_buf(),
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        let urls = c.urls();
        agreed_leader(&urls, Duration::from_secs(30))
            .await
            .with_context(|| format!("{} cluster did not elect a leader", kind.label()))?;
        // The leader check ignores members that do not answer: every one must.
        for (i, u) in urls.iter().enumerate() {
            anyhow::ensure!(
                status(u).await.is_some(),
                "{} member {i} ({u}) is not serving; see its log in {}",
                kind.label(),
                c.log_dir.display()
            );
        }
        Ok(c)
    }

    /// Client URLs.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// (Re)starts member `i`'s process.
    pub(crate) fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        m.generation += 1;
        let log_path = self
            .log_dir
            .join(format!("{}-{}.log", m.name, m.generation));
        let log = std::fs::File::create(&log_path)?;
        let data = m
            .data_dir
            .to_str()
            .context("data dir is not UTF-8")?
            .to_owned();
        let mut cmd = match self.kind {
            Kind::Flotilla => {
                let mut c = Command::new(std::env::current_exe()?);
                c.args([
                    "store",
                    "--name",
                    &m.name,
                    "--data-dir",
                    &data,
                    "--listen-client-urls",
                    &m.client_url,
                    "--listen-peer-urls",
                    &m.peer_url,
                    "--initial-cluster",
                    &self.initial,
                ])
                // Write-path counters every 10 s go to the member log (profile evidence).
                .env("RUST_LOG", "warn,store::stats=debug");
                if let Some(a) = &m.admin {
                    c.args(["--fault-admin", a]);
                }
                c
            }
            Kind::Etcd => {
                let mut c = Command::new("/usr/bin/etcd");
                c.args([
                    "--name",
                    &m.name,
                    "--data-dir",
                    &data,
                    "--listen-client-urls",
                    &m.client_url,
                    "--advertise-client-urls",
                    &m.client_url,
                    "--listen-peer-urls",
                    &m.peer_url,
                    "--initial-advertise-peer-urls",
                    &m.peer_url,
                    "--initial-cluster",
                    &self.initial,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "bench",
                    "--log-level",
                    "warn",
                ]);
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {} member {}", self.kind.label(), m.name))?;
        m.child = Some(child);
        Ok(())
    }

    /// Process id of member `i`, if running.
    pub(crate) fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().and_then(Child::id)
    }

    /// `kill -9` member `i` and reaps it.
    pub(crate) async fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Sends `SIGSTOP`/`SIGCONT` (via `kill(1)`, no unsafe code) to member `i`.
    pub(crate) async fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid(i).context("member is not running")?;
        let st = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .await?;
        anyhow::ensure!(st.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    /// Kills every member.
    pub(crate) async fn shutdown(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.signal(i, "CONT").await;
            self.kill9(i).await;
        }
    }
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // rest starts at field 3 (state): utime = field 14 -> index 11.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident set size of a process in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Arguments of `flotilla bench store`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchStoreArgs {
    /// Short run (fewer operations, 20k keys for the RSS row, 2 failover rounds).
    #[arg(long)]
    quick: bool,
    /// Working directory for data dirs and member logs (default: a temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Skip etcd (Flotilla row only).
    #[arg(long)]
    no_etcd: bool,
    /// Run only these groups of shapes (comma-separated): seq, put, paced, txn, range, watch,
    /// rss, failover. Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Measure each system this many times, alternating (Flotilla, etcd, Flotilla, ...), each
    /// time on a fresh cluster, and show every row's median: the drift of a shared machine
    /// (page cache, writeback, other load) then falls on both columns alike.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: u32,
}

/// One measured figure.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    /// Higher is better (throughput) or lower (latency, CPU, RSS).
    higher_better: bool,
    unit: &'static str,
    value: f64,
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
}

/// How a closed-loop step spreads its clients, as etcd-baseline's load generator does: clients
/// round-robin over `channels` gRPC connections, connections round-robin over the endpoints
/// (leader first), split over `procs` generators that each rotate the endpoint list by their
/// index. A generator here is a thread with its own single-threaded Tokio runtime, so the
/// harness spends little CPU of the machine it measures (a shared multi-threaded runtime with a
/// connection per client took about a fifth of it at 16 clients).
#[derive(Debug, Clone, Copy)]
struct LoadShape {
    clients: usize,
    channels: usize,
    procs: usize,
}

impl LoadShape {
    /// The baseline's shapes: 16 clients on 4 channels in one generator; 64 clients on 8
    /// channels in two.
    fn for_clients(clients: usize) -> Self {
        if clients <= 16 {
            Self {
                clients,
                channels: 4,
                procs: 1,
            }
        } else {
            Self {
                clients,
                channels: 8,
                procs: 2,
            }
        }
    }
}

/// What a closed-loop step measured.
struct LoopResult {
    /// One per completed operation.
    latencies: Vec<Duration>,
    /// CPU seconds the load generator (this process) used during the step.
    generator_cpu: f64,
}

/// Operations and load-generator CPU summed over a round's closed-loop steps.
#[derive(Default)]
struct LoopTotals {
    ops: u64,
    generator_cpu: f64,
}

impl LoopTotals {
    /// Counts `r` in; returns its operation count and latencies.
    fn add(&mut self, r: LoopResult) -> (u64, Vec<Duration>) {
        let ops = r.latencies.len() as u64;
        self.ops += ops;
        self.generator_cpu += r.generator_cpu;
        (ops, r.latencies)
    }
}

/// Waits for every client task and gathers their latencies.
async fn collect_latencies(
    mut tasks: tokio::task::JoinSet<Vec<Duration>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r?);
    }
    Ok(all)
}

fn report_failures(errors: &AtomicU64) {
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        eprintln!("    ({e} failed requests)");
    }
}

/// Runs `shape.clients` closed-loop clients for `dur` against `endpoints` (leader first).
async fn closed_loop<F, Fut>(
    endpoints: &[String],
    shape: LoadShape,
    dur: Duration,
    op: F,
) -> anyhow::Result<LoopResult>
where
    F: Fn(KvClient<Channel>, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let op = Arc::new(op);
    let seq = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Every generator warms its channels, then all start together (and this thread starts
    // counting their CPU).
    let ready = Arc::new(std::sync::Barrier::new(shape.procs + 1));
    let mut generators = Vec::new();
    for p in 0..shape.procs {
        let mut rotated = endpoints.to_vec();
        rotated.rotate_left(p % endpoints.len().max(1));
        let channels = shape.channels / shape.procs;
        let clients = shape.clients / shape.procs + usize::from(p < shape.clients % shape.procs);
        let (op, seq, errors, ready) = (op.clone(), seq.clone(), errors.clone(), ready.clone());
        let generator = move || -> anyhow::Result<Vec<Duration>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let conns: Vec<Channel> = (0..channels)
                    .map(|i| channel(&rotated[i % rotated.len()], Duration::from_secs(30)))
                    .collect::<anyhow::Result<_>>()?;
                for ch in &conns {
                    let warm = KvClient::new(ch.clone())
                        .range(RangeRequest {
                            key: b"warm".to_vec(),
                            serializable: true,
                            ..Default::default()
                        })
                        .await;
                    if let Err(e) = warm {
                        ready.wait();
                        return Err(anyhow::anyhow!("warming a channel: {e}"));
                    }
                }
                ready.wait();
                let end = tokio::time::Instant::now() + dur;
                let mut tasks = tokio::task::JoinSet::new();
                for c in 0..clients {
                    let kv = KvClient::new(conns[c % conns.len()].clone());
                    let (op, seq, errors) = (op.clone(), seq.clone(), errors.clone());
                    tasks.spawn(async move {
                        let mut lat = Vec::new();
                        while tokio::time::Instant::now() < end {
                            let n = seq.fetch_add(1, Ordering::Relaxed);
                            let t = Instant::now();
                            match op(kv.clone(), n).await {
                                Ok(()) => lat.push(t.elapsed()),
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        lat
                    });
                }
                collect_latencies(tasks).await
            })
        };
        generators.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{p}"))
                .spawn(generator)?,
        );
    }
    let ready2 = ready.clone();
    tokio::task::spawn_blocking(move || ready2.wait()).await?;
    let cpu0 = cpu_seconds(std::process::id());
    let joined = tokio::task::spawn_blocking(move || {
        generators
            .into_iter()
            .map(|g| {
                g.join()
                    .map_err(|_| anyhow::anyhow!("a load generator thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let generator_cpu = cpu_seconds(std::process::id()) - cpu0;
    report_failures(&errors);
    Ok(LoopResult {
        latencies: joined.into_iter().flatten().collect(),
        generator_cpu,
    })
}

/// `clients` clients together sending `rate` puts per second on a fixed schedule for `dur`.
/// Latency counts as [`control::bench::paced_slot`] says: from the scheduled send time when a
/// client is behind schedule, so a stall is also charged to the requests queued behind it.
async fn paced(
    urls: &[String],
    clients: usize,
    rate: u64,
    dur: Duration,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let conns: Vec<Channel> = (0..urls.len() * 4)
        .map(|i| channel(&urls[i % urls.len()], Duration::from_secs(5)))
        .collect::<anyhow::Result<_>>()?;
    let interval = Duration::from_secs(clients as u64) / u32::try_from(rate.max(1))?;
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let n_each = (dur.as_secs_f64() / interval.as_secs_f64()) as u32;
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut kv = KvClient::new(conns[c % conns.len()].clone());
        let errors = errors.clone();
        let offset = interval * u32::try_from(c)? / u32::try_from(clients)?;
        tasks.spawn(async move {
            let mut lat = Vec::new();
            for i in 0..n_each {
                let from = control::bench::paced_slot(start + offset + interval * i).await;
                match kv.put(put_req(format!("paced/{c}/{i}"))).await {
                    Ok(_) => lat.push(from.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        });
    }
    let all = collect_latencies(tasks).await?;
    report_failures(&errors);
    Ok((all.len() as u64, all))
}

fn put_req(key: String) -> PutRequest {
    PutRequest {
        key: key.into_bytes(),
        value: vec![b'v'; 256],
        ..Default::default()
    }
}

/// Measures every shape against one cluster.
async fn measure(c: &mut ProcCluster, quick: bool, only: &[String]) -> anyhow::Result<Vec<Row>> {
    let run = |group: &str| only.is_empty() || only.iter().any(|g| g == group);
    let urls = c.urls();
    let label = c.kind.label();
    let dur = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, higher_better: bool, unit: &'static str, value: f64| {
        eprintln!("  {label:9} {name:38} {value:10.2} {unit}");
        rows.push(Row {
            name: name.to_owned(),
            higher_better,
            unit,
            value,
        });
    };
    let pids = |c: &ProcCluster| {
        (0..c.members.len())
            .filter_map(|i| c.pid(i))
            .collect::<Vec<_>>()
    };
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();

    // Sequential puts from one client, to the leader.
    let leader = agreed_leader(&urls, Duration::from_secs(30)).await?;
    // "All endpoints" as the baseline means it: the members round-robin, leader first.
    let mut endpoints = urls.clone();
    endpoints.rotate_left(leader);
    let mut kv = KvClient::new(channel(&urls[leader], Duration::from_secs(5))?);
    let n = if quick { 300 } else { 2000 };
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        kv.put(put_req(format!("seq/{i}"))).await?;
        lat.push(t.elapsed());
    }
    // (Always run: the range shapes read a key it writes.)
    if run("seq") {
        row(
            "sequential put, 1 client, p50",
            false,
            "ms",
            pct(&mut lat, 0.5),
        );
        row(
            "sequential put, 1 client, p99",
            false,
            "ms",
            pct(&mut lat, 0.99),
        );
    }

    let cpu0 = cpu(&pids(c));
    let mut ops_total = 0u64;
    let mut loops = LoopTotals::default();
    for clients in [16usize, 64] {
        if !run("put") {
            break;
        }
        let put_cpu0 = cpu(&pids(c));
        let shape = LoadShape::for_clients(clients);
        let r = closed_loop(&endpoints, shape, dur, move |mut kv, n| async move {
            kv.put(put_req(format!("put{clients}/{n}")))
                .await
                .map(|_| ())
        })
        .await?;
        let put_cpu = cpu(&pids(c)) - put_cpu0;
        let (ops, mut lat) = loops.add(r);
        ops_total += ops;
        row(
            &format!("put/s, {clients} clients"),
            true,
            "ops/s",
            ops as f64 / dur.as_secs_f64(),
        );
        row(
            &format!("put p99, {clients} clients"),
            false,
            "ms",
            pct(&mut lat, 0.99),
        );
        row(
            &format!("server CPU per put, {clients} clients"),
            false,
            "µs",
            put_cpu / ops.max(1) as f64 * 1e6,
        );
    }
    // Moderate paced load (an API server's write pattern): tail latency shows stalls.
    if run("paced") {
        let (ops, mut lat) = paced(&urls, 100, 500, dur * 2).await?;
        ops_total += ops;
        row(
            "paced put 500/s, 100 clients, p50",
            false,
            "ms",
            pct(&mut lat, 0.5),
        );
        row(
            "paced put 500/s, 100 clients, p99",
            false,
            "ms",
            pct(&mut lat, 0.99),
        );
        row(
            "paced put 500/s, 100 clients, max",
            false,
            "ms",
            pct(&mut lat, 1.0),
        );
    }
    if run("txn") {
        let r = closed_loop(
            &endpoints,
            LoadShape::for_clients(16),
            dur,
            |mut kv, n| async move {
                let key = format!("txn/{n}").into_bytes();
                kv.txn(TxnRequest {
                    compare: vec![Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Version as i32,
                        key: key.clone(),
                        target_union: Some(TargetUnion::Version(0)),
                        ..Default::default()
                    }],
                    success: vec![RequestOp {
                        request: Some(OpRequest::RequestPut(PutRequest {
                            key,
                            value: vec![b'v'; 256],
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                })
                .await
                .map(|_| ())
            },
        )
        .await?;
        let (ops, mut lat) = loops.add(r);
        ops_total += ops;
        row(
            "create-if-absent txn/s, 16 clients",
            true,
            "ops/s",
            ops as f64 / dur.as_secs_f64(),
        );
        row(
            "create-if-absent txn p99, 16 clients",
            false,
            "ms",
            pct(&mut lat, 0.99),
        );
    }
    for serializable in [false, true] {
        if !run("range") {
            break;
        }
        for clients in [16usize, 64] {
            let shape = LoadShape::for_clients(clients);
            let r = closed_loop(&endpoints, shape, dur, move |mut kv, _| async move {
                kv.range(RangeRequest {
                    key: b"seq/1".to_vec(),
                    serializable,
                    ..Default::default()
                })
                .await
                .map(|_| ())
            })
            .await?;
            let (ops, mut lat) = loops.add(r);
            ops_total += ops;
            let kind = if serializable {
                "serializable"
            } else {
                "linearizable"
            };
            row(
                &format!("{kind} range/s, {clients} clients"),
                true,
                "ops/s",
                ops as f64 / dur.as_secs_f64(),
            );
            row(
                &format!("{kind} range p99, {clients} clients"),
                false,
                "ms",
                pct(&mut lat, 0.99),
            );
        }
    }
    let cpu1 = cpu(&pids(c));
    if ops_total > 0 {
        row(
            "server CPU per op (puts, txns, ranges)",
            false,
            "µs",
            (cpu1 - cpu0) / ops_total.max(1) as f64 * 1e6,
        );
    }
    // The harness shares the machine: its cost is shown, not hidden (same for both systems).
    if loops.ops > 0 {
        row(
            "load generator CPU per op (closed loops)",
            false,
            "µs",
            loops.generator_cpu / loops.ops as f64 * 1e6,
        );
    }

    for watchers in [10usize, 100] {
        if !run("watch") {
            break;
        }
        let WatchRun {
            by_member,
            leader,
            mut put_latencies,
        } = watch_latency(&urls, watchers, if quick { 100 } else { 300 }).await?;
        // Where the time goes: the leader's watchers see an entry on commit, the followers'
        // only once they learn the commit index.
        let served_by = |on_leader: bool| -> Vec<Duration> {
            by_member
                .iter()
                .filter(|(m, _)| (*m == leader) == on_leader)
                .map(|(_, d)| *d)
                .collect()
        };
        let (mut on_leader, mut on_followers) = (served_by(true), served_by(false));
        eprintln!(
            "  watch delivery, {watchers} watchers: on the leader p50 {:.2} / p99 {:.2} ms; on followers p50 {:.2} / p99 {:.2} ms; the puts' own answers p50 {:.2} / p99 {:.2} ms",
            pct(&mut on_leader, 0.5),
            pct(&mut on_leader, 0.99),
            pct(&mut on_followers, 0.5),
            pct(&mut on_followers, 0.99),
            pct(&mut put_latencies, 0.5),
            pct(&mut put_latencies, 0.99),
        );
        let mut lat: Vec<Duration> = by_member.into_iter().map(|(_, d)| d).collect();
        row(
            &format!("watch delivery p50, {watchers} watchers"),
            false,
            "ms",
            pct(&mut lat, 0.5),
        );
        row(
            &format!("watch delivery p99, {watchers} watchers"),
            false,
            "ms",
            pct(&mut lat, 0.99),
        );
    }

    // RSS after loading many keys.
    if run("rss") {
        let keys: u64 = if quick { 20_000 } else { 100_000 };
        let loaded = Arc::new(AtomicU64::new(0));
        let conns: Vec<Channel> = urls
            .iter()
            .map(|u| channel(u, Duration::from_secs(10)))
            .collect::<anyhow::Result<_>>()?;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..64u64 {
            let mut kv = KvClient::new(conns[w as usize % conns.len()].clone());
            let loaded = loaded.clone();
            tasks.spawn(async move {
                loop {
                    let i = loaded.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        return Ok::<(), tonic::Status>(());
                    }
                    kv.put(put_req(format!("rss/{i:08}"))).await?;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ps = pids(c);
        let rss = ps.iter().map(|p| rss_mib(*p)).sum::<f64>() / ps.len().max(1) as f64;
        row(
            &format!("RSS per member with {}k keys", keys / 1000),
            false,
            "MiB",
            rss,
        );
    }
    if !run("failover") {
        return Ok(rows);
    }

    // Failover: kill -9 the leader, time until a write succeeds again.
    let rounds = if quick { 2 } else { 5 };
    let mut times = Vec::new();
    for _ in 0..rounds {
        let leader = agreed_leader(&urls, Duration::from_secs(30)).await?;
        let others: Vec<String> = urls
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, u)| u.clone())
            .collect();
        let clients: Vec<KvClient<Channel>> = others
            .iter()
            .map(|u| channel(u, Duration::from_millis(300)).map(KvClient::new))
            .collect::<anyhow::Result<_>>()?;
        let t = Instant::now();
        c.kill9(leader).await;
        let mut k = 0u64;
        loop {
            k += 1;
            let mut kv = clients[k as usize % clients.len()].clone();
            if kv.put(put_req(format!("failover/{k}"))).await.is_ok() {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{label}: no write succeeded within 30 s of killing the leader"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(t.elapsed());
        c.spawn(leader)?;
        // Let the restarted member rejoin and catch up before the next round.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while status(&urls[leader]).await.is_none() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{label}: restarted member did not come back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    row(
        &format!("failover after leader kill -9, median of {rounds}"),
        false,
        "ms",
        pct(&mut times, 0.5),
    );
    Ok(rows)
}

/// One writer puts its send time; `watchers` watchers (spread over members) measure delivery.
/// Returns each delivery with the member that served it, the leader, and each put's round trip.
async fn watch_latency(urls: &[String], watchers: usize, puts: usize) -> anyhow::Result<WatchRun> {
    let origin = Instant::now();
    let key = format!("watch/{watchers}").into_bytes();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Duration)>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers);
    let mut tasks = tokio::task::JoinSet::new();
    let conns: Vec<Channel> = urls
        .iter()
        .map(|u| channel(u, Duration::from_secs(3600)))
        .collect::<anyhow::Result<_>>()?;
    for w in 0..watchers {
        let member = w % conns.len();
        let mut wc = WatchClient::new(conns[member].clone());
        let key = key.clone();
        let tx = tx.clone();
        let ready = ready_tx.clone();
        tasks.spawn(async move {
            let (req_tx, req_rx) = tokio::sync::mpsc::channel(1);
            req_tx
                .send(WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key,
                        ..Default::default()
                    })),
                })
                .await?;
            let mut s = wc
                .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
                .await?
                .into_inner();
            let mut got = 0;
            while let Some(resp) = s.message().await? {
                if resp.created {
                    ready.send(()).await?;
                    continue;
                }
                for ev in resp.events {
                    let sent: u64 = ev
                        .kv
                        .and_then(|kv| String::from_utf8(kv.value).ok()?.parse().ok())
                        .unwrap_or(0);
                    let now = origin.elapsed();
                    let _ = tx.send((member, now.saturating_sub(Duration::from_nanos(sent))));
                    got += 1;
                }
                if got >= puts {
                    break;
                }
            }
            drop(req_tx);
            Ok::<(), anyhow::Error>(())
        });
    }
    drop(tx);
    for _ in 0..watchers {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await
            .context("watch creation timed out")?;
    }
    let leader = agreed_leader(urls, Duration::from_secs(10)).await?;
    let mut kv = KvClient::new(channel(&urls[leader], Duration::from_secs(5))?);
    let mut put_latencies = Vec::with_capacity(puts);
    for _ in 0..puts {
        let sent = origin.elapsed();
        kv.put(PutRequest {
            key: key.clone(),
            value: sent.as_nanos().to_string().into_bytes(),
            ..Default::default()
        })
        .await?;
        put_latencies.push(origin.elapsed().saturating_sub(sent));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let mut lat = Vec::new();
    while let Ok(d) = rx.try_recv() {
        lat.push(d);
    }
    Ok(WatchRun {
        by_member: lat,
        leader,
        put_latencies,
    })
}

/// What [`watch_latency`] saw.
struct WatchRun {
    /// Per event: the member whose watcher got it, and its delay from the put's start.
    by_member: Vec<(usize, Duration)>,
    /// Index of the leader in the URL list (the puts went there).
    leader: usize,
    /// Each put's own round trip: events that arrive much later than the answer point at the
    /// watch path rather than the commit.
    put_latencies: Vec<Duration>,
}

/// Holds a machine-wide lock for the benchmark's lifetime: two benchmarks at once on one
/// machine take each other's CPU and both print wrong numbers, so a second one waits.
pub(crate) fn exclusive_machine() -> anyhow::Result<std::fs::File> {
    let path = std::env::temp_dir().join("flotilla-bench.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the benchmark lock {}", path.display()))?;
    if f.try_lock().is_err() {
        eprintln!(
            "another benchmark is running on this machine (lock {}); waiting for it to finish",
            path.display()
        );
        f.lock()
            .with_context(|| format!("cannot take the benchmark lock {}", path.display()))?;
    }
    Ok(f)
}

/// Entry point of `flotilla bench store`.
pub(crate) fn run(args: BenchStoreArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tmp;
        let dir = match &args.dir {
            Some(d) => d.clone(),
            None => {
                tmp = tempfile::tempdir()?;
                tmp.path().to_path_buf()
            }
        };
        if !args.no_etcd && !Path::new("/usr/bin/etcd").exists() {
            anyhow::bail!("/usr/bin/etcd not found: run scripts/bench-store (installs Debian etcd-server) or pass --no-etcd");
        }
        let mut flotilla_rounds = Vec::new();
        let mut etcd_rounds = Vec::new();
        for round in 1..=args.rounds {
            flotilla_rounds.push(measure_round(Kind::Flotilla, &dir, round, &args).await?);
            if !args.no_etcd {
                etcd_rounds.push(measure_round(Kind::Etcd, &dir, round, &args).await?);
            }
        }
        let fr = median_rows(&flotilla_rounds);
        let er = (!args.no_etcd).then(|| median_rows(&etcd_rounds));
        if args.rounds > 1 {
            println!(
                "medians of {} rounds, alternating flotilla and etcd, each on a fresh cluster",
                args.rounds
            );
        }
        print_table(&fr, er.as_deref());
        Ok(())
    })
}

/// One round of one system: the page cache's dirty data written back, then a fresh 3-member
/// cluster in its own dir under `dir`, measured and stopped.
async fn measure_round(
    kind: Kind,
    dir: &Path,
    round: u32,
    args: &BenchStoreArgs,
) -> anyhow::Result<Vec<Row>> {
    let system = kind.label();
    let dir = dir.join(round_dir(system, round, args.rounds));
    let of_rounds = if args.rounds > 1 {
        format!(" (round {round} of {})", args.rounds)
    } else {
        String::new()
    };
    settle_disk().await;
    eprintln!("starting 3-member {system} in {}{of_rounds}", dir.display());
    let mut c = ProcCluster::start(kind, 3, &dir).await?;
    let rows = measure(&mut c, args.quick, &args.only).await;
    c.shutdown().await;
    rows
}

/// Writes back what is dirty in the page cache before a cluster starts, so its `fdatasync`s do
/// not wait behind writeback of earlier files: the other system's last round, or a build just
/// before the benchmark (the kernel writes a freshly linked binary back about 30 s later, and
/// that stalled every member's log sync for 160-470 ms in the first paced phase of two runs).
/// Data dirs are kept until the end: deleting them here would make the next run pay for the
/// file system's discards instead.
pub(crate) async fn settle_disk() {
    if let Err(e) = tokio::process::Command::new("sync").status().await {
        eprintln!("  (could not run sync: {e})");
    }
}

/// `flotilla` for one round, `flotilla-2` etc. when there are several.
fn round_dir(system: &str, round: u32, rounds: u32) -> String {
    if rounds == 1 {
        system.to_owned()
    } else {
        format!("{system}-{round}")
    }
}

/// Each row's median over the rounds (rows come in the same order every round), with every
/// round's value kept for the table.
fn median_rows(rounds: &[Vec<Row>]) -> Vec<(Row, Vec<f64>)> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let values: Vec<f64> = rounds
                .iter()
                .filter_map(|rs| rs.get(i))
                .map(|r| r.value)
                .collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let mid = sorted[(sorted.len() - 1) / 2];
            let median = if sorted.len().is_multiple_of(2) {
                (mid + sorted[sorted.len() / 2]) / 2.0
            } else {
                mid
            };
            (
                Row {
                    value: median,
                    ..r.clone()
                },
                values,
            )
        })
        .collect()
}

/// Issue #3's target for a row: throughputs at least 1.5x etcd's; p99s, server CPU and RSS at
/// most etcd's; failover within 1.5 s. Medians, maxima and the load generator have none.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    AtMost(f64),
}

impl Target {
    fn of(row: &Row) -> Option<Target> {
        let name = row.name.as_str();
        if row.unit == "ops/s" {
            Some(Target::RatioAtLeast(1.5))
        } else if name.starts_with("failover") {
            Some(Target::AtMost(1500.0))
        } else if name.contains("p99") || name.starts_with("server CPU") || name.starts_with("RSS")
        {
            Some(Target::RatioAtMost(1.0))
        } else {
            None
        }
    }

    fn label(self) -> String {
        match self {
            Target::RatioAtLeast(x) => format!(">={x:.1}x"),
            Target::RatioAtMost(x) => format!("<={x:.1}x"),
            Target::AtMost(v) => format!("<={v:.0}"),
        }
    }

    /// Met, missed, or unknown (a ratio target without an etcd row).
    fn met(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Target::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Target::RatioAtMost(x) => ratio.map(|r| r <= x),
            Target::AtMost(v) => Some(value <= v),
        }
    }
}

fn print_table(f: &[(Row, Vec<f64>)], e: Option<&[(Row, Vec<f64>)]>) {
    let several = f.first().is_some_and(|(_, v)| v.len() > 1);
    println!(
        "{:<42} {:>12} {:>12} {:>8}  {:<6} {:<7} {:<8} {:<6}{}",
        "shape",
        "flotilla",
        "etcd 3.4",
        "ratio",
        "unit",
        "better",
        "target",
        "",
        if several { "  ratio by round" } else { "" }
    );
    let mut missed = Vec::new();
    let mut met = 0;
    for (i, (r, f_values)) in f.iter().enumerate() {
        let e_row = e.and_then(|e| e.get(i));
        let ev = e_row.map(|(r, _)| r.value);
        let ratio = ev.map(|ev| r.value / ev);
        let target = Target::of(r);
        let verdict = target.and_then(|t| t.met(r.value, ratio));
        match verdict {
            Some(true) => met += 1,
            Some(false) => missed.push(r.name.clone()),
            None => {}
        }
        let by_round = match e_row {
            Some((_, e_values)) if several => f_values
                .iter()
                .zip(e_values)
                .map(|(f, e)| format!("{:.2}x", f / e))
                .collect::<Vec<_>>()
                .join(" "),
            _ if several => f_values
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        println!(
            "{:<42} {:>12.2} {:>12} {:>8}  {:<6} {:<7} {:<8} {:<6}{}",
            r.name,
            r.value,
            ev.map_or("-".to_owned(), |v| format!("{v:.2}")),
            ratio.map_or("-".to_owned(), |x| format!("{x:.2}x")),
            r.unit,
            if r.higher_better { "higher" } else { "lower" },
            target.map_or(String::new(), Target::label),
            match verdict {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            },
            if by_round.is_empty() {
                String::new()
            } else {
                format!("  {by_round}")
            }
        );
    }
    if missed.is_empty() {
        println!("targets: {met} met, none missed");
    } else {
        println!(
            "targets: {met} met, {} missed: {}",
            missed.len(),
            missed.join("; ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, unit: &'static str, value: f64) -> Row {
        Row {
            name: name.to_owned(),
            higher_better: unit == "ops/s",
            unit,
            value,
        }
    }

    #[test]
    fn each_row_gets_issue_3s_target() {
        let cases = [
            (
                "put/s, 16 clients",
                "ops/s",
                Some(Target::RatioAtLeast(1.5)),
            ),
            ("put p99, 16 clients", "ms", Some(Target::RatioAtMost(1.0))),
            (
                "watch delivery p99, 10 watchers",
                "ms",
                Some(Target::RatioAtMost(1.0)),
            ),
            (
                "server CPU per put, 16 clients",
                "µs",
                Some(Target::RatioAtMost(1.0)),
            ),
            (
                "RSS per member with 100k keys",
                "MiB",
                Some(Target::RatioAtMost(1.0)),
            ),
            (
                "failover after leader kill -9, median of 5",
                "ms",
                Some(Target::AtMost(1500.0)),
            ),
            ("sequential put, 1 client, p50", "ms", None),
            ("paced put 500/s, 100 clients, max", "ms", None),
            ("load generator CPU per op (closed loops)", "µs", None),
        ];
        for (name, unit, want) in cases {
            assert_eq!(Target::of(&row(name, unit, 1.0)), want, "{name}");
        }
    }

    #[test]
    fn verdicts_compare_the_ratio_or_the_value() {
        let at_least = Target::RatioAtLeast(1.5);
        assert_eq!(at_least.met(0.0, Some(1.5)), Some(true));
        assert_eq!(at_least.met(0.0, Some(1.49)), Some(false));
        assert_eq!(at_least.met(0.0, None), None, "no etcd row, no verdict");
        let at_most = Target::RatioAtMost(1.0);
        assert_eq!(at_most.met(0.0, Some(1.07)), Some(false));
        assert_eq!(at_most.met(0.0, Some(0.93)), Some(true));
        let failover = Target::AtMost(1500.0);
        assert_eq!(failover.met(1109.0, None), Some(true));
        assert_eq!(failover.met(1600.0, Some(0.9)), Some(false));
    }
}
