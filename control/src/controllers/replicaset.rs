//! ReplicaSet controller: keeps `spec.replicas` pods from the template alive and reports them.
//!
//! Scaling decisions use a fresh LIST of the namespace's pods (a consistent read), not the
//! cache, so a lagging watch can never make it create or delete twice.
use std::sync::Arc;

use serde_json::{Value, json};

use super::labels::{
    controller_of, controller_ref, is_deleting, labels_of, name_of, selector_matches, uid_of,
};
use super::queue::{Action, ReconcileError, Reconciler};
use super::{Context, pod_is_ready, pod_is_terminal};

/// The ReplicaSet reconciler.
pub struct ReplicaSetController {
    pub(crate) ctx: Arc<Context>,
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
        let Some(rs) = client.get(&rs_path(ns, name)).await? else {
            return Ok(Action::Done);
        };
        if is_deleting(&rs) {
            return Ok(Action::Done);
        }
        let uid = uid_of(&rs).to_string();
        let selector = rs.pointer("/spec/selector");
        let (pods, _) = client
            .list(&format!("/api/v1/namespaces/{ns}/pods"))
            .await?;
        let mut owned = Vec::new();
        for p in pods {
            match controller_of(&p) {
                Some(r) if r.get("uid").and_then(Value::as_str) == Some(uid.as_str()) => {
                    owned.push(p);
                }
                None if !is_deleting(&p)
                    && !pod_is_terminal(&p)
                    && selector_matches(selector, labels_of(&p))
                    && p.pointer("/metadata/ownerReferences").is_none() =>
                {
                    // An orphan our selector matches: adopt it, as Kubernetes does.
                    let patch = json!({"metadata": {"ownerReferences": [controller_ref(&rs, "apps/v1", "ReplicaSet")]}});
                    let path = format!("/api/v1/namespaces/{ns}/pods/{}", name_of(&p));
                    if client.merge_patch(&path, &patch).await.is_ok() {
                        owned.push(p);
                    }
                }
                _ => {}
            }
        }
        let mut active: Vec<Value> = owned
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
        if want > have {
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
            let creates = (0..want - have).map(|_| client.create(&path, &pod));
            for r in futures::future::join_all(creates).await {
                if let Err(e) = r {
                    result = Err(ReconcileError::from(e));
                }
            }
        } else if want < have {
            active.sort_by_key(victim_rank);
            let n = usize::try_from(have - want).unwrap_or(0);
            let deletes = active.iter().take(n).map(|p| {
                let path = format!("/api/v1/namespaces/{ns}/pods/{}", name_of(p));
                async move { client.delete(&path, None).await }
            });
            for r in futures::future::join_all(deletes).await {
                if let Err(e) = r {
                    result = Err(ReconcileError::from(e));
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
