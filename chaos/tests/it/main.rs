//! Fault-injection suite for the store: seeded in-process 3- and 5-member clusters behind a
//! controllable network and storage, a recorded concurrent workload (KV and leases), and the
//! invariant checks of etcd-semantics §12 after every scenario. `SEED=n` replays a
//! scenario's choices; `CHAOS_PARALLEL=n` sets how many scenarios run at once (default 2).
//!
//! The helpers below are the steps scenarios share; each scenario file reads as its fault
//! schedule.
mod crash;
mod scenarios;

use std::time::Duration;

use chaos::{Ctx, Report, ScenarioConfig, run_scenario};
use store::CrashPoint;

/// Runs a scenario and fails the test on any violation or when the workload barely ran.
async fn run(
    name: &str,
    cfg: ScenarioConfig,
    nemesis: impl AsyncFnOnce(&mut Ctx) -> anyhow::Result<()>,
) -> Report {
    let report = run_scenario(name, cfg, nemesis)
        .await
        .unwrap_or_else(|e| panic!("scenario {name}: {e:#}"));
    assert!(
        report.ops > 50,
        "{name}: workload made too little progress ({} ops)",
        report.ops
    );
    report.assert_ok();
    report
}

/// Every member index of an `n`-member cluster but `i`.
fn others(n: usize, i: usize) -> Vec<usize> {
    (0..n).filter(|j| *j != i).collect()
}

/// A workload busy enough for a leader to snapshot and purge its log within seconds.
fn busy() -> ScenarioConfig {
    let mut cfg = ScenarioConfig::default();
    cfg.workload.clients = 6;
    cfg.workload.think = Duration::from_millis(3);
    cfg
}

fn metric(ctx: &Ctx, i: usize, f: impl Fn(&store::NodeMetrics) -> u64) -> u64 {
    ctx.cluster.members[i]
        .handle
        .as_ref()
        .map_or(0, |h| f(&h.metrics()))
}

/// Waits (follower `f` partitioned by the caller) up to 40 s for the leader to purge its log
/// past `behind`, the follower's last applied index.
async fn wait_purged_past(ctx: &mut Ctx, f: usize, behind: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        ctx.sleep(Duration::from_millis(200)).await;
        let purged = ctx
            .cluster
            .members
            .iter()
            .filter_map(|m| m.handle.as_ref())
            .map(|h| h.metrics())
            .filter(|m| m.leader == Some(m.id))
            .map(|m| m.purged)
            .max()
            .unwrap_or(0);
        if purged > behind {
            ctx.log(format!(
                "leader purged its log to {purged}, past follower {f} at {behind}"
            ));
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "leader never purged past the isolated follower {f} within 40 s"
        );
    }
}

/// Waits up to 30 s for member `f` to hold a snapshot past index `past`.
async fn wait_snapshot_past(ctx: &mut Ctx, f: usize, past: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        ctx.sleep(Duration::from_millis(200)).await;
        let snap = metric(ctx, f, |m| m.snapshot);
        if snap > past {
            ctx.log(format!("follower {f} has snapshot {snap}"));
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "follower {f} has no snapshot past {past} within 30 s"
        );
    }
}

/// Crashes member `i` at `point` (within `within`), keeps it down for `down`, restarts it
/// from the image.
async fn crash_and_restart(
    ctx: &mut Ctx,
    i: usize,
    point: CrashPoint,
    within: Duration,
    down: Duration,
) -> anyhow::Result<()> {
    ctx.cluster.members[i].crash.arm(point);
    restart_after_crash(ctx, i, point, within, down).await
}

/// Waits (up to `within`) for member `i` to die at the `point` it was armed for, keeps it
/// down for `down`, restarts it from the image.
async fn restart_after_crash(
    ctx: &mut Ctx,
    i: usize,
    point: CrashPoint,
    within: Duration,
    down: Duration,
) -> anyhow::Result<()> {
    let hit = ctx.cluster.await_crash(i, within).await?;
    anyhow::ensure!(hit, "member {i} never reached {point:?} within {within:?}");
    ctx.log(format!("member {i} crashed at {point:?}"));
    ctx.sleep(down).await;
    ctx.cluster.start_member(i).await?;
    ctx.log(format!("member {i} restarted from its crash image"));
    Ok(())
}

/// A power cut of the whole cluster: every member crashes at once and restarts from its
/// image; returns once a leader is agreed.
async fn power_cut(ctx: &mut Ctx) -> anyhow::Result<usize> {
    power_cut_with(ctx, |_, _| Ok(())).await.map(|(l, _)| l)
}

/// [`power_cut`], calling `at_crash(member, data_dir)` as each member dies; returns the leader
/// and how many written but unsynced log bytes the crash images lost.
async fn power_cut_with(
    ctx: &mut Ctx,
    at_crash: impl FnMut(usize, &std::path::Path) -> std::io::Result<()>,
) -> anyhow::Result<(usize, u64)> {
    let dropped = ctx.cluster.crash_all_with(at_crash).await?;
    ctx.log(format!(
        "power cut: every member crashed ({dropped} written but unsynced log bytes lost)"
    ));
    ctx.heal();
    for i in 0..ctx.cluster.len() {
        ctx.cluster.start_member(i).await?;
    }
    ctx.log("every member restarted from its crash image");
    Ok((ctx.leader().await?, dropped))
}
