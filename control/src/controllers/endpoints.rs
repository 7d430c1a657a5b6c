//! Endpoints controller: keeps one `Endpoints` object per Service with a selector, listing the
//! pods the selector matches (Kubernetes' `endpoint-controller`).
//!
//! - Ready pods go to `addresses`, the others to `notReadyAddresses` (all to `addresses` when
//!   the Service sets `publishNotReadyAddresses`); terminating and ended pods are left out.
//! - Each Service port's `targetPort` is resolved per pod: a number as is, a name through the
//!   pod's container ports (a pod without that named port gets no such port); pods whose
//!   resolved ports differ land in different subsets, as in Kubernetes.
//! - A pod's address is its `podIP`, else its `hostIP`: wasm pods share their node's network,
//!   like `hostNetwork` pods, so the agent reports only the host address.
//! - Services without a selector are left alone (their Endpoints are the user's); the Endpoints
//!   of a deleted Service are deleted.
//!
//! Level-triggered from the informer caches: keys are Services; a pod change queues the
//! Services whose selectors match its old or new labels.
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::informer::Informer;
use super::labels::{is_deleting, labels_of, name_of, namespace_of, selector_matches, uid_of};
use super::queue::{Action, ReconcileError, Reconciler};
use super::{Context, pod_is_ready, pod_is_terminal};

/// The Endpoints reconciler.
pub struct EndpointsController {
    pub(crate) ctx: Arc<Context>,
    pub(crate) services: Informer,
    pub(crate) endpoints: Informer,
}

fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("default", key))
}

fn endpoints_path(ns: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/endpoints/{name}")
}

/// A Service's selector as a `LabelSelector` (`spec.selector` is a plain label map); `None`
/// when it has none, which means "not managed by this controller".
fn service_selector(svc: &Value) -> Option<Value> {
    svc.pointer("/spec/selector")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
        .map(|m| json!({"matchLabels": m}))
}

/// Keys of the Services in the pod's namespace whose selectors match the pod.
pub(crate) fn services_for_pod(services: &Informer, pod: &Value) -> Vec<String> {
    let ns = namespace_of(pod);
    services
        .list()
        .iter()
        .filter(|s| namespace_of(s) == ns)
        .filter(|s| {
            service_selector(s).is_some_and(|sel| selector_matches(Some(&sel), labels_of(pod)))
        })
        .map(|s| format!("{ns}/{}", name_of(s)))
        .collect()
}

/// The container port named `name` in the pod.
fn named_port(pod: &Value, name: &str) -> Option<i64> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)?
        .iter()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
        })
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("containerPort").and_then(Value::as_i64))
}

/// The `EndpointPort`s of `pod` for the Service's ports.
fn pod_ports(svc: &Value, pod: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let port = p.get("port").and_then(Value::as_i64);
        let target = match p.get("targetPort") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => match s.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => named_port(pod, s),
            },
            _ => port,
        };
        let Some(target) = target else {
            continue;
        };
        let mut ep = json!({
            "port": target,
            "protocol": p.get("protocol").and_then(Value::as_str).unwrap_or("TCP"),
        });
        if let Some(n) = p
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            ep["name"] = json!(n);
        }
        out.push(ep);
    }
    out
}

fn address(pod: &Value) -> Option<Value> {
    let ip = ["/status/podIP", "/status/hostIP"].iter().find_map(|p| {
        pod.pointer(p)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    })?;
    let mut a = json!({
        "ip": ip,
        "targetRef": {"kind": "Pod", "namespace": namespace_of(pod), "name": name_of(pod), "uid": uid_of(pod)},
    });
    if let Some(n) = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        a["nodeName"] = json!(n);
    }
    Some(a)
}

/// The subsets for `svc` over `pods` (all in its namespace), in a stable order.
pub(crate) fn subsets(svc: &Value, pods: &[Arc<Value>]) -> Vec<Value> {
    let Some(selector) = service_selector(svc) else {
        return Vec::new();
    };
    let publish_all = svc
        .pointer("/spec/publishNotReadyAddresses")
        .and_then(Value::as_bool)
        == Some(true);
    // Resolved ports (as JSON text, for ordering) -> (ports, ready, not ready).
    type Group = (Vec<Value>, Vec<Value>, Vec<Value>);
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for pod in pods {
        if is_deleting(pod)
            || pod_is_terminal(pod)
            || !selector_matches(Some(&selector), labels_of(pod))
        {
            continue;
        }
        let Some(addr) = address(pod) else {
            continue;
        };
        let ports = pod_ports(svc, pod);
        let g = groups
            .entry(Value::Array(ports.clone()).to_string())
            .or_insert_with(|| (ports, Vec::new(), Vec::new()));
        if publish_all || pod_is_ready(pod) {
            g.1.push(addr);
        } else {
            g.2.push(addr);
        }
    }
    let order = |a: &Value| {
        (
            a.get("ip")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            a.pointer("/targetRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )
    };
    groups
        .into_values()
        .map(|(ports, mut ready, mut not_ready)| {
            ready.sort_by_key(order);
            not_ready.sort_by_key(order);
            let mut s = json!({});
            if !ready.is_empty() {
                s["addresses"] = Value::Array(ready);
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = Value::Array(not_ready);
            }
            if !ports.is_empty() {
                s["ports"] = Value::Array(ports);
            }
            s
        })
        .collect()
}

impl Reconciler for EndpointsController {
    fn name(&self) -> &'static str {
        "endpoints"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ReconcileError> {
        let (ns, name) = split(key);
        let client = &self.ctx.client;
        let path = endpoints_path(ns, name);
        let Some(svc) = self.services.get(key) else {
            // Gone from the cache: confirm before deleting its Endpoints.
            if self.endpoints.get(key).is_some()
                && client
                    .get(&format!("/api/v1/namespaces/{ns}/services/{name}"))
                    .await?
                    .is_none()
            {
                match client.delete(&path, None).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(Action::Done);
        };
        if service_selector(&svc).is_none() {
            return Ok(Action::Done);
        }
        let pods: Vec<Arc<Value>> = self
            .ctx
            .pods
            .list()
            .into_iter()
            .filter(|p| namespace_of(p) == ns)
            .collect();
        let want = Value::Array(subsets(&svc, &pods));
        let labels = svc
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        match self.endpoints.get(key) {
            None => {
                let ep = json!({
                    "apiVersion": "v1", "kind": "Endpoints",
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "subsets": want,
                });
                match client
                    .create(&format!("/api/v1/namespaces/{ns}/endpoints"), &ep)
                    .await
                {
                    Ok(_) => {}
                    // The cache is behind: the next change event brings it, and us, back.
                    Err(e) if e.is_conflict() => {
                        return Err(ReconcileError("endpoints exist but not yet cached".into()));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(cur) => {
                let have = cur.get("subsets").cloned().unwrap_or(json!([]));
                let have_labels = cur
                    .pointer("/metadata/labels")
                    .cloned()
                    .unwrap_or(json!({}));
                if have != want || have_labels != labels {
                    let mut ep = (*cur).clone();
                    ep["subsets"] = want;
                    ep["metadata"]["labels"] = labels;
                    // Optimistic concurrency: a stale cache gets a conflict and a retry.
                    client.update(&path, &ep).await?;
                }
            }
        }
        Ok(Action::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, port_name: &str, port: i64) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": port_name, "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
    }

    fn svc(target: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": target}]}})
    }

    #[test]
    fn ready_and_not_ready_with_named_ports() {
        let pods = vec![
            pod("b", "10.0.0.2", true, "web", 8080),
            pod("a", "10.0.0.1", true, "web", 8080),
            pod("c", "10.0.0.3", false, "web", 8080),
            // Same port name, another number: another subset.
            pod("d", "10.0.0.4", true, "web", 9090),
        ];
        let s = subsets(&svc(json!("web")), &pods);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0]["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        let ips: Vec<&str> = s[0]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["ip"].as_str().unwrap())
            .collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(s[0]["notReadyAddresses"][0]["ip"], "10.0.0.3");
        assert_eq!(s[0]["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(s[1]["ports"][0]["port"], 9090);
        // A numeric targetPort is used as is.
        let s = subsets(&svc(json!(7000)), &pods);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0]["ports"][0]["port"], 7000);
        assert_eq!(s[0]["addresses"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn terminating_unmatched_and_selectorless() {
        let mut gone = (*pod("x", "10.0.0.9", true, "web", 80)).clone();
        gone["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let mut other = (*pod("y", "10.0.0.8", true, "web", 80)).clone();
        other["metadata"]["labels"] = json!({"app": "db"});
        let mut host_only = (*pod("z", "", true, "web", 80)).clone();
        host_only["status"]["hostIP"] = json!("192.168.1.5");
        let pods = vec![Arc::new(gone), Arc::new(other), Arc::new(host_only)];
        let s = subsets(&svc(json!("web")), &pods);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0]["addresses"][0]["ip"], "192.168.1.5");
        let mut no_sel = svc(json!(80));
        no_sel["spec"].as_object_mut().unwrap().remove("selector");
        assert!(subsets(&no_sel, &pods).is_empty());
    }
}
