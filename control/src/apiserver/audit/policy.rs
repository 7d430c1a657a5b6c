//! Kubernetes' audit `Policy` (`audit.k8s.io/v1`): which requests are recorded, and how much
//! of them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ObjectRef, RequestInfo, UserInfo};

/// How much of a request an event records (Kubernetes' audit levels, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub enum Level {
    /// Not recorded.
    None,
    /// User, verb, object reference, response code and timestamps.
    Metadata,
    /// Metadata and the request body.
    Request,
    /// Metadata, the request body and the response body.
    RequestResponse,
}

/// Stages of a request at which an event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Stage {
    /// As soon as the request arrives, before it is handled.
    RequestReceived,
    /// Long-running requests (watch, exec, attach, port-forward, followed logs): when the
    /// response headers are sent.
    ResponseStarted,
    /// When the response is complete.
    ResponseComplete,
}

/// Kubernetes' audit `Policy` (`audit.k8s.io/v1`): rules checked in order, the first that
/// matches gives the level; a request no rule matches is not recorded.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    /// Accepted as Kubernetes' policy files carry it; not used.
    #[serde(default, rename = "metadata")]
    _metadata: Option<Value>,
    #[serde(default)]
    rules: Vec<PolicyRule>,
    /// Stages recorded for no request.
    #[serde(default)]
    omit_stages: Vec<Stage>,
    #[serde(default)]
    omit_managed_fields: bool,
}

/// One rule: every field given must match (an empty list matches everything).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyRule {
    level: Level,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    user_groups: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    /// Resource requests only.
    #[serde(default)]
    resources: Vec<GroupResources>,
    /// Resource requests only; `""` matches cluster-scoped objects.
    #[serde(default)]
    namespaces: Vec<String>,
    /// Non-resource requests only; a trailing `*` matches a prefix.
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Vec<String>,
    #[serde(default)]
    omit_stages: Vec<Stage>,
    #[serde(default)]
    omit_managed_fields: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GroupResources {
    #[serde(default)]
    group: String,
    /// `pods`, `pods/status`, `pods/*`, `*/status`; empty = every resource of the group.
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Not readable.
    #[error("cannot read audit policy {path}: {source}")]
    Read {
        /// The policy file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid `audit.k8s.io/v1` `Policy`.
    #[error("audit policy {path} is not a valid audit.k8s.io/v1 Policy: {detail}")]
    Invalid {
        /// The policy file.
        path: PathBuf,
        /// What is wrong, as the parser says.
        detail: String,
    },
}

impl Policy {
    /// Every request at `Metadata`, without the `RequestReceived` stage (the default here).
    pub fn metadata_for_all() -> Policy {
        Policy {
            api_version: "audit.k8s.io/v1".into(),
            kind: "Policy".into(),
            _metadata: None,
            rules: vec![PolicyRule {
                level: Level::Metadata,
                users: vec![],
                user_groups: vec![],
                verbs: vec![],
                resources: vec![],
                namespaces: vec![],
                non_resource_urls: vec![],
                omit_stages: vec![],
                omit_managed_fields: None,
            }],
            omit_stages: vec![Stage::RequestReceived],
            omit_managed_fields: false,
        }
    }

    /// Reads a policy file (YAML or JSON), as `--audit-policy-file` does.
    pub fn from_file(path: &Path) -> Result<Policy, AuditError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuditError::Read {
            path: path.to_owned(),
            source,
        })?;
        Policy::parse(&text).map_err(|detail| AuditError::Invalid {
            path: path.to_owned(),
            detail,
        })
    }

    pub(crate) fn parse(text: &str) -> Result<Policy, String> {
        let p: Policy = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if p.kind != "Policy" {
            return Err(format!("kind is {:?}, want \"Policy\"", p.kind));
        }
        if p.api_version != "audit.k8s.io/v1" {
            return Err(format!(
                "apiVersion is {:?}, want \"audit.k8s.io/v1\"",
                p.api_version
            ));
        }
        for (i, r) in p.rules.iter().enumerate() {
            if !r.non_resource_urls.is_empty()
                && (!r.resources.is_empty() || !r.namespaces.is_empty())
            {
                return Err(format!(
                    "rules[{i}]: nonResourceURLs cannot be combined with resources or namespaces"
                ));
            }
        }
        Ok(p)
    }

    /// The level and the stages to leave out for one request.
    pub(super) fn evaluate(
        &self,
        user: &UserInfo,
        info: &RequestInfo,
    ) -> (Level, Vec<Stage>, bool) {
        for r in &self.rules {
            if r.matches(user, info) {
                let mut omit = self.omit_stages.clone();
                omit.extend(r.omit_stages.iter().copied());
                let managed = r.omit_managed_fields.unwrap_or(self.omit_managed_fields);
                return (r.level, omit, managed);
            }
        }
        (Level::None, Vec::new(), false)
    }
}

impl PolicyRule {
    fn matches(&self, user: &UserInfo, info: &RequestInfo) -> bool {
        if !self.users.is_empty() && !self.users.contains(&user.username) {
            return false;
        }
        if !self.user_groups.is_empty() && !self.user_groups.iter().any(|g| user.groups.contains(g))
        {
            return false;
        }
        if !self.verbs.is_empty() && !self.verbs.contains(&info.verb) {
            return false;
        }
        match &info.object {
            Some(o) => {
                if !self.non_resource_urls.is_empty() {
                    return false;
                }
                if !self.namespaces.is_empty()
                    && !self
                        .namespaces
                        .iter()
                        .any(|n| *n == o.namespace.clone().unwrap_or_default())
                {
                    return false;
                }
                self.resources.is_empty() || self.resources.iter().any(|g| g.matches(o))
            }
            None => {
                if !self.resources.is_empty() || !self.namespaces.is_empty() {
                    return false;
                }
                self.non_resource_urls.is_empty()
                    || self
                        .non_resource_urls
                        .iter()
                        .any(|u| match u.strip_suffix('*') {
                            Some(prefix) => info.path.starts_with(prefix),
                            None => *u == info.path,
                        })
            }
        }
    }
}

impl GroupResources {
    fn matches(&self, o: &ObjectRef) -> bool {
        if self.group != o.api_group {
            return false;
        }
        if self.resources.is_empty() {
            return true;
        }
        let full = match &o.subresource {
            Some(s) => format!("{}/{s}", o.resource),
            None => o.resource.clone(),
        };
        let named = self.resource_names.is_empty()
            || o.name
                .as_ref()
                .is_some_and(|n| self.resource_names.contains(n));
        named
            && self.resources.iter().any(|r| {
                *r == full
                    || r == "*"
                    || (o.subresource.is_some() && *r == format!("{}/*", o.resource))
                    || o.subresource
                        .as_ref()
                        .is_some_and(|s| *r == format!("*/{s}"))
            })
    }
}
