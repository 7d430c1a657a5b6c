//! ReplicaSet controller: keeps `spec.replicas` pods from the template alive and reports them.
//!
//! It reads only the informer caches, as kube-controller-manager does; what keeps a cache that
//! has not yet seen our own writes from making it create or delete twice is
//! [`Expectations`]: after creating n pods (or deleting some) a ReplicaSet is not scaled again
//! until the cache has shown those n creations (those deletions), or [`EXPECTATIONS_TTL`]
//! passed. Its status is still updated from the cache meanwhile.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::informer::{Change, key_of};
use super::labels::{
    controller_of, controller_ref, is_deleting, labels_of, name_of, selector_matches, uid_of,
};
use super::queue::{Action, ReconcileError, Reconciler, WorkQueue};
use super::{Context, pod_is_ready, pod_is_terminal};

/// Outstanding expectations are dropped after this long (Kubernetes: 5 minutes), so a lost
/// watch event delays a ReplicaSet, never blocks it.
pub const EXPECTATIONS_TTL: Duration = Duration::from_secs(300);

/// Most pods one sync of a ReplicaSet creates (kube-controller-manager's `burstReplicas`):
/// 10,000 replicas are created 500 at a time, each round once the cache shows the last, rather
/// than as 10,000 requests at once.
pub const BURST_REPLICAS: i64 = 500;

#[derive(Debug)]
struct Expected {
    adds: i64,
    dels: HashSet<String>,
    at: Instant,
}

/// Per ReplicaSet key: pod creations and deletions sent but not yet seen in the pod cache
/// (client-go's `ControllerExpectations`).
#[derive(Debug, Default)]
pub struct Expectations {
    map: Mutex<HashMap<String, Expected>>,
}

impl Expectations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the cache has caught up with our writes for `key` (or they expired).
    pub fn satisfied(&self, key: &str) -> bool {
        let mut m = self.lock();
        match m.get(key) {
            None => true,
            Some(e) if e.adds <= 0 && e.dels.is_empty() => true,
            Some(e) if e.at.elapsed() > EXPECTATIONS_TTL => {
                tracing::warn!(replicaset = %key, "expectations expired; trusting the cache");
                m.remove(key);
                true
            }
            Some(_) => false,
        }
    }

    /// About to create `adds` pods and delete the pods with keys `dels`.
    pub fn expect(&self, key: &str, adds: i64, dels: impl IntoIterator<Item = String>) {
        self.lock().insert(
            key.to_string(),
            Expected {
                adds,
                dels: dels.into_iter().collect(),
                at: Instant::now(),
            },
        );
    }

    /// A creation was seen (or failed, so will never be seen).
    pub fn creation_observed(&self, key: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            e.adds -= 1;
        }
    }

    /// The deletion of `pod` was seen (or failed).
    pub fn deletion_observed(&self, key: &str, pod: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            e.dels.remove(pod);
        }
    }

    /// After missed events: forgets expectations old enough that the cache, which is always
    /// ahead of its change stream, must already reflect them.
    fn forget_older_than(&self, age: Duration) {
        self.lock().retain(|_, e| e.at.elapsed() < age);
    }
}

/// The ReplicaSet reconciler.
pub struct ReplicaSetController {
    pub(crate) ctx: Arc<Context>,
    pub(crate) expectations: Arc<Expectations>,
}

/// The key of the pod's managing ReplicaSet, if any.
fn owning_rs(pod: &Value) -> Option<String> {
    controller_of(pod)
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("ReplicaSet"))
        .and_then(|r| r.get("name").and_then(Value::as_str))
        .map(|n| format!("{}/{n}", super::labels::namespace_of(pod)))
}

/// Feeds the ReplicaSet queue from pod changes, lowering expectations first: a pod added is a
/// creation observed, a pod marked for deletion or deleted a deletion observed.
pub(crate) async fn feed_pods(
    ctx: Arc<Context>,
    expectations: Arc<Expectations>,
    queue: WorkQueue,
    shutdown: CancellationToken,
) {
    let mut rx = ctx.pods.subscribe();
    ctx.pods.wait_synced().await;
    let queue_all = |queue: &WorkQueue| {
        for p in ctx.pods.list() {
            if let Some(k) = owning_rs(&p) {
                queue.add(k);
            }
        }
    };
    queue_all(&queue);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = rx.recv() => ev,
        };
        match ev {
            Ok(Change::Upsert { old, new }) => {
                if let Some(k) = owning_rs(&new) {
                    match &old {
                        None => expectations.creation_observed(&k),
                        Some(o) if !is_deleting(o) && is_deleting(&new) => {
                            expectations.deletion_observed(&k, &key_of(&new));
                        }
                        _ => {}
                    }
                    queue.add(k);
                }
                // Released or re-owned: the old owner recounts.
                if let Some(k) = old.as_deref().and_then(owning_rs) {
                    queue.add(k);
                }
            }
            Ok(Change::Delete { old }) => {
                if let Some(k) = owning_rs(&old) {
                    expectations.deletion_observed(&k, &key_of(&old));
                    queue.add(k);
                }
            }
            Ok(Change::Resync) | Err(RecvError::Lagged(_)) => {
                expectations.forget_older_than(Duration::from_secs(5));
                queue_all(&queue);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

pub(crate) fn rs_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}")
}

fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("default", key))
}

/// Deletion preference: lower sorts first (unscheduled, pending, not ready, most restarts, newest).
fn victim_rank(p: &Value) -> (u8, u8, u8, i64, std::cmp::Reverse<String>) {
    let unscheduled = p
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    let pending = p.pointer("/status/phase").and_then(Value::as_str) != Some("Running");
    let restarts: i64 = p
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum()
        })
        .unwrap_or(0);
    let created = p
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    (
        u8::from(!unscheduled),
        u8::from(!pending),
        u8::from(pod_is_ready(p)),
        -restarts,
        std::cmp::Reverse(created),
    )
}

impl Reconciler for ReplicaSetController {
    fn name(&self) -> &'static str {
        "replicaset"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ReconcileError> {
        let (ns, name) = split(key);
        let client = &self.ctx.client;
        let Some(rs) = self.ctx.replicasets.get(key) else {
            return Ok(Action::Done);
        };
        if is_deleting(&rs) {
            return Ok(Action::Done);
        }
        let uid = uid_of(&rs).to_string();
        let selector = rs.pointer("/spec/selector");
        let mut owned = Vec::new();
        // Whether this ReplicaSet may adopt orphans, asked of the API server at the first one.
        let mut may_adopt: Option<bool> = None;
        // Ours and the adoptable ones, from the index rather than a scan of every pod.
        let candidates = self
            .ctx
            .pods
            .by_index(&uid)
            .into_iter()
            .chain(self.ctx.pods.by_index(&super::labels::orphans_in(ns)));
        for p in candidates {
            if super::labels::namespace_of(&p) != ns {
                continue;
            }
            match controller_of(&p) {
                Some(r) if r.get("uid").and_then(Value::as_str) == Some(uid.as_str()) => {
                    owned.push(p);
                }
                None if !is_deleting(&p)
                    && !pod_is_terminal(&p)
                    && selector_matches(selector, labels_of(&p))
                    && p.pointer("/metadata/ownerReferences").is_none() =>
                {
                    // An orphan our selector matches: adopt it, as Kubernetes does, but only
                    // if a live read shows this ReplicaSet is not being deleted (Kubernetes'
                    // `RecheckDeletionTimestamp`). Our cache may not show the deletion yet,
                    // while the garbage collector, orphaning the pods for that very deletion,
                    // has just removed their references: adopting them back would leave them
                    // owned by a deleted ReplicaSet (and collected with it), and counting them
                    // out would create replacements. As in Kubernetes, the sync stops there;
                    // the deletion reaches the cache soon.
                    if may_adopt.is_none() {
                        let path = format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}");
                        let fresh = client.get(&path).await.map_err(ReconcileError::from)?;
                        may_adopt =
                            Some(fresh.is_some_and(|f| uid_of(&f) == uid && !is_deleting(&f)));
                    }
                    if may_adopt != Some(true) {
                        tracing::debug!(replicaset = %key, "being deleted (live read); not adopting or scaling");
                        return Ok(Action::Done);
                    }
                    let patch = json!({"metadata": {
                        "ownerReferences": [controller_ref(&rs, "apps/v1", "ReplicaSet")],
                        "resourceVersion": p.pointer("/metadata/resourceVersion"),
                    }});
                    let path = format!("/api/v1/namespaces/{ns}/pods/{}", name_of(&p));
                    if client.merge_patch(&path, &patch).await.is_ok() {
                        owned.push(p);
                    }
                }
                _ => {}
            }
        }
        let mut active: Vec<Arc<Value>> = owned
            .into_iter()
            .filter(|p| !is_deleting(p) && !pod_is_terminal(p))
            .collect();
        let want = rs
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .max(0);
        let have = i64::try_from(active.len()).unwrap_or(i64::MAX);
        let mut result = Ok(());
        let may_scale = self.expectations.satisfied(key);
        if !may_scale {
            tracing::debug!(replicaset = %key, "waiting for the cache to show earlier writes");
        } else if want > have {
            let template = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
            let mut pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": format!("{name}-"),
                    "namespace": ns,
                    "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                    "ownerReferences": [controller_ref(&rs, "apps/v1", "ReplicaSet")],
                },
                "spec": template.get("spec").cloned().unwrap_or(json!({})),
            });
            if let Some(a) = template.pointer("/metadata/annotations") {
                pod["metadata"]["annotations"] = a.clone();
            }
            let path = format!("/api/v1/namespaces/{ns}/pods");
            // At most BURST_REPLICAS per sync; the next sync runs once these are observed.
            let n = (want - have).min(BURST_REPLICAS);
            self.expectations.expect(key, n, []);
            let mut sent = 0;
            let mut batch = 1;
            // Slow start (Kubernetes' slowStartBatch): 1, 2, 4, ... at once, stopping at the
            // first failure, so a rejected template costs one request, not hundreds.
            while sent < n {
                let size = batch.min(n - sent);
                let creates = (0..size).map(|_| client.create(&path, &pod));
                let mut failed = false;
                for r in futures::future::join_all(creates).await {
                    if let Err(e) = r {
                        // Never to be seen in the cache.
                        self.expectations.creation_observed(key);
                        result = Err(ReconcileError::from(e));
                        failed = true;
                    }
                }
                sent += size;
                if failed {
                    // The ones never sent will never be seen either.
                    for _ in sent..n {
                        self.expectations.creation_observed(key);
                    }
                    break;
                }
                batch *= 2;
            }
        } else if want < have {
            active.sort_by_key(|p| victim_rank(p));
            let n = usize::try_from(have - want).unwrap_or(0);
            self.expectations
                .expect(key, 0, active.iter().take(n).map(|p| key_of(p)));
            let deletes = active.iter().take(n).map(|p| {
                let path = format!("/api/v1/namespaces/{ns}/pods/{}", name_of(p));
                async move { (key_of(p), client.delete(&path, None).await) }
            });
            for (pod_key, r) in futures::future::join_all(deletes).await {
                match r {
                    Ok(()) => {}
                    Err(e) => {
                        self.expectations.deletion_observed(key, &pod_key);
                        if !e.is_not_found() {
                            result = Err(ReconcileError::from(e));
                        }
                    }
                }
            }
            active.drain(..n.min(active.len()));
        }
        // Status from what we observed (the next reconcile reports the pods just created).
        let ready = active.iter().filter(|p| pod_is_ready(p)).count();
        let status = json!({
            "replicas": active.len(),
            "fullyLabeledReplicas": active.iter().filter(|p| selector_matches(selector, labels_of(p))).count(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": rs.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0),
        });
        let current = rs.get("status").cloned().unwrap_or(json!({}));
        let changed = [
            "replicas",
            "fullyLabeledReplicas",
            "readyReplicas",
            "availableReplicas",
            "observedGeneration",
        ]
        .iter()
        .any(|f| {
            current.get(*f).and_then(Value::as_i64).unwrap_or(0) != status[*f].as_i64().unwrap_or(0)
        });
        if changed {
            client
                .merge_patch(
                    &format!("{}/status", rs_path(ns, name)),
                    &json!({"status": status}),
                )
                .await?;
        }
        result.map(|()| Action::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_hold_scaling_until_observed() {
        let e = Expectations::default();
        assert!(e.satisfied("ns/rs"));
        e.expect("ns/rs", 2, []);
        assert!(!e.satisfied("ns/rs"));
        e.creation_observed("ns/rs");
        assert!(!e.satisfied("ns/rs"));
        e.creation_observed("ns/rs");
        assert!(e.satisfied("ns/rs"));
        e.expect("ns/rs", 0, ["ns/p1".to_string(), "ns/p2".to_string()]);
        e.deletion_observed("ns/rs", "ns/p1");
        assert!(!e.satisfied("ns/rs"));
        // Another ReplicaSet's events do not count.
        e.deletion_observed("ns/other", "ns/p2");
        assert!(!e.satisfied("ns/rs"));
        e.deletion_observed("ns/rs", "ns/p2");
        assert!(e.satisfied("ns/rs"));
    }

    #[tokio::test(start_paused = true)]
    async fn expectations_expire() {
        let e = Expectations::default();
        e.expect("ns/rs", 1, []);
        tokio::time::advance(EXPECTATIONS_TTL + Duration::from_secs(1)).await;
        assert!(e.satisfied("ns/rs"));
        e.expect("ns/rs", 1, []);
        tokio::time::advance(Duration::from_secs(6)).await;
        e.forget_older_than(Duration::from_secs(5));
        assert!(e.satisfied("ns/rs"));
    }
}
