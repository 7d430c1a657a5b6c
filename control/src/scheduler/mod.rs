//! The scheduler: watches unscheduled pods and binds each to the best feasible node through the
//! `binding` subresource.
//!
//! Filters (in kube-scheduler's order, first failure per node reported): unschedulable
//! (cordoned) nodes, untolerated NoSchedule/NoExecute taints (which covers not-ready and
//! unreachable nodes through the node lifecycle taints), `nodeSelector` and required node
//! affinity, the pod's runtime class vs the classes the node offers, resource fit (requests vs
//! allocatable minus what is bound, pod count), required pod anti-affinity on
//! `kubernetes.io/hostname`. Scores: least allocated, balanced allocation, spreading of one
//! owner's replicas, preferred node affinity; ties broken at random.
//!
//! A pod that fits nowhere stays Pending with a `FailedScheduling` event worded like
//! Kubernetes' and a `PodScheduled=False` condition, and is retried whenever a node changes or
//! a bound pod goes away (and every `retry_interval`). Pods are scheduled in batches against
//! one snapshot of the cluster, binds of a batch sent concurrently; a pod just bound is
//! "assumed" on its node until the cache shows the binding. Preemption is not implemented.
//!
//! Like the controllers, it talks to the API server over REST (see [`crate::controllers`]).
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rand::Rng as _;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::controllers::informer::{Change, Informer, key_of};
use crate::controllers::labels::{is_deleting, name_of, namespace_of, uid_of};
use crate::controllers::{ApiClient, pod_is_terminal, post_event};

pub mod predicates;

use predicates::{NodeInfo, PodFacts, filter_facts, fit_error, score_facts};

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `spec.schedulerName` this scheduler serves (an empty name is served too).
    pub scheduler_name: String,
    /// Unschedulable pods are retried at least this often even without cluster changes.
    pub retry_interval: Duration,
    /// Most pods scheduled against one snapshot.
    pub batch_size: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            scheduler_name: "default-scheduler".into(),
            retry_interval: Duration::from_secs(30),
            batch_size: 512,
        }
    }
}

struct Scheduler {
    client: ApiClient,
    config: SchedulerConfig,
    pods: Informer,
    nodes: Informer,
    active: VecDeque<String>,
    queued: HashSet<String>,
    unschedulable: HashSet<String>,
    assumed: HashMap<String, (String, Instant)>,
    reported: HashMap<String, (String, Instant)>,
    next_start: usize,
}

/// How many feasible nodes are enough to pick from: all below 100 nodes, else
/// `max(5, 50 - nodes/125)` percent but at least 100 (kube-scheduler's adaptive default).
fn feasible_nodes_to_find(nodes: usize) -> usize {
    if nodes < 100 {
        return nodes.max(1);
    }
    let pct = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * pct / 100).max(100)
}

impl Scheduler {
    fn wants(&self, pod: &Value) -> bool {
        let unbound = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        let ours = pod
            .pointer("/spec/schedulerName")
            .and_then(Value::as_str)
            .is_none_or(|n| n.is_empty() || n == self.config.scheduler_name);
        unbound && ours && !is_deleting(pod) && !pod_is_terminal(pod)
    }

    fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.active.push_back(key);
        }
    }

    fn flush_unschedulable(&mut self) {
        let keys: Vec<String> = self.unschedulable.drain().collect();
        for k in keys {
            self.enqueue(k);
        }
    }

    fn on_pod(&mut self, change: Change) {
        match change {
            Change::Upsert { old, new } => {
                let key = key_of(&new);
                if self.wants(&new) {
                    if !self.unschedulable.contains(&key) {
                        self.enqueue(key);
                    }
                } else {
                    self.unschedulable.remove(&key);
                    // A bound pod that ended frees its node's resources.
                    let was_running = old.as_ref().is_some_and(|o| !pod_is_terminal(o));
                    if pod_is_terminal(&new) && was_running {
                        self.flush_unschedulable();
                    }
                }
            }
            Change::Delete { old } => {
                let key = key_of(&old);
                self.unschedulable.remove(&key);
                self.reported.remove(uid_of(&old));
                if old
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some()
                {
                    self.flush_unschedulable();
                }
            }
            Change::Resync => self.resync(),
        }
    }

    fn resync(&mut self) {
        for p in self.pods.list() {
            if self.wants(&p) {
                let key = key_of(&p);
                self.unschedulable.remove(&key);
                self.enqueue(key);
            }
        }
    }

    /// Node infos from the caches plus pods bound but not yet seen bound.
    fn snapshot(&mut self) -> Vec<NodeInfo> {
        let mut infos: Vec<NodeInfo> = self.nodes.list().into_iter().map(NodeInfo::new).collect();
        infos.sort_by(|a, b| a.name().cmp(b.name()));
        let index: HashMap<String, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name().to_string(), i))
            .collect();
        let now = Instant::now();
        let mut still_assumed = HashMap::new();
        for pod in self.pods.list() {
            if pod_is_terminal(&pod) {
                continue;
            }
            let key = key_of(&pod);
            let node = match pod.pointer("/spec/nodeName").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => match self.assumed.get(&key) {
                    Some((n, at)) if now.duration_since(*at) < Duration::from_secs(30) => {
                        still_assumed.insert(key, (n.clone(), *at));
                        n.clone()
                    }
                    _ => continue,
                },
            };
            if let Some(i) = index.get(&node) {
                infos[*i].add_pod(&pod);
            }
        }
        self.assumed = still_assumed;
        infos
    }

    async fn schedule_batch(&mut self) {
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_size {
            let Some(k) = self.active.pop_front() else {
                break;
            };
            self.queued.remove(&k);
            if let Some(p) = self.pods.get(&k)
                && self.wants(&p)
                && !self.assumed.contains_key(&k)
            {
                batch.push(p);
            }
        }
        if batch.is_empty() {
            return;
        }
        let t_snapshot = Instant::now();
        let mut infos = self.snapshot();
        let t_place = Instant::now();
        let mut binds = Vec::new();
        let mut failures = Vec::new();
        for pod in batch {
            let mut reasons: HashMap<String, usize> = HashMap::new();
            let facts = PodFacts::new(&pod);
            let max_owner = facts
                .owner
                .as_ref()
                .map(|u| {
                    infos
                        .iter()
                        .map(|i| i.owners.get(u).copied().unwrap_or(0))
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0);
            let mut best: Vec<usize> = Vec::new();
            let mut best_score = i64::MIN;
            // Like kube-scheduler's percentageOfNodesToScore: stop once enough feasible nodes
            // are found, starting where the previous pod stopped so every node gets its turn.
            let n = infos.len();
            let enough = feasible_nodes_to_find(n);
            let start = if n == 0 { 0 } else { self.next_start % n };
            let mut feasible = 0;
            let mut visited = 0;
            for i in (0..n).map(|k| (start + k) % n) {
                if feasible >= enough {
                    break;
                }
                visited += 1;
                let info = &infos[i];
                let why = filter_facts(&facts, info);
                if !why.is_empty() {
                    for r in why {
                        *reasons.entry(r).or_insert(0) += 1;
                    }
                    continue;
                }
                feasible += 1;
                let s = score_facts(&facts, info, max_owner);
                if s > best_score {
                    best_score = s;
                    best.clear();
                }
                if s == best_score {
                    best.push(i);
                }
            }
            self.next_start = start + visited;
            if best.is_empty() {
                failures.push((pod, fit_error(infos.len(), &reasons)));
                continue;
            }
            let pick = best[rand::rng().random_range(0..best.len())];
            infos[pick].add_pod(&pod);
            binds.push((pod, infos[pick].name().to_string()));
        }
        let t_bind = Instant::now();
        let batch_pods = binds.len() + failures.len();
        let client = &self.client;
        let scheduler_name = self.config.scheduler_name.as_str();
        let results = futures::future::join_all(binds.iter().map(|(pod, node)| async move {
            let (ns, name) = (namespace_of(pod), name_of(pod));
            let b = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "namespace": ns, "uid": uid_of(pod)},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            });
            let r = client
                .create(&format!("/api/v1/namespaces/{ns}/pods/{name}/binding"), &b)
                .await;
            if r.is_ok() {
                let msg = format!("Successfully assigned {ns}/{name} to {node}");
                post_event(client, pod, "Normal", "Scheduled", &msg, scheduler_name).await;
            }
            r
        }))
        .await;
        let now = Instant::now();
        for ((pod, node), r) in binds.into_iter().zip(results) {
            let key = key_of(&pod);
            match r {
                Ok(_) => {
                    tracing::debug!(pod = %key, %node, "bound");
                    self.reported.remove(uid_of(&pod));
                    self.assumed.insert(key, (node, now));
                }
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "binding failed; will retry");
                    self.unschedulable.insert(key);
                }
            }
        }
        tracing::debug!(
            pods = batch_pods,
            nodes = infos.len(),
            snapshot_ms = (t_place - t_snapshot).as_secs_f64() * 1e3,
            place_ms = (t_bind - t_place).as_secs_f64() * 1e3,
            bind_ms = t_bind.elapsed().as_secs_f64() * 1e3,
            "scheduled a batch"
        );
        for (pod, message) in failures {
            self.report_unschedulable(&pod, message).await;
        }
    }

    async fn report_unschedulable(&mut self, pod: &Value, message: String) {
        let key = key_of(pod);
        self.unschedulable.insert(key.clone());
        let uid = uid_of(pod).to_string();
        let repeat = self
            .reported
            .get(&uid)
            .is_some_and(|(m, at)| *m == message && at.elapsed() < Duration::from_secs(60));
        if repeat {
            return;
        }
        tracing::info!(pod = %key, %message, "pod unschedulable");
        self.reported.insert(uid, (message.clone(), Instant::now()));
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let status = json!({"status": {"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastProbeTime": null, "lastTransitionTime": now,
        }]}});
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            namespace_of(pod),
            name_of(pod)
        );
        if let Err(e) = self.client.merge_patch(&path, &status).await {
            tracing::debug!(pod = %key, error = %e, "failed to set PodScheduled=False");
        }
        // The condition first, then the event: whoever sees the event can read the reason.
        post_event(
            &self.client,
            pod,
            "Warning",
            "FailedScheduling",
            &message,
            &self.config.scheduler_name,
        )
        .await;
    }
}

/// Runs the scheduler until `shutdown`.
pub async fn run(client: ApiClient, config: SchedulerConfig, shutdown: CancellationToken) {
    let pods = Informer::new(client.clone(), "/api/v1/pods");
    let nodes = Informer::new(client.clone(), "/api/v1/nodes");
    let mut pod_rx = pods.subscribe();
    let mut node_rx = nodes.subscribe();
    // The caches stop with the scheduler, whatever ends it.
    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(pods.clone().run(stop.clone()));
    tasks.spawn(nodes.clone().run(stop.clone()));
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = async { pods.wait_synced().await; nodes.wait_synced().await; } => {}
    }
    let retry = config.retry_interval;
    let mut s = Scheduler {
        client,
        config,
        pods,
        nodes,
        active: VecDeque::new(),
        queued: HashSet::new(),
        unschedulable: HashSet::new(),
        assumed: HashMap::new(),
        reported: HashMap::new(),
        next_start: 0,
    };
    s.resync();
    let mut next_flush = Instant::now() + retry;
    loop {
        if !s.active.is_empty() {
            s.schedule_batch().await;
            // Take in what happened meanwhile before the next batch.
            loop {
                match pod_rx.try_recv() {
                    Ok(c) => s.on_pod(c),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => s.resync(),
                    Err(_) => break,
                }
            }
            while let Ok(c) = node_rx.try_recv() {
                if !matches!(
                    c,
                    Change::Upsert { .. } | Change::Delete { .. } | Change::Resync
                ) {
                    continue;
                }
                s.flush_unschedulable();
            }
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = pod_rx.recv() => match ev {
                Ok(c) => s.on_pod(c),
                Err(RecvError::Lagged(_)) => s.resync(),
                Err(RecvError::Closed) => break,
            },
            ev = node_rx.recv() => match ev {
                Ok(_) | Err(RecvError::Lagged(_)) => s.flush_unschedulable(),
                Err(RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(next_flush) => {
                next_flush = Instant::now() + retry;
                s.flush_unschedulable();
            }
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::feasible_nodes_to_find;

    #[test]
    fn adaptive_share_of_nodes_like_kube_scheduler() {
        assert_eq!(feasible_nodes_to_find(3), 3);
        assert_eq!(feasible_nodes_to_find(99), 99);
        assert_eq!(feasible_nodes_to_find(100), 100);
        assert_eq!(feasible_nodes_to_find(1000), 420);
        assert_eq!(feasible_nodes_to_find(5000), 500);
        assert_eq!(feasible_nodes_to_find(100_000), 5000);
    }
}
