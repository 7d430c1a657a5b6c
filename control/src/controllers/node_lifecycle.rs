//! Node lifecycle: Lease heartbeats → the node's `Ready` condition (`Unknown` once the lease is
//! older than the grace period) → `node.kubernetes.io/not-ready|unreachable` taints (NoSchedule
//! and NoExecute) → eviction of pods that do not tolerate them, after their
//! `tolerationSeconds` (default 300 s, configurable, as the DefaultTolerationSeconds admission
//! plugin would set).
//!
//! Lease freshness is judged by when this controller *saw* the lease change, not by the
//! timestamp written in it, so clock skew between machines cannot mark a node dead.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::labels::{is_deleting, name_of, namespace_of};
use super::{Context, pod_is_terminal, record_event};

/// Taint of a node whose agent stopped heartbeating.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint of a node that reports `Ready=False`.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn ready_status(node: &Value) -> Option<String> {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status").and_then(Value::as_str))
        .map(str::to_string)
}

/// Whether `toleration` tolerates `taint` (operator `Exists`/`Equal`, empty key = all keys,
/// empty effect = all effects).
pub fn tolerates(toleration: &Value, taint: &Value) -> bool {
    fn s<'a>(v: &'a Value, f: &str) -> &'a str {
        v.get(f).and_then(Value::as_str).unwrap_or_default()
    }
    let (tk, te) = (s(toleration, "key"), s(toleration, "effect"));
    if !te.is_empty() && te != s(taint, "effect") {
        return false;
    }
    let op = s(toleration, "operator");
    if tk.is_empty() {
        return op == "Exists";
    }
    if tk != s(taint, "key") {
        return false;
    }
    match op {
        "Exists" => true,
        "" | "Equal" => s(toleration, "value") == s(taint, "value"),
        _ => false,
    }
}

struct Seen {
    renew: String,
    at: Instant,
}

/// Runs the node monitor and the NoExecute taint eviction until `shutdown`.
pub(crate) async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    ctx.nodes.wait_synced().await;
    ctx.leases.wait_synced().await;
    ctx.pods.wait_synced().await;
    loop {
        monitor(&ctx, &mut seen).await;
        evict(&ctx).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.config.node_monitor_period) => {}
        }
    }
}

async fn monitor(ctx: &Context, seen: &mut HashMap<String, Seen>) {
    let grace = ctx.config.node_monitor_grace_period;
    let nodes = ctx.nodes.list();
    let names: std::collections::HashSet<&str> = nodes.iter().map(|x| name_of(x)).collect();
    seen.retain(|n, _| names.contains(n.as_str()));
    for node in nodes {
        let name = name_of(&node).to_string();
        let renew = ctx
            .leases
            .get(&format!("kube-node-lease/{name}"))
            .and_then(|l| {
                l.pointer("/spec/renewTime")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let entry = seen.entry(name.clone()).or_insert_with(|| Seen {
            renew: renew.clone(),
            at: Instant::now(),
        });
        if entry.renew != renew {
            *entry = Seen {
                renew,
                at: Instant::now(),
            };
        }
        let fresh = !entry.renew.is_empty() && entry.at.elapsed() <= grace;
        let expired = entry.at.elapsed() > grace;
        let ready = ready_status(&node);
        let now = now_rfc3339();
        // Condition: Unknown when the lease expired; back to True when it is fresh again after
        // we marked it Unknown (the agent also re-posts Ready periodically).
        let new_ready = if expired && ready.as_deref() != Some("Unknown") {
            Some((
                "Unknown",
                "NodeStatusUnknown",
                "Kubelet stopped posting node status.",
            ))
        } else if fresh && ready.as_deref() == Some("Unknown") {
            Some(("True", "KubeletReady", "kubelet is posting ready status"))
        } else {
            None
        };
        let mut effective_ready = ready.clone();
        if let Some((status, reason, message)) = new_ready {
            let mut conditions: Vec<Value> = node
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut found = false;
            for c in &mut conditions {
                let is_ready = c.get("type").and_then(Value::as_str) == Some("Ready");
                if is_ready || status == "Unknown" {
                    c["status"] = json!(status);
                    c["lastTransitionTime"] = json!(now);
                    if is_ready {
                        c["reason"] = json!(reason);
                        c["message"] = json!(message);
                        found = true;
                    } else {
                        c["reason"] = json!("NodeStatusUnknown");
                        c["message"] = json!(message);
                    }
                }
            }
            if !found {
                conditions.push(json!({"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": now, "lastHeartbeatTime": now}));
            }
            let path = format!("/api/v1/nodes/{name}/status");
            match ctx
                .client
                .merge_patch(&path, &json!({"status": {"conditions": conditions}}))
                .await
            {
                Ok(_) => {
                    effective_ready = Some(status.to_string());
                    let kind = if status == "True" {
                        "NodeReady"
                    } else {
                        "NodeNotReady"
                    };
                    let msg = format!("Node {name} status is now: {kind}");
                    record_event(ctx, &node, "Normal", kind, &msg, "node-controller").await;
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "failed to update node condition")
                }
            }
        }
        // Taints follow the condition.
        // A node still registering (no Ready condition yet) gets the grace period too.
        let want_key = match effective_ready.as_deref() {
            Some("True") => None,
            Some("False") => Some(NOT_READY),
            Some(_) => Some(UNREACHABLE),
            None if expired => Some(UNREACHABLE),
            None => None,
        };
        let taints: Vec<Value> = node
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let ours = |t: &Value| matches!(t.get("key").and_then(Value::as_str), Some(k) if k == UNREACHABLE || k == NOT_READY);
        let have: Vec<&Value> = taints.iter().filter(|t| ours(t)).collect();
        let matches_want = match want_key {
            None => have.is_empty(),
            Some(k) => {
                have.len() == 2
                    && have
                        .iter()
                        .all(|t| t.get("key").and_then(Value::as_str) == Some(k))
            }
        };
        if !matches_want {
            let mut next: Vec<Value> = taints.iter().filter(|t| !ours(t)).cloned().collect();
            if let Some(k) = want_key {
                next.push(json!({"key": k, "effect": "NoSchedule", "timeAdded": now}));
                next.push(json!({"key": k, "effect": "NoExecute", "timeAdded": now}));
            }
            if let Err(e) = ctx
                .client
                .merge_patch(
                    &format!("/api/v1/nodes/{name}"),
                    &json!({"spec": {"taints": next}}),
                )
                .await
            {
                tracing::warn!(node = %name, error = %e, "failed to update node taints");
            }
        }
    }
}

/// Deletes pods that do not tolerate their node's NoExecute taints, once their toleration
/// time (from the taint's `timeAdded`) has passed.
async fn evict(ctx: &Context) {
    let now = chrono::Utc::now();
    let mut by_node: HashMap<String, Vec<Value>> = HashMap::new();
    for node in ctx.nodes.list() {
        let no_exec: Vec<Value> = node
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .filter(|t| t.get("effect").and_then(Value::as_str) == Some("NoExecute"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if !no_exec.is_empty() {
            by_node.insert(name_of(&node).to_string(), no_exec);
        }
    }
    if by_node.is_empty() {
        return;
    }
    let default_secs = i64::try_from(ctx.config.default_toleration.as_secs()).unwrap_or(300);
    for pod in ctx.pods.list() {
        let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) else {
            continue;
        };
        let Some(taints) = by_node.get(node) else {
            continue;
        };
        if is_deleting(&pod) || pod_is_terminal(&pod) {
            continue;
        }
        let tolerations: Vec<Value> = pod
            .pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut evict_at: Option<chrono::DateTime<chrono::Utc>> = None;
        let mut never = true;
        for taint in taints {
            let added = taint
                .get("timeAdded")
                .and_then(Value::as_str)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map_or(now, |t| t.with_timezone(&chrono::Utc));
            let key = taint.get("key").and_then(Value::as_str).unwrap_or_default();
            let secs = match tolerations.iter().find(|t| tolerates(t, taint)) {
                // No tolerationSeconds: tolerated forever.
                Some(t) => t
                    .get("tolerationSeconds")
                    .and_then(Value::as_i64)
                    .map(|s| s.max(0)),
                None if key == UNREACHABLE || key == NOT_READY => Some(default_secs),
                None => Some(0),
            };
            if let Some(s) = secs {
                never = false;
                let at = added + chrono::Duration::seconds(s);
                evict_at = Some(evict_at.map_or(at, |e| e.min(at)));
            }
        }
        if never {
            continue;
        }
        if evict_at.is_some_and(|at| at <= now) {
            let ns = namespace_of(&pod);
            let name = name_of(&pod);
            tracing::info!(pod = %format!("{ns}/{name}"), %node, "evicting pod from tainted node");
            let msg = format!("Marking for deletion Pod {ns}/{name}");
            record_event(
                ctx,
                &pod,
                "Normal",
                "TaintManagerEviction",
                &msg,
                "taint-eviction-controller",
            )
            .await;
            if let Err(e) = ctx
                .client
                .delete(&format!("/api/v1/namespaces/{ns}/pods/{name}"), None)
                .await
            {
                tracing::warn!(error = %e, "eviction failed");
            }
        }
    }
}

/// How long a node may go without a lease renewal before it is `Unknown` (Kubernetes: 40 s).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(40);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toleration_matching() {
        let taint = json!({"key": UNREACHABLE, "effect": "NoExecute"});
        assert!(tolerates(
            &json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}),
            &taint
        ));
        assert!(tolerates(&json!({"operator": "Exists"}), &taint));
        assert!(!tolerates(
            &json!({"key": NOT_READY, "operator": "Exists"}),
            &taint
        ));
        assert!(!tolerates(
            &json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoSchedule"}),
            &taint
        ));
        let t2 = json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"});
        assert!(tolerates(&json!({"key": "dedicated", "value": "gpu"}), &t2));
        assert!(!tolerates(
            &json!({"key": "dedicated", "value": "cpu", "operator": "Equal"}),
            &t2
        ));
    }
}
