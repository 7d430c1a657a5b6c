//! A small Kubernetes REST client: JSON over HTTP/2 (TLS with the cluster CA, or plain HTTP for
//! the insecure development listener) with a bearer token, one shared connection, and watches
//! as streams of newline-delimited JSON events.
//!
//! One client may know several servers of an HA control plane (they share a CA, so one TLS
//! configuration verifies them all): the ones given, comma-separated, and the ones it learns
//! with [`ApiClient::refresh_servers`] from the `default/kubernetes` Endpoints the servers
//! maintain. A request goes to the server in use; when that one cannot be reached, it goes to
//! the next, which becomes the server in use (logged once: `lost A (why); using B`). A request
//! that may already have reached a server is sent again elsewhere only if that is safe (GET,
//! and PUT, whose resourceVersion turns a replay into a 409); a watch that ends is restarted
//! by its caller from its last resourceVersion, and lands on the server in use.
//!
//! A client made with [`ApiClient::local`] instead hands its requests to an API server in the
//! same process ([`local::LocalService`]): no socket, TLS or HTTP/2, the same authentication
//! and authorization (the scheduler and controllers `flotilla server` runs use it).
//!
//! Its own crate because both the controllers (`control`) and the node agent (`runtime`) use it,
//! `control` and `runtime` may not depend on each other, and `api` holds no IO.
#![warn(missing_docs)]
pub mod local;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

pub use local::{LocalService, ResponseBody};

/// Content type of a JSON merge patch.
pub const MERGE_PATCH: &str = "application/merge-patch+json";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-success `Status`.
    #[error("{code} {reason}: {message}")]
    Status {
        /// HTTP status code (404, 409, ...).
        code: u16,
        /// Kubernetes `Status.reason` (`NotFound`, `AlreadyExists`, `Conflict`, ...).
        reason: String,
        /// Kubernetes `Status.message`.
        message: String,
    },
    /// Connecting, TLS or HTTP failed; retry later.
    #[error("transport: {0}")]
    Transport(String),
    /// The answer was not the JSON expected.
    #[error("decode: {0}")]
    Decode(String),
    /// The client configuration is unusable (bad URL or CA).
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The HTTP status code, if the server answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the object was not found.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    /// Whether the request lost an optimistic-concurrency race or the object already exists.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

/// One event of a watch.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR`.
    pub kind: String,
    /// The object (a `Status` for `ERROR`).
    pub object: Value,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One API server the client may talk to, with its shared HTTP/2 connection.
struct Endpoint {
    /// `scheme://authority`, as given or learned.
    url: String,
    host: String,
    port: u16,
    authority: String,
    sender: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

/// The servers known, in order, and which one is in use.
struct Endpoints {
    list: Vec<Arc<Endpoint>>,
    /// Index into `list` of the server requests go to first.
    current: usize,
}

struct Inner {
    scheme: &'static str,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// The URLs given to [`ApiClient::new`]: always kept, whatever the cluster publishes, so
    /// the client can find its way back after every learned server changed.
    seeds: Vec<String>,
    endpoints: std::sync::Mutex<Endpoints>,
    timeout: Duration,
    /// Set for an in-process client: every request goes there, `endpoints` is empty.
    local: Option<Arc<dyn LocalService>>,
}

/// Why one attempt on one server failed, and whether the request may have reached it.
struct Attempt {
    error: ClientError,
    /// `false` when the request certainly never left (connecting failed): then any request,
    /// idempotent or not, may go to another server.
    maybe_sent: bool,
}

/// A clonable handle to the API server, or to several servers of one HA control plane that
/// share a CA: requests go to one of them and move to the next when it stops answering.
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("server", &self.server())
            .finish_non_exhaustive()
    }
}

/// Splits `https://host:port` into scheme, host, port and authority.
fn parse_server(server: &str) -> Result<(&'static str, String, u16, String), ClientError> {
    let (scheme, rest) = if let Some(r) = server.strip_prefix("https://") {
        ("https", r)
    } else if let Some(r) = server.strip_prefix("http://") {
        ("http", r)
    } else {
        return Err(ClientError::Config(format!(
            "server {server:?} must start with https:// or http://"
        )));
    };
    let authority = rest.trim_end_matches('/').to_string();
    if authority.is_empty() {
        return Err(ClientError::Config(format!(
            "server {server:?} has no host"
        )));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| ClientError::Config(format!("bad port in {server:?}")))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                port,
            )
        }
        _ => (authority.clone(), if scheme == "https" { 443 } else { 80 }),
    };
    Ok((scheme, host, port, authority))
}

/// Whether a request may be sent again to another server after it may have reached one:
/// reads, and PUTs (an update carries the resourceVersion it read, so a replay of an applied
/// one fails with 409 instead of applying twice).
fn replayable(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::PUT)
}

/// The API server URLs listed by an `Endpoints` object (the `default/kubernetes` one the
/// servers maintain): `scheme://ip:port` for every ready address and port.
pub fn endpoint_urls(endpoints: &Value, scheme: &str) -> Vec<String> {
    let mut out = Vec::new();
    let subsets = endpoints
        .get("subsets")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for subset in subsets {
        let ports: Vec<u64> = subset
            .get("ports")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.get("port").and_then(Value::as_u64))
                    .collect()
            })
            .unwrap_or_default();
        let addresses = subset
            .get("addresses")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for a in addresses {
            let Some(ip) = a.get("ip").and_then(Value::as_str) else {
                continue;
            };
            for port in &ports {
                let url = if ip.contains(':') {
                    format!("{scheme}://[{ip}]:{port}")
                } else {
                    format!("{scheme}://{ip}:{port}")
                };
                if !out.contains(&url) {
                    out.push(url);
                }
            }
        }
    }
    out
}

/// What [`ApiClient::server`] answers for an in-process client.
pub const LOCAL_SERVER: &str = "in-process";

/// Path of the Endpoints object listing the API servers.
pub const SERVERS_ENDPOINTS_PATH: &str = "/api/v1/namespaces/default/endpoints/kubernetes";

impl ApiClient {
    /// A client for `server` (`https://host:port` or `http://host:port`; several, of one
    /// cluster, separated by commas), trusting `ca_pem` for HTTPS and sending `token` as bearer
    /// token.
    pub fn new(
        server: &str,
        token: Option<&str>,
        ca_pem: Option<&str>,
    ) -> Result<Self, ClientError> {
        let seeds: Vec<String> = server
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let mut list = Vec::new();
        let mut scheme = None;
        for seed in &seeds {
            let ep = Self::endpoint(seed)?;
            let (s, ..) = parse_server(seed)?;
            if scheme.is_some_and(|x| x != s) {
                return Err(ClientError::Config(format!(
                    "servers {server:?} mix http:// and https://"
                )));
            }
            scheme = Some(s);
            if !list.iter().any(|e: &Arc<Endpoint>| e.url == ep.url) {
                list.push(ep);
            }
        }
        let scheme = scheme.ok_or_else(|| ClientError::Config("no server URL".into()))?;
        let tls = if scheme == "https" {
            let pem = ca_pem.ok_or_else(|| ClientError::Config("https needs a CA".into()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| ClientError::Config(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        } else {
            None
        };
        Ok(ApiClient {
            inner: Arc::new(Inner {
                scheme,
                token: token.map(str::to_string),
                tls,
                seeds: list.iter().map(|e| e.url.clone()).collect(),
                endpoints: std::sync::Mutex::new(Endpoints { list, current: 0 }),
                timeout: Duration::from_secs(30),
                local: None,
            }),
        })
    }

    /// A client of the API server in this process: requests are calls of `service`, carrying
    /// `token` as bearer token like any request. [`ApiClient::server`] answers
    /// [`LOCAL_SERVER`]; the server list never changes.
    pub fn local(service: Arc<dyn LocalService>, token: Option<&str>) -> ApiClient {
        ApiClient {
            inner: Arc::new(Inner {
                scheme: "local",
                token: token.map(str::to_string),
                tls: None,
                seeds: Vec::new(),
                endpoints: std::sync::Mutex::new(Endpoints {
                    list: Vec::new(),
                    current: 0,
                }),
                timeout: Duration::from_secs(30),
                local: Some(service),
            }),
        }
    }

    fn endpoint(url: &str) -> Result<Arc<Endpoint>, ClientError> {
        let (scheme, host, port, authority) = parse_server(url)?;
        Ok(Arc::new(Endpoint {
            url: format!("{scheme}://{authority}"),
            host,
            port,
            authority,
            sender: Mutex::new(None),
        }))
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.inner
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The server URL requests currently go to ([`LOCAL_SERVER`] for an in-process client).
    pub fn server(&self) -> String {
        if self.inner.local.is_some() {
            return LOCAL_SERVER.into();
        }
        let eps = self.endpoints();
        eps.list
            .get(eps.current)
            .map(|e| e.url.clone())
            .unwrap_or_default()
    }

    /// Every server URL known: the ones given, then the ones learned.
    pub fn servers(&self) -> Vec<String> {
        self.endpoints()
            .list
            .iter()
            .map(|e| e.url.clone())
            .collect()
    }

    /// Replaces the learned servers with `urls` (the given ones stay). URLs of another scheme
    /// than the given ones, or unparsable, are ignored; open connections to servers kept are
    /// kept, and so is the server in use.
    pub fn set_servers(&self, urls: &[String]) {
        if self.inner.local.is_some() {
            return;
        }
        let mut wanted: Vec<String> = self.inner.seeds.clone();
        for u in urls {
            let u = u.trim().trim_end_matches('/');
            let Ok((scheme, _, _, authority)) = parse_server(u) else {
                continue;
            };
            let u = format!("{scheme}://{authority}");
            if scheme == self.inner.scheme && !wanted.contains(&u) {
                wanted.push(u);
            }
        }
        let mut eps = self.endpoints();
        let current = eps.list.get(eps.current).map(|e| e.url.clone());
        let mut list = Vec::with_capacity(wanted.len());
        for u in &wanted {
            match eps.list.iter().find(|e| &e.url == u) {
                Some(e) => list.push(e.clone()),
                None => {
                    if let Ok(e) = Self::endpoint(u) {
                        list.push(e);
                    }
                }
            }
        }
        if list.len() != eps.list.len() || list.iter().zip(&eps.list).any(|(a, b)| a.url != b.url) {
            tracing::info!(servers = ?wanted, "API servers");
        }
        eps.current = current
            .and_then(|c| list.iter().position(|e| e.url == c))
            .unwrap_or(0);
        eps.list = list;
    }

    /// Learns the cluster's API servers from the `default/kubernetes` Endpoints the servers
    /// maintain (see [`SERVERS_ENDPOINTS_PATH`]); returns the servers now known. An absent or
    /// empty object changes nothing.
    pub async fn refresh_servers(&self) -> Result<Vec<String>, ClientError> {
        if let Some(obj) = self.get(SERVERS_ENDPOINTS_PATH).await? {
            let urls = endpoint_urls(&obj, self.inner.scheme);
            if !urls.is_empty() {
                self.set_servers(&urls);
            }
        }
        Ok(self.servers())
    }

    async fn connect(&self, ep: &Endpoint) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| ClientError::Transport(format!("connect {}: timed out", ep.authority)))?
        .map_err(|e| ClientError::Transport(format!("connect {}: {e}", ep.authority)))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.inner.tls {
            Some(tls) => {
                let name = ServerName::try_from(ep.host.clone())
                    .map_err(|e| ClientError::Config(format!("server name: {e}")))?;
                Box::new(
                    tls.connect(name, tcp)
                        .await
                        .map_err(|e| ClientError::Transport(format!("TLS: {e}")))?,
                )
            }
            None => Box::new(tcp),
        };
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Transport(format!("HTTP/2 handshake: {e}")))?;
        // The connection task ends when the connection closes; senders then report errors and
        // the next request reconnects.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
        Ok(sender)
    }

    async fn sender(&self, ep: &Endpoint) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let mut guard = ep.sender.lock().await;
        if let Some(s) = guard.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let s = self.connect(ep).await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// One server: one retry on a fresh connection, as the shared one may have died since
    /// its last use.
    async fn send_to(
        &self,
        ep: &Endpoint,
        method: &Method,
        path: &str,
        body: Option<&(&str, Bytes)>,
    ) -> Result<http::Response<ResponseBody>, Attempt> {
        let mut last = Attempt {
            error: ClientError::Transport("no attempt".into()),
            maybe_sent: false,
        };
        for attempt in 0..2 {
            let mut sender = self.sender(ep).await.map_err(|error| Attempt {
                error,
                maybe_sent: last.maybe_sent,
            })?;
            let mut req = Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", ep.url))
                .header(header::ACCEPT, "application/json");
            if let Some(t) = &self.inner.token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let full = match body {
                Some((ct, b)) => {
                    req = req.header(header::CONTENT_TYPE, *ct);
                    Full::new(b.clone())
                }
                None => Full::new(Bytes::new()),
            };
            let req = req.body(full).map_err(|e| Attempt {
                error: ClientError::Config(format!("request: {e}")),
                maybe_sent: false,
            })?;
            if let Err(e) = sender.ready().await {
                last.error = ClientError::Transport(format!("{}: {e}", ep.authority));
                ep.sender.lock().await.take();
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(r) => return Ok(r.map(|b| b.map_err(Into::into).boxed_unsync())),
                Err(mut e) => {
                    // hyper hands the request back when it never went out.
                    let unsent = e.take_message().is_some();
                    last = Attempt {
                        error: ClientError::Transport(format!("{}: {}", ep.authority, e.error())),
                        maybe_sent: last.maybe_sent || !unsent,
                    };
                    if attempt == 0 {
                        ep.sender.lock().await.take();
                    }
                }
            }
        }
        Err(last)
    }

    /// Sends to the server in use; when it cannot be reached (or answers 503 to a
    /// [`replayable`] request), to the next ones in turn, and the first that answers becomes
    /// the one in use.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<http::Response<ResponseBody>, ClientError> {
        if let Some(local) = &self.inner.local {
            return self.send_local(local.as_ref(), method, path, body).await;
        }
        let (list, start) = {
            let eps = self.endpoints();
            (eps.list.clone(), eps.current)
        };
        let n = list.len();
        let mut first_failure: Option<String> = None;
        let mut last = ClientError::Config("no server URL".into());
        for i in 0..n {
            let ep = &list[(start + i) % n];
            let more = i + 1 < n;
            match self.send_to(ep, &method, path, body.as_ref()).await {
                Ok(resp)
                    if resp.status() == StatusCode::SERVICE_UNAVAILABLE
                        && more
                        && replayable(&method) =>
                {
                    first_failure.get_or_insert_with(|| "503 Service Unavailable".into());
                    last = ClientError::Status {
                        code: 503,
                        reason: "ServiceUnavailable".into(),
                        message: format!("{} is unavailable", ep.url),
                    };
                }
                Ok(resp) => {
                    if let Some(why) = first_failure {
                        self.switch(&list[start % n].url, &ep.url, &why);
                    }
                    return Ok(resp);
                }
                Err(a) => {
                    if a.maybe_sent && !replayable(&method) {
                        // It may have been applied: the caller decides.
                        return Err(a.error);
                    }
                    first_failure.get_or_insert_with(|| a.error.to_string());
                    last = a.error;
                }
            }
        }
        Err(last)
    }

    /// Hands the request to the in-process server.
    async fn send_local(
        &self,
        local: &dyn LocalService,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<http::Response<ResponseBody>, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.inner.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let full = match body {
            Some((ct, b)) => {
                req = req.header(header::CONTENT_TYPE, ct);
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(full)
            .map_err(|e| ClientError::Config(format!("request: {e}")))?;
        // A task of its own, as hyper gives each request a server connection receives: the
        // handler then runs in parallel with the caller (the scheduler polls hundreds of binds
        // from one task) instead of inside it.
        tokio::spawn(local.call(req))
            .await
            .map_err(|e| ClientError::Transport(format!("in-process request: {e}")))
    }

    /// Makes `to` the server in use (unless another request already moved on from `from`),
    /// logging the failover once.
    fn switch(&self, from: &str, to: &str, why: &str) {
        let mut eps = self.endpoints();
        let Some(cur) = eps.list.get(eps.current) else {
            return;
        };
        if cur.url != from {
            return;
        }
        if let Some(i) = eps.list.iter().position(|e| e.url == to) {
            eps.current = i;
            tracing::warn!("lost {from} ({why}); using {to}");
        }
    }

    /// Sends a request and decodes the JSON answer; non-2xx answers become
    /// [`ClientError::Status`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, &Value)>,
    ) -> Result<Value, ClientError> {
        let body = body.map(|(ct, v)| (ct, Bytes::from(v.to_string())));
        let fut = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(format!("reading body: {e}")))?
                .to_bytes();
            decode_answer(status, &bytes)
        };
        tokio::time::timeout(self.inner.timeout, fut)
            .await
            .map_err(|_| ClientError::Transport(format!("request to {path} timed out")))?
    }

    /// GET; `None` on 404.
    pub async fn get(&self, path: &str) -> Result<Option<Value>, ClientError> {
        match self.request(Method::GET, path, None).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// LIST: the items and the list's resourceVersion.
    pub async fn list(&self, path: &str) -> Result<(Vec<Value>, String), ClientError> {
        let mut v = self.request(Method::GET, path, None).await?;
        let rv = v
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("0")
            .to_string();
        let items = match v.get_mut("items").map(Value::take) {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        Ok((items, rv))
    }

    /// POST.
    pub async fn create(&self, path: &str, obj: &Value) -> Result<Value, ClientError> {
        self.request(Method::POST, path, Some(("application/json", obj)))
            .await
    }

    /// PUT.
    pub async fn update(&self, path: &str, obj: &Value) -> Result<Value, ClientError> {
        self.request(Method::PUT, path, Some(("application/json", obj)))
            .await
    }

    /// PATCH with a JSON merge patch.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, ClientError> {
        self.request(Method::PATCH, path, Some((MERGE_PATCH, patch)))
            .await
    }

    /// DELETE with optional `DeleteOptions`; a 404 counts as done.
    pub async fn delete(&self, path: &str, opts: Option<&Value>) -> Result<(), ClientError> {
        let body = opts.map(|o| ("application/json", o));
        match self.request(Method::DELETE, path, body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts a watch (`path` already carries `?watch=true&resourceVersion=...`).
    pub async fn watch(&self, path: &str) -> Result<Watch, ClientError> {
        let resp = tokio::time::timeout(self.inner.timeout, self.send(Method::GET, path, None))
            .await
            .map_err(|_| ClientError::Transport("watch request timed out".into()))??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .to_bytes();
            return Err(decode_answer(status, &bytes)
                .err()
                .unwrap_or_else(|| ClientError::Decode("watch refused".into())));
        }
        Ok(Watch {
            body: resp.into_body(),
            buf: BytesMut::new(),
        })
    }
}

fn decode_answer(status: StatusCode, bytes: &[u8]) -> Result<Value, ClientError> {
    let v: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes).map_err(|e| {
            ClientError::Decode(format!(
                "{e} in answer {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })?
    };
    if status.is_success() {
        return Ok(v);
    }
    Err(ClientError::Status {
        code: status.as_u16(),
        reason: v
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        message: v
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// A running watch: newline-delimited JSON events.
pub struct Watch {
    body: ResponseBody,
    buf: BytesMut,
}

impl Watch {
    /// The next event; `None` when the server ended the watch.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(parse_event(line));
            }
            match self.body.frame().await {
                None => return None,
                Some(Err(e)) => return Some(Err(ClientError::Transport(e.to_string()))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn parse_event(line: &[u8]) -> Result<WatchEvent, ClientError> {
    let mut v: Value = serde_json::from_slice(line)
        .map_err(|e| ClientError::Decode(format!("watch event: {e}")))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let object = v.get_mut("object").map(Value::take).unwrap_or(Value::Null);
    Ok(WatchEvent { kind, object })
}

/// Percent-encodes a query value (selectors contain `=`, `,` and `!`).
pub fn encode_query(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
