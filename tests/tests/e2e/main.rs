//! Cross-crate end-to-end tests: an in-process control plane on loopback HTTPS (port 0) with
//! node agents running real wasm pods.
//!
//! - `workloads`: Deployments across nodes, scaling, rolling updates.
//! - `pods`: restart policies, CrashLoopBackOff, OOMKilled, graceful deletion.
//! - `scheduling`: FailedScheduling events, taints, nodeSelector.
//! - `node_loss`: a dead agent's pods are evicted and recreated elsewhere; a restarted agent
//!   runs its pods again without doubling them.
//! - `leader`: leader election through a Lease, with failover.
//! - `logs_exec`: `kubectl logs` / `kubectl exec` through the API server to the agents, and
//!   liveness/readiness probes.
//! - `cri`: the real CRI tier (containerd from `scripts/containerd`): busybox Deployments,
//!   image errors, OOMKilled, CPU limits, re-adoption after an agent restart, clean deletion.
//! - `endpoints`: Endpoints from Service selectors, ready and not-ready pods, named ports.
//! - `eviction`: node memory pressure evicts BestEffort, then Burstable above request.
//! - `gc`: foreground and orphan deletion propagation.
//! - `priority`: higher `spec.priority` is scheduled first and preempts lower.
//! - `namespaces`: `kubectl delete namespace` through the namespace controller; no new content
//!   in a Terminating namespace.
//! - `kubectl`: the real kubectl (when `scripts/kubectl` installed it) applies, scales, rolls
//!   out, undoes and drains.
use std::time::Duration;

use serde_json::{Value, json};

mod cri;
mod endpoints;
mod eviction;
mod gc;
mod kubectl;
mod leader;
mod logs_exec;
mod namespaces;
mod node_loss;
mod pods;
mod priority;
mod scheduling;
mod workloads;

/// Generous: the 2 cores are shared with other test binaries.
const WAIT: Duration = Duration::from_secs(60);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A Deployment of `replicas` sleeper pods.
fn sleeper_deployment(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "main",
                    "image": tests::guest("sleeper"),
                    "args": ["200"],
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                }]},
            },
        },
    })
}

/// A pod with one container running `guest` with `args`.
fn pod(name: &str, guest: &str, args: &[&str], restart: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "restartPolicy": restart,
            "containers": [{"name": "main", "image": tests::guest(guest), "args": args}],
        },
    })
}

/// Running, non-terminating pods whose name starts with `prefix`.
async fn running(c: &tests::Cluster, prefix: &str) -> anyhow::Result<Vec<Value>> {
    Ok(c.pods("default")
        .await?
        .into_iter()
        .filter(|p| {
            tests::phase(p) == "Running"
                && !tests::deleting(p)
                && p.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.starts_with(prefix))
                && p.pointer("/status/containerStatuses/0/state/running")
                    .is_some()
        })
        .collect())
}
