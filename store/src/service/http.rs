//! The plain-HTTP endpoints etcd serves on its client port beside gRPC: `/health` (what
//! Kubernetes probes and load balancers check), `/version`, and `/metrics` (Prometheus text
//! format, with etcd's metric names where Flotilla has the same quantity), so the usual
//! monitoring and `etcdctl check datascale` work unchanged.
//!
//! A client connection is told apart by its first bytes: gRPC clients open with the HTTP/2
//! preface (`PRI * HTTP/2.0…`), anything else is served as HTTP/1.1 here.
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::node::Inner;

/// How long a connection may stay silent before it is handed to gRPC unclassified.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// `/health` fails when a linearizable read takes longer (etcd bounds its QGET the same way).
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The version this store reports, as the gRPC `Status` does.
const VERSION_JSON: &str = r#"{"etcdserver":"3.4.0","etcdcluster":"3.4.0"}"#;

/// Whether the client on `tcp` speaks HTTP/1 (its first bytes are not the HTTP/2 preface's).
pub(crate) async fn is_http1(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 3];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 {
            return false;
        }
        if !b"PRI".starts_with(&buf[..n]) {
            return true;
        }
        if n == buf.len() {
            return false;
        }
        // A prefix of "PRI" so far ("P" could still be "PUT"): wait for more.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one HTTP/1.1 connection until the client closes it or the member stops.
pub(crate) async fn serve(inner: Arc<Inner>, tcp: TcpStream) {
    let cancel = inner.cancel.clone();
    let service = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        async move { Ok::<_, std::convert::Infallible>(route(&inner, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP/1 client connection ended");
            }
        }
        _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "Method Not Allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/health" => {
            let (healthy, reason) = health(inner).await;
            let body = serde_json::json!({
                "health": if healthy { "true" } else { "false" },
                "reason": reason,
            })
            .to_string();
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", body)
        }
        "/version" => reply(StatusCode::OK, "application/json", VERSION_JSON.into()),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(inner),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "404 page not found\n".into(),
        ),
    }
}

/// etcd 3.4's health check: no active alarm, a known leader, and a linearizable read that
/// completes in time.
async fn health(inner: &Inner) -> (bool, String) {
    let alarm = inner.sm.read().mvcc.alarms().next();
    if let Some((member, alarm)) = alarm {
        return (
            false,
            format!("ALARM {} (member {member:x})", super::alarm_name(alarm)),
        );
    }
    if inner.raft.metrics().borrow().current_leader.is_none() {
        return (false, "RAFT NO LEADER".into());
    }
    match tokio::time::timeout(HEALTH_READ_TIMEOUT, inner.linearizable_barrier()).await {
        Ok(Ok(())) => (true, String::new()),
        Ok(Err(e)) => (false, format!("QGET ERROR:{e}")),
        Err(_) => (false, "QGET ERROR:timed out".into()),
    }
}

/// One metric in the Prometheus text format.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn metrics(inner: &Inner) -> String {
    let mut out = String::with_capacity(4096);
    let m = inner.raft.metrics().borrow().clone();
    let stats = &inner.stats;
    let (revision, compact_revision, in_use, nospace) = {
        let st = inner.sm.read();
        (
            st.mvcc.revision(),
            st.mvcc.compact_revision(),
            st.mvcc.size(),
            st.mvcc.nospace(),
        )
    };
    let has_leader = u8::from(m.current_leader.is_some());
    let is_leader = u8::from(m.current_leader == Some(inner.id));
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric(
        &mut out,
        "etcd_server_has_leader",
        "gauge",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        has_leader,
    );
    metric(
        &mut out,
        "etcd_server_is_leader",
        "gauge",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        is_leader,
    );
    metric(
        &mut out,
        "etcd_server_leader_changes_seen_total",
        "counter",
        "The number of leader changes seen.",
        g(&stats.leader_changes),
    );
    metric(
        &mut out,
        "etcd_server_proposals_applied_total",
        "gauge",
        "The total number of consensus proposals applied.",
        m.last_applied.map_or(0, |l| l.index),
    );
    metric(
        &mut out,
        "flotilla_store_raft_term",
        "gauge",
        "The current Raft term of this member.",
        m.current_term,
    );
    metric(
        &mut out,
        "etcd_server_quota_backend_bytes",
        "gauge",
        "Current backend storage quota size in bytes.",
        inner.tunables.quota_backend_bytes,
    );
    metric(
        &mut out,
        "etcd_mvcc_db_total_size_in_bytes",
        "gauge",
        "Total size of the underlying database physically allocated in bytes.",
        inner.sm.db_size(),
    );
    metric(
        &mut out,
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "gauge",
        "Total size of the underlying database logically in use in bytes.",
        in_use,
    );
    metric(
        &mut out,
        "etcd_debugging_mvcc_current_revision",
        "gauge",
        "The current revision of store.",
        revision,
    );
    metric(
        &mut out,
        "etcd_debugging_mvcc_compact_revision",
        "gauge",
        "The revision of the last compaction in store.",
        compact_revision,
    );
    metric(
        &mut out,
        "flotilla_store_nospace_alarm",
        "gauge",
        "Whether the NOSPACE alarm is active in the cluster.",
        u8::from(nospace),
    );
    stats.write_flush_histogram(&mut out, "etcd_disk_wal_fsync_duration_seconds");
    metric(
        &mut out,
        "flotilla_store_applied_entries_total",
        "counter",
        "Raft entries applied to the state machine.",
        g(&stats.applied_entries),
    );
    metric(
        &mut out,
        "flotilla_store_proposals_total",
        "counter",
        "Group-commit proposals made as leader (each one Raft entry).",
        g(&stats.proposals),
    );
    process_metrics(&mut out);
    out
}

/// The standard `process_*` metrics of the Prometheus client libraries, from `/proc/self`.
fn process_metrics(out: &mut String) {
    // Kernel clock ticks per second as /proc reports times (USER_HZ, 100 on Linux).
    const TICKS: f64 = 100.0;
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        if let Some(rss) = kib("VmRSS:") {
            metric(
                out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * 1024,
            );
        }
        if let Some(vm) = kib("VmSize:") {
            metric(
                out,
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vm * 1024,
            );
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name, which may itself hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            metric(
                out,
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                (u + s) / TICKS,
            );
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let (Some(start), Some(boot)) = (ticks(19), boot) {
            metric(
                out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + start / TICKS,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count(),
        );
    }
}
