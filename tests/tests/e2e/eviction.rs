//! Node memory pressure: the agent evicts BestEffort first, then Burstable above its request,
//! leaves Guaranteed alone, flips the `MemoryPressure` condition and taints the node, and a
//! Deployment's evicted pod is replaced on another node.
//!
//! The node under pressure runs the `FakeRuntime`, whose per-pod memory usage the test sets,
//! so the working sets are exact; its capacity is 1 GiB with `memory.available<100Mi`.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use runtime::AnyRuntime;
use runtime::testing::{FakeBehavior, FakeRuntime};
use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually};
use tokio_util::sync::CancellationToken;

use super::{WAIT, init_tracing};

const MI: u64 = 1 << 20;

async fn fake_agent(
    c: &Cluster,
    name: &str,
    stop: &CancellationToken,
) -> anyhow::Result<(Arc<AnyRuntime>, tokio::task::JoinHandle<()>)> {
    let mut cfg = c.agent_config(name)?;
    cfg.capacity.memory_bytes = 1024 * MI;
    cfg.eviction_memory_available =
        runtime::node::eviction::parse_eviction_hard("memory.available<100Mi", 1024 * MI)?;
    cfg.eviction_interval = Duration::from_millis(200);
    cfg.eviction_pressure_transition_period = Duration::from_secs(8);
    cfg.runtime_classes = vec!["wasm".into(), runtime::api::pod::OCI_RUNTIME_CLASS.into()];
    let fake = FakeRuntime::new();
    fake.script("forever", FakeBehavior::RunForever);
    fake.script(tests::guest("sleeper"), FakeBehavior::RunForever);
    tests::spawn_agent(cfg, AnyRuntime::Fake(fake), stop)
}

fn fake(rt: &AnyRuntime) -> &FakeRuntime {
    match rt {
        AnyRuntime::Fake(f) => f,
        _ => unreachable!("the pressured agent runs the FakeRuntime"),
    }
}

fn pod(name: &str, requests: Value, limits: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "node-fake"},
            "containers": [{"name": "main", "image": "forever",
                "resources": {"requests": requests, "limits": limits}}],
        },
    })
}

async fn get_pod(c: &Cluster, name: &str) -> anyhow::Result<Value> {
    c.admin
        .get(&format!("/api/v1/namespaces/default/pods/{name}"))
        .await?
        .with_context(|| format!("pod {name} missing"))
}

async fn wait_phase(c: &Cluster, name: &str, want: &str) -> anyhow::Result<Value> {
    eventually(&format!("{name} {want}"), WAIT, || async {
        let p = get_pod(c, name).await?;
        Ok(if tests::phase(&p) == want {
            Ok(p)
        } else {
            Err(format!("{}", p["status"]))
        })
    })
    .await
}

/// The node's `MemoryPressure` status and whether it has the memory-pressure taint.
async fn pressure(c: &Cluster) -> anyhow::Result<(String, bool)> {
    let node = c
        .admin
        .get("/api/v1/nodes/node-fake")
        .await?
        .context("node missing")?;
    let status = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "MemoryPressure"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or_default()
        .to_owned();
    let tainted = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                t["key"] == runtime::node::eviction::MEMORY_PRESSURE_TAINT
                    && t["effect"] == "NoSchedule"
            })
        });
    Ok((status, tainted))
}

async fn wait_pressure(c: &Cluster, want: (&str, bool)) -> anyhow::Result<()> {
    eventually(&format!("node pressure {want:?}"), WAIT, || async {
        let got = pressure(c).await?;
        Ok(if (got.0.as_str(), got.1) == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        })
    })
    .await
}

fn assert_evicted(p: &Value, container_usage_ki: u64, request: &str) {
    assert_eq!(tests::phase(p), "Failed", "{}", p["status"]);
    assert_eq!(p["status"]["reason"], "Evicted", "{}", p["status"]);
    let msg = p["status"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: "
        ) && msg.contains(&format!(
            "Container main was using {container_usage_ki}Ki, request is {request}, has larger consumption of memory."
        )),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_evicts_best_effort_then_burstable_and_a_deployment_replaces_its_pod()
-> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    let stop = CancellationToken::new();
    let (rt, fake_task) = fake_agent(&c, "node-fake", &stop).await?;
    let fake = fake(&rt);
    let full = json!({"cpu": "100m", "memory": "400Mi"});
    fake.set_memory_usage("be", 100 * MI);
    fake.set_memory_usage("burst", 300 * MI);
    fake.set_memory_usage("guar", 390 * MI);
    for p in [
        pod("be", json!({}), json!({})),
        pod("burst", json!({"memory": "100Mi"}), json!({})),
        pod("guar", full.clone(), full),
    ] {
        c.create("/api/v1/namespaces/default/pods", &p).await?;
    }
    for name in ["be", "burst", "guar"] {
        wait_phase(&c, name, "Running").await?;
    }
    // 790Mi used of 1Gi: 234Mi available, above the threshold.
    wait_pressure(&c, ("False", false)).await?;

    // 940Mi used: BestEffort (250Mi above its zero request) goes before Burstable (200Mi above).
    fake.set_memory_usage("be", 250 * MI);
    let be = wait_phase(&c, "be", "Failed").await?;
    assert_evicted(&be, 250 * 1024, "0");
    wait_pressure(&c, ("True", true)).await?;
    for name in ["burst", "guar"] {
        assert_eq!(tests::phase(&get_pod(&c, name).await?), "Running", "{name}");
    }
    eventually("an Evicted event for be", WAIT, || async {
        let events = c.admin.list("/api/v1/namespaces/default/events").await?.0;
        let found = events.iter().any(|e| {
            e["reason"] == "Evicted"
                && e["type"] == "Warning"
                && e["involvedObject"]["name"] == "be"
        });
        Ok(if found {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        })
    })
    .await?;

    // 950Mi used: the Burstable pod above its request goes; the Guaranteed one stays.
    fake.set_memory_usage("burst", 560 * MI);
    let burst = wait_phase(&c, "burst", "Failed").await?;
    assert_evicted(&burst, 560 * 1024, "100Mi");
    assert_eq!(tests::phase(&get_pod(&c, "guar").await?), "Running");
    // After the transition period without pressure, condition and taint go.
    wait_pressure(&c, ("False", false)).await?;

    // A Deployment's pod on the fake node is evicted and replaced on the other node, which
    // joins only now so the first pod lands on the fake one.
    let mut dep = super::sleeper_deployment("web", 1);
    dep["spec"]["template"]["spec"]["containers"][0]["resources"] = json!({});
    c.create("/apis/apps/v1/namespaces/default/deployments", &dep)
        .await?;
    let first = eventually("web pod Running on node-fake", WAIT, || async {
        let pods = c.pods("default").await?;
        let p = pods.iter().find(|p| {
            p.pointer("/metadata/labels/app") == Some(&json!("web")) && tests::phase(p) == "Running"
        });
        Ok(match p {
            Some(p) => Ok(p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()),
            None => Err(format!("{pods:?}")),
        })
    })
    .await?;
    assert_eq!(tests::node_of(&get_pod(&c, &first).await?), "node-fake");
    c.add_agent("node-wasm", |_| {}).await?;
    fake.set_memory_usage(first.clone(), 700 * MI);
    wait_phase(&c, &first, "Failed").await?;
    assert_eq!(tests::phase(&get_pod(&c, "guar").await?), "Running");
    eventually("replacement Running on node-wasm", WAIT, || async {
        let pods = c.pods("default").await?;
        let ok = pods.iter().any(|p| {
            p.pointer("/metadata/labels/app") == Some(&json!("web"))
                && p["metadata"]["name"] != json!(first)
                && tests::phase(p) == "Running"
                && tests::node_of(p) == "node-wasm"
        });
        Ok(if ok { Ok(()) } else { Err(format!("{pods:?}")) })
    })
    .await?;

    stop.cancel();
    let _ = fake_task.await;
    c.stop().await;
    Ok(())
}
