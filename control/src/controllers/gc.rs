//! Garbage collection: dependents whose owners (by `ownerReferences` uid) are all gone are
//! deleted (background propagation), and pods bound to nodes that no longer exist are deleted
//! for good (Kubernetes' pod GC).
//!
//! Owners being deleted with a finalizer the API server set for the deletion's
//! `propagationPolicy` (Deployments and ReplicaSets; dependents: ReplicaSets and pods):
//! - `foregroundDeletion`: every dependent is deleted (a dependent that owns others itself is
//!   first given `foregroundDeletion` too, so the cascade is foreground all the way down);
//!   once no dependent with `blockOwnerDeletion` remains, the finalizer is removed and the
//!   API server finishes deleting the owner.
//! - `orphan`: the owner's reference is removed from every dependent, then the finalizer.
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
        let refs = owner_refs(&obj);
        if refs.is_empty() || is_deleting(&obj) {
            continue;
        }
        if refs
            .iter()
            .any(|r| known.contains(r.get("uid").and_then(Value::as_str).unwrap_or_default()))
        {
            continue;
        }
        let ns = namespace_of(&obj);
        let path = dependent_path(ns, name_of(&obj));
        // Decide on the live object, as Kubernetes' collector does: the cached copy may
        // predate an orphaning that just removed these references (the owner's deletion then
        // completes at once) or an adoption that added a live owner.
        let live = match ctx.client.get(&path).await {
            Ok(Some(o)) if uid_of(&o) == uid_of(&obj) && !is_deleting(&o) => o,
            _ => continue,
        };
        let live_refs = owner_refs(&live);
        if live_refs.is_empty() {
            continue;
        }
        let mut any_alive = false;
        for r in live_refs {
            if owner_alive(ctx, ns, r).await {
                any_alive = true;
                break;
            }
        }
        if any_alive {
            continue;
        }
        tracing::info!(object = %path, "garbage-collecting object whose owners are gone");
        // Only the version just read: a change since (an orphaning, an adoption) fails the
        // precondition, and the next sweep looks again.
        let opts = json!({"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                          "preconditions": {"uid": uid_of(&live),
                                            "resourceVersion": live.pointer("/metadata/resourceVersion")}});
        if let Err(e) = ctx.client.delete(&path, Some(&opts)).await {
            tracing::warn!(object = %path, error = %e, "garbage collection failed");
        }
    }
}

/// Finalizer of an owner whose dependents are deleted first.
pub const FOREGROUND: &str = "foregroundDeletion";
/// Finalizer of an owner whose dependents are kept, without their reference to it.
pub const ORPHAN: &str = "orphan";

fn finalizers(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `metadata.ownerReferences` (empty when absent).
fn owner_refs(obj: &Value) -> &[Value] {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn refs_to<'a>(obj: &'a Value, owner_uid: &str) -> impl Iterator<Item = &'a Value> {
    owner_refs(obj)
        .iter()
        .filter(move |r| r.get("uid").and_then(Value::as_str) == Some(owner_uid))
}

fn object_path(kind: &str, ns: &str, name: &str) -> String {
    match kind {
        "ReplicaSet" => format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}"),
        "Deployment" => format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
        _ => format!("/api/v1/namespaces/{ns}/pods/{name}"),
    }
}

/// Removes `finalizer` from `obj` (optimistically, at its resourceVersion).
async fn drop_finalizer(ctx: &Context, path: &str, obj: &Value, finalizer: &str) {
    let rest: Vec<&str> = finalizers(obj)
        .into_iter()
        .filter(|f| *f != finalizer)
        .collect();
    let patch = json!({"metadata": {"finalizers": rest,
        "resourceVersion": obj.pointer("/metadata/resourceVersion")}});
    match ctx.client.merge_patch(path, &patch).await {
        Ok(_) => {
            tracing::info!(object = %path, %finalizer, "dependents handled; finalizer removed")
        }
        Err(e) => {
            tracing::debug!(object = %path, error = %e, "removing finalizer failed; will retry")
        }
    }
}

/// Foreground and orphan deletion of the owners (Deployments, ReplicaSets) carrying those
/// finalizers. Returns whether any owner is still waiting.
async fn finalize_owners(ctx: &Context) -> bool {
    let mut waiting = false;
    for (owners, kind) in [
        (&ctx.deployments, "Deployment"),
        (&ctx.replicasets, "ReplicaSet"),
    ] {
        for owner in owners.list() {
            if !is_deleting(&owner) {
                continue;
            }
            let fins = finalizers(&owner);
            let (ns, uid) = (namespace_of(&owner), uid_of(&owner));
            let path = object_path(kind, ns, name_of(&owner));
            let dependents: Vec<(Arc<Value>, &str)> =
                [(&ctx.replicasets, "ReplicaSet"), (&ctx.pods, "Pod")]
                    .into_iter()
                    .flat_map(|(inf, k)| inf.list().into_iter().map(move |o| (o, k)))
                    .filter(|(o, _)| namespace_of(o) == ns && refs_to(o, uid).next().is_some())
                    .collect();
            if fins.contains(&ORPHAN) {
                waiting = true;
                let mut ok = true;
                for (dep, k) in &dependents {
                    let rest: Vec<&Value> = owner_refs(dep)
                        .iter()
                        .filter(|r| r.get("uid").and_then(Value::as_str) != Some(uid))
                        .collect();
                    let refs = if rest.is_empty() {
                        Value::Null
                    } else {
                        json!(rest)
                    };
                    let patch = json!({"metadata": {"ownerReferences": refs,
                        "resourceVersion": dep.pointer("/metadata/resourceVersion")}});
                    let dpath = object_path(k, ns, name_of(dep));
                    match ctx.client.merge_patch(&dpath, &patch).await {
                        Ok(_) => tracing::info!(object = %dpath, owner = %path, "orphaned"),
                        Err(e) if e.is_not_found() => {}
                        Err(e) => {
                            tracing::debug!(object = %dpath, error = %e, "orphaning failed; will retry");
                            ok = false;
                        }
                    }
                }
                if ok {
                    drop_finalizer(ctx, &path, &owner, ORPHAN).await;
                }
            } else if fins.contains(&FOREGROUND) {
                waiting = true;
                let mut blocking = 0;
                for (dep, k) in &dependents {
                    if refs_to(dep, uid)
                        .any(|r| r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true))
                    {
                        blocking += 1;
                    }
                    if is_deleting(dep) {
                        continue;
                    }
                    let dpath = object_path(k, ns, name_of(dep));
                    // An owner of others goes foreground too, so its own dependents go first.
                    if *k == "ReplicaSet" && !finalizers(dep).contains(&FOREGROUND) {
                        let mut fs = finalizers(dep);
                        fs.push(FOREGROUND);
                        let patch = json!({"metadata": {"finalizers": fs,
                            "resourceVersion": dep.pointer("/metadata/resourceVersion")}});
                        if let Err(e) = ctx.client.merge_patch(&dpath, &patch).await {
                            tracing::debug!(object = %dpath, error = %e, "marking foreground failed; will retry");
                            continue;
                        }
                    }
                    let opts = json!({"apiVersion": "v1", "kind": "DeleteOptions",
                        "propagationPolicy": "Foreground", "preconditions": {"uid": uid_of(dep)}});
                    tracing::info!(object = %dpath, owner = %path, "deleting dependent (foreground)");
                    match ctx.client.delete(&dpath, Some(&opts)).await {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => {
                            tracing::debug!(object = %dpath, error = %e, "deleting dependent failed; will retry")
                        }
                    }
                }
                if blocking == 0 {
                    // The caches may lag behind a dependent just created: ask the server.
                    if !has_blocking_dependents(ctx, ns, uid).await {
                        drop_finalizer(ctx, &path, &owner, FOREGROUND).await;
                    }
                }
            }
        }
    }
    waiting
}

/// Whether the API server still holds a dependent of `uid` that blocks its deletion (a failed
/// list counts as yes).
async fn has_blocking_dependents(ctx: &Context, ns: &str, uid: &str) -> bool {
    for path in [
        format!("/apis/apps/v1/namespaces/{ns}/replicasets"),
        format!("/api/v1/namespaces/{ns}/pods"),
    ] {
        let Ok((items, _)) = ctx.client.list(&path).await else {
            return true;
        };
        if items.iter().any(|o| {
            refs_to(o, uid)
                .any(|r| r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true))
        }) {
            return true;
        }
    }
    false
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
        ctx.pods.subscribe(),
    ];
    loop {
        let waiting = finalize_owners(&ctx).await;
        collect(&ctx, &ctx.replicasets, |ns, n| {
            format!("/apis/apps/v1/namespaces/{ns}/replicasets/{n}")
        })
        .await;
        collect(&ctx, &ctx.pods, |ns, n| {
            format!("/api/v1/namespaces/{ns}/pods/{n}")
        })
        .await;
        pod_gc(&ctx).await;
        let [a, b, c, d] = &mut subs;
        let wake = async {
            loop {
                let (ev, is_pod) = tokio::select! {
                    e = a.recv() => (e, false),
                    e = b.recv() => (e, false),
                    e = c.recv() => (e, false),
                    e = d.recv() => (e, true),
                };
                match ev {
                    // Pod deletions matter only while an owner waits for its dependents.
                    Ok(Change::Delete { .. }) if !is_pod || waiting => return,
                    Ok(Change::Upsert { new, .. })
                        if !is_pod && is_deleting(&new) && {
                            let f = finalizers(&new);
                            f.contains(&FOREGROUND) || f.contains(&ORPHAN)
                        } =>
                    {
                        return;
                    }
                    Err(_) => return,
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
