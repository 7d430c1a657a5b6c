//! Deployments: replicas spread over nodes, scale up and down, rolling update.
use std::collections::BTreeSet;

use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually, node_of};

use super::{WAIT, init_tracing, running, sleeper_deployment};

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

async fn wait_running(c: &Cluster, prefix: &str, n: usize) -> anyhow::Result<Vec<Value>> {
    eventually(&format!("{n} running {prefix} pods"), WAIT, || async {
        let pods = running(c, prefix).await?;
        let all = c.pods("default").await?;
        let live = all
            .iter()
            .filter(|p| {
                !tests::deleting(p)
                    && p.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .is_some_and(|x| x.starts_with(prefix))
            })
            .count();
        if pods.len() == n && live == n {
            Ok(Ok(pods))
        } else {
            Ok(Err(format!("{} running, {live} live", pods.len())))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_spreads_scales_and_rolls() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.add_agent("node-b", |_| {}).await?;
    c.create(DEPLOYMENTS, &sleeper_deployment("web", 4)).await?;
    let pods = wait_running(&c, "web-", 4).await?;
    let nodes: BTreeSet<&str> = pods.iter().map(node_of).collect();
    assert_eq!(nodes.len(), 2, "replicas spread over both nodes: {nodes:?}");

    // Scale up and down through the scale subresource, as `kubectl scale` does.
    let scale = |n: i64| json!({"spec": {"replicas": n}});
    c.admin
        .merge_patch(&format!("{DEPLOYMENTS}/web"), &scale(7))
        .await?;
    wait_running(&c, "web-", 7).await?;
    c.admin
        .merge_patch(&format!("{DEPLOYMENTS}/web"), &scale(2))
        .await?;
    wait_running(&c, "web-", 2).await?;

    // Rolling update: a new template gives a new ReplicaSet with revision 2, old pods replaced.
    // With 2 replicas the defaults are maxSurge 1, maxUnavailable 0: two ready pods at all times.
    let sampler_stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let admin = c.admin.clone();
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let mut min_ready = usize::MAX;
            while !stop.is_cancelled() {
                if let Ok((pods, _)) = admin.list("/api/v1/namespaces/default/pods").await {
                    let ready = pods
                        .iter()
                        .filter(|p| !tests::deleting(p) && control::controllers::pod_is_ready(p))
                        .count();
                    min_ready = min_ready.min(ready);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            min_ready
        })
    };
    c.admin
        .merge_patch(
            &format!("{DEPLOYMENTS}/web"),
            &json!({"spec": {"template": {"spec": {"containers": [{"name": "main", "image": tests::guest("sleeper"), "args": ["300"]}]}}}}),
        )
        .await?;
    eventually("rollout complete", WAIT, || async {
        let d = c
            .admin
            .get(&format!("{DEPLOYMENTS}/web"))
            .await?
            .unwrap_or_default();
        let s = |f: &str| {
            d.pointer(&format!("/status/{f}"))
                .and_then(Value::as_i64)
                .unwrap_or(-1)
        };
        let pods = running(&c, "web-").await?;
        let updated = pods
            .iter()
            .filter(|p| {
                p.pointer("/spec/containers/0/args/0")
                    .and_then(Value::as_str)
                    == Some("300")
            })
            .count();
        let live = c
            .pods("default")
            .await?
            .iter()
            .filter(|p| !tests::deleting(p))
            .count();
        if s("updatedReplicas") == 2
            && s("availableReplicas") == 2
            && s("replicas") == 2
            && updated == 2
            && live == 2
        {
            Ok(Ok(()))
        } else {
            Ok(Err(format!(
                "status {:?}, {updated} updated running, {live} live",
                d.get("status")
            )))
        }
    })
    .await?;
    sampler_stop.cancel();
    let min_ready = sampler.await?;
    assert!(
        min_ready >= 2,
        "maxUnavailable 0 violated: only {min_ready} ready pods during the rollout"
    );
    let (rss, _) = c
        .admin
        .list("/apis/apps/v1/namespaces/default/replicasets")
        .await?;
    let revisions: BTreeSet<&str> = rss
        .iter()
        .filter_map(|r| {
            r.pointer("/metadata/annotations/deployment.kubernetes.io~1revision")
                .and_then(Value::as_str)
        })
        .collect();
    assert_eq!(revisions, BTreeSet::from(["1", "2"]), "two revisions kept");

    // Deleting the Deployment garbage-collects its ReplicaSets and pods.
    c.admin.delete(&format!("{DEPLOYMENTS}/web"), None).await?;
    eventually("pods and replicasets collected", WAIT, || async {
        let pods = c.pods("default").await?;
        let (rss, _) = c
            .admin
            .list("/apis/apps/v1/namespaces/default/replicasets")
            .await?;
        if pods.is_empty() && rss.is_empty() {
            Ok(Ok(()))
        } else {
            Ok(Err(format!(
                "{} pods, {} replicasets left",
                pods.len(),
                rss.len()
            )))
        }
    })
    .await?;
    c.stop().await;
    Ok(())
}
