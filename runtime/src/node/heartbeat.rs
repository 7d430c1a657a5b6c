//! Node registration, node status and the Lease heartbeat.
use serde_json::{Value, json};

use super::AgentConfig;
use super::client::{ApiClient, ClientError};

/// Namespace of node leases.
pub(crate) const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Annotation listing the runtime classes a node offers (comma-separated).
pub const RUNTIME_CLASSES_ANNOTATION: &str = "flotilla.dev/runtime-classes";

/// RFC 3339 with seconds, as `metav1.Time`.
pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// RFC 3339 with microseconds, as `metav1.MicroTime`.
pub(crate) fn now_micro() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

fn lease_path(name: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}")
}

fn resources(cfg: &AgentConfig) -> Value {
    json!({
        "cpu": format!("{}m", cfg.capacity.cpu_millis),
        "memory": format!("{}Ki", cfg.capacity.memory_bytes / 1024),
        "pods": cfg.capacity.pods.to_string(),
    })
}

fn ready_condition(now: &str) -> Value {
    json!({
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "kubelet is posting ready status",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    })
}

/// The node's status as the agent reports it.
pub(crate) fn node_status(cfg: &AgentConfig, runtime_name: &str) -> Value {
    let now = now_rfc3339();
    json!({
        "capacity": resources(cfg),
        "allocatable": resources(cfg),
        "conditions": [
            ready_condition(&now),
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
             "message": "kubelet has sufficient memory available", "lastHeartbeatTime": now, "lastTransitionTime": now},
        ],
        "addresses": [
            {"type": "InternalIP", "address": cfg.address},
            {"type": "Hostname", "address": cfg.node_name},
        ],
        "nodeInfo": {
            "architecture": go_arch(),
            "operatingSystem": std::env::consts::OS,
            "osImage": "Flotilla",
            "kernelVersion": "",
            "containerRuntimeVersion": format!("{runtime_name}://flotilla"),
            "kubeletVersion": format!("v1.37.1-flotilla-{}", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    })
}

/// The architecture as Kubernetes names it (`GOARCH`).
pub(crate) fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn labels(cfg: &AgentConfig) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(cfg.node_name));
    labels.insert("kubernetes.io/os".into(), json!(std::env::consts::OS));
    labels.insert("kubernetes.io/arch".into(), json!(go_arch()));
    for (k, v) in &cfg.labels {
        labels.insert(k.clone(), json!(v));
    }
    Value::Object(labels)
}

/// Creates the Node or refreshes its labels, then posts its status.
pub(crate) async fn register(
    client: &ApiClient,
    cfg: &AgentConfig,
    runtime_name: &str,
) -> Result<(), ClientError> {
    let meta = json!({
        "name": cfg.node_name,
        "labels": labels(cfg),
        "annotations": {RUNTIME_CLASSES_ANNOTATION: cfg.runtime_classes.join(",")},
    });
    let mut spec = json!({});
    if !cfg.register_taints.is_empty() {
        spec["taints"] = json!(cfg.register_taints);
    }
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec});
    match client.create("/api/v1/nodes", &node).await {
        Ok(_) => {}
        Err(e) if e.is_conflict() => {
            client
                .merge_patch(&node_path(&cfg.node_name), &json!({"metadata": meta}))
                .await?;
        }
        Err(e) => return Err(e),
    }
    post_status(client, cfg, runtime_name).await
}

/// Posts the node's status (Ready with a fresh heartbeat time).
pub(crate) async fn post_status(
    client: &ApiClient,
    cfg: &AgentConfig,
    runtime_name: &str,
) -> Result<(), ClientError> {
    client
        .merge_patch(
            &format!("{}/status", node_path(&cfg.node_name)),
            &json!({"status": node_status(cfg, runtime_name)}),
        )
        .await
        .map(|_| ())
}

/// Renews (or creates) the node's Lease.
pub(crate) async fn renew_lease(client: &ApiClient, cfg: &AgentConfig) -> Result<(), ClientError> {
    let path = lease_path(&cfg.node_name);
    let now = now_micro();
    let duration = cfg.lease_duration.as_secs().max(1);
    for _ in 0..3 {
        match client.get(&path).await? {
            None => {
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": cfg.node_name, "namespace": LEASE_NAMESPACE},
                    "spec": {
                        "holderIdentity": cfg.node_name,
                        "leaseDurationSeconds": duration,
                        "renewTime": now,
                    },
                });
                match client
                    .create(
                        &format!(
                            "/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
                        ),
                        &lease,
                    )
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
            Some(mut lease) => {
                lease["spec"]["holderIdentity"] = json!(cfg.node_name);
                lease["spec"]["leaseDurationSeconds"] = json!(duration);
                lease["spec"]["renewTime"] = json!(now);
                match client.update(&path, &lease).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Err(ClientError::Status {
        code: 409,
        reason: "Conflict".into(),
        message: "lease kept changing under the agent".into(),
    })
}
