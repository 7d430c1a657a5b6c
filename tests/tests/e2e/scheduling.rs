//! Scheduling failures and constraints: FailedScheduling events worded like Kubernetes',
//! taints, nodeSelector, retry when the cluster changes.
use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually, node_of};

use super::{WAIT, init_tracing, pod};

const PODS: &str = "/api/v1/namespaces/default/pods";

async fn failed_scheduling(c: &Cluster, name: &str) -> anyhow::Result<String> {
    eventually(&format!("FailedScheduling for {name}"), WAIT, || async {
        let (events, _) = c.admin.list("/api/v1/namespaces/default/events").await?;
        let msg = events
            .iter()
            .filter(|e| {
                e.pointer("/involvedObject/name").and_then(Value::as_str) == Some(name)
                    && e.get("reason").and_then(Value::as_str) == Some("FailedScheduling")
            })
            .filter_map(|e| e.get("message").and_then(Value::as_str))
            .next_back()
            .map(str::to_string);
        Ok(msg.ok_or_else(|| "no event yet".to_string()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pods_get_kubernetes_worded_events() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.add_agent("node-b", |_| {}).await?;
    c.add_agent("node-c", |cfg| {
        cfg.register_taints =
            vec![json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"})];
    })
    .await?;
    eventually("3 nodes", WAIT, || async {
        let (n, _) = c.admin.list("/api/v1/nodes").await?;
        Ok(if n.len() == 3 {
            Ok(())
        } else {
            Err(format!("{} nodes", n.len()))
        })
    })
    .await?;

    let mut big = pod("big", "sleeper", &[], "Always");
    big["spec"]["containers"][0]["resources"] = json!({"requests": {"memory": "100Gi"}});
    c.create(PODS, &big).await?;
    let msg = failed_scheduling(&c, "big").await?;
    assert_eq!(
        msg,
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient memory."
    );
    // The status patch and the event are separate writes; wait for the condition.
    eventually("big has PodScheduled=False/Unschedulable", WAIT, || async {
        let p = c
            .admin
            .get(&format!("{PODS}/big"))
            .await?
            .unwrap_or_default();
        let reason = p
            .pointer("/status/conditions/0/reason")
            .and_then(Value::as_str);
        Ok(
            if tests::phase(&p) == "Pending" && reason == Some("Unschedulable") {
                Ok(())
            } else {
                Err(format!("phase {} reason {reason:?}", tests::phase(&p)))
            },
        )
    })
    .await?;

    // nodeSelector matching no node, then a node that matches joins: the pod is retried.
    let mut picky = pod("picky", "sleeper", &[], "Always");
    picky["spec"]["nodeSelector"] = json!({"disk": "nvme"});
    c.create(PODS, &picky).await?;
    let msg = failed_scheduling(&c, "picky").await?;
    assert_eq!(
        msg,
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 node(s) didn't match Pod's node affinity/selector."
    );
    c.add_agent("node-d", |cfg| {
        cfg.labels.insert("disk".into(), "nvme".into());
    })
    .await?;
    eventually("picky bound to node-d", WAIT, || async {
        let p = c
            .admin
            .get(&format!("{PODS}/picky"))
            .await?
            .unwrap_or_default();
        Ok(if node_of(&p) == "node-d" {
            Ok(())
        } else {
            Err(node_of(&p).to_string())
        })
    })
    .await?;

    // A toleration lets a pod onto the tainted node.
    let mut tolerant = pod("tolerant", "sleeper", &[], "Always");
    tolerant["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": "node-c"});
    tolerant["spec"]["tolerations"] =
        json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]);
    c.create(PODS, &tolerant).await?;
    eventually("tolerant running on node-c", WAIT, || async {
        let p = c
            .admin
            .get(&format!("{PODS}/tolerant"))
            .await?
            .unwrap_or_default();
        Ok(
            if node_of(&p) == "node-c" && tests::phase(&p) == "Running" {
                Ok(())
            } else {
                Err(format!("{} {}", node_of(&p), tests::phase(&p)))
            },
        )
    })
    .await?;
    c.stop().await;
    Ok(())
}
