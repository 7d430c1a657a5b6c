//! The real etcd 3.4 client (`etcdctl` from Debian's etcd-client) against a 3-member store.
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::harness::{TestCluster, init_tracing, test_tunables, wait_until};

const ETCDCTL: &str = "/usr/bin/etcdctl";

fn etcdctl(endpoints: &str) -> Command {
    let mut c = Command::new(ETCDCTL);
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=15s")
        .arg("--dial-timeout=5s")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs etcdctl, returns (success, stdout, stderr).
async fn run(endpoints: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd = etcdctl(endpoints);
    cmd.args(args);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .expect("spawn etcdctl (apt install etcd-client)");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().expect("stdin");
        s.write_all(input.as_bytes()).await.expect("write stdin");
        drop(s);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("etcdctl finished")
        .expect("etcdctl output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    tracing::info!(?args, %stdout, %stderr, "etcdctl");
    (out.status.success(), stdout, stderr)
}

async fn ok(endpoints: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = run(endpoints, args, None).await;
    assert!(success, "etcdctl {args:?} failed: {stdout} {stderr}");
    stdout
}

fn header_revision(json: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(json).expect("json output");
    v["header"]["revision"].as_i64().expect("revision")
}

/// A background `etcdctl watch` whose output is collected until it is stopped.
struct WatchChild {
    child: tokio::process::Child,
}

impl WatchChild {
    fn spawn(endpoints: &str, args: &[&str]) -> Self {
        let mut cmd = etcdctl(endpoints);
        cmd.arg("watch").args(args);
        Self {
            child: cmd.spawn().expect("spawn etcdctl watch"),
        }
    }

    /// Reads output until `needle` appears (stdout and stderr together).
    async fn expect_output(&mut self, needle: &str, timeout: Duration) -> String {
        let mut out = self.child.stdout.take().expect("stdout");
        let mut err = self.child.stderr.take().expect("stderr");
        let mut buf = String::new();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        while !buf.contains(needle) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "watch output lacks {needle:?}: {buf}");
            tokio::select! {
                n = out.read(&mut a) => match n {
                    Ok(0) | Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; }
                    Ok(n) => buf.push_str(&String::from_utf8_lossy(&a[..n])),
                },
                n = err.read(&mut b) => match n {
                    Ok(0) | Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; }
                    Ok(n) => buf.push_str(&String::from_utf8_lossy(&b[..n])),
                },
                _ = tokio::time::sleep(left) => {}
            }
        }
        buf
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_against_three_members() {
    init_tracing();
    let c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let follower = (leader + 1) % 3;
    let all = (0..3)
        .map(|i| c.client_url(i))
        .collect::<Vec<_>>()
        .join(",");
    let lead = c.client_url(leader);
    let foll = c.client_url(follower);

    // put / get through a follower (forwarded to the leader).
    assert_eq!(ok(&foll, &["put", "foo", "bar"]).await.trim(), "OK");
    let rev1 = header_revision(&ok(&foll, &["get", "foo", "-w", "json"]).await);
    assert_eq!(ok(&lead, &["put", "foo", "baz"]).await.trim(), "OK");
    ok(&all, &["put", "foo/a", "1"]).await;
    ok(&all, &["put", "foo/b", "2"]).await;
    assert_eq!(
        ok(&foll, &["get", "--prefix", "foo/"]).await,
        "foo/a\n1\nfoo/b\n2\n"
    );
    // get --rev sees the old value.
    assert_eq!(
        ok(&foll, &["get", "foo", &format!("--rev={rev1}")]).await,
        "foo\nbar\n"
    );
    // del
    assert_eq!(ok(&all, &["del", "foo/a"]).await.trim(), "1");
    assert_eq!(ok(&lead, &["get", "foo/a"]).await, "");

    // txn in its stdin form: compares, blank line, success ops, blank line, failure ops.
    let (success, out, err) = run(
        &foll,
        &["txn"],
        Some("value(\"foo\") = \"baz\"\n\nput txnkey yes\n\nput txnkey no\n\n"),
    )
    .await;
    assert!(success, "txn failed: {err}");
    assert!(out.starts_with("SUCCESS"), "txn output: {out}");
    assert_eq!(
        ok(&lead, &["get", "txnkey", "--print-value-only"])
            .await
            .trim(),
        "yes"
    );
    let (success, out, _) = run(
        &foll,
        &["txn"],
        Some("value(\"foo\") = \"nope\"\n\nput txnkey yes2\n\nput txnkey no\n\n"),
    )
    .await;
    assert!(success);
    assert!(out.starts_with("FAILURE"), "txn output: {out}");
    assert_eq!(
        ok(&lead, &["get", "txnkey", "--print-value-only"])
            .await
            .trim(),
        "no"
    );

    // More read and delete forms.
    assert_eq!(
        ok(&foll, &["get", "foo/", "--from-key", "--keys-only"]).await,
        "foo/b\n\ntxnkey\n\n"
    );
    assert_eq!(
        ok(
            &foll,
            &[
                "get",
                "--prefix",
                "foo",
                "--sort-by=KEY",
                "--order=DESCEND",
                "--keys-only"
            ]
        )
        .await,
        "foo/b\n\nfoo\n\n"
    );
    ok(&foll, &["put", "gone/1", "x"]).await;
    ok(&foll, &["put", "gone/2", "x"]).await;
    assert_eq!(ok(&foll, &["del", "--prefix", "gone/"]).await.trim(), "2");
    assert_eq!(ok(&foll, &["get", "gone/1", "--consistency=s"]).await, "");

    // watch in another process sees a put.
    let now = header_revision(&ok(&lead, &["get", "foo", "-w", "json"]).await);
    let mut watch = WatchChild::spawn(&foll, &["wkey", &format!("--rev={}", now + 1)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&lead, &["put", "wkey", "wval"]).await;
    let seen = watch.expect_output("wval", Duration::from_secs(20)).await;
    assert!(seen.contains("PUT\nwkey\nwval"), "watch output: {seen}");
    drop(watch);

    // leases: grant, keep-alive --once, put --lease, expiry deletes the key.
    let out = ok(&foll, &["lease", "grant", "8"]).await;
    // "lease 694d77aa9e38260f granted with TTL(3s)"
    let id = out.split_whitespace().nth(1).expect("lease id").to_owned();
    let out = ok(&foll, &["lease", "keep-alive", "--once", &id]).await;
    assert!(out.contains("keepalived with TTL(8)"), "keep-alive: {out}");
    assert_eq!(
        ok(&foll, &["put", "--lease", &id, "leased", "v"])
            .await
            .trim(),
        "OK"
    );
    let out = ok(&foll, &["lease", "timetolive", "--keys", &id]).await;
    assert!(out.contains("leased"), "timetolive: {out}");
    assert_eq!(
        ok(&lead, &["get", "leased", "--print-value-only"])
            .await
            .trim(),
        "v"
    );
    let lead2 = lead.clone();
    wait_until("leased key to expire", Duration::from_secs(40), || {
        let lead = lead2.clone();
        async move { ok(&lead, &["get", "leased"]).await.is_empty() }
    })
    .await;
    let out = ok(&foll, &["lease", "timetolive", &id]).await;
    assert!(
        out.contains("already expired"),
        "timetolive after expiry: {out}"
    );

    // lease list / revoke.
    let out = ok(&foll, &["lease", "grant", "100"]).await;
    let id2 = out.split_whitespace().nth(1).expect("lease id").to_owned();
    assert!(ok(&lead, &["lease", "list"]).await.contains(&id2));
    ok(&foll, &["put", "--lease", &id2, "revoked", "v"]).await;
    let out = ok(&foll, &["lease", "revoke", &id2]).await;
    assert!(out.contains("revoked"), "lease revoke: {out}");
    assert_eq!(ok(&lead, &["get", "revoked"]).await, "");
    let (success, _, err) = run(&foll, &["lease", "revoke", &id2], None).await;
    assert!(!success);
    assert!(err.contains("requested lease not found"), "{err}");
    assert_eq!(ok(&foll, &["alarm", "list"]).await, "");

    // member list / member add / endpoint status.
    let out = ok(&foll, &["member", "list"]).await;
    assert_eq!(out.lines().count(), 3, "member list: {out}");
    for i in 0..3 {
        assert!(
            out.contains(&format!(", n{}, ", i + 1)),
            "member list: {out}"
        );
        assert!(
            out.contains(&c.client_url(i)),
            "member list lacks client url: {out}"
        );
    }
    let out = ok(
        &foll,
        &["member", "add", "n4", "--peer-urls=http://127.0.0.1:1"],
    )
    .await;
    assert!(out.contains("added to cluster"), "member add: {out}");
    let out = ok(&lead, &["member", "list"]).await;
    assert_eq!(out.lines().count(), 4, "member list after add: {out}");
    assert!(
        out.contains("unstarted"),
        "new member shows as unstarted: {out}"
    );
    let new_id = out
        .lines()
        .find(|l| l.contains("unstarted"))
        .and_then(|l| l.split(',').next())
        .expect("new member id")
        .to_owned();
    ok(&lead, &["member", "remove", &new_id]).await;
    assert_eq!(ok(&lead, &["member", "list"]).await.lines().count(), 3);

    // etcdctl 3.4 reports health on stderr.
    let (success, out, err) = run(&all, &["endpoint", "health"], None).await;
    assert!(success, "endpoint health: {out} {err}");
    let both = format!("{out}{err}");
    assert_eq!(
        both.matches("is healthy").count(),
        3,
        "endpoint health: {both}"
    );
    // Every member names the same leader, the one the cluster has now. Not necessarily the
    // one found at the start: a disk stall (CI once had a 4 s one right after a cold build)
    // can move leadership mid-test, as it would in etcd. A status taken during an election
    // may disagree, so it is read again until the members agree.
    let all2 = all.clone();
    let ids: Vec<u64> = (0..3).map(|i| c.node(i).id()).collect();
    wait_until(
        "members to agree on the leader",
        Duration::from_secs(30),
        || {
            let all = all2.clone();
            let ids = ids.clone();
            async move {
                let out = ok(&all, &["endpoint", "status", "-w", "json"]).await;
                let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
                let arr = v.as_array().expect("array");
                assert_eq!(arr.len(), 3, "endpoint status: {out}");
                let mut leaders = Vec::new();
                for s in arr {
                    assert_eq!(s["Status"]["version"], "3.4.0", "endpoint status: {out}");
                    leaders.push(s["Status"]["leader"].as_u64());
                }
                let agreed = leaders.windows(2).all(|w| w[0] == w[1]);
                agreed && leaders[0].is_some_and(|l| ids.contains(&l))
            }
        },
    )
    .await;

    // Members with the same applied state report the same hash.
    let rev = header_revision(&ok(&lead, &["get", "foo", "-w", "json"]).await);
    for i in 0..3 {
        // A linearizable read makes each member apply everything up to `rev`.
        ok(&c.client_url(i), &["get", "foo"]).await;
    }
    let out = ok(
        &all,
        &["endpoint", "hashkv", &format!("--rev={rev}"), "-w", "json"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).expect("hashkv json");
    let hashes: Vec<u64> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|h| h["HashKV"]["hash"].as_u64().expect("hash"))
        .collect();
    assert_eq!(hashes.len(), 3);
    assert!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "hashes differ: {hashes:?}"
    );

    // compaction, then a watch from a compacted revision is refused.
    let rev = header_revision(&ok(&lead, &["get", "foo", "-w", "json"]).await);
    let out = ok(&foll, &["compaction", &rev.to_string()]).await;
    assert!(
        out.contains(&format!("compacted revision {rev}")),
        "compaction: {out}"
    );
    let mut watch = WatchChild::spawn(&foll, &["foo", "--rev=1"]);
    let out = watch
        .expect_output(
            "required revision has been compacted",
            Duration::from_secs(20),
        )
        .await;
    assert!(out.contains("compacted"), "{out}");
    drop(watch);
    let (success, _, err) = run(&foll, &["get", "foo", "--rev=1"], None).await;
    assert!(!success);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );

    c.shutdown().await;
}

/// `etcdctl member update`: a member moved to a new peer address keeps its id and rejoins
/// there; an unknown id and a taken URL are refused with etcd's errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_update_moves_a_member_to_a_new_peer_url() {
    init_tracing();
    let mut c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let moved = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let moved_id = c.node(moved).id();
    let other_url = c.client_url(other);
    ok(&other_url, &["put", "before", "1"]).await;

    c.kill(moved).await;
    // The URL the member will listen on: reserve a port, free it for the restart.
    let new_url = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let out = ok(
        &other_url,
        &[
            "member",
            "update",
            &format!("{moved_id:x}"),
            &format!("--peer-urls={new_url}"),
        ],
    )
    .await;
    assert!(
        out.contains(&format!("Member {moved_id:16x} updated")),
        "member update: {out}"
    );
    let list = ok(&other_url, &["member", "list"]).await;
    assert!(list.contains(&new_url), "member list after update: {list}");

    // Refusals, with etcd's codes and texts.
    let (success, _, err) = run(
        &other_url,
        &[
            "member",
            "update",
            "1234abcd",
            &format!("--peer-urls={new_url}"),
        ],
        None,
    )
    .await;
    assert!(!success && err.contains("member not found"), "{err}");
    let taken = c.configs[leader].listen_peer_addr;
    let (success, _, err) = run(
        &other_url,
        &[
            "member",
            "update",
            &format!("{moved_id:x}"),
            &format!("--peer-urls=http://{taken}"),
        ],
        None,
    )
    .await;
    assert!(
        !success && err.contains("Peer URLs already exists"),
        "{err}"
    );

    ok(&other_url, &["put", "while-away", "2"]).await;
    c.restart_with_peer_url(moved, &new_url).await;
    assert_eq!(c.node(moved).id(), moved_id, "the member keeps its id");
    let moved_url = c.client_url(moved);
    wait_until("moved member to catch up", Duration::from_secs(30), || {
        let u = moved_url.clone();
        async move {
            let (success, out, _) = run(&u, &["get", "while-away", "--consistency=s"], None).await;
            success && out == "while-away\n2\n"
        }
    })
    .await;
    // It takes part in commits again: a write through it, read back from the others.
    ok(&moved_url, &["put", "after", "3"]).await;
    for i in 0..3 {
        assert_eq!(
            ok(&c.client_url(i), &["get", "after", "--print-value-only"]).await,
            "3\n"
        );
    }
    let list = ok(&moved_url, &["member", "list"]).await;
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(
        list.contains(&format!("{moved_id:x}, started")) && list.contains(&new_url),
        "{list}"
    );
    c.shutdown().await;
}

/// `etcdctl move-leader` hands leadership to the named member while a client keeps writing
/// through a third member and another reads through the old leader: both wait during the
/// hand-over and nothing fails. A transferee
/// that is not a voter is refused with etcd's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_hands_over_while_writes_continue() {
    init_tracing();
    let c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let target = (leader + 1) % 3;
    let writer = (leader + 2) % 3;
    let target_id = c.node(target).id();
    let all = (0..3)
        .map(|i| c.client_url(i))
        .collect::<Vec<_>>()
        .join(",");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut kv = c.kv(writer).await;
    let stop2 = stop.clone();
    let writes = tokio::spawn(async move {
        let (mut ok, mut failed, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let t = std::time::Instant::now();
            let r = kv
                .put(store::pb::etcdserverpb::PutRequest {
                    key: format!("ml/{ok:05}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
                .await;
            slowest = slowest.max(t.elapsed());
            match r {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.message().to_owned()),
            }
        }
        (ok, failed, slowest)
    });
    // Linearizable reads through the old leader: their quorum rounds must not keep the
    // followers' lease alive (they wait for the hand-over too).
    let mut kv_read = c.kv(leader).await;
    let stop3 = stop.clone();
    let reads = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !stop3.load(std::sync::atomic::Ordering::Relaxed) {
            let r = kv_read
                .range(store::pb::etcdserverpb::RangeRequest {
                    key: b"ml/".to_vec(),
                    range_end: b"ml0".to_vec(),
                    count_only: true,
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.message().to_owned()),
            }
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = std::time::Instant::now();
    let out = ok(&all, &["move-leader", &format!("{target_id:x}")]).await;
    let took = started.elapsed();
    assert!(
        out.contains(&format!(
            "Leadership transferred from {:x} to {target_id:x}",
            c.node(leader).id()
        )),
        "move-leader: {out}"
    );
    assert_eq!(c.wait_leader(Duration::from_secs(10)).await, target);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (written, failed, slowest) = writes.await.expect("writer");
    eprintln!("move-leader took {took:?}; {written} writes meanwhile, slowest {slowest:?}");
    assert!(
        failed.is_empty(),
        "writes failed during the hand-over: {failed:?}"
    );
    assert!(written > 10, "the writer made progress: {written}");
    let (read, failed) = reads.await.expect("reader");
    assert!(
        failed.is_empty(),
        "reads failed during the hand-over: {failed:?}"
    );
    assert!(read > 10, "the reader made progress: {read}");
    // Every acknowledged write is there, read through the new leader.
    let keys = ok(
        &c.client_url(target),
        &["get", "ml/", "--prefix", "--keys-only"],
    )
    .await;
    let count = keys.lines().filter(|l| !l.is_empty()).count();
    assert_eq!(count, written as usize, "acknowledged writes present");

    // Only voters can lead.
    let (success, _, err) = run(&all, &["move-leader", "1234abcd"], None).await;
    assert!(!success && err.contains("bad leader transferee"), "{err}");
    c.shutdown().await;
}

/// The NOSPACE alarm is cluster state, as in etcd: raised by one member's quota check, it is
/// listed by every member, caps writes through every member (deletes and compaction still
/// go through), survives a restart, and `etcdctl alarm disarm` through any member clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_is_cluster_wide() {
    init_tracing();
    let tunables = store::Tunables {
        quota_backend_bytes: 64 * 1024,
        ..test_tunables()
    };
    let mut c = TestCluster::start(3, tunables).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let (filler, lister, writer) = ((leader + 1) % 3, (leader + 2) % 3, leader);
    let filler_id = c.node(filler).id();
    let mut kv = c.kv(filler).await;
    let refused = crate::harness::put_until_refused(&mut kv, "fill/").await;
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );

    let list = ok(&c.client_url(lister), &["alarm", "list"]).await;
    assert_eq!(
        list.trim(),
        format!("memberID:{filler_id} alarm:NOSPACE"),
        "alarm list through another member"
    );
    let (success, _, stderr) = run(&c.client_url(writer), &["put", "small", "v"], None).await;
    assert!(!success, "a put through a third member is refused");
    assert!(
        stderr.contains("etcdserver: mvcc: database space exceeded"),
        "{stderr}"
    );
    let status = ok(&c.client_url(writer), &["endpoint", "status", "-w", "json"]).await;
    assert!(
        status.contains("alarm:NOSPACE"),
        "endpoint status: {status}"
    );
    let (code, body) = crate::harness::http_get(&c.client_url(writer), "/health").await;
    assert_eq!(code, 503, "/health while the alarm is active: {body}");
    assert!(body.contains("NOSPACE"), "{body}");

    // Persisted with the log: a restarted member still refuses.
    c.kill(lister).await;
    c.restart(lister).await;
    c.wait_leader(Duration::from_secs(30)).await;
    let list = ok(&c.client_url(lister), &["alarm", "list"]).await;
    assert!(list.contains("alarm:NOSPACE"), "after restart: {list}");
    let (success, _, _) = run(&c.client_url(lister), &["put", "small", "v"], None).await;
    assert!(!success, "a restarted member still refuses puts");

    // etcd's way out: free space (delete, compact), then disarm.
    ok(&c.client_url(writer), &["del", "--prefix", "fill/"]).await;
    let rev = header_revision(&ok(&c.client_url(writer), &["get", "x", "-w", "json"]).await);
    ok(&c.client_url(writer), &["compact", &rev.to_string()]).await;
    let disarmed = ok(&c.client_url(lister), &["alarm", "disarm"]).await;
    assert!(disarmed.contains("alarm:NOSPACE"), "disarm: {disarmed}");
    for i in 0..3 {
        assert_eq!(ok(&c.client_url(i), &["alarm", "list"]).await.trim(), "");
        let (code, body) = crate::harness::http_get(&c.client_url(i), "/health").await;
        assert_eq!(code, 200, "/health after disarm: {body}");
        ok(&c.client_url(i), &["put", &format!("after/{i}"), "v"]).await;
    }
    c.shutdown().await;
}

/// `etcdctl check datascale` reads the member's Prometheus `/metrics` (plain HTTP on the
/// client port) before and after writing 10,000 keys through it, then deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_datascale_reads_metrics_over_http() {
    init_tracing();
    let c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let follower = c.client_url((leader + 1) % 3);
    let out = ok(&follower, &["check", "datascale", "--load=s"]).await;
    assert!(
        out.contains("PASS: Approximate system memory used"),
        "check datascale: {out}"
    );
    // It wrote under its own prefix and cleaned up after itself.
    let left = ok(
        &follower,
        &[
            "get",
            "--prefix",
            "/etcdctl-check-datascale/",
            "--keys-only",
        ],
    )
    .await;
    assert_eq!(left.trim(), "", "keys left by check datascale");
    let written = ok(&follower, &["get", "x", "-w", "json"]).await;
    assert!(header_revision(&written) > 10_000, "{written}");
    c.shutdown().await;
}

/// Backup and disaster recovery as etcd operators do it: `etcdctl snapshot save` from a live
/// member, the file restored into three new data dirs (`store::restore`, which
/// `flotilla snapshot restore` runs), and the new cluster serving the same keys, versions and
/// revision, then taking writes. A damaged file and a used data dir are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_and_restore() {
    init_tracing();
    let c = TestCluster::start(3, test_tunables()).await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let all = (0..3)
        .map(|i| c.client_url(i))
        .collect::<Vec<_>>()
        .join(",");
    for i in 0..40 {
        ok(
            &all,
            &["put", &format!("/backup/k{i:02}"), &format!("v{i}")],
        )
        .await;
    }
    ok(&all, &["put", "/backup/k00", "changed"]).await;
    ok(&all, &["del", "/backup/k01"]).await;
    let before = ok(&all, &["get", "/backup/", "--prefix", "-w", "json"]).await;
    let revision = header_revision(&before);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("backup.db");
    let file_arg = file.to_str().expect("utf-8 path");
    // etcdctl saves from exactly one endpoint; a follower's model is as good as the leader's.
    let follower = c.client_url((leader + 1) % 3);
    let saved = ok(&follower, &["snapshot", "save", file_arg]).await;
    assert!(saved.contains("Snapshot saved"), "{saved}");
    let mut config = c.configs[0].clone();
    c.shutdown().await;

    // A damaged copy is refused with the reason; nothing is written.
    let damaged = dir.path().join("damaged.db");
    let bytes = std::fs::read(&file).expect("read backup");
    let mut bad = bytes.clone();
    bad[100] ^= 0xff;
    std::fs::write(&damaged, &bad).expect("write damaged copy");
    let target = dir.path().join("never");
    config.data_dir = target.clone();
    let err = store::restore(&damaged, &config)
        .await
        .expect_err("a damaged file is refused");
    assert!(err.to_string().contains("SHA-256 mismatch"), "{err}");
    assert!(!target.exists(), "nothing written for a damaged file");

    let r = TestCluster::start_restored(3, test_tunables(), &file).await;
    r.wait_leader(Duration::from_secs(30)).await;
    let all = (0..3)
        .map(|i| r.client_url(i))
        .collect::<Vec<_>>()
        .join(",");
    let after = ok(&all, &["get", "/backup/", "--prefix", "-w", "json"]).await;
    let kvs = |json: &str| {
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        v["kvs"].clone()
    };
    assert_eq!(kvs(&after), kvs(&before), "same keys, values and versions");
    assert!(header_revision(&after) >= revision);
    // Every member serves it locally too (serializable reads are not forwarded).
    for i in 0..3 {
        let local = ok(
            &r.client_url(i),
            &[
                "get",
                "/backup/k00",
                "--consistency=s",
                "--print-value-only",
            ],
        )
        .await;
        assert_eq!(local.trim(), "changed", "member {i}");
    }
    // The old history came along (until a compaction drops it), and writes go on after it.
    let k00 = "/backup/k00";
    let created = kvs(&before)
        .as_array()
        .into_iter()
        .flatten()
        .find(|kv| kv["key"].as_str().is_some_and(|k| b64(k) == k00))
        .and_then(|kv| kv["create_revision"].as_i64())
        .expect("k00 in the listing");
    let old = ok(
        &all,
        &[
            "get",
            k00,
            &format!("--rev={created}"),
            "--print-value-only",
        ],
    )
    .await;
    assert_eq!(old.trim(), "v0");
    ok(&all, &["put", "/backup/new", "after-restore"]).await;
    let new = ok(&all, &["get", "/backup/new", "-w", "json"]).await;
    assert!(header_revision(&new) > revision);
    let members = ok(&all, &["member", "list"]).await;
    assert_eq!(members.lines().count(), 3, "{members}");

    // Restoring over a data dir in use is refused.
    let mut used = r.configs[0].clone();
    used.initial_cluster_token = "restored".into();
    let err = store::restore(&file, &used)
        .await
        .expect_err("a used data dir is refused");
    assert!(err.to_string().contains("not empty"), "{err}");
    r.shutdown().await;
}

/// Decodes etcdctl's base64 JSON keys (standard alphabet, padded).
fn b64(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        bits = (bits << 6) | v as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
