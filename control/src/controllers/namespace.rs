//! Namespace deletion, as kube-controller-manager's namespace controller does it.
//!
//! `DELETE /api/v1/namespaces/X` only marks the namespace (`deletionTimestamp`, phase
//! `Terminating`; the API server refuses new content in it from then on). This controller,
//! for each terminating namespace that still has [`FINALIZER`] in `spec.finalizers`:
//! 1. discovers every namespaced resource type the API server serves (legacy discovery, so new
//!    types are covered without a list here),
//! 2. deletes their objects in the namespace (`deletecollection`, background propagation: pods
//!    go through graceful deletion, objects with finalizers stay until those are removed),
//! 3. reports progress in `status.conditions` (`NamespaceDeletionDiscoveryFailure`,
//!    `NamespaceDeletionContentFailure`, `NamespaceContentRemaining`,
//!    `NamespaceFinalizersRemaining`, worded as Kubernetes words them),
//! 4. once nothing is left, removes [`FINALIZER`] through `PUT namespaces/X/finalize`; the API
//!    server then removes the namespace (unless `metadata.finalizers` still holds it).
//!
//! Level-triggered: terminating namespaces are queued from the namespace cache (so a restarted
//! or newly elected controller picks them up) and again when a pod in them is deleted (the usual
//! last thing to go); while content remains the key is also re-checked every
//! [`RECHECK`]. Every step is idempotent.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::informer::{Change, Informer};
use super::labels::{is_deleting, name_of, namespace_of};
use super::queue::{Action, ReconcileError, Reconciler, WorkQueue};
use super::{ApiClient, Context};

/// The `spec.finalizers` entry this controller owns (`FinalizerKubernetes`).
pub const FINALIZER: &str = "kubernetes";

/// How often a namespace whose content is still going away is looked at again (pod deletions
/// wake it sooner).
pub const RECHECK: Duration = Duration::from_secs(2);

/// How long discovered resource types are reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(30);

/// A namespaced resource type served by the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContentType {
    /// `/api/v1` or `/apis/<group>/<version>`.
    pub prefix: String,
    /// API group (`""` for core).
    pub group: String,
    /// Plural name (`pods`).
    pub resource: String,
    /// Whether `deletecollection` is served (else objects are deleted one by one).
    pub deletecollection: bool,
}

impl ContentType {
    /// `pods`, `deployments.apps`: how Kubernetes names a group resource in messages.
    fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn collection(&self, ns: &str) -> String {
        format!("{}/namespaces/{ns}/{}", self.prefix, self.resource)
    }
}

/// The namespaced, deletable resource types of one `APIResourceList` served at `prefix`.
pub(crate) fn content_types(prefix: &str, group: &str, list: &Value) -> Vec<ContentType> {
    list.get("resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let name = r.get("name").and_then(Value::as_str)?;
            let verbs: Vec<&str> = r
                .get("verbs")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let namespaced = r.get("namespaced").and_then(Value::as_bool) == Some(true);
            let deletable = verbs.contains(&"delete") || verbs.contains(&"deletecollection");
            // Subresources (`pods/log`) go with their objects.
            (namespaced && !name.contains('/') && verbs.contains(&"list") && deletable).then(|| {
                ContentType {
                    prefix: prefix.to_string(),
                    group: group.to_string(),
                    resource: name.to_string(),
                    deletecollection: verbs.contains(&"deletecollection"),
                }
            })
        })
        .collect()
}

/// What discovery found: the types to empty, and the group versions it could not read.
#[derive(Debug, Default)]
struct Discovered {
    types: Vec<ContentType>,
    failures: Vec<String>,
}

/// Legacy discovery: `/api` versions and the preferred version of every group in `/apis`.
async fn discover(client: &ApiClient) -> Discovered {
    let mut d = Discovered::default();
    let mut gvs: Vec<(String, String)> = Vec::new();
    match client.get("/api").await {
        Ok(Some(v)) => {
            for ver in v
                .get("versions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                gvs.push((format!("/api/{ver}"), String::new()));
            }
        }
        Ok(None) => d.failures.push("/api: not found".into()),
        Err(e) => d.failures.push(format!("/api: {e}")),
    }
    match client.get("/apis").await {
        Ok(Some(v)) => {
            for g in v
                .get("groups")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = g.get("name").and_then(Value::as_str).unwrap_or_default();
                if let Some(gv) = g
                    .pointer("/preferredVersion/groupVersion")
                    .and_then(Value::as_str)
                {
                    gvs.push((format!("/apis/{gv}"), name.to_string()));
                }
            }
        }
        Ok(None) => d.failures.push("/apis: not found".into()),
        Err(e) => d.failures.push(format!("/apis: {e}")),
    }
    for (prefix, group) in gvs {
        match client.get(&prefix).await {
            Ok(Some(list)) => d.types.extend(content_types(&prefix, &group, &list)),
            Ok(None) => d.failures.push(format!("{prefix}: not found")),
            Err(e) => d.failures.push(format!("{prefix}: {e}")),
        }
    }
    d
}

/// What one deletion pass left behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Content {
    /// Objects still present, by group resource.
    pub remaining: BTreeMap<String, usize>,
    /// Finalizers on the objects still present, with how many objects carry each.
    pub finalizers: BTreeMap<String, usize>,
    /// Deletions or lists that failed, `"<group resource>: <error>"`.
    pub errors: Vec<String>,
}

/// Deletes everything of `types` in `ns` and counts what is left.
async fn delete_content(client: &ApiClient, ns: &str, types: &[ContentType]) -> Content {
    let mut c = Content::default();
    let opts =
        json!({"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"});
    for t in types {
        let gr = t.group_resource();
        let path = t.collection(ns);
        if t.deletecollection {
            let url = format!("{path}?propagationPolicy=Background");
            if let Err(e) = client
                .request(Method::DELETE, &url, Some(("application/json", &opts)))
                .await
                && !e.is_not_found()
            {
                c.errors.push(format!("{gr}: {e}"));
                continue;
            }
        }
        let items = match client.list(&path).await {
            Ok((items, _)) => items,
            Err(e) => {
                c.errors.push(format!("{gr}: {e}"));
                continue;
            }
        };
        let mut left = 0;
        for o in &items {
            if !t.deletecollection && !is_deleting(o) {
                let item = format!("{path}/{}", name_of(o));
                match client.delete(&item, Some(&opts)).await {
                    Ok(()) => {}
                    Err(e) => c.errors.push(format!("{gr}: {e}")),
                }
            }
            left += 1;
            for f in o
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                *c.finalizers.entry(f.to_string()).or_default() += 1;
            }
        }
        // Deleted one by one: what answered the delete may be gone already; the next pass
        // counts it again.
        if left > 0 {
            c.remaining.insert(gr, left);
        }
    }
    c
}

fn condition(ty: &str, status: bool, reason: &str, message: String) -> Value {
    json!({"type": ty, "status": if status { "True" } else { "False" },
           "reason": reason, "message": message})
}

/// The deletion conditions for `content` (Kubernetes' types, reasons and messages), keeping
/// each condition's `lastTransitionTime` from `old` while its status is unchanged.
pub(crate) fn conditions(
    old: &[Value],
    discovery_failures: &[String],
    content: &Content,
    now: &str,
) -> Vec<Value> {
    let mut out = vec![
        if discovery_failures.is_empty() {
            condition(
                "NamespaceDeletionDiscoveryFailure",
                false,
                "ResourcesDiscovered",
                "All resources successfully discovered".into(),
            )
        } else {
            condition(
                "NamespaceDeletionDiscoveryFailure",
                true,
                "DiscoveryFailed",
                format!(
                    "Discovery failed for some groups, {} failing: {}",
                    discovery_failures.len(),
                    discovery_failures.join(", ")
                ),
            )
        },
        condition(
            "NamespaceDeletionGroupVersionParsingFailure",
            false,
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed".into(),
        ),
        if content.errors.is_empty() {
            condition(
                "NamespaceDeletionContentFailure",
                false,
                "ContentDeleted",
                "All content successfully deleted, may be waiting on finalization".into(),
            )
        } else {
            condition(
                "NamespaceDeletionContentFailure",
                true,
                "ContentDeletionFailed",
                format!(
                    "Failed to delete all resource types, {} remaining: {}",
                    content.errors.len(),
                    content.errors.join(", ")
                ),
            )
        },
        if content.remaining.is_empty() {
            condition(
                "NamespaceContentRemaining",
                false,
                "ContentRemoved",
                "All content successfully removed".into(),
            )
        } else {
            let parts: Vec<String> = content
                .remaining
                .iter()
                .map(|(gr, n)| format!("{gr} has {n} resource instances"))
                .collect();
            condition(
                "NamespaceContentRemaining",
                true,
                "SomeResourcesRemain",
                format!("Some resources are remaining: {}", parts.join(", ")),
            )
        },
        if content.finalizers.is_empty() {
            condition(
                "NamespaceFinalizersRemaining",
                false,
                "ContentHasNoFinalizers",
                "All content-preserving finalizers finished".into(),
            )
        } else {
            let parts: Vec<String> = content
                .finalizers
                .iter()
                .map(|(f, n)| format!("{f} in {n} resource instances"))
                .collect();
            condition(
                "NamespaceFinalizersRemaining",
                true,
                "SomeFinalizersRemain",
                format!(
                    "Some content in the namespace has finalizers remaining: {}",
                    parts.join(", ")
                ),
            )
        },
    ];
    for c in &mut out {
        let same = old.iter().find(|o| o.get("type") == c.get("type"));
        let at = match same {
            Some(o) if o.get("status") == c.get("status") => o
                .get("lastTransitionTime")
                .cloned()
                .unwrap_or_else(|| json!(now)),
            _ => json!(now),
        };
        c["lastTransitionTime"] = at;
    }
    out
}

/// Whether the namespace still waits for this controller.
fn has_finalizer(ns: &Value) -> bool {
    ns.pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|f| f.as_str() == Some(FINALIZER)))
}

/// The `finalize` body: the namespace without [`FINALIZER`] in `spec.finalizers`.
pub(crate) fn without_finalizer(ns: &Value) -> Value {
    let mut out = ns.clone();
    let rest: Vec<Value> = ns
        .pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|f| f.as_str() != Some(FINALIZER))
        .cloned()
        .collect();
    out["spec"]["finalizers"] = Value::Array(rest);
    out
}

/// The namespace controller.
pub(crate) struct NamespaceController {
    client: ApiClient,
    /// Resource types from the last discovery, and when it ran.
    discovered: Mutex<Option<(Instant, Arc<Discovered>)>>,
}

impl NamespaceController {
    pub(crate) fn new(client: ApiClient) -> NamespaceController {
        NamespaceController {
            client,
            discovered: Mutex::new(None),
        }
    }

    async fn discovered(&self) -> Arc<Discovered> {
        {
            let cached = self
                .discovered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, d)) = cached.as_ref()
                && at.elapsed() < DISCOVERY_TTL
            {
                return d.clone();
            }
        }
        let d = Arc::new(discover(&self.client).await);
        // A partial answer is used once but not kept.
        if d.failures.is_empty() {
            *self
                .discovered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((Instant::now(), d.clone()));
        }
        d
    }
}

impl Reconciler for NamespaceController {
    fn name(&self) -> &'static str {
        "namespace"
    }

    async fn reconcile(&self, name: &str) -> Result<Action, ReconcileError> {
        let path = format!("/api/v1/namespaces/{name}");
        let Some(ns) = self.client.get(&path).await? else {
            return Ok(Action::Done);
        };
        if !is_deleting(&ns) || !has_finalizer(&ns) {
            return Ok(Action::Done);
        }
        let disc = self.discovered().await;
        let content = delete_content(&self.client, name, &disc.types).await;
        let old: Vec<Value> = ns
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let new = conditions(&old, &disc.failures, &content, &now);
        let terminating_phase =
            ns.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating");
        let mut ns = ns;
        if new != old || !terminating_phase {
            let mut updated = ns.clone();
            if !updated.get("status").is_some_and(Value::is_object) {
                updated["status"] = json!({});
            }
            updated["status"]["phase"] = json!("Terminating");
            updated["status"]["conditions"] = Value::Array(new);
            ns = self
                .client
                .update(&format!("{path}/status"), &updated)
                .await?;
        }
        if !disc.failures.is_empty() || !content.errors.is_empty() {
            let mut why = disc.failures.clone();
            why.extend(content.errors.iter().cloned());
            return Err(ReconcileError(format!(
                "namespace {name}: deleting content failed: {}",
                why.join("; ")
            )));
        }
        if !content.remaining.is_empty() {
            tracing::debug!(namespace = %name, remaining = ?content.remaining, "namespace content still going away");
            return Ok(Action::RequeueAfter(RECHECK));
        }
        self.client
            .update(&format!("{path}/finalize"), &without_finalizer(&ns))
            .await?;
        tracing::info!(namespace = %name, "namespace emptied and finalized");
        Ok(Action::Done)
    }
}

/// The terminating namespaces' names among `namespaces`.
fn terminating(namespaces: &Informer) -> impl Iterator<Item = String> {
    namespaces
        .list()
        .into_iter()
        .filter(|n| is_deleting(n))
        .map(|n| name_of(&n).to_string())
}

/// Queues terminating namespaces: from the namespace cache (all of them after every re-list),
/// and a namespace again whenever one of its pods is deleted.
async fn feed(namespaces: Informer, pods: Informer, queue: WorkQueue, shutdown: CancellationToken) {
    let mut ns_rx = namespaces.subscribe();
    let mut pod_rx = pods.subscribe();
    namespaces.wait_synced().await;
    for n in terminating(&namespaces) {
        queue.add(n);
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = ns_rx.recv() => match ev {
                Ok(Change::Upsert { new, .. }) if is_deleting(&new) => queue.add(name_of(&new)),
                Ok(Change::Upsert { .. } | Change::Delete { .. }) => {}
                Ok(Change::Resync) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for n in terminating(&namespaces) {
                        queue.add(n);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            ev = pod_rx.recv() => match ev {
                Ok(Change::Delete { old }) => {
                    let ns = namespace_of(&old);
                    if namespaces.get(ns).is_some_and(|n| is_deleting(&n)) {
                        queue.add(ns);
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Runs the namespace controller until `shutdown`.
pub(crate) async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let namespaces = Informer::new(ctx.client.clone(), "/api/v1/namespaces");
    let queue = WorkQueue::default();
    let mut set = tokio::task::JoinSet::new();
    set.spawn(namespaces.clone().run(shutdown.clone()));
    set.spawn(feed(
        namespaces,
        ctx.pods.clone(),
        queue.clone(),
        shutdown.clone(),
    ));
    set.spawn(super::queue::run(
        Arc::new(NamespaceController::new(ctx.client.clone())),
        queue,
        ctx.config.workers,
        shutdown,
    ));
    while let Some(r) = set.join_next().await {
        if let Err(e) = r
            && e.is_panic()
        {
            tracing::error!(error = %e, "namespace controller task panicked");
        }
    }
}

#[cfg(test)]
mod tests;
