//! Filters and scores, each with the failure reason Kubernetes' plugin of the same job reports.
use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::controllers::labels::{labels_of, selector_matches};
use crate::controllers::tolerates;

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
        let r = c.pointer("/resources/requests");
        let l = c.pointer("/resources/limits");
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
    let mut sum = Requests::default();
    for c in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let r = of(c);
        sum.cpu += r.cpu;
        sum.memory += r.memory;
    }
    for c in pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
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

/// A node with what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The Node object.
    pub node: std::sync::Arc<Value>,
    /// Allocatable CPU millicores.
    pub alloc_cpu: u64,
    /// Allocatable memory bytes.
    pub alloc_memory: u64,
    /// Allocatable pod count.
    pub alloc_pods: u64,
    /// Sum of requests of pods bound here.
    pub requested: Requests,
    /// The same with scoring defaults.
    pub requested_for_score: Requests,
    /// Pods bound here.
    pub pods: u64,
    /// Pods per controller owner uid.
    pub owners: HashMap<String, u64>,
    /// Labels of pods bound here (for pod anti-affinity).
    pub pod_labels: Vec<Map<String, Value>>,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Taints with effect NoSchedule or NoExecute.
    pub hard_taints: Vec<Value>,
}

impl NodeInfo {
    /// An empty node.
    pub fn new(node: std::sync::Arc<Value>) -> NodeInfo {
        let a = node
            .pointer("/status/allocatable")
            .or_else(|| node.pointer("/status/capacity"));
        let alloc_cpu = quantity_cpu(a.and_then(|a| a.get("cpu")));
        let alloc_memory = quantity_mem(a.and_then(|a| a.get("memory")));
        let alloc_pods = a
            .and_then(|a| a.get("pods"))
            .and_then(Value::as_str)
            .and_then(|p| p.parse().ok())
            .unwrap_or(110);
        let unschedulable =
            node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true);
        let hard_taints = node
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .filter(|t| {
                        matches!(
                            t.get("effect").and_then(Value::as_str),
                            Some("NoSchedule" | "NoExecute")
                        )
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        NodeInfo {
            node,
            unschedulable,
            hard_taints,
            alloc_cpu,
            alloc_memory,
            alloc_pods,
            requested: Requests::default(),
            requested_for_score: Requests::default(),
            pods: 0,
            owners: HashMap::new(),
            pod_labels: Vec::new(),
        }
    }

    /// Accounts for a pod placed here.
    pub fn add_pod(&mut self, pod: &Value) {
        let r = pod_requests(pod);
        let s = score_requests(r);
        self.requested.cpu += r.cpu;
        self.requested.memory += r.memory;
        self.requested_for_score.cpu += s.cpu;
        self.requested_for_score.memory += s.memory;
        self.pods += 1;
        if let Some(uid) = owner_uid(pod) {
            *self.owners.entry(uid).or_insert(0) += 1;
        }
        if let Some(l) = labels_of(pod) {
            self.pod_labels.push(l.clone());
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        crate::controllers::labels::name_of(&self.node)
    }
}

/// The uid of the pod's managing controller.
pub fn owner_uid(pod: &Value) -> Option<String> {
    crate::controllers::labels::controller_of(pod)
        .and_then(|r| r.get("uid").and_then(Value::as_str))
        .map(str::to_string)
}

fn node_selector_term_matches(term: &Value, labels: Option<&Map<String, Value>>) -> bool {
    let Some(exprs) = term.get("matchExpressions").and_then(Value::as_array) else {
        // A term with no expressions (only matchFields, unsupported) matches nothing.
        return false;
    };
    exprs.iter().all(|e| {
        let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
        let values = e
            .get("values")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let contains = |h: &str| values.iter().any(|v| v.as_str() == Some(h));
        let have = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let num = |s: &str| s.parse::<i64>().ok();
        let first = values.first().and_then(Value::as_str).and_then(num);
        match e
            .get("operator")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "In" => have.is_some_and(contains),
            "NotIn" => have.is_none_or(|h| !contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            "Gt" => matches!((have.and_then(num), first), (Some(h), Some(v)) if h > v),
            "Lt" => matches!((have.and_then(num), first), (Some(h), Some(v)) if h < v),
            _ => false,
        }
    })
}

/// What filtering and scoring need from a pod, extracted once per scheduling attempt.
#[derive(Debug)]
pub struct PodFacts<'a> {
    /// The pod.
    pub pod: &'a Value,
    /// Its requests.
    pub requests: Requests,
    /// Its requests with scoring defaults.
    pub score_requests: Requests,
    /// `spec.tolerations`.
    pub tolerations: &'a [Value],
    /// `spec.nodeSelector`.
    pub node_selector: Option<&'a Map<String, Value>>,
    /// Required node affinity terms (any must match).
    pub required_terms: Option<&'a [Value]>,
    /// Preferred node affinity terms.
    pub preferred_terms: Option<&'a [Value]>,
    /// `spec.runtimeClassName`, if set.
    pub runtime_class: Option<&'a str>,
    /// Required pod anti-affinity terms.
    pub anti_affinity: Option<&'a [Value]>,
    /// Controller owner uid.
    pub owner: Option<String>,
}

impl<'a> PodFacts<'a> {
    /// Extracts the facts of `pod`.
    pub fn new(pod: &'a Value) -> PodFacts<'a> {
        let arr = |p: &str| pod.pointer(p).and_then(Value::as_array).map(Vec::as_slice);
        let requests = pod_requests(pod);
        PodFacts {
            pod,
            requests,
            score_requests: score_requests(requests),
            tolerations: arr("/spec/tolerations").unwrap_or(&[]),
            node_selector: pod.pointer("/spec/nodeSelector").and_then(Value::as_object),
            required_terms: arr(
                "/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
            ),
            preferred_terms: arr(
                "/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution",
            ),
            runtime_class: pod
                .pointer("/spec/runtimeClassName")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty()),
            anti_affinity: arr(
                "/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
            ),
            owner: owner_uid(pod),
        }
    }
}

/// Why a node was filtered out: each string is one of Kubernetes' reason texts.
pub fn filter(pod: &Value, info: &NodeInfo) -> Vec<String> {
    filter_facts(&PodFacts::new(pod), info)
}

/// [`filter`] with the pod's facts already extracted.
pub fn filter_facts(f: &PodFacts<'_>, info: &NodeInfo) -> Vec<String> {
    let node = &info.node;
    let node_labels = labels_of(node);
    // NodeUnschedulable.
    if info.unschedulable {
        let unschedulable =
            serde_json::json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"});
        if !f.tolerations.iter().any(|t| tolerates(t, &unschedulable)) {
            return vec!["node(s) were unschedulable".into()];
        }
    }
    // TaintToleration (NoSchedule and NoExecute).
    for taint in &info.hard_taints {
        if !f.tolerations.iter().any(|t| tolerates(t, taint)) {
            return vec![format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.get("key").and_then(Value::as_str).unwrap_or_default(),
                taint
                    .get("value")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            )];
        }
    }
    // NodeAffinity: nodeSelector and required node affinity.
    let selector_ok = f.node_selector.is_none_or(|sel| {
        sel.iter()
            .all(|(k, v)| node_labels.and_then(|l| l.get(k)) == Some(v))
    });
    let affinity_ok = f.required_terms.is_none_or(|terms| {
        terms
            .iter()
            .any(|t| node_selector_term_matches(t, node_labels))
    });
    if !selector_ok || !affinity_ok {
        return vec!["node(s) didn't match Pod's node affinity/selector".into()];
    }
    // Runtime class offered by the node.
    if let Some(rc) = f.runtime_class {
        let offered = node
            .pointer("/metadata/annotations")
            .and_then(|a| a.get("flotilla.dev/runtime-classes"))
            .and_then(Value::as_str)
            .unwrap_or("wasm");
        if !offered.split(',').any(|o| o.trim() == rc) {
            return vec!["node(s) didn't support the pod's runtime class".into()];
        }
    }
    // NodeResourcesFit.
    let r = f.requests;
    let mut reasons = Vec::new();
    if info.pods + 1 > info.alloc_pods {
        reasons.push("Too many pods".into());
    }
    if r.cpu > 0 && info.requested.cpu + r.cpu > info.alloc_cpu {
        reasons.push("Insufficient cpu".into());
    }
    if r.memory > 0 && info.requested.memory + r.memory > info.alloc_memory {
        reasons.push("Insufficient memory".into());
    }
    if !reasons.is_empty() {
        return reasons;
    }
    // InterPodAffinity: required anti-affinity per hostname.
    for term in f.anti_affinity.unwrap_or(&[]) {
        let topo = term
            .get("topologyKey")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if topo != "kubernetes.io/hostname" {
            continue;
        }
        if info
            .pod_labels
            .iter()
            .any(|l| selector_matches(term.get("labelSelector"), Some(l)))
        {
            return vec!["node(s) didn't match pod anti-affinity rules".into()];
        }
    }
    Vec::new()
}

/// The node's score for this pod, 0..=~500: least allocated, balanced allocation, spreading of
/// the pod's owner (weighted double) and preferred node affinity.
pub fn score(pod: &Value, info: &NodeInfo, max_owner_count: u64) -> i64 {
    score_facts(&PodFacts::new(pod), info, max_owner_count)
}

/// [`score`] with the pod's facts already extracted.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "scores are coarse"
)]
pub fn score_facts(f: &PodFacts<'_>, info: &NodeInfo, max_owner_count: u64) -> i64 {
    let r = f.score_requests;
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
    let spread = match &f.owner {
        Some(uid) if max_owner_count > 0 => {
            let n = info.owners.get(uid).copied().unwrap_or(0);
            i64::try_from(100 * (max_owner_count - n.min(max_owner_count)) / max_owner_count)
                .unwrap_or(0)
        }
        _ => 100,
    };
    let mut preferred = 0i64;
    if let Some(terms) = f.preferred_terms {
        let node_labels = labels_of(&info.node);
        let total: i64 = terms
            .iter()
            .filter_map(|t| t.get("weight").and_then(Value::as_i64))
            .sum();
        let got: i64 = terms
            .iter()
            .filter(|t| {
                t.get("preference")
                    .is_some_and(|p| node_selector_term_matches(p, node_labels))
            })
            .filter_map(|t| t.get("weight").and_then(Value::as_i64))
            .sum();
        if total > 0 {
            preferred = got * 100 / total;
        }
    }
    least + balanced + 2 * spread + preferred
}

/// "0/3 nodes are available: 1 node(s) had untolerated taint {a: b}, 2 Insufficient memory."
/// (reasons counted, then sorted as strings, as kube-scheduler's `FitError` does).
pub fn fit_error(total_nodes: usize, reasons: &HashMap<String, usize>) -> String {
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{total_nodes} nodes are available.")
    } else {
        format!("0/{total_nodes} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn node(name: &str, cpu: &str, mem: &str) -> NodeInfo {
        NodeInfo::new(Arc::new(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "disk": "ssd"}},
            "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"}},
        })))
    }

    fn pod(cpu: &str, mem: &str) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "x", "resources": {"requests": {"cpu": cpu, "memory": mem}}}]}})
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
        reasons.insert("Insufficient memory".to_string(), 2);
        reasons.insert(
            "node(s) had untolerated taint {dedicated: gpu}".to_string(),
            1,
        );
        assert_eq!(
            fit_error(3, &reasons),
            "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient memory."
        );
    }

    #[test]
    fn taints_selectors_and_affinity() {
        let n = NodeInfo::new(Arc::new(json!({
            "metadata": {"name": "a", "labels": {"disk": "ssd"}},
            "spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}},
        })));
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
    }

    #[test]
    fn spreading_prefers_nodes_without_siblings() {
        let owned = json!({"metadata": {"name": "p", "ownerReferences": [{"uid": "rs1", "controller": true, "kind": "ReplicaSet", "name": "rs"}]},
                           "spec": {"containers": [{"name": "c", "image": "x"}]}});
        let mut busy = node("a", "4", "4Gi");
        busy.add_pod(&owned);
        let idle = node("b", "4", "4Gi");
        assert!(score(&owned, &idle, 1) > score(&owned, &busy, 1));
    }
}
