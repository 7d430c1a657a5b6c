use super::*;
use crate::apiserver::{ApiServer, ApiServerConfig};
use crate::controllers::ControllerConfig;
use crate::storage::MemStore;
use apiclient::ClientError;

#[test]
fn content_types_keep_namespaced_deletable_top_level_resources() {
    let list = json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "namespaced": true, "kind": "Pod",
         "verbs": ["create", "delete", "deletecollection", "get", "list"]},
        {"name": "pods/log", "namespaced": true, "kind": "Pod", "verbs": ["get"]},
        {"name": "nodes", "namespaced": false, "kind": "Node", "verbs": ["delete", "list"]},
        {"name": "bindings", "namespaced": true, "kind": "Binding", "verbs": ["create"]},
        {"name": "widgets", "namespaced": true, "kind": "Widget", "verbs": ["delete", "list"]},
    ]});
    let types = content_types("/api/v1", "", &list);
    assert_eq!(
        types,
        [
            ContentType {
                prefix: "/api/v1".into(),
                group: String::new(),
                resource: "pods".into(),
                deletecollection: true,
            },
            ContentType {
                prefix: "/api/v1".into(),
                group: String::new(),
                resource: "widgets".into(),
                deletecollection: false,
            },
        ]
    );
    let apps = content_types(
        "/apis/apps/v1",
        "apps",
        &json!({"resources": [{"name": "deployments", "namespaced": true,
                               "verbs": ["list", "deletecollection"]}]}),
    );
    assert_eq!(apps[0].group_resource(), "deployments.apps");
    assert_eq!(
        apps[0].collection("team"),
        "/apis/apps/v1/namespaces/team/deployments"
    );
}

fn by_type<'a>(conds: &'a [Value], ty: &str) -> &'a Value {
    conds
        .iter()
        .find(|c| c["type"] == ty)
        .unwrap_or_else(|| panic!("no {ty} in {conds:?}"))
}

#[test]
fn conditions_word_progress_like_kubernetes_and_keep_transition_times() {
    let mut content = Content::default();
    content.remaining.insert("pods".into(), 2);
    content.remaining.insert("configmaps".into(), 1);
    content.finalizers.insert("example.com/hold".into(), 1);
    let first = conditions(&[], &[], &content, "T1");
    assert_eq!(first.len(), 5);
    let remaining = by_type(&first, "NamespaceContentRemaining");
    assert_eq!(remaining["status"], "True");
    assert_eq!(remaining["reason"], "SomeResourcesRemain");
    assert_eq!(
        remaining["message"],
        "Some resources are remaining: configmaps has 1 resource instances, pods has 2 resource instances"
    );
    let fins = by_type(&first, "NamespaceFinalizersRemaining");
    assert_eq!(
        (fins["status"].as_str(), fins["message"].as_str()),
        (
            Some("True"),
            Some(
                "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
            )
        )
    );
    assert_eq!(
        by_type(&first, "NamespaceDeletionContentFailure")["status"],
        "False"
    );
    assert!(first.iter().all(|c| c["lastTransitionTime"] == "T1"));

    // Later: the pods are gone but not the held config map, and a deletion failed.
    content.remaining.remove("pods");
    content
        .errors
        .push("leases.coordination.k8s.io: 500 InternalError: boom".into());
    let second = conditions(&first, &["/apis/x/v1: timeout".into()], &content, "T2");
    let remaining = by_type(&second, "NamespaceContentRemaining");
    assert_eq!(
        remaining["lastTransitionTime"], "T1",
        "unchanged status keeps its transition time"
    );
    assert_eq!(
        remaining["message"],
        "Some resources are remaining: configmaps has 1 resource instances"
    );
    let failed = by_type(&second, "NamespaceDeletionContentFailure");
    assert_eq!(
        (failed["status"].as_str(), failed["reason"].as_str()),
        (Some("True"), Some("ContentDeletionFailed"))
    );
    assert_eq!(failed["lastTransitionTime"], "T2");
    assert_eq!(
        by_type(&second, "NamespaceDeletionDiscoveryFailure")["message"],
        "Discovery failed for some groups, 1 failing: /apis/x/v1: timeout"
    );

    let done = conditions(&second, &[], &Content::default(), "T3");
    assert_eq!(
        by_type(&done, "NamespaceContentRemaining")["reason"],
        "ContentRemoved"
    );
    assert_eq!(
        by_type(&done, "NamespaceFinalizersRemaining")["message"],
        "All content-preserving finalizers finished"
    );
}

#[test]
fn finalize_body_drops_only_our_finalizer() {
    let ns = json!({"metadata": {"name": "team", "resourceVersion": "7"},
                    "spec": {"finalizers": ["example.com/x", "kubernetes"]}});
    assert!(has_finalizer(&ns));
    let body = without_finalizer(&ns);
    assert_eq!(body["spec"]["finalizers"], json!(["example.com/x"]));
    assert_eq!(body["metadata"]["resourceVersion"], "7");
    assert!(!has_finalizer(&body));
}

/// An insecure in-process API server on a MemStore and a client for it.
async fn server() -> (tempfile::TempDir, ApiClient, CancellationToken) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = ApiServerConfig::new(dir.path());
    cfg.insecure_http = true;
    let server = ApiServer::new(cfg, MemStore::new()).expect("server");
    server.bootstrap().await.expect("bootstrap");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { server.serve(listener, s).await });
    let client = ApiClient::new(&format!("http://{addr}"), None, None).expect("client");
    (dir, client, stop)
}

fn status_of(e: &ClientError) -> (Option<u16>, String) {
    match e {
        ClientError::Status { code, message, .. } => (Some(*code), message.clone()),
        other => (None, other.to_string()),
    }
}

async fn create_content(c: &ApiClient, ns: &str) {
    let cm = |name: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": name}, "data": {"a": "1"}})
    };
    c.create(&format!("/api/v1/namespaces/{ns}/configmaps"), &cm("c1"))
        .await
        .expect("configmap");
    c.create(
        &format!("/api/v1/namespaces/{ns}/pods"),
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "main", "image": "x.wasm"}]}}),
    )
    .await
    .expect("pod");
    c.create(
        &format!("/api/v1/namespaces/{ns}/services"),
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
    )
    .await
    .expect("service");
    c.create(
        &format!("/apis/apps/v1/namespaces/{ns}/deployments"),
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                         "template": {"metadata": {"labels": {"app": "d"}},
                                      "spec": {"containers": [{"name": "main", "image": "x.wasm"}]}}}}),
    )
    .await
    .expect("deployment");
}

#[tokio::test]
async fn empties_a_terminating_namespace_then_finalizes_it() {
    let (_dir, c, stop) = server().await;
    let ns = c
        .create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}),
        )
        .await
        .expect("namespace");
    assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
    assert_eq!(ns["status"]["phase"], "Active");
    create_content(&c, "team").await;
    // Held back by a finalizer someone else owns.
    c.create(
        "/api/v1/namespaces/team/configmaps",
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "held", "finalizers": ["example.com/hold"]}}),
    )
    .await
    .expect("held configmap");

    // The system namespaces stay.
    let e = c
        .delete("/api/v1/namespaces/default", None)
        .await
        .expect_err("default may not be deleted");
    assert_eq!(
        status_of(&e),
        (
            Some(403),
            "namespaces \"default\" is forbidden: this namespace may not be deleted".into()
        )
    );

    // DELETE only marks the namespace.
    let marked = c
        .request(Method::DELETE, "/api/v1/namespaces/team", None)
        .await
        .expect("delete");
    assert_eq!(marked["status"]["phase"], "Terminating");
    assert!(is_deleting(&marked));
    let ns = c
        .get("/api/v1/namespaces/team")
        .await
        .expect("get")
        .expect("still there while content remains");
    assert!(has_finalizer(&ns));
    // Nothing new may be created in it.
    let e = c
        .create(
            "/apis/apps/v1/namespaces/team/deployments",
            &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "late"},
                    "spec": {"selector": {"matchLabels": {"a": "b"}},
                             "template": {"metadata": {"labels": {"a": "b"}},
                                          "spec": {"containers": [{"name": "m", "image": "x"}]}}}}),
        )
        .await
        .expect_err("refused");
    assert_eq!(
        status_of(&e),
        (Some(403), "deployments.apps \"late\" is forbidden: unable to create new content in namespace team because it is being terminated".into())
    );
    // A main-resource update cannot drop the finalizer or revive the namespace.
    let mut edited = ns.clone();
    edited["spec"]["finalizers"] = json!([]);
    edited["status"]["phase"] = json!("Active");
    let after = c
        .update("/api/v1/namespaces/team", &edited)
        .await
        .expect("update");
    assert_eq!(
        (
            after["spec"]["finalizers"].clone(),
            after["status"]["phase"].clone()
        ),
        (json!(["kubernetes"]), json!("Terminating"))
    );

    let ctl = NamespaceController::new(c.clone());
    let action = ctl.reconcile("team").await.expect("reconcile");
    assert_eq!(
        action,
        Action::RequeueAfter(RECHECK),
        "held content remains"
    );
    for gone in [
        "/api/v1/namespaces/team/configmaps/c1",
        "/api/v1/namespaces/team/pods/p",
        "/api/v1/namespaces/team/services/web",
        "/apis/apps/v1/namespaces/team/deployments/d",
    ] {
        assert!(c.get(gone).await.expect("get").is_none(), "{gone} remains");
    }
    let ns = c
        .get("/api/v1/namespaces/team")
        .await
        .expect("get")
        .expect("namespace waits for the held config map");
    let conds = ns["status"]["conditions"].as_array().expect("conditions");
    assert_eq!(
        by_type(conds, "NamespaceContentRemaining")["message"],
        "Some resources are remaining: configmaps has 1 resource instances"
    );
    assert_eq!(
        by_type(conds, "NamespaceFinalizersRemaining")["status"],
        "True"
    );
    // Reconciling again changes nothing (idempotent).
    assert_eq!(
        ctl.reconcile("team").await.expect("again"),
        Action::RequeueAfter(RECHECK)
    );

    // The other finalizer's owner lets go: the config map goes, then the namespace.
    c.merge_patch(
        "/api/v1/namespaces/team/configmaps/held",
        &json!({"metadata": {"finalizers": null}}),
    )
    .await
    .expect("drop finalizer");
    assert_eq!(
        ctl.reconcile("team").await.expect("last pass"),
        Action::Done
    );
    assert!(
        c.get("/api/v1/namespaces/team")
            .await
            .expect("get")
            .is_none(),
        "namespace removed once finalized"
    );
    assert_eq!(
        ctl.reconcile("team").await.expect("gone"),
        Action::Done,
        "a deleted namespace is nothing to do"
    );
    // The name can be used again, empty.
    c.create(
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}),
    )
    .await
    .expect("recreate");
    let (cms, _) = c
        .list("/api/v1/namespaces/team/configmaps")
        .await
        .expect("list");
    assert!(cms.is_empty(), "{cms:?}");
    stop.cancel();
}

#[tokio::test]
async fn finalize_subresource_and_other_finalizers() {
    let (_dir, c, stop) = server().await;
    let ns = c
        .create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "keep", "finalizers": ["example.com/meta"]}}),
        )
        .await
        .expect("namespace");
    // A stale resourceVersion is a conflict.
    let mut stale = without_finalizer(&ns);
    stale["metadata"]["resourceVersion"] = json!("1");
    let e = c
        .update("/api/v1/namespaces/keep/finalize", &stale)
        .await
        .expect_err("stale");
    assert_eq!(e.code(), Some(409));
    // Only PUT is served on finalize.
    let e = c
        .merge_patch("/api/v1/namespaces/keep/finalize", &json!({}))
        .await
        .expect_err("patch");
    assert_eq!(e.code(), Some(405));
    // Finalizing an active namespace only rewrites spec.finalizers.
    let out = c
        .update("/api/v1/namespaces/keep/finalize", &without_finalizer(&ns))
        .await
        .expect("finalize");
    assert_eq!(out["spec"]["finalizers"], json!([]));
    assert_eq!(out["status"]["phase"], "Active");
    // With no spec finalizer left, DELETE marks it for metadata.finalizers only.
    let marked = c
        .request(Method::DELETE, "/api/v1/namespaces/keep", None)
        .await
        .expect("delete");
    assert!(is_deleting(&marked));
    c.merge_patch(
        "/api/v1/namespaces/keep",
        &json!({"metadata": {"finalizers": null}}),
    )
    .await
    .expect("drop metadata finalizer");
    assert!(
        c.get("/api/v1/namespaces/keep")
            .await
            .expect("get")
            .is_none()
    );
    stop.cancel();
}

/// Level-triggered: a namespace that turned Terminating while no controller ran is emptied and
/// removed once one starts, and a pod deletion wakes it at once.
#[tokio::test]
async fn a_started_controller_picks_up_terminating_namespaces() {
    let (_dir, c, stop) = server().await;
    c.create(
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "old"}}),
    )
    .await
    .expect("namespace");
    create_content(&c, "old").await;
    c.delete("/api/v1/namespaces/old", None)
        .await
        .expect("delete");
    let ctx = Arc::new(Context::new(c.clone(), ControllerConfig::default()));
    let pods = tokio::spawn(ctx.pods.clone().run(stop.clone()));
    let ctl = tokio::spawn(run(ctx, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.get("/api/v1/namespaces/old").await.expect("get") {
            None => break,
            Some(ns) => assert!(Instant::now() < deadline, "namespace not removed: {ns:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (deps, _) = c
        .list("/apis/apps/v1/namespaces/old/deployments")
        .await
        .expect("list");
    assert!(deps.is_empty());
    stop.cancel();
    let _ = tokio::join!(pods, ctl);
}
