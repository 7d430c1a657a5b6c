//! Group commit and batched ReadIndex: concurrent clients share Raft entries and read rounds.
use std::time::{Duration, Instant};

use store::pb::etcdserverpb::{PutRequest, RangeRequest};

use crate::harness::{TestCluster, init_tracing, test_tunables};

const CLIENTS: usize = 64;
const PER_CLIENT: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_and_reads_are_batched() {
    init_tracing();
    let c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let follower = (leader + 1) % 3;
    // Summed over the members: a disk stall can move leadership mid-run, and then the
    // writes are proposed by whichever member leads.
    let proposed = |c: &TestCluster| {
        (0..3).fold((0, 0), |(w, e), i| {
            let m = c.node(i).metrics();
            (w + m.proposed_writes, e + m.proposed_entries)
        })
    };
    let before = proposed(&c);

    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let mut kv = c.kv(leader).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                kv.put(PutRequest {
                    key: format!("b/{t}/{i}").into_bytes(),
                    value: vec![b'x'; 100],
                    ..Default::default()
                })
                .await
                .expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let write_secs = started.elapsed().as_secs_f64();
    let after = proposed(&c);
    let writes = after.0 - before.0;
    let entries = after.1 - before.1;
    eprintln!(
        "{writes} writes from {CLIENTS} clients in {entries} raft entries, {:.0} writes/s",
        writes as f64 / write_secs
    );
    // More only if a batch was cut from a deposed leader's log and proposed again.
    assert!(
        writes >= (CLIENTS * PER_CLIENT) as u64,
        "{writes} writes proposed"
    );
    assert!(
        entries < writes / 2,
        "group commit packs writes: {entries} entries for {writes}"
    );

    let before = c.node(follower).metrics();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut kv = c.kv(follower).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..PER_CLIENT {
                let r = kv
                    .range(RangeRequest {
                        key: b"b/".to_vec(),
                        range_end: b"b0".to_vec(),
                        count_only: true,
                        ..Default::default()
                    })
                    .await
                    .expect("range")
                    .into_inner();
                // Linearizable: every acknowledged write is visible on the follower.
                assert_eq!(r.count, (CLIENTS * PER_CLIENT) as i64);
            }
        }));
    }
    for t in tasks {
        t.await.expect("reader");
    }
    let read_secs = started.elapsed().as_secs_f64();
    let m = c.node(follower).metrics();
    let reads = m.linearizable_reads - before.linearizable_reads;
    let rounds = m.read_index_rounds - before.read_index_rounds;
    eprintln!(
        "{reads} linearizable follower reads in {rounds} ReadIndex rounds, {:.0} reads/s",
        reads as f64 / read_secs
    );
    assert_eq!(reads, (CLIENTS * PER_CLIENT) as u64);
    assert!(
        rounds < reads / 2,
        "reads share ReadIndex rounds: {rounds} for {reads}"
    );
    c.shutdown().await;
}
