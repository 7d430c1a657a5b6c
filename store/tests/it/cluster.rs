//! Three members over loopback with real sled data dirs: replication, forwarding, watches,
//! leases across failover, restart from the data dir, membership changes, snapshot catch-up.
use std::time::Duration;

use store::pb::etcdserverpb::cluster_client::ClusterClient;
use store::pb::etcdserverpb::lease_client::LeaseClient;
use store::pb::etcdserverpb::watch_client::WatchClient;
use store::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, MemberAddRequest,
    MemberListRequest, MemberPromoteRequest, MemberRemoveRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest, watch_request,
};
use store::{Node, Tunables};
use tokio_stream::StreamExt;

use crate::harness::{TestCluster, get, init_tracing, put, test_tunables, wait_until};

fn prefix_end(p: &str) -> Vec<u8> {
    let mut e = p.as_bytes().to_vec();
    if let Some(last) = e.last_mut() {
        *last += 1;
    }
    e
}

async fn serializable_count(c: &TestCluster, i: usize, prefix: &str) -> i64 {
    let mut kv = c.kv(i).await;
    kv.range(RangeRequest {
        key: prefix.into(),
        range_end: prefix_end(prefix),
        serializable: true,
        count_only: true,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().count)
    .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_writes_watches_and_leases() {
    init_tracing();
    let mut c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let watcher_node = (leader + 1) % 3;
    let writer_node = (leader + 2) % 3;

    tracing::info!("--- watch the prefix on a follower");
    let mut kv = c.kv(writer_node).await;
    let start = put(&mut kv, "w/0", "0").await;
    let (wtx, wrx) = tokio::sync::mpsc::channel(8);
    wtx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: "w/".into(),
                range_end: prefix_end("w/"),
                start_revision: start,
                prev_kv: true,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut wc = WatchClient::connect(c.client_url(watcher_node))
        .await
        .unwrap();
    let mut events = wc
        .watch(tokio_stream::wrappers::ReceiverStream::new(wrx))
        .await
        .unwrap()
        .into_inner();

    tracing::info!("--- lease with an attached key");
    let mut lease = LeaseClient::connect(c.client_url(writer_node))
        .await
        .unwrap();
    let l = lease
        .lease_grant(LeaseGrantRequest { ttl: 10, id: 0 })
        .await
        .unwrap()
        .into_inner();
    kv.put(PutRequest {
        key: "leased".into(),
        value: "v".into(),
        lease: l.id,
        ..Default::default()
    })
    .await
    .unwrap();

    tracing::info!("--- writes through a follower");
    for i in 1..50 {
        put(&mut kv, &format!("w/{i}"), &i.to_string()).await;
    }

    // Refresh right before the failover so only the failover itself is timed.
    let (ktx, krx) = tokio::sync::mpsc::channel(1);
    ktx.send(LeaseKeepAliveRequest { id: l.id }).await.unwrap();
    let mut ka = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(krx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ka.next().await.unwrap().unwrap().ttl, 10);
    drop(ka);

    tracing::info!("--- kill the leader");
    let old_leader = c.node(leader).id();
    c.kill(leader).await;
    let new_leader = c.wait_leader(Duration::from_secs(30)).await;
    assert_ne!(c.node(new_leader).id(), old_leader);
    // A new leader restarts lease countdowns: the key survives the failover.
    assert_eq!(get(&mut kv, "leased").await.as_deref(), Some("v"));
    for i in 50..100 {
        put(&mut kv, &format!("w/{i}"), &i.to_string()).await;
    }
    let (ktx, krx) = tokio::sync::mpsc::channel(1);
    ktx.send(LeaseKeepAliveRequest { id: l.id }).await.unwrap();
    let mut ka = lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(krx))
        .await
        .unwrap()
        .into_inner();
    let resp = ka.next().await.unwrap().unwrap();
    assert_eq!(resp.ttl, 10);
    lease
        .lease_revoke(LeaseRevokeRequest { id: l.id })
        .await
        .unwrap();
    assert_eq!(get(&mut kv, "leased").await, None);

    tracing::info!("--- the watch saw every write once, in order");
    let mut seen = Vec::new();
    while seen.len() < 100 {
        let resp = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("watch events in time")
            .expect("stream open")
            .expect("watch response");
        for ev in resp.events {
            let kv = ev.kv.unwrap();
            seen.push((String::from_utf8(kv.key).unwrap(), kv.mod_revision));
        }
    }
    for (i, (key, _)) in seen.iter().enumerate() {
        assert_eq!(key, &format!("w/{i}"));
    }
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "revisions increase"
    );

    tracing::info!("--- restart the old leader from its data dir");
    c.restart(leader).await;
    wait_until(
        "restarted member caught up",
        Duration::from_secs(30),
        || {
            let c = &c;
            async move { serializable_count(c, leader, "w/").await == 100 }
        },
    )
    .await;
    let mut kv_old = c.kv(leader).await;
    assert_eq!(get(&mut kv_old, "w/99").await.as_deref(), Some("99"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_join_promote_remove() {
    init_tracing();
    let mut c = TestCluster::start(3, test_tunables()).await;
    c.wait_leader(Duration::from_secs(30)).await;
    let mut kv = c.kv(0).await;
    for i in 0..20 {
        put(&mut kv, &format!("m/{i}"), "x").await;
    }

    tracing::info!("--- member add (as voter: joins as learner, promoted once caught up)");
    let (config, cl, pl) = c.prepare_joiner().await;
    let mut cluster = ClusterClient::connect(c.client_url(1)).await.unwrap();
    let added = cluster
        .member_add(MemberAddRequest {
            peer_ur_ls: vec![format!("http://{}", config.listen_peer_addr)],
            is_learner: false,
        })
        .await
        .unwrap()
        .into_inner();
    let new_id = added.member.unwrap().id;
    assert_eq!(added.members.len(), 4);
    let joiner = Node::start_with_listeners(config.clone(), cl, pl)
        .await
        .unwrap();
    assert_eq!(
        joiner.id(),
        new_id,
        "member add and the joining member agree on the id"
    );
    wait_until(
        "new member promoted to voter",
        Duration::from_secs(30),
        || {
            let n = c.node(0).metrics();
            async move { n.voters.contains(&new_id) }
        },
    )
    .await;
    let mut kv4 = store::pb::etcdserverpb::kv_client::KvClient::connect(format!(
        "http://{}",
        joiner.client_addr()
    ))
    .await
    .unwrap();
    assert_eq!(get(&mut kv4, "m/19").await.as_deref(), Some("x"));
    // The joiner published its name and client URL.
    wait_until("joiner published its name", Duration::from_secs(20), || {
        let mut cluster = cluster.clone();
        async move {
            let list = cluster
                .member_list(MemberListRequest {})
                .await
                .unwrap()
                .into_inner();
            list.members
                .iter()
                .any(|m| m.id == new_id && !m.name.is_empty() && !m.client_ur_ls.is_empty())
        }
    })
    .await;

    tracing::info!("--- member remove");
    cluster
        .member_remove(MemberRemoveRequest { id: new_id })
        .await
        .unwrap();
    let list = cluster
        .member_list(MemberListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.members.len(), 3);
    put(&mut kv, "after-remove", "ok").await;
    joiner.shutdown().await;

    tracing::info!("--- member add --learner, then member promote");
    let (config, cl, pl) = c.prepare_joiner().await;
    let added = cluster
        .member_add(MemberAddRequest {
            peer_ur_ls: vec![format!("http://{}", config.listen_peer_addr)],
            is_learner: true,
        })
        .await
        .unwrap()
        .into_inner();
    let learner_id = added.member.unwrap().id;
    let learner = Node::start_with_listeners(config, cl, pl).await.unwrap();
    // A learner stays a learner until promoted; promotion succeeds once it is in sync.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(c.node(0).metrics().learners.contains(&learner_id));
    wait_until("learner promoted", Duration::from_secs(30), || {
        let mut cluster = cluster.clone();
        async move {
            match cluster
                .member_promote(MemberPromoteRequest { id: learner_id })
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    assert_eq!(
                        e.message(),
                        "etcdserver: can only promote a learner member which is in sync with leader"
                    );
                    false
                }
            }
        }
    })
    .await;
    assert!(c.node(0).metrics().voters.contains(&learner_id));
    let err = cluster
        .member_promote(MemberPromoteRequest { id: learner_id })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "etcdserver: can only promote a learner member"
    );
    cluster
        .member_remove(MemberRemoveRequest { id: learner_id })
        .await
        .unwrap();
    learner.shutdown().await;
    put(&mut kv, "after-learner", "ok").await;

    // Unknown member.
    let err = cluster
        .member_remove(MemberRemoveRequest { id: 12345 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_member_catches_up_by_snapshot() {
    init_tracing();
    let tunables = Tunables {
        snapshot_count: 50,
        snapshot_catchup_entries: 5,
        ..test_tunables()
    };
    let mut c = TestCluster::start(3, tunables).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let lagger = (leader + 1) % 3;
    let writer = (leader + 2) % 3;
    c.kill(lagger).await;

    tracing::info!("--- write past several snapshots while one member is down");
    let mut kv = c.kv(writer).await;
    for i in 0..300 {
        put(&mut kv, &format!("s/{i:03}"), &i.to_string()).await;
    }
    // Both running members: leadership may move during the writes, and whichever leads
    // must lack the entries the restarted member misses.
    wait_until(
        "running members purged their logs",
        Duration::from_secs(20),
        || {
            let purged = [leader, writer].map(|i| c.node(i).metrics().purged);
            async move { purged.iter().all(|p| *p > 100) }
        },
    )
    .await;

    tracing::info!("--- restart the lagging member");
    c.restart(lagger).await;
    wait_until("lagging member caught up", Duration::from_secs(60), || {
        let c = &c;
        async move { serializable_count(c, lagger, "s/").await == 300 }
    })
    .await;
    let m = c.node(lagger).metrics();
    assert!(m.snapshot > 0, "caught up through a snapshot: {m:?}");
    let mut kv2 = c.kv(lagger).await;
    assert_eq!(get(&mut kv2, "s/299").await.as_deref(), Some("299"));
    c.shutdown().await;
}
