//! Discovery (aggregated `apidiscovery.k8s.io/v2` and legacy), `/version` and a minimal
//! OpenAPI v3 that lets kubectl hand field validation to the server.

use serde_json::{Value, json};

use super::resources::{GROUPS, RESOURCES, Resource, Sub};

/// Exact content type kubectl requires for aggregated discovery.
pub(crate) const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// The authorization group: served for `kubectl auth can-i`, not stored.
pub(crate) const AUTHZ_GROUP: &str = "authorization.k8s.io";

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn sub_kind(
    res: &Resource,
    sub: Sub,
) -> (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
) {
    match sub {
        Sub::Status => (
            res.group,
            res.version,
            res.kind,
            &["get", "patch", "update"],
        ),
        Sub::Scale => ("autoscaling", "v1", "Scale", &["get", "patch", "update"]),
        Sub::Binding => ("", "v1", "Binding", &["create"]),
        Sub::Log => ("", "v1", "Pod", &["get"]),
        Sub::Eviction => ("policy", "v1", "Eviction", &["create"]),
        Sub::Finalize => (res.group, res.version, res.kind, &["update"]),
    }
}

fn aggregated_resource(res: &Resource) -> Value {
    let subs: Vec<Value> = res
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k, verbs) = sub_kind(res, *s);
            json!({"subresource": s.name(), "responseKind": {"group": g, "version": v, "kind": k}, "verbs": verbs})
        })
        .collect();
    let mut r = json!({
        "resource": res.plural,
        "responseKind": {"group": res.group, "version": res.version, "kind": res.kind},
        "scope": if res.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": res.singular,
        "verbs": VERBS,
    });
    if !res.short_names.is_empty() {
        r["shortNames"] = json!(res.short_names);
    }
    if !subs.is_empty() {
        r["subresources"] = json!(subs);
    }
    r
}

fn ssar_aggregated() -> Value {
    json!({"resource": "selfsubjectaccessreviews",
           "responseKind": {"group": AUTHZ_GROUP, "version": "v1", "kind": "SelfSubjectAccessReview"},
           "scope": "Cluster", "singularResource": "selfsubjectaccessreview", "verbs": ["create"]})
}

fn group_entry(group: &str) -> Value {
    let resources: Vec<Value> = if group == AUTHZ_GROUP {
        vec![ssar_aggregated()]
    } else {
        RESOURCES
            .iter()
            .filter(|r| r.group == group)
            .map(aggregated_resource)
            .collect()
    };
    json!({"metadata": {"name": group},
           "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}]})
}

/// Aggregated discovery for `/api` (`core = true`) or `/apis`.
pub(crate) fn aggregated(core: bool) -> Value {
    let items: Vec<Value> = if core {
        vec![group_entry("")]
    } else {
        GROUPS
            .iter()
            .filter(|g| !g.is_empty())
            .copied()
            .chain(std::iter::once(AUTHZ_GROUP))
            .map(group_entry)
            .collect()
    };
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
           "metadata": {}, "items": items})
}

/// Legacy `/api`.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]})
}

/// Legacy `/apis`.
pub(crate) fn api_group_list() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .filter(|g| !g.is_empty())
        .copied()
        .chain(std::iter::once(AUTHZ_GROUP))
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Legacy per-group-version `APIResourceList`; `None` for an unknown group.
pub(crate) fn api_resource_list(group: &str) -> Option<Value> {
    let group_version = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    };
    let mut resources = Vec::new();
    if group == AUTHZ_GROUP {
        resources.push(
            json!({"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
            "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]}),
        );
    } else if !GROUPS.contains(&group) {
        return None;
    }
    for res in RESOURCES.iter().filter(|r| r.group == group) {
        let mut r = json!({"name": res.plural, "singularName": res.singular, "namespaced": res.namespaced,
                           "kind": res.kind, "verbs": VERBS});
        if !res.short_names.is_empty() {
            r["shortNames"] = json!(res.short_names);
        }
        resources.push(r);
        for s in res.subresources {
            let (g, v, k, verbs) = sub_kind(res, *s);
            let mut sr = json!({"name": format!("{}/{}", res.plural, s.name()), "singularName": "",
                                "namespaced": res.namespaced, "kind": k, "verbs": verbs});
            if g != res.group {
                sr["group"] = json!(g);
                sr["version"] = json!(v);
            }
            resources.push(sr);
        }
    }
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": resources}),
    )
}

/// `/version`.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "gitVersion": concat!("v1.37.0-flotilla.", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }),
    })
}

fn gv_path(group: &str) -> String {
    if group.is_empty() {
        "api/v1".into()
    } else {
        format!("apis/{group}/v1")
    }
}

/// Hash that changes when the served set changes, so kubectl's cache is refreshed.
fn doc_hash(group: &str) -> String {
    use sha2::Digest as _;
    let kinds: Vec<&str> = RESOURCES
        .iter()
        .filter(|r| r.group == group)
        .map(|r| r.kind)
        .collect();
    let digest = sha2::Sha256::digest(format!("{group}:{kinds:?}:{}", env!("CARGO_PKG_VERSION")));
    hex::encode(&digest[..8])
}

/// `/openapi/v3`: one document per served group version.
pub(crate) fn openapi_index() -> Value {
    let mut paths = serde_json::Map::new();
    for g in GROUPS {
        let p = gv_path(g);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", doc_hash(g))}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<gv>`: a PATCH operation per kind, tagged with its GVK and the
/// `fieldValidation` parameter, so kubectl sends `fieldValidation=Strict` and leaves checks to us.
pub(crate) fn openapi_doc(gv: &str) -> Option<Value> {
    let group = GROUPS.iter().find(|g| gv_path(g) == gv)?;
    let mut paths = serde_json::Map::new();
    for res in RESOURCES.iter().filter(|r| r.group == *group) {
        let path = if res.namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{}/{{name}}", res.plural)
        } else {
            format!("/{gv}/{}/{{name}}", res.plural)
        };
        let gvk = json!({"group": res.group, "version": res.version, "kind": res.kind});
        paths.insert(path, json!({
            "get": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "get"},
            "put": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "put",
                    "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]},
            "patch": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "patch",
                      "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]},
        }));
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Flotilla", "version": "v1"},
                "paths": paths, "components": {"schemas": {}}}),
    )
}
