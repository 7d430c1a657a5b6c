//! A small Kubernetes REST client: JSON over HTTP/2 (TLS with the cluster CA, or plain HTTP for
//! the insecure development listener) with a bearer token, one shared connection, and watches
//! as streams of newline-delimited JSON events.
//!
//! Its own crate because both the controllers (`control`) and the node agent (`runtime`) use it,
//! `control` and `runtime` may not depend on each other, and `api` holds no IO.
#![warn(missing_docs)]
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

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

struct Inner {
    host: String,
    port: u16,
    authority: String,
    scheme: &'static str,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
    sender: Mutex<Option<SendRequest<Full<Bytes>>>>,
    timeout: Duration,
}

/// A clonable handle to the API server.
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("server", &self.inner.authority)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client for `server` (`https://host:port` or `http://host:port`), trusting `ca_pem` for
    /// HTTPS and sending `token` as bearer token.
    pub fn new(
        server: &str,
        token: Option<&str>,
        ca_pem: Option<&str>,
    ) -> Result<Self, ClientError> {
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
                host,
                port,
                authority,
                scheme,
                token: token.map(str::to_string),
                tls,
                sender: Mutex::new(None),
                timeout: Duration::from_secs(30),
            }),
        })
    }

    /// The server URL this client talks to.
    pub fn server(&self) -> String {
        format!("{}://{}", self.inner.scheme, self.inner.authority)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((self.inner.host.as_str(), self.inner.port)),
        )
        .await
        .map_err(|_| ClientError::Transport("connect timed out".into()))?
        .map_err(|e| ClientError::Transport(format!("connect {}: {e}", self.inner.authority)))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.inner.tls {
            Some(tls) => {
                let name = ServerName::try_from(self.inner.host.clone())
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

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let mut guard = self.inner.sender.lock().await;
        if let Some(s) = guard.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let s = self.connect().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut last = ClientError::Transport("no attempt".into());
        // One retry on a fresh connection: the shared one may have died since last use.
        for attempt in 0..2 {
            let mut sender = self.sender().await?;
            let uri = format!("{}://{}{path}", self.inner.scheme, self.inner.authority);
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri)
                .header(header::ACCEPT, "application/json");
            if let Some(t) = &self.inner.token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let full = match &body {
                Some((ct, b)) => {
                    req = req.header(header::CONTENT_TYPE, *ct);
                    Full::new(b.clone())
                }
                None => Full::new(Bytes::new()),
            };
            let req = req
                .body(full)
                .map_err(|e| ClientError::Config(format!("request: {e}")))?;
            if let Err(e) = sender.ready().await {
                last = ClientError::Transport(e.to_string());
                self.inner.sender.lock().await.take();
                continue;
            }
            match sender.send_request(req).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    last = ClientError::Transport(e.to_string());
                    if attempt == 0 {
                        self.inner.sender.lock().await.take();
                    }
                }
            }
        }
        Err(last)
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
            let resp = self
                .send(method, path, body.as_ref().map(|(c, b)| (*c, b.clone())))
                .await?;
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
    body: Incoming,
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
