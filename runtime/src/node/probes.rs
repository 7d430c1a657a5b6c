//! Liveness, readiness and startup probes, as the kubelet runs them.
//!
//! One task per container of a running sandbox: the startup probe first (if any) until it
//! succeeds once, then liveness and readiness side by side, each every `periodSeconds` after
//! `initialDelaySeconds` (counted from the container start), each attempt bounded by
//! `timeoutSeconds`. A result flips after `successThreshold` consecutive successes or
//! `failureThreshold` consecutive failures. The pod worker reads the outcome:
//! - `ready(c)`: `containerStatuses[].ready` and the Ready/ContainersReady conditions (a
//!   container without a readiness probe is ready once started);
//! - `started(c)`: `containerStatuses[].started`;
//! - `liveness_failure()`: a failed liveness (or startup) probe; the worker kills the sandbox
//!   and the restart policy takes over (restartCount + 1, back-off).
//!
//! Handlers: `exec` through [`PodRuntime::exec`] (exit code 0 is healthy), `httpGet` (status
//! 200–399) and `tcpSocket` (connect) against the probe's `host`, else the pod's own IP
//! (CNI pods) or the node's address (wasm pods share the node's network). HTTPS probes do not verify the certificate, as the
//! kubelet's do not.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::pod::Container;
use api::probe::{IntOrString, Probe};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::pod_runtime::{PodId, PodRuntime};

/// What the probes of one container concluded so far.
#[derive(Debug, Clone, Default)]
struct ContainerResult {
    started: bool,
    ready: bool,
    /// Set once a liveness (or startup) probe failed `failureThreshold` times in a row: the
    /// message and the probe's `terminationGracePeriodSeconds`.
    killed: Option<(String, Option<i64>)>,
}

#[derive(Debug, Default)]
struct Shared {
    containers: BTreeMap<String, ContainerResult>,
    /// `(reason, message)` events for the worker to post.
    events: Vec<(&'static str, String)>,
}

/// The probes of one sandbox; dropping it stops them.
pub(crate) struct Probes {
    id: PodId,
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

impl Probes {
    /// Starts the probes of every container of `pod` (its JSON), running as sandbox `id`.
    /// `host` is the address probes connect to when they name none.
    pub(crate) fn start<R: PodRuntime>(
        runtime: Arc<R>,
        id: PodId,
        pod: &Value,
        host: &str,
    ) -> Probes {
        let containers: Vec<Container> = pod
            .pointer("/spec/containers")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in containers {
            lock(&shared).containers.insert(
                c.name.clone(),
                ContainerResult {
                    started: c.startup_probe.is_none(),
                    ready: c.startup_probe.is_none() && c.readiness_probe.is_none(),
                    killed: None,
                },
            );
            if c.startup_probe.is_none()
                && c.liveness_probe.is_none()
                && c.readiness_probe.is_none()
            {
                continue;
            }
            let ctx = Arc::new(ProbeContext {
                runtime: runtime.clone(),
                id: id.clone(),
                container: c,
                host: host.to_string(),
                started,
                shared: shared.clone(),
            });
            tasks.push(tokio::spawn(container_probes(ctx)));
        }
        Probes { id, shared, tasks }
    }

    /// The sandbox these probes watch.
    pub(crate) fn id(&self) -> &PodId {
        &self.id
    }

    /// Whether `container` passed its startup probe (or has none).
    pub(crate) fn started(&self, container: &str) -> bool {
        lock(&self.shared)
            .containers
            .get(container)
            .is_none_or(|c| c.started)
    }

    /// Whether `container` counts as ready (readiness probe passing, or none and started).
    pub(crate) fn ready(&self, container: &str) -> bool {
        lock(&self.shared)
            .containers
            .get(container)
            .is_none_or(|c| c.ready)
    }

    /// The first container whose liveness or startup probe failed for good, with the message.
    pub(crate) fn liveness_failure(&self) -> Option<(String, String)> {
        lock(&self.shared)
            .containers
            .iter()
            .find_map(|(n, c)| c.killed.clone().map(|(m, _)| (n.clone(), m)))
    }

    /// The failed probe's own `terminationGracePeriodSeconds`, if it set one (it then
    /// replaces the pod's for this kill, as in Kubernetes).
    pub(crate) fn kill_grace_seconds(&self) -> Option<i64> {
        lock(&self.shared)
            .containers
            .values()
            .find_map(|c| c.killed.as_ref().and_then(|(_, g)| *g))
    }

    /// Events to post (`Unhealthy` with the probe's failure), oldest first.
    pub(crate) fn take_events(&self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut lock(&self.shared).events)
    }
}

struct ProbeContext<R> {
    runtime: Arc<R>,
    id: PodId,
    container: Container,
    host: String,
    started: Instant,
    shared: Arc<Mutex<Shared>>,
}

impl<R> ProbeContext<R> {
    fn update(&self, f: impl FnOnce(&mut ContainerResult)) {
        let mut s = lock(&self.shared);
        if let Some(c) = s.containers.get_mut(&self.container.name) {
            f(c);
        }
    }

    fn event(&self, reason: &'static str, message: String) {
        lock(&self.shared).events.push((reason, message));
    }
}

async fn container_probes<R: PodRuntime>(ctx: Arc<ProbeContext<R>>) {
    if let Some(p) = ctx.container.startup_probe.clone() {
        // Runs until the first success (started) or until it fails for good (killed).
        if !run_probe(&ctx, Kind::Startup, &p).await {
            return;
        }
    }
    ctx.update(|c| {
        c.started = true;
        if ctx.container.readiness_probe.is_none() {
            c.ready = true;
        }
    });
    let live = ctx.container.liveness_probe.clone();
    let ready = ctx.container.readiness_probe.clone();
    let l = async {
        if let Some(p) = live {
            run_probe(&ctx, Kind::Liveness, &p).await;
        }
    };
    let r = async {
        if let Some(p) = ready {
            run_probe(&ctx, Kind::Readiness, &p).await;
        }
    };
    // Readiness stops too once liveness killed the container (the task is aborted then).
    tokio::join!(l, r);
}

/// Probes every period. Startup: returns `true` at the first success, `false` when it failed
/// for good. Liveness: returns `false` when it failed for good. Readiness: never returns.
async fn run_probe<R: PodRuntime>(ctx: &ProbeContext<R>, kind: Kind, p: &Probe) -> bool {
    let period = Duration::from_secs(p.period());
    let timeout = Duration::from_secs(p.timeout());
    // Liveness and startup must use a success threshold of 1 (validation in Kubernetes).
    let need_ok = if kind == Kind::Readiness {
        p.success_threshold()
    } else {
        1
    };
    let need_fail = p.failure_threshold();
    let mut next = ctx.started + Duration::from_secs(p.initial_delay());
    let (mut oks, mut fails) = (0u64, 0u64);
    loop {
        tokio::time::sleep_until(next).await;
        next = Instant::now() + period;
        match probe_once(ctx, p, timeout).await {
            Ok(()) => {
                fails = 0;
                oks += 1;
                if oks >= need_ok {
                    match kind {
                        Kind::Startup => return true,
                        Kind::Readiness => ctx.update(|c| c.ready = true),
                        Kind::Liveness => {}
                    }
                }
            }
            Err(why) => {
                oks = 0;
                fails += 1;
                if fails <= need_fail {
                    ctx.event("Unhealthy", format!("{} probe failed: {why}", kind.name()));
                }
                if fails >= need_fail {
                    match kind {
                        Kind::Readiness => ctx.update(|c| c.ready = false),
                        Kind::Liveness | Kind::Startup => {
                            ctx.update(|c| {
                                c.ready = false;
                                c.killed = Some((
                                    format!("{} probe failed: {why}", kind.name()),
                                    p.termination_grace_period_seconds,
                                ));
                            });
                            return false;
                        }
                    }
                }
            }
        }
    }
}

/// One attempt; `Err` carries the failure as the kubelet's event would show it.
async fn probe_once<R: PodRuntime>(
    ctx: &ProbeContext<R>,
    p: &Probe,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(e) = &p.exec {
        let out = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            ctx.runtime
                .exec(&ctx.id, &ctx.container.name, e.command.clone(), timeout),
        )
        .await
        .map_err(|_| format!("command timed out after {}s", timeout.as_secs()))?
        .map_err(|e| e.to_string())?;
        if out.exit_code == 0 {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let text = text.trim();
        return Err(if text.is_empty() {
            format!("command exited with code {}", out.exit_code)
        } else {
            text.to_string()
        });
    }
    if let Some(h) = &p.http_get {
        let port = resolve_port(&ctx.container, &h.port)?;
        let host = h.host.clone().unwrap_or_else(|| ctx.host.clone());
        let tls = h
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let headers: Vec<(String, String)> = h
            .http_headers
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        let scheme = if tls { "https" } else { "http" };
        return tokio::time::timeout(timeout, http_get(tls, &host, port, &path, &headers))
            .await
            .map_err(|_| {
                format!(
                    "Get \"{scheme}://{}{path}\": context deadline exceeded",
                    join_host_port(&host, port)
                )
            })?;
    }
    if let Some(t) = &p.tcp_socket {
        let port = resolve_port(&ctx.container, &t.port)?;
        let host = t.host.clone().unwrap_or_else(|| ctx.host.clone());
        let addr = join_host_port(&host, port);
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
        };
    }
    Err("probe has no handler (exec, httpGet or tcpSocket)".into())
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A port number, or a named port of the container.
fn resolve_port(c: &Container, p: &IntOrString) -> Result<u16, String> {
    let n = match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match name.parse::<i64>() {
            Ok(n) => n,
            Err(_) => c
                .ports
                .iter()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .map(|cp| cp.container_port)
                .ok_or_else(|| format!("port {name:?} not found in container {}", c.name))?,
        },
    };
    u16::try_from(n)
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| format!("invalid port {n}"))
}

/// A minimal HTTP/1.1 GET (over TLS when `tls`); healthy when the status is 200..400
/// (redirects are not followed).
async fn http_get(
    tls: bool,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let addr = join_host_port(host, port);
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{path}");
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("Get \"{url}\": dial tcp {addr}: {e}"))?;
    if !tls {
        return http_exchange(tcp, &url, &addr, path, headers).await;
    }
    // HTTPS probes, like the kubelet's, do not verify the certificate.
    let cfg = apiclient::tls::client_config(apiclient::tls::ServerCheck::Any)
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    http_exchange(s, &url, &addr, path, headers).await
}

async fn http_exchange<S>(
    mut s: S,
    url: &str,
    addr: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    // Only the status line matters; read until it is complete.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get \"{url}\": malformed HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod_runtime::{ExecOutput, PodConfig};
    use crate::testing::{FakeBehavior, FakeRuntime};
    use api::pod::PodSpec;
    use serde_json::json;

    async fn fake_pod(probe_spec: Value) -> (Arc<FakeRuntime>, PodId, Value) {
        let fake = Arc::new(FakeRuntime::new());
        fake.script("forever", FakeBehavior::RunForever);
        let mut c = json!({"name": "c", "image": "forever", "ports": [{"name": "http", "containerPort": 1}]});
        for (k, v) in probe_spec.as_object().expect("object") {
            c[k] = v.clone();
        }
        let pod = json!({"spec": {"containers": [c]}});
        let spec: PodSpec = serde_json::from_value(pod["spec"].clone()).expect("spec");
        let id = fake.run_pod(&PodConfig::new("p", spec)).await.expect("run");
        (fake, id, pod)
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exit(code: i32) -> ExecOutput {
        ExecOutput {
            exit_code: code,
            stdout: b"probe says hi".to_vec(),
            stderr: Vec::new(),
        }
    }

    #[tokio::test]
    async fn readiness_follows_exec_results_with_thresholds() {
        let (fake, id, pod) = fake_pod(json!({"readinessProbe": {
            "exec": {"command": ["check"]}, "periodSeconds": 1, "failureThreshold": 2, "successThreshold": 2,
        }}))
        .await;
        fake.script_exec("check", exit(0));
        let probes = Probes::start(fake.clone(), id, &pod, "127.0.0.1");
        assert!(!probes.ready("c"), "not ready before the first success");
        assert!(probes.started("c"));
        until("ready after 2 successes", || probes.ready("c")).await;
        fake.script_exec("check", exit(1));
        until("unready after 2 failures", || !probes.ready("c")).await;
        let events = probes.take_events();
        assert!(
            events
                .iter()
                .any(|(r, m)| *r == "Unhealthy" && m == "Readiness probe failed: probe says hi"),
            "{events:?}"
        );
        assert!(probes.liveness_failure().is_none(), "readiness never kills");
    }

    #[tokio::test]
    async fn liveness_failure_is_reported_after_the_threshold() {
        let (fake, id, pod) = fake_pod(json!({"livenessProbe": {
            "exec": {"command": ["check"]}, "periodSeconds": 1, "failureThreshold": 2,
            "terminationGracePeriodSeconds": 5,
        }}))
        .await;
        fake.script_exec("check", exit(0));
        let probes = Probes::start(fake.clone(), id, &pod, "127.0.0.1");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(probes.liveness_failure().is_none());
        assert!(probes.ready("c"), "no readiness probe: ready once started");
        fake.script_exec("check", exit(3));
        until("liveness failure", || probes.liveness_failure().is_some()).await;
        let (c, msg) = probes.liveness_failure().expect("failure");
        assert_eq!(c, "c");
        assert_eq!(msg, "Liveness probe failed: probe says hi");
        assert_eq!(
            probes.kill_grace_seconds(),
            Some(5),
            "the probe's own grace period"
        );
    }

    #[tokio::test]
    async fn startup_gates_readiness_and_http_tcp_probe_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = healthy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let ok = h.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let resp = if ok {
                        "HTTP/1.1 200 OK\r\n\r\n"
                    } else {
                        "HTTP/1.1 503 Service Unavailable\r\n\r\n"
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        let (fake, id, pod) = fake_pod(json!({
            "ports": [{"name": "web", "containerPort": port}],
            "startupProbe": {"httpGet": {"path": "/healthz", "port": "web"}, "periodSeconds": 1, "failureThreshold": 30},
            "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
        }))
        .await;
        let probes = Probes::start(fake, id, &pod, "127.0.0.1");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!probes.started("c"), "startup probe still failing (503)");
        assert!(!probes.ready("c"), "readiness gated by startup");
        let events = probes.take_events();
        assert!(
            events
                .iter()
                .any(|(_, m)| m == "Startup probe failed: HTTP probe failed with statuscode: 503"),
            "{events:?}"
        );
        healthy.store(true, std::sync::atomic::Ordering::SeqCst);
        until("started", || probes.started("c")).await;
        until("ready through tcpSocket", || probes.ready("c")).await;
        assert!(probes.liveness_failure().is_none());
    }

    #[tokio::test]
    async fn https_probe_ignores_the_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                    let resp = if ok {
                        "HTTP/1.1 204 No Content\r\n\r\n"
                    } else {
                        "HTTP/1.1 500 Oops\r\n\r\n"
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        assert_eq!(http_get(true, "127.0.0.1", port, "/ok", &[]).await, Ok(()));
        assert_eq!(
            http_get(true, "127.0.0.1", port, "/bad", &[]).await,
            Err("HTTP probe failed with statuscode: 500".into())
        );
        assert!(
            http_get(false, "127.0.0.1", port, "/ok", &[])
                .await
                .is_err(),
            "plain HTTP to a TLS port"
        );
    }

    #[test]
    fn named_and_numeric_ports() {
        let c: Container = serde_json::from_value(
            json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}),
        )
        .expect("container");
        assert_eq!(
            resolve_port(&c, &IntOrString::String("http".into())),
            Ok(8080)
        );
        assert_eq!(resolve_port(&c, &IntOrString::String("81".into())), Ok(81));
        assert_eq!(resolve_port(&c, &IntOrString::Int(9)), Ok(9));
        assert!(resolve_port(&c, &IntOrString::String("nope".into())).is_err());
        assert!(resolve_port(&c, &IntOrString::Int(70000)).is_err());
    }
}
