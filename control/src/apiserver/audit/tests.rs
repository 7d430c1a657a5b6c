use super::*;

fn info(method: Method, uri: &str) -> RequestInfo {
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (uri, None),
    };
    RequestInfo::parse(&method, path, query)
}

fn obj(
    group: &str,
    version: &str,
    resource: &str,
    ns: Option<&str>,
    name: Option<&str>,
    sub: Option<&str>,
) -> Option<ObjectRef> {
    Some(ObjectRef {
        resource: resource.into(),
        namespace: ns.map(Into::into),
        name: name.map(Into::into),
        api_group: group.into(),
        api_version: version.into(),
        subresource: sub.map(Into::into),
    })
}

#[test]
fn request_info_follows_kubernetes() {
    let cases = [
        (
            Method::GET,
            "/api/v1/namespaces/default/pods",
            "list",
            obj("", "v1", "pods", Some("default"), None, None),
            false,
        ),
        (
            Method::GET,
            "/api/v1/namespaces/default/pods/web",
            "get",
            obj("", "v1", "pods", Some("default"), Some("web"), None),
            false,
        ),
        (
            Method::GET,
            "/api/v1/pods?watch=true&resourceVersion=5",
            "watch",
            obj("", "v1", "pods", None, None, None),
            true,
        ),
        (
            Method::GET,
            "/api/v1/watch/namespaces/a/pods",
            "watch",
            obj("", "v1", "pods", Some("a"), None, None),
            true,
        ),
        (
            Method::POST,
            "/apis/apps/v1/namespaces/a/deployments",
            "create",
            obj("apps", "v1", "deployments", Some("a"), None, None),
            false,
        ),
        (
            Method::PUT,
            "/apis/apps/v1/namespaces/a/deployments/d/scale",
            "update",
            obj(
                "apps",
                "v1",
                "deployments",
                Some("a"),
                Some("d"),
                Some("scale"),
            ),
            false,
        ),
        (
            Method::PATCH,
            "/api/v1/nodes/n1/status",
            "patch",
            obj("", "v1", "nodes", None, Some("n1"), Some("status")),
            false,
        ),
        (
            Method::DELETE,
            "/api/v1/namespaces/a/configmaps",
            "deletecollection",
            obj("", "v1", "configmaps", Some("a"), None, None),
            false,
        ),
        (
            Method::DELETE,
            "/api/v1/namespaces/a",
            "delete",
            obj("", "v1", "namespaces", Some("a"), Some("a"), None),
            false,
        ),
        (
            Method::PUT,
            "/api/v1/namespaces/a/finalize",
            "update",
            obj(
                "",
                "v1",
                "namespaces",
                Some("a"),
                Some("a"),
                Some("finalize"),
            ),
            false,
        ),
        (
            Method::GET,
            "/api/v1/namespaces",
            "list",
            obj("", "v1", "namespaces", None, None, None),
            false,
        ),
        (
            Method::GET,
            "/api/v1/namespaces/a/pods/p/log?follow=true",
            "get",
            obj("", "v1", "pods", Some("a"), Some("p"), Some("log")),
            true,
        ),
        (
            Method::GET,
            "/api/v1/namespaces/a/pods/p/log",
            "get",
            obj("", "v1", "pods", Some("a"), Some("p"), Some("log")),
            false,
        ),
        (
            Method::POST,
            "/api/v1/namespaces/a/pods/p/exec?command=ls",
            "create",
            obj("", "v1", "pods", Some("a"), Some("p"), Some("exec")),
            true,
        ),
        (Method::GET, "/healthz", "get", None, false),
        (Method::GET, "/api", "get", None, false),
        (Method::GET, "/apis/apps/v1", "get", None, false),
        (Method::POST, "/version", "post", None, false),
    ];
    for (method, uri, verb, object, long_running) in cases {
        let got = info(method, uri);
        assert_eq!(got.verb, verb, "{uri}");
        assert_eq!(got.object, object, "{uri}");
        assert_eq!(got.long_running, long_running, "{uri}");
    }
}

const POLICY: &str = r#"
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    users: ["system:node:n1"]
    verbs: ["watch"]
  - level: None
    nonResourceURLs: ["/healthz*", "/version"]
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "configmaps"]
  - level: RequestResponse
    namespaces: ["prod"]
    resources:
      - group: "apps"
        resources: ["deployments/scale", "*/status"]
    omitStages: ["ResponseStarted"]
  - level: Request
    userGroups: ["system:nodes"]
  - level: Metadata
    resources:
      - group: ""
        resources: ["pods"]
        resourceNames: ["special"]
  - level: Metadata
    namespaces: [""]
"#;

fn user(name: &str, groups: &[&str]) -> UserInfo {
    UserInfo {
        username: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

#[test]
fn policy_rules_match_in_order() {
    let p = Policy::parse(POLICY).expect("policy");
    let admin = user("admin", &["system:masters"]);
    let node = user("system:node:n1", &["system:nodes"]);
    let level = |u: &UserInfo, m: Method, uri: &str| p.evaluate(u, &info(m, uri)).0;
    assert_eq!(
        level(&node, Method::GET, "/api/v1/pods?watch=1"),
        Level::None
    );
    assert_eq!(level(&node, Method::GET, "/api/v1/pods"), Level::Request);
    assert_eq!(level(&admin, Method::GET, "/healthz/ready"), Level::None);
    assert_eq!(level(&admin, Method::GET, "/version"), Level::None);
    // `/version` is exact; no later rule is about non-resource URLs.
    assert_eq!(level(&admin, Method::GET, "/versions"), Level::None);
    assert_eq!(level(&node, Method::GET, "/versions"), Level::Request);
    assert_eq!(
        level(&admin, Method::GET, "/api/v1/namespaces/a/secrets/s"),
        Level::Metadata
    );
    assert_eq!(
        level(
            &admin,
            Method::PUT,
            "/apis/apps/v1/namespaces/prod/deployments/d/scale"
        ),
        Level::RequestResponse
    );
    assert_eq!(
        level(
            &admin,
            Method::PATCH,
            "/apis/apps/v1/namespaces/prod/replicasets/r/status"
        ),
        Level::RequestResponse
    );
    // Same resource, another namespace: no rule left but the cluster-scoped one.
    assert_eq!(
        level(
            &admin,
            Method::PUT,
            "/apis/apps/v1/namespaces/dev/deployments/d/scale"
        ),
        Level::None
    );
    assert_eq!(
        level(&admin, Method::GET, "/api/v1/namespaces/a/pods/special"),
        Level::Metadata
    );
    assert_eq!(
        level(&admin, Method::GET, "/api/v1/namespaces/a/pods/other"),
        Level::None
    );
    assert_eq!(
        level(&admin, Method::GET, "/api/v1/nodes/n1"),
        Level::Metadata
    );
    // Stages: the policy's and the rule's.
    let (_, omit, _) = p.evaluate(
        &admin,
        &info(
            Method::PUT,
            "/apis/apps/v1/namespaces/prod/deployments/d/scale",
        ),
    );
    assert!(omit.contains(&Stage::RequestReceived) && omit.contains(&Stage::ResponseStarted));
}

#[test]
fn bad_policies_are_refused_with_the_reason() {
    let err = |text: &str| Policy::parse(text).expect_err(text);
    assert!(err("apiVersion: audit.k8s.io/v1\nkind: Pod\n").contains("kind"));
    assert!(err("apiVersion: v1\nkind: Policy\n").contains("apiVersion"));
    assert!(
        err("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Loud\n").contains("Loud")
    );
    assert!(
        err("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: None\n  verb: [get]\n")
            .contains("verb")
    );
    assert!(
        err("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: None\n  nonResourceURLs: [/x]\n  namespaces: [a]\n")
            .contains("nonResourceURLs")
    );
    let dir = tempfile::tempdir().expect("dir");
    let missing = Policy::from_file(&dir.path().join("none.yaml")).expect_err("missing");
    assert!(missing.to_string().contains("none.yaml"), "{missing}");
}

#[test]
fn events_have_the_kubernetes_shape() {
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let record = Record {
        auditor: Arc::new(Auditor {
            policy: Policy::metadata_for_all(),
            lines: tx,
        }),
        level: Level::Request,
        omit: vec![],
        omit_managed_fields: true,
        audit_id: "id-1".into(),
        request_uri: "/api/v1/namespaces/a/configmaps?fieldManager=x".into(),
        user: user("admin", &["system:masters", "system:authenticated"]),
        source_ips: vec!["127.0.0.1".into()],
        user_agent: Some("kubectl/v1.37.1".into()),
        info: info(Method::POST, "/api/v1/namespaces/a/configmaps"),
        request_object: body_object(
            Some(&HeaderValue::from_static("application/json")),
            br#"{"kind":"ConfigMap","metadata":{"name":"c","managedFields":[{}]}}"#,
            true,
        ),
        received: "2026-11-30T12:00:00.000000Z".into(),
    };
    let status = ResponseStatus {
        metadata: json!({}),
        failure: Some(Failure {
            status: "Failure",
            message: "configmaps \"c\" already exists".into(),
            reason: "AlreadyExists",
        }),
        code: 409,
    };
    let v = serde_json::to_value(record.event(Stage::ResponseComplete, Some(status), None))
        .expect("json");
    assert_eq!(v["kind"], "Event");
    assert_eq!(v["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(v["level"], "Request");
    assert_eq!(v["auditID"], "id-1");
    assert_eq!(v["stage"], "ResponseComplete");
    assert_eq!(v["verb"], "create");
    assert_eq!(
        v["requestURI"],
        "/api/v1/namespaces/a/configmaps?fieldManager=x"
    );
    assert_eq!(v["user"]["username"], "admin");
    assert_eq!(v["sourceIPs"], json!(["127.0.0.1"]));
    assert_eq!(v["userAgent"], "kubectl/v1.37.1");
    assert_eq!(
        v["objectRef"],
        json!({"resource": "configmaps", "namespace": "a", "apiGroup": "", "apiVersion": "v1"})
    );
    assert_eq!(v["responseStatus"]["code"], 409);
    assert_eq!(v["responseStatus"]["reason"], "AlreadyExists");
    assert_eq!(v["requestObject"]["metadata"], json!({"name": "c"}));
    assert!(v.get("responseObject").is_none());
    assert!(
        v["stageTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
}

#[test]
fn log_file_rotates_and_keeps_the_newest_backups() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("logs/audit.log");
    let mut cfg = AuditConfig::new(&path);
    cfg.max_size_mb = 1;
    cfg.max_backups = 2;
    let mut f = LogFile::open(&cfg).expect("open");
    f.max_bytes = 100;
    for i in 0..10 {
        f.write_line(format!("{i:049}\n").as_bytes())
            .expect("write");
        f.flush().expect("flush");
        // Backup names carry milliseconds.
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("logs"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names[0].starts_with("audit-") && names[0].ends_with(".log"),
        "{names:?}"
    );
    assert_eq!(names[2], "audit.log");
    let current = std::fs::read_to_string(&path).expect("read");
    assert_eq!(current, format!("{:049}\n{:049}\n", 8, 9));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The layer itself, on a router with a stand-in handler: bodies at `RequestResponse`, the
/// `RequestReceived` stage when the policy keeps it, a watch's two stages, 413 at `Request`.
#[tokio::test]
async fn layer_records_bodies_and_stages_as_the_policy_says() {
    use axum::Router;
    use tower::ServiceExt as _;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("audit.log");
    let mut cfg = AuditConfig::new(&path);
    cfg.policy = Policy::parse(
        r#"
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: RequestResponse
    resources: [{group: "", resources: ["configmaps"]}]
  - level: Request
    resources: [{group: "", resources: ["secrets"]}]
    omitStages: ["RequestReceived"]
  - level: Metadata
    omitStages: ["RequestReceived"]
"#,
    )
    .expect("policy");
    let auditor = Auditor::start(&cfg).expect("auditor");
    let app = Router::new()
        .fallback(|req: Request| async move {
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            let body = super::super::limits::read_all(req.into_body()).await;
            match body {
                Err(e) => e.into_response(),
                Ok(_) if watch => {
                    let events = futures::stream::iter(
                        [r#"{"type":"ADDED"}"#, r#"{"type":"MODIFIED"}"#]
                            .map(|e| Ok::<_, std::io::Error>(Bytes::from(e))),
                    );
                    Response::new(Body::from_stream(events))
                }
                Ok(_) => {
                    let mut r = Response::new(Body::from(
                        r#"{"kind":"ConfigMap","metadata":{"name":"c","managedFields":[{}]}}"#,
                    ));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    r
                }
            }
        })
        .layer(axum::middleware::from_fn(super::super::limits::body_limit))
        .layer(axum::middleware::from_fn_with_state(
            Some(auditor.clone()),
            audit,
        ))
        .layer(axum::middleware::from_fn(
            |mut req: Request, next: Next| async move {
                req.extensions_mut().insert(Identity::Admin);
                next.run(req).await
            },
        ));
    let call = |method: Method, uri: &str, body: Body| {
        let app = app.clone();
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("request");
        async move {
            let resp = app.oneshot(req).await.expect("infallible");
            let id = resp
                .headers()
                .get("audit-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let code = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("body");
            (code, id, body)
        }
    };
    let (code, created, body) = call(
        Method::POST,
        "/api/v1/namespaces/a/configmaps",
        Body::from(r#"{"kind":"ConfigMap","metadata":{"name":"c"},"data":{"k":"v"}}"#),
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        body.starts_with(b"{\"kind\":\"ConfigMap\""),
        "the client still gets the body"
    );
    let (_, secret, _) = call(
        Method::PUT,
        "/api/v1/namespaces/a/secrets/s",
        Body::from(r#"{"kind":"Secret","metadata":{"name":"s"}}"#),
    )
    .await;
    let (code, big, _) = call(
        Method::POST,
        "/api/v1/namespaces/a/secrets",
        Body::from(vec![b' '; super::super::limits::MAX_BODY_BYTES + 1]),
    )
    .await;
    assert_eq!(code, 413);
    let (code, watch, body) = call(Method::GET, "/api/v1/pods?watch=true", Body::empty()).await;
    assert_eq!((code, body.len()), (200, 35));
    drop(auditor);
    drop(app);

    let mut events: Vec<Value> = Vec::new();
    for _ in 0..100 {
        events = std::fs::read_to_string(&path)
            .expect("log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        if events.len() >= 6 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let of = |id: &str| -> Vec<&Value> { events.iter().filter(|e| e["auditID"] == id).collect() };
    let c = of(&created);
    assert_eq!(c.len(), 2, "{c:#?}");
    assert_eq!(c[0]["stage"], "RequestReceived");
    assert!(c[0].get("responseStatus").is_none());
    assert_eq!(c[1]["stage"], "ResponseComplete");
    assert_eq!(c[1]["level"], "RequestResponse");
    assert_eq!(c[1]["requestObject"]["data"], json!({"k": "v"}));
    assert_eq!(c[1]["responseObject"]["metadata"]["name"], "c");
    let s = of(&secret);
    assert_eq!(s.len(), 1, "{s:#?}");
    assert_eq!(s[0]["level"], "Request");
    assert_eq!(s[0]["requestObject"]["kind"], "Secret");
    assert!(s[0].get("responseObject").is_none());
    let b = of(&big);
    assert_eq!(b.len(), 1, "{b:#?}");
    assert_eq!(b[0]["responseStatus"]["code"], 413);
    assert_eq!(b[0]["responseStatus"]["reason"], "RequestEntityTooLarge");
    let w: Vec<&Value> = of(&watch).into_iter().map(|e| &e["stage"]).collect();
    assert_eq!(w, [&json!("ResponseStarted"), &json!("ResponseComplete")]);
}
