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
//! a bound pod goes away (and every `retry_interval`). Pods are taken in `spec.priority` order
//! (highest first). A pod that fits nowhere may preempt: pods of lower priority are deleted
//! from the node where the fewest, least important ones make room (no PodDisruptionBudgets),
//! the pod gets `status.nominatedNodeName` and is scheduled once they are gone (the freed room
//! is not reserved for it meanwhile).
//!
//! # How it goes fast
//! - The node view ([`predicates::NodeInfo`] per node: typed labels, taints, allocatable, and
//!   running totals of what is placed there) is kept up to date from the informers' change
//!   events, never rebuilt per cycle; it is rebuilt only after an informer re-list.
//! - Each pod looks at kube-scheduler's adaptive share of the nodes (`percentageOfNodesToScore`),
//!   starting where the previous pod stopped.
//! - Binds are pipelined: a pod is "assumed" on its node as soon as it is placed, its bind
//!   request goes out and placement of the next pods goes on without waiting; up to
//!   [`MAX_BINDS_IN_FLIGHT`] binds are in flight. A failed bind forgets the assumption and
//!   retries the pod.
//! - Events are posted by a separate task from a bounded queue and dropped when it is full, as
//!   client-go's event broadcaster does, so they never hold up binding ([`event_counts`] says
//!   how many were posted and dropped). At shutdown the queue is drained for up to
//!   [`EVENT_DRAIN`].
//! - In `flotilla server` its client calls the API server in-process
//!   ([`crate::apiserver::ApiServer::local_client`]): no TLS or HTTP/2 per bind.
//!
//! Like the controllers, it talks to the API server over REST (see [`crate::controllers`]).
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rand::Rng as _;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::controllers::informer::{Change, Informer, key_of};
use crate::controllers::labels::{is_deleting, name_of, namespace_of, uid_of};
use crate::controllers::{ApiClient, ClientError, pod_is_terminal, post_event};

pub mod predicates;

use predicates::{NodeInfo, PodFacts, PodUsage, Reason, filter_facts, fit_error, score_facts};

/// Most binds awaiting the API server's answer at once.
pub const MAX_BINDS_IN_FLIGHT: usize = 2048;

/// Events waiting to be posted before new ones are dropped.
const EVENT_QUEUE: usize = 8192;

/// Events posted at once by the event task.
const EVENT_CONCURRENCY: usize = 16;

/// How long a stopping scheduler keeps posting the events already queued.
pub const EVENT_DRAIN: Duration = Duration::from_secs(5);

/// Events posted (answered by the API server, successfully or not) and dropped because the
/// queue was full, by every scheduler of this process.
static EVENTS_POSTED: AtomicU64 = AtomicU64::new(0);
static EVENTS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many events the schedulers of this process have posted and how many they dropped
/// because their queue was full (client-go's broadcaster drops silently; we count).
pub fn event_counts() -> (u64, u64) {
    (
        EVENTS_POSTED.load(Ordering::Relaxed),
        EVENTS_DROPPED.load(Ordering::Relaxed),
    )
}

/// An assumed pod not seen bound by then is forgotten (kube-scheduler: 30 s after binding).
const ASSUME_TTL: Duration = Duration::from_secs(30);

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `spec.schedulerName` this scheduler serves (an empty name is served too).
    pub scheduler_name: String,
    /// Unschedulable pods are retried at least this often even without cluster changes.
    pub retry_interval: Duration,
    /// Most pods placed before taking in the informers' news again.
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

/// A pod counted on a node.
struct Placement {
    node: String,
    /// Placed by us and not yet seen bound by the cache: since when.
    assumed: Option<Instant>,
}

/// An event for the event task to post.
struct EventReq {
    obj: Arc<Value>,
    ty: &'static str,
    reason: &'static str,
    message: String,
}

type BindOutcome = (Arc<Value>, String, Result<(), ClientError>);

struct Scheduler {
    client: ApiClient,
    config: SchedulerConfig,
    pods: Informer,
    nodes: Informer,
    /// Pods to schedule: highest `spec.priority` first, then first come first served (the
    /// order of kube-scheduler's activeQ).
    active: BinaryHeap<(i64, Reverse<u64>, String)>,
    seq: u64,
    queued: HashSet<String>,
    unschedulable: HashSet<String>,
    /// Every node, in no particular order; `index` maps names to positions.
    infos: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    /// Where each counted pod is (bound, or assumed by us).
    placed: HashMap<String, Placement>,
    reported: HashMap<String, (String, Instant)>,
    /// Pods that preempted others, and when: they wait for their victims to go.
    nominated: HashMap<String, Instant>,
    next_start: usize,
    events: mpsc::Sender<EventReq>,
    dropped_events: u64,
    binds: FuturesUnordered<BoxFuture<'static, BindOutcome>>,
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

/// `spec.priority` (set from a PriorityClass by admission in Kubernetes; an int here), 0 if unset.
fn priority_of(pod: &Value) -> i64 {
    pod.get("spec")
        .and_then(|s| s.get("priority"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn node_name_of(pod: &Value) -> Option<&str> {
    pod.get("spec")
        .and_then(|s| s.get("nodeName"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

impl Scheduler {
    fn wants(&self, pod: &Value) -> bool {
        let ours = pod
            .get("spec")
            .and_then(|s| s.get("schedulerName"))
            .and_then(Value::as_str)
            .is_none_or(|n| n.is_empty() || n == self.config.scheduler_name);
        node_name_of(pod).is_none() && ours && !is_deleting(pod) && !pod_is_terminal(pod)
    }

    fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            let priority = self.pods.get(&key).map_or(0, |p| priority_of(&p));
            self.seq += 1;
            self.active.push((priority, Reverse(self.seq), key));
        }
    }

    fn flush_unschedulable(&mut self) {
        let keys: Vec<String> = self.unschedulable.drain().collect();
        for k in keys {
            self.enqueue(k);
        }
    }

    /// Counts `pod` on `node` (replacing wherever it was counted before).
    fn place(&mut self, key: &str, pod: Arc<Value>, node: &str, assumed: Option<Instant>) {
        self.unplace(key);
        if let Some(&i) = self.index.get(node) {
            let usage = PodUsage::of(&pod);
            self.infos[i].add_pod(key, pod, &usage);
        }
        self.placed.insert(
            key.to_string(),
            Placement {
                node: node.to_string(),
                assumed,
            },
        );
    }

    fn unplace(&mut self, key: &str) {
        if let Some(p) = self.placed.remove(key)
            && let Some(&i) = self.index.get(&p.node)
        {
            self.infos[i].remove_pod(key);
        }
    }

    /// Brings the node view in line with one pod as the cache now shows it.
    fn account(&mut self, key: &str, pod: &Arc<Value>) {
        if pod_is_terminal(pod) {
            self.unplace(key);
        } else if let Some(node) = node_name_of(pod) {
            let node = node.to_string();
            self.place(key, pod.clone(), &node, None);
        } else if self.placed.get(key).is_some_and(|p| p.assumed.is_none()) {
            self.unplace(key);
        }
    }

    fn on_pod(&mut self, change: Change) {
        match change {
            Change::Upsert { old, new } => {
                let key = key_of(&new);
                self.account(&key, &new);
                if self.wants(&new) {
                    if !self.unschedulable.contains(&key) && !self.placed.contains_key(&key) {
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
                self.nominated.remove(&key);
                self.unplace(&key);
                self.unschedulable.remove(&key);
                self.reported.remove(uid_of(&old));
                if node_name_of(&old).is_some() {
                    self.flush_unschedulable();
                }
            }
            Change::Resync => self.resync(),
        }
    }

    fn on_node(&mut self, change: Change) {
        match change {
            Change::Upsert { new, .. } => {
                let name = name_of(&new).to_string();
                if let Some(&i) = self.index.get(&name) {
                    let info = &mut self.infos[i];
                    let before = (
                        info.alloc_cpu,
                        info.alloc_memory,
                        info.alloc_pods,
                        info.unschedulable,
                        std::mem::take(&mut info.hard_taints),
                        std::mem::take(&mut info.labels),
                        std::mem::take(&mut info.runtime_classes),
                    );
                    info.set_node(&new);
                    // Heartbeats change nothing the filters look at: no retry for them.
                    let unchanged = before.0 == info.alloc_cpu
                        && before.1 == info.alloc_memory
                        && before.2 == info.alloc_pods
                        && before.3 == info.unschedulable
                        && before.4 == info.hard_taints
                        && before.5 == info.labels
                        && before.6 == info.runtime_classes;
                    if unchanged {
                        return;
                    }
                } else {
                    self.index.insert(name.clone(), self.infos.len());
                    self.infos.push(NodeInfo::new(&new));
                    // Pods may already be bound to a node that just (re)appeared.
                    let here: Vec<String> = self
                        .placed
                        .iter()
                        .filter(|(_, p)| p.node == name)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in here {
                        if let Some(pod) = self.pods.get(&key) {
                            let assumed = self.placed.get(&key).and_then(|p| p.assumed);
                            self.place(&key, pod, &name, assumed);
                        }
                    }
                }
            }
            Change::Delete { old } => {
                if let Some(i) = self.index.remove(name_of(&old)) {
                    self.infos.swap_remove(i);
                    if let Some(moved) = self.infos.get(i) {
                        self.index.insert(moved.name.clone(), i);
                    }
                }
            }
            Change::Resync => self.rebuild(),
        }
        self.flush_unschedulable();
    }

    /// Rebuilds the node view from the caches, keeping our assumptions.
    fn rebuild(&mut self) {
        self.infos = self.nodes.list().iter().map(|n| NodeInfo::new(n)).collect();
        self.index = self
            .infos
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let assumed: Vec<(String, String, Instant)> = self
            .placed
            .drain()
            .filter_map(|(k, p)| Some((k, p.node, p.assumed?)))
            .collect();
        for pod in self.pods.list() {
            let key = key_of(&pod);
            self.account(&key, &pod);
        }
        for (key, node, at) in assumed {
            if self.placed.contains_key(&key) {
                continue;
            }
            if let Some(pod) = self.pods.get(&key)
                && self.wants(&pod)
            {
                self.place(&key, pod, &node, Some(at));
            }
        }
    }

    fn resync(&mut self) {
        self.rebuild();
        for p in self.pods.list() {
            if self.wants(&p) {
                let key = key_of(&p);
                self.unschedulable.remove(&key);
                if !self.placed.contains_key(&key) {
                    self.enqueue(key);
                }
            }
        }
    }

    /// Forgets assumptions the cache never confirmed (a bind that was lost).
    fn expire_assumed(&mut self) {
        let now = Instant::now();
        let stale: Vec<String> = self
            .placed
            .iter()
            .filter(|(_, p)| {
                p.assumed
                    .is_some_and(|at| now.duration_since(at) > ASSUME_TTL)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.unplace(&key);
            if let Some(p) = self.pods.get(&key)
                && self.wants(&p)
            {
                self.enqueue(key);
            }
        }
    }

    fn event(&mut self, obj: Arc<Value>, ty: &'static str, reason: &'static str, message: String) {
        let req = EventReq {
            obj,
            ty,
            reason,
            message,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(req) {
            EVENTS_DROPPED.fetch_add(1, Ordering::Relaxed);
            self.dropped_events += 1;
            if self.dropped_events.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped_events,
                    "event queue full; events dropped"
                );
            }
        }
    }

    /// Places up to one batch of queued pods and sends their binds.
    async fn schedule_batch(&mut self) {
        let room = MAX_BINDS_IN_FLIGHT.saturating_sub(self.binds.len());
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_size.min(room) {
            let Some((_, _, k)) = self.active.pop() else {
                break;
            };
            self.queued.remove(&k);
            if let Some(p) = self.pods.get(&k)
                && self.wants(&p)
                && !self.placed.contains_key(&k)
            {
                batch.push((k, p));
            }
        }
        if batch.is_empty() {
            return;
        }
        let t_place = Instant::now();
        let mut failures = Vec::new();
        let n_batch = batch.len();
        let mut feasible: Vec<usize> = Vec::new();
        for (key, pod) in batch {
            let facts = PodFacts::new(&pod);
            // Like kube-scheduler's percentageOfNodesToScore: stop once enough feasible nodes
            // are found, starting where the previous pod stopped so every node gets its turn.
            let n = self.infos.len();
            let enough = feasible_nodes_to_find(n);
            let start = if n == 0 { 0 } else { self.next_start % n };
            feasible.clear();
            let mut visited = 0;
            for i in (0..n).map(|k| (start + k) % n) {
                if feasible.len() >= enough {
                    break;
                }
                visited += 1;
                // Reasons are only wanted when nothing fits: not counted here.
                if filter_facts(&facts, &self.infos[i], |_| {}) {
                    feasible.push(i);
                }
            }
            self.next_start = start + visited;
            if feasible.is_empty() {
                // Every node was visited and failed: go over them again for the reasons.
                let mut reasons: HashMap<Reason, usize> = HashMap::new();
                for info in &self.infos {
                    filter_facts(&facts, info, |r| *reasons.entry(r).or_insert(0) += 1);
                }
                let plan = self.preemption_plan(&key, &facts, priority_of(&pod));
                failures.push((key, pod, fit_error(n, &reasons), plan));
                continue;
            }
            // Spreading is normalised over the nodes being compared, as in kube-scheduler.
            let max_owner = facts.usage.owner.as_ref().map_or(0, |u| {
                feasible
                    .iter()
                    .map(|&i| self.infos[i].owners.get(u).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0)
            });
            let mut best: Vec<usize> = Vec::new();
            let mut best_score = i64::MIN;
            for &i in &feasible {
                let s = score_facts(&facts, &self.infos[i], max_owner);
                if s > best_score {
                    best_score = s;
                    best.clear();
                }
                if s == best_score {
                    best.push(i);
                }
            }
            let pick = best[rand::rng().random_range(0..best.len())];
            let node = self.infos[pick].name.clone();
            self.place(&key, pod.clone(), &node, Some(Instant::now()));
            self.binds
                .push(Box::pin(bind(self.client.clone(), pod, node)));
        }
        tracing::debug!(
            pods = n_batch,
            nodes = self.infos.len(),
            place_ms = t_place.elapsed().as_secs_f64() * 1e3,
            in_flight = self.binds.len(),
            "placed a batch"
        );
        for (key, pod, message, plan) in failures {
            if let Some((node, victims)) = plan {
                self.preempt(&key, &pod, &node, victims).await;
            }
            self.report_unschedulable(key, pod, message).await;
        }
    }

    /// Where `facts`' pod would fit if some pods of lower priority left, and which: the node
    /// whose victims have the lowest highest priority, then the fewest (kube-scheduler's
    /// DefaultPreemption, without PodDisruptionBudgets). Victims are picked as Kubernetes
    /// does: all lower-priority pods removed, then given back highest priority first while
    /// the pod still fits.
    fn preemption_plan(
        &self,
        key: &str,
        facts: &PodFacts,
        priority: i64,
    ) -> Option<(String, Vec<Arc<Value>>)> {
        // One preemption at a time per pod: wait for the victims to go.
        if self
            .nominated
            .get(key)
            .is_some_and(|at| at.elapsed() < ASSUME_TTL)
        {
            return None;
        }
        // ((highest victim priority, victim count), node index, victims)
        type Choice = ((i64, usize), usize, Vec<Arc<Value>>);
        let mut best: Option<Choice> = None;
        for (i, info) in self.infos.iter().enumerate() {
            let mut candidates: Vec<(i64, String, Arc<Value>)> = info
                .pods
                .iter()
                .filter(|(_, p)| priority_of(p) < priority && !is_deleting(p))
                .map(|(k, p)| (priority_of(p), k.clone(), p.clone()))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let mut trial = info.clone();
            for (_, k, _) in &candidates {
                trial.remove_pod(k);
            }
            if !filter_facts(facts, &trial, |_| {}) {
                continue;
            }
            candidates.sort_by_key(|(p, k, _)| (Reverse(*p), k.clone()));
            let mut victims = Vec::new();
            for (_, k, p) in candidates {
                trial.add_pod(&k, p.clone(), &PodUsage::of(&p));
                if !filter_facts(facts, &trial, |_| {}) {
                    trial.remove_pod(&k);
                    victims.push(p);
                }
            }
            let rank = (
                victims
                    .iter()
                    .map(|p| priority_of(p))
                    .max()
                    .unwrap_or(i64::MIN),
                victims.len(),
            );
            if best.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                best = Some((rank, i, victims));
            }
        }
        best.map(|(_, i, v)| (self.infos[i].name.clone(), v))
    }

    /// Deletes the victims and nominates `node` for the pod, which is retried when they are
    /// gone.
    async fn preempt(&mut self, key: &str, pod: &Arc<Value>, node: &str, victims: Vec<Arc<Value>>) {
        self.nominated.insert(key.to_string(), Instant::now());
        tracing::info!(pod = %key, %node, victims = victims.len(), "preempting");
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            namespace_of(pod),
            name_of(pod)
        );
        let patch = json!({"status": {"nominatedNodeName": node}});
        if let Err(e) = self.client.merge_patch(&path, &patch).await {
            tracing::debug!(pod = %key, error = %e, "failed to set nominatedNodeName");
        }
        for v in victims {
            let vpath = format!(
                "/api/v1/namespaces/{}/pods/{}",
                namespace_of(&v),
                name_of(&v)
            );
            let opts = json!({"apiVersion": "v1", "kind": "DeleteOptions",
                              "preconditions": {"uid": uid_of(&v)}});
            match self.client.delete(&vpath, Some(&opts)).await {
                Ok(()) => {
                    let msg = format!("Preempted by pod {} on node {node}", uid_of(pod));
                    self.event(v, "Normal", "Preempted", msg);
                }
                Err(e) => tracing::debug!(pod = %vpath, error = %e, "deleting a victim failed"),
            }
        }
    }

    fn bind_done(&mut self, (pod, node, r): BindOutcome) {
        let key = key_of(&pod);
        match r {
            Ok(()) => {
                tracing::trace!(pod = %key, %node, "bound");
                self.reported.remove(uid_of(&pod));
                self.nominated.remove(&key);
                // The assumption now runs from the bind, until the cache shows it.
                if let Some(p) = self.placed.get_mut(&key)
                    && p.assumed.is_some()
                {
                    p.assumed = Some(Instant::now());
                }
                let msg = format!(
                    "Successfully assigned {}/{} to {node}",
                    namespace_of(&pod),
                    name_of(&pod)
                );
                self.event(pod, "Normal", "Scheduled", msg);
            }
            Err(e) => {
                // Bound elsewhere or gone: the cache will say which; either way ours is void.
                if self.placed.get(&key).is_some_and(|p| p.assumed.is_some()) {
                    self.unplace(&key);
                }
                if !(e.is_conflict() || e.is_not_found()) {
                    tracing::warn!(pod = %key, error = %e, "binding failed; will retry");
                    self.unschedulable.insert(key);
                }
            }
        }
    }

    async fn report_unschedulable(&mut self, key: String, pod: Arc<Value>, message: String) {
        self.unschedulable.insert(key.clone());
        let uid = uid_of(&pod).to_string();
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
            namespace_of(&pod),
            name_of(&pod)
        );
        if let Err(e) = self.client.merge_patch(&path, &status).await {
            tracing::debug!(pod = %key, error = %e, "failed to set PodScheduled=False");
        }
        // The condition first, then the event: whoever sees the event can read the reason.
        self.event(pod, "Warning", "FailedScheduling", message);
    }
}

async fn bind(client: ApiClient, pod: Arc<Value>, node: String) -> BindOutcome {
    let (ns, name) = (namespace_of(&pod), name_of(&pod));
    let b = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": uid_of(&pod)},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let r = client
        .create(&format!("/api/v1/namespaces/{ns}/pods/{name}/binding"), &b)
        .await
        .map(|_| ());
    (pod, node, r)
}

/// Posts queued events, a few at a time, until the queue closes (the scheduler dropped its
/// sender), then for at most [`EVENT_DRAIN`] after `stop`.
async fn post_events(
    client: ApiClient,
    rx: mpsc::Receiver<EventReq>,
    component: String,
    stop: CancellationToken,
) {
    let all = tokio_stream::wrappers::ReceiverStream::new(rx).for_each_concurrent(
        EVENT_CONCURRENCY,
        |e| {
            let (client, component) = (&client, &component);
            async move {
                post_event(client, &e.obj, e.ty, e.reason, &e.message, component).await;
                EVENTS_POSTED.fetch_add(1, Ordering::Relaxed);
            }
        },
    );
    tokio::pin!(all);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = &mut all => return,
    }
    // Stopping: what is queued is still worth writing ("Scheduled" for pods already bound).
    let _ = tokio::time::timeout(EVENT_DRAIN, all).await;
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
    let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
    tasks.spawn(post_events(
        client.clone(),
        events_rx,
        config.scheduler_name.clone(),
        stop.clone(),
    ));
    let retry = config.retry_interval;
    let mut s = Scheduler {
        client,
        config,
        pods,
        nodes,
        active: BinaryHeap::new(),
        seq: 0,
        queued: HashSet::new(),
        unschedulable: HashSet::new(),
        infos: Vec::new(),
        index: HashMap::new(),
        placed: HashMap::new(),
        reported: HashMap::new(),
        nominated: HashMap::new(),
        next_start: 0,
        events,
        dropped_events: 0,
        binds: FuturesUnordered::new(),
    };
    s.resync();
    let mut next_flush = Instant::now() + retry;
    loop {
        // Take in everything already known before placing more.
        loop {
            match pod_rx.try_recv() {
                Ok(c) => s.on_pod(c),
                Err(TryRecvError::Lagged(_)) => s.resync(),
                Err(_) => break,
            }
        }
        loop {
            match node_rx.try_recv() {
                Ok(c) => s.on_node(c),
                Err(TryRecvError::Lagged(_)) => s.on_node(Change::Resync),
                Err(_) => break,
            }
        }
        while let Some(Some(done)) = futures::FutureExt::now_or_never(s.binds.next()) {
            s.bind_done(done);
        }
        if !s.active.is_empty() && s.binds.len() < MAX_BINDS_IN_FLIGHT {
            s.schedule_batch().await;
            // Let the bind requests and the informers run before the next batch.
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = s.binds.next(), if !s.binds.is_empty() => s.bind_done(done),
            ev = pod_rx.recv() => match ev {
                Ok(c) => s.on_pod(c),
                Err(RecvError::Lagged(_)) => s.resync(),
                Err(RecvError::Closed) => break,
            },
            ev = node_rx.recv() => match ev {
                Ok(c) => s.on_node(c),
                Err(RecvError::Lagged(_)) => s.on_node(Change::Resync),
                Err(RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(next_flush) => {
                next_flush = Instant::now() + retry;
                s.expire_assumed();
                s.flush_unschedulable();
            }
        }
    }
    stop.cancel();
    drop(s);
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
