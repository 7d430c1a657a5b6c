//! Exact REST semantics over HTTPS with tokens: status codes, selectors, paging, watch,
//! graceful deletion, finalizers, node and read-only roles.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::Server;

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

async fn post(s: &Server, path: &str, v: &Value) -> anyhow::Result<crate::harness::Resp> {
    s.http("POST", path, &[JSON], v.to_string().as_bytes())
        .await
}

async fn post_v(s: &Server, path: &str, v: Value) -> anyhow::Result<crate::harness::Resp> {
    post(s, path, &v).await
}

async fn status_codes(s: &Server) -> anyhow::Result<()> {
    let pods = "/api/v1/namespaces/default/pods";

    // 401 without credentials; public health endpoints stay open.
    let r = s.http_as(None, "GET", pods, &[], b"").await?;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["reason"], "Unauthorized");
    assert_eq!(
        s.http_as(None, "GET", "/healthz", &[], b"").await?.status,
        200
    );
    assert_eq!(
        s.http_as(None, "GET", "/readyz", &[], b"").await?.status,
        200
    );

    // 400 names the problem.
    let r = s
        .http("POST", pods, &[JSON], b"{\"apiVersion\": \"v1\", ")
        .await?;
    assert_eq!(r.status, 400);
    let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("line 1 column"), "{msg}");

    // 404: object, unknown resource (listing the known ones), unknown group version.
    let r = s.http("GET", &format!("{pods}/nope"), &[], b"").await?;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (404, json!("NotFound"))
    );
    assert_eq!(r.json()["details"]["kind"], "pods");
    let r = s
        .http("GET", "/api/v1/namespaces/default/widgets", &[], b"")
        .await?;
    assert_eq!(r.status, 404);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("pods") && m.contains("configmaps"))
    );
    let r = s.http("GET", "/apis/batch/v1/jobs", &[], b"").await?;
    assert_eq!(r.status, 404);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("apps/v1"))
    );

    // 201, then 409 AlreadyExists.
    let r = post(s, pods, &pod("a")).await?;
    assert_eq!(r.status, 201);
    let created = r.json();
    assert!(
        created["metadata"]["uid"].is_string()
            && created["metadata"]["creationTimestamp"].is_string()
    );
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = post(s, pods, &pod("a")).await?;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (409, json!("AlreadyExists"))
    );

    // 409 Conflict on a stale resourceVersion; the fresh one works.
    let mut upd = created.clone();
    upd["spec"]["activeDeadlineSeconds"] = json!(100);
    upd["metadata"]["resourceVersion"] = json!("1");
    let r = s
        .http(
            "PUT",
            &format!("{pods}/a"),
            &[JSON],
            upd.to_string().as_bytes(),
        )
        .await?;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (409, json!("Conflict"))
    );
    upd["metadata"]["resourceVersion"] = json!(rv);
    let r = s
        .http(
            "PUT",
            &format!("{pods}/a"),
            &[JSON],
            upd.to_string().as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_ne!(r.json()["metadata"]["resourceVersion"], json!(rv));

    // 422 lists every cause with field paths.
    let bad = json!({"metadata": {"name": "b"}, "spec": {"restartPolicy": "Sometimes", "containers": [{"name": "c"}]}});
    let r = post(s, pods, &bad).await?;
    assert_eq!(r.status, 422);
    let causes: Vec<String> = r.json()["details"]["causes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["field"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(causes, ["spec.containers[0].image", "spec.restartPolicy"]);

    // Strict field validation → 400; Ignore drops the field; Warn warns.
    let mut extra = pod("c");
    extra["spec"]["foo"] = json!(1);
    let r = post(s, &format!("{pods}?fieldValidation=Strict"), &extra).await?;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown field \"spec.foo\""))
    );
    let r = post(s, pods, &extra).await?;
    assert_eq!(r.status, 201);
    assert!(r.header("warning").is_some_and(|w| w.contains("spec.foo")));
    assert!(
        r.json()["spec"].get("foo").is_none(),
        "unknown fields are kept out"
    );

    // 413 over 3 MiB.
    let mut big = pod("big");
    big["metadata"]["annotations"] = json!({"x": "y".repeat(3 * 1024 * 1024 + 10)});
    let r = post(s, pods, &big).await?;
    assert_eq!(r.status, 413);

    // 415 for an unknown patch type.
    let r = s
        .http(
            "PATCH",
            &format!("{pods}/a"),
            &[("Content-Type", "text/plain")],
            b"{}",
        )
        .await?;
    assert_eq!(r.status, 415);

    // 503 + Retry-After while the store is down, and nothing half-written.
    s.store_outage(true).await?;
    let r = post(s, pods, &pod("during-outage")).await?;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(s.http("GET", "/readyz", &[], b"").await?.status, 503);
    if s.store_outage(false).await? {
        let r = s
            .http("GET", &format!("{pods}/during-outage"), &[], b"")
            .await?;
        assert_eq!(r.status, 404);
    } else {
        // The embedded store cannot come back in-process; the outage ends this scenario.
        return Ok(());
    }

    // Namespace must exist.
    let r = post(s, "/api/v1/namespaces/nope/pods", &pod("x")).await?;
    assert_eq!(r.status, 404);
    Ok(())
}

async fn discovery_version_openapi(s: &Server) -> anyhow::Result<()> {
    let r = s
        .http("GET", "/api", &[("Accept", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json")], b"")
        .await?;
    assert_eq!(
        r.header("content-type"),
        Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")
    );
    assert_eq!(r.json()["items"][0]["metadata"]["name"], "");
    let r = s
        .http("GET", "/api", &[("Accept", "application/json")], b"")
        .await?;
    assert_eq!(r.json()["kind"], "APIVersions");
    let r = s.http("GET", "/apis/apps/v1", &[], b"").await?;
    let names: Vec<String> = r.json()["resources"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        names.contains(&"deployments/scale".to_string()),
        "{names:?}"
    );
    let r = s.http("GET", "/version", &[], b"").await?;
    assert_eq!(r.json()["major"], "1");
    let r = s.http("GET", "/openapi/v3", &[], b"").await?;
    let url = r.json()["paths"]["apis/apps/v1"]["serverRelativeURL"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = s.http("GET", &url, &[], b"").await?;
    assert_eq!(r.status, 200);
    assert!(r.body.windows(10).any(|w| w == b"Deployment"));
    Ok(())
}

async fn selectors_paging_generate_name(s: &Server) -> anyhow::Result<()> {
    let pods = "/api/v1/namespaces/default/pods";
    for i in 0..5 {
        let mut p = pod(&format!("p{i}"));
        p["metadata"]["labels"] =
            json!({"app": "x", "idx": i.to_string(), "even": (i % 2 == 0).to_string()});
        if i < 2 {
            p["spec"]["nodeName"] = json!("n1");
        }
        assert_eq!(post(s, pods, &p).await?.status, 201);
    }
    let names = |v: Value| -> Vec<String> {
        v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let q = |sel: &str| {
        format!(
            "{pods}?labelSelector={}",
            sel.replace(' ', "%20").replace('!', "%21")
        )
    };
    assert_eq!(
        names(s.http("GET", &q("even=true"), &[], b"").await?.json()),
        ["p0", "p2", "p4"]
    );
    assert_eq!(
        names(s.http("GET", &q("idx in (1,3)"), &[], b"").await?.json()),
        ["p1", "p3"]
    );
    assert_eq!(
        names(
            s.http("GET", &q("idx notin (0,1,2)"), &[], b"")
                .await?
                .json()
        ),
        ["p3", "p4"]
    );
    assert_eq!(
        names(s.http("GET", &q("idx!=0,app"), &[], b"").await?.json()),
        ["p1", "p2", "p3", "p4"]
    );
    assert_eq!(
        names(s.http("GET", &q("!idx"), &[], b"").await?.json()),
        Vec::<String>::new()
    );
    let r = s
        .http(
            "GET",
            &format!("{pods}?fieldSelector=spec.nodeName%3Dn1"),
            &[],
            b"",
        )
        .await?;
    assert_eq!(names(r.json()), ["p0", "p1"]);
    let r = s
        .http(
            "GET",
            "/api/v1/pods?fieldSelector=metadata.name%3Dp3,status.phase%3DPending",
            &[],
            b"",
        )
        .await?;
    assert_eq!(names(r.json()), ["p3"]);
    let r = s
        .http(
            "GET",
            &format!("{pods}?fieldSelector=spec.bogus%3D1"),
            &[],
            b"",
        )
        .await?;
    assert_eq!(r.status, 400);

    // limit/continue walk every item exactly once.
    let mut all = Vec::new();
    let mut cont = String::new();
    for _ in 0..10 {
        let path = if cont.is_empty() {
            format!("{pods}?limit=2")
        } else {
            format!("{pods}?limit=2&continue={cont}")
        };
        let v = s.http("GET", &path, &[], b"").await?.json();
        all.extend(names(v.clone()));
        match v["metadata"]["continue"].as_str() {
            Some(c) => cont = c.to_string(),
            None => break,
        }
    }
    assert_eq!(all, ["p0", "p1", "p2", "p3", "p4"]);

    // generateName.
    let r = post(s, pods, &json!({"metadata": {"generateName": "gen-"}, "spec": {"containers": [{"name": "c", "image": "i"}]}})).await?;
    assert_eq!(r.status, 201);
    let name = r.json()["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    Ok(())
}

async fn watch_bookmarks_initial_events_and_gone(s: &Server) -> anyhow::Result<()> {
    let pods = "/api/v1/namespaces/default/pods";
    let r = post(s, pods, &pod("w0")).await?;
    let rv0 = r.json()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // From a resourceVersion: only later changes, with label filtering turning updates into
    // ADDED/DELETED for this watcher.
    let mut w = s
        .open_stream(&format!(
            "{pods}?watch=true&resourceVersion={rv0}&labelSelector=app%3Dw1"
        ))
        .await?;
    post(s, pods, &pod("w1")).await?;
    let ev = w.next_event(Duration::from_secs(10)).await?;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("w1"))
    );
    let r = s
        .http(
            "PATCH",
            &format!("{pods}/w1"),
            &[("Content-Type", "application/merge-patch+json")],
            br#"{"metadata":{"labels":{"app":"other"}}}"#,
        )
        .await?;
    assert_eq!(r.status, 200);
    let ev = w.next_event(Duration::from_secs(10)).await?;
    assert_eq!(ev["type"], "DELETED", "stopped matching: {ev}");

    // sendInitialEvents: current objects, then the initial-events-end bookmark, then changes.
    let mut w = s
        .open_stream(&format!("{pods}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&fieldSelector=metadata.name%3Dw0"))
        .await?;
    let ev = w.next_event(Duration::from_secs(10)).await?;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("w0"))
    );
    let ev = w.next_event(Duration::from_secs(10)).await?;
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(
        ev["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let r = s.http("DELETE", &format!("{pods}/w0"), &[], b"").await?;
    assert_eq!(r.status, 200);
    let ev = w.next_event(Duration::from_secs(10)).await?;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("w0"))
    );

    // Periodic bookmarks on an idle watch.
    let rv = s.http("GET", pods, &[], b"").await?.json()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut w = s
        .open_stream(&format!(
            "{pods}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await?;
    let ev = w.next_event(Duration::from_secs(30)).await?;
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(ev["object"]["metadata"]["resourceVersion"], json!(rv));

    // The shared watch cache serves recent revisions; one from before the cache's window whose
    // history the store compacted is gone: 410 Expired.
    s.compact().await?;
    post(s, pods, &pod("w2")).await?;
    let before_cache: i64 = rv0.parse::<i64>()? - 1;
    let mut w = s
        .open_stream(&format!("{pods}?watch=true&resourceVersion={before_cache}"))
        .await?;
    let ev = w.next_event(Duration::from_secs(10)).await?;
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(
        (
            ev["object"]["code"].as_i64(),
            ev["object"]["reason"].as_str()
        ),
        (Some(410), Some("Expired"))
    );
    Ok(())
}

async fn graceful_delete_finalizers_status_scale(s: &Server) -> anyhow::Result<()> {
    let pods = "/api/v1/namespaces/default/pods";
    let mut p = pod("g");
    p["spec"]["nodeName"] = json!("n1");
    post(s, pods, &p).await?;
    // Bound pod: marked with deletionTimestamp + grace, stays until a grace-0 delete.
    let r = s
        .http(
            "DELETE",
            &format!("{pods}/g"),
            &[JSON],
            br#"{"propagationPolicy":"Background"}"#,
        )
        .await?;
    assert_eq!(r.status, 200);
    assert!(r.json()["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(r.json()["metadata"]["deletionGracePeriodSeconds"], 30);
    assert_eq!(
        s.http("GET", &format!("{pods}/g"), &[], b"").await?.status,
        200
    );
    let r = s
        .http(
            "DELETE",
            &format!("{pods}/g?gracePeriodSeconds=0"),
            &[],
            b"",
        )
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.http("GET", &format!("{pods}/g"), &[], b"").await?.status,
        404
    );

    // Finalizers hold an object until they are removed.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "f", "finalizers": ["x/y"]}, "data": {"a": "1"}});
    post(s, "/api/v1/namespaces/default/configmaps", &cm).await?;
    let r = s
        .http(
            "DELETE",
            "/api/v1/namespaces/default/configmaps/f",
            &[],
            b"",
        )
        .await?;
    assert!(r.json()["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        s.http("GET", "/api/v1/namespaces/default/configmaps/f", &[], b"")
            .await?
            .status,
        200
    );
    let r = s
        .http(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/f",
            &[("Content-Type", "application/json-patch+json")],
            br#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        s.http("GET", "/api/v1/namespaces/default/configmaps/f", &[], b"")
            .await?
            .status,
        404
    );

    // Status subresource writes only status; main writes keep status.
    post(s, pods, &pod("st")).await?;
    let r = s
        .http("PATCH", &format!("{pods}/st/status"), &[("Content-Type", "application/merge-patch+json")], br#"{"status":{"phase":"Running","podIP":"10.1.0.5"},"metadata":{"labels":{"no":"no"}}}"#)
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"]["phase"], "Running");
    assert!(r.json()["metadata"]["labels"].get("no").is_none());
    let r = s
        .http(
            "PATCH",
            &format!("{pods}/st"),
            &[("Content-Type", "application/merge-patch+json")],
            br#"{"status":{"phase":"Failed"}}"#,
        )
        .await?;
    assert_eq!(r.json()["status"]["phase"], "Running");

    // Scale subresource.
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
    let r = post(s, "/apis/apps/v1/namespaces/default/deployments", &d).await?;
    assert_eq!(r.json()["spec"]["replicas"], 1);
    assert_eq!(r.json()["spec"]["strategy"]["type"], "RollingUpdate");
    let r = s
        .http(
            "GET",
            "/apis/apps/v1/namespaces/default/deployments/d/scale",
            &[],
            b"",
        )
        .await?;
    assert_eq!(
        (
            r.json()["kind"].as_str(),
            r.json()["status"]["selector"].as_str()
        ),
        (Some("Scale"), Some("a=b"))
    );
    let r = s
        .http("PUT", "/apis/apps/v1/namespaces/default/deployments/d/scale", &[JSON], br#"{"kind":"Scale","apiVersion":"autoscaling/v1","metadata":{"name":"d"},"spec":{"replicas":7}}"#)
        .await?;
    assert_eq!(r.json()["spec"]["replicas"], 7);
    let r = s
        .http(
            "GET",
            "/apis/apps/v1/namespaces/default/deployments/d",
            &[],
            b"",
        )
        .await?;
    assert_eq!(
        (
            r.json()["spec"]["replicas"].as_i64(),
            r.json()["metadata"]["generation"].as_i64()
        ),
        (Some(7), Some(2))
    );

    // Deleting a namespace marks it Terminating (no new content); the namespace controller
    // then removes its contents and finalizes it.
    post(
        s,
        "/api/v1/namespaces",
        &json!({"metadata": {"name": "tmp"}}),
    )
    .await?;
    post(s, "/api/v1/namespaces/tmp/pods", &pod("x")).await?;
    let r = s.http("DELETE", "/api/v1/namespaces/tmp", &[], b"").await?;
    assert_eq!(
        (r.status, r.json()["status"]["phase"].clone()),
        (200, json!("Terminating"))
    );
    let r = post(s, "/api/v1/namespaces/tmp/pods", &pod("y")).await?;
    assert_eq!(
        (r.status, r.json()["message"].clone()),
        (
            403,
            json!(
                "pods \"y\" is forbidden: unable to create new content in namespace tmp because it is being terminated"
            )
        )
    );
    let admin = control::controllers::ApiClient::new(
        &format!("https://127.0.0.1:{}", s.addr.port()),
        Some(&s.admin_token),
        Some(&s.ca_pem),
    )?;
    let stop = tokio_util::sync::CancellationToken::new();
    let controllers = tokio::spawn(control::controllers::run_all(
        admin,
        control::controllers::ControllerConfig::default(),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s
        .http("GET", "/api/v1/namespaces/tmp", &[], b"")
        .await?
        .status
        != 404
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "namespace tmp not removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = controllers.await;
    assert_eq!(
        s.http("GET", "/api/v1/namespaces/tmp/pods/x", &[], b"")
            .await?
            .status,
        404
    );
    Ok(())
}

async fn node_and_readonly_rights(s: &Server) -> anyhow::Result<()> {
    let n1 = s.pki.node_token("n1");
    let t = Some(n1.as_str());
    let node = |name: &str| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    let r = s
        .http_as(
            t,
            "POST",
            "/api/v1/nodes",
            &[JSON],
            node("n1").to_string().as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 201);
    let r = s
        .http_as(
            t,
            "POST",
            "/api/v1/nodes",
            &[JSON],
            node("n2").to_string().as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reason"], "Forbidden");
    let r = s
        .http_as(
            t,
            "PATCH",
            "/api/v1/nodes/n1/status",
            &[("Content-Type", "application/merge-patch+json")],
            br#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
        )
        .await?;
    assert_eq!(r.status, 200);
    // Leases: only its own, in kube-node-lease.
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"}, "spec": {"holderIdentity": "n1"}});
    let r = s
        .http_as(
            t,
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            &[JSON],
            lease.to_string().as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 201);
    let r = s
        .http_as(
            t,
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            &[],
            b"",
        )
        .await?;
    assert_eq!(r.status, 403);
    // Pods: only those bound to it, and list/watch only with its nodeName selector.
    let mut mine = pod("mine");
    mine["spec"]["nodeName"] = json!("n1");
    post(s, "/api/v1/namespaces/default/pods", &mine).await?;
    post(s, "/api/v1/namespaces/default/pods", &pod("other")).await?;
    assert_eq!(
        s.http_as(t, "GET", "/api/v1/pods", &[], b"").await?.status,
        403
    );
    let r = s
        .http_as(
            t,
            "GET",
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1",
            &[],
            b"",
        )
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        s.http_as(t, "GET", "/api/v1/namespaces/default/pods/mine", &[], b"")
            .await?
            .status,
        200
    );
    assert_eq!(
        s.http_as(t, "GET", "/api/v1/namespaces/default/pods/other", &[], b"")
            .await?
            .status,
        403
    );
    let r = s
        .http_as(
            t,
            "PATCH",
            "/api/v1/namespaces/default/pods/mine/status",
            &[("Content-Type", "application/merge-patch+json")],
            br#"{"status":{"phase":"Running"}}"#,
        )
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.http_as(
            t,
            "PATCH",
            "/api/v1/namespaces/default/pods/other/status",
            &[("Content-Type", "application/merge-patch+json")],
            b"{}"
        )
        .await?
        .status,
        403
    );
    assert_eq!(
        s.http_as(t, "GET", "/api/v1/namespaces/default/secrets", &[], b"")
            .await?
            .status,
        403
    );
    // Read-only: reads except secrets, no writes.
    let ro = Some(s.readonly_token.as_str());
    assert_eq!(
        s.http_as(ro, "GET", "/api/v1/pods", &[], b"").await?.status,
        200
    );
    assert_eq!(
        s.http_as(ro, "GET", "/api/v1/namespaces/default/secrets", &[], b"")
            .await?
            .status,
        403
    );
    assert_eq!(
        s.http_as(
            ro,
            "DELETE",
            "/api/v1/namespaces/default/pods/other",
            &[],
            b""
        )
        .await?
        .status,
        403
    );
    Ok(())
}

async fn namespace_policies(s: &Server) -> anyhow::Result<()> {
    let ns = |name: &str, labels: Value| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    // Pod Security: enforce=restricted rejects a plain pod, admits a hardened one.
    post(
        s,
        "/api/v1/namespaces",
        &ns(
            "secure",
            json!({"pod-security.kubernetes.io/enforce": "restricted"}),
        ),
    )
    .await?;
    let r = post(s, "/api/v1/namespaces/secure/pods", &pod("plain")).await?;
    assert_eq!(r.status, 403);
    let msg = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("violates PodSecurity \"restricted:latest\"")
            && msg.contains("allowPrivilegeEscalation != false"),
        "{msg}"
    );
    let mut hardened = pod("hard");
    hardened["spec"]["securityContext"] =
        json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}});
    hardened["spec"]["containers"][0]["securityContext"] =
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    assert_eq!(
        post(s, "/api/v1/namespaces/secure/pods", &hardened)
            .await?
            .status,
        201
    );
    // warn=baseline admits with a warning.
    post(
        s,
        "/api/v1/namespaces",
        &ns(
            "warned",
            json!({"pod-security.kubernetes.io/warn": "baseline"}),
        ),
    )
    .await?;
    let mut privileged = pod("priv");
    privileged["spec"]["hostNetwork"] = json!(true);
    let r = post(s, "/api/v1/namespaces/warned/pods", &privileged).await?;
    assert_eq!(r.status, 201);
    assert!(
        r.header("warning").is_some_and(
            |w| w.contains("would violate PodSecurity") && w.contains("hostNetwork=true")
        )
    );

    // LimitRange: defaults filled in, maximum enforced.
    post(s, "/api/v1/namespaces", &ns("limited", json!({}))).await?;
    let lr = json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "lr"}, "spec": {"limits": [
        {"type": "Container", "default": {"cpu": "500m"}, "defaultRequest": {"cpu": "100m"}, "max": {"cpu": "1"}}]}});
    assert_eq!(
        post(s, "/api/v1/namespaces/limited/limitranges", &lr)
            .await?
            .status,
        201
    );
    let r = post(s, "/api/v1/namespaces/limited/pods", &pod("d")).await?;
    assert_eq!(r.status, 201);
    let res = &r.json()["spec"]["containers"][0]["resources"];
    assert_eq!(
        (
            res["limits"]["cpu"].as_str(),
            res["requests"]["cpu"].as_str()
        ),
        (Some("500m"), Some("100m"))
    );
    assert_eq!(r.json()["status"]["qosClass"], "Burstable");
    let mut big = pod("big");
    big["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "2"}});
    let r = post(s, "/api/v1/namespaces/limited/pods", &big).await?;
    assert_eq!(r.status, 403);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("maximum cpu usage per Container is 1, but limit is 2"))
    );

    // ResourceQuota: pod count and requests; usage recorded in the quota status.
    post(s, "/api/v1/namespaces", &ns("quota", json!({}))).await?;
    let quota = json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q1"}, "spec": {"hard": {"pods": "1", "configmaps": "1"}}});
    assert_eq!(
        post(s, "/api/v1/namespaces/quota/resourcequotas", &quota)
            .await?
            .status,
        201
    );
    assert_eq!(
        post(s, "/api/v1/namespaces/quota/pods", &pod("one"))
            .await?
            .status,
        201
    );
    let r = post(s, "/api/v1/namespaces/quota/pods", &pod("two")).await?;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["message"],
        "pods \"two\" is forbidden: exceeded quota: q1, requested: pods=1, used: pods=1, limited: pods=1"
    );
    let q = s
        .http(
            "GET",
            "/api/v1/namespaces/quota/resourcequotas/q1",
            &[],
            b"",
        )
        .await?
        .json();
    assert_eq!(q["status"]["used"]["pods"], "1");
    let cm = |n: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": n}});
    assert_eq!(
        post(s, "/api/v1/namespaces/quota/configmaps", &cm("a"))
            .await?
            .status,
        201
    );
    assert_eq!(
        post(s, "/api/v1/namespaces/quota/configmaps", &cm("b"))
            .await?
            .status,
        403
    );
    Ok(())
}

/// Concurrent creates cannot share a cluster IP or node port, nor overrun a ResourceQuota:
/// both are claimed in the create's own store transaction.
async fn concurrent_allocations_and_quota(s: &Server) -> anyhow::Result<()> {
    post(
        s,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "race"}}),
    )
    .await?;
    let svcs = "/api/v1/namespaces/race/services";
    let svc = |name: String, ip: Option<&str>, node_port: Option<i64>| {
        let mut port = json!({"port": 80});
        if let Some(np) = node_port {
            port["nodePort"] = json!(np);
        }
        let mut v = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                           "spec": {"type": "NodePort", "selector": {"app": "x"}, "ports": [port]}});
        if let Some(ip) = ip {
            v["spec"]["clusterIP"] = json!(ip);
        }
        v
    };
    // Ten creates asking for one address at once: exactly one gets it. ClusterIP Services, so
    // the winner takes no random node port (it could be the one the next phase races for).
    let wanted = futures::future::join_all((0..10).map(|i| {
        let mut v = svc(format!("ip-{i}"), Some("10.96.7.7"), None);
        v["spec"]["type"] = json!("ClusterIP");
        post_v(s, svcs, v)
    }))
    .await;
    let mut codes: Vec<u16> = wanted
        .iter()
        .map(|r| r.as_ref().map_or(0, |r| r.status))
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, [201, 422, 422, 422, 422, 422, 422, 422, 422, 422]);
    let loser = wanted
        .iter()
        .flatten()
        .find(|r| r.status == 422)
        .map(|r| r.json())
        .unwrap_or_default();
    assert!(
        loser["message"]
            .as_str()
            .is_some_and(|m| m.contains("provided IP is already allocated")),
        "{loser}"
    );
    // Same for one node port.
    let wanted = futures::future::join_all(
        (0..10).map(|i| post_v(s, svcs, svc(format!("np-{i}"), None, Some(31234)))),
    )
    .await;
    let outcomes: Vec<String> = wanted
        .iter()
        .map(|r| match r {
            Ok(r) => format!("{} {}", r.status, r.json()["message"]),
            Err(e) => format!("error: {e:#}"),
        })
        .collect();
    let won = wanted
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 201))
        .count();
    assert_eq!(won, 1, "{outcomes:#?}");
    // Twenty creates with automatic addresses: all different.
    let auto = futures::future::join_all(
        (0..20).map(|i| post_v(s, svcs, svc(format!("auto-{i}"), None, None))),
    )
    .await;
    let mut ips = std::collections::HashSet::new();
    let mut ports = std::collections::HashSet::new();
    for r in auto {
        let v = r?.json();
        assert!(
            ips.insert(v["spec"]["clusterIP"].to_string()),
            "duplicate IP: {v}"
        );
        assert!(
            ports.insert(v["spec"]["ports"][0]["nodePort"].to_string()),
            "duplicate node port: {v}"
        );
    }
    // Deleting the Service that holds the address frees it for the next one.
    let list = s.http("GET", svcs, &[], b"").await?.json();
    let holder = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["spec"]["clusterIP"] == "10.96.7.7")
        .and_then(|i| i["metadata"]["name"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(holder.starts_with("ip-"), "{list}");
    let r = s
        .http("DELETE", &format!("{svcs}/{holder}"), &[], b"")
        .await?;
    assert_eq!(r.status, 200, "{}", r.json());
    let r = post(s, svcs, &svc("again".into(), Some("10.96.7.7"), None)).await?;
    assert_eq!(r.status, 201, "{}", r.json());

    // Quota of 5 pods, 20 concurrent creates: exactly 5 fit, and status.used says so.
    post(
        s,
        "/api/v1/namespaces/race/resourcequotas",
        &json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q"},
                "spec": {"hard": {"pods": "5"}}}),
    )
    .await?;
    let created = futures::future::join_all(
        (0..20).map(|i| post_v(s, "/api/v1/namespaces/race/pods", pod(&format!("p{i}")))),
    )
    .await;
    let mut ok = 0;
    for r in created {
        let r = r?;
        match r.status {
            201 => ok += 1,
            403 => assert!(
                r.json()["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("exceeded quota: q")),
                "{}",
                r.json()
            ),
            other => panic!("unexpected {other}: {}", r.json()),
        }
    }
    assert_eq!(ok, 5);
    let pods = s
        .http("GET", "/api/v1/namespaces/race/pods", &[], b"")
        .await?
        .json();
    assert_eq!(pods["items"].as_array().map(Vec::len), Some(5));
    let q = s
        .http("GET", "/api/v1/namespaces/race/resourcequotas/q", &[], b"")
        .await?
        .json();
    assert_eq!(q["status"]["used"]["pods"], "5", "{q}");
    Ok(())
}

crate::on_both_stores!(
    concurrent_allocations_and_quota,
    namespace_policies,
    status_codes,
    discovery_version_openapi,
    selectors_paging_generate_name,
    watch_bookmarks_initial_events_and_gone,
    graceful_delete_finalizers_status_scale,
    node_and_readonly_rights
);
