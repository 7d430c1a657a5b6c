//! The real kubectl 1.37.1 (installed by scripts/kubectl) against an in-process server.

use anyhow::Context as _;
use std::time::Duration;

use crate::harness::Server;

const DEPLOY_V1: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web, tier: "front"}
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.25
        ports:
        - containerPort: 80
        env:
        - {name: A, value: "1"}
"#;

fn deploy_v2() -> String {
    DEPLOY_V1
        .replace("replicas: 1", "replicas: 2")
        .replace("nginx:1.25", "nginx:1.26")
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: p1
  labels: {app: "p"}
spec:
  containers:
  - name: c
    image: busybox:1.36
    resources:
      limits: {cpu: "1", memory: 64Mi}
"#;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
}

async fn apply_get_describe_scale_label_patch_delete(s: &Server) -> anyhow::Result<()> {
    // apply: create, then change.
    let out = s
        .kubectl_stdin(&["apply", "-f", "-"], DEPLOY_V1)
        .await?
        .ok()?;
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let out = s
        .kubectl_stdin(&["apply", "-f", "-"], &deploy_v2())
        .await?
        .ok()?;
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let d = json(
        &s.kubectl(&["get", "deploy", "web", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(d["spec"]["replicas"], 2);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:1.26");
    assert_eq!(
        c["ports"][0]["containerPort"], 80,
        "strategic merge kept the ports: {c}"
    );
    assert_eq!(c["imagePullPolicy"], "IfNotPresent", "defaulted");
    assert_eq!(d["metadata"]["generation"], 2);

    // get: table, wide, yaml, selectors.
    let out = s.kubectl(&["get", "deployments"]).await?.ok()?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{out}"
    );
    assert!(out.contains("web") && out.contains("0/2"), "{out}");
    let out = s.kubectl(&["get", "deploy", "-o", "wide"]).await?.ok()?;
    assert!(
        out.contains("CONTAINERS") && out.contains("nginx:1.26") && out.contains("app=web"),
        "{out}"
    );
    let out = s
        .kubectl(&["get", "deploy", "web", "-o", "yaml"])
        .await?
        .ok()?;
    assert!(
        out.contains("kind: Deployment") && out.contains("uid:"),
        "{out}"
    );
    let out = s
        .kubectl(&["get", "deploy", "-l", "tier=front"])
        .await?
        .ok()?;
    assert!(out.contains("web"), "{out}");
    let out = s
        .kubectl(&["get", "deploy", "-l", "tier in (back)"])
        .await?;
    assert!(out.stderr.contains("No resources found"), "{out:?}");

    // describe, scale, label, annotate.
    let out = s.kubectl(&["describe", "deployment", "web"]).await?.ok()?;
    assert!(
        out.contains("Name:") && out.contains("web") && out.contains("nginx:1.26"),
        "{out}"
    );
    let out = s
        .kubectl(&["scale", "deployment", "web", "--replicas=3"])
        .await?
        .ok()?;
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    let out = s
        .kubectl(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
        .await?
        .ok()?;
    assert_eq!(out.trim(), "3");
    s.kubectl(&["label", "deploy", "web", "env=prod"])
        .await?
        .ok()?;
    s.kubectl(&["annotate", "deploy", "web", "note=hello"])
        .await?
        .ok()?;
    let d = json(
        &s.kubectl(&["get", "deploy", "web", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(d["metadata"]["labels"]["env"], "prod");
    assert_eq!(d["metadata"]["annotations"]["note"], "hello");
    let out = s.kubectl(&["get", "deploy", "-l", "env!=prod"]).await?;
    assert!(out.stderr.contains("No resources found"), "{out:?}");

    // patch: all three types.
    s.kubectl(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"m":"1"}}}"#,
    ])
    .await?
    .ok()?;
    s.kubectl(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ])
    .await?
    .ok()?;
    s.kubectl(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"side","image":"busybox"}]}}}}"#,
    ])
    .await?
    .ok()?;
    let d = json(
        &s.kubectl(&["get", "deploy", "web", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(d["metadata"]["labels"]["m"], "1");
    assert_eq!(d["spec"]["replicas"], 4);
    let names: Vec<&str> = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        ["web", "side"],
        "strategic patch merged containers by name"
    );

    // api-resources and auth can-i.
    let out = s.kubectl(&["api-resources"]).await?.ok()?;
    for want in [
        "pods",
        "deployments",
        "leases",
        "runtimeclasses",
        "namespaces",
    ] {
        assert!(out.contains(want), "api-resources lacks {want}: {out}");
    }
    assert!(
        out.lines().any(|l| l.starts_with("pods")
            && l.contains("po")
            && l.contains("true")
            && l.contains("Pod")),
        "{out}"
    );
    let out = s.kubectl(&["auth", "can-i", "create", "pods"]).await?;
    assert_eq!(out.stdout.trim(), "yes", "{out:?}");

    // delete (with kubectl's wait).
    let out = s.kubectl(&["delete", "deployment", "web"]).await?.ok()?;
    assert!(out.contains("deleted"), "{out}");
    let out = s.kubectl(&["get", "deploy", "web"]).await?;
    assert!(out.code != 0 && out.stderr.contains("NotFound"), "{out:?}");
    Ok(())
}

async fn pods_table_wide_watch_events_delete(s: &Server) -> anyhow::Result<()> {
    let out = s.kubectl_stdin(&["create", "-f", "-"], POD).await?.ok()?;
    assert!(out.contains("pod/p1 created"), "{out}");
    let out = s.kubectl(&["get", "pods"]).await?.ok()?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{out}"
    );
    assert!(
        out.contains("p1") && out.contains("0/1") && out.contains("Pending"),
        "{out}"
    );
    let out = s.kubectl(&["get", "pods", "-o", "wide"]).await?.ok()?;
    assert!(
        out.contains("IP") && out.contains("NODE") && out.contains("<none>"),
        "{out}"
    );
    let pod = json(&s.kubectl(&["get", "pod", "p1", "-o", "json"]).await?.ok()?);
    assert_eq!(pod["status"]["qosClass"], "Guaranteed");
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["dnsPolicy"], "ClusterFirst");

    // An event about the pod shows in describe and get events.
    let ev = format!(
        r#"{{"apiVersion":"v1","kind":"Event","metadata":{{"name":"p1.1"}},"involvedObject":{{"kind":"Pod","namespace":"default","name":"p1","uid":{}}},"reason":"Scheduled","message":"assigned to n1","type":"Normal","count":1,"firstTimestamp":"2026-01-01T00:00:00Z","lastTimestamp":"2026-01-01T00:00:00Z","source":{{"component":"scheduler"}}}}"#,
        pod["metadata"]["uid"]
    );
    s.kubectl_stdin(&["create", "-f", "-"], &ev).await?.ok()?;
    let out = s.kubectl(&["describe", "pod", "p1"]).await?.ok()?;
    assert!(
        out.contains("QoS Class:") && out.contains("Guaranteed"),
        "{out}"
    );
    assert!(
        out.contains("Scheduled") && out.contains("assigned to n1"),
        "describe shows events: {out}"
    );
    let out = s.kubectl(&["get", "events"]).await?.ok()?;
    assert!(out.contains("Scheduled") && out.contains("pod/p1"), "{out}");

    // get -w for a bounded time, with a create during the watch.
    let watcher = {
        let kubeconfig = s.kubeconfig.clone();
        let sref = &s;
        async move {
            sref.kubectl_as(
                &kubeconfig,
                &["get", "pods", "-w", "--request-timeout=6s"],
                None,
            )
            .await
        }
    };
    let creator = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.kubectl_stdin(&["create", "-f", "-"], &POD.replace("name: p1", "name: p2"))
            .await
    };
    let (w, c) = tokio::join!(watcher, creator);
    c?.ok()?;
    let w = w?;
    assert!(
        w.stdout.contains("p1") && w.stdout.contains("p2"),
        "watch saw the new pod: {w:?}"
    );

    // Deletion: unbound pods go at once; kubectl's wait sees the 404.
    let out = s.kubectl(&["delete", "pod", "p2"]).await?.ok()?;
    assert!(out.contains("pod \"p2\" deleted"), "{out}");
    // A bound pod is only marked (the node agent finishes it); --force --grace-period=0 removes it.
    let bind = r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"p1"},"target":{"kind":"Node","name":"n1"}}"#;
    let r = s
        .http(
            "POST",
            "/api/v1/namespaces/default/pods/p1/binding",
            &[("Content-Type", "application/json")],
            bind.as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let out = s
        .kubectl(&["delete", "pod", "p1", "--wait=false"])
        .await?
        .ok()?;
    assert!(out.contains("deleted"), "{out}");
    let out = s.kubectl(&["get", "pods"]).await?.ok()?;
    assert!(out.contains("Terminating"), "{out}");
    s.kubectl(&["delete", "pod", "p1", "--force", "--grace-period=0"])
        .await?
        .ok()?;
    let out = s.kubectl(&["get", "pods"]).await?;
    assert!(out.stderr.contains("No resources found"), "{out:?}");
    Ok(())
}

async fn server_side_apply_and_errors(s: &Server) -> anyhow::Result<()> {
    // --server-side creates when absent, then changes.
    let out = s
        .kubectl_stdin(&["apply", "--server-side", "-f", "-"], DEPLOY_V1)
        .await?
        .ok()?;
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    s.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &deploy_v2())
        .await?
        .ok()?;
    let d = json(
        &s.kubectl(&["get", "deploy", "web", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.26"
    );

    // Conflict: replace with a stale resourceVersion.
    let mut stale = d.clone();
    stale["metadata"]["resourceVersion"] = serde_json::json!("1");
    let out = s
        .kubectl_stdin(&["replace", "-f", "-"], &stale.to_string())
        .await?;
    assert!(
        out.code != 0
            && out.stderr.contains("Conflict")
            && out.stderr.contains("the object has been modified"),
        "{out:?}"
    );

    // AlreadyExists.
    let out = s.kubectl_stdin(&["create", "-f", "-"], DEPLOY_V1).await?;
    assert!(
        out.stderr.contains("AlreadyExists") && out.stderr.contains("already exists"),
        "{out:?}"
    );

    // Invalid manifest: every cause with its field path.
    let bad = POD
        .replace("image: busybox:1.36", "ports: [{containerPort: 70000}]")
        .replace("name: p1", "name: Bad_Name");
    let out = s.kubectl_stdin(&["create", "-f", "-"], &bad).await?;
    assert!(out.code != 0 && out.stderr.contains("Invalid"), "{out:?}");
    for field in [
        "metadata.name",
        "spec.containers[0].image",
        "spec.containers[0].ports[0].containerPort",
    ] {
        assert!(
            out.stderr.contains(field),
            "missing {field}: {}",
            out.stderr
        );
    }
    // Unknown field with kubectl's default fieldValidation=Strict.
    let out = s
        .kubectl_stdin(
            &["create", "-f", "-"],
            &POD.replace("  containers:", "  bogusField: 1\n  containers:"),
        )
        .await?;
    assert!(
        out.code != 0 && out.stderr.contains("unknown field \"spec.bogusField\""),
        "{out:?}"
    );

    // 401 with a bad token; 403 for a node token outside its rights; read-only cannot write.
    let bad = s.kubeconfig_with("bad.yaml", "not-a-token")?;
    let out = s.kubectl_as(&bad, &["get", "pods"], None).await?;
    assert!(
        out.code != 0 && out.stderr.contains("Unauthorized"),
        "{out:?}"
    );
    let node = s.kubeconfig_with("node.yaml", &s.pki.node_token("n1"))?;
    let out = s.kubectl_as(&node, &["get", "secrets"], None).await?;
    assert!(
        out.code != 0 && out.stderr.contains("Forbidden") && out.stderr.contains("system:node:n1"),
        "{out:?}"
    );
    let out = s
        .kubectl_as(&node, &["auth", "can-i", "list", "pods"], None)
        .await?;
    assert_eq!(out.stdout.trim(), "no", "{out:?}");
    let ro = s.kubeconfig_with("ro.yaml", &s.readonly_token)?;
    let out = s.kubectl_as(&ro, &["get", "deploy"], None).await?.ok()?;
    assert!(out.contains("web"), "{out}");
    let out = s
        .kubectl_as(&ro, &["delete", "deploy", "web"], None)
        .await?;
    assert!(out.code != 0 && out.stderr.contains("Forbidden"), "{out:?}");
    Ok(())
}

/// Server-side apply with field ownership: managedFields per manager, a conflicting
/// `--field-manager` refused with Kubernetes' message, `--force-conflicts` taking the field
/// over, and fields the sole owner stops applying removed.
async fn server_side_apply_field_ownership(s: &Server) -> anyhow::Result<()> {
    s.kubectl_stdin(&["apply", "--server-side", "-f", "-"], DEPLOY_V1)
        .await?
        .ok()?;
    let get = || async {
        anyhow::Ok(json(
            &s.kubectl(&[
                "get",
                "deploy",
                "web",
                "-o",
                "json",
                "--show-managed-fields",
            ])
            .await?
            .ok()?,
        ))
    };
    let managers = |d: &serde_json::Value| -> Vec<(String, String)> {
        d["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["manager"].as_str().unwrap_or("").to_string(),
                    e["operation"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let entry = |d: &serde_json::Value, m: &str| -> serde_json::Value {
        d["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["manager"] == m)
            .cloned()
            .unwrap_or_default()
    };
    let d = get().await?;
    assert_eq!(
        managers(&d),
        vec![("kubectl".into(), "Apply".into())],
        "{d}"
    );
    let mine = entry(&d, "kubectl");
    assert_eq!(mine["fieldsType"], "FieldsV1");
    assert_eq!(mine["apiVersion"], "apps/v1");
    assert!(
        mine["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{mine}"
    );
    let f = &mine["fieldsV1"];
    assert_eq!(f["f:spec"]["f:replicas"], serde_json::json!({}), "{f}");
    assert_eq!(
        f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["f:image"],
        serde_json::json!({}),
        "{f}"
    );
    assert_eq!(
        f["f:metadata"]["f:labels"]["f:tier"],
        serde_json::json!({}),
        "{f}"
    );
    assert!(
        f["f:metadata"].get("f:name").is_none(),
        "server fields are nobody's: {f}"
    );

    // Another manager changing replicas conflicts...
    let replicas3 =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n";
    let out = s
        .kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--field-manager=scaler",
                "-f",
                "-",
            ],
            replicas3,
        )
        .await?;
    assert!(
        out.code != 0
            && out.stderr.contains(
                "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.replicas"
            ),
        "{out:?}"
    );
    assert_eq!(get().await?["spec"]["replicas"], 1);
    // ... setting a field to the value it already has is shared ownership, not a conflict ...
    s.kubectl_stdin(
        &["apply", "--server-side", "--field-manager=labeler", "-f", "-"],
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {tier: \"front\"}\n",
    )
    .await?
    .ok()?;
    // ... and --force-conflicts takes the field over.
    s.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=scaler",
            "--force-conflicts",
            "-f",
            "-",
        ],
        replicas3,
    )
    .await?
    .ok()?;
    let d = get().await?;
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(
        entry(&d, "scaler")["fieldsV1"]["f:spec"]["f:replicas"],
        serde_json::json!({})
    );
    assert!(
        entry(&d, "kubectl")["fieldsV1"]["f:spec"]
            .get("f:replicas")
            .is_none(),
        "{d}"
    );

    // kubectl re-applies without replicas, the tier label and the env var: replicas and tier
    // stay (owned by scaler and labeler), the env var (owned by kubectl alone) goes.
    let v3 = DEPLOY_V1
        .replace("  replicas: 1\n", "")
        .replace(", tier: \"front\"", "")
        .replace("        env:\n        - {name: A, value: \"1\"}\n", "");
    assert!(!v3.contains("replicas") && !v3.contains("env"), "{v3}");
    s.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &v3)
        .await?
        .ok()?;
    let d = get().await?;
    assert_eq!(d["spec"]["replicas"], 3, "{d}");
    assert_eq!(d["metadata"]["labels"]["tier"], "front", "{d}");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c.get("env").is_none(),
        "env removed with its only owner: {c}"
    );
    assert_eq!(c["ports"][0]["containerPort"], 80, "{c}");

    // An Update (kubectl label) records its own entry and takes the field.
    s.kubectl(&["label", "deploy", "web", "tier=back", "--overwrite"])
        .await?
        .ok()?;
    let d = get().await?;
    assert!(
        managers(&d).contains(&("kubectl-label".into(), "Update".into())),
        "{:?}",
        managers(&d)
    );
    assert!(
        entry(&d, "labeler")["fieldsV1"].is_null()
            || entry(&d, "labeler")["fieldsV1"]["f:metadata"]["f:labels"]
                .get("f:tier")
                .is_none(),
        "{d}"
    );

    // Apply without a field manager is refused, as Kubernetes does.
    let r = s
        .http(
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/web",
            &[("Content-Type", "application/apply-patch+yaml")],
            br#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web"}}"#,
        )
        .await?;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "fieldManager is required for apply requests"
    );
    Ok(())
}

/// kubectl's typed clients send protobuf bodies (`create deployment`, `run`, `create
/// namespace|configmap|secret`, `expose`).
async fn imperative_commands_send_protobuf(s: &Server) -> anyhow::Result<()> {
    s.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=nginx:1.25",
        "--replicas=2",
        "--port=80",
    ])
    .await?
    .ok()?;
    s.kubectl(&[
        "run",
        "p1",
        "--image=busybox",
        "--labels=app=p",
        "--",
        "sleep",
        "10",
    ])
    .await?
    .ok()?;
    s.kubectl(&["create", "namespace", "team"]).await?.ok()?;
    s.kubectl(&["create", "configmap", "c1", "--from-literal=a=1"])
        .await?
        .ok()?;
    s.kubectl(&["create", "secret", "generic", "s1", "--from-literal=pw=x"])
        .await?
        .ok()?;
    let out = s
        .kubectl(&[
            "expose",
            "deployment",
            "web",
            "--port=8080",
            "--target-port=80",
        ])
        .await?
        .ok()?;
    assert!(out.contains("service/web exposed"), "{out}");
    let d = json(
        &s.kubectl(&["get", "deploy", "web", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        (c["image"].as_str(), c["ports"][0]["containerPort"].as_i64()),
        (Some("nginx:1.25"), Some(80))
    );
    assert!(
        c["ports"][0].get("hostPort").is_none(),
        "Go zero values are left out: {c}"
    );
    let p = json(&s.kubectl(&["get", "pod", "p1", "-o", "json"]).await?.ok()?);
    assert_eq!(
        p["spec"]["containers"][0]["args"],
        serde_json::json!(["sleep", "10"])
    );
    assert_eq!(p["metadata"]["labels"]["app"], "p");
    assert_eq!(p["status"]["phase"], "Pending");
    let ns = json(
        &s.kubectl(&["get", "ns", "team", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(ns["status"]["phase"], "Active");
    let cm = json(&s.kubectl(&["get", "cm", "c1", "-o", "json"]).await?.ok()?);
    assert_eq!(cm["data"]["a"], "1");
    let sec = json(
        &s.kubectl(&["get", "secret", "s1", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(sec["data"]["pw"], "eA==");
    let svc = json(
        &s.kubectl(&["get", "svc", "web", "-o", "json"])
            .await?
            .ok()?,
    );
    assert_eq!(
        (
            svc["spec"]["ports"][0]["port"].as_i64(),
            svc["spec"]["ports"][0]["targetPort"].as_i64()
        ),
        (Some(8080), Some(80))
    );
    assert_eq!(svc["spec"]["selector"]["app"], "web");
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ip.starts_with("10.9") || ip.starts_with("10.10") || ip.starts_with("10.11"),
        "cluster IP allocated in 10.96.0.0/12: {ip}"
    );
    let out = s.kubectl(&["get", "svc", "web"]).await?.ok()?;
    assert!(out.contains(&ip) && out.contains("8080/TCP"), "{out}");
    s.kubectl(&[
        "expose",
        "deployment",
        "web",
        "--name=web-np",
        "--type=NodePort",
        "--port=80",
    ])
    .await?
    .ok()?;
    let np = json(
        &s.kubectl(&["get", "svc", "web-np", "-o", "json"])
            .await?
            .ok()?,
    );
    let port = np["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .unwrap_or_default();
    assert!((30000..=32767).contains(&port), "{np}");
    assert_ne!(np["spec"]["clusterIP"], svc["spec"]["clusterIP"]);
    Ok(())
}

crate::on_both_stores!(
    imperative_commands_send_protobuf,
    apply_get_describe_scale_label_patch_delete,
    pods_table_wide_watch_events_delete,
    server_side_apply_and_errors,
    server_side_apply_field_ownership
);

/// The audit log (`--audit-log-path`, default policy: every request at Metadata level) records
/// what kubectl and other clients did, who did it and how it ended, as Kubernetes' audit
/// events: successes, conflicts, denials, unauthenticated requests and a watch's two stages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_requests() -> anyhow::Result<()> {
    let s = crate::harness::start().await?;
    s.kubectl(&["create", "configmap", "audited", "--from-literal=k=v"])
        .await?
        .ok()?;
    s.kubectl(&["get", "configmap", "audited", "-o", "name"])
        .await?
        .ok()?;
    let again = s
        .kubectl(&["create", "configmap", "audited", "--from-literal=k=v"])
        .await?;
    assert_ne!(again.code, 0, "{again:?}");
    let viewer = s.kubeconfig_with("viewer.yaml", &s.readonly_token)?;
    let denied = s
        .kubectl_as(&viewer, &["delete", "configmap", "audited"], None)
        .await?;
    assert_ne!(denied.code, 0, "{denied:?}");
    let anonymous = s
        .http_as(None, "GET", "/api/v1/namespaces/default/secrets", &[], b"")
        .await?;
    assert_eq!(anonymous.status, 401);
    let anonymous_id = anonymous
        .header("audit-id")
        .context("a 401 carries its Audit-Id")?
        .to_owned();
    // A watch that the server ends after a second: both of its stages.
    let watch = s
        .http(
            "GET",
            "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1",
            &[],
            b"",
        )
        .await?;
    assert_eq!(watch.status, 200);
    let watch_id = watch.header("audit-id").context("Audit-Id")?.to_owned();
    s.kubectl(&["delete", "configmap", "audited"]).await?.ok()?;

    // The writer thread appends shortly after each answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = s.audit_events()?;
        let deleted = events.iter().any(|e| {
            e["verb"] == "delete"
                && e["user"]["username"] == "admin"
                && e["stage"] == "ResponseComplete"
        });
        if deleted || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let find = |what: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .find(|e| f(e))
            .cloned()
            .with_context(|| format!("no audit event for {what} in {events:#?}"))
    };
    let configmap = |e: &serde_json::Value| {
        e["objectRef"]["resource"] == "configmaps" && e["objectRef"]["namespace"] == "default"
    };
    for e in &events {
        assert_eq!(e["kind"], "Event");
        assert_eq!(e["apiVersion"], "audit.k8s.io/v1");
        assert_eq!(e["level"], "Metadata");
        assert_ne!(
            e["stage"], "RequestReceived",
            "omitted by the default policy"
        );
        assert!(
            e["auditID"].as_str().is_some_and(|id| id.len() == 36),
            "{e}"
        );
        assert!(e["requestReceivedTimestamp"].is_string() && e["stageTimestamp"].is_string());
    }
    let created = find("the create", &|e| {
        configmap(e) && e["verb"] == "create" && e["responseStatus"]["code"] == 201
    })?;
    assert_eq!(created["user"]["username"], "admin");
    assert!(
        created["user"]["groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g == "system:masters")),
        "{created}"
    );
    assert!(
        created["userAgent"]
            .as_str()
            .is_some_and(|a| a.starts_with("kubectl")),
        "{created}"
    );
    assert_eq!(created["sourceIPs"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(created["objectRef"]["apiVersion"], "v1");
    assert_eq!(
        created["objectRef"]["name"], "audited",
        "a create names its object"
    );
    assert_eq!(created["stage"], "ResponseComplete");
    assert!(
        created.get("requestObject").is_none(),
        "Metadata level has no bodies"
    );
    find("the get", &|e| {
        configmap(e)
            && e["verb"] == "get"
            && e["objectRef"]["name"] == "audited"
            && e["responseStatus"]["code"] == 200
    })?;
    let conflict = find("the second create", &|e| {
        configmap(e) && e["verb"] == "create" && e["responseStatus"]["code"] == 409
    })?;
    assert_eq!(conflict["responseStatus"]["reason"], "AlreadyExists");
    assert_eq!(conflict["responseStatus"]["status"], "Failure");
    let forbidden = find("the viewer's delete", &|e| {
        configmap(e) && e["verb"] == "delete" && e["user"]["username"] == "viewer"
    })?;
    assert_eq!(forbidden["responseStatus"]["code"], 403);
    assert_eq!(forbidden["responseStatus"]["reason"], "Forbidden");
    let unauthenticated = find("the request without credentials", &|e| {
        e["auditID"] == anonymous_id.as_str()
    })?;
    assert_eq!(unauthenticated["responseStatus"]["code"], 401);
    assert_eq!(unauthenticated["stage"], "ResponseStarted");
    assert_eq!(unauthenticated["user"], serde_json::json!({}));
    assert_eq!(unauthenticated["verb"], "list");
    assert_eq!(unauthenticated["objectRef"]["resource"], "secrets");
    let watch_stages: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["auditID"] == watch_id.as_str())
        .map(|e| &e["stage"])
        .collect();
    assert_eq!(
        watch_stages,
        ["ResponseStarted", "ResponseComplete"],
        "the watch's stages"
    );
    find("the admin's delete", &|e| {
        configmap(e)
            && e["verb"] == "delete"
            && e["user"]["username"] == "admin"
            && e["responseStatus"]["code"] == 200
    })?;
    Ok(())
}
