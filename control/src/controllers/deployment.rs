//! Deployment controller: one ReplicaSet per pod template (named `<deployment>-<hash>`), rolled
//! forward with `RollingUpdate` (maxSurge / maxUnavailable) or `Recreate`, with the
//! `deployment.kubernetes.io/revision` annotations `kubectl rollout history/undo` read.
use std::sync::Arc;

use serde_json::{Value, json};

use super::Context;
use super::labels::{controller_of, controller_ref, is_deleting, name_of, uid_of};
use super::queue::{Action, ReconcileError, Reconciler};
use super::replicaset::rs_path;

/// Annotation holding a ReplicaSet's revision.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
/// Label distinguishing the pods of each template.
pub const TEMPLATE_HASH: &str = "pod-template-hash";

/// The Deployment reconciler.
pub struct DeploymentController {
    pub(crate) ctx: Arc<Context>,
}

fn deploy_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
}

/// FNV-1a 32 of the template, encoded with Kubernetes' "safe" alphabet (no vowels, no
/// look-alikes), as `pod-template-hash` values look.
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

fn revision(rs: &Value) -> i64 {
    rs.pointer("/metadata/annotations")
        .and_then(|a| a.get(REVISION))
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &Value) -> i64 {
    rs.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn status_i(obj: &Value, f: &str) -> i64 {
    obj.get("status")
        .and_then(|s| s.get(f))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// The template without the hash label, for comparing a ReplicaSet with its Deployment.
fn template_sans_hash(t: &Value) -> Value {
    let mut t = t.clone();
    if let Some(l) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(TEMPLATE_HASH);
    }
    normalize(&mut t);
    t
}

/// Drops empty maps so `{}` and a missing field compare equal (the API server may add either).
fn normalize(v: &mut Value) {
    if let Value::Object(m) = v {
        for x in m.values_mut() {
            normalize(x);
        }
        m.retain(|_, x| !(x.is_null() || x.as_object().is_some_and(serde_json::Map::is_empty)));
    } else if let Value::Array(a) = v {
        for x in a {
            normalize(x);
        }
    }
}

/// `maxSurge`/`maxUnavailable`: an int or a percentage of `replicas` (surge rounds up,
/// unavailable rounds down).
pub fn resolve_int_or_percent(
    v: Option<&Value>,
    replicas: i64,
    default: &str,
    round_up: bool,
) -> i64 {
    let v = v.cloned().unwrap_or_else(|| json!(default));
    match &v {
        Value::Number(n) => n.as_i64().unwrap_or(0).max(0),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) => {
                let x = replicas * p;
                if round_up { (x + 99) / 100 } else { x / 100 }
            }
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

impl DeploymentController {
    async fn scale(
        &self,
        ns: &str,
        rs: &Value,
        replicas: i64,
        d_replicas: i64,
        surge: i64,
    ) -> Result<(), ReconcileError> {
        if spec_replicas(rs) == replicas {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"annotations": {DESIRED: d_replicas.to_string(), MAX_REPLICAS: (d_replicas + surge).to_string()}},
            "spec": {"replicas": replicas},
        });
        self.ctx
            .client
            .merge_patch(&rs_path(ns, name_of(rs)), &patch)
            .await?;
        Ok(())
    }
}

impl Reconciler for DeploymentController {
    fn name(&self) -> &'static str {
        "deployment"
    }

    async fn reconcile(&self, key: &str) -> Result<Action, ReconcileError> {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        let client = &self.ctx.client;
        let Some(d) = client.get(&deploy_path(ns, name)).await? else {
            return Ok(Action::Done);
        };
        if is_deleting(&d) {
            return Ok(Action::Done);
        }
        let uid = uid_of(&d).to_string();
        let (all, _) = client
            .list(&format!("/apis/apps/v1/namespaces/{ns}/replicasets"))
            .await?;
        let mut rss: Vec<Value> = all
            .into_iter()
            .filter(|rs| {
                controller_of(rs)
                    .and_then(|r| r.get("uid"))
                    .and_then(Value::as_str)
                    == Some(uid.as_str())
                    && !is_deleting(rs)
            })
            .collect();
        let replicas = d
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .max(0);
        let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let want_t = template_sans_hash(&template);
        let max_rev = rss.iter().map(revision).max().unwrap_or(0);
        let strategy = d
            .pointer("/spec/strategy/type")
            .and_then(Value::as_str)
            .unwrap_or("RollingUpdate")
            .to_string();
        let (mut surge, mut unavail) = if strategy == "Recreate" {
            (0, replicas)
        } else {
            let ru = d.pointer("/spec/strategy/rollingUpdate");
            (
                resolve_int_or_percent(ru.and_then(|r| r.get("maxSurge")), replicas, "25%", true),
                resolve_int_or_percent(
                    ru.and_then(|r| r.get("maxUnavailable")),
                    replicas,
                    "25%",
                    false,
                ),
            )
        };
        if surge == 0 && unavail == 0 {
            unavail = 1;
        }
        if strategy == "Recreate" {
            surge = 0;
        }
        let change_cause = d
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(CHANGE_CAUSE))
            .cloned();
        // By name first: the name carries the template's hash, which defaulting cannot disturb.
        let new_name = format!("{name}-{}", template_hash(&want_t));
        let new_idx = rss
            .iter()
            .position(|rs| name_of(rs) == new_name)
            .or_else(|| {
                rss.iter().position(|rs| {
                    template_sans_hash(rs.pointer("/spec/template").unwrap_or(&Value::Null))
                        == want_t
                })
            });
        let new_idx = match new_idx {
            Some(i) => {
                let stale_rev = revision(&rss[i]) < max_rev || revision(&rss[i]) == 0;
                let rs_cause = rss[i]
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(CHANGE_CAUSE));
                let stale_cause = change_cause.is_some() && rs_cause != change_cause.as_ref();
                if stale_rev || stale_cause {
                    // A rollback (or an adopted set) makes this template the newest revision;
                    // the newest set follows the Deployment's change-cause, as in Kubernetes.
                    let mut ann = json!({});
                    if stale_rev {
                        ann[REVISION] = json!((max_rev + 1).to_string());
                    }
                    if let Some(c) = &change_cause {
                        ann[CHANGE_CAUSE] = c.clone();
                    }
                    let updated = client
                        .merge_patch(
                            &rs_path(ns, name_of(&rss[i])),
                            &json!({"metadata": {"annotations": ann}}),
                        )
                        .await?;
                    rss[i] = updated;
                }
                i
            }
            None => {
                let hash = template_hash(&want_t);
                let mut t = template.clone();
                t["metadata"]["labels"][TEMPLATE_HASH] = json!(hash);
                let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
                selector["matchLabels"][TEMPLATE_HASH] = json!(hash);
                let old_pods: i64 = rss
                    .iter()
                    .map(|r| status_i(r, "replicas") + spec_replicas(r))
                    .sum();
                let initial = if strategy == "Recreate" {
                    if old_pods > 0 { 0 } else { replicas }
                } else {
                    let total: i64 = rss.iter().map(spec_replicas).sum();
                    (replicas + surge - total).clamp(0, replicas)
                };
                let mut ann = json!({
                    REVISION: (max_rev + 1).to_string(),
                    DESIRED: replicas.to_string(),
                    MAX_REPLICAS: (replicas + surge).to_string(),
                });
                if let Some(c) = &change_cause {
                    ann[CHANGE_CAUSE] = c.clone();
                }
                let rs = json!({
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "metadata": {
                        "name": new_name,
                        "namespace": ns,
                        "labels": t.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                        "annotations": ann,
                        "ownerReferences": [controller_ref(&d, "apps/v1", "Deployment")],
                    },
                    "spec": {"replicas": initial, "selector": selector, "template": t},
                });
                let created = client
                    .create(&format!("/apis/apps/v1/namespaces/{ns}/replicasets"), &rs)
                    .await?;
                rss.push(created);
                rss.len() - 1
            }
        };
        let new_rs = rss[new_idx].clone();
        let mut old: Vec<Value> = rss
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != new_idx)
            .map(|(_, r)| r.clone())
            .collect();
        old.sort_by_key(revision);

        if strategy == "Recreate" {
            let mut old_running = false;
            for rs in &old {
                if spec_replicas(rs) > 0 {
                    self.scale(ns, rs, 0, replicas, 0).await?;
                }
                old_running |= status_i(rs, "replicas") > 0;
            }
            if !old_running {
                self.scale(ns, &new_rs, replicas, replicas, 0).await?;
            }
        } else {
            // Scale up the new set within maxSurge.
            let total: i64 = rss.iter().map(spec_replicas).sum();
            let new_spec = spec_replicas(&new_rs);
            let new_target = if new_spec > replicas {
                replicas
            } else {
                let room = replicas + surge - total;
                (new_spec + room.max(0)).min(replicas)
            };
            self.scale(ns, &new_rs, new_target, replicas, surge).await?;
            // Scale down old sets within maxUnavailable: unhealthy replicas first.
            let total = total - new_spec + new_target;
            let min_available = replicas - unavail;
            let new_unavailable = (new_target - status_i(&new_rs, "availableReplicas")).max(0);
            // As kube's reconcileOldReplicaSets: nothing is scaled down unless the pods beyond
            // minAvailable (not counting the new set's unavailable ones) allow it.
            let max_scaled_down = total - min_available - new_unavailable;
            let mut targets: Vec<i64> = old.iter().map(spec_replicas).collect();
            if max_scaled_down > 0 {
                let mut budget = max_scaled_down;
                for (i, rs) in old.iter().enumerate() {
                    if budget <= 0 {
                        break;
                    }
                    let unhealthy = (targets[i] - status_i(rs, "availableReplicas")).max(0);
                    let cut = unhealthy.min(budget);
                    targets[i] -= cut;
                    budget -= cut;
                }
                // A set just scaled down may still report its old count: never count more
                // available pods than a set is meant to keep.
                let available: i64 = status_i(&new_rs, "availableReplicas").min(new_target)
                    + old
                        .iter()
                        .zip(&targets)
                        .map(|(rs, t)| status_i(rs, "availableReplicas").min(*t))
                        .sum::<i64>();
                let mut can_down = (available - min_available).min(budget);
                for t in &mut targets {
                    if can_down <= 0 {
                        break;
                    }
                    let cut = (*t).min(can_down);
                    *t -= cut;
                    can_down -= cut;
                }
            }
            for (rs, t) in old.iter().zip(targets) {
                self.scale(ns, rs, t, replicas, surge).await?;
            }
        }

        // Revision history: drop the oldest empty sets beyond the limit.
        let limit = d
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10)
            .max(0);
        let empty: Vec<&Value> = old
            .iter()
            .filter(|r| spec_replicas(r) == 0 && status_i(r, "replicas") == 0)
            .collect();
        let excess = usize::try_from(i64::try_from(empty.len()).unwrap_or(0) - limit).unwrap_or(0);
        for rs in empty.iter().take(excess) {
            client.delete(&rs_path(ns, name_of(rs)), None).await?;
        }

        // Status from the sets' own status.
        let sum = |f: &str| -> i64 { rss.iter().map(|r| status_i(r, f)).sum() };
        let (total_pods, ready, available) = (
            sum("replicas"),
            sum("readyReplicas"),
            sum("availableReplicas"),
        );
        let updated = status_i(&new_rs, "replicas");
        let min_available = replicas - unavail.min(replicas);
        let complete = updated == replicas
            && total_pods == replicas
            && status_i(&new_rs, "availableReplicas") == replicas
            && spec_replicas(&new_rs) == replicas;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let keep_time = |ty: &str, st: &str| -> Value {
            d.pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter().find(|c| {
                        c.get("type").and_then(Value::as_str) == Some(ty)
                            && c.get("status").and_then(Value::as_str) == Some(st)
                    })
                })
                .and_then(|c| c.get("lastTransitionTime").cloned())
                .unwrap_or_else(|| json!(now))
        };
        let avail_ok = available >= min_available;
        let avail_st = if avail_ok { "True" } else { "False" };
        let rs_name = name_of(&new_rs).to_string();
        let conditions = json!([
            {
                "type": "Available", "status": avail_st,
                "reason": if avail_ok { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                "message": if avail_ok { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." },
                "lastUpdateTime": keep_time("Available", avail_st), "lastTransitionTime": keep_time("Available", avail_st),
            },
            {
                "type": "Progressing", "status": "True",
                "reason": if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                "message": if complete { format!("ReplicaSet \"{rs_name}\" has successfully progressed.") } else { format!("ReplicaSet \"{rs_name}\" is progressing.") },
                "lastUpdateTime": keep_time("Progressing", "True"), "lastTransitionTime": keep_time("Progressing", "True"),
            },
        ]);
        let status = json!({
            "observedGeneration": d.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0),
            "replicas": total_pods,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "unavailableReplicas": (replicas - available).max(0),
            "conditions": conditions,
        });
        let cur = d.get("status").cloned().unwrap_or(json!({}));
        let differs = [
            "observedGeneration",
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
        ]
        .iter()
        .any(|f| {
            cur.get(*f).and_then(Value::as_i64).unwrap_or(0) != status[*f].as_i64().unwrap_or(0)
        }) || cur.pointer("/conditions/1/reason")
            != status.pointer("/conditions/1/reason")
            || cur.pointer("/conditions/0/status") != status.pointer("/conditions/0/status");
        if differs {
            client
                .merge_patch(
                    &format!("{}/status", deploy_path(ns, name)),
                    &json!({"status": status}),
                )
                .await?;
        }
        Ok(Action::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_or_percent() {
        assert_eq!(resolve_int_or_percent(None, 10, "25%", true), 3);
        assert_eq!(resolve_int_or_percent(None, 10, "25%", false), 2);
        assert_eq!(resolve_int_or_percent(Some(&json!(2)), 10, "25%", true), 2);
        assert_eq!(
            resolve_int_or_percent(Some(&json!("50%")), 5, "25%", false),
            2
        );
    }

    #[test]
    fn hash_ignores_its_own_label_and_is_stable() {
        let a = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let mut b = a.clone();
        b["metadata"]["labels"][TEMPLATE_HASH] = json!("zzz");
        assert_eq!(template_sans_hash(&a), template_sans_hash(&b));
        let h = template_hash(&template_sans_hash(&a));
        assert_eq!(h, template_hash(&template_sans_hash(&b)));
        assert!(
            h.bytes()
                .all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c))
        );
        let mut c = a.clone();
        c["spec"]["containers"][0]["image"] = json!("j");
        assert_ne!(template_hash(&template_sans_hash(&c)), h);
    }
}
