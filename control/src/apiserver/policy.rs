//! Namespace policies applied at admission: LimitRange defaults and bounds, Pod Security
//! Standards (namespace label `pod-security.kubernetes.io/enforce|warn`), ResourceQuota.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::admission::parse_quantity;
use super::handlers::{App, decode, encode};
use super::resources::{self, Resource};
use super::status::ApiError;
use crate::storage::{Guard, Store, TxnOp};

type Result<T> = std::result::Result<T, ApiError>;

async fn list_in<S: Store>(app: &App<S>, plural: &str, ns: &str) -> Result<Vec<(Value, i64)>> {
    let res = resources::find("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} not registered")))?;
    let (kvs, _) = app.store.list(&res.list_prefix(Some(ns))).await?;
    kvs.iter()
        .map(|kv| Ok((decode(res, kv)?, kv.mod_revision)))
        .collect()
}

/// `list_in` through the admission cache (LimitRanges, ResourceQuotas).
async fn cached_list<S: Store>(
    app: &App<S>,
    plural: &str,
    ns: &str,
) -> Result<std::sync::Arc<Vec<(Value, i64)>>> {
    let key = format!("{plural}/{ns}");
    if let Some(v) = app.admission_cache.get(&key) {
        return Ok(v);
    }
    let v = std::sync::Arc::new(list_in(app, plural, ns).await?);
    app.admission_cache.put(key, v.clone());
    Ok(v)
}
fn forbidden(res: &Resource, name: &str, why: &str) -> ApiError {
    ApiError::new(
        403,
        "Forbidden",
        format!("{} \"{name}\" is forbidden: {why}", res.plural),
    )
}

fn containers_mut(pod: &mut Value) -> Vec<&mut Map<String, Value>> {
    let mut out = Vec::new();
    if let Some(Value::Object(spec)) = pod.get_mut("spec") {
        for (k, v) in spec.iter_mut() {
            if (k == "containers" || k == "initContainers")
                && let Value::Array(cs) = v
            {
                out.extend(cs.iter_mut().filter_map(Value::as_object_mut));
            }
        }
    }
    out
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|l| pod.pointer(&format!("/spec/{l}")).and_then(Value::as_array))
        .flatten()
        .collect()
}

fn q(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::String(s) => parse_quantity(s),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

// ---------------------------------------------------------------------------------------------
// LimitRange

/// Applies `Container` LimitRange defaults, then checks min/max. Pods only.
pub(crate) async fn limit_ranges<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: &str,
    pod: &mut Value,
) -> Result<()> {
    if res.kind != "Pod" {
        return Ok(());
    }
    let ranges = cached_list(app, "limitranges", ns).await?;
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    for (lr, _) in ranges.iter() {
        for item in lr
            .pointer("/spec/limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if item.get("type").and_then(Value::as_str) != Some("Container") {
                continue;
            }
            for c in containers_mut(pod) {
                let resources = c.entry("resources").or_insert_with(|| json!({}));
                for (field, target) in [("default", "limits"), ("defaultRequest", "requests")] {
                    if let Some(Value::Object(defs)) = item.get(field) {
                        let t = resources
                            .as_object_mut()
                            .map(|r| r.entry(target).or_insert_with(|| json!({})));
                        if let Some(Value::Object(t)) = t {
                            for (k, v) in defs {
                                t.entry(k.clone()).or_insert_with(|| v.clone());
                            }
                        }
                    }
                }
            }
            for c in containers(pod) {
                for (bound, is_max) in [("max", true), ("min", false)] {
                    let Some(Value::Object(b)) = item.get(bound) else {
                        continue;
                    };
                    for (k, limit) in b {
                        let have = if is_max {
                            c.pointer(&format!("/resources/limits/{k}"))
                        } else {
                            c.pointer(&format!("/resources/requests/{k}"))
                        };
                        let (Some(h), Some(l)) = (q(have), q(Some(limit))) else {
                            if is_max && have.is_none() {
                                return Err(forbidden(
                                    res,
                                    &name,
                                    &format!(
                                        "maximum {k} usage per Container is {}.  No limit is specified",
                                        text(limit)
                                    ),
                                ));
                            }
                            continue;
                        };
                        if is_max && h > l {
                            return Err(forbidden(
                                res,
                                &name,
                                &format!(
                                    "maximum {k} usage per Container is {}, but limit is {}",
                                    text(limit),
                                    have.map(text).unwrap_or_default()
                                ),
                            ));
                        }
                        if !is_max && h < l {
                            return Err(forbidden(
                                res,
                                &name,
                                &format!(
                                    "minimum {k} usage per Container is {}, but request is {}",
                                    text(limit),
                                    have.map(text).unwrap_or_default()
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pod Security Standards

const BASELINE_CAPS: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

fn cname(c: &Value) -> String {
    c.get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn containers_word(names: &[String]) -> &'static str {
    if names.len() == 1 {
        "container"
    } else {
        "containers"
    }
}

/// Checks a pod spec against `level` (`baseline` or `restricted`); returns the violations in
/// the Kubernetes wording.
pub(crate) fn pod_security_violations(spec: &Value, level: &str) -> Vec<String> {
    let mut out = Vec::new();
    if level != "baseline" && level != "restricted" {
        return out;
    }
    let cs: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|l| spec.get(*l).and_then(Value::as_array))
        .flatten()
        .collect();
    let hostns: Vec<String> = ["hostNetwork", "hostPID", "hostIPC"]
        .iter()
        .filter(|f| spec.get(**f) == Some(&json!(true)))
        .map(|f| format!("{f}=true"))
        .collect();
    if !hostns.is_empty() {
        out.push(format!("host namespaces ({})", hostns.join(", ")));
    }
    let privileged: Vec<String> = cs
        .iter()
        .filter(|c| c.pointer("/securityContext/privileged") == Some(&json!(true)))
        .map(|c| cname(c))
        .collect();
    if !privileged.is_empty() {
        out.push(format!(
            "privileged ({} {} must not set securityContext.privileged=true)",
            containers_word(&privileged),
            quoted(&privileged)
        ));
    }
    let mut bad_caps = Vec::new();
    for c in &cs {
        for cap in c
            .pointer("/securityContext/capabilities/add")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let cap = cap.as_str().unwrap_or_default();
            let allowed = if level == "restricted" {
                cap == "NET_BIND_SERVICE"
            } else {
                BASELINE_CAPS.contains(&cap)
            };
            if !allowed {
                bad_caps.push(format!("{cap:?}"));
            }
        }
    }
    if !bad_caps.is_empty() && level == "baseline" {
        out.push(format!("non-default capabilities (containers must not include {} in securityContext.capabilities.add)", bad_caps.join(", ")));
    }
    let host_path: Vec<String> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("hostPath").is_some())
        .map(|v| {
            v.get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    if !host_path.is_empty() {
        out.push(format!("hostPath volumes (volume {})", quoted(&host_path)));
    }
    let host_ports: Vec<String> = cs
        .iter()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|p| {
            p.get("hostPort")
                .and_then(Value::as_i64)
                .filter(|h| *h != 0)
        })
        .map(|h| h.to_string())
        .collect();
    if !host_ports.is_empty() {
        out.push(format!(
            "hostPort (container port uses hostPort {})",
            host_ports.join(", ")
        ));
    }
    let unconfined = |v: Option<&Value>| v.and_then(Value::as_str) == Some("Unconfined");
    if unconfined(spec.pointer("/securityContext/seccompProfile/type"))
        || cs
            .iter()
            .any(|c| unconfined(c.pointer("/securityContext/seccompProfile/type")))
    {
        out.push("seccompProfile (pod or containers must not set securityContext.seccompProfile.type to \"Unconfined\")".into());
    }
    if level != "restricted" {
        return out;
    }
    let bad_volumes: Vec<String> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| {
            v.as_object().is_some_and(|m| {
                m.keys()
                    .any(|k| k != "name" && !RESTRICTED_VOLUMES.contains(&k.as_str()))
            })
        })
        .map(|v| {
            v.get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    if !bad_volumes.is_empty() {
        out.push(format!(
            "restricted volume types (volume {} uses a restricted volume type)",
            quoted(&bad_volumes)
        ));
    }
    let escalating: Vec<String> = cs
        .iter()
        .filter(|c| c.pointer("/securityContext/allowPrivilegeEscalation") != Some(&json!(false)))
        .map(|c| cname(c))
        .collect();
    if !escalating.is_empty() {
        out.push(format!(
            "allowPrivilegeEscalation != false ({} {} must set securityContext.allowPrivilegeEscalation=false)",
            containers_word(&escalating),
            quoted(&escalating)
        ));
    }
    let caps: Vec<String> = cs
        .iter()
        .filter(|c| {
            let drops_all = c
                .pointer("/securityContext/capabilities/drop")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|x| x == "ALL"));
            let adds_ok = c
                .pointer("/securityContext/capabilities/add")
                .and_then(Value::as_array)
                .is_none_or(|a| a.iter().all(|x| x == "NET_BIND_SERVICE"));
            !(drops_all && adds_ok)
        })
        .map(|c| cname(c))
        .collect();
    if !caps.is_empty() {
        out.push(format!(
            "unrestricted capabilities ({} {} must set securityContext.capabilities.drop=[\"ALL\"])",
            containers_word(&caps),
            quoted(&caps)
        ));
    }
    let pod_non_root = spec.pointer("/securityContext/runAsNonRoot") == Some(&json!(true));
    let root_ok: Vec<String> = cs
        .iter()
        .filter(|c| match c.pointer("/securityContext/runAsNonRoot") {
            Some(v) => v != &json!(true),
            None => !pod_non_root,
        })
        .map(|c| cname(c))
        .collect();
    if !root_ok.is_empty() {
        out.push(format!(
            "runAsNonRoot != true (pod or {} {} must set securityContext.runAsNonRoot=true)",
            containers_word(&root_ok),
            quoted(&root_ok)
        ));
    }
    let runs_as_root = spec.pointer("/securityContext/runAsUser") == Some(&json!(0))
        || cs
            .iter()
            .any(|c| c.pointer("/securityContext/runAsUser") == Some(&json!(0)));
    if runs_as_root {
        out.push("runAsUser=0 (pod and containers must not set runAsUser=0)".into());
    }
    let good_seccomp = |v: Option<&Value>| {
        matches!(
            v.and_then(Value::as_str),
            Some("RuntimeDefault" | "Localhost")
        )
    };
    let pod_seccomp = good_seccomp(spec.pointer("/securityContext/seccompProfile/type"));
    let no_seccomp: Vec<String> = cs
        .iter()
        .filter(
            |c| match c.pointer("/securityContext/seccompProfile/type") {
                Some(v) => !good_seccomp(Some(v)),
                None => !pod_seccomp,
            },
        )
        .map(|c| cname(c))
        .collect();
    if !no_seccomp.is_empty() {
        out.push(format!(
            "seccompProfile (pod or {} {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            containers_word(&no_seccomp),
            quoted(&no_seccomp)
        ));
    }
    out
}

/// Enforces the namespace's Pod Security level on pods; returns `warn`-level warnings (also for
/// workload templates, which are never rejected, as in Kubernetes).
pub(crate) async fn pod_security<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: &str,
    obj: &Value,
) -> Result<Vec<String>> {
    let spec = match res.kind {
        "Pod" => obj.get("spec"),
        "Deployment" | "ReplicaSet" => obj.pointer("/spec/template/spec"),
        _ => return Ok(Vec::new()),
    };
    let Some(spec) = spec else {
        return Ok(Vec::new());
    };
    let Some(nsobj) = app.namespace(ns).await? else {
        return Ok(Vec::new());
    };
    let label = |mode: &str| {
        nsobj
            .pointer("/metadata/labels")
            .and_then(|l| l.get(format!("pod-security.kubernetes.io/{mode}")))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut warnings = Vec::new();
    if let Some(level) = label("enforce") {
        let v = pod_security_violations(spec, &level);
        if !v.is_empty() {
            if res.kind == "Pod" {
                return Err(forbidden(
                    res,
                    name,
                    &format!("violates PodSecurity \"{level}:latest\": {}", v.join(", ")),
                ));
            }
            warnings.push(format!(
                "would violate PodSecurity \"{level}:latest\": {}",
                v.join(", ")
            ));
        }
    }
    if let Some(level) = label("warn") {
        let v = pod_security_violations(spec, &level);
        if !v.is_empty() {
            warnings.push(format!(
                "would violate PodSecurity \"{level}:latest\": {}",
                v.join(", ")
            ));
        }
    }
    Ok(warnings)
}

// ---------------------------------------------------------------------------------------------
// ResourceQuota

fn pod_usage(pod: &Value) -> BTreeMap<String, f64> {
    let mut u = BTreeMap::new();
    u.insert("pods".to_string(), 1.0);
    u.insert("count/pods".to_string(), 1.0);
    for c in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for (kind, prefix) in [("requests", "requests."), ("limits", "limits.")] {
            if let Some(m) = c
                .pointer(&format!("/resources/{kind}"))
                .and_then(Value::as_object)
            {
                for (k, v) in m {
                    let n = q(Some(v)).unwrap_or(0.0);
                    *u.entry(format!("{prefix}{k}")).or_insert(0.0) += n;
                    if kind == "requests" {
                        *u.entry(k.clone()).or_insert(0.0) += n;
                    }
                }
            }
        }
    }
    u
}

fn format_amount(resource: &str, n: f64) -> String {
    if resource.ends_with("cpu") && n.fract() != 0.0 {
        return format!("{}m", (n * 1000.0).round());
    }
    if resource.ends_with("memory")
        && n >= 1024.0 * 1024.0
        && (n / (1024.0 * 1024.0)).fract() == 0.0
    {
        return format!("{}Mi", n / (1024.0 * 1024.0));
    }
    format!("{n}")
}

/// Checks every ResourceQuota of the namespace for a new object (pods: pod count and compute
/// resources; other kinds: `count/<plural>` and the object-count names) and answers 403 when a
/// hard limit would be exceeded. Returns, for each quota the object is charged to, a guard on
/// the quota's revision and the write of its new `status.used`: the caller commits them in
/// the object's own transaction, so two concurrent creates cannot both fit into the last slot
/// (Kubernetes guards quota usage with the quota's resourceVersion the same way). `fresh`
/// bypasses the admission cache (a retry after losing such a race).
pub(crate) async fn resource_quota<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: &str,
    obj: &Value,
    fresh: bool,
) -> Result<Vec<(Guard, TxnOp)>> {
    if res.kind == "ResourceQuota" || !res.namespaced {
        return Ok(Vec::new());
    }
    let quotas = if fresh {
        let v = std::sync::Arc::new(list_in(app, "resourcequotas", ns).await?);
        app.admission_cache
            .put(format!("resourcequotas/{ns}"), v.clone());
        v
    } else {
        cached_list(app, "resourcequotas", ns).await?
    };
    let charged = |q: &Value| {
        q.pointer("/spec/hard")
            .and_then(Value::as_object)
            .is_some_and(|hard| hard.keys().any(|k| requested_has(res, obj, k)))
    };
    if !quotas.iter().any(|(q, _)| charged(q)) {
        return Ok(Vec::new());
    }
    let requested: BTreeMap<String, f64> = if res.kind == "Pod" {
        pod_usage(obj)
    } else {
        let mut m = BTreeMap::new();
        m.insert(format!("count/{}", res.qualified_plural()), 1.0);
        if matches!(res.plural, "services" | "secrets" | "configmaps") {
            m.insert(res.plural.to_string(), 1.0);
        }
        m
    };
    // Usage recomputed from what is stored, so it heals after failed creates.
    let mut used: BTreeMap<String, f64> = BTreeMap::new();
    let existing = if res.kind == "Pod" {
        list_in(app, "pods", ns).await?
    } else {
        let (kvs, _) = app.store.list(&res.list_prefix(Some(ns))).await?;
        kvs.iter()
            .map(|kv| Ok((decode(res, kv)?, kv.mod_revision)))
            .collect::<Result<Vec<_>>>()?
    };
    for (o, _) in &existing {
        let terminal = matches!(
            o.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if terminal {
            continue;
        }
        let u = if res.kind == "Pod" {
            pod_usage(o)
        } else {
            requested.clone()
        };
        for (k, v) in u {
            *used.entry(k).or_insert(0.0) += v;
        }
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let qres = resources::find("", "v1", "resourcequotas")
        .ok_or_else(|| ApiError::internal("resourcequotas not registered"))?;
    let mut charges = Vec::new();
    for (quota, rev) in quotas.iter() {
        let Some(hard) = quota.pointer("/spec/hard").and_then(Value::as_object) else {
            continue;
        };
        if !charged(quota) {
            continue;
        }
        let mut req_txt = Vec::new();
        let mut used_txt = Vec::new();
        let mut lim_txt = Vec::new();
        let mut new_used = Map::new();
        for (k, limit) in hard {
            let Some(l) = q(Some(limit)) else { continue };
            let u = used.get(k).copied().unwrap_or(0.0);
            let r = requested.get(k).copied().unwrap_or(0.0);
            new_used.insert(k.clone(), json!(format_amount(k, u + r)));
            if r > 0.0 && u + r > l + 1e-9 {
                req_txt.push(format!("{k}={}", format_amount(k, r)));
                used_txt.push(format!("{k}={}", format_amount(k, u)));
                lim_txt.push(format!("{k}={}", text(limit)));
            }
        }
        let qname = quota
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !req_txt.is_empty() {
            return Err(forbidden(
                res,
                &name,
                &format!(
                    "exceeded quota: {qname}, requested: {}, used: {}, limited: {}",
                    req_txt.join(","),
                    used_txt.join(","),
                    lim_txt.join(",")
                ),
            ));
        }
        // The usage shown by `kubectl describe quota`, written with the object.
        let mut updated = quota.clone();
        updated["status"] = json!({"hard": hard, "used": new_used});
        let key = qres.key(Some(ns), qname);
        charges.push((
            Guard {
                key: key.clone(),
                mod_revision: *rev,
            },
            TxnOp::Put {
                key,
                value: encode(&updated),
            },
        ));
    }
    Ok(charges)
}

/// Whether a new object of `res` uses quota resource `k`.
fn requested_has(res: &Resource, obj: &Value, k: &str) -> bool {
    if res.kind == "Pod" {
        return pod_usage(obj).get(k).is_some_and(|v| *v > 0.0);
    }
    k == format!("count/{}", res.qualified_plural())
        || (k == res.plural && matches!(res.plural, "services" | "secrets" | "configmaps"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_security_levels() {
        let privileged = json!({"hostNetwork": true, "containers": [{"name": "c", "securityContext": {"privileged": true}}]});
        let v = pod_security_violations(&privileged, "baseline");
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("host namespaces (hostNetwork=true)"));
        assert!(pod_security_violations(&privileged, "privileged").is_empty());
        let plain = json!({"containers": [{"name": "c", "image": "x"}]});
        assert!(pod_security_violations(&plain, "baseline").is_empty());
        let r = pod_security_violations(&plain, "restricted");
        assert_eq!(r.len(), 4, "{r:?}");
        let hardened = json!({"securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]});
        assert!(pod_security_violations(&hardened, "restricted").is_empty());
    }

    #[test]
    fn quota_usage() {
        let pod = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "1"}}}]}});
        let u = pod_usage(&pod);
        assert_eq!(u["pods"], 1.0);
        assert_eq!(u["requests.cpu"], 0.25);
        assert_eq!(u["cpu"], 0.25);
        assert_eq!(u["limits.cpu"], 1.0);
        assert_eq!(format_amount("requests.cpu", 0.25), "250m");
        assert_eq!(
            format_amount("requests.memory", 64.0 * 1024.0 * 1024.0),
            "64Mi"
        );
    }
}
