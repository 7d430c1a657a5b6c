//! Flotilla's store under fire, as a library shared by the `faults` test binary and
//! `flotilla chaos`: in-process clusters behind a controllable network and
//! storage ([`cluster`], [`net`]), a recorded client workload ([`workload`], [`history`]), a
//! linearizability checker ([`linearizability`]) and the other invariant checks ([`checks`]),
//! tied together by [`run_scenario`].
//!
//! Every scenario is seeded: the seed is printed, and `SEED=n` replays the same fault schedule
//! and workload choices (thread timing still varies).
#![warn(missing_docs)]
pub mod admin;
pub mod checks;
pub mod cluster;
pub mod history;
pub mod lease;
pub mod linearizability;
pub mod net;
pub mod workload;

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio_util::sync::CancellationToken;

use self::checks::Check;
use self::cluster::{FaultCluster, fault_tunables};
use self::history::{Operation, Recorder};
use self::lease::ClockJump;
use self::workload::{WatchLog, WorkloadConfig};

/// The seed from `SEED`, or a fresh one.
pub fn seed() -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// What a nemesis can touch while the workload runs.
pub struct Ctx {
    /// The cluster.
    pub cluster: FaultCluster,
    /// Seeded randomness for fault choices.
    pub rng: StdRng,
    /// Timestamped fault schedule (printed on failure).
    pub schedule: Vec<String>,
    /// Leader observations `(member, term, leader)`.
    pub samples: Vec<(usize, u64, Option<u64>)>,
    /// Lease clock jumps made so far (F15), for the lease check's bound.
    pub clock_jumps: Vec<ClockJump>,
    /// The workload's recorder (its clock times the jumps).
    rec: Recorder,
    start: tokio::time::Instant,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// Appends a fault event to the schedule.
    pub fn log(&mut self, what: impl Into<String>) {
        let t = self.start.elapsed().as_secs_f64();
        let what = what.into();
        tracing::info!(t, "{what}");
        self.schedule.push(format!("{t:7.2}s {what}"));
    }

    /// Records every running member's `(term, leader)` view.
    pub fn sample(&mut self) {
        for (i, m) in self.cluster.members.iter().enumerate() {
            if let Some(h) = &m.handle {
                let m = h.metrics();
                self.samples.push((i, m.term, m.leader));
            }
        }
    }

    /// Sleeps while the workload keeps running, sampling leader views every 50 ms.
    pub async fn sleep(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        loop {
            self.sample();
            let now = tokio::time::Instant::now();
            if now >= end {
                return;
            }
            tokio::time::sleep((end - now).min(Duration::from_millis(50))).await;
        }
    }

    /// Current leader index (waits up to 20 s for one).
    pub async fn leader(&self) -> anyhow::Result<usize> {
        self.cluster.wait_leader(Duration::from_secs(20)).await
    }

    /// Moves member `i`'s lease clock by `delta_ms` (F15; negative: backward). The member's
    /// Raft timers keep real time.
    pub fn jump_clock(&mut self, i: usize, delta_ms: i64) {
        let offset = &self.cluster.members[i].clock_offset_ms;
        let now = offset.fetch_add(delta_ms, std::sync::atomic::Ordering::Relaxed) + delta_ms;
        self.clock_jumps.push(ClockJump {
            at: self.rec.now(),
            member: i,
            delta_ms,
        });
        self.log(format!(
            "member {i}'s lease clock jumps {delta_ms:+} ms (offset now {now:+} ms)"
        ));
    }

    /// Cuts both directions between every member of `a` and every member of `b`.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        self.cluster.router.update(|f| {
            for x in a {
                for y in b {
                    f.cut.insert((*x, *y));
                    f.cut.insert((*y, *x));
                }
            }
        });
        self.log(format!("partition {a:?} | {b:?}"));
    }

    /// Pauses member `i` (F14, a SIGSTOP in-process): its Raft messages both ways are held
    /// and its disk stops; its timers keep running, as a paused process's would fire at once
    /// on resume.
    pub fn pause(&mut self, i: usize) {
        self.cluster.router.update(|f| {
            f.paused.insert(i);
        });
        self.cluster.members[i].disk.set_paused(true);
        self.log(format!("pause member {i}"));
    }

    /// Resumes member `i`: held messages are delivered (late), its disk writes again.
    pub fn resume(&mut self, i: usize) {
        self.cluster.router.update(|f| {
            f.paused.remove(&i);
        });
        self.cluster.members[i].disk.set_paused(false);
        self.log(format!("resume member {i}"));
    }

    /// Heals the network and the disks.
    pub fn heal(&mut self) {
        let (delivered, lost, duplicated) = self.cluster.router.counters();
        let terms: Vec<String> = self
            .cluster
            .members
            .iter()
            .map(|m| {
                m.handle.as_ref().map_or("down".to_owned(), |h| {
                    let m = h.metrics();
                    format!("term {} leader {:?}", m.term, m.leader.map(|l| l % 10_000))
                })
            })
            .collect();
        self.log(format!(
            "before heal: messages delivered {delivered}, lost {lost}, duplicated {duplicated}; members {terms:?}"
        ));
        self.cluster.router.heal();
        for m in &self.cluster.members {
            m.disk.set_delay(Duration::ZERO);
            m.disk.set_paused(false);
        }
        self.log("heal network and disks");
    }
}

/// Outcome of a scenario.
#[derive(Debug)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Fault schedule.
    pub schedule: Vec<String>,
    /// Invariant results.
    pub checks: Vec<Check>,
    /// Operations recorded.
    pub ops: usize,
    /// Where the history was written (only when an invariant broke).
    pub history_file: Option<std::path::PathBuf>,
    /// The recorded history (scenarios assert on what their nemesis provoked).
    pub history: Vec<Operation>,
    /// The lease lives the lease clients recorded.
    pub leases: Vec<lease::LeaseLife>,
    /// Wall time of the whole scenario.
    pub elapsed: Duration,
}

impl Report {
    /// Fails with the seed, schedule and every violation if an invariant broke.
    pub fn assert_ok(&self) {
        let failed: Vec<&Check> = self.checks.iter().filter(|c| c.result.is_err()).collect();
        if failed.is_empty() {
            return;
        }
        let mut msg = format!(
            "scenario {} FAILED (replay with SEED={})\nfault schedule:\n",
            self.name, self.seed
        );
        for s in &self.schedule {
            msg.push_str(&format!("  {s}\n"));
        }
        if let Some(f) = &self.history_file {
            msg.push_str(&format!("full history: {}\n", f.display()));
        }
        for c in failed {
            if let Err(e) = &c.result {
                msg.push_str(&format!("[{}] {e}\n", c.name));
            }
        }
        panic!("{msg}");
    }

    /// One line per invariant.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} seed={} ops={} time={:.1}s\n",
            self.name,
            self.seed,
            self.ops,
            self.elapsed.as_secs_f64()
        );
        for line in &self.schedule {
            s.push_str(&format!("  | {line}\n"));
        }
        for c in &self.checks {
            match &c.result {
                Ok(d) => s.push_str(&format!("  PASS {:<28} {d}\n", c.name)),
                Err(_) => s.push_str(&format!("  FAIL {}\n", c.name)),
            }
        }
        s
    }
}

/// Scenario settings.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// Members.
    pub members: usize,
    /// Workload.
    pub workload: WorkloadConfig,
    /// Watchers (spread over members).
    pub watchers: usize,
    /// Compact every this often (F17), keeping the last few revisions.
    pub compact_every: Option<Duration>,
    /// Watchers drop and resume their streams this often.
    pub watch_restart: Option<Duration>,
    /// Workload time before the nemesis starts.
    pub warmup: Duration,
    /// Workload time after the heal.
    pub cooldown: Duration,
    /// Run the members with the planted ack-before-flush bug (checker self-test).
    pub planted_bug: bool,
    /// Lease clients (grant, attach a key, keep alive, read it; I7).
    pub lease_clients: usize,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        Self {
            members: 3,
            workload: WorkloadConfig::default(),
            watchers: 2,
            compact_every: None,
            watch_restart: None,
            warmup: Duration::from_millis(700),
            cooldown: Duration::from_millis(1500),
            planted_bug: false,
            lease_clients: 1,
        }
    }
}

/// In-process scenarios running at once (`CHAOS_PARALLEL`, default 2). Not for correctness
/// (sled's shared IO pool once wedged two clusters side by side; the store now flushes on
/// Tokio's blocking pool): the bound keeps each scenario's timing (600 ms election timeouts)
/// honest on a 2-core machine whatever `--test-threads` says.
static SCENARIO_SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| {
        let n = std::env::var("CHAOS_PARALLEL")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(2);
        tokio::sync::Semaphore::new(n)
    });

/// Runs the workload, the `nemesis`, heals, and checks every invariant.
pub async fn run_scenario<F>(name: &str, cfg: ScenarioConfig, nemesis: F) -> anyhow::Result<Report>
where
    F: AsyncFnOnce(&mut Ctx) -> anyhow::Result<()>,
{
    let _slot = SCENARIO_SLOTS
        .acquire()
        .await
        .expect("invariant: the scenario semaphore is never closed");
    let started = tokio::time::Instant::now();
    let seed = seed();
    println!("scenario {name}: SEED={seed}");
    let cluster =
        FaultCluster::start_with(cfg.members, seed, fault_tunables(), cfg.planted_bug).await?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let endpoints = cluster.endpoints();
    let rec = Recorder::new();
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..cfg.workload.clients {
        tasks.spawn(workload::client(
            c as u64,
            endpoints.clone(),
            c,
            cfg.workload.clone(),
            rec.clone(),
            seed,
            stop.clone(),
        ));
    }
    let until = Arc::new(AtomicI64::new(0));
    let watch_stop = CancellationToken::new();
    let mut logs = Vec::new();
    let mut watch_tasks = tokio::task::JoinSet::new();
    for w in 0..cfg.watchers {
        let log = Arc::new(Mutex::new(WatchLog::default()));
        logs.push(log.clone());
        watch_tasks.spawn(workload::watcher(
            endpoints.clone(),
            w + 1,
            log,
            until.clone(),
            cfg.watch_restart,
            watch_stop.clone(),
        ));
    }
    if let Some(every) = cfg.compact_every {
        tasks.spawn(compactor(endpoints.clone(), every, stop.clone()));
    }
    let lease_log = Arc::new(Mutex::new(Vec::new()));
    for c in 0..cfg.lease_clients {
        tasks.spawn(lease::lease_client(
            c,
            endpoints.clone(),
            rec.clone(),
            lease_log.clone(),
            stop.clone(),
        ));
    }
    let mut ctx = Ctx {
        cluster,
        rng: StdRng::seed_from_u64(seed),
        schedule: Vec::new(),
        samples: Vec::new(),
        clock_jumps: Vec::new(),
        rec: rec.clone(),
        start: tokio::time::Instant::now(),
    };
    ctx.sleep(cfg.warmup).await;
    nemesis(&mut ctx).await?;
    ctx.heal();
    for i in 0..ctx.cluster.len() {
        if ctx.cluster.members[i].handle.is_none() && !ctx.cluster.members[i].removed {
            ctx.cluster.start_member(i).await?;
            ctx.log(format!("restart member {i} (heal)"));
        }
    }
    ctx.sleep(cfg.cooldown).await;
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    if cfg.lease_clients > 0 {
        let l = ctx.cluster.wait_leader(Duration::from_secs(20)).await?;
        let ttl = Duration::from_secs(lease::LEASE_TTL_SECS as u64);
        lease::wait_no_leases(
            &ctx.cluster.endpoints()[l],
            ttl * 3 + Duration::from_secs(5),
        )
        .await?;
    }
    ctx.cluster.wait_converged(Duration::from_secs(30)).await?;
    ctx.sample();
    let leader = ctx.cluster.wait_leader(Duration::from_secs(10)).await?;
    // A final linearizable read of every key joins the history.
    let mut kv = store::pb::etcdserverpb::kv_client::KvClient::new(workload::channel(
        &ctx.cluster.endpoints()[leader],
    )?);
    workload::final_reads(&mut kv, leader, cfg.workload.keys, &rec).await?;
    let final_rev = ctx.cluster.members[leader]
        .handle
        .as_ref()
        .map_or(0, |h| h.metrics().revision);
    until.store(final_rev, std::sync::atomic::Ordering::Relaxed);
    let watch_deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(watch_deadline);
    loop {
        tokio::select! {
            r = watch_tasks.join_next() => if r.is_none() { break },
            () = &mut watch_deadline => { watch_stop.cancel(); }
        }
    }
    let mut dumps = Vec::new();
    for i in 0..ctx.cluster.len() {
        if ctx.cluster.members[i].handle.is_some() {
            dumps.push(ctx.cluster.dump(i).await?);
        }
    }
    let history = rec.snapshot();
    let logs: Vec<WatchLog> = logs
        .iter()
        .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    let lease_log = lease_log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let checks = checks::check_all(&checks::Observed {
        history: &history,
        dumps: &dumps,
        logs: &logs,
        final_rev,
        samples: &ctx.samples,
        leases: Some(&lease_log),
        clock_jumps: &ctx.clock_jumps,
    });
    // Written for a failure only, to replay or re-check it: every test run passes all the
    // scenarios, and their files piled up in the temp dir (168 files after a few CI runs).
    let failed = checks.iter().any(|c| c.result.is_err());
    let history_file = failed
        .then(|| std::env::temp_dir().join(format!("flotilla-faults-{name}-{seed}.jsonl")))
        .and_then(|path| history::write_file(&history, &path).ok().map(|()| path));
    let report = Report {
        name: name.to_owned(),
        seed,
        schedule: ctx.schedule.clone(),
        checks,
        ops: history.len(),
        history_file,
        history,
        leases: lease_log,
        elapsed: started.elapsed(),
    };
    println!("{}", report.summary());
    ctx.cluster.shutdown().await;
    Ok(report)
}

/// Compacts to two revisions behind the head every `every` (F17).
async fn compactor(
    endpoints: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use store::pb::etcdserverpb::{CompactionRequest, RangeRequest};
    let mut i = 0usize;
    while !stop.is_cancelled() {
        tokio::time::sleep(every).await;
        i += 1;
        let Ok(ch) = workload::channel(&endpoints[i % endpoints.len()]) else {
            continue;
        };
        let mut kv = store::pb::etcdserverpb::kv_client::KvClient::new(ch);
        let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(1),
            kv.range(RangeRequest {
                key: b"x".to_vec(),
                ..Default::default()
            }),
        )
        .await
        else {
            continue;
        };
        let head = r.into_inner().header.map_or(0, |h| h.revision);
        if head > 10 {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                kv.compact(CompactionRequest {
                    revision: head - 2,
                    physical: false,
                }),
            )
            .await;
        }
    }
    Ok(())
}
