//! Node registration, node status and the Lease heartbeat.
use serde_json::{Value, json};

use super::AgentConfig;
use super::client::{ApiClient, ClientError};
use super::runtimes::{CriState, HANDLER_WASMTIME, LEGACY_WASM_CLASS, RuntimeOffer};

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

/// Node condition type saying whether the CRI endpoint is unusable (`True`: the node runs
/// wasm pods only).
pub const CRI_CONDITION: &str = "ContainerRuntimeUnavailable";

/// What the node advertises about its runtimes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Advertised {
    /// The [`RUNTIME_CLASSES_ANNOTATION`] value.
    pub classes: String,
    /// `nodeInfo.containerRuntimeVersion`.
    pub runtime_version: String,
    /// The CRI endpoint's state, if the node has one.
    pub cri: Option<CriState>,
    /// Whether the eviction manager sees memory pressure.
    pub memory_pressure: bool,
}

impl Advertised {
    /// A fixed runtime named `runtime_name` offering `cfg.runtime_classes`.
    pub(crate) fn fixed(cfg: &AgentConfig, runtime_name: &str) -> Advertised {
        Advertised {
            classes: cfg.runtime_classes.join(","),
            runtime_version: format!("{runtime_name}://flotilla"),
            cri: None,
            memory_pressure: false,
        }
    }

    /// From a runtime offer: its handlers, `wasm` (the legacy class) with `wasmtime`, and the
    /// names of the RuntimeClass objects whose handler the node has, because the scheduler
    /// matches `runtimeClassName` against this list.
    pub(crate) async fn from_offer(client: &ApiClient, offer: &RuntimeOffer) -> Advertised {
        let mut classes: Vec<String> = offer.handlers.clone();
        if offer.handlers.iter().any(|h| h == HANDLER_WASMTIME) {
            classes.push(LEGACY_WASM_CLASS.into());
        }
        // Any other handler is a CRI one: the node runs OCI images, which the scheduler needs
        // for pods without a runtimeClassName whose images are not wasm modules.
        if offer.handlers.iter().any(|h| h != HANDLER_WASMTIME) {
            classes.push(api::pod::OCI_RUNTIME_CLASS.into());
        }
        match client.list("/apis/node.k8s.io/v1/runtimeclasses").await {
            Ok((items, _)) => {
                for rc in items {
                    let handler = rc
                        .get("handler")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let name = rc
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !name.is_empty() && offer.handlers.iter().any(|h| h == handler) {
                        classes.push(name.to_owned());
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "listing RuntimeClasses failed"),
        }
        classes.sort();
        classes.dedup();
        Advertised {
            classes: classes.join(","),
            runtime_version: offer.runtime_version.clone(),
            cri: offer.cri.clone(),
            memory_pressure: false,
        }
    }
}

/// The [`CRI_CONDITION`] condition, if the node has a CRI endpoint.
fn cri_condition(cri: Option<&CriState>, now: &str) -> Option<Value> {
    let cri = cri?;
    let (status, reason, message) = match &cri.error {
        Some(e) => (
            "True",
            "CRIEndpointUnreachable",
            format!(
                "container runtime endpoint {} does not answer ({e}); the node runs wasm pods \
                 only and rechecks periodically",
                cri.endpoint
            ),
        ),
        None => (
            "False",
            "CRIEndpointReady",
            format!("container runtime endpoint {} answers", cri.endpoint),
        ),
    };
    Some(json!({
        "type": CRI_CONDITION, "status": status, "reason": reason, "message": message,
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }))
}

/// The node's status as the agent reports it.
pub(crate) fn node_status(cfg: &AgentConfig, adv: &Advertised) -> Value {
    let now = now_rfc3339();
    let (status, reason, message) = if adv.memory_pressure {
        (
            "True",
            "KubeletHasInsufficientMemory",
            "kubelet has insufficient memory available",
        )
    } else {
        (
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        )
    };
    let mut conditions = vec![
        ready_condition(&now),
        json!({"type": "MemoryPressure", "status": status, "reason": reason,
         "message": message, "lastHeartbeatTime": now, "lastTransitionTime": now}),
    ];
    conditions.extend(cri_condition(adv.cri.as_ref(), &now));
    json!({
        "capacity": resources(cfg),
        "allocatable": resources(cfg),
        "conditions": conditions,
        "addresses": [
            {"type": "InternalIP", "address": cfg.address},
            {"type": "Hostname", "address": cfg.node_name},
        ],
        "nodeInfo": {
            "architecture": go_arch(),
            "operatingSystem": std::env::consts::OS,
            "osImage": "Flotilla",
            "kernelVersion": "",
            "containerRuntimeVersion": adv.runtime_version,
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
    adv: &Advertised,
) -> Result<(), ClientError> {
    let meta = json!({
        "name": cfg.node_name,
        "labels": labels(cfg),
        "annotations": {RUNTIME_CLASSES_ANNOTATION: adv.classes},
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
    post_status(client, cfg, adv).await
}

/// Posts the node's status (Ready with a fresh heartbeat time).
pub(crate) async fn post_status(
    client: &ApiClient,
    cfg: &AgentConfig,
    adv: &Advertised,
) -> Result<(), ClientError> {
    client
        .merge_patch(
            &format!("{}/status", node_path(&cfg.node_name)),
            &json!({"status": node_status(cfg, adv)}),
        )
        .await
        .map(|_| ())
}

/// Rewrites the node's runtime-classes annotation.
pub(crate) async fn post_classes(
    client: &ApiClient,
    cfg: &AgentConfig,
    adv: &Advertised,
) -> Result<(), ClientError> {
    client
        .merge_patch(
            &node_path(&cfg.node_name),
            &json!({"metadata": {"annotations": {RUNTIME_CLASSES_ANNOTATION: adv.classes}}}),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cri_condition_says_whether_the_endpoint_answers() {
        let now = "2026-11-28T00:00:00Z";
        assert_eq!(
            cri_condition(None, now),
            None,
            "no CRI endpoint, no condition"
        );
        let down = CriState {
            endpoint: "unix:///run/x.sock".into(),
            error: Some("connection refused".into()),
        };
        let c = cri_condition(Some(&down), now).unwrap();
        assert_eq!(
            (
                c["type"].as_str(),
                c["status"].as_str(),
                c["reason"].as_str()
            ),
            (
                Some(CRI_CONDITION),
                Some("True"),
                Some("CRIEndpointUnreachable")
            )
        );
        let msg = c["message"].as_str().unwrap();
        assert!(
            msg.contains("unix:///run/x.sock") && msg.contains("connection refused"),
            "{msg}"
        );
        let up = CriState {
            error: None,
            ..down
        };
        let c = cri_condition(Some(&up), now).unwrap();
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("CRIEndpointReady"))
        );
        let cfg = AgentConfig::new("n", "https://127.0.0.1:1");
        let adv = Advertised {
            classes: "runc,wasm,wasmtime".into(),
            runtime_version: "containerd://1.6.20".into(),
            cri: Some(up),
            memory_pressure: false,
        };
        let status = node_status(&cfg, &adv);
        assert_eq!(
            status["nodeInfo"]["containerRuntimeVersion"],
            "containerd://1.6.20"
        );
        assert!(
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == CRI_CONDITION)
        );
        assert_eq!(Advertised::fixed(&cfg, "wasm").classes, "wasm");
        let memory = |adv: &Advertised| {
            let status = node_status(&cfg, adv);
            let c = status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "MemoryPressure")
                .cloned()
                .unwrap();
            (
                c["status"].clone(),
                c["reason"].clone(),
                c["message"].clone(),
            )
        };
        let pressed = Advertised {
            memory_pressure: true,
            ..adv.clone()
        };
        assert_eq!(
            memory(&pressed),
            (
                json!("True"),
                json!("KubeletHasInsufficientMemory"),
                json!("kubelet has insufficient memory available")
            )
        );
        assert_eq!(
            memory(&adv),
            (
                json!("False"),
                json!("KubeletHasSufficientMemory"),
                json!("kubelet has sufficient memory available")
            )
        );
    }
}
