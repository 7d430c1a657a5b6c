//! `flotilla chaos`: the fault suite's workload, nemesis and checkers against a live cluster.
//!
//! Against `--endpoints` it runs the recorded workload; with `--fault-admin` (the members'
//! admin endpoints, started with `flotilla store --fault-admin ADDR`) it also partitions,
//! delays, drops and duplicates messages, slows disks and jumps lease clocks between phases. With `--spawn N
//! --data-dir D` it starts N `flotilla store` processes (admin endpoints on) and also kills
//! (-9), stops (SIGSTOP), continues and restarts them.
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chaos::checks::{self, KvRow};
use chaos::history::{self, Recorder};
use chaos::workload::{self, WatchLog, WorkloadConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use store::pb::etcdserverpb::RangeRequest;
use store::pb::etcdserverpb::kv_client::KvClient;
use tokio_util::sync::CancellationToken;

use crate::cmd_bench_store::{Kind, ProcCluster, channel, status};

/// Arguments of `flotilla chaos`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Client URLs of a running cluster, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "spawn")]
    endpoints: Vec<String>,
    /// Start this many `flotilla store` processes (and inject process faults into them).
    #[arg(long)]
    spawn: Option<usize>,
    /// Data and log directory for `--spawn`.
    #[arg(long, requires = "spawn")]
    data_dir: Option<PathBuf>,
    /// Fault-injection admin endpoints (`host:port`) of the `--endpoints` members, in the same
    /// order, comma-separated. Enables network and disk faults against a cluster this command
    /// did not start.
    #[arg(long, value_delimiter = ',', requires = "endpoints")]
    fault_admin: Vec<String>,
    /// Nemesis rounds (with `--spawn`), or workload phases of 3 s against `--endpoints`.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Where to write the history (JSON lines).
    #[arg(long, default_value = "chaos-history.jsonl")]
    history: PathBuf,
    /// Seed of the nemesis and workload choices (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
}

/// Entry point.
pub(crate) fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(chaos(args))
}

async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    println!("chaos: seed {seed}");
    let mut procs = match args.spawn {
        Some(n) => {
            anyhow::ensure!(n >= 1, "--spawn needs at least one member");
            let dir = args.data_dir.clone().context("--spawn needs --data-dir")?;
            println!(
                "phase: start {n} flotilla store processes in {}",
                dir.display()
            );
            Some(ProcCluster::start_with_admin(Kind::Flotilla, n, &dir, true).await?)
        }
        None => None,
    };
    let admins: Vec<String> = match &procs {
        Some(p) => p.admin_addrs(),
        None => args.fault_admin.clone(),
    };
    let endpoints = match &procs {
        Some(p) => p.urls(),
        None => {
            anyhow::ensure!(
                !args.endpoints.is_empty(),
                "give --endpoints URL[,URL...] of a running cluster, or --spawn N --data-dir D"
            );
            args.endpoints.clone()
        }
    };
    // Reachability first: clear errors instead of a history full of failures.
    let mut unreachable = Vec::new();
    for u in &endpoints {
        if status(u).await.is_none() {
            unreachable.push(u.clone());
        }
    }
    anyhow::ensure!(
        unreachable.len() < endpoints.len(),
        "cannot reach the cluster: no member answered Status at {}",
        endpoints.join(", ")
    );
    if !unreachable.is_empty() {
        println!("warning: not reachable now: {}", unreachable.join(", "));
    }
    let net = if admins.is_empty() {
        None
    } else {
        anyhow::ensure!(
            admins.len() == endpoints.len(),
            "--fault-admin needs one address per endpoint ({} given for {} endpoints)",
            admins.len(),
            endpoints.len()
        );
        Some(NetNemesis::connect(&endpoints, &admins).await?)
    };

    let rec = Recorder::new();
    let stop = CancellationToken::new();
    let cfg = WorkloadConfig {
        clients: args.clients,
        ..WorkloadConfig::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..cfg.clients {
        tasks.spawn(workload::client(
            c as u64,
            endpoints.clone(),
            c,
            cfg.clone(),
            rec.clone(),
            seed,
            stop.clone(),
        ));
    }
    let until = Arc::new(AtomicI64::new(0));
    let watch_stop = CancellationToken::new();
    let logs: Vec<Arc<Mutex<WatchLog>>> = (0..2).map(|_| Arc::default()).collect();
    let mut watchers = tokio::task::JoinSet::new();
    for (w, log) in logs.iter().enumerate() {
        watchers.spawn(workload::watcher(
            endpoints.clone(),
            w + 1,
            log.clone(),
            until.clone(),
            None,
            watch_stop.clone(),
        ));
    }
    let samples = Arc::new(Mutex::new(Vec::<(usize, u64, Option<u64>)>::new()));
    let sampler = {
        let samples = samples.clone();
        let endpoints = endpoints.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                for (i, u) in endpoints.iter().enumerate() {
                    if let Some((_, leader, term, _)) = status(u).await {
                        samples.lock().unwrap_or_else(|p| p.into_inner()).push((
                            i,
                            term,
                            (leader != 0).then_some(leader),
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let progress = |phase: &str, rec: &Recorder| {
        let ops = rec.snapshot();
        let failed = ops
            .iter()
            .filter(|o| matches!(o.output, history::Output::Unknown { .. }))
            .count();
        println!(
            "phase: {phase:<40} ops so far {:>6} (failed/unknown {failed})",
            ops.len()
        );
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    progress("warm-up", &rec);
    for round in 0..args.rounds {
        // With admin endpoints, every other round (every round without --spawn) is a network
        // or disk fault.
        if let Some(net) = &net
            && (procs.is_none() || round % 2 == 1)
        {
            let leader = crate::cmd_bench_store::agreed_leader(&endpoints, Duration::from_secs(30))
                .await
                .ok();
            let what = net.round(&mut rng, leader).await?;
            progress(&what, &rec);
            continue;
        }
        let Some(p) = procs.as_mut() else {
            tokio::time::sleep(Duration::from_secs(3)).await;
            progress(&format!("workload round {round} (no nemesis)"), &rec);
            continue;
        };
        let n = p.members.len();
        let urls = p.urls();
        let leader = crate::cmd_bench_store::agreed_leader(&urls, Duration::from_secs(30))
            .await
            .ok();
        let victim = match (rng.random_range(0..2), leader) {
            (0, Some(l)) => l,
            _ => rng.random_range(0..n),
        };
        let role = if Some(victim) == leader {
            "leader"
        } else {
            "member"
        };
        match rng.random_range(0..3) {
            0 => {
                p.kill9(victim).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                p.spawn(victim)?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                progress(&format!("kill -9 {role} {victim}, restart"), &rec);
            }
            1 => {
                p.signal(victim, "STOP").await?;
                tokio::time::sleep(Duration::from_secs(3)).await;
                p.signal(victim, "CONT").await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                progress(&format!("SIGSTOP {role} {victim} 3 s, SIGCONT"), &rec);
            }
            _ => {
                for i in 0..n {
                    p.kill9(i).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                for i in 0..n {
                    p.spawn(i)?;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                progress("kill -9 all members, restart all", &rec);
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let _ = sampler.await;
    progress("workload stopped", &rec);

    // Convergence: every member at the same applied index, then the same contents.
    let leader = crate::cmd_bench_store::agreed_leader(&endpoints, Duration::from_secs(30))
        .await
        .context("the cluster has no agreed leader after the faults")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut applied = Vec::new();
        for u in &endpoints {
            applied.push(status(u).await.map(|s| s.3));
        }
        if applied.iter().all(|a| a.is_some() && *a == applied[0]) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            println!("warning: members did not reach the same applied index: {applied:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut kv = KvClient::new(channel(&endpoints[leader], Duration::from_secs(5))?);
    workload::final_reads(&mut kv, leader, cfg.keys, &rec).await?;
    let final_rev = kv
        .range(RangeRequest {
            key: b"x".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .header
        .map_or(0, |h| h.revision);
    until.store(final_rev, std::sync::atomic::Ordering::Relaxed);
    if tokio::time::timeout(Duration::from_secs(20), async {
        while watchers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        watch_stop.cancel();
        while watchers.join_next().await.is_some() {}
    }
    let mut dumps: Vec<Vec<KvRow>> = Vec::new();
    for u in &endpoints {
        dumps.push(dump(u).await?);
    }
    let history = rec.snapshot();
    history::write_file(&history, &args.history)
        .with_context(|| format!("write {}", args.history.display()))?;
    let logs: Vec<WatchLog> = logs
        .iter()
        .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    // Only our keys take part: a user's cluster may hold others.
    let ours = |d: &Vec<KvRow>| -> Vec<KvRow> {
        d.iter()
            .filter(|r| r.0.starts_with(workload::PREFIX))
            .cloned()
            .collect()
    };
    let dumps: Vec<Vec<KvRow>> = dumps.iter().map(ours).collect();
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let results = checks::check_all(&checks::Observed {
        history: &history,
        dumps: &dumps,
        logs: &logs,
        final_rev,
        samples: &samples,
        leases: None,
        clock_jumps: &[],
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{:<30} {:<7} detail", "invariant", "verdict")?;
    let mut failed = 0;
    for c in &results {
        match &c.result {
            Ok(d) => writeln!(out, "{:<30} {:<7} {d}", c.name, "PASS")?,
            Err(e) => {
                failed += 1;
                let first = e.lines().next().unwrap_or_default();
                writeln!(out, "{:<30} {:<7} {first}", c.name, "FAIL")?;
                for l in e.lines().skip(1).take(20) {
                    writeln!(out, "{:<38} {l}", "")?;
                }
            }
        }
    }
    writeln!(
        out,
        "history: {} operations written to {} (seed {seed})",
        history.len(),
        args.history.display()
    )?;
    drop(out);
    if let Some(p) = procs.as_mut() {
        p.shutdown().await;
    }
    anyhow::ensure!(failed == 0, "{failed} invariant(s) violated");
    Ok(())
}

/// Every key of the member at `url`, read serializably.
async fn dump(url: &str) -> anyhow::Result<Vec<KvRow>> {
    let mut kv = KvClient::new(channel(url, Duration::from_secs(5))?);
    let r = kv
        .range(RangeRequest {
            key: workload::PREFIX.as_bytes().to_vec(),
            range_end: workload::prefix_end(workload::PREFIX),
            serializable: true,
            ..Default::default()
        })
        .await
        .with_context(|| format!("dump {url}"))?
        .into_inner();
    Ok(r.kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.mod_revision,
                kv.create_revision,
                kv.version,
            )
        })
        .collect())
}

/// Network and disk faults through the members' admin endpoints.
struct NetNemesis {
    /// Admin address and member id (hex) per endpoint.
    members: Vec<(String, String)>,
}

impl NetNemesis {
    async fn connect(endpoints: &[String], admins: &[String]) -> anyhow::Result<Self> {
        let mut members = Vec::new();
        for (url, admin) in endpoints.iter().zip(admins) {
            let (id, ..) = status(url).await.with_context(|| {
                format!("{url}: no Status answer (needed to learn its member id)")
            })?;
            chaos::admin::request(admin, "DELETE", None)
                .await
                .with_context(|| format!("fault admin of {url}"))?;
            members.push((admin.clone(), format!("{id:x}")));
        }
        Ok(Self { members })
    }

    async fn set(&self, i: usize, spec: &chaos::admin::FaultSpec) -> anyhow::Result<()> {
        chaos::admin::request(&self.members[i].0, "PUT", Some(spec))
            .await
            .map(|_| ())
    }

    async fn heal(&self) -> anyhow::Result<()> {
        for (admin, _) in &self.members {
            chaos::admin::request(admin, "DELETE", None).await?;
        }
        Ok(())
    }

    /// One fault for 3 s, then heal and 2 s of recovery; returns the phase description.
    async fn round(&self, rng: &mut StdRng, leader: Option<usize>) -> anyhow::Result<String> {
        use chaos::admin::FaultSpec;
        let n = self.members.len();
        let victim = leader
            .filter(|_| rng.random_bool(0.5))
            .unwrap_or_else(|| rng.random_range(0..n));
        let role = if Some(victim) == leader {
            "leader"
        } else {
            "member"
        };
        let id = |i: usize| self.members[i].1.clone();
        let others: Vec<usize> = (0..n).filter(|i| *i != victim).collect();
        let what = match rng.random_range(0..6) {
            0 => {
                self.set(
                    victim,
                    &FaultSpec {
                        cut_to: others.iter().map(|o| id(*o)).collect(),
                        cut_from: others.iter().map(|o| id(*o)).collect(),
                        ..FaultSpec::default()
                    },
                )
                .await?;
                for o in &others {
                    self.set(
                        *o,
                        &FaultSpec {
                            cut_to: vec![id(victim)],
                            cut_from: vec![id(victim)],
                            ..FaultSpec::default()
                        },
                    )
                    .await?;
                }
                format!("isolate {role} {victim} 3 s")
            }
            1 => {
                // Nothing reaches the victim; its own messages still go out.
                self.set(
                    victim,
                    &FaultSpec {
                        cut_from: others.iter().map(|o| id(*o)).collect(),
                        ..FaultSpec::default()
                    },
                )
                .await?;
                for o in &others {
                    self.set(
                        *o,
                        &FaultSpec {
                            cut_to: vec![id(victim)],
                            ..FaultSpec::default()
                        },
                    )
                    .await?;
                }
                format!("one-way cut into {role} {victim} 3 s")
            }
            2 => {
                for i in 0..n {
                    self.set(
                        i,
                        &FaultSpec {
                            delay_ms: Some((25, 125)),
                            duplicate: 0.2,
                            ..FaultSpec::default()
                        },
                    )
                    .await?;
                }
                "delay 25-125 ms + duplicate 20% everywhere 3 s".to_owned()
            }
            3 => {
                for i in 0..n {
                    self.set(
                        i,
                        &FaultSpec {
                            drop: 0.3,
                            ..FaultSpec::default()
                        },
                    )
                    .await?;
                }
                "drop 30% of Raft messages 3 s".to_owned()
            }
            4 => {
                self.set(
                    victim,
                    &FaultSpec {
                        disk_delay_ms: 100,
                        ..FaultSpec::default()
                    },
                )
                .await?;
                format!("slow disk (+100 ms per append) on {role} {victim} 3 s")
            }
            _ => {
                // F15: lease TTLs are counted on the leader's clock; Raft itself is clock-free.
                let jump_ms = if rng.random_bool(0.5) { 2000 } else { -2000 };
                self.set(
                    victim,
                    &FaultSpec {
                        clock_offset_ms: jump_ms,
                        ..FaultSpec::default()
                    },
                )
                .await?;
                format!("lease clock of {role} {victim} jumps {jump_ms:+} ms for 3 s (and back)")
            }
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.heal().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(format!("{what}, heal"))
    }
}
