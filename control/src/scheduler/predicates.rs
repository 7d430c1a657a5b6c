//! Filters and scores, each with the failure reason Kubernetes' plugin of the same job reports.
//!
//! Everything the loops touch is typed and extracted once: [`NodeInfo`] when a Node changes
//! (labels, allocatable, taints, runtime classes) plus running totals of what is placed there,
//! [`PodFacts`] once per scheduling attempt (requests, tolerations, compiled affinity terms).
//! Filtering and scoring a node then do no JSON lookups and no allocation on success.
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::controllers::labels::{labels_of, selector_matches};

/// Scoring defaults for pods that request nothing (kube-scheduler's non-zero defaults).
const DEFAULT_CPU_MILLIS: u64 = 100;
const DEFAULT_MEMORY_BYTES: u64 = 200 * 1024 * 1024;

/// What a pod asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    /// CPU millicores.
    pub cpu: u64,
    /// Memory bytes.
    pub memory: u64,
}

fn quantity_cpu(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_str)
        .and_then(|q| api::pod::parse_cpu_millis(q).ok())
        .unwrap_or(0)
}

fn quantity_mem(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_str)
        .and_then(|q| api::pod::parse_memory_bytes(q).ok())
        .unwrap_or(0)
}

/// The pod's effective requests: the sum over containers, at least the largest init container
/// (requests default to limits when only limits are set, as admission does).
pub fn pod_requests(pod: &Value) -> Requests {
    let of = |c: &Value| {
        let res = c.get("resources");
        let r = res.and_then(|r| r.get("requests"));
        let l = res.and_then(|r| r.get("limits"));
        let cpu = r
            .and_then(|r| r.get("cpu"))
            .or_else(|| l.and_then(|l| l.get("cpu")));
        let mem = r
            .and_then(|r| r.get("memory"))
            .or_else(|| l.and_then(|l| l.get("memory")));
        Requests {
            cpu: quantity_cpu(cpu),
            memory: quantity_mem(mem),
        }
    };
    let spec = pod.get("spec");
    let list = |f: &str| {
        spec.and_then(|s| s.get(f))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    let mut sum = Requests::default();
    for c in list("containers") {
        let r = of(c);
        sum.cpu += r.cpu;
        sum.memory += r.memory;
    }
    for c in list("initContainers") {
        let r = of(c);
        sum.cpu = sum.cpu.max(r.cpu);
        sum.memory = sum.memory.max(r.memory);
    }
    sum
}

/// Requests for scoring: zero becomes the non-zero defaults.
pub fn score_requests(r: Requests) -> Requests {
    Requests {
        cpu: if r.cpu == 0 {
            DEFAULT_CPU_MILLIS
        } else {
            r.cpu
        },
        memory: if r.memory == 0 {
            DEFAULT_MEMORY_BYTES
        } else {
            r.memory
        },
    }
}

/// Walks `obj` by plain field names (no JSON-pointer unescaping, no allocation).
fn at<'a>(obj: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, f| v.get(*f))
}

fn str_at<'a>(obj: &'a Value, path: &[&str]) -> &'a str {
    at(obj, path).and_then(Value::as_str).unwrap_or_default()
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// `key`.
    pub key: String,
    /// `value`.
    pub value: String,
    /// `effect`.
    pub effect: String,
    /// The FailedScheduling reason for it, formatted once.
    reason: Arc<str>,
}

impl Taint {
    /// A taint from its fields.
    pub fn new(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.into(),
            effect: effect.into(),
            reason: format!("node(s) had untolerated taint {{{key}: {value}}}").into(),
        }
    }

    fn from_value(t: &Value) -> Taint {
        Taint::new(
            str_at(t, &["key"]),
            str_at(t, &["value"]),
            str_at(t, &["effect"]),
        )
    }
}

/// A pod toleration.
#[derive(Debug, Clone, Default)]
pub struct Toleration {
    key: String,
    operator: String,
    value: String,
    effect: String,
}

impl Toleration {
    fn from_value(t: &Value) -> Toleration {
        Toleration {
            key: str_at(t, &["key"]).into(),
            operator: str_at(t, &["operator"]).into(),
            value: str_at(t, &["value"]).into(),
            effect: str_at(t, &["effect"]).into(),
        }
    }

    /// Kubernetes' `Toleration.ToleratesTaint` (same rules as
    /// [`crate::controllers::tolerates`], on typed fields).
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if !self.effect.is_empty() && self.effect != taint.effect {
            return false;
        }
        if self.key.is_empty() {
            return self.operator == "Exists";
        }
        if self.key != taint.key {
            return false;
        }
        match self.operator.as_str() {
            "Exists" => true,
            "" | "Equal" => self.value == taint.value,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt(Option<i64>),
    Lt(Option<i64>),
    Invalid,
}

/// One compiled `NodeSelectorRequirement`.
#[derive(Debug, Clone)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A compiled `NodeSelectorTerm` (requirements ANDed). `None` matches nothing: a term with no
/// `matchExpressions` (only `matchFields`, unsupported) selects no node.
#[derive(Debug, Clone)]
struct Term(Option<Vec<Requirement>>);

impl Term {
    fn compile(term: &Value) -> Term {
        let Some(exprs) = term.get("matchExpressions").and_then(Value::as_array) else {
            return Term(None);
        };
        Term(Some(
            exprs
                .iter()
                .map(|e| {
                    let values: Vec<String> = e
                        .get("values")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default();
                    let first = values.first().and_then(|v| v.parse::<i64>().ok());
                    let op = match str_at(e, &["operator"]) {
                        "In" => Op::In,
                        "NotIn" => Op::NotIn,
                        "Exists" => Op::Exists,
                        "DoesNotExist" => Op::DoesNotExist,
                        "Gt" => Op::Gt(first),
                        "Lt" => Op::Lt(first),
                        _ => Op::Invalid,
                    };
                    Requirement {
                        key: str_at(e, &["key"]).into(),
                        op,
                        values,
                    }
                })
                .collect(),
        ))
    }

    fn matches(&self, labels: &HashMap<String, String>) -> bool {
        let Some(reqs) = &self.0 else {
            return false;
        };
        reqs.iter().all(|r| {
            let have = labels.get(&r.key).map(String::as_str);
            let contains = |h: &str| r.values.iter().any(|v| v == h);
            let num = |h: Option<&str>| h.and_then(|h| h.parse::<i64>().ok());
            match r.op {
                Op::In => have.is_some_and(contains),
                Op::NotIn => have.is_none_or(|h| !contains(h)),
                Op::Exists => have.is_some(),
                Op::DoesNotExist => have.is_none(),
                Op::Gt(v) => matches!((num(have), v), (Some(h), Some(v)) if h > v),
                Op::Lt(v) => matches!((num(have), v), (Some(h), Some(v)) if h < v),
                Op::Invalid => false,
            }
        })
    }
}

/// What a placed pod takes from its node.
#[derive(Debug, Clone, Default)]
pub struct PodUsage {
    /// Its requests.
    pub requests: Requests,
    /// Its requests with scoring defaults.
    pub score_requests: Requests,
    /// Its managing controller's uid.
    pub owner: Option<String>,
}

impl PodUsage {
    /// The usage of `pod`.
    pub fn of(pod: &Value) -> PodUsage {
        let requests = pod_requests(pod);
        PodUsage {
            requests,
            score_requests: score_requests(requests),
            owner: owner_uid(pod),
        }
    }
}

/// A node with what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels` (string values).
    pub labels: HashMap<String, String>,
    /// Allocatable CPU millicores.
    pub alloc_cpu: u64,
    /// Allocatable memory bytes.
    pub alloc_memory: u64,
    /// Allocatable pod count.
    pub alloc_pods: u64,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Taints with effect NoSchedule or NoExecute.
    pub hard_taints: Vec<Taint>,
    /// Runtime classes offered (annotation `flotilla.dev/runtime-classes`, default `wasm`).
    pub runtime_classes: Vec<String>,
    /// Sum of requests of pods placed here.
    pub requested: Requests,
    /// The same with scoring defaults.
    pub requested_for_score: Requests,
    /// Pods per controller owner uid.
    pub owners: HashMap<String, u64>,
    /// Pods placed here by key (their labels serve pod anti-affinity).
    pub pods: HashMap<String, Arc<Value>>,
}

impl NodeInfo {
    /// An empty node.
    pub fn new(node: &Value) -> NodeInfo {
        let mut info = NodeInfo {
            name: String::new(),
            labels: HashMap::new(),
            alloc_cpu: 0,
            alloc_memory: 0,
            alloc_pods: 0,
            unschedulable: false,
            hard_taints: Vec::new(),
            runtime_classes: Vec::new(),
            requested: Requests::default(),
            requested_for_score: Requests::default(),
            owners: HashMap::new(),
            pods: HashMap::new(),
        };
        info.set_node(node);
        info
    }

    /// Refreshes the node's own facts after it changed; what is placed stays.
    pub fn set_node(&mut self, node: &Value) {
        let a = at(node, &["status", "allocatable"]).or_else(|| at(node, &["status", "capacity"]));
        self.name = str_at(node, &["metadata", "name"]).to_string();
        self.labels = labels_of(node)
            .map(|l| {
                l.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        self.alloc_cpu = quantity_cpu(a.and_then(|a| a.get("cpu")));
        self.alloc_memory = quantity_mem(a.and_then(|a| a.get("memory")));
        self.alloc_pods = a
            .and_then(|a| a.get("pods"))
            .and_then(Value::as_str)
            .and_then(|p| p.parse().ok())
            .unwrap_or(110);
        self.unschedulable =
            at(node, &["spec", "unschedulable"]).and_then(Value::as_bool) == Some(true);
        self.hard_taints = at(node, &["spec", "taints"])
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .filter(|t| matches!(str_at(t, &["effect"]), "NoSchedule" | "NoExecute"))
                    .map(Taint::from_value)
                    .collect()
            })
            .unwrap_or_default();
        self.runtime_classes = at(
            node,
            &["metadata", "annotations", "flotilla.dev/runtime-classes"],
        )
        .and_then(Value::as_str)
        .unwrap_or("wasm")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    }

    /// Accounts for `pod` (cache key `key`) placed here; a key already here is replaced.
    pub fn add_pod(&mut self, key: &str, pod: Arc<Value>, u: &PodUsage) {
        if let Some(old) = self.pods.remove(key) {
            self.subtract(&PodUsage::of(&old));
        }
        self.requested.cpu += u.requests.cpu;
        self.requested.memory += u.requests.memory;
        self.requested_for_score.cpu += u.score_requests.cpu;
        self.requested_for_score.memory += u.score_requests.memory;
        if let Some(uid) = &u.owner {
            *self.owners.entry(uid.clone()).or_insert(0) += 1;
        }
        self.pods.insert(key.to_string(), pod);
    }

    /// Forgets the pod with cache key `key`, if it is here.
    pub fn remove_pod(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            self.subtract(&PodUsage::of(&old));
        }
    }

    fn subtract(&mut self, u: &PodUsage) {
        let sub = |a: &mut u64, b: u64| *a = a.saturating_sub(b);
        sub(&mut self.requested.cpu, u.requests.cpu);
        sub(&mut self.requested.memory, u.requests.memory);
        sub(&mut self.requested_for_score.cpu, u.score_requests.cpu);
        sub(
            &mut self.requested_for_score.memory,
            u.score_requests.memory,
        );
        if let Some(uid) = &u.owner
            && let Some(n) = self.owners.get_mut(uid)
        {
            *n -= 1;
            if *n == 0 {
                self.owners.remove(uid);
            }
        }
    }

    /// Pods placed here.
    pub fn pod_count(&self) -> u64 {
        self.pods.len() as u64
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The uid of the pod's managing controller.
pub fn owner_uid(pod: &Value) -> Option<String> {
    crate::controllers::labels::controller_of(pod)
        .and_then(|r| r.get("uid").and_then(Value::as_str))
        .map(str::to_string)
}

/// Why a node was filtered out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    /// NodeUnschedulable.
    Unschedulable,
    /// TaintToleration (the formatted reason).
    Taint(Arc<str>),
    /// NodeAffinity.
    Affinity,
    /// The node does not offer the pod's runtime class.
    RuntimeClass,
    /// NodeResourcesFit: pod count.
    TooManyPods,
    /// NodeResourcesFit: CPU.
    InsufficientCpu,
    /// NodeResourcesFit: memory.
    InsufficientMemory,
    /// InterPodAffinity: required anti-affinity.
    AntiAffinity,
}

impl Reason {
    /// Kubernetes' wording.
    pub fn text(&self) -> &str {
        match self {
            Reason::Unschedulable => "node(s) were unschedulable",
            Reason::Taint(t) => t,
            Reason::Affinity => "node(s) didn't match Pod's node affinity/selector",
            Reason::RuntimeClass => "node(s) didn't support the pod's runtime class",
            Reason::TooManyPods => "Too many pods",
            Reason::InsufficientCpu => "Insufficient cpu",
            Reason::InsufficientMemory => "Insufficient memory",
            Reason::AntiAffinity => "node(s) didn't match pod anti-affinity rules",
        }
    }
}

/// What filtering and scoring need from a pod, extracted once per scheduling attempt.
#[derive(Debug, Clone)]
pub struct PodFacts {
    /// What it takes from a node.
    pub usage: PodUsage,
    tolerations: Vec<Toleration>,
    tolerates_unschedulable: bool,
    node_selector: Vec<(String, Option<String>)>,
    required_terms: Option<Vec<Term>>,
    preferred_terms: Vec<(i64, Term)>,
    preferred_total: i64,
    runtime_class: Option<String>,
    /// Label selectors of required anti-affinity terms on `kubernetes.io/hostname`.
    anti_affinity: Vec<Value>,
}

impl PodFacts {
    /// Extracts the facts of `pod`.
    pub fn new(pod: &Value) -> PodFacts {
        let spec = pod.get("spec").unwrap_or(&Value::Null);
        let arr = |p: &[&str]| at(spec, p).and_then(Value::as_array).map(Vec::as_slice);
        let tolerations: Vec<Toleration> = arr(&["tolerations"])
            .unwrap_or(&[])
            .iter()
            .map(Toleration::from_value)
            .collect();
        let cordon = Taint::new("node.kubernetes.io/unschedulable", "", "NoSchedule");
        let tolerates_unschedulable = tolerations.iter().any(|t| t.tolerates(&cordon));
        let node_selector = spec
            .get("nodeSelector")
            .and_then(Value::as_object)
            .map(|m: &Map<String, Value>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(String::from)))
                    .collect()
            })
            .unwrap_or_default();
        let required_terms = arr(&[
            "affinity",
            "nodeAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
            "nodeSelectorTerms",
        ])
        .map(|ts| ts.iter().map(Term::compile).collect());
        let preferred_terms: Vec<(i64, Term)> = arr(&[
            "affinity",
            "nodeAffinity",
            "preferredDuringSchedulingIgnoredDuringExecution",
        ])
        .unwrap_or(&[])
        .iter()
        .filter_map(|t| {
            let w = t.get("weight").and_then(Value::as_i64)?;
            Some((w, t.get("preference").map_or(Term(None), Term::compile)))
        })
        .collect();
        let preferred_total = preferred_terms.iter().map(|(w, _)| w).sum();
        let anti_affinity = arr(&[
            "affinity",
            "podAntiAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
        ])
        .unwrap_or(&[])
        .iter()
        .filter(|t| str_at(t, &["topologyKey"]) == "kubernetes.io/hostname")
        .map(|t| t.get("labelSelector").cloned().unwrap_or(Value::Null))
        .collect();
        PodFacts {
            usage: PodUsage::of(pod),
            tolerations,
            tolerates_unschedulable,
            node_selector,
            required_terms,
            preferred_terms,
            preferred_total,
            runtime_class: spec
                .get("runtimeClassName")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
                .map(String::from)
                .or_else(|| needs_oci(spec).then(|| api::pod::OCI_RUNTIME_CLASS.to_string())),
            anti_affinity,
        }
    }
}

/// Whether a pod without a runtime class needs a node that runs OCI images: the agent runs it
/// as wasm only when every image is a wasm module.
fn needs_oci(spec: &Value) -> bool {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .any(|c| !api::pod::is_wasm_image(str_at(c, &["image"])))
}

/// Why a node was filtered out: each string is one of Kubernetes' reason texts.
pub fn filter(pod: &Value, info: &NodeInfo) -> Vec<String> {
    let mut out = Vec::new();
    filter_facts(&PodFacts::new(pod), info, |r| {
        out.push(r.text().to_string())
    });
    out
}

/// [`filter`] with the pod's facts already extracted: calls `reject` with each reason and
/// returns whether the node passed.
pub fn filter_facts(f: &PodFacts, info: &NodeInfo, mut reject: impl FnMut(Reason)) -> bool {
    // NodeUnschedulable.
    if info.unschedulable && !f.tolerates_unschedulable {
        reject(Reason::Unschedulable);
        return false;
    }
    // TaintToleration (NoSchedule and NoExecute).
    for taint in &info.hard_taints {
        if !f.tolerations.iter().any(|t| t.tolerates(taint)) {
            reject(Reason::Taint(taint.reason.clone()));
            return false;
        }
    }
    // NodeAffinity: nodeSelector and required node affinity.
    let selector_ok = f.node_selector.iter().all(|(k, v)| {
        v.as_deref()
            .is_some_and(|v| info.labels.get(k).is_some_and(|h| h == v))
    });
    let affinity_ok = f
        .required_terms
        .as_ref()
        .is_none_or(|terms| terms.iter().any(|t| t.matches(&info.labels)));
    if !selector_ok || !affinity_ok {
        reject(Reason::Affinity);
        return false;
    }
    // Runtime class offered by the node.
    if let Some(rc) = &f.runtime_class
        && !info.runtime_classes.iter().any(|o| o == rc)
    {
        reject(Reason::RuntimeClass);
        return false;
    }
    // NodeResourcesFit.
    let r = f.usage.requests;
    let mut fits = true;
    if info.pod_count() + 1 > info.alloc_pods {
        reject(Reason::TooManyPods);
        fits = false;
    }
    if r.cpu > 0 && info.requested.cpu + r.cpu > info.alloc_cpu {
        reject(Reason::InsufficientCpu);
        fits = false;
    }
    if r.memory > 0 && info.requested.memory + r.memory > info.alloc_memory {
        reject(Reason::InsufficientMemory);
        fits = false;
    }
    if !fits {
        return false;
    }
    // InterPodAffinity: required anti-affinity per hostname.
    for sel in &f.anti_affinity {
        if info
            .pods
            .values()
            .any(|p| selector_matches(Some(sel), labels_of(p)))
        {
            reject(Reason::AntiAffinity);
            return false;
        }
    }
    true
}

/// The node's score for this pod, 0..=~500: least allocated, balanced allocation, spreading of
/// the pod's owner (weighted double) and preferred node affinity. `max_owner_count` is the most
/// pods of the pod's owner on any node being compared.
pub fn score(pod: &Value, info: &NodeInfo, max_owner_count: u64) -> i64 {
    score_facts(&PodFacts::new(pod), info, max_owner_count)
}

/// [`score`] with the pod's facts already extracted.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "scores are coarse"
)]
pub fn score_facts(f: &PodFacts, info: &NodeInfo, max_owner_count: u64) -> i64 {
    let r = f.usage.score_requests;
    let frac = |used: u64, add: u64, cap: u64| -> f64 {
        if cap == 0 {
            1.0
        } else {
            ((used + add) as f64 / cap as f64).min(1.0)
        }
    };
    let cpu = frac(info.requested_for_score.cpu, r.cpu, info.alloc_cpu);
    let mem = frac(info.requested_for_score.memory, r.memory, info.alloc_memory);
    let least = ((1.0 - cpu) * 50.0 + (1.0 - mem) * 50.0) as i64;
    let balanced = ((1.0 - (cpu - mem).abs()) * 100.0) as i64;
    let spread = match &f.usage.owner {
        Some(uid) if max_owner_count > 0 => {
            let n = info.owners.get(uid).copied().unwrap_or(0);
            i64::try_from(100 * (max_owner_count - n.min(max_owner_count)) / max_owner_count)
                .unwrap_or(0)
        }
        _ => 100,
    };
    let mut preferred = 0i64;
    if f.preferred_total > 0 {
        let got: i64 = f
            .preferred_terms
            .iter()
            .filter(|(_, t)| t.matches(&info.labels))
            .map(|(w, _)| w)
            .sum();
        preferred = got * 100 / f.preferred_total;
    }
    least + balanced + 2 * spread + preferred
}

/// "0/3 nodes are available: 1 node(s) had untolerated taint {a: b}, 2 Insufficient memory."
/// (reasons counted, then sorted as strings, as kube-scheduler's `FitError` does).
pub fn fit_error(total_nodes: usize, reasons: &HashMap<Reason, usize>) -> String {
    let mut parts: Vec<String> = reasons
        .iter()
        .map(|(r, n)| format!("{n} {}", r.text()))
        .collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{total_nodes} nodes are available.")
    } else {
        format!("0/{total_nodes} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, cpu: &str, mem: &str) -> NodeInfo {
        NodeInfo::new(&json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "disk": "ssd"}},
            "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"}},
        }))
    }

    fn pod(cpu: &str, mem: &str) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "/x.wasm", "resources": {"requests": {"cpu": cpu, "memory": mem}}}]}})
    }

    fn place(info: &mut NodeInfo, key: &str, p: Value) {
        let u = PodUsage::of(&p);
        info.add_pod(key, Arc::new(p), &u);
    }

    #[test]
    fn resource_fit_and_message() {
        let n = node("a", "1", "1Gi");
        assert!(filter(&pod("500m", "512Mi"), &n).is_empty());
        assert_eq!(
            filter(&pod("2", "2Gi"), &n),
            vec!["Insufficient cpu", "Insufficient memory"]
        );
        let mut reasons = HashMap::new();
        reasons.insert(Reason::InsufficientMemory, 2);
        reasons.insert(
            Reason::Taint(Taint::new("dedicated", "gpu", "NoSchedule").reason),
            1,
        );
        assert_eq!(
            fit_error(3, &reasons),
            "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient memory."
        );
    }

    #[test]
    fn accounting_adds_and_removes_exactly() {
        let mut n = node("a", "1", "1Gi");
        place(&mut n, "default/x", pod("600m", "100Mi"));
        assert_eq!(filter(&pod("500m", "100Mi"), &n), vec!["Insufficient cpu"]);
        // Placing the same key again replaces it rather than counting it twice.
        place(&mut n, "default/x", pod("600m", "100Mi"));
        assert_eq!(n.requested.cpu, 600);
        assert_eq!(n.pod_count(), 1);
        n.remove_pod("default/x");
        assert_eq!(n.requested, Requests::default());
        assert_eq!(n.pod_count(), 0);
        assert!(filter(&pod("500m", "100Mi"), &n).is_empty());
    }

    #[test]
    fn taints_selectors_and_affinity() {
        let n = NodeInfo::new(&json!({
            "metadata": {"name": "a", "labels": {"disk": "ssd", "gen": "5"}},
            "spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                                {"key": "soft", "effect": "PreferNoSchedule"}]},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}},
        }));
        let mut p = pod("1", "1Gi");
        assert_eq!(
            filter(&p, &n),
            vec!["node(s) had untolerated taint {dedicated: gpu}"]
        );
        p["spec"]["tolerations"] = json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]);
        assert!(filter(&p, &n).is_empty());
        p["spec"]["nodeSelector"] = json!({"disk": "hdd"});
        assert_eq!(
            filter(&p, &n),
            vec!["node(s) didn't match Pod's node affinity/selector"]
        );
        p["spec"]["nodeSelector"] = json!({"disk": "ssd"});
        p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["nvme"]}]}]}}});
        assert_eq!(
            filter(&p, &n),
            vec!["node(s) didn't match Pod's node affinity/selector"]
        );
        p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["nvme"]}]},
            {"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]},
                                  {"key": "gpu", "operator": "DoesNotExist"}]}]}}});
        assert!(filter(&p, &n).is_empty());
    }

    #[test]
    fn cordon_runtime_class_and_anti_affinity() {
        let mut n = NodeInfo::new(&json!({
            "metadata": {"name": "a", "annotations": {"flotilla.dev/runtime-classes": "wasm, oci"}},
            "spec": {"unschedulable": true},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}},
        }));
        let mut p = pod("1", "1Gi");
        assert_eq!(filter(&p, &n), vec!["node(s) were unschedulable"]);
        p["spec"]["tolerations"] =
            json!([{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]);
        assert!(filter(&p, &n).is_empty());
        p["spec"]["runtimeClassName"] = json!("gvisor");
        assert_eq!(
            filter(&p, &n),
            vec!["node(s) didn't support the pod's runtime class"]
        );
        p["spec"]["runtimeClassName"] = json!("oci");
        assert!(filter(&p, &n).is_empty());
        p["metadata"]["labels"] = json!({"app": "db"});
        p["spec"]["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "db"}}}]}});
        let sibling = p.clone();
        place(&mut n, "default/db-0", sibling);
        assert_eq!(
            filter(&p, &n),
            vec!["node(s) didn't match pod anti-affinity rules"]
        );
    }

    #[test]
    fn oci_images_need_a_node_running_oci() {
        let wasm_only = NodeInfo::new(&json!({
            "metadata": {"name": "w", "annotations": {"flotilla.dev/runtime-classes": "wasm,wasmtime"}},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}},
        }));
        let both = NodeInfo::new(&json!({
            "metadata": {"name": "b", "annotations": {"flotilla.dev/runtime-classes": "oci,runc,wasm,wasmtime"}},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}},
        }));
        let mut p = pod("1", "1Gi");
        assert!(
            filter(&p, &wasm_only).is_empty(),
            "wasm images run anywhere"
        );
        p["spec"]["initContainers"] = json!([{"name": "init", "image": "busybox:1.36"}]);
        assert_eq!(
            filter(&p, &wasm_only),
            vec!["node(s) didn't support the pod's runtime class"]
        );
        assert!(filter(&p, &both).is_empty());
        p["spec"]["runtimeClassName"] = json!("wasm");
        assert!(
            filter(&p, &wasm_only).is_empty(),
            "an explicit runtimeClassName decides"
        );
    }

    #[test]
    fn spreading_prefers_nodes_without_siblings() {
        let owned = json!({"metadata": {"name": "p", "ownerReferences": [{"uid": "rs1", "controller": true, "kind": "ReplicaSet", "name": "rs"}]},
                           "spec": {"containers": [{"name": "c", "image": "/x.wasm"}]}});
        let mut busy = node("a", "4", "4Gi");
        place(&mut busy, "default/p0", owned.clone());
        let idle = node("b", "4", "4Gi");
        assert!(score(&owned, &idle, 1) > score(&owned, &busy, 1));
    }

    #[test]
    fn preferred_affinity_raises_the_score() {
        let mut p = pod("100m", "100Mi");
        p["spec"]["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}});
        let ssd = node("a", "4", "4Gi");
        let plain = NodeInfo::new(&json!({
            "metadata": {"name": "b"},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}},
        }));
        assert_eq!(score(&p, &ssd, 0) - score(&p, &plain, 0), 100);
    }
}
