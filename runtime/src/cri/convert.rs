//! Pure mappings between Flotilla's pod model and CRI messages: pod → `PodSandboxConfig` /
//! `ContainerConfig`, CRI container status → Kubernetes container state, image pull policy.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::pod::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, QosClass, qos_class,
};

use super::pb;
use crate::pod_runtime::{PodConfig, RuntimeError};

/// Label on every sandbox and container Flotilla creates.
pub const LABEL_MANAGED: &str = "flotilla.dev/managed";
/// Label naming the runtime instance (node) that owns a sandbox, so several agents (or tests)
/// can share one containerd without adopting each other's pods.
pub const LABEL_INSTANCE: &str = "flotilla.dev/instance";
/// Pod `metadata.name`.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// Pod `metadata.namespace`.
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Pod `metadata.uid`.
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// Container name from the spec.
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// Position of the container in the spec, to report statuses in spec order.
pub const LABEL_CONTAINER_INDEX: &str = "flotilla.dev/container-index";
/// Container annotation: the image exactly as the spec gave it (CRI may report it normalised).
pub const ANNOTATION_IMAGE: &str = "flotilla.dev/image";
/// Pod annotation overriding the image pull policy of all its containers (`Always`,
/// `IfNotPresent`, `Never`); `api::pod::Container` has no `imagePullPolicy` field yet.
pub const ANNOTATION_PULL_POLICY: &str = "flotilla.dev/image-pull-policy";

/// CFS period the kubelet uses, in microseconds.
pub const CPU_PERIOD_US: i64 = 100_000;
/// Smallest CFS quota the kernel accepts, in microseconds.
const MIN_CPU_QUOTA_US: i64 = 1_000;
/// `cpu.shares` of a container without a CPU request (the kubelet's `MinShares`).
const MIN_CPU_SHARES: i64 = 2;

/// Kubernetes `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull before every start.
    Always,
    /// Pull only when the node does not have the image.
    IfNotPresent,
    /// Never pull; fail when the node does not have the image.
    Never,
}

impl PullPolicy {
    /// The policy for `image`: the pod's [`ANNOTATION_PULL_POLICY`] if set, else Kubernetes'
    /// default (`Always` for `:latest` or untagged references, `IfNotPresent` otherwise).
    pub fn for_image(
        image: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, RuntimeError> {
        if let Some(p) = annotations.get(ANNOTATION_PULL_POLICY) {
            return match p.as_str() {
                "Always" => Ok(PullPolicy::Always),
                "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
                "Never" => Ok(PullPolicy::Never),
                other => Err(RuntimeError::InvalidSpec(format!(
                    "{ANNOTATION_PULL_POLICY}: {other:?} is not Always, IfNotPresent or Never"
                ))),
            };
        }
        if image.contains('@') {
            return Ok(PullPolicy::IfNotPresent);
        }
        let last = image.rsplit('/').next().unwrap_or(image);
        match last.split_once(':') {
            Some((_, "latest")) | None => Ok(PullPolicy::Always),
            Some(_) => Ok(PullPolicy::IfNotPresent),
        }
    }
}

/// Where one pod's files live on the node.
#[derive(Debug, Clone)]
pub struct PodPaths {
    /// `<log_root>/<namespace>_<name>_<uid>`, the sandbox's `log_directory`.
    pub log_dir: PathBuf,
    /// `<root>/volumes/<namespace>_<name>_<uid>`, parent of emptyDir volumes.
    pub volume_dir: PathBuf,
}

impl PodPaths {
    /// Paths of the pod `namespace/name` with `uid` under the runtime's root.
    pub fn new(root: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        let key = format!("{namespace}_{name}_{uid}");
        PodPaths {
            log_dir: root.join("logs").join(&key),
            volume_dir: root.join("volumes").join(key),
        }
    }
}

/// Log path of a container relative to the pod's log directory, as the kubelet lays it out.
pub fn container_log_path(container: &str, attempt: u32) -> String {
    format!("{container}/{attempt}.log")
}

/// The cgroup parent of a pod under `root` (cgroupfs driver), by QoS class as the kubelet does:
/// Guaranteed pods directly under the root, the others under `burstable` / `besteffort`.
pub fn cgroup_parent(root: &str, qos: QosClass, uid: &str) -> String {
    let root = root.trim_end_matches('/');
    let uid: String = uid
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    match qos {
        QosClass::Guaranteed => format!("{root}/pod{uid}"),
        QosClass::Burstable => format!("{root}/burstable/pod{uid}"),
        QosClass::BestEffort => format!("{root}/besteffort/pod{uid}"),
    }
}

/// Options for building a sandbox config that come from the runtime, not the pod.
#[derive(Debug, Clone)]
pub struct SandboxOptions<'a> {
    /// Runtime instance label value.
    pub instance: &'a str,
    /// Run the pod in the host's network namespace.
    pub host_network: bool,
    /// Root of pod cgroups, `None` to let containerd choose.
    pub cgroup_root: Option<&'a str>,
    /// Restart attempt of this sandbox.
    pub attempt: u32,
}

/// The labels that identify a pod's sandbox and containers.
pub fn pod_labels(pod: &PodConfig, instance: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_INSTANCE.to_owned(), instance.to_owned()),
        (LABEL_POD_NAME.to_owned(), pod.name.clone()),
        (LABEL_POD_NAMESPACE.to_owned(), pod.namespace.clone()),
        (LABEL_POD_UID.to_owned(), pod.uid.clone()),
    ])
}

/// `PodSandboxConfig` of a pod.
pub fn sandbox_config(
    pod: &PodConfig,
    paths: &PodPaths,
    opts: &SandboxOptions<'_>,
) -> pb::PodSandboxConfig {
    let network = if opts.host_network {
        pb::NamespaceMode::Node
    } else {
        pb::NamespaceMode::Pod
    };
    pb::PodSandboxConfig {
        metadata: Some(pb::PodSandboxMetadata {
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            attempt: opts.attempt,
        }),
        // With the host network, containerd shares the host's UTS namespace too, where runc
        // refuses to set a hostname (containerd-cri.md §9.1); the kubelet also sends "".
        hostname: if opts.host_network {
            String::new()
        } else {
            pod.name.clone()
        },
        log_directory: paths.log_dir.display().to_string(),
        dns_config: None,
        labels: pod_labels(pod, opts.instance),
        annotations: pod
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        linux: Some(pb::LinuxPodSandboxConfig {
            cgroup_parent: opts
                .cgroup_root
                .map(|r| cgroup_parent(r, qos_class(&pod.spec), &pod.uid))
                .unwrap_or_default(),
            security_context: Some(pb::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(network)),
                ..Default::default()
            }),
            sysctls: HashMap::new(),
        }),
    }
}

fn namespace_options(network: pb::NamespaceMode) -> pb::NamespaceOption {
    pb::NamespaceOption {
        network: network as i32,
        pid: pb::NamespaceMode::Container as i32,
        ipc: pb::NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// CRI Linux resources of a container: `cpu.shares` from the CPU request (the limit when no
/// request is set, as API defaulting does), CFS quota from the CPU limit, the memory limit.
pub fn linux_resources(c: &Container) -> Result<pb::LinuxContainerResources, RuntimeError> {
    let limit_cpu = c.resources.cpu_limit_millis()?;
    let request_cpu = c.resources.cpu_request_millis()?.or(limit_cpu);
    let memory = c.resources.memory_limit_bytes()?;
    let cpu_shares = match request_cpu {
        Some(m) => (i64::try_from(m).unwrap_or(i64::MAX / 1024) * 1024 / 1000).max(MIN_CPU_SHARES),
        None => MIN_CPU_SHARES,
    };
    let (cpu_quota, cpu_period) = match limit_cpu {
        Some(m) if m > 0 => {
            let quota = i64::try_from(m)
                .unwrap_or(i64::MAX / CPU_PERIOD_US)
                .saturating_mul(CPU_PERIOD_US)
                / 1000;
            (quota.max(MIN_CPU_QUOTA_US), CPU_PERIOD_US)
        }
        _ => (0, 0),
    };
    let memory_limit_in_bytes = match memory {
        Some(b) => i64::try_from(b).map_err(|_| {
            RuntimeError::InvalidSpec(format!("container {}: memory limit too large", c.name))
        })?,
        None => 0,
    };
    Ok(pb::LinuxContainerResources {
        cpu_period,
        cpu_quota,
        cpu_shares,
        memory_limit_in_bytes,
        ..Default::default()
    })
}

/// `ContainerConfig` of the `index`-th container of `pod`.
pub fn container_config(
    pod: &PodConfig,
    index: usize,
    paths: &PodPaths,
    instance: &str,
    host_network: bool,
) -> Result<pb::ContainerConfig, RuntimeError> {
    let c = pod
        .spec
        .containers
        .get(index)
        .ok_or_else(|| RuntimeError::Internal(format!("no container at index {index}")))?;
    if c.name.is_empty() {
        return Err(RuntimeError::InvalidSpec("container without a name".into()));
    }
    if c.image.is_empty() {
        return Err(RuntimeError::InvalidSpec(format!(
            "container {}: no image",
            c.name
        )));
    }
    let mut labels = pod_labels(pod, instance);
    labels.insert(LABEL_CONTAINER_NAME.to_owned(), c.name.clone());
    labels.insert(LABEL_CONTAINER_INDEX.to_owned(), index.to_string());
    let mut mounts = Vec::new();
    for m in &c.volume_mounts {
        let vol = pod
            .spec
            .volumes
            .iter()
            .find(|v| v.name == m.name)
            .ok_or_else(|| {
                RuntimeError::InvalidSpec(format!(
                    "container {}: volume mount {:?} names no volume of the pod",
                    c.name, m.name
                ))
            })?;
        let host_path = if let Some(hp) = &vol.host_path {
            PathBuf::from(&hp.path)
        } else if vol.empty_dir.is_some() {
            paths.volume_dir.join(&vol.name)
        } else {
            return Err(RuntimeError::InvalidSpec(format!(
                "volume {:?}: only emptyDir and hostPath are supported",
                vol.name
            )));
        };
        mounts.push(pb::Mount {
            container_path: m.mount_path.clone(),
            host_path: host_path.display().to_string(),
            readonly: m.read_only.unwrap_or(false),
        });
    }
    let network = if host_network {
        pb::NamespaceMode::Node
    } else {
        pb::NamespaceMode::Pod
    };
    Ok(pb::ContainerConfig {
        metadata: Some(pb::ContainerMetadata {
            name: c.name.clone(),
            attempt: 0,
        }),
        image: Some(pb::ImageSpec {
            image: c.image.clone(),
            ..Default::default()
        }),
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: c
            .env
            .iter()
            .map(|e| pb::KeyValue {
                key: e.name.clone(),
                value: e.value.clone().into_bytes(),
            })
            .collect(),
        mounts,
        labels,
        annotations: HashMap::from([(ANNOTATION_IMAGE.to_owned(), c.image.clone())]),
        log_path: container_log_path(&c.name, 0),
        stdin: false,
        stdin_once: false,
        tty: false,
        linux: Some(pb::LinuxContainerConfig {
            resources: Some(linux_resources(c)?),
            security_context: Some(pb::LinuxContainerSecurityContext {
                namespace_options: Some(namespace_options(network)),
                ..Default::default()
            }),
        }),
    })
}

/// RFC 3339 time of a CRI timestamp (nanoseconds since the epoch); `None` for 0 (not reached).
pub fn cri_time(ns: i64) -> Option<String> {
    let ns = u64::try_from(ns).ok().filter(|n| *n > 0)?;
    Some(crate::wasm::time::rfc3339_nanos(
        UNIX_EPOCH + Duration::from_nanos(ns),
    ))
}

/// Kubernetes state of a CRI container status, as the kubelet derives it.
pub fn container_state(s: &pb::ContainerStatus) -> ContainerState {
    let non_empty = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    match pb::ContainerState::try_from(s.state).unwrap_or(pb::ContainerState::ContainerUnknown) {
        pb::ContainerState::ContainerCreated => ContainerState::Waiting(ContainerStateWaiting {
            reason: Some("ContainerCreating".into()),
            message: non_empty(&s.message),
        }),
        pb::ContainerState::ContainerRunning => ContainerState::Running(ContainerStateRunning {
            started_at: cri_time(s.started_at),
        }),
        pb::ContainerState::ContainerExited => {
            let reason = non_empty(&s.reason).unwrap_or_else(|| {
                if s.exit_code == 0 {
                    "Completed".into()
                } else {
                    "Error".into()
                }
            });
            ContainerState::Terminated(ContainerStateTerminated {
                exit_code: s.exit_code,
                reason: Some(reason),
                message: non_empty(&s.message),
                started_at: cri_time(s.started_at),
                finished_at: cri_time(s.finished_at),
            })
        }
        pb::ContainerState::ContainerUnknown => ContainerState::Waiting(ContainerStateWaiting {
            reason: Some("ContainerStatusUnknown".into()),
            message: non_empty(&s.message),
        }),
    }
}

/// The CRI `StopContainer` timeout for a grace period: whole seconds, rounded up so a grace of
/// 500 ms does not become an immediate kill.
pub fn stop_timeout_secs(grace: Duration) -> i64 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// Nanoseconds since the epoch, as CRI timestamps are.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use api::pod::{EmptyDirVolumeSource, EnvVar, PodSpec, Volume, VolumeMount};

    use super::*;

    fn busybox(limits: &[(&str, &str)], requests: &[(&str, &str)]) -> Container {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mut c = Container {
            name: "main".into(),
            image: "localhost/busybox:v1".into(),
            ..Container::default()
        };
        c.resources.limits = map(limits);
        c.resources.requests = map(requests);
        c
    }

    #[test]
    fn resources_follow_the_kubelet() {
        let r = linux_resources(&busybox(&[("cpu", "500m"), ("memory", "32Mi")], &[])).unwrap();
        assert_eq!(r.memory_limit_in_bytes, 32 << 20);
        assert_eq!((r.cpu_quota, r.cpu_period), (50_000, 100_000));
        assert_eq!(r.cpu_shares, 512, "request defaults to the limit");

        let r = linux_resources(&busybox(&[("cpu", "1")], &[("cpu", "250m")])).unwrap();
        assert_eq!((r.cpu_quota, r.cpu_shares), (100_000, 256));

        let r = linux_resources(&busybox(&[("cpu", "1m")], &[])).unwrap();
        assert_eq!(r.cpu_quota, 1_000, "quota clamped to the kernel minimum");
        assert_eq!(r.cpu_shares, 2);

        let r = linux_resources(&busybox(&[], &[])).unwrap();
        assert_eq!(
            (
                r.cpu_quota,
                r.cpu_period,
                r.cpu_shares,
                r.memory_limit_in_bytes
            ),
            (0, 0, 2, 0)
        );

        assert!(matches!(
            linux_resources(&busybox(&[("memory", "lots")], &[])),
            Err(RuntimeError::Quantity(_))
        ));
    }

    #[test]
    fn pull_policy_defaults_like_kubernetes() {
        let none = BTreeMap::new();
        let p = |i: &str| PullPolicy::for_image(i, &none).unwrap();
        assert_eq!(p("localhost/busybox:v1"), PullPolicy::IfNotPresent);
        assert_eq!(p("localhost/busybox:latest"), PullPolicy::Always);
        assert_eq!(p("localhost:5000/busybox"), PullPolicy::Always);
        assert_eq!(p("busybox@sha256:abc"), PullPolicy::IfNotPresent);
        let never = BTreeMap::from([(ANNOTATION_PULL_POLICY.to_owned(), "Never".to_owned())]);
        assert_eq!(
            PullPolicy::for_image("x:latest", &never).unwrap(),
            PullPolicy::Never
        );
        let bad = BTreeMap::from([(ANNOTATION_PULL_POLICY.to_owned(), "Sometimes".to_owned())]);
        assert!(matches!(
            PullPolicy::for_image("x:v1", &bad),
            Err(RuntimeError::InvalidSpec(_))
        ));
    }

    #[test]
    fn sandbox_and_container_configs() {
        let mut c = busybox(&[("memory", "64Mi")], &[]);
        c.command = vec!["/bin/sh".into(), "-c".into()];
        c.args = vec!["echo hi".into()];
        c.env = vec![EnvVar {
            name: "A".into(),
            value: "b".into(),
        }];
        c.working_dir = Some("/tmp".into());
        c.volume_mounts = vec![VolumeMount {
            name: "scratch".into(),
            mount_path: "/scratch".into(),
            read_only: None,
        }];
        let pod = PodConfig::new(
            "web",
            PodSpec {
                containers: vec![c],
                volumes: vec![Volume {
                    name: "scratch".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                }],
                ..PodSpec::default()
            },
        )
        .with_annotation("a", "1");
        let paths = PodPaths::new(Path::new("/r"), &pod.namespace, &pod.name, &pod.uid);
        let opts = SandboxOptions {
            instance: "node-a",
            host_network: true,
            cgroup_root: Some("/flotilla"),
            attempt: 2,
        };
        let sb = sandbox_config(&pod, &paths, &opts);
        assert_eq!(sb.hostname, "", "host network pods get no hostname");
        assert_eq!(sb.log_directory, "/r/logs/default_web_uid-web");
        assert_eq!(sb.metadata.as_ref().unwrap().attempt, 2);
        assert_eq!(sb.labels[LABEL_INSTANCE], "node-a");
        assert_eq!(sb.annotations["a"], "1");
        let linux = sb.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/flotilla/burstable/poduid_web");
        let ns = linux.security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, pb::NamespaceMode::Node as i32);

        let cc = container_config(&pod, 0, &paths, "node-a", true).unwrap();
        assert_eq!(cc.command, ["/bin/sh", "-c"]);
        assert_eq!(cc.args, ["echo hi"]);
        assert_eq!(cc.working_dir, "/tmp");
        assert_eq!(cc.envs[0].value, b"b");
        assert_eq!(cc.log_path, "main/0.log");
        assert_eq!(cc.labels[LABEL_CONTAINER_NAME], "main");
        assert_eq!(
            cc.mounts[0].host_path,
            "/r/volumes/default_web_uid-web/scratch"
        );
        let res = cc.linux.unwrap().resources.unwrap();
        assert_eq!(res.memory_limit_in_bytes, 64 << 20);

        let mut bad = pod.clone();
        bad.spec.containers[0].volume_mounts[0].name = "nope".into();
        assert!(matches!(
            container_config(&bad, 0, &paths, "node-a", true),
            Err(RuntimeError::InvalidSpec(_))
        ));
    }

    #[test]
    fn cgroup_parent_by_qos() {
        assert_eq!(
            cgroup_parent("/f/", QosClass::Guaranteed, "u-1"),
            "/f/podu_1"
        );
        assert_eq!(
            cgroup_parent("/f", QosClass::BestEffort, "u"),
            "/f/besteffort/podu"
        );
    }

    #[test]
    fn states_map_like_the_kubelet() {
        let exited = |code, reason: &str| pb::ContainerStatus {
            state: pb::ContainerState::ContainerExited as i32,
            exit_code: code,
            reason: reason.into(),
            started_at: 1_000_000_000,
            finished_at: 2_000_000_000,
            ..Default::default()
        };
        let t = |s: ContainerState| s.terminated().cloned().unwrap();
        let oom = t(container_state(&exited(137, "OOMKilled")));
        assert_eq!(
            (oom.exit_code, oom.reason.as_deref()),
            (137, Some("OOMKilled"))
        );
        assert_eq!(
            oom.finished_at.as_deref(),
            Some("1970-01-01T00:00:02.000000000Z")
        );
        assert_eq!(
            t(container_state(&exited(0, ""))).reason.as_deref(),
            Some("Completed")
        );
        assert_eq!(
            t(container_state(&exited(3, ""))).reason.as_deref(),
            Some("Error")
        );
        let running = pb::ContainerStatus {
            state: pb::ContainerState::ContainerRunning as i32,
            ..Default::default()
        };
        assert!(container_state(&running).is_running());
        let created = pb::ContainerStatus::default();
        assert!(matches!(
            container_state(&created),
            ContainerState::Waiting(ContainerStateWaiting { reason: Some(r), .. }) if r == "ContainerCreating"
        ));
    }

    #[test]
    fn stop_timeout_rounds_up() {
        assert_eq!(stop_timeout_secs(Duration::ZERO), 0);
        assert_eq!(stop_timeout_secs(Duration::from_millis(500)), 1);
        assert_eq!(stop_timeout_secs(Duration::from_secs(30)), 30);
    }
}
