//! Priority: pods are taken from the queue by `spec.priority`, highest first, and a pod that
//! fits nowhere preempts pods of lower priority.
use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually, node_of};

use super::{WAIT, init_tracing, pod};

const PODS: &str = "/api/v1/namespaces/default/pods";

async fn failed_scheduling(c: &Cluster, name: &str) -> anyhow::Result<()> {
    eventually(&format!("FailedScheduling for {name}"), WAIT, || async {
        let (events, _) = c.admin.list("/api/v1/namespaces/default/events").await?;
        let seen = events.iter().any(|e| {
            e.pointer("/involvedObject/name").and_then(Value::as_str) == Some(name)
                && e.get("reason").and_then(Value::as_str) == Some("FailedScheduling")
        });
        Ok(if seen {
            Ok(())
        } else {
            Err("no event yet".to_string())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_pods_are_scheduled_first() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    // Room for one of them only, and no node yet: both wait in the queue.
    let mut low = pod("low", "sleeper", &["200"], "Always");
    low["spec"]["priority"] = json!(10);
    low["spec"]["containers"][0]["resources"] = json!({"requests": {"cpu": "600m"}});
    let mut high = low.clone();
    high["metadata"]["name"] = json!("high");
    high["spec"]["priority"] = json!(1000);
    c.create(PODS, &low).await?;
    c.create(PODS, &high).await?;
    failed_scheduling(&c, "low").await?;
    failed_scheduling(&c, "high").await?;
    c.add_agent("small", |cfg| cfg.capacity.cpu_millis = 1000)
        .await?;
    let bound = eventually("one pod bound", WAIT, || async {
        let pods = c.pods("default").await?;
        let bound: Vec<String> = pods
            .iter()
            .filter(|p| !node_of(p).is_empty())
            .filter_map(|p| p.pointer("/metadata/name").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        Ok(if bound.is_empty() {
            Err("none bound".to_string())
        } else {
            Ok(bound)
        })
    })
    .await?;
    assert_eq!(bound, ["high"]);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_pod_preempts_a_lower_one() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("small", |cfg| cfg.capacity.cpu_millis = 1000)
        .await?;
    let mut low = pod("low", "sleeper", &["200"], "Always");
    low["spec"]["priority"] = json!(10);
    low["spec"]["containers"][0]["resources"] = json!({"requests": {"cpu": "600m"}});
    let mut mid = low.clone();
    mid["metadata"]["name"] = json!("mid");
    mid["spec"]["priority"] = json!(500);
    mid["spec"]["containers"][0]["resources"] = json!({"requests": {"cpu": "300m"}});
    c.create(PODS, &low).await?;
    c.create(PODS, &mid).await?;
    eventually("low and mid bound", WAIT, || async {
        let pods = c.pods("default").await?;
        let n = pods.iter().filter(|p| !node_of(p).is_empty()).count();
        Ok(if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} bound"))
        })
    })
    .await?;
    // 600m needed, 100m free: evicting `low` (priority 10) is enough; `mid` stays.
    let mut high = low.clone();
    high["metadata"]["name"] = json!("high");
    high["spec"]["priority"] = json!(1000);
    c.create(PODS, &high).await?;
    eventually("high bound in low's place", WAIT, || async {
        let pods = c.pods("default").await?;
        let get = |n: &str| {
            pods.iter()
                .find(|p| p.pointer("/metadata/name").and_then(Value::as_str) == Some(n))
        };
        let high_bound = get("high").is_some_and(|p| node_of(p) == "small");
        let low_gone = get("low").is_none_or(tests::deleting);
        let mid_kept = get("mid").is_some_and(|p| !tests::deleting(p));
        Ok(if high_bound && low_gone && mid_kept {
            Ok(())
        } else {
            Err(format!(
                "high bound {high_bound}, low gone {low_gone}, mid kept {mid_kept}"
            ))
        })
    })
    .await?;
    eventually("Preempted event on low", WAIT, || async {
        let (events, _) = c.admin.list("/api/v1/namespaces/default/events").await?;
        let seen = events.iter().any(|e| {
            e.pointer("/involvedObject/name").and_then(Value::as_str) == Some("low")
                && e.get("reason").and_then(Value::as_str) == Some("Preempted")
        });
        Ok(if seen {
            Ok(())
        } else {
            Err("no event".to_string())
        })
    })
    .await?;
    c.stop().await;
    Ok(())
}
