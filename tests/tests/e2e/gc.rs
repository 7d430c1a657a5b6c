//! Garbage collection with foreground and orphan propagation: an owner carrying the
//! `foregroundDeletion` finalizer disappears only after its dependents (and theirs) are gone;
//! one carrying `orphan` leaves its dependents running without the reference.
//!
//! The API server's DELETE sets those finalizers from `propagationPolicy` (in the
//! DeleteOptions body, as `kubectl delete --cascade=foreground|orphan` sends it, or the query).
use std::time::Duration;

use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually};

use super::{WAIT, init_tracing, running, sleeper_deployment};

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";
const REPLICASETS: &str = "/apis/apps/v1/namespaces/default/replicasets";

fn with_prefix(objs: &[Value], prefix: &str) -> Vec<String> {
    objs.iter()
        .filter_map(|o| o.pointer("/metadata/name").and_then(Value::as_str))
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

async fn wait_running(c: &Cluster, prefix: &str, n: usize) -> anyhow::Result<()> {
    eventually(&format!("{n} running {prefix} pods"), WAIT, || async {
        let r = running(c, prefix).await?.len();
        Ok(if r == n {
            Ok(())
        } else {
            Err(format!("{r} running"))
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_removes_dependents_first() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    let d = sleeper_deployment("fg", 3);
    c.create(DEPLOYMENTS, &d).await?;
    wait_running(&c, "fg-", 3).await?;
    c.admin
        .delete(
            &format!("{DEPLOYMENTS}/fg"),
            Some(&json!({"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground"})),
        )
        .await?;
    // The Deployment stays (marked) while anything it owns, directly or not, exists.
    let mut saw_marked = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let dep = c.admin.get(&format!("{DEPLOYMENTS}/fg")).await?;
        let (rs, _) = c.admin.list(REPLICASETS).await?;
        let pods = c.pods("default").await?;
        let (rs, pods) = (with_prefix(&rs, "fg-"), with_prefix(&pods, "fg-"));
        match dep {
            Some(d) => {
                assert!(
                    d.pointer("/metadata/deletionTimestamp").is_some(),
                    "the Deployment is marked for deletion"
                );
                saw_marked = true;
            }
            None => {
                assert!(
                    rs.is_empty() && pods.is_empty(),
                    "the Deployment went before its dependents: {rs:?} {pods:?}"
                );
                break;
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "Deployment not deleted; left: {rs:?} {pods:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_marked);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_deletion_keeps_dependents_without_the_reference() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    let d = sleeper_deployment("orph", 2);
    let rs = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "orph", "namespace": "default"},
        "spec": {"replicas": 2, "selector": d["spec"]["selector"].clone(),
                 "template": d["spec"]["template"].clone()},
    });
    c.create(REPLICASETS, &rs).await?;
    wait_running(&c, "orph-", 2).await?;
    c.admin
        .delete(
            &format!("{REPLICASETS}/orph?propagationPolicy=Orphan"),
            None,
        )
        .await?;
    eventually("ReplicaSet gone", WAIT, || async {
        Ok(match c.admin.get(&format!("{REPLICASETS}/orph")).await? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        })
    })
    .await?;
    // Several GC sweeps later the pods still run, owned by nobody.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods = running(&c, "orph-").await?;
    assert_eq!(pods.len(), 2);
    for p in &pods {
        assert!(
            p.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty),
            "{p}"
        );
    }
    c.stop().await;
    Ok(())
}
