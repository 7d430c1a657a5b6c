//! Node-pressure eviction for memory, as the kubelet's eviction manager with a hard
//! `memory.available` threshold (`--eviction-hard=memory.available<100Mi`).
//!
//! Every `eviction_interval` the manager sums the working set of the runtime's running pods
//! ([`PodRuntime::stats`]: linear memory for wasm, the cgroup working set for CRI) and
//! subtracts it from the node's memory capacity. Below the threshold the node is under memory
//! pressure: the heartbeat reports `MemoryPressure=True`, the node gets the
//! `node.kubernetes.io/memory-pressure:NoSchedule` taint, and one pod per round is evicted, in
//! [`api::pod::memory_eviction_key`] order (pods using more than their memory request first,
//! BestEffort ones included, by usage above request; pods within their request, Guaranteed
//! ones, last). The pod's worker carries the eviction out, as the kubelet's pod workers do: it
//! kills the pod with grace period 0 (a hard eviction) and reports phase `Failed`, reason
//! `Evicted`, with Kubernetes' message, plus an `Evicted` event. No new eviction starts while
//! one is pending. As the kubelet's `--eviction-pressure-transition-period`, the condition
//! (and the taint) stay until the threshold has not been met for that long.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use api::pod::PodSpec;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::AgentConfig;
use super::client::{self, ApiClient, ClientError};
use crate::pod_runtime::{PodRuntime, SandboxState};

/// The taint key of a node under memory pressure (effect `NoSchedule`).
pub const MEMORY_PRESSURE_TAINT: &str = "node.kubernetes.io/memory-pressure";

/// A malformed `--eviction-hard` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid eviction threshold {input:?}: {reason}")]
pub struct ThresholdError {
    /// The input.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses the kubelet's `--eviction-hard` syntax for the memory signal
/// (`memory.available<100Mi` or `memory.available<10%` of `capacity_bytes`) into bytes.
/// Several comma-separated thresholds may be given; only `memory.available` is supported, and
/// a value without it means no memory threshold (0).
pub fn parse_eviction_hard(input: &str, capacity_bytes: u64) -> Result<u64, ThresholdError> {
    let err = |reason: &str| ThresholdError {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let mut bytes = 0;
    for part in input.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (signal, quantity) = part
            .split_once('<')
            .ok_or_else(|| err("expected SIGNAL<QUANTITY (only the < operator is supported)"))?;
        if signal.trim() != "memory.available" {
            return Err(err(&format!(
                "unsupported signal {:?} (only memory.available)",
                signal.trim()
            )));
        }
        let quantity = quantity.trim();
        bytes = if let Some(pct) = quantity.strip_suffix('%') {
            let pct: f64 = pct
                .parse()
                .map_err(|_| err("the percentage is not a number"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(err("the percentage must be between 0 and 100"));
            }
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "a share of the node's memory, rounded down to whole bytes"
            )]
            let b = (capacity_bytes as f64 * pct / 100.0) as u64;
            b
        } else {
            api::pod::parse_memory_bytes(quantity).map_err(|e| err(e.reason))?
        };
    }
    Ok(bytes)
}

/// `bytes` as Kubernetes prints a binary-SI quantity: the largest of `Ei`..`Ki` that divides it
/// exactly, else plain bytes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    if bytes == 0 {
        return "0".into();
    }
    for (suffix, shift) in UNITS {
        if bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Pods chosen for eviction, by uid, with the status message; their workers take them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Evictions(Arc<Mutex<HashMap<String, String>>>);

impl Evictions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn request(&self, uid: &str, message: String) {
        self.lock().insert(uid.to_owned(), message);
    }

    /// The eviction message if pod `uid` is to be evicted (once).
    pub(crate) fn take(&self, uid: &str) -> Option<String> {
        self.lock().remove(uid)
    }

    fn pending(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Forgets requests for pods no worker will take (gone from the node).
    fn retain(&self, uids: &std::collections::HashSet<String>) {
        self.lock().retain(|uid, _| uids.contains(uid));
    }
}

/// A running pod that may be evicted.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub uid: String,
    /// `namespace/name`, the tie-breaker.
    pub key: String,
    pub spec: PodSpec,
    /// Working set per container.
    pub containers: Vec<(String, u64)>,
}

impl Candidate {
    fn usage(&self) -> u64 {
        self.containers.iter().map(|(_, b)| b).sum()
    }
}

/// The next pod to evict: the smallest [`api::pod::memory_eviction_key`].
pub(crate) fn pick_victim(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates.iter().min_by(|a, b| {
        api::pod::memory_eviction_key(&a.spec, a.usage())
            .cmp(&api::pod::memory_eviction_key(&b.spec, b.usage()))
            .then_with(|| a.key.cmp(&b.key))
    })
}

/// The pod status message, worded as Kubernetes' eviction manager words it.
pub(crate) fn eviction_message(threshold: u64, available: u64, victim: &Candidate) -> String {
    let mut msg = format!(
        "The node was low on resource: memory. Threshold quantity: {}, available: {}Ki. ",
        format_bytes(threshold),
        available / 1024
    );
    for (name, usage) in &victim.containers {
        let request = victim
            .spec
            .containers
            .iter()
            .find(|c| &c.name == name)
            .and_then(|c| c.resources.memory_request_bytes().ok().flatten())
            .unwrap_or(0);
        if *usage > request {
            msg.push_str(&format!(
                "Container {name} was using {}Ki, request is {}, has larger consumption of memory. ",
                usage / 1024,
                format_bytes(request)
            ));
        }
    }
    msg.trim_end().to_owned()
}

/// The eviction manager task.
pub(crate) struct EvictionManager<R> {
    pub client: ApiClient,
    pub runtime: Arc<R>,
    pub cfg: Arc<AgentConfig>,
    pub evictions: Evictions,
    /// Whether the node reports `MemoryPressure` (the heartbeat posts on change).
    pub pressure: watch::Sender<bool>,
}

impl<R: PodRuntime> EvictionManager<R> {
    /// Runs a round every `eviction_interval` until `shutdown`; does nothing with a zero
    /// threshold.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        if self.cfg.eviction_memory_available == 0 {
            return;
        }
        let mut last_met: Option<Instant> = None;
        let mut tainted: Option<bool> = None;
        loop {
            match self.round().await {
                Ok(met) => {
                    if met {
                        last_met = Some(Instant::now());
                    }
                    let pressure = last_met.is_some_and(|t| {
                        t.elapsed() < self.cfg.eviction_pressure_transition_period || met
                    });
                    self.pressure.send_if_modified(|p| {
                        let changed = *p != pressure;
                        *p = pressure;
                        changed
                    });
                    if tainted != Some(pressure) {
                        match set_taint(&self.client, &self.cfg.node_name, pressure).await {
                            Ok(()) => tainted = Some(pressure),
                            Err(e) => {
                                tracing::warn!(error = %e, "memory-pressure taint update failed")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "eviction round failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.eviction_interval) => {}
            }
        }
    }

    /// Observes memory; under the threshold, asks for one eviction. Returns whether the
    /// threshold is met (memory available below it).
    async fn round(&self) -> Result<bool, ClientError> {
        let threshold = self.cfg.eviction_memory_available;
        let mut usage: HashMap<(String, String), Vec<(String, u64)>> = HashMap::new();
        let mut total: u64 = 0;
        match self.runtime.list_pods().await {
            Ok(pods) => {
                for p in pods.into_iter().filter(|p| p.state == SandboxState::Ready) {
                    let Ok(stats) = self.runtime.stats(&p.id).await else {
                        continue;
                    };
                    let cs: Vec<(String, u64)> = stats
                        .containers
                        .into_iter()
                        .map(|c| (c.name, c.memory_bytes))
                        .collect();
                    total = total.saturating_add(cs.iter().map(|(_, b)| b).sum());
                    usage.insert((p.namespace, p.name), cs);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing runtime pods for eviction failed");
                return Ok(false);
            }
        }
        let available = self.cfg.capacity.memory_bytes.saturating_sub(total);
        if available >= threshold {
            return Ok(false);
        }
        let selector = client::encode_query(&format!("spec.nodeName={}", self.cfg.node_name));
        let (pods, _) = self
            .client
            .list(&format!("/api/v1/pods?fieldSelector={selector}"))
            .await?;
        let uids: std::collections::HashSet<String> = pods
            .iter()
            .filter_map(|p| p.pointer("/metadata/uid").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        self.evictions.retain(&uids);
        if self.evictions.pending() {
            // One eviction at a time: wait for the worker to carry out the last one.
            return Ok(true);
        }
        let candidates: Vec<Candidate> = pods
            .iter()
            .filter(|p| {
                p.pointer("/metadata/deletionTimestamp").is_none()
                    && !matches!(
                        p.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded" | "Failed")
                    )
            })
            .filter_map(|p| {
                let ns = p.pointer("/metadata/namespace")?.as_str()?.to_owned();
                let name = p.pointer("/metadata/name")?.as_str()?.to_owned();
                let containers = usage.get(&(ns.clone(), name.clone()))?.clone();
                Some(Candidate {
                    uid: p.pointer("/metadata/uid")?.as_str()?.to_owned(),
                    key: format!("{ns}/{name}"),
                    spec: serde_json::from_value(p.get("spec")?.clone()).ok()?,
                    containers,
                })
            })
            .collect();
        if let Some(victim) = pick_victim(&candidates) {
            let message = eviction_message(threshold, available, victim);
            tracing::warn!(pod = %victim.key, available, threshold, "evicting pod under memory pressure");
            self.evictions.request(&victim.uid, message);
        } else {
            tracing::warn!(available, threshold, "memory pressure but no pod to evict");
        }
        Ok(true)
    }
}

/// Adds or removes the memory-pressure `NoSchedule` taint on the node.
async fn set_taint(client: &ApiClient, node: &str, present: bool) -> Result<(), ClientError> {
    let path = format!("/api/v1/nodes/{node}");
    for _ in 0..5 {
        let Some(mut obj) = client.get(&path).await? else {
            return Ok(());
        };
        let mut taints: Vec<Value> = obj
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let has = taints.iter().any(|t| t["key"] == MEMORY_PRESSURE_TAINT);
        if has == present {
            return Ok(());
        }
        if present {
            taints.push(json!({"key": MEMORY_PRESSURE_TAINT, "effect": "NoSchedule"}));
        } else {
            taints.retain(|t| t["key"] != MEMORY_PRESSURE_TAINT);
        }
        obj["spec"]["taints"] = json!(taints);
        match client.update(&path, &obj).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Status {
        code: 409,
        reason: "Conflict".into(),
        message: "node kept changing under the eviction manager".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(key: &str, requests: &[(&str, &str)], limits: &[(&str, &str)], usage: u64) -> Candidate {
        let map = |kv: &[(&str, &str)]| -> serde_json::Map<String, Value> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect()
        };
        let spec: PodSpec = serde_json::from_value(json!({"containers": [{
            "name": "c", "image": "x",
            "resources": {"requests": map(requests), "limits": map(limits)},
        }]}))
        .unwrap();
        Candidate {
            uid: key.into(),
            key: key.into(),
            spec,
            containers: vec![("c".into(), usage)],
        }
    }

    #[test]
    fn thresholds_parse_as_the_kubelet_writes_them() {
        assert_eq!(
            parse_eviction_hard("memory.available<100Mi", 0),
            Ok(100 << 20)
        );
        assert_eq!(
            parse_eviction_hard("memory.available<10%", 1 << 30),
            Ok((1 << 30) / 10)
        );
        assert_eq!(
            parse_eviction_hard(" memory.available < 1Gi ", 0),
            Ok(1 << 30)
        );
        assert!(parse_eviction_hard("memory.available>1Gi", 0).is_err());
        assert!(parse_eviction_hard("nodefs.available<10%", 0).is_err());
        assert!(parse_eviction_hard("memory.available<lots", 0).is_err());
        assert!(parse_eviction_hard("memory.available<150%", 0).is_err());
        assert_eq!(parse_eviction_hard("", 0), Ok(0));
    }

    #[test]
    fn quantities_print_in_binary_si() {
        assert_eq!(format_bytes(100 << 20), "100Mi");
        assert_eq!(format_bytes(1536), "1536");
        assert_eq!(format_bytes(3 << 10), "3Ki");
        assert_eq!(format_bytes(2 << 30), "2Gi");
        assert_eq!(format_bytes(0), "0");
    }

    #[test]
    fn best_effort_goes_first_then_burstable_above_request_then_guaranteed() {
        let full = [("cpu", "100m"), ("memory", "400Mi")];
        let mut pods = vec![
            pod("guaranteed", &full, &full, 390 << 20),
            pod("burstable-under", &[("memory", "300Mi")], &[], 200 << 20),
            pod("burstable-over", &[("memory", "100Mi")], &[], 250 << 20),
            pod("best-effort", &[], &[], 200 << 20),
        ];
        let mut order = Vec::new();
        while let Some(v) = pick_victim(&pods) {
            let key = v.key.clone();
            order.push(key.clone());
            pods.retain(|p| p.key != key);
        }
        // BestEffort uses 200Mi above its (zero) request, the burstable one 150Mi above; pods
        // within their requests tie (as in the kubelet without priorities), then go by name.
        assert_eq!(
            order,
            [
                "best-effort",
                "burstable-over",
                "burstable-under",
                "guaranteed"
            ]
        );
    }

    #[test]
    fn the_message_is_worded_as_kubernetes_words_it() {
        let v = pod("p", &[("memory", "64Mi")], &[], 100 << 20);
        assert_eq!(
            eviction_message(100 << 20, 51_200 << 10, &v),
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: \
             51200Ki. Container c was using 102400Ki, request is 64Mi, has larger consumption \
             of memory."
        );
        let within = pod("q", &[("memory", "200Mi")], &[], 100 << 20);
        assert!(!eviction_message(1, 0, &within).contains("Container"));
    }
}
