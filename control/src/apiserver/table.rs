//! Server-side `Table` output for `kubectl get`, with the columns Kubernetes prints per kind.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::resources::Resource;

/// A column: name, type, priority (1 = only with `-o wide`).
struct Col(&'static str, &'static str, u8);

fn columns(kind: &str) -> Vec<Col> {
    let name = Col("Name", "string", 0);
    let age = Col("Age", "string", 0);
    match kind {
        "Pod" => vec![
            name,
            Col("Ready", "string", 0),
            Col("Status", "string", 0),
            Col("Restarts", "string", 0),
            age,
            Col("IP", "string", 1),
            Col("Node", "string", 1),
            Col("Nominated Node", "string", 1),
            Col("Readiness Gates", "string", 1),
        ],
        "Node" => vec![
            name,
            Col("Status", "string", 0),
            Col("Roles", "string", 0),
            age,
            Col("Version", "string", 0),
            Col("Internal-IP", "string", 1),
            Col("External-IP", "string", 1),
            Col("OS-Image", "string", 1),
            Col("Kernel-Version", "string", 1),
            Col("Container-Runtime", "string", 1),
        ],
        "Namespace" => vec![name, Col("Status", "string", 0), age],
        "Service" => vec![
            name,
            Col("Type", "string", 0),
            Col("Cluster-IP", "string", 0),
            Col("External-IP", "string", 0),
            Col("Port(s)", "string", 0),
            age,
            Col("Selector", "string", 1),
        ],
        "Endpoints" => vec![name, Col("Endpoints", "string", 0), age],
        "Event" => vec![
            Col("Last Seen", "string", 0),
            Col("Type", "string", 0),
            Col("Reason", "string", 0),
            Col("Object", "string", 0),
            Col("Message", "string", 0),
        ],
        "ConfigMap" => vec![name, Col("Data", "integer", 0), age],
        "Secret" => vec![
            name,
            Col("Type", "string", 0),
            Col("Data", "integer", 0),
            age,
        ],
        "Deployment" => vec![
            name,
            Col("Ready", "string", 0),
            Col("Up-to-date", "integer", 0),
            Col("Available", "integer", 0),
            age,
            Col("Containers", "string", 1),
            Col("Images", "string", 1),
            Col("Selector", "string", 1),
        ],
        "ReplicaSet" => vec![
            name,
            Col("Desired", "integer", 0),
            Col("Current", "integer", 0),
            Col("Ready", "integer", 0),
            age,
            Col("Containers", "string", 1),
            Col("Images", "string", 1),
            Col("Selector", "string", 1),
        ],
        "Lease" => vec![name, Col("Holder", "string", 0), age],
        "RuntimeClass" => vec![name, Col("Handler", "string", 0), age],
        _ => vec![name, Col("Created At", "date", 0)],
    }
}

/// `kubectl`'s short human duration (`5s`, `3m10s`, `4h`, `2d3h`, `400d`).
pub(crate) fn human_duration(secs: i64) -> String {
    /// `3m` or `3m10s`: the larger unit, then the remainder in the smaller one unless it is 0.
    fn two_units(major: i64, major_unit: &str, minor: i64, minor_unit: &str) -> String {
        if minor == 0 {
            format!("{major}{major_unit}")
        } else {
            format!("{major}{major_unit}{minor}{minor_unit}")
        }
    }
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        two_units(m, "m", s % 60, "s")
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        two_units(h, "h", m % 60, "m")
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        two_units(d, "d", h % 24, "h")
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age(ts: Option<&Value>, now: DateTime<Utc>) -> String {
    match ts
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn n(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(x: &str) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x.to_string()
    }
}

fn pod_status(pod: &Value) -> String {
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason = s(pod, "/status/reason").to_string();
    if reason.is_empty() {
        reason = s(pod, "/status/phase").to_string();
    }
    if let Some(cs) = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
    {
        for c in cs.iter().rev() {
            let w = s(c, "/state/waiting/reason");
            let t = s(c, "/state/terminated/reason");
            if !w.is_empty() {
                reason = w.to_string();
            } else if !t.is_empty() {
                reason = t.to_string();
            } else if let Some(code) = c
                .pointer("/state/terminated/exitCode")
                .and_then(Value::as_i64)
            {
                reason = format!("ExitCode:{code}");
            }
        }
    }
    if reason.is_empty() {
        "Unknown".into()
    } else {
        reason
    }
}

fn containers_images(template_spec: Option<&Value>) -> (String, String) {
    let cs = template_spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    (names.join(","), images.join(","))
}

fn selector_text(sel: Option<&Value>) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
    {
        for (k, v) in m {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn cells(kind: &str, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let created = o.pointer("/metadata/creationTimestamp");
    let a = json!(age(created, now));
    match kind {
        "Pod" => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |cs| {
                cs.iter()
                    .filter(|c| c.get("ready") == Some(&json!(true)))
                    .count()
            });
            let restarts: i64 =
                statuses.map_or(0, |cs| cs.iter().map(|c| n(c, "/restartCount")).sum());
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts.to_string()),
                a,
                json!(or_none(s(o, "/status/podIP"))),
                json!(or_none(s(o, "/spec/nodeName"))),
                json!(or_none(s(o, "/status/nominatedNodeName"))),
                json!("<none>"),
            ]
        }
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| s(c, "/type") == "Ready"))
                .map(|c| s(c, "/status"));
            let mut status = match ready {
                Some("True") => "Ready".to_string(),
                _ => "NotReady".to_string(),
            };
            if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let addr = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| s(x, "/type") == t))
                    .map_or_else(|| "<none>".to_string(), |x| s(x, "/address").to_string())
            };
            let roles: Vec<String> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|l| {
                    l.keys()
                        .filter_map(|k| {
                            k.strip_prefix("node-role.kubernetes.io/")
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".into()
                } else {
                    roles.join(",")
                }),
                a,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(or_none(s(o, "/status/nodeInfo/osImage"))),
                json!(or_none(s(o, "/status/nodeInfo/kernelVersion"))),
                json!(or_none(s(o, "/status/nodeInfo/containerRuntimeVersion"))),
            ]
        }
        "Namespace" => vec![name, json!(s(o, "/status/phase")), a],
        "Service" => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let np = p
                                .get("nodePort")
                                .and_then(Value::as_i64)
                                .map(|x| format!(":{x}"))
                                .unwrap_or_default();
                            format!("{}{np}/{}", n(p, "/port"), s(p, "/protocol"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(s(o, "/spec/type")),
                json!(or_none(s(o, "/spec/clusterIP"))),
                json!("<none>"),
                json!(if ports.is_empty() {
                    "<none>".into()
                } else {
                    ports.join(",")
                }),
                a,
                json!(
                    o.pointer("/spec/selector")
                        .and_then(Value::as_object)
                        .map_or_else(
                            || "<none>".to_string(),
                            |m| m
                                .iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                ),
            ]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for sub in o
                .pointer("/subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ports: Vec<i64> = sub
                    .get("ports")
                    .and_then(Value::as_array)
                    .map(|p| p.iter().map(|x| n(x, "/port")).collect())
                    .unwrap_or_default();
                for addr in sub
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if ports.is_empty() {
                        eps.push(s(addr, "/ip").to_string());
                    }
                    for p in &ports {
                        eps.push(format!("{}:{p}", s(addr, "/ip")));
                    }
                }
            }
            vec![
                name,
                json!(if eps.is_empty() {
                    "<none>".into()
                } else {
                    eps.join(",")
                }),
                a,
            ]
        }
        "Event" => {
            let last = o
                .pointer("/lastTimestamp")
                .filter(|v| !v.is_null())
                .or_else(|| o.pointer("/eventTime"))
                .or(created);
            vec![
                json!(age(last, now)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(format!(
                    "{}/{}",
                    s(o, "/involvedObject/kind").to_lowercase(),
                    s(o, "/involvedObject/name")
                )),
                json!(s(o, "/message")),
            ]
        }
        "ConfigMap" => {
            let d = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, json!(d), a]
        }
        "Secret" => {
            let d = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![name, json!(s(o, "/type")), json!(d), a]
        }
        "Deployment" => {
            let (c, i) = containers_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    n(o, "/status/readyReplicas"),
                    n(o, "/spec/replicas")
                )),
                json!(n(o, "/status/updatedReplicas")),
                json!(n(o, "/status/availableReplicas")),
                a,
                json!(c),
                json!(i),
                json!(selector_text(o.pointer("/spec/selector"))),
            ]
        }
        "ReplicaSet" => {
            let (c, i) = containers_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                json!(n(o, "/spec/replicas")),
                json!(n(o, "/status/replicas")),
                json!(n(o, "/status/readyReplicas")),
                a,
                json!(c),
                json!(i),
                json!(selector_text(o.pointer("/spec/selector"))),
            ]
        }
        "Lease" => vec![name, json!(or_none(s(o, "/spec/holderIdentity"))), a],
        "RuntimeClass" => vec![name, json!(s(o, "/handler")), a],
        _ => vec![
            name,
            json!(created.and_then(Value::as_str).unwrap_or_default()),
        ],
    }
}

fn column_definitions(kind: &str) -> Value {
    columns(kind)
        .into_iter()
        .map(|Col(name, ty, prio)| {
            json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" },
                   "description": "", "priority": prio})
        })
        .collect()
}

fn row(res: &Resource, o: &Value, now: DateTime<Utc>) -> Value {
    let mut meta = o.get("metadata").cloned().unwrap_or_else(|| json!({}));
    if let Value::Object(m) = &mut meta {
        m.remove("managedFields");
    }
    json!({
        "cells": cells(res.kind, o, now),
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    })
}

/// A `Table` for a list of objects.
pub(crate) fn table(
    res: &Resource,
    items: &[Value],
    list_meta: Value,
    with_columns: bool,
) -> Value {
    let now = Utc::now();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": items.iter().map(|o| row(res, o, now)).collect::<Vec<_>>(),
    });
    if with_columns {
        t["columnDefinitions"] = column_definitions(res.kind);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(190), "3m10s");
        assert_eq!(human_duration(3600 * 4), "4h");
        assert_eq!(human_duration(86400 * 2 + 3600 * 3), "2d3h");
        assert_eq!(human_duration(86400 * 400), "400d");
    }

    #[test]
    fn pod_row() {
        let res = find("", "v1", "pods").expect("pods");
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let t = table(res, &[pod], json!({}), true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "p");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "3");
        assert_eq!(cells[5], "10.0.0.5");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
