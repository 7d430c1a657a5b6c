//! Fault matrix scenarios (etcd-semantics §13) that fit in-process. Each runs the recorded
//! workload against a 3-member cluster, applies its faults, heals, and checks linearizability,
//! lost writes, revisions, watches, leaders per term and convergence.
use std::time::Duration;

use chaos::lease::LeaseStep;
use chaos::net::NetFaults;
use chaos::{Ctx, ScenarioConfig};

use super::{busy, metric, others, run, wait_purged_past, wait_snapshot_past};
use rand::Rng;
use store::pb::etcdserverpb::kv_client::KvClient;
use store::pb::etcdserverpb::watch_client::WatchClient;
use store::pb::etcdserverpb::watch_request::RequestUnion;
use store::pb::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};

/// F1: isolate the leader for 3 s (several election timeouts), then heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_leader_partition() {
    run(
        "f1_leader_partition",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            let l = ctx.leader().await?;
            let n = ctx.cluster.len();
            ctx.partition(&[l], &others(n, l));
            ctx.sleep(Duration::from_millis(3000)).await;
            ctx.heal();
            ctx.sleep(Duration::from_millis(500)).await;
            Ok(())
        },
    )
    .await;
}

/// F2: one-way partition: the leader's messages still reach the followers, nothing comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_one_way_partition() {
    run(
        "f2_one_way_partition",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            let l = ctx.leader().await?;
            let n = ctx.cluster.len();
            ctx.cluster.router.update(|f| {
                for o in others(n, l) {
                    f.cut.insert((o, l));
                }
            });
            ctx.log(format!("one-way cut: nothing reaches leader {l}"));
            ctx.sleep(Duration::from_millis(3000)).await;
            Ok(())
        },
    )
    .await;
}

/// F3: isolate a follower until the leader snapshots and purges past it, then heal (the
/// follower must catch up by snapshot install).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_partition_until_snapshot() {
    run(
        "f3_partition_until_snapshot",
        busy(),
        async |ctx: &mut Ctx| {
            let l = ctx.leader().await?;
            let n = ctx.cluster.len();
            let f = (l + 1) % n;
            ctx.partition(&[f], &others(n, f));
            let follower_applied = metric(ctx, f, |m| m.last_applied);
            wait_purged_past(ctx, f, follower_applied).await?;
            ctx.heal();
            // The follower must have installed a snapshot to catch up.
            wait_snapshot_past(ctx, f, follower_applied).await
        },
    )
    .await;
}

/// F4: stop a follower under load, restart it from its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_restart_follower() {
    run(
        "f4_restart_follower",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            let l = ctx.leader().await?;
            let f = (l + 1) % ctx.cluster.len();
            ctx.cluster.stop_member(f).await;
            ctx.log(format!("stop follower {f}"));
            ctx.sleep(Duration::from_millis(1500)).await;
            ctx.cluster.start_member(f).await?;
            ctx.log(format!("restart follower {f}"));
            ctx.sleep(Duration::from_millis(1000)).await;
            Ok(())
        },
    )
    .await;
}

/// F5: stop the leader under load, restart it after a new leader took over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_restart_leader() {
    run(
        "f5_restart_leader",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            let l = ctx.leader().await?;
            ctx.cluster.stop_member(l).await;
            ctx.log(format!("stop leader {l}"));
            let new = ctx.leader().await?;
            ctx.log(format!("new leader {new}"));
            ctx.sleep(Duration::from_millis(1000)).await;
            ctx.cluster.start_member(l).await?;
            ctx.log(format!("restart old leader {l}"));
            ctx.sleep(Duration::from_millis(1000)).await;
            Ok(())
        },
    )
    .await;
}

/// F6: stop every member under load, restart all from their data dirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_restart_all() {
    run(
        "f6_restart_all",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            for i in 0..ctx.cluster.len() {
                ctx.cluster.stop_member(i).await;
            }
            ctx.log("stop all members");
            ctx.sleep(Duration::from_millis(500)).await;
            for i in 0..ctx.cluster.len() {
                ctx.cluster.start_member(i).await?;
            }
            ctx.log("restart all members");
            let l = ctx.leader().await?;
            ctx.log(format!("leader {l}"));
            ctx.sleep(Duration::from_millis(1000)).await;
            Ok(())
        },
    )
    .await;
}

/// F10: slow disks: +40 ms per append everywhere, then +150 ms on the leader only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f10_slow_disk() {
    run(
        "f10_slow_disk",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            for m in &ctx.cluster.members {
                m.disk.set_delay(Duration::from_millis(40));
            }
            ctx.log("all disks +40 ms per append");
            ctx.sleep(Duration::from_millis(1500)).await;
            let l = ctx.leader().await?;
            for m in &ctx.cluster.members {
                m.disk.set_delay(Duration::ZERO);
            }
            ctx.cluster.members[l]
                .disk
                .set_delay(Duration::from_millis(150));
            ctx.log(format!("leader {l} disk +150 ms per append"));
            ctx.sleep(Duration::from_millis(1500)).await;
            Ok(())
        },
    )
    .await;
}

/// F11: half of all Raft messages delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_duplication() {
    run(
        "f11_duplication",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            ctx.cluster.router.set(NetFaults {
                duplicate: 0.5,
                ..NetFaults::default()
            });
            ctx.log("duplicate 50% of messages");
            ctx.sleep(Duration::from_millis(3000)).await;
            Ok(())
        },
    )
    .await;
}

/// F12: 25–125 ms random delay per message (reorders them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f12_delay_reorder() {
    run(
        "f12_delay_reorder",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            ctx.cluster.router.set(NetFaults {
                delay: Some((Duration::from_millis(25), Duration::from_millis(125))),
                ..NetFaults::default()
            });
            ctx.log("delay 25-125 ms per message");
            ctx.sleep(Duration::from_millis(3000)).await;
            Ok(())
        },
    )
    .await;
}

/// F13: 50% of messages lost for 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f13_drop_half() {
    run(
        "f13_drop_half",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            ctx.cluster.router.set(NetFaults {
                drop: 0.5,
                ..NetFaults::default()
            });
            ctx.log("drop 50% of messages");
            ctx.sleep(Duration::from_millis(2000)).await;
            Ok(())
        },
    )
    .await;
}

/// F17: compaction every 150 ms racing watchers (which must resume from the compaction point)
/// while the leader is isolated once, so watchers also move between members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f17_compaction_racing_watches() {
    let cfg = ScenarioConfig {
        watchers: 3,
        compact_every: Some(Duration::from_millis(150)),
        watch_restart: Some(Duration::from_millis(300)),
        ..ScenarioConfig::default()
    };
    run(
        "f17_compaction_racing_watches",
        cfg,
        async |ctx: &mut Ctx| {
            ctx.sleep(Duration::from_millis(1000)).await;
            compacted_revision_is_refused(ctx).await?;
            let l = ctx.leader().await?;
            let n = ctx.cluster.len();
            ctx.partition(&[l], &others(n, l));
            ctx.sleep(Duration::from_millis(2500)).await;
            Ok(())
        },
    )
    .await;
}

/// F16: membership churn under load: add a fourth member (learner, promoted once caught up),
/// then remove the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_membership_churn() {
    run(
        "f16_membership_churn",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            let l = ctx.leader().await?;
            let new = ctx.cluster.add_member(l).await?;
            ctx.log(format!("member add: member {new}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                ctx.sleep(Duration::from_millis(200)).await;
                let l = ctx.leader().await?;
                let voters = ctx.cluster.members[l]
                    .handle
                    .as_ref()
                    .map_or(0, |h| h.metrics().voters.len());
                if voters == 4 {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "member {new} not promoted to voter within 30 s"
                );
            }
            ctx.log(format!("member {new} is a voter"));
            let l = ctx.leader().await?;
            let via = (0..ctx.cluster.len())
                .find(|i| *i != l && ctx.cluster.members[*i].handle.is_some())
                .ok_or_else(|| anyhow::anyhow!("no other running member"))?;
            ctx.cluster.remove_member(l, via).await?;
            ctx.log(format!("member remove: leader {l}"));
            let l2 = ctx.leader().await?;
            ctx.log(format!("new leader {l2}"));
            ctx.sleep(Duration::from_millis(1000)).await;
            Ok(())
        },
    )
    .await;
}

/// A Range and a Watch at revision 2 (long compacted by now) fail with etcd's ErrCompacted
/// semantics: an error for the Range, a canceled watch carrying `compact_revision`.
async fn compacted_revision_is_refused(ctx: &mut Ctx) -> anyhow::Result<()> {
    let url = ctx.cluster.endpoints()[ctx.leader().await?].clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    let err = kv
        .range(RangeRequest {
            key: b"fk/0".to_vec(),
            revision: 2,
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("range at a compacted revision succeeded"))?;
    anyhow::ensure!(
        err.message().contains("compacted"),
        "range at a compacted revision: {err}"
    );
    let mut wc = WatchClient::connect(url).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"fk/".to_vec(),
            range_end: b"fk0".to_vec(),
            start_revision: 2,
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = wc
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let resp = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch stream ended"))?;
        if r.compact_revision > 0 || !r.events.is_empty() {
            break r;
        }
    };
    anyhow::ensure!(
        resp.compact_revision > 2 && resp.canceled && resp.events.is_empty(),
        "watch from a compacted revision: compact_revision {} canceled {} events {}",
        resp.compact_revision,
        resp.canceled,
        resp.events.len()
    );
    ctx.log(format!(
        "range and watch at revision 2 refused: compacted at {}",
        resp.compact_revision
    ));
    Ok(())
}

/// F14: the leader is paused (its Raft messages both ways held, its disk stopped) for 2.5 s,
/// four election timeouts, and then resumes with the held messages delivered late. While it
/// sleeps, a write is acknowledged by the new leader and a linearizable read of that key is
/// sent to the paused one: whenever that read answers, it must see the write (no stale read
/// from a deposed leader, etcd#20418); the workload's writes and reads on it are checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f14_pause_leader() {
    run(
        "f14_pause_leader",
        ScenarioConfig::default(),
        async |ctx: &mut Ctx| {
            let old = ctx.leader().await?;
            ctx.pause(old);
            let old_id = ctx.cluster.members[old]
                .handle
                .as_ref()
                .map_or(0, |h| h.id());
            // The others elect a leader among themselves.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let new = loop {
                ctx.sleep(Duration::from_millis(100)).await;
                let views: Vec<Option<u64>> = others(ctx.cluster.len(), old)
                    .iter()
                    .filter_map(|i| ctx.cluster.members[*i].handle.as_ref())
                    .map(|h| h.metrics().leader)
                    .collect();
                if let Some(Some(l)) = views.first()
                    && *l != old_id
                    && views.iter().all(|v| *v == Some(*l))
                    && let Some(i) = ctx
                        .cluster
                        .members
                        .iter()
                        .position(|m| m.handle.as_ref().is_some_and(|h| h.id() == *l))
                {
                    break i;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "no new leader while member {old} was paused"
                );
            };
            ctx.log(format!("new leader {new} while {old} is paused"));
            let endpoints = ctx.cluster.endpoints();
            let mut kv = KvClient::connect(endpoints[new].clone()).await?;
            let probe = format!("stale-probe-{}", ctx.rng.random::<u32>());
            kv.put(PutRequest {
                key: b"f14/probe".to_vec(),
                value: probe.clone().into_bytes(),
                ..Default::default()
            })
            .await?;
            ctx.log("probe write acknowledged by the new leader");
            let stale = tokio::spawn(async move {
                let mut kv = KvClient::connect(endpoints[old].clone()).await?;
                let r = tokio::time::timeout(
                    Duration::from_secs(15),
                    kv.range(RangeRequest {
                        key: b"f14/probe".to_vec(),
                        ..Default::default()
                    }),
                )
                .await;
                anyhow::Ok(match r {
                    Ok(Ok(r)) => Some(
                        r.into_inner()
                            .kvs
                            .first()
                            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
                    ),
                    // An error or no answer is allowed; a stale answer is not.
                    _ => None,
                })
            });
            ctx.sleep(Duration::from_millis(2500)).await;
            ctx.resume(old);
            let seen = stale.await??;
            ctx.log(format!("linearizable read on the resumed member: {seen:?}"));
            if let Some(v) = seen {
                anyhow::ensure!(
                    v.as_deref() == Some(probe.as_str()),
                    "stale read from the paused ex-leader {old}: {v:?}, expected {probe:?}"
                );
            }
            ctx.sleep(Duration::from_millis(1000)).await;
            Ok(())
        },
    )
    .await;
}

/// F18: answers to client requests a follower forwarded to the leader are lost at random after
/// the leader executed them, and clients retry each write whose outcome is unknown once,
/// unchanged, on another member. A retried put may apply twice and a retried create-if-absent
/// must then fail: the checker has to accept exactly those outcomes (the history records both
/// attempts, the first with an unknown outcome).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f18_retry_timed_out_writes() {
    let mut cfg = ScenarioConfig::default();
    cfg.workload.retry_unknown_writes = true;
    let report = run("f18_retry_timed_out_writes", cfg, async |ctx: &mut Ctx| {
        ctx.cluster.router.set(NetFaults {
            lose_forward_response: 0.3,
            ..NetFaults::default()
        });
        ctx.log("lose 30% of forwarded answers; clients retry writes with unknown outcomes");
        ctx.sleep(Duration::from_millis(3000)).await;
        Ok(())
    })
    .await;
    // Per client: a write with an unknown outcome directly followed by the same input.
    let mut last: std::collections::HashMap<u64, &chaos::history::Operation> =
        std::collections::HashMap::new();
    let mut retried = 0;
    for op in &report.history {
        if let Some(prev) = last.insert(op.client, op)
            && matches!(prev.output, chaos::history::Output::Unknown { .. })
            && prev.input.written().is_some()
            && prev.input == op.input
        {
            retried += 1;
        }
    }
    assert!(retried > 0, "no write was retried after an unknown outcome");
    println!("f18: {retried} writes retried after an unknown outcome");
}

/// F15: lease clocks skewed and jumping, forward and backward, on followers and on the leader,
/// across a leader change, under the usual workload plus three lease clients. Only the
/// lessors' clocks move (`FaultHooks::clock_offset_ms`): openraft's own timers (elections,
/// heartbeats, its leader lease) and ReadIndex run on Tokio's clock and are not skewed, so
/// I1–I6 must hold untouched (ReadIndex is clock-free). I7 holds on the serving leader's
/// clock, its documented bound: a lease may be revoked early in real time by as much as that
/// clock jumped forward during the countdown and no more; skew between members does not
/// matter, since a new leader restarts every TTL on its own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f15_clock_skew_and_jumps() {
    let cfg = ScenarioConfig {
        lease_clients: 3,
        ..ScenarioConfig::default()
    };
    let report = run("f15_clock_skew_and_jumps", cfg, async |ctx: &mut Ctx| {
        let l = ctx.leader().await?;
        let n = ctx.cluster.len();
        // Hosts with skewed clocks: one follower ahead, one behind.
        ctx.jump_clock((l + 1) % n, 1500);
        ctx.jump_clock((l + 2) % n, -1500);
        ctx.sleep(Duration::from_millis(800)).await;
        // The leader's clock jumps forward by almost a TTL (renewed leases may now lapse
        // early, within the bound), then back.
        ctx.jump_clock(l, 1900);
        ctx.sleep(Duration::from_millis(1000)).await;
        ctx.jump_clock(l, -1800);
        ctx.sleep(Duration::from_millis(1000)).await;
        // A skewed follower takes over and counts every TTL afresh on its own clock.
        ctx.partition(&[l], &others(n, l));
        ctx.sleep(Duration::from_millis(1500)).await;
        ctx.heal();
        let l = ctx.leader().await?;
        // Its clock runs fast (1.5×) for a second, then jumps back.
        for _ in 0..5 {
            ctx.jump_clock(l, 100);
            ctx.sleep(Duration::from_millis(200)).await;
        }
        ctx.jump_clock(l, -1200);
        ctx.sleep(Duration::from_millis(800)).await;
        Ok(())
    })
    .await;
    // The lease check had something to judge: keys read while their leases lived, and keys
    // seen gone (a lease the leader expired, early within the bound or after a lapse).
    let steps = || report.leases.iter().flat_map(|l| &l.steps);
    let alive = steps()
        .filter(|s| matches!(s, LeaseStep::Read { present: true, .. }))
        .count();
    let gone = steps()
        .filter(|s| {
            matches!(
                s,
                LeaseStep::Read { present: false, .. }
                    | LeaseStep::Gone { .. }
                    | LeaseStep::Expired {
                        gone_at: Some(_),
                        ..
                    }
            )
        })
        .count();
    assert!(
        alive >= 3 && gone >= 1,
        "f15: too little lease activity to judge I7 ({alive} reads of live leased keys, \
         {gone} leased keys seen gone)"
    );
}
