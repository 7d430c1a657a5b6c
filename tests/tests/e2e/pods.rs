//! Pod lifecycle on the agent: restart policies with back-off, OOMKilled, completion, deletion.
use serde_json::Value;
use tests::{Cluster, ClusterOptions, eventually};

use super::{WAIT, init_tracing, pod};

const PODS: &str = "/api/v1/namespaces/default/pods";

async fn get(c: &Cluster, name: &str) -> anyhow::Result<Value> {
    Ok(c.admin
        .get(&format!("{PODS}/{name}"))
        .await?
        .unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_pod_shows_crash_loop_backoff() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.create(PODS, &pod("crasher", "exit_code", &["3"], "Always"))
        .await?;
    let p = eventually("CrashLoopBackOff", WAIT, || async {
        let p = get(&c, "crasher").await?;
        let reason = p
            .pointer("/status/containerStatuses/0/state/waiting/reason")
            .and_then(Value::as_str);
        let restarts = p
            .pointer("/status/containerStatuses/0/restartCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if reason == Some("CrashLoopBackOff") && restarts >= 2 {
            Ok(Ok(p))
        } else {
            Ok(Err(format!("{:?}", p.pointer("/status/containerStatuses"))))
        }
    })
    .await?;
    assert_eq!(
        p.pointer("/status/containerStatuses/0/lastState/terminated/exitCode")
            .and_then(Value::as_i64),
        Some(3)
    );
    assert_eq!(
        tests::phase(&p),
        "Running",
        "an Always pod in back-off stays Running, as in Kubernetes"
    );
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_oom_killed_and_completion_is_reported() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    let mut hog = pod("hog", "memory_hog", &[], "Never");
    hog["spec"]["containers"][0]["resources"] = serde_json::json!({"limits": {"memory": "32Mi"}});
    c.create(PODS, &hog).await?;
    c.create(PODS, &pod("done", "exit_code", &["0"], "OnFailure"))
        .await?;
    let p = eventually("OOMKilled", WAIT, || async {
        let p = get(&c, "hog").await?;
        if tests::phase(&p) == "Failed" {
            Ok(Ok(p))
        } else {
            Ok(Err(format!("{:?}", p.get("status"))))
        }
    })
    .await?;
    let t = p
        .pointer("/status/containerStatuses/0/state/terminated")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        t.get("reason").and_then(Value::as_str),
        Some("OOMKilled"),
        "{t}"
    );
    assert_eq!(t.get("exitCode").and_then(Value::as_i64), Some(137), "{t}");
    eventually("Succeeded", WAIT, || async {
        let p = get(&c, "done").await?;
        if tests::phase(&p) == "Succeeded" {
            Ok(Ok(()))
        } else {
            Ok(Err(format!("{:?}", p.get("status"))))
        }
    })
    .await?;

    // Graceful deletion of a running pod: the agent stops it and removes the object.
    c.create(PODS, &pod("sleepy", "sleeper", &["100"], "Always"))
        .await?;
    eventually("sleepy running", WAIT, || async {
        let p = get(&c, "sleepy").await?;
        Ok(if tests::phase(&p) == "Running" {
            Ok(())
        } else {
            Err(tests::phase(&p).to_string())
        })
    })
    .await?;
    c.admin.delete(&format!("{PODS}/sleepy"), None).await?;
    eventually("sleepy gone", WAIT, || async {
        Ok(if c.admin.get(&format!("{PODS}/sleepy")).await?.is_none() {
            Ok(())
        } else {
            Err("still there".into())
        })
    })
    .await?;
    c.stop().await;
    Ok(())
}
