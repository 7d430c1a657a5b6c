//! The in-process transport (`ApiServer::local_client`): the scheduler binds over it, and its
//! requests meet the same authentication and authorization as requests over HTTPS.
use std::time::Duration;

use control::apiserver::{ApiServer, ApiServerConfig};
use control::scheduler::SchedulerConfig;
use control::storage::MemStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn the_scheduler_binds_through_the_in_process_transport_with_its_credentials()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ApiServer::new(ApiServerConfig::new(dir.path()), MemStore::new())?;
    server.bootstrap().await?;
    let pki = server.pki().expect("secure mode").clone();
    let admin = server.local_client(Some(&pki.admin_token));
    let stranger = server.local_client(Some("not-a-token"));
    let node = server.local_client(Some(&pki.node_token("n1")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(server.serve(listener, shutdown.clone()));

    tracing::info!("--- authentication and authorization apply in-process");
    let e = stranger
        .get("/api/v1/namespaces/default/pods")
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), Some(401), "{e}");
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "/srv/app.wasm",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}});
    let e = node
        .create("/api/v1/namespaces/default/pods", &pod)
        .await
        .expect_err("a node may not create pods");
    assert_eq!(e.code(), Some(403), "{e}");

    tracing::info!("--- the admin's in-process scheduler binds a pod and records the event");
    admin
        .create(
            "/api/v1/nodes",
            &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}},
                "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                           "conditions": [{"type": "Ready", "status": "True"}]}}),
        )
        .await?;
    admin
        .create("/api/v1/namespaces/default/pods", &pod)
        .await?;
    let (posted0, _) = control::scheduler::event_counts();
    let sched = tokio::spawn(control::scheduler::run(
        admin.clone(),
        SchedulerConfig::default(),
        shutdown.child_token(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let event = loop {
        let p = admin.get("/api/v1/namespaces/default/pods/p").await?;
        let bound = p
            .as_ref()
            .and_then(|p| p.pointer("/spec/nodeName"))
            .and_then(Value::as_str)
            == Some("n1");
        let (events, _) = admin.list("/api/v1/namespaces/default/events").await?;
        let scheduled = events
            .into_iter()
            .find(|e| e["reason"] == "Scheduled" && e["involvedObject"]["name"] == "p");
        if let (true, Some(e)) = (bound, scheduled) {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod not bound with its event within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        event["message"], "Successfully assigned default/p to n1",
        "{event}"
    );
    assert!(control::scheduler::event_counts().0 > posted0);
    shutdown.cancel();
    sched.await?;
    served.await??;
    Ok(())
}
