//! Three real `flotilla store` processes: kill -9 the leader while a client writes; a new
//! leader is elected, writing resumes, every acknowledged write survives, and the killed member
//! restarts from its data dir and catches up; then every member is killed and the cluster
//! restarts from its data dirs with nothing lost.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use store::pb::etcdserverpb::kv_client::KvClient;
use store::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use store::pb::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct Member {
    name: String,
    client: String,
    peer: String,
    dir: PathBuf,
}

fn spawn(m: &Member, initial: &str, log_dir: &Path, generation: u32) -> Child {
    let log = std::fs::File::create(log_dir.join(format!("{}-{generation}.log", m.name)))
        .expect("log file");
    Command::new(BIN)
        .args([
            "store",
            "--name",
            &m.name,
            "--data-dir",
            m.dir.to_str().expect("utf8 path"),
            "--listen-client-urls",
            &m.client,
            "--listen-peer-urls",
            &m.peer,
            "--initial-cluster",
            initial,
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "800",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn flotilla store")
}

async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// (member id, leader id) as seen by the member at `url`.
async fn status(url: &str) -> Option<(u64, u64)> {
    let mut m = MaintenanceClient::new(channel(url).await);
    let s = m.status(StatusRequest {}).await.ok()?.into_inner();
    Some((s.header?.member_id, s.leader))
}

/// Waits until the given members agree on one leader; returns its index.
async fn agreed_leader(urls: &[String], timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for u in urls {
            seen.push(status(u).await);
        }
        if let Some(Some((_, l))) = seen.first()
            && *l != 0
            && seen.iter().all(|s| s.is_some_and(|(_, x)| x == *l))
            && let Some(i) = seen.iter().position(|s| s.is_some_and(|(id, _)| id == *l))
        {
            return i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn keys(url: &str, serializable: bool) -> Result<BTreeSet<String>, tonic::Status> {
    let mut kv = KvClient::new(channel(url).await);
    let r = kv
        .range(RangeRequest {
            key: b"k/".to_vec(),
            range_end: b"k0".to_vec(),
            serializable,
            keys_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.kvs
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).expect("utf8"))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_under_load_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let members: Vec<Member> = (1..=3)
        .map(|i| Member {
            name: format!("n{i}"),
            client: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            dir: tmp.path().join(format!("n{i}.flotilla")),
        })
        .collect();
    let initial = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    let mut children: Vec<Option<Child>> = members
        .iter()
        .map(|m| Some(spawn(m, &initial, tmp.path(), 0)))
        .collect();
    let urls: Vec<String> = members.iter().map(|m| m.client.clone()).collect();
    let leader = agreed_leader(&urls, Duration::from_secs(60)).await;
    eprintln!("leader is {}", members[leader].name);

    // Writer: rotates over the two followers (they forward), every key written once.
    let targets: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| urls[i].clone())
        .collect();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut clients = Vec::new();
        for t in &targets {
            clients.push(KvClient::new(channel(t).await));
        }
        let mut acked: Vec<(u64, tokio::time::Instant)> = Vec::new();
        let mut i = 0u64;
        let mut which = 0usize;
        while !*stop_rx.borrow_and_update() {
            i += 1;
            let c = &mut clients[which % 2];
            let res = c
                .put(PutRequest {
                    key: format!("k/{i:08}").into_bytes(),
                    value: i.to_string().into_bytes(),
                    ..Default::default()
                })
                .await;
            match res {
                Ok(_) => acked.push((i, tokio::time::Instant::now())),
                Err(_) => {
                    which += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        acked
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("--- kill -9 the leader {}", members[leader].name);
    let killed_at = tokio::time::Instant::now();
    let mut victim = children[leader].take().expect("leader child");
    victim.kill().await.expect("kill -9");
    let survivors: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| urls[i].clone())
        .collect();
    let new_leader = agreed_leader(&survivors, Duration::from_secs(60)).await;
    eprintln!("new leader elected after {:?}", killed_at.elapsed());
    assert_ne!(survivors[new_leader], urls[leader]);

    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true).expect("stop writer");
    let acked = writer.await.expect("writer");
    let after_kill = acked.iter().filter(|(_, t)| *t > killed_at).count();
    eprintln!(
        "acknowledged {} writes, {after_kill} after the kill",
        acked.len()
    );
    assert!(after_kill > 0, "writes resumed after the leader was killed");

    let want: BTreeSet<String> = acked.iter().map(|(i, _)| format!("k/{i:08}")).collect();
    let have = keys(&survivors[0], false)
        .await
        .expect("linearizable range");
    let missing: Vec<_> = want.difference(&have).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");

    eprintln!("--- restart the killed member from its data dir");
    children[leader] = Some(spawn(&members[leader], &initial, tmp.path(), 1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let have = tokio::time::timeout(Duration::from_secs(5), keys(&urls[leader], true)).await;
        if let Ok(Ok(have)) = have
            && want.is_subset(&have)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agreed_leader(&urls, Duration::from_secs(60)).await;

    eprintln!("--- kill -9 every member, restart all from their data dirs");
    for c in children.iter_mut().flatten() {
        let _ = c.kill().await;
    }
    let mut children: Vec<Child> = members
        .iter()
        .map(|m| spawn(m, &initial, tmp.path(), 2))
        .collect();
    agreed_leader(&urls, Duration::from_secs(60)).await;
    for u in &urls {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let have = tokio::time::timeout(Duration::from_secs(5), keys(u, false)).await;
            if let Ok(Ok(have)) = have {
                let missing: Vec<_> = want.difference(&have).collect();
                assert!(
                    missing.is_empty(),
                    "lost after full restart on {u}: {missing:?}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{u} did not serve after restart"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for c in &mut children {
        let _ = c.kill().await;
    }
}

/// `flotilla chaos` against a cluster it did not start: three members started here with
/// `--fault-admin`, the command partitions, delays and slows them through the admin endpoints,
/// and every invariant must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_against_hand_started_cluster_with_fault_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members: Vec<Member> = (0..3)
        .map(|i| Member {
            name: format!("c{i}"),
            client: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            dir: dir.path().join(format!("c{i}")),
        })
        .collect();
    let admins: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let initial = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    let _children: Vec<Child> = members
        .iter()
        .zip(&admins)
        .map(|(m, a)| {
            let log = std::fs::File::create(dir.path().join(format!("{}.log", m.name)))
                .expect("log file");
            Command::new(BIN)
                .args([
                    "store",
                    "--name",
                    &m.name,
                    "--data-dir",
                    m.dir.to_str().expect("utf8 path"),
                    "--listen-client-urls",
                    &m.client,
                    "--listen-peer-urls",
                    &m.peer,
                    "--initial-cluster",
                    &initial,
                    "--fault-admin",
                    a,
                ])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .expect("spawn flotilla store")
        })
        .collect();
    let urls: Vec<String> = members.iter().map(|m| m.client.clone()).collect();
    agreed_leader(&urls, Duration::from_secs(60)).await;
    let history = dir.path().join("history.jsonl");
    let out = Command::new(BIN)
        .args([
            "chaos",
            "--endpoints",
            &urls.join(","),
            "--fault-admin",
            &admins.join(","),
            "--rounds",
            "3",
            "--seed",
            "7",
            "--history",
            history.to_str().expect("utf8 path"),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run flotilla chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "flotilla chaos failed:\n{stdout}\n{stderr}"
    );
    // Faults went through the admin endpoints (seed 7 picks network/disk faults each round).
    assert!(
        stdout.matches(", heal").count() == 3,
        "expected three fault phases:\n{stdout}"
    );
    assert!(stdout.contains("linearizability"), "{stdout}");
    assert!(history.exists(), "history file missing");
}
