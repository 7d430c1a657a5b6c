//! Pure mappings between Flotilla's pod model and CRI messages: pod → `PodSandboxConfig` /
//! `ContainerConfig`, CRI container status → Kubernetes container state, image pull policy.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use api::pod::PullPolicy;
use api::pod::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, PodSpec, QosClass, qos_class,
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
/// Pod annotation giving the image pull policy of containers whose `imagePullPolicy` is unset
/// (`Always`, `IfNotPresent`, `Never`), for callers that build pods without the API server's
/// defaulting.
pub const ANNOTATION_PULL_POLICY: &str = "flotilla.dev/image-pull-policy";
/// Pod annotation naming the CRI runtime handler (`runc`, ...) for `RunPodSandbox`; the node
/// agent sets it from the pod's RuntimeClass. Absent: the runtime's configured handler.
pub const ANNOTATION_RUNTIME_HANDLER: &str = "flotilla.dev/runtime-handler";

/// CFS period the kubelet uses, in microseconds.
pub const CPU_PERIOD_US: i64 = 100_000;
/// Smallest CFS quota the kernel accepts, in microseconds.
const MIN_CPU_QUOTA_US: i64 = 1_000;
/// `cpu.shares` of a container without a CPU request (the kubelet's `MinShares`).
const MIN_CPU_SHARES: i64 = 2;

/// The pull policy of a container: its `imagePullPolicy` if set, else the pod's
/// [`ANNOTATION_PULL_POLICY`], else Kubernetes' default for the image.
pub fn pull_policy(
    c: &Container,
    annotations: &BTreeMap<String, String>,
) -> Result<PullPolicy, RuntimeError> {
    if let Some(p) = c.image_pull_policy {
        return Ok(p);
    }
    match annotations.get(ANNOTATION_PULL_POLICY).map(String::as_str) {
        None => Ok(PullPolicy::default_for(&c.image)),
        Some("Always") => Ok(PullPolicy::Always),
        Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
        Some("Never") => Ok(PullPolicy::Never),
        Some(other) => Err(RuntimeError::InvalidSpec(format!(
            "{ANNOTATION_PULL_POLICY}: {other:?} is not Always, IfNotPresent or Never"
        ))),
    }
}

/// Whether any container of the pod asks for `privileged`: the sandbox must then be
/// privileged too (containerd refuses a privileged container in an unprivileged sandbox).
pub fn any_privileged(spec: &PodSpec) -> bool {
    spec.containers
        .iter()
        .chain(&spec.init_containers)
        .any(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true))
}

/// The UID a container runs as by its spec (container, then pod security context).
pub fn run_as_user(spec: &PodSpec, c: &Container) -> Option<i64> {
    c.security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_user))
}

/// Whether the container must not run as root (container, then pod security context).
pub fn run_as_non_root(spec: &PodSpec, c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.run_as_non_root)
        .or_else(|| {
            spec.security_context
                .as_ref()
                .and_then(|s| s.run_as_non_root)
        })
        .unwrap_or(false)
}

/// The kubelet's `runAsNonRoot` check: `uid` is the spec's user, else the image's
/// (`image_uid`, `None` when the image names a user by name only or not at all).
pub fn verify_non_root(
    c: &Container,
    uid: Option<i64>,
    image_user: Option<(Option<i64>, String)>,
) -> Result<(), RuntimeError> {
    match (uid, image_user) {
        (Some(0), _) => Err(RuntimeError::InvalidSpec(format!(
            "container {}: container's runAsUser breaks non-root policy",
            c.name
        ))),
        (Some(_), _) => Ok(()),
        (None, Some((Some(0), _)) | Some((None, _)) | None) => {
            Err(RuntimeError::InvalidSpec(format!(
                "container {}: container has runAsNonRoot and image will run as root",
                c.name
            )))
        }
        (None, Some((Some(_), _))) => Ok(()),
    }
}

/// CRI security context of a container (kubelet's `determineEffectiveSecurityContext`).
pub fn security_context(
    spec: &PodSpec,
    c: &Container,
    network: pb::NamespaceMode,
) -> pb::LinuxContainerSecurityContext {
    let sc = c.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged == Some(true);
    let group = sc
        .run_as_group
        .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_group));
    pb::LinuxContainerSecurityContext {
        capabilities: sc.capabilities.map(|caps| pb::Capability {
            add_capabilities: caps.add,
            drop_capabilities: caps.drop,
        }),
        privileged,
        namespace_options: Some(namespace_options(network)),
        run_as_user: run_as_user(spec, c).map(|value| pb::Int64Value { value }),
        run_as_username: String::new(),
        readonly_rootfs: sc.read_only_root_filesystem == Some(true),
        supplemental_groups: Vec::new(),
        // As the kubelet: no_new_privs only when escalation is explicitly refused.
        no_new_privs: !privileged && sc.allow_privilege_escalation == Some(false),
        run_as_group: group.map(|value| pb::Int64Value { value }),
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
                privileged: any_privileged(&pod.spec),
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
        } else if vol.config_map.is_some() || vol.secret.is_some() {
            // The node agent writes the objects' keys to a directory and hands the pod over
            // with a hostPath volume instead; only a caller without an API client gets here.
            return Err(RuntimeError::InvalidSpec(format!(
                "volume {:?}: configMap and secret volumes must be materialised by the node agent",
                vol.name
            )));
        } else {
            return Err(RuntimeError::InvalidSpec(format!(
                "volume {:?}: only emptyDir, hostPath, configMap and secret are supported",
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
        // `kubectl attach -i` needs the container's stdin held open by the runtime; as for
        // wasm pods it closes when the first attached input ends (Kubernetes' `stdinOnce`).
        stdin: c.stdin,
        stdin_once: c.stdin,
        tty: false,
        linux: Some(pb::LinuxContainerConfig {
            resources: Some(linux_resources(c)?),
            security_context: Some(security_context(&pod.spec, c, network)),
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
    fn pull_policy_field_then_annotation_then_default() {
        let none = BTreeMap::new();
        let c = |image: &str, policy: Option<PullPolicy>| Container {
            name: "c".into(),
            image: image.into(),
            image_pull_policy: policy,
            ..Container::default()
        };
        let p = |c: &Container, a: &BTreeMap<String, String>| pull_policy(c, a).unwrap();
        assert_eq!(
            p(&c("localhost/busybox:v1", None), &none),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            p(&c("localhost/busybox:latest", None), &none),
            PullPolicy::Always
        );
        assert_eq!(
            p(&c("localhost:5000/busybox", None), &none),
            PullPolicy::Always
        );
        assert_eq!(
            p(&c("busybox@sha256:abc", None), &none),
            PullPolicy::IfNotPresent
        );
        let never = BTreeMap::from([(ANNOTATION_PULL_POLICY.to_owned(), "Never".to_owned())]);
        assert_eq!(p(&c("x:latest", None), &never), PullPolicy::Never);
        assert_eq!(
            p(&c("x:latest", Some(PullPolicy::IfNotPresent)), &never),
            PullPolicy::IfNotPresent,
            "the field wins over the annotation"
        );
        let bad = BTreeMap::from([(ANNOTATION_PULL_POLICY.to_owned(), "Sometimes".to_owned())]);
        assert!(matches!(
            pull_policy(&c("x:v1", None), &bad),
            Err(RuntimeError::InvalidSpec(_))
        ));
    }

    #[test]
    fn security_context_maps_like_the_kubelet() {
        use api::pod::{Capabilities, PodSecurityContext, SecurityContext};
        let mut c = busybox(&[], &[]);
        c.security_context = Some(SecurityContext {
            run_as_group: Some(2000),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: vec!["NET_ADMIN".into()],
                drop: vec!["ALL".into()],
            }),
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        });
        let mut spec = PodSpec {
            containers: vec![c.clone()],
            security_context: Some(PodSecurityContext {
                run_as_user: Some(1000),
                run_as_non_root: Some(true),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        };
        let sc = security_context(&spec, &c, pb::NamespaceMode::Node);
        assert_eq!(
            sc.run_as_user,
            Some(pb::Int64Value { value: 1000 }),
            "from the pod"
        );
        assert_eq!(sc.run_as_group, Some(pb::Int64Value { value: 2000 }));
        assert!(sc.readonly_rootfs && sc.no_new_privs && !sc.privileged);
        let caps = sc.capabilities.unwrap();
        assert_eq!(
            (caps.add_capabilities, caps.drop_capabilities),
            (vec!["NET_ADMIN".to_owned()], vec!["ALL".to_owned()])
        );
        assert!(run_as_non_root(&spec, &c));
        assert!(!any_privileged(&spec));

        // runAsNonRoot: a spec UID of 0, or an image running as root, is refused.
        assert!(verify_non_root(&c, Some(1000), None).is_ok());
        assert!(verify_non_root(&c, Some(0), None).is_err());
        assert!(verify_non_root(&c, None, Some((Some(0), String::new()))).is_err());
        assert!(verify_non_root(&c, None, Some((None, "app".into()))).is_err());
        assert!(verify_non_root(&c, None, Some((Some(65534), String::new()))).is_ok());

        // privileged: the container and the sandbox; escalation is then allowed.
        spec.containers[0].security_context = Some(SecurityContext {
            privileged: Some(true),
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        });
        let sc = security_context(&spec, &spec.containers[0], pb::NamespaceMode::Node);
        assert!(sc.privileged && !sc.no_new_privs);
        assert!(any_privileged(&spec));
        let pod = PodConfig::new("priv", spec);
        let paths = PodPaths::new(Path::new("/r"), &pod.namespace, &pod.name, &pod.uid);
        let sb = sandbox_config(
            &pod,
            &paths,
            &SandboxOptions {
                instance: "n",
                host_network: true,
                cgroup_root: None,
                attempt: 0,
            },
        );
        assert!(sb.linux.unwrap().security_context.unwrap().privileged);

        // Nothing set: the runtime's defaults.
        let plain = busybox(&[], &[]);
        let spec = PodSpec {
            containers: vec![plain.clone()],
            ..PodSpec::default()
        };
        let sc = security_context(&spec, &plain, pb::NamespaceMode::Node);
        assert_eq!(sc.run_as_user, None);
        assert!(!sc.readonly_rootfs && !sc.no_new_privs && sc.capabilities.is_none());
    }

    #[test]
    fn config_map_volumes_need_the_agent() {
        let mut c = busybox(&[], &[]);
        c.volume_mounts = vec![VolumeMount {
            name: "cfg".into(),
            mount_path: "/etc/app".into(),
            read_only: None,
        }];
        let pod = PodConfig::new(
            "cm",
            PodSpec {
                containers: vec![c],
                volumes: vec![Volume {
                    name: "cfg".into(),
                    config_map: Some(api::pod::ConfigMapVolumeSource {
                        name: "app".into(),
                        ..Default::default()
                    }),
                    ..Volume::default()
                }],
                ..PodSpec::default()
            },
        );
        let paths = PodPaths::new(Path::new("/r"), &pod.namespace, &pod.name, &pod.uid);
        let err = container_config(&pod, 0, &paths, "n", true).unwrap_err();
        assert!(
            err.to_string().contains("materialised by the node agent"),
            "{err}"
        );
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
