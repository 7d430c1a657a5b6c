//! The Endpoints controller: ready and not-ready pods of a Service's selector, named target
//! ports resolved per pod, updates as pods come and go, cleanup with the Service.
use serde_json::{Value, json};
use tests::{Cluster, ClusterOptions, eventually};

use super::{WAIT, init_tracing, pod};

const PODS: &str = "/api/v1/namespaces/default/pods";
const EP: &str = "/api/v1/namespaces/default/endpoints/web";

fn web_pod(name: &str, guest: &str, args: &[&str]) -> Value {
    let mut p = pod(name, guest, args, "Always");
    p["metadata"]["labels"] = json!({"app": "web"});
    p["spec"]["containers"][0]["ports"] = json!([{"name": "http", "containerPort": 8080}]);
    p
}

/// Pod names listed under `field` ("addresses" or "notReadyAddresses") of all subsets.
fn names(ep: &Value, field: &str) -> Vec<String> {
    let mut out: Vec<String> = ep
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|s| s.get(field).and_then(Value::as_array).into_iter().flatten())
        .filter_map(|a| a.pointer("/targetRef/name").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_ready_pods_with_named_ports() -> anyhow::Result<()> {
    init_tracing();
    let mut c = Cluster::start(ClusterOptions::default()).await?;
    c.add_agent("node-a", |_| {}).await?;
    c.create(
        "/api/v1/namespaces/default/services",
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "default", "labels": {"tier": "front"}},
                "spec": {"selector": {"app": "web"},
                         "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}),
    )
    .await?;
    c.create(PODS, &web_pod("web-1", "sleeper", &["200"]))
        .await?;
    c.create(PODS, &web_pod("web-2", "sleeper", &["200"]))
        .await?;
    // Crash-looping: never Ready, so listed as not ready.
    c.create(PODS, &web_pod("web-bad", "exit_code", &["3"]))
        .await?;
    // Not selected.
    c.create(PODS, &pod("other", "sleeper", &["200"], "Always"))
        .await?;

    let ep = eventually("endpoints with 2 ready, 1 not ready", WAIT, || async {
        let Some(ep) = c.admin.get(EP).await? else {
            return Ok(Err("no Endpoints yet".into()));
        };
        let (ready, not_ready) = (names(&ep, "addresses"), names(&ep, "notReadyAddresses"));
        Ok(if ready == ["web-1", "web-2"] && not_ready == ["web-bad"] {
            Ok(ep)
        } else {
            Err(format!("ready {ready:?}, not ready {not_ready:?}"))
        })
    })
    .await?;
    let subsets = ep["subsets"].as_array().expect("subsets");
    assert_eq!(subsets.len(), 1, "{ep}");
    assert_eq!(
        subsets[0]["ports"],
        json!([{"name": "web", "port": 8080, "protocol": "TCP"}])
    );
    let addr = &subsets[0]["addresses"][0];
    assert!(
        addr["ip"].as_str().is_some_and(|ip| !ip.is_empty()),
        "{addr}"
    );
    assert_eq!(addr["nodeName"], "node-a");
    assert_eq!(ep.pointer("/metadata/labels/tier"), Some(&json!("front")));

    // A pod going away leaves the endpoints.
    c.admin
        .delete(
            &format!("{PODS}/web-1"),
            Some(&json!({"gracePeriodSeconds": 0})),
        )
        .await?;
    eventually("web-1 removed from endpoints", WAIT, || async {
        let ep = c.admin.get(EP).await?.unwrap_or(json!({}));
        let ready = names(&ep, "addresses");
        Ok(if ready == ["web-2"] {
            Ok(())
        } else {
            Err(format!("ready {ready:?}"))
        })
    })
    .await?;

    // A new matching pod joins.
    c.create(PODS, &web_pod("web-3", "sleeper", &["200"]))
        .await?;
    eventually("web-3 in endpoints", WAIT, || async {
        let ep = c.admin.get(EP).await?.unwrap_or(json!({}));
        let ready = names(&ep, "addresses");
        Ok(if ready == ["web-2", "web-3"] {
            Ok(())
        } else {
            Err(format!("ready {ready:?}"))
        })
    })
    .await?;

    // The Endpoints go with their Service.
    c.admin
        .delete("/api/v1/namespaces/default/services/web", None)
        .await?;
    eventually("endpoints deleted", WAIT, || async {
        Ok(match c.admin.get(EP).await? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        })
    })
    .await?;
    c.stop().await;
    Ok(())
}
