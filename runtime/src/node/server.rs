//! The agent's kubelet-style HTTPS server: container logs and exec, for the API server only.
//!
//! # Security
//!
//! - **TLS:** a fresh self-signed serving certificate per agent start. The agent publishes the
//!   SHA-256 of its DER in the Node annotation [`SERVING_CERT_ANNOTATION`] (only the node itself
//!   and cluster admins may write its Node), and the API server pins it when it connects, so the
//!   API server never sends its credential to anything but this agent.
//! - **Who may call:** every request must carry `Authorization: Bearer <kubelet token>`, where the
//!   kubelet token is [`kubelet_token`] of the node's own bearer token: a one-way derivation that
//!   the API server (which derives every node token from its node secret) and this agent can
//!   compute, and nobody else who lacks that node's token. Anything else gets 401. An agent
//!   without a node token serves nothing.
//!
//! # Endpoints (paths as the kubelet's)
//!
//! - `GET /containerLogs/{namespace}/{pod}/{container}` with `follow`, `tailLines`,
//!   `sinceSeconds`, `sinceTime`, `timestamps`, `limitBytes`, `previous`: the container's log
//!   as plain text (the CRI log format unwrapped); `follow` streams new lines until the
//!   container ends; `previous` (and a pod between two instances) reads the [`LogArchive`].
//! - `GET|POST /exec/{namespace}/{pod}/{container}?command=…&stdin=&stdout=&stderr=&tty=`, a
//!   WebSocket upgrade with subprotocol `v5.channel.k8s.io` or `v4.channel.k8s.io` (what the
//!   API server passes through from kubectl): runs the command through
//!   [`PodRuntime::exec_stream`], relaying stdin, output and terminal resizes as they come,
//!   then the exit status on channel 3 (see `crate::websocket`).
//! - `GET|POST /attach/{namespace}/{pod}/{container}?stdin=&stdout=&stderr=&tty=`: the same
//!   session over [`PodRuntime::attach`], the container's own stdio.
//! - `GET /portForward/{namespace}/{pod}?ip=…`, a WebSocket upgrade with subprotocol
//!   `SPDY/3.1+portforward.k8s.io` (kubectl's tunnel): each forwarded connection is dialled
//!   to `ip` (the pod's address as the API server knows it; the node itself by default) and
//!   the port kubectl names (see `crate::spdy`).
//!
//! Errors are Kubernetes `Status` objects (`404 NotFound` for an unknown pod or container,
//! `400 BadRequest` for a container that is not running, `401`, `501` when the runtime cannot
//! exec).
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pod_runtime::{PodId, PodRuntime, RuntimeError, SandboxState};

/// Node annotation holding the hex SHA-256 of the agent's serving certificate (DER).
pub const SERVING_CERT_ANNOTATION: &str = "flotilla.dev/kubelet-serving-cert-sha256";

/// The kubelet port Kubernetes uses.
pub const DEFAULT_SERVING_PORT: u16 = 10250;

/// Most bytes of a previous container instance's log that are kept (its tail).
const MAX_ARCHIVED_BYTES: usize = 1 << 20;

/// Archived raw logs by (namespace, pod, container).
type ArchiveMap = std::collections::HashMap<(String, String, String), String>;

/// Logs of containers' previous instances, kept when the agent replaces a sandbox (a restart
/// removes the old one and its log files): served for `previous=true`, and as the current log
/// while a restarting pod has no sandbox (CrashLoopBackOff), as the kubelet shows it.
#[derive(Clone, Default)]
pub struct LogArchive(Arc<std::sync::Mutex<ArchiveMap>>);

impl LogArchive {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String, String), String>>
    {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the tail (whole records) of `raw`, the CRI log of `container` of pod `ns/pod`.
    pub(crate) fn put(&self, ns: &str, pod: &str, container: &str, raw: String) {
        let mut raw = raw;
        if raw.len() > MAX_ARCHIVED_BYTES {
            let mut cut = raw.len() - MAX_ARCHIVED_BYTES;
            while !raw.is_char_boundary(cut) {
                cut += 1;
            }
            let start = raw[cut..].find('\n').map_or(raw.len(), |i| cut + i + 1);
            raw = raw.split_off(start);
        }
        self.lock()
            .insert((ns.to_owned(), pod.to_owned(), container.to_owned()), raw);
    }

    fn get(&self, ns: &str, pod: &str, container: &str) -> Option<String> {
        self.lock()
            .get(&(ns.to_owned(), pod.to_owned(), container.to_owned()))
            .cloned()
    }

    /// Forgets every container of pod `ns/pod` (the pod is gone).
    pub(crate) fn forget_pod(&self, ns: &str, pod: &str) {
        self.lock().retain(|(n, p, _), _| !(n == ns && p == pod));
    }
}

/// Most connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send request headers (slow clients hold no slot for long).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `follow` re-reads the runtime's log.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The credential the API server presents to the agent of the node whose bearer token is
/// `node_token`: hex SHA-256 over the token and a fixed label (domain separation, so the node
/// token itself never travels to the agent). The API server computes the same value.
pub fn kubelet_token(node_token: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"flotilla kubelet api\0");
    h.update(node_token.as_bytes());
    hex::encode(h.finalize())
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The port could not be bound.
    #[error("cannot listen on {addr} (serving port; 0 picks a free one)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation or TLS set-up failed.
    #[error("serving certificate: {0}")]
    Tls(String),
}

/// A bound, not yet serving, agent server.
pub struct NodeServer<R> {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    fingerprint: String,
    state: Arc<State<R>>,
}

struct State<R> {
    runtime: Arc<R>,
    token: String,
    archive: LogArchive,
}

impl<R: PodRuntime> NodeServer<R> {
    /// Binds `address:port` (`0.0.0.0` if `address` is not an IP) and creates the serving
    /// certificate for `address`. `node_token` is the node's bearer token; `archive` holds the
    /// logs of previous container instances.
    pub async fn bind(
        address: &str,
        port: u16,
        node_token: &str,
        runtime: Arc<R>,
        archive: LogArchive,
    ) -> Result<NodeServer<R>, ServerError> {
        let ip: IpAddr = address
            .parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let addr = SocketAddr::new(ip, port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let (tls, fingerprint) = tls_config(address)?;
        Ok(NodeServer {
            listener,
            tls,
            fingerprint,
            state: Arc::new(State {
                runtime,
                token: kubelet_token(node_token),
                archive,
            }),
        })
    }

    /// The bound port (the real one when 0 was asked for).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    /// Hex SHA-256 of the serving certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let conns = tokio_util::task::TaskTracker::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "agent server accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let tls = self.tls.clone();
            let state = self.state.clone();
            let stop = shutdown.clone();
            conns.spawn(async move {
                let _permit = permit;
                let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await
                else {
                    tracing::debug!(%peer, "agent server TLS handshake failed");
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades();
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "agent server connection ended");
                    },
                    _ = stop.cancelled() => {}
                }
            });
        }
        conns.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
    }
}

/// Publishes the server on the Node: `status.daemonEndpoints.kubeletEndpoint.Port` and the
/// certificate pin annotation. Retries until it succeeds or `shutdown`.
pub(crate) async fn advertise(
    client: &apiclient::ApiClient,
    node: &str,
    port: u16,
    fingerprint: &str,
    shutdown: &CancellationToken,
) {
    let path = format!("/api/v1/nodes/{node}");
    let mut delay = Duration::from_millis(100);
    loop {
        let meta = json!({"metadata": {"annotations": {SERVING_CERT_ANNOTATION: fingerprint}}});
        let st = json!({"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
        let r = match client.merge_patch(&path, &meta).await {
            Ok(_) => client.merge_patch(&format!("{path}/status"), &st).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(_) => return,
            Err(e) => tracing::warn!(error = %e, "failed to advertise the agent server; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn tls_config(address: &str) -> Result<(tokio_rustls::TlsAcceptor, String), ServerError> {
    use sha2::Digest as _;
    let tls = |e: &dyn std::fmt::Display| ServerError::Tls(e.to_string());
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !sans.iter().any(|s| s == address) && !address.is_empty() {
        sans.push(address.to_string());
    }
    let mut params = rcgen::CertificateParams::new(sans).map_err(|e| tls(&e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "flotilla-kubelet");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(|e| tls(&e))?;
    let cert = params.self_signed(&key).map_err(|e| tls(&e))?;
    let der = cert.der().clone();
    let fingerprint = hex::encode(sha2::Sha256::digest(der.as_ref()));
    let key_der =
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| tls(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![der], key_der)
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), fingerprint))
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A Kubernetes `Status` failure answer.
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle<R: PodRuntime>(state: Arc<State<R>>, req: Request<Incoming>) -> Response<Body> {
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| ct_eq(t.trim().as_bytes(), state.token.as_bytes()));
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["containerLogs", ns, pod, container]) => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            match LogOptions::parse(&query) {
                Ok(opts) => logs(state, &ns, &pod, &container, opts).await,
                Err(msg) => status(400, "BadRequest", &msg),
            }
        }
        (&Method::GET | &Method::POST, ["portForward", ns, pod]) => {
            let (ns, pod) = (ns.to_string(), pod.to_string());
            port_forward(state, &ns, &pod, &query, req).await
        }
        (&Method::GET | &Method::POST, [verb @ ("exec" | "attach"), ns, pod, container]) => {
            let kind = if *verb == "exec" {
                Session::Exec
            } else {
                Session::Attach
            };
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            stream_session(state, kind, &ns, &pod, &container, &query, req).await
        }
        _ => status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The runtime pod running `namespace/name`: the ready sandbox if there is one.
async fn find_pod<R: PodRuntime>(
    runtime: &R,
    namespace: &str,
    name: &str,
) -> Result<crate::pod_runtime::PodStatus, Response<Body>> {
    let pods = runtime
        .list_pods()
        .await
        .map_err(|e| status(500, "InternalError", &e.to_string()))?;
    let mut found: Vec<_> = pods
        .into_iter()
        .filter(|p| p.namespace == namespace && p.name == name)
        .collect();
    found.sort_by_key(|p| p.state != SandboxState::Ready);
    found.into_iter().next().ok_or_else(|| {
        status(
            404,
            "NotFound",
            &format!("pod {namespace}/{name} is not running on this node"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Query options of a log request, as `PodLogOptions`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
    /// Only lines at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl LogOptions {
    fn parse(q: &[(String, String)]) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        let flag = |v: &str| matches!(v, "true" | "1");
        for (k, v) in q {
            match k.as_str() {
                "follow" => o.follow = flag(v),
                "previous" => o.previous = flag(v),
                "timestamps" => o.timestamps = flag(v),
                "tailLines" => {
                    let n: i64 = v.parse().map_err(|_| format!("invalid tailLines {v:?}"))?;
                    o.tail_lines = Some(usize::try_from(n.max(0)).unwrap_or(0));
                }
                "limitBytes" => {
                    let n: i64 = v.parse().map_err(|_| format!("invalid limitBytes {v:?}"))?;
                    if n < 1 {
                        return Err("limitBytes must be greater than zero".into());
                    }
                    o.limit_bytes = Some(usize::try_from(n).unwrap_or(usize::MAX));
                }
                "sinceSeconds" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("invalid sinceSeconds {v:?}"))?;
                    if n < 1 {
                        return Err("sinceSeconds must be greater than zero".into());
                    }
                    o.since = Some(chrono::Utc::now() - chrono::Duration::seconds(n));
                }
                "sinceTime" => {
                    let t = chrono::DateTime::parse_from_rfc3339(v)
                        .map_err(|_| format!("invalid sinceTime {v:?}"))?;
                    o.since = Some(t.with_timezone(&chrono::Utc));
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

/// One log line rebuilt from CRI records (partial records joined).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogLine {
    /// The timestamp of its first record, as written.
    pub time: String,
    /// The text, with its newline when the record was complete.
    pub text: String,
}

/// Unwraps CRI-format records (`<RFC3339Nano> <stdout|stderr> <F|P> <content>`) into lines.
/// Returns the lines and how many bytes of `raw` they consumed (a trailing partial record or
/// an unterminated line is left for later).
pub(crate) fn parse_cri(raw: &str) -> (Vec<LogLine>, usize) {
    let mut lines = Vec::new();
    let mut pending: Option<LogLine> = None;
    let mut consumed = 0;
    let mut pos = 0;
    while let Some(nl) = raw[pos..].find('\n') {
        let rec = &raw[pos..pos + nl];
        pos += nl + 1;
        let mut parts = rec.splitn(4, ' ');
        let (Some(ts), Some(_stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let content = parts.next().unwrap_or("");
        let line = pending.get_or_insert_with(|| LogLine {
            time: ts.to_string(),
            text: String::new(),
        });
        line.text.push_str(content);
        if tag != "P" {
            line.text.push('\n');
            if let Some(l) = pending.take() {
                lines.push(l);
            }
            consumed = pos;
        }
    }
    (lines, consumed)
}

fn since_ok(line: &LogLine, since: Option<chrono::DateTime<chrono::Utc>>) -> bool {
    let Some(since) = since else { return true };
    chrono::DateTime::parse_from_rfc3339(&line.time)
        .map(|t| t.with_timezone(&chrono::Utc) >= since)
        .unwrap_or(true)
}

fn render(line: &LogLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {}", line.time, line.text)
    } else {
        line.text.clone()
    }
}

/// The text of the log as of now, after `since`, `tailLines`, `timestamps`.
pub(crate) fn render_initial(lines: &[LogLine], opts: &LogOptions) -> String {
    let kept: Vec<&LogLine> = lines.iter().filter(|l| since_ok(l, opts.since)).collect();
    let start = opts.tail_lines.map_or(0, |n| kept.len().saturating_sub(n));
    kept[start..]
        .iter()
        .map(|l| render(l, opts.timestamps))
        .collect()
}

async fn logs<R: PodRuntime>(
    state: Arc<State<R>>,
    ns: &str,
    pod: &str,
    container: &str,
    opts: LogOptions,
) -> Response<Body> {
    let rt = &state.runtime;
    let archived = || {
        state.archive.get(ns, pod, container).map(|raw| {
            let (lines, _) = parse_cri(&raw);
            let mut text = render_initial(&lines, &opts);
            truncate_to(&mut text, &mut opts.limit_bytes.clone());
            text_response(full(text))
        })
    };
    if opts.previous {
        return archived().unwrap_or_else(|| {
            status(
                400,
                "BadRequest",
                &format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                ),
            )
        });
    }
    let p = match find_pod(rt.as_ref(), ns, pod).await {
        Ok(p) => p,
        // Between two instances (back-off): the last instance's log, as the kubelet shows.
        Err(r) => return archived().unwrap_or(r),
    };
    let raw = match rt.logs(&p.id, container).await {
        Ok(r) => r,
        Err(e) => return runtime_error(&e, pod, container),
    };
    let (lines, consumed) = parse_cri(&raw);
    let mut first = render_initial(&lines, &opts);
    let mut budget = opts.limit_bytes;
    truncate_to(&mut first, &mut budget);
    if !opts.follow || budget == Some(0) {
        return text_response(full(first));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let id = p.id.clone();
    let container = container.to_string();
    tokio::spawn(async move {
        if !first.is_empty() && tx.send(Bytes::from(first)).await.is_err() {
            return;
        }
        follow(&state, &id, &container, &raw, consumed, &opts, budget, &tx).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    text_response(StreamBody::new(stream).boxed())
}

fn truncate_to(s: &mut String, budget: &mut Option<usize>) {
    if let Some(b) = budget {
        if s.len() > *b {
            let mut cut = *b;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        *b -= s.len();
    }
}

/// Streams what is appended to the log after `seen[..consumed]` until the container ends,
/// the pod goes away, the byte budget is spent or the client disconnects.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the parts are the follow state"
)]
async fn follow<R: PodRuntime>(
    state: &State<R>,
    id: &PodId,
    container: &str,
    seen: &str,
    consumed: usize,
    opts: &LogOptions,
    mut budget: Option<usize>,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) {
    let rt = &state.runtime;
    // What has been emitted: the raw prefix, to find our place again after log rotation.
    let mut prefix = seen[..consumed].to_string();
    let mut last_record = prefix.lines().last().map(str::to_string);
    let mut ended = false;
    loop {
        if ended {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        // Decide about the end before reading, so the last lines are still sent.
        ended = match rt.pod_status(id).await {
            Ok(st) => st
                .containers
                .iter()
                .find(|c| c.name == container)
                .is_none_or(|c| c.state.is_terminated()),
            Err(_) => true,
        };
        let Ok(raw) = rt.logs(id, container).await else {
            return;
        };
        let start = if raw.starts_with(prefix.as_str()) {
            prefix.len()
        } else {
            // Rotated: continue after the last record we sent, or from the start.
            last_record
                .as_deref()
                .and_then(|l| raw.find(l).map(|i| i + l.len() + 1))
                .unwrap_or(0)
                .min(raw.len())
        };
        let (lines, used) = parse_cri(&raw[start..]);
        if used == 0 {
            continue;
        }
        prefix = raw[..start + used].to_string();
        last_record = prefix.lines().last().map(str::to_string);
        let mut text: String = lines
            .iter()
            .filter(|l| since_ok(l, opts.since))
            .map(|l| render(l, opts.timestamps))
            .collect();
        truncate_to(&mut text, &mut budget);
        if !text.is_empty() && tx.send(Bytes::from(text)).await.is_err() {
            return;
        }
        if budget == Some(0) {
            return;
        }
    }
}

fn text_response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

fn runtime_error(e: &RuntimeError, pod: &str, container: &str) -> Response<Body> {
    match e {
        RuntimeError::NotFound(_) => status(404, "NotFound", &format!("pod {pod} not found")),
        RuntimeError::ContainerNotFound { .. } => status(
            404,
            "NotFound",
            &format!("container {container} is not valid for pod {pod}"),
        ),
        RuntimeError::CantHandle(m) => status(501, "NotImplemented", m),
        other => status(500, "InternalError", &other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Exec and attach over WebSocket

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    Exec,
    Attach,
}

async fn stream_session<R: PodRuntime>(
    state: Arc<State<R>>,
    kind: Session,
    ns: &str,
    pod: &str,
    container: &str,
    query: &[(String, String)],
    mut req: Request<Incoming>,
) -> Response<Body> {
    let flag = |k: &str| {
        query
            .iter()
            .any(|(key, v)| key == k && matches!(v.as_str(), "true" | "1" | "True"))
    };
    let want = crate::websocket::Wanted {
        stdin: flag("stdin"),
        stdout: flag("stdout"),
        stderr: flag("stderr"),
        tty: flag("tty"),
    };
    let command: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if kind == Session::Exec && command.is_empty() {
        return status(400, "BadRequest", "you must specify at least 1 command");
    }
    if !(want.stdin || want.stdout || want.stderr) {
        return status(
            400,
            "BadRequest",
            "you must specify at least one of stdin, stdout, stderr",
        );
    }
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let proto = h
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::websocket::choose_protocol);
    let (true, Some(key), Some((proto, version))) = (is_ws, key, proto) else {
        return status(
            400,
            "BadRequest",
            &format!(
                "exec and attach are served over a WebSocket with subprotocol {} (SPDY is not supported)",
                crate::websocket::PROTOCOLS.join(" or ")
            ),
        );
    };
    let rt = state.runtime.clone();
    let p = match find_pod(rt.as_ref(), ns, pod).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match p.containers.iter().find(|c| c.name == container) {
        None => {
            return status(
                404,
                "NotFound",
                &format!("container {container} is not valid for pod {pod}"),
            );
        }
        Some(c) if !c.state.is_running() => {
            return status(
                400,
                "BadRequest",
                &format!("container {container} in pod {pod} is not running"),
            );
        }
        Some(_) => {}
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (id, container) = (p.id.clone(), container.to_string());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "session upgrade failed");
                return;
            }
        };
        let label = command.clone();
        let r = crate::websocket::serve_session(upgraded, version, want, label, |io| async {
            match kind {
                Session::Exec => rt.exec_stream(&id, &container, command, io).await,
                Session::Attach => rt.attach(&id, &container, io).await,
            }
        })
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "exec/attach session ended with an error");
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    hs.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&crate::websocket::accept_key(&key)) {
        hs.insert("sec-websocket-accept", v);
    }
    hs.insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static(proto),
    );
    resp
}

/// `kubectl port-forward` through the SPDY-in-WebSocket tunnel.
async fn port_forward<R: PodRuntime>(
    state: Arc<State<R>>,
    ns: &str,
    pod: &str,
    query: &[(String, String)],
    mut req: Request<Incoming>,
) -> Response<Body> {
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let tunnel = h
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim() == crate::spdy::TUNNEL_PROTOCOL)
        });
    let (true, Some(key), true) = (is_ws, key, tunnel) else {
        return status(
            400,
            "BadRequest",
            &format!(
                "port-forward is served over a WebSocket with subprotocol {} (plain SPDY is not supported)",
                crate::spdy::TUNNEL_PROTOCOL
            ),
        );
    };
    let p = match find_pod(state.runtime.as_ref(), ns, pod).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if p.state != SandboxState::Ready {
        return status(400, "BadRequest", &format!("pod {pod} is not running"));
    }
    let host = query
        .iter()
        .find(|(k, v)| k == "ip" && !v.is_empty())
        .map_or_else(|| "127.0.0.1".to_string(), |(_, v)| v.clone());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(u) => {
                if let Err(e) = crate::spdy::serve_tunnel(TokioIo::new(u), host).await {
                    tracing::debug!(error = %e, "port-forward session ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "port-forward upgrade failed"),
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    hs.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&crate::websocket::accept_key(&key)) {
        hs.insert("sec-websocket-accept", v);
    }
    hs.insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static(crate::spdy::TUNNEL_PROTOCOL),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-01-01T00:00:01.000000000Z stdout F one\n\
                       2026-01-01T00:00:02.000000000Z stderr P two-\n\
                       2026-01-01T00:00:02.100000000Z stderr F halves\n\
                       2026-01-01T00:00:03.000000000Z stdout F three\n\
                       2026-01-01T00:00:04.000000000Z stdout P unfinished";

    #[test]
    fn cri_records_become_plain_lines() {
        let (lines, used) = parse_cri(LOG);
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one\n", "two-halves\n", "three\n"]);
        assert_eq!(lines[1].time, "2026-01-01T00:00:02.000000000Z");
        assert_eq!(
            &LOG[used..],
            "2026-01-01T00:00:04.000000000Z stdout P unfinished"
        );
    }

    #[test]
    fn tail_since_and_timestamps() {
        let (lines, _) = parse_cri(LOG);
        let mut o = LogOptions {
            tail_lines: Some(2),
            ..LogOptions::default()
        };
        assert_eq!(render_initial(&lines, &o), "two-halves\nthree\n");
        o.tail_lines = Some(0);
        assert_eq!(render_initial(&lines, &o), "");
        o.tail_lines = None;
        o.timestamps = true;
        o.since = Some("2026-01-01T00:00:02.500000000Z".parse().expect("time"));
        assert_eq!(
            render_initial(&lines, &o),
            "2026-01-01T00:00:03.000000000Z three\n"
        );
        let q = parse_query(Some(
            "tailLines=1&timestamps=true&sinceTime=2026-01-01T00%3A00%3A00Z",
        ));
        let p = LogOptions::parse(&q).expect("parses");
        assert_eq!(p.tail_lines, Some(1));
        assert!(p.timestamps);
        assert!(p.since.is_some());
        assert!(LogOptions::parse(&parse_query(Some("sinceSeconds=0"))).is_err());
        let mut s = "héllo".to_string();
        let mut budget = Some(2);
        truncate_to(&mut s, &mut budget);
        assert_eq!((s.as_str(), budget), ("h", Some(1)));
    }

    #[test]
    fn archive_keeps_whole_records_of_the_tail() {
        let a = LogArchive::default();
        let rec = "2026-01-01T00:00:01.000000000Z stdout F 0123456789\n";
        let n = MAX_ARCHIVED_BYTES / rec.len() + 10;
        a.put("ns", "p", "c", rec.repeat(n));
        let kept = a.get("ns", "p", "c").expect("archived");
        assert!(kept.len() <= MAX_ARCHIVED_BYTES);
        assert!(kept.starts_with("2026-") && kept.ends_with('\n'));
        assert_eq!(parse_cri(&kept).0.len(), kept.len() / rec.len());
        a.put("ns", "q", "c", rec.to_string());
        a.forget_pod("ns", "p");
        assert!(a.get("ns", "p", "c").is_none());
        assert!(a.get("ns", "q", "c").is_some());
    }

    #[test]
    fn kubelet_token_is_a_fixed_one_way_derivation() {
        // The API server derives the same value (control::apiserver::node_proxy pins it too).
        assert_eq!(
            kubelet_token("node.n1.abc"),
            "a11ef30d975e5e09f9c89cee463c84f4d6435d315e471522122be3dc427b800e"
        );
        assert_ne!(kubelet_token("node.n1.abc"), kubelet_token("node.n2.abc"));
    }
}
