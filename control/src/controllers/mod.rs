//! Controllers: ReplicaSet, Deployment, node lifecycle (with NoExecute taint eviction) and
//! garbage collection, in the kube-runtime shape (level-triggered, idempotent reconcilers fed by
//! a de-duplicating work queue with back-off).
//!
//! They run inside `flotilla server` but talk to the API server over its REST API with the
//! admin token, exactly as kube-controller-manager does: every write goes through admission,
//! validation and the watch cache, and they would run unchanged in another process. (The API
//! server's registry layer is private to `apiserver`.)
//!
//! # Layout
//! - [`client`]: the REST client (JSON over HTTP/2, watches).
//! - [`informer`]: list+watch caches with change broadcasts.
//! - [`queue`]: the work queue and controller loop ([`queue::Reconciler`]).
//! - [`replicaset`], [`deployment`]: the workload controllers.
//! - `node_lifecycle`: Lease → Ready/Unknown → taints → eviction.
//! - `gc`: ownerReferences garbage collection (background, foreground, orphan) and pod GC.
//! - [`leader`]: leader election through a Lease, so one server's controllers act at a time.
//!
//! - `endpoints`: Endpoints from Service selectors and pods.
//! - `namespace`: namespace deletion (empties a terminating namespace, then removes its
//!   `kubernetes` finalizer through `namespaces/{name}/finalize`).
//!
//! Not done yet: `kubectl drain` beyond what the eviction subresource does.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The Kubernetes REST client, shared with the other side of the API (crate `apiclient`).
pub use apiclient as client;
pub mod deployment;
pub mod endpoints;
mod gc;
pub mod informer;
pub mod labels;
pub mod leader;
mod namespace;
mod node_lifecycle;
pub mod queue;
pub mod replicaset;

pub use client::{ApiClient, ClientError};
pub use informer::Informer;
pub use node_lifecycle::{NOT_READY, UNREACHABLE, tolerates};
pub use queue::{Action, ReconcileError, Reconciler, WorkQueue};

/// Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// How often node health is checked (Kubernetes: 5 s).
    pub node_monitor_period: Duration,
    /// Lease age after which a node is `Unknown` (Kubernetes: 40 s).
    pub node_monitor_grace_period: Duration,
    /// `tolerationSeconds` for pods without a not-ready/unreachable toleration (Kubernetes: 300 s).
    pub default_toleration: Duration,
    /// Garbage-collector sweep period.
    pub gc_interval: Duration,
    /// Workers per workload controller.
    pub workers: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            node_monitor_period: Duration::from_secs(5),
            node_monitor_grace_period: node_lifecycle::DEFAULT_GRACE,
            default_toleration: Duration::from_secs(300),
            gc_interval: Duration::from_secs(10),
            workers: 4,
        }
    }
}

/// What every controller shares: the client, the caches and the settings.
pub struct Context {
    /// Client with controller rights.
    pub client: ApiClient,
    /// All pods.
    pub pods: Informer,
    /// All nodes.
    pub nodes: Informer,
    /// Node leases.
    pub leases: Informer,
    /// All ReplicaSets.
    pub replicasets: Informer,
    /// All Deployments.
    pub deployments: Informer,
    /// Settings.
    pub config: ControllerConfig,
}

/// Whether the pod has ended (`Succeeded` or `Failed`).
pub fn pod_is_terminal(p: &Value) -> bool {
    matches!(
        p.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Whether the pod's `Ready` condition is `True`.
pub fn pod_is_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

/// Creates an Event about `obj` (failures are logged, never fatal).
pub async fn record_event(
    ctx: &Context,
    obj: &Value,
    ty: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    post_event(&ctx.client, obj, ty, reason, message, component).await;
}

/// Creates an Event about `obj` with `client`.
pub async fn post_event(
    client: &ApiClient,
    obj: &Value,
    ty: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let ns = match labels::namespace_of(obj) {
        "" => "default",
        ns => ns,
    };
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let name = format!(
        "{}.{:x}",
        labels::name_of(obj),
        now.timestamp_nanos_opt().unwrap_or(0)
    );
    let ev = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ns},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion").cloned().unwrap_or(json!("v1")),
            // List items may lack their kind: the cluster-scoped objects events are about
            // here are Nodes, the namespaced ones Pods.
            "kind": obj.get("kind").cloned().unwrap_or_else(|| {
                json!(if labels::namespace_of(obj).is_empty() { "Node" } else { "Pod" })
            }),
            "name": labels::name_of(obj),
            "namespace": labels::namespace_of(obj),
            "uid": labels::uid_of(obj),
            "resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(json!("")),
        },
        "reason": reason,
        "message": message,
        "type": ty,
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": component,
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
    });
    if let Err(e) = client
        .create(&format!("/api/v1/namespaces/{ns}/events"), &ev)
        .await
    {
        tracing::debug!(error = %e, %reason, "failed to record event");
    }
}

impl Context {
    /// Builds the caches (not yet running) over `client`.
    pub fn new(client: ApiClient, config: ControllerConfig) -> Context {
        Context {
            pods: Informer::with_index(client.clone(), "/api/v1/pods", labels::owner_index),
            nodes: Informer::new(client.clone(), "/api/v1/nodes"),
            leases: Informer::new(
                client.clone(),
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            ),
            replicasets: Informer::new(client.clone(), "/apis/apps/v1/replicasets"),
            deployments: Informer::new(client.clone(), "/apis/apps/v1/deployments"),
            client,
            config,
        }
    }
}

/// Feeds a queue from an informer: each change maps to zero or more keys.
async fn feed(
    informer: Informer,
    queue: WorkQueue,
    map: impl Fn(&Value) -> Vec<String> + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut rx = informer.subscribe();
    informer.wait_synced().await;
    for o in informer.list() {
        for k in map(&o) {
            queue.add(k);
        }
    }
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = rx.recv() => ev,
        };
        match ev {
            Ok(informer::Change::Upsert { old, new }) => {
                for k in map(&new) {
                    queue.add(k);
                }
                if let Some(o) = old {
                    for k in map(&o) {
                        queue.add(k);
                    }
                }
            }
            Ok(informer::Change::Delete { old }) => {
                for k in map(&old) {
                    queue.add(k);
                }
            }
            Ok(informer::Change::Resync)
            | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                for o in informer.list() {
                    for k in map(&o) {
                        queue.add(k);
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The key of the object's managing owner, if it is of `kind`.
fn owner_key(obj: &Value, kind: &str) -> Vec<String> {
    labels::controller_of(obj)
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some(kind))
        .and_then(|r| r.get("name").and_then(Value::as_str))
        .map(|n| vec![format!("{}/{n}", labels::namespace_of(obj))])
        .unwrap_or_default()
}

/// Runs every controller until `shutdown`; returns once they have all stopped.
pub async fn run_all(client: ApiClient, config: ControllerConfig, shutdown: CancellationToken) {
    let ctx = Arc::new(Context::new(client, config));
    let mut set = tokio::task::JoinSet::new();
    for inf in [
        &ctx.pods,
        &ctx.nodes,
        &ctx.leases,
        &ctx.replicasets,
        &ctx.deployments,
    ] {
        set.spawn(inf.clone().run(shutdown.clone()));
    }
    let workers = ctx.config.workers;
    // ReplicaSets: their own changes and their pods'.
    let rs_q = WorkQueue::default();
    set.spawn(feed(
        ctx.replicasets.clone(),
        rs_q.clone(),
        |o| vec![informer::key_of(o)],
        shutdown.clone(),
    ));
    let expectations = Arc::new(replicaset::Expectations::default());
    set.spawn(replicaset::feed_pods(
        ctx.clone(),
        expectations.clone(),
        rs_q.clone(),
        shutdown.clone(),
    ));
    set.spawn(queue::run(
        Arc::new(replicaset::ReplicaSetController {
            ctx: ctx.clone(),
            expectations,
        }),
        rs_q,
        workers,
        shutdown.clone(),
    ));
    // Deployments: their own changes and their ReplicaSets'.
    let d_q = WorkQueue::default();
    set.spawn(feed(
        ctx.deployments.clone(),
        d_q.clone(),
        |o| vec![informer::key_of(o)],
        shutdown.clone(),
    ));
    set.spawn(feed(
        ctx.replicasets.clone(),
        d_q.clone(),
        |o| owner_key(o, "Deployment"),
        shutdown.clone(),
    ));
    set.spawn(queue::run(
        Arc::new(deployment::DeploymentController { ctx: ctx.clone() }),
        d_q,
        workers,
        shutdown.clone(),
    ));
    // Endpoints: Services, their Endpoints, and the pods their selectors match.
    let services = Informer::new(ctx.client.clone(), "/api/v1/services");
    let endpoints = Informer::new(ctx.client.clone(), "/api/v1/endpoints");
    set.spawn(services.clone().run(shutdown.clone()));
    set.spawn(endpoints.clone().run(shutdown.clone()));
    let ep_q = WorkQueue::default();
    for inf in [&services, &endpoints] {
        set.spawn(feed(
            inf.clone(),
            ep_q.clone(),
            |o| vec![informer::key_of(o)],
            shutdown.clone(),
        ));
    }
    let svc_cache = services.clone();
    set.spawn(feed(
        ctx.pods.clone(),
        ep_q.clone(),
        move |o| endpoints::services_for_pod(&svc_cache, o),
        shutdown.clone(),
    ));
    set.spawn(queue::run(
        Arc::new(endpoints::EndpointsController {
            ctx: ctx.clone(),
            services,
            endpoints,
        }),
        ep_q,
        workers,
        shutdown.clone(),
    ));
    set.spawn(node_lifecycle::run(ctx.clone(), shutdown.clone()));
    set.spawn(gc::run(ctx.clone(), shutdown.clone()));
    set.spawn(namespace::run(ctx.clone(), shutdown.clone()));
    while let Some(r) = set.join_next().await {
        if let Err(e) = r
            && e.is_panic()
        {
            tracing::error!(error = %e, "controller task panicked");
            shutdown.cancel();
        }
    }
}

/// Writes `DATA_DIR/node-token` (mode 0600) if missing: the join token agents use
/// (`flotilla-node-token:v1 <node secret>` followed by the cluster CA), from the API server's
/// `auth/node.secret` and `pki/ca.crt`. Returns its path.
pub fn write_node_token(data_dir: &Path) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("node-token");
    let secret = std::fs::read_to_string(data_dir.join("auth/node.secret"))?;
    let ca = std::fs::read_to_string(data_dir.join("pki/ca.crt"))?;
    let text = format!("flotilla-node-token:v1 {}\n{ca}", secret.trim());
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(path);
    }
    let tmp = data_dir.join("node-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Everything `flotilla server` runs beside the API server: writes `DATA_DIR/node-token`, then
/// runs the scheduler and every controller with `client` (the admin's in-process client of the
/// API server in this process, [`crate::apiserver::ApiServer::local_client`]) until `shutdown`.
pub async fn run_with_server(
    data_dir: &Path,
    client: ApiClient,
    controllers: ControllerConfig,
    scheduler: crate::scheduler::SchedulerConfig,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    write_node_token(data_dir)
        .map_err(|e| ClientError::Config(format!("writing the node token: {e}")))?;
    // Several servers may run: the scheduler and the controllers each act only while holding
    // their Lease, as kube-scheduler and kube-controller-manager do.
    let identity = format!(
        "{}_{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "flotilla".into()),
        hex::encode(rand::random::<[u8; 4]>())
    );
    let c2 = client.clone();
    tokio::join!(
        leader::run_as_leader(
            client.clone(),
            leader::LeaderElectionConfig::new("kube-controller-manager", identity.clone()),
            shutdown.clone(),
            move |lead| run_all(c2.clone(), controllers.clone(), lead),
        ),
        leader::run_as_leader(
            client.clone(),
            leader::LeaderElectionConfig::new("kube-scheduler", identity),
            shutdown,
            move |lead| crate::scheduler::run(client.clone(), scheduler.clone(), lead),
        ),
    );
    Ok(())
}
