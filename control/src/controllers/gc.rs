//! Garbage collection: dependents whose owners (by `ownerReferences` uid) are all gone are
//! deleted (background propagation), and pods bound to nodes that no longer exist are deleted
//! for good (Kubernetes' pod GC).
//!
//! Candidates come from the caches; each is confirmed with a live GET of its owners before
//! anything is deleted, so a cache that has not yet seen a new owner cannot cause a deletion.
use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::informer::{Change, Informer};
use super::labels::{is_deleting, name_of, namespace_of, uid_of};

/// The REST path of an owner, for the kinds Flotilla serves.
fn owner_path(ns: &str, owner: &Value) -> Option<String> {
    let name = owner.get("name").and_then(Value::as_str)?;
    let kind = owner.get("kind").and_then(Value::as_str)?;
    Some(match kind {
        "Deployment" => format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
        "ReplicaSet" => format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}"),
        "Pod" => format!("/api/v1/namespaces/{ns}/pods/{name}"),
        "Service" => format!("/api/v1/namespaces/{ns}/services/{name}"),
        "ConfigMap" => format!("/api/v1/namespaces/{ns}/configmaps/{name}"),
        "Node" => format!("/api/v1/nodes/{name}"),
        _ => return None,
    })
}

async fn owner_alive(ctx: &Context, ns: &str, owner: &Value) -> bool {
    let Some(path) = owner_path(ns, owner) else {
        // Unknown kinds are never collected.
        return true;
    };
    let uid = owner.get("uid").and_then(Value::as_str).unwrap_or_default();
    match ctx.client.get(&path).await {
        Ok(Some(o)) => uid_of(&o) == uid,
        Ok(None) => false,
        // Cannot tell: keep the dependent.
        Err(_) => true,
    }
}

async fn collect(
    ctx: &Context,
    informer: &Informer,
    dependent_path: impl Fn(&str, &str) -> String,
) {
    // Owner uids the caches know; only dependents whose owners are not among them are checked.
    let mut known: HashSet<String> = HashSet::new();
    for inf in [&ctx.deployments, &ctx.replicasets, &ctx.pods, &ctx.nodes] {
        for o in inf.list() {
            known.insert(uid_of(&o).to_string());
        }
    }
    for obj in informer.list() {
        let Some(refs) = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .filter(|r| !r.is_empty())
        else {
            continue;
        };
        if is_deleting(&obj) {
            continue;
        }
        if refs
            .iter()
            .any(|r| known.contains(r.get("uid").and_then(Value::as_str).unwrap_or_default()))
        {
            continue;
        }
        let ns = namespace_of(&obj);
        let mut any_alive = false;
        for r in refs {
            if owner_alive(ctx, ns, r).await {
                any_alive = true;
                break;
            }
        }
        if any_alive {
            continue;
        }
        let path = dependent_path(ns, name_of(&obj));
        tracing::info!(object = %path, "garbage-collecting object whose owners are gone");
        let opts = json!({"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                          "preconditions": {"uid": uid_of(&obj)}});
        if let Err(e) = ctx.client.delete(&path, Some(&opts)).await {
            tracing::warn!(object = %path, error = %e, "garbage collection failed");
        }
    }
}

/// Pods bound to a node that does not exist: nothing will ever run or finish them.
async fn pod_gc(ctx: &Context) {
    let nodes: HashSet<String> = ctx
        .nodes
        .list()
        .iter()
        .map(|n| name_of(n).to_string())
        .collect();
    for pod in ctx.pods.list() {
        let Some(node) = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if nodes.contains(node) {
            continue;
        }
        // Confirm the node is really gone, not just missing from a lagging cache.
        if !matches!(
            ctx.client.get(&format!("/api/v1/nodes/{node}")).await,
            Ok(None)
        ) {
            continue;
        }
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            namespace_of(&pod),
            name_of(&pod)
        );
        let opts = json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                          "preconditions": {"uid": uid_of(&pod)}});
        tracing::info!(pod = %path, %node, "deleting pod bound to a missing node");
        if let Err(e) = ctx.client.delete(&path, Some(&opts)).await {
            tracing::warn!(pod = %path, error = %e, "pod GC failed");
        }
    }
}

/// Runs until `shutdown`: a sweep every `gc_interval`, and soon after any deletion.
pub(crate) async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    for inf in [&ctx.deployments, &ctx.replicasets, &ctx.pods, &ctx.nodes] {
        inf.wait_synced().await;
    }
    let mut subs = [
        ctx.deployments.subscribe(),
        ctx.replicasets.subscribe(),
        ctx.nodes.subscribe(),
    ];
    loop {
        collect(&ctx, &ctx.replicasets, |ns, n| {
            format!("/apis/apps/v1/namespaces/{ns}/replicasets/{n}")
        })
        .await;
        collect(&ctx, &ctx.pods, |ns, n| {
            format!("/api/v1/namespaces/{ns}/pods/{n}")
        })
        .await;
        pod_gc(&ctx).await;
        let [a, b, c] = &mut subs;
        let wake = async {
            loop {
                let ev = tokio::select! {
                    e = a.recv() => e,
                    e = b.recv() => e,
                    e = c.recv() => e,
                };
                match ev {
                    Ok(Change::Delete { .. }) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ctx.config.gc_interval) => {}
            _ = wake => {
                // Let the deletion's watch events reach every cache first.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
