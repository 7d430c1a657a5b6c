//! One member: the KV API's semantics and errors as etcd defines them.
use std::time::Duration;

use store::pb::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, compare, request_op,
};

use crate::harness::{TestCluster, get, init_tracing, put, test_tunables, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_semantics_and_errors() {
    init_tracing();
    let c = TestCluster::start(1, test_tunables()).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;

    // Revisions: fresh store is at 1, each write +1.
    let r1 = put(&mut kv, "a", "1").await;
    assert_eq!(r1, 2);
    let r2 = put(&mut kv, "a", "2").await;
    assert_eq!(r2, 3);
    put(&mut kv, "b", "x").await;
    put(&mut kv, "c", "y").await;

    let a = kv
        .range(RangeRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.kvs[0].version, 2);
    assert_eq!(a.kvs[0].create_revision, 2);
    assert_eq!(a.kvs[0].mod_revision, 3);

    // Prefix / limit / count.
    let all = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.count, 3);
    assert_eq!(all.kvs.len(), 2);
    assert!(all.more);

    // Historical read.
    let old = kv
        .range(RangeRequest {
            key: "a".into(),
            revision: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.kvs[0].value, b"1");

    // Future revision.
    let err = kv
        .range(RangeRequest {
            key: "a".into(),
            revision: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );

    // Empty key.
    let err = kv.put(PutRequest::default()).await.unwrap_err();
    assert_eq!(err.message(), "etcdserver: key is not provided");

    // Unknown lease.
    let err = kv
        .put(PutRequest {
            key: "l".into(),
            value: "v".into(),
            lease: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "etcdserver: requested lease not found");

    // ignore_value on a missing key.
    let err = kv
        .put(PutRequest {
            key: "zz".into(),
            ignore_value: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.message(), "etcdserver: key not found");

    // Too large.
    let err = kv
        .put(PutRequest {
            key: "big".into(),
            value: vec![0; 1600 * 1024],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "etcdserver: request is too large");

    // Txn: CAS on mod revision, one revision for the whole txn.
    let put_op = |k: &str, v: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    };
    let before = get_rev(&mut kv).await;
    let t = kv
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: "a".into(),
                target_union: Some(compare::TargetUnion::ModRevision(r2)),
                ..Default::default()
            }],
            success: vec![put_op("a", "3"), put_op("d", "4")],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.succeeded);
    assert_eq!(t.header.unwrap().revision, before + 1);
    // Same compare now fails.
    let t = kv
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: "a".into(),
                target_union: Some(compare::TargetUnion::ModRevision(r2)),
                ..Default::default()
            }],
            success: vec![put_op("a", "never")],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: "a".into(),
                    ..Default::default()
                })),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!t.succeeded);
    assert_eq!(get(&mut kv, "a").await.as_deref(), Some("3"));

    // A read-only txn is answered without a new revision.
    let rev = get_rev(&mut kv).await;
    let t = kv
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Greater as i32,
                target: compare::CompareTarget::Version as i32,
                key: "a".into(),
                target_union: Some(compare::TargetUnion::Version(0)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: "a".into(),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.succeeded);
    assert_eq!(t.header.unwrap().revision, rev);
    assert_eq!(get_rev(&mut kv).await, rev);

    // Duplicate key and too many ops.
    let err = kv
        .txn(TxnRequest {
            success: vec![put_op("x", "1"), put_op("x", "2")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "etcdserver: duplicate key given in txn request"
    );
    let many: Vec<RequestOp> = (0..129).map(|i| put_op(&format!("k{i}"), "v")).collect();
    let err = kv
        .txn(TxnRequest {
            success: many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "etcdserver: too many operations in txn request"
    );

    // Delete with prev_kv; a delete of nothing does not bump the revision.
    let d = kv
        .delete_range(DeleteRangeRequest {
            key: "b".into(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 1);
    assert_eq!(d.prev_kvs[0].value, b"x");
    let rev = get_rev(&mut kv).await;
    let d = kv
        .delete_range(DeleteRangeRequest {
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 0);
    assert_eq!(d.header.unwrap().revision, rev);

    // Compaction.
    kv.compact(CompactionRequest {
        revision: rev,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = kv
        .range(RangeRequest {
            key: "a".into(),
            revision: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let err = kv
        .compact(CompactionRequest {
            revision: rev,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    // Maintenance status.
    let mut m =
        store::pb::etcdserverpb::maintenance_client::MaintenanceClient::connect(c.client_url(0))
            .await
            .unwrap();
    let st = m
        .status(store::pb::etcdserverpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.leader, c.node(0).id());
    assert_eq!(st.version, "3.4.0");
    assert!(st.raft_term >= 1);
    c.shutdown().await;
}

async fn get_rev(
    kv: &mut store::pb::etcdserverpb::kv_client::KvClient<tonic::transport::Channel>,
) -> i64 {
    kv.range(RangeRequest {
        key: "a".into(),
        ..Default::default()
    })
    .await
    .expect("range")
    .into_inner()
    .header
    .expect("header")
    .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_quota_raises_nospace_alarm() {
    use store::pb::etcdserverpb::maintenance_client::MaintenanceClient;
    use store::pb::etcdserverpb::{AlarmRequest, AlarmType, StatusRequest, alarm_request};
    init_tracing();
    let tunables = store::Tunables {
        quota_backend_bytes: 64 * 1024,
        ..test_tunables()
    };
    let c = TestCluster::start(1, tunables).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;
    let err = crate::harness::put_until_refused(&mut kv, "q").await;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(err.message(), "etcdserver: mvcc: database space exceeded");
    let mut m = MaintenanceClient::connect(c.client_url(0)).await.unwrap();
    let alarms = m
        .alarm(AlarmRequest {
            action: alarm_request::AlarmAction::Get as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alarms.alarms.len(), 1);
    assert_eq!(alarms.alarms[0].alarm, AlarmType::Nospace as i32);
    let st = m.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        st.errors.iter().any(|e| e.contains("NOSPACE")),
        "{:?}",
        st.errors
    );
    // Reads and deletes still work; writes stay refused while the alarm is active.
    assert!(get(&mut kv, "q0").await.is_some());
    let err = kv
        .put(PutRequest {
            key: "small".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_of_another_member_is_refused() {
    init_tracing();
    let mut c = TestCluster::start(1, test_tunables()).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;
    put(&mut kv, "persist", "me").await;
    c.kill(0).await;
    let mut other = c.configs[0].clone();
    other.name = "intruder".to_owned();
    other.initial_cluster = vec![("intruder".to_owned(), other.initial_cluster[0].1.clone())];
    let err = store::Node::start(other).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("belongs to member \"n1\""), "{msg}");
    // The rightful member restarts from the same dir with its data.
    c.restart(0).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;
    assert_eq!(get(&mut kv, "persist").await.as_deref(), Some("me"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_member_on_port_zero() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let config = store::StoreConfig {
        data_dir: dir.path().join("d"),
        listen_client_addr: "127.0.0.1:0".parse().unwrap(),
        listen_peer_addr: "127.0.0.1:0".parse().unwrap(),
        tunables: test_tunables(),
        ..store::StoreConfig::default()
    };
    let node = store::Node::start(config).await.unwrap();
    let mut kv = store::pb::etcdserverpb::kv_client::KvClient::connect(format!(
        "http://{}",
        node.client_addr()
    ))
    .await
    .unwrap();
    assert_eq!(put(&mut kv, "k", "v").await, 2);
    assert_eq!(get(&mut kv, "k").await.as_deref(), Some("v"));
    let m = node.metrics();
    assert_eq!(m.leader, Some(node.id()));
    assert!(m.term >= 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_dir_is_refused_without_panic() {
    init_tracing();
    let mut c = TestCluster::start(1, test_tunables()).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;
    for i in 0..50 {
        put(&mut kv, &format!("c{i}"), "value").await;
    }
    c.kill(0).await;
    // Overwrite every sled file with garbage.
    let dir = c.configs[0].data_dir.clone();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            std::fs::write(&path, vec![0xA5; len.max(64)]).unwrap();
        }
    }
    let config = c.configs[0].clone();
    let res = tokio::spawn(store::Node::start(config)).await;
    let res = res.expect("start must not panic");
    let err = res.expect_err("a corrupt data dir is refused");
    eprintln!("refused: {err}");
}

/// Whether `key` can still be read at `revision` (false once compaction dropped it).
async fn readable_at(
    kv: &mut store::pb::etcdserverpb::kv_client::KvClient<tonic::transport::Channel>,
    key: &str,
    revision: i64,
) -> bool {
    match kv
        .range(RangeRequest {
            key: key.into(),
            revision,
            ..Default::default()
        })
        .await
    {
        Ok(_) => true,
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
            assert!(s.message().contains("compacted"), "{s:?}");
            false
        }
    }
}

/// The leader compacts on its own as etcd's `--auto-compaction-mode revision|periodic` do, and
/// keeps what the retention covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_by_revision_and_by_time() {
    init_tracing();
    let tunables = store::Tunables {
        auto_compaction: store::AutoCompaction::Revision {
            keep: 10,
            every: Duration::from_millis(100),
        },
        ..test_tunables()
    };
    let c = TestCluster::start(1, tunables).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;
    let mut last = 0;
    for i in 0..30 {
        last = put(&mut kv, "r", &i.to_string()).await;
    }
    let probe = kv.clone();
    wait_until(
        "compaction to 10 revisions",
        Duration::from_secs(10),
        || {
            let mut kv = probe.clone();
            async move { !readable_at(&mut kv, "r", last - 11).await }
        },
    )
    .await;
    assert!(
        readable_at(&mut kv, "r", last - 10).await,
        "kept 10 revisions"
    );
    c.shutdown().await;

    let tunables = store::Tunables {
        auto_compaction: store::AutoCompaction::Periodic(Duration::from_secs(2)),
        ..test_tunables()
    };
    let c = TestCluster::start(1, tunables).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let mut kv = c.kv(0).await;
    let first = put(&mut kv, "p", "0").await;
    let mut old = first;
    for i in 1..5 {
        old = put(&mut kv, "p", &i.to_string()).await;
    }
    let probe = kv.clone();
    wait_until(
        "compaction of history over 2 s old",
        Duration::from_secs(15),
        || {
            let mut kv = probe.clone();
            async move { !readable_at(&mut kv, "p", first).await }
        },
    )
    .await;
    // Fresh history is kept for the retention.
    let fresh = put(&mut kv, "p", "new").await;
    assert!(fresh > old);
    assert!(readable_at(&mut kv, "p", fresh).await);
    // Compaction stops at the newest revision over 2 s old, which `old` stays for 2 s after
    // `fresh`.
    assert!(readable_at(&mut kv, "p", old).await, "compacted too far");
    c.shutdown().await;
}

/// etcd's plain-HTTP endpoints on the client port, beside gRPC on the same port: `/health`
/// (what Kubernetes probes), `/version`, and Prometheus `/metrics` with etcd's names; and the
/// standard gRPC health service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_version_and_metrics_over_http1() {
    use crate::harness::http_get;
    init_tracing();
    let c = TestCluster::start(1, test_tunables()).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let url = c.client_url(0);
    let mut kv = c.kv(0).await;
    put(&mut kv, "k", "v").await;

    let (status, body) = http_get(&url, "/health").await;
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("health json");
    assert_eq!(health["health"], "true", "{body}");

    let (status, body) = http_get(&url, "/version").await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""etcdserver":"3.4.0""#), "{body}");

    let (status, body) = http_get(&url, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
    };
    assert_eq!(value("etcd_server_has_leader"), 1.0);
    assert_eq!(value("etcd_server_is_leader"), 1.0);
    assert_eq!(value("etcd_server_leader_changes_seen_total"), 1.0);
    assert!(value("etcd_debugging_mvcc_current_revision") >= 2.0);
    assert!(value("etcd_disk_wal_fsync_duration_seconds_count") >= 1.0);
    assert!(value(r#"etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"}"#) >= 1.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_cpu_seconds_total") > 0.0);

    let (status, _) = http_get(&url, "/nope").await;
    assert_eq!(status, 404);
    // The standard gRPC health service, on the same port (grpc_health_probe, gRPC probes).
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("grpc.health.v1.Health/Check")
        .into_inner();
    assert_eq!(
        check.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // gRPC still served on the same port after HTTP/1 clients came and went.
    put(&mut c.kv(0).await, "k2", "v2").await;
    assert_eq!(get(&mut kv, "k2").await.as_deref(), Some("v2"));
    c.shutdown().await;
}
