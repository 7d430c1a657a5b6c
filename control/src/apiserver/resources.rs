//! The resource registry: every kind the API server serves, with its REST names.

/// A subresource served under `…/{name}/{sub}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    Status,
    Scale,
    Binding,
    Log,
    Eviction,
    /// `namespaces/{name}/finalize`: the namespace controller's write of `spec.finalizers`.
    Finalize,
}

impl Sub {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sub::Status => "status",
            Sub::Scale => "scale",
            Sub::Binding => "binding",
            Sub::Log => "log",
            Sub::Eviction => "eviction",
            Sub::Finalize => "finalize",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Sub> {
        Some(match s {
            "status" => Sub::Status,
            "scale" => Sub::Scale,
            "binding" => Sub::Binding,
            "log" => Sub::Log,
            "eviction" => Sub::Eviction,
            "finalize" => Sub::Finalize,
            _ => return None,
        })
    }
}

/// One served resource type.
#[derive(Debug)]
pub(crate) struct Resource {
    /// API group, `""` for core.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Plural REST name (`pods`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    pub subresources: &'static [Sub],
}

impl Resource {
    /// `v1` or `apps/v1`.
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, or `pods` for core: the name quota `count/…` keys use.
    pub(crate) fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Store prefix of every object of this resource.
    pub(crate) fn prefix(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{g}/{}/", self.plural)
    }

    /// Store key of one object.
    pub(crate) fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/{name}", self.prefix()),
            _ => format!("{}{name}", self.prefix()),
        }
    }

    /// Store prefix for a list, optionally narrowed to one namespace.
    pub(crate) fn list_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    pub(crate) fn has(&self, sub: Sub) -> bool {
        self.subresources.contains(&sub)
    }
}

const fn r(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short_names: &'static [&'static str],
    namespaced: bool,
    subresources: &'static [Sub],
) -> Resource {
    Resource {
        group,
        version: "v1",
        kind,
        plural,
        singular,
        short_names,
        namespaced,
        subresources,
    }
}

/// Every served resource.
pub(crate) static RESOURCES: &[Resource] = &[
    r(
        "",
        "Namespace",
        "namespaces",
        "namespace",
        &["ns"],
        false,
        &[Sub::Status, Sub::Finalize],
    ),
    r(
        "",
        "Pod",
        "pods",
        "pod",
        &["po"],
        true,
        &[Sub::Status, Sub::Binding, Sub::Log, Sub::Eviction],
    ),
    r("", "Node", "nodes", "node", &["no"], false, &[Sub::Status]),
    r(
        "",
        "Service",
        "services",
        "service",
        &["svc"],
        true,
        &[Sub::Status],
    ),
    r(
        "",
        "Endpoints",
        "endpoints",
        "endpoints",
        &["ep"],
        true,
        &[],
    ),
    r("", "Event", "events", "event", &["ev"], true, &[]),
    r(
        "",
        "ConfigMap",
        "configmaps",
        "configmap",
        &["cm"],
        true,
        &[],
    ),
    r("", "Secret", "secrets", "secret", &[], true, &[]),
    r(
        "",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        &["quota"],
        true,
        &[Sub::Status],
    ),
    r(
        "",
        "LimitRange",
        "limitranges",
        "limitrange",
        &["limits"],
        true,
        &[],
    ),
    r(
        "apps",
        "Deployment",
        "deployments",
        "deployment",
        &["deploy"],
        true,
        &[Sub::Status, Sub::Scale],
    ),
    r(
        "apps",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        &["rs"],
        true,
        &[Sub::Status, Sub::Scale],
    ),
    r(
        "coordination.k8s.io",
        "Lease",
        "leases",
        "lease",
        &[],
        true,
        &[],
    ),
    r(
        "node.k8s.io",
        "RuntimeClass",
        "runtimeclasses",
        "runtimeclass",
        &[],
        false,
        &[],
    ),
];

/// Group versions served, in discovery order (`""` = core).
pub(crate) static GROUPS: &[&str] = &["", "apps", "coordination.k8s.io", "node.k8s.io"];

/// Finds a resource by group and plural name.
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Whether a group/version is served at all.
pub(crate) fn group_version_known(group: &str, version: &str) -> bool {
    version == "v1" && GROUPS.contains(&group)
}

/// `v1, apps/v1, …`: the list an unknown-version error names.
pub(crate) fn known_group_versions() -> String {
    GROUPS
        .iter()
        .map(|g| {
            if g.is_empty() {
                "v1".to_string()
            } else {
                format!("{g}/v1")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
