//! Authentication (bearer tokens, as a tower layer) and authorization (admin, read-only,
//! node-restricted).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::status::ApiError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Full rights.
    Admin,
    /// get/list/watch on everything except secrets (dashboards).
    ReadOnly,
    /// A node agent: its own Node and Lease, the pods bound to it and their status.
    Node(String),
    /// Only with the insecure dev listener: no authentication at all.
    Anonymous,
}

impl Identity {
    /// User name as Kubernetes messages show it.
    pub(crate) fn user(&self) -> String {
        match self {
            Identity::Admin => "admin".into(),
            Identity::ReadOnly => "viewer".into(),
            Identity::Node(n) => format!("system:node:{n}"),
            Identity::Anonymous => "system:anonymous".into(),
        }
    }

    /// Groups as Kubernetes would give such a user (audit events list them).
    pub(crate) fn groups(&self) -> &'static [&'static str] {
        match self {
            Identity::Admin => &["system:masters", "system:authenticated"],
            Identity::ReadOnly => &["flotilla:viewers", "system:authenticated"],
            Identity::Node(_) => &["system:nodes", "system:authenticated"],
            Identity::Anonymous => &["system:unauthenticated"],
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone)]
pub(crate) struct Attributes<'a> {
    pub verb: &'static str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// `fieldSelector` values pinned with `=`, for node list/watch restrictions.
    pub field_node_name: Option<&'a str>,
    pub field_name: Option<&'a str>,
}

/// Outcome of authorization; some rules need the object to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow,
    Deny,
    /// Allowed only if the stored pod's `spec.nodeName` is this node.
    PodBoundTo(String),
    /// Allowed only if the created object's name is this one.
    CreatedNameIs(String),
    /// Allowed only if a pod bound to this node references the object (a configMap or secret
    /// volume, `env[].valueFrom` or `envFrom`), as Kubernetes' NodeAuthorizer allows.
    ReferencedByPodOn(String),
}

const READ: &[&str] = &["get", "list", "watch"];

/// Decides whether `id` may do `a`.
pub(crate) fn authorize(id: &Identity, a: &Attributes<'_>) -> Decision {
    if a.group == super::discovery::AUTHZ_GROUP && a.resource == "selfsubjectaccessreviews" {
        return Decision::Allow;
    }
    match id {
        Identity::Admin | Identity::Anonymous => Decision::Allow,
        Identity::ReadOnly => {
            if READ.contains(&a.verb) && a.resource != "secrets" {
                Decision::Allow
            } else {
                Decision::Deny
            }
        }
        Identity::Node(node) => node_rules(node, a),
    }
}

fn node_rules(node: &str, a: &Attributes<'_>) -> Decision {
    let own_name = a.name == Some(node);
    match (a.group, a.resource) {
        ("", "nodes") => match a.verb {
            "create" => Decision::CreatedNameIs(node.to_string()),
            "list" | "watch" if a.field_name == Some(node) => Decision::Allow,
            "get" | "update" | "patch" if own_name => Decision::Allow,
            _ => Decision::Deny,
        },
        ("coordination.k8s.io", "leases") if a.namespace == Some("kube-node-lease") => match a.verb
        {
            "create" => Decision::CreatedNameIs(node.to_string()),
            "get" | "update" | "patch" | "delete" if own_name => Decision::Allow,
            _ => Decision::Deny,
        },
        ("", "pods") => match (a.verb, a.subresource) {
            ("list" | "watch", None) if a.field_node_name == Some(node) => Decision::Allow,
            ("get" | "delete", None) | ("get" | "update" | "patch", Some("status")) => {
                Decision::PodBoundTo(node.to_string())
            }
            _ => Decision::Deny,
        },
        ("", "events") if matches!(a.verb, "create" | "update" | "patch") => Decision::Allow,
        ("node.k8s.io", "runtimeclasses") if READ.contains(&a.verb) => Decision::Allow,
        // The API servers' addresses, for the agent to fail over between them.
        ("", "endpoints")
            if a.verb == "get"
                && a.namespace == Some("default")
                && a.name == Some("kubernetes") =>
        {
            Decision::Allow
        }
        ("", "configmaps" | "secrets") if a.verb == "get" && a.subresource.is_none() => {
            Decision::ReferencedByPodOn(node.to_string())
        }
        _ => Decision::Deny,
    }
}

/// Paths anyone may read without credentials (as Kubernetes' `system:public-info-viewer`).
fn public_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/livez" | "/readyz" | "/version")
        || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/")
}

/// Shared state of the authentication layer.
#[derive(Clone)]
pub(crate) struct Authenticator {
    /// `None` = insecure dev mode: everyone is [`Identity::Anonymous`] with full rights.
    pub pki: Option<super::pki::Pki>,
    /// Records requests that fail authentication.
    pub audit: Option<std::sync::Arc<super::audit::Auditor>>,
}

/// Tower layer body: resolves the bearer token into an [`Identity`] request extension; 401 if
/// it is missing or unknown.
pub(crate) async fn authenticate(
    State(auth): State<Authenticator>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(pki) = &auth.pki else {
        req.extensions_mut().insert(Identity::Anonymous);
        return next.run(req).await;
    };
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match token.and_then(|t| pki.authenticate(t)) {
        Some(id) => {
            req.extensions_mut().insert(id);
            next.run(req).await
        }
        None if public_path(req.uri().path()) => {
            req.extensions_mut().insert(Identity::ReadOnly);
            next.run(req).await
        }
        None => {
            let mut resp = ApiError::unauthorized().into_response();
            if let Some(auditor) = &auth.audit {
                super::audit::failed_authentication(auditor, &req, &mut resp);
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(verb: &'static str, group: &'a str, resource: &'a str) -> Attributes<'a> {
        Attributes {
            verb,
            group,
            resource,
            subresource: None,
            namespace: Some("default"),
            name: None,
            field_node_name: None,
            field_name: None,
        }
    }

    #[test]
    fn roles() {
        let ro = Identity::ReadOnly;
        assert_eq!(authorize(&ro, &attrs("list", "", "pods")), Decision::Allow);
        assert_eq!(authorize(&ro, &attrs("create", "", "pods")), Decision::Deny);
        assert_eq!(authorize(&ro, &attrs("get", "", "secrets")), Decision::Deny);
        let n = Identity::Node("n1".into());
        assert_eq!(authorize(&n, &attrs("list", "", "pods")), Decision::Deny);
        let mut a = attrs("watch", "", "pods");
        a.field_node_name = Some("n1");
        assert_eq!(authorize(&n, &a), Decision::Allow);
        let mut a = attrs("update", "", "pods");
        a.subresource = Some("status");
        assert_eq!(authorize(&n, &a), Decision::PodBoundTo("n1".into()));
        let mut a = attrs("update", "", "nodes");
        a.name = Some("n2");
        assert_eq!(authorize(&n, &a), Decision::Deny);
        a.name = Some("n1");
        assert_eq!(authorize(&n, &a), Decision::Allow);
        assert_eq!(
            authorize(&n, &attrs("get", "", "secrets")),
            Decision::ReferencedByPodOn("n1".into())
        );
        assert_eq!(authorize(&n, &attrs("list", "", "secrets")), Decision::Deny);
        assert_eq!(
            authorize(&n, &attrs("update", "", "configmaps")),
            Decision::Deny
        );
        assert_eq!(
            authorize(&n, &attrs("create", "apps", "deployments")),
            Decision::Deny
        );
    }
}
