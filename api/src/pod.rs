//! Pod spec types in the Kubernetes `core/v1` shape (camelCase JSON field names), quantity parsing
//! for CPU and memory, and the QoS class computed the way the kubelet computes it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `core/v1` PodSpec: the subset Flotilla runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Containers run to completion one after another before `containers` start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
    /// The pod's containers; they run concurrently.
    #[serde(default)]
    pub containers: Vec<Container>,
    /// Volumes the containers may mount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// `Always`, `OnFailure` or `Never`; the node agent acts on it, runtimes do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    /// Grace period for stopping the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    /// The node the scheduler bound the pod to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The runtime class (`wasm` or a CRI handler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Pod-level security settings; container settings override them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
}

/// `core/v1` Container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// DNS-label name, unique within the pod.
    pub name: String,
    /// Image reference; for wasm pods a `.wasm` path or URL, optionally `@sha256:<hex>`.
    #[serde(default)]
    pub image: String,
    /// Entrypoint (`argv[0..]`); for wasm pods `argv[0]` defaults to the container name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments appended to `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Working directory inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Compute resources.
    #[serde(default)]
    pub resources: ResourceRequirements,
    /// Volumes mounted into this container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Whether the container reads a stdin stream. Wasm pods take its bytes from the
    /// `flotilla.dev/stdin` annotation; without one, stdin stays open for `kubectl attach -i`
    /// and closes when the attached input ends (Kubernetes' `stdinOnce`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Ports the container listens on (named ports are what probes may refer to).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::probe::ContainerPort>,
    /// Restarts the container when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<crate::probe::Probe>,
    /// Drives `ready` and the pod's Ready condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<crate::probe::Probe>,
    /// Holds back the other probes until it succeeds once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<crate::probe::Probe>,
    /// `Always`, `IfNotPresent` or `Never`; absent means [`PullPolicy::default_for`] the image,
    /// which is what the API server's defaulting writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Container security settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

impl Container {
    /// The effective pull policy: the field if set, else Kubernetes' default for the image.
    pub fn pull_policy(&self) -> PullPolicy {
        self.image_pull_policy
            .unwrap_or_else(|| PullPolicy::default_for(&self.image))
    }
}

/// `core/v1` PullPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pull before every start.
    Always,
    /// Pull only when the node does not have the image.
    IfNotPresent,
    /// Never pull; the image must already be on the node.
    Never,
}

impl PullPolicy {
    /// Kubernetes' default: `Always` for `:latest` or untagged references, `IfNotPresent` for
    /// other tags and for digests.
    pub fn default_for(image: &str) -> PullPolicy {
        if image.contains('@') {
            return PullPolicy::IfNotPresent;
        }
        // The tag follows the last ':' after the last '/' (a registry port is not a tag).
        let last = image.rsplit('/').next().unwrap_or(image);
        match last.split_once(':') {
            Some((_, "latest")) | None => PullPolicy::Always,
            Some(_) => PullPolicy::IfNotPresent,
        }
    }
}

/// `core/v1` SecurityContext (the Linux subset Flotilla maps to CRI).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// UID the process runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<i64>,
    /// GID the process runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<i64>,
    /// Refuse to start the container if it would run as UID 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_non_root: Option<bool>,
    /// Mount the container's root filesystem read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
    /// Capabilities added to and dropped from the runtime's default set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Run with every capability and device of the host (Pod Security admission decides
    /// whether the namespace allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
    /// Whether a process may gain more privileges than its parent (`no_new_privs` when false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_privilege_escalation: Option<bool>,
}

/// `core/v1` Capabilities: POSIX capability names without the `CAP_` prefix (`NET_ADMIN`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Capabilities to add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
    /// Capabilities to drop (`ALL` drops every one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
}

/// `core/v1` PodSecurityContext (the subset that containers inherit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSecurityContext {
    /// Default UID of the pod's processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<i64>,
    /// Default GID of the pod's processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<i64>,
    /// Default for the containers' `runAsNonRoot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_non_root: Option<bool>,
}

/// `core/v1` EnvVar (literal values only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Variable value; absent means empty.
    #[serde(default)]
    pub value: String,
}

/// `core/v1` ResourceRequirements: resource name (`cpu`, `memory`, ...) to quantity string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    /// What the scheduler reserves and the fair share under contention.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Hard caps enforced by the runtime.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

impl ResourceRequirements {
    /// `requests.cpu` in millicores, if set.
    pub fn cpu_request_millis(&self) -> Result<Option<u64>, QuantityError> {
        self.requests
            .get("cpu")
            .map(|q| parse_cpu_millis(q))
            .transpose()
    }
    /// `limits.cpu` in millicores, if set.
    pub fn cpu_limit_millis(&self) -> Result<Option<u64>, QuantityError> {
        self.limits
            .get("cpu")
            .map(|q| parse_cpu_millis(q))
            .transpose()
    }
    /// `requests.memory` in bytes, if set.
    pub fn memory_request_bytes(&self) -> Result<Option<u64>, QuantityError> {
        self.requests
            .get("memory")
            .map(|q| parse_memory_bytes(q))
            .transpose()
    }
    /// `limits.memory` in bytes, if set.
    pub fn memory_limit_bytes(&self) -> Result<Option<u64>, QuantityError> {
        self.limits
            .get("memory")
            .map(|q| parse_memory_bytes(q))
            .transpose()
    }
}

/// `core/v1` VolumeMount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    /// Name of a volume in `PodSpec::volumes`.
    pub name: String,
    /// Path inside the container.
    pub mount_path: String,
    /// Read-only mount; when absent, emptyDir is writable and hostPath read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// `core/v1` Volume: exactly one source should be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// Volume name.
    pub name: String,
    /// A fresh directory that lives as long as the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    /// A directory of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    /// The keys of a ConfigMap as files (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolumeSource>,
    /// The keys of a Secret as files (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolumeSource>,
}

/// `core/v1` KeyToPath: one key projected to a relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyToPath {
    /// The key in the object's data.
    pub key: String,
    /// Relative path of the file in the volume.
    pub path: String,
    /// File mode bits (e.g. `0o400`); the source's `defaultMode` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `core/v1` ConfigMapVolumeSource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapVolumeSource {
    /// ConfigMap name, in the pod's namespace.
    #[serde(default)]
    pub name: String,
    /// Only these keys, at these paths; every key when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// File mode bits of the files (Kubernetes: `0o644`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<u32>,
    /// Start the pod even if the ConfigMap (or a listed key) does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// `core/v1` SecretVolumeSource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolumeSource {
    /// Secret name, in the pod's namespace.
    #[serde(default)]
    pub secret_name: String,
    /// Only these keys, at these paths; every key when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// File mode bits of the files (Kubernetes: `0o644`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<u32>,
    /// Start the pod even if the Secret (or a listed key) does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// `core/v1` EmptyDirVolumeSource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirVolumeSource {
    /// `""` (node disk) or `Memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    /// Size cap as a quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<String>,
}

/// `core/v1` HostPathVolumeSource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPathVolumeSource {
    /// Directory on the node.
    pub path: String,
    /// `Directory`, `DirectoryOrCreate`, ...
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
}

/// `core/v1` ContainerState: exactly one variant, serialised as `{"running": {...}}` etc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerState {
    /// Not running yet.
    Waiting(ContainerStateWaiting),
    /// Running.
    Running(ContainerStateRunning),
    /// Ended.
    Terminated(ContainerStateTerminated),
}

impl ContainerState {
    /// Whether the container has ended.
    pub fn is_terminated(&self) -> bool {
        matches!(self, ContainerState::Terminated(_))
    }
    /// Whether the container is running.
    pub fn is_running(&self) -> bool {
        matches!(self, ContainerState::Running(_))
    }
    /// The terminated details, if ended.
    pub fn terminated(&self) -> Option<&ContainerStateTerminated> {
        match self {
            ContainerState::Terminated(t) => Some(t),
            _ => None,
        }
    }
}

/// `core/v1` ContainerStateWaiting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateWaiting {
    /// Machine-readable reason, e.g. `ContainerCreating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `core/v1` ContainerStateRunning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateRunning {
    /// RFC 3339 start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
}

/// `core/v1` ContainerStateTerminated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStateTerminated {
    /// Exit status (137 for OOMKilled, 128+signal for killed processes).
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, `FuelExhausted`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail (for wasm: the trap message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339 start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339 end time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// Pod QoS class, as in `status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QosClass {
    /// Every container has equal, non-zero cpu and memory requests and limits.
    Guaranteed,
    /// Anything in between.
    Burstable,
    /// No container requests or limits cpu or memory.
    BestEffort,
}

/// A malformed resource quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {quantity:?}: {reason}")]
pub struct QuantityError {
    /// The input.
    pub quantity: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A quantity as an exact rational `mantissa * 10^exp10 * 2^exp2` would be overkill here: both
/// units we need are integers after scaling, so parse into a value scaled by `scale` and round up
/// the way Kubernetes does (`MilliValue`/`Value` round up fractional results).
fn parse_scaled(quantity: &str, scale: u128) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        quantity: quantity.to_owned(),
        reason,
    };
    let q = quantity.trim();
    if q.is_empty() {
        return Err(err("empty"));
    }
    if q.starts_with('-') {
        return Err(err("negative"));
    }
    let q = q.strip_prefix('+').unwrap_or(q);
    let num_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(num_end);
    if number.is_empty() || number == "." {
        return Err(err("missing number"));
    }
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') {
        return Err(err("more than one decimal point"));
    }
    // value = digits / 10^frac_len * multiplier, where multiplier = num/den.
    let (mul_num, mul_den): (u128, u128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| err("bad exponent"))?;
            if exp > 18 {
                return Err(err("exponent too large"));
            }
            (10u128.pow(exp), 1)
        }
        _ => return Err(err("unknown suffix")),
    };
    if frac_part.len() > 18 || int_part.len() > 20 {
        return Err(err("too many digits"));
    }
    let digits: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| err("bad digits"))?;
    let den = 10u128.pow(frac_part.len() as u32) * mul_den;
    let num = digits
        .checked_mul(mul_num)
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| err("too large"))?;
    let value = num.div_ceil(den);
    u64::try_from(value).map_err(|_| err("too large"))
}

/// Runtime class every node that runs OCI containers (through CRI) advertises, and that a pod
/// without `runtimeClassName` whose images are not all wasm modules needs.
pub const OCI_RUNTIME_CLASS: &str = "oci";

/// Whether `image` is a wasm module: a path, `file://` or `http(s)://` URL ending in `.wasm`,
/// optionally pinned with `@sha256:<hex>`. Anything else is an OCI image reference.
pub fn is_wasm_image(image: &str) -> bool {
    let image = image.split_once("@sha256:").map_or(image, |(i, _)| i);
    image.ends_with(".wasm")
        && ["/", "./", "file://", "http://", "https://"]
            .iter()
            .any(|p| image.starts_with(p))
}

/// CPU quantity (`500m`, `1`, `0.25`, `2k`) in millicores, rounded up as `MilliValue()` does.
pub fn parse_cpu_millis(quantity: &str) -> Result<u64, QuantityError> {
    parse_scaled(quantity, 1_000)
}

/// Memory quantity (`64Mi`, `1G`, `128974848`, `129e6`) in bytes, rounded up as `Value()` does.
pub fn parse_memory_bytes(quantity: &str) -> Result<u64, QuantityError> {
    parse_scaled(quantity, 1)
}

/// The QoS class of a pod, computed as the kubelet's `GetPodQOS` does (on the pod as stored, after
/// API defaulting, which copies limits into unset requests): only `cpu` and `memory` count, zero
/// quantities are ignored, init containers count like containers, and a malformed quantity is
/// treated as absent (validation rejects such pods earlier).
pub fn qos_class(spec: &PodSpec) -> QosClass {
    let mut requests: BTreeMap<&str, u64> = BTreeMap::new();
    let mut limits: BTreeMap<&str, u64> = BTreeMap::new();
    let mut is_guaranteed = true;
    for c in spec.init_containers.iter().chain(&spec.containers) {
        for (name, q) in &c.resources.requests {
            if let Some(v) = supported_value(name, q)
                && v > 0
            {
                *requests.entry(name.as_str()).or_default() += v;
            }
        }
        let mut found_cpu = false;
        let mut found_memory = false;
        for (name, q) in &c.resources.limits {
            if let Some(v) = supported_value(name, q)
                && v > 0
            {
                found_cpu |= name == "cpu";
                found_memory |= name == "memory";
                *limits.entry(name.as_str()).or_default() += v;
            }
        }
        if !(found_cpu && found_memory) {
            is_guaranteed = false;
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return QosClass::BestEffort;
    }
    if is_guaranteed
        && requests
            .iter()
            .any(|(name, req)| limits.get(name) != Some(req))
    {
        is_guaranteed = false;
    }
    if is_guaranteed && requests.len() == limits.len() {
        QosClass::Guaranteed
    } else {
        QosClass::Burstable
    }
}

fn supported_value(name: &str, quantity: &str) -> Option<u64> {
    match name {
        "cpu" => parse_cpu_millis(quantity).ok(),
        "memory" => parse_memory_bytes(quantity).ok(),
        _ => None,
    }
}

/// Sort key for evicting pods under node memory pressure: sorting ascending gives the kubelet's
/// order (`rankMemoryPressure` without pod priority): pods whose usage exceeds their memory
/// requests first (BestEffort pods request nothing, so any use exceeds), then the largest usage
/// above request first.
pub fn memory_eviction_key(spec: &PodSpec, usage_bytes: u64) -> (bool, std::cmp::Reverse<u64>) {
    let request: u64 = spec
        .containers
        .iter()
        .filter_map(|c| c.resources.memory_request_bytes().ok().flatten())
        .sum();
    (
        usage_bytes <= request,
        std::cmp::Reverse(usage_bytes.saturating_sub(request)),
    )
}

/// Copies each container's `limits` into unset `requests`, as the API server's defaulting does.
pub fn default_requests_from_limits(spec: &mut PodSpec) {
    for c in spec
        .init_containers
        .iter_mut()
        .chain(spec.containers.iter_mut())
    {
        for (name, q) in &c.resources.limits {
            c.resources
                .requests
                .entry(name.clone())
                .or_insert_with(|| q.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("1"), Ok(1000));
        assert_eq!(parse_cpu_millis("0.25"), Ok(250));
        assert_eq!(parse_cpu_millis("1.5"), Ok(1500));
        assert_eq!(parse_cpu_millis("100u"), Ok(1)); // rounds up like MilliValue
        assert_eq!(parse_cpu_millis("2k"), Ok(2_000_000));
        assert!(parse_cpu_millis("-1").is_err());
        assert!(parse_cpu_millis("1x").is_err());
        assert!(parse_cpu_millis("").is_err());
        assert!(parse_cpu_millis("1.2.3").is_err());
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory_bytes("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory_bytes("128M"), Ok(128_000_000));
        assert_eq!(parse_memory_bytes("129e6"), Ok(129_000_000));
        assert_eq!(parse_memory_bytes("1.5Ki"), Ok(1536));
        assert_eq!(parse_memory_bytes("100"), Ok(100));
        assert_eq!(parse_memory_bytes("1500m"), Ok(2)); // 1.5 bytes rounds up
        assert!(parse_memory_bytes("1Qi").is_err());
    }

    fn container(req: &[(&str, &str)], lim: &[(&str, &str)]) -> Container {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        Container {
            name: "c".into(),
            resources: ResourceRequirements {
                requests: map(req),
                limits: map(lim),
            },
            ..Container::default()
        }
    }

    fn spec(cs: Vec<Container>) -> PodSpec {
        PodSpec {
            containers: cs,
            ..PodSpec::default()
        }
    }

    #[test]
    fn pull_policy_defaults_like_kubernetes() {
        let p = PullPolicy::default_for;
        assert_eq!(p("localhost/busybox:v1"), PullPolicy::IfNotPresent);
        assert_eq!(p("localhost/busybox:latest"), PullPolicy::Always);
        assert_eq!(p("localhost:5000/busybox"), PullPolicy::Always);
        assert_eq!(p("busybox"), PullPolicy::Always);
        assert_eq!(p("busybox@sha256:abc"), PullPolicy::IfNotPresent);
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "image": "x:latest", "imagePullPolicy": "Never",
            "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true,
                                "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}},
        }))
        .unwrap();
        assert_eq!(c.pull_policy(), PullPolicy::Never);
        let sc = c.security_context.unwrap();
        assert_eq!(sc.run_as_user, Some(1000));
        assert_eq!(sc.capabilities.unwrap().drop, ["ALL"]);
        let c: Container =
            serde_json::from_value(serde_json::json!({"name": "c", "image": "x"})).unwrap();
        assert_eq!(c.pull_policy(), PullPolicy::Always);
        assert!(
            serde_json::from_value::<Container>(
                serde_json::json!({"name": "c", "imagePullPolicy": "Sometimes"})
            )
            .is_err()
        );
        let v: Volume = serde_json::from_value(serde_json::json!({
            "name": "cfg", "configMap": {"name": "app", "items": [{"key": "a", "path": "x/a"}]},
        }))
        .unwrap();
        assert_eq!(v.config_map.unwrap().items[0].path, "x/a");
    }

    #[test]
    fn qos_classes_match_kubernetes() {
        assert_eq!(
            qos_class(&spec(vec![container(&[], &[])])),
            QosClass::BestEffort
        );
        // Only unsupported resources: still BestEffort.
        let eph = container(&[("ephemeral-storage", "1Gi")], &[]);
        assert_eq!(qos_class(&spec(vec![eph])), QosClass::BestEffort);
        // Zero requests are ignored.
        assert_eq!(
            qos_class(&spec(vec![container(&[("cpu", "0")], &[])])),
            QosClass::BestEffort
        );
        let full = [("cpu", "500m"), ("memory", "64Mi")];
        assert_eq!(
            qos_class(&spec(vec![container(&full, &full)])),
            QosClass::Guaranteed
        );
        // Equal values in different spellings compare equal.
        let other = [("cpu", "0.5"), ("memory", "67108864")];
        assert_eq!(
            qos_class(&spec(vec![container(&full, &other)])),
            QosClass::Guaranteed
        );
        // Limits without requests on an undefaulted spec: Burstable; after defaulting: Guaranteed.
        let mut s = spec(vec![container(&[], &full)]);
        assert_eq!(qos_class(&s), QosClass::Burstable);
        default_requests_from_limits(&mut s);
        assert_eq!(qos_class(&s), QosClass::Guaranteed);
        // Missing memory limit: Burstable.
        let cpu_only = [("cpu", "500m")];
        assert_eq!(
            qos_class(&spec(vec![container(&cpu_only, &cpu_only)])),
            QosClass::Burstable
        );
        // One guaranteed container plus one best-effort container: Burstable.
        let pod = spec(vec![container(&full, &full), container(&[], &[])]);
        assert_eq!(qos_class(&pod), QosClass::Burstable);
        // Request below limit: Burstable.
        let lower = [("cpu", "250m"), ("memory", "64Mi")];
        assert_eq!(
            qos_class(&spec(vec![container(&lower, &full)])),
            QosClass::Burstable
        );
    }

    #[test]
    fn memory_pressure_evicts_best_effort_then_burstable_above_request() {
        let be = spec(vec![container(&[], &[])]);
        let burst = spec(vec![container(
            &[("memory", "100Mi")],
            &[("memory", "200Mi")],
        )]);
        let guar = spec(vec![container(
            &[("cpu", "1"), ("memory", "100Mi")],
            &[("cpu", "1"), ("memory", "100Mi")],
        )]);
        let mut pods = [
            ("guaranteed", memory_eviction_key(&guar, 90 << 20)),
            ("burstable-under", memory_eviction_key(&burst, 50 << 20)),
            ("burstable-over", memory_eviction_key(&burst, 150 << 20)),
            ("best-effort", memory_eviction_key(&be, 60 << 20)),
        ];
        pods.sort_by_key(|(_, k)| *k);
        let order: Vec<&str> = pods.iter().map(|(n, _)| *n).collect();
        // Both over-request pods go first, larger overage first (BestEffort: 60 Mi over 0).
        assert_eq!(order[..2], ["best-effort", "burstable-over"]);
        assert!(order[2..].contains(&"guaranteed") && order[2..].contains(&"burstable-under"));
    }

    #[test]
    fn json_uses_kubernetes_names() {
        let json = r#"{"containers":[{"name":"a","image":"/x.wasm","workingDir":"/data",
            "resources":{"limits":{"cpu":"500m","memory":"64Mi"}},
            "volumeMounts":[{"name":"v","mountPath":"/data","readOnly":true}]}],
            "volumes":[{"name":"v","emptyDir":{}},{"name":"h","hostPath":{"path":"/tmp","type":"Directory"}}]}"#;
        let spec: PodSpec = serde_json::from_str(json).expect("parses");
        let c = &spec.containers[0];
        assert_eq!(c.working_dir.as_deref(), Some("/data"));
        assert_eq!(c.resources.cpu_limit_millis(), Ok(Some(500)));
        assert_eq!(c.volume_mounts[0].read_only, Some(true));
        assert_eq!(
            spec.volumes[1].host_path.as_ref().map(|h| h.path.as_str()),
            Some("/tmp")
        );
        let state = ContainerState::Terminated(ContainerStateTerminated {
            exit_code: 137,
            reason: Some("OOMKilled".into()),
            ..ContainerStateTerminated::default()
        });
        let out = serde_json::to_string(&state).expect("serialises");
        assert_eq!(
            out,
            r#"{"terminated":{"exitCode":137,"reason":"OOMKilled"}}"#
        );
    }
}
