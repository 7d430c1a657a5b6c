//! Node loss: an agent that stops heartbeating is marked Unknown, tainted unreachable, and its
//! pods are evicted and recreated on the surviving node.
use std::time::Duration;

use serde_json::Value;
use tests::{Cluster, ClusterOptions, eventually, node_of};

use super::{WAIT, init_tracing, running, sleeper_deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_dead_node_are_recreated_elsewhere() -> anyhow::Result<()> {
    init_tracing();
    let mut opts = ClusterOptions::default();
    opts.controllers.node_monitor_grace_period = Duration::from_secs(3);
    opts.controllers.default_toleration = Duration::from_secs(1);
    let mut c = Cluster::start(opts).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.add_agent("node-b", |_| {}).await?;
    c.create(
        "/apis/apps/v1/namespaces/default/deployments",
        &sleeper_deployment("svc", 4),
    )
    .await?;
    let pods = eventually("4 running", WAIT, || async {
        let p = running(&c, "svc-").await?;
        Ok(if p.len() == 4 {
            Ok(p)
        } else {
            Err(format!("{} running", p.len()))
        })
    })
    .await?;
    let on_a = pods.iter().filter(|p| node_of(p) == "node-a").count();
    assert!(on_a > 0, "some pods on node-a");

    let killed_at = tokio::time::Instant::now();
    if let Some(a) = c.agent("node-a") {
        a.kill().await;
    }
    eventually("node-a Unknown and tainted", WAIT, || async {
        let n = c
            .admin
            .get("/api/v1/nodes/node-a")
            .await?
            .unwrap_or_default();
        let ready = n
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
            })
            .and_then(|c| c.get("status").and_then(Value::as_str))
            .unwrap_or_default()
            .to_string();
        let tainted = n
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .is_some_and(|ts| {
                ts.iter().any(|t| {
                    t.get("key").and_then(Value::as_str) == Some(control::controllers::UNREACHABLE)
                })
            });
        Ok(if ready == "Unknown" && tainted {
            Ok(())
        } else {
            Err(format!("ready={ready} tainted={tainted}"))
        })
    })
    .await?;
    eventually("4 running on node-b", WAIT, || async {
        let p = running(&c, "svc-").await?;
        let on_b = p.iter().filter(|p| node_of(p) == "node-b").count();
        Ok(if on_b == 4 {
            Ok(())
        } else {
            Err(format!("{on_b} running on node-b"))
        })
    })
    .await?;
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(40), "recovery took {took:?}");
    c.stop().await;
    Ok(())
}

/// An agent restarted under the same name picks its pods up again: the same pod objects run
/// again, nothing is created twice, and the runtime runs exactly one sandbox per pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_restarts_its_pods_without_doubling() -> anyhow::Result<()> {
    use runtime::PodRuntime as _;
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.create(
        "/apis/apps/v1/namespaces/default/deployments",
        &sleeper_deployment("keep", 3),
    )
    .await?;
    let before = eventually("3 running", WAIT, || async {
        let p = running(&c, "keep-").await?;
        Ok(if p.len() == 3 {
            Ok(p)
        } else {
            Err(format!("{} running", p.len()))
        })
    })
    .await?;
    let uid = |p: &Value| {
        p.pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut before_uids: Vec<String> = before.iter().map(uid).collect();
    before_uids.sort();
    if let Some(a) = c.agent("node-a") {
        a.kill().await;
    }
    c.agents.retain(|a| a.name != "node-a");
    c.add_agent("node-a", |_| {}).await?;
    eventually(
        "the same 3 pods running again in the new runtime",
        WAIT,
        || async {
            let p = running(&c, "keep-").await?;
            let mut uids: Vec<String> = p.iter().map(uid).collect();
            uids.sort();
            let in_runtime = match c.agents.iter().find(|a| a.name == "node-a") {
                Some(a) => a.runtime.list_pods().await?.len(),
                None => 0,
            };
            let all = c.pods("default").await?.len();
            Ok(if uids == before_uids && in_runtime == 3 && all == 3 {
                Ok(())
            } else {
                Err(format!(
                    "{} running, {in_runtime} sandboxes, {all} pods",
                    uids.len()
                ))
            })
        },
    )
    .await?;
    c.stop().await;
    Ok(())
}
