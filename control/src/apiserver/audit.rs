//! Audit log: one `audit.k8s.io/v1` `Event` per request stage, a JSON object per line, as
//! kube-apiserver's log backend writes them (`--audit-log-path`, `--audit-policy-file`,
//! `--audit-log-maxsize`, `--audit-log-maxbackup`), so tools that read Kubernetes audit logs
//! read these.
//!
//! The layer sits inside authentication (it needs the caller) and outside the request timeout
//! and the handlers, as in kube-apiserver's filter chain; a request that fails authentication
//! is audited by [`failed_authentication`], called from that layer. Which requests are
//! recorded, and how much of them, is the policy's (Kubernetes' `Policy` format: the first
//! matching rule's level). Without a policy file every request is recorded at `Metadata`
//! level, with the `RequestReceived` stage left out; kube-apiserver records nothing without
//! one, which surprises more than it protects.
//!
//! Lines go through a bounded queue to a writer thread: a request waits only when the queue is
//! full (kube-apiserver's default "blocking" mode), never for the disk. The file is written
//! with mode 0600 (the events name users and objects) and is not synced: like
//! kube-apiserver's, the audit log is not part of what the store guarantees.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, Method, header};
use serde::Serialize;
use serde_json::{Value, json};

use super::auth::Identity;

mod policy;
pub use policy::{AuditError, Level, Policy, Stage};

/// Where the audit log goes and what it records.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The log file; `-` writes to standard output.
    pub log_path: PathBuf,
    /// What is recorded (`--audit-policy-file`).
    pub policy: Policy,
    /// Rotate the file when it would grow past this many MiB (0: never).
    pub max_size_mb: u64,
    /// Rotated files to keep (0: all).
    pub max_backups: usize,
}

impl AuditConfig {
    /// Every request at `Metadata` level into `log_path`, no rotation.
    pub fn new(log_path: impl Into<PathBuf>) -> AuditConfig {
        AuditConfig {
            log_path: log_path.into(),
            policy: Policy::metadata_for_all(),
            max_size_mb: 0,
            max_backups: 0,
        }
    }
}

/// The running audit backend: the policy and the queue to the writer thread.
#[derive(Debug)]
pub(crate) struct Auditor {
    policy: Policy,
    lines: tokio::sync::mpsc::Sender<Vec<u8>>,
}

/// Lines queued before a request waits for the writer.
const QUEUE_LINES: usize = 10_000;

impl Auditor {
    /// Opens the log (creating its directory) and starts the writer thread, which ends once
    /// the last handle to the auditor is gone and every queued line is written.
    pub(crate) fn start(cfg: &AuditConfig) -> std::io::Result<Arc<Auditor>> {
        let mut out = LogFile::open(cfg)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUE_LINES);
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut failed = false;
                while let Some(line) = rx.blocking_recv() {
                    let mut res = out.write_line(&line);
                    while let Ok(line) = rx.try_recv() {
                        res = res.and_then(|_| out.write_line(&line));
                    }
                    res = res.and_then(|_| out.flush());
                    match res {
                        Err(e) if !failed => {
                            failed = true;
                            tracing::error!(path = %out.path.display(), error = %e, "cannot write the audit log");
                        }
                        Ok(()) if failed => {
                            failed = false;
                            tracing::warn!(path = %out.path.display(), "audit log writable again");
                        }
                        _ => {}
                    }
                }
                let _ = out.flush();
            })?;
        Ok(Arc::new(Auditor {
            policy: cfg.policy.clone(),
            lines: tx,
        }))
    }

    async fn emit(&self, event: &Event<'_>) {
        if let Some(line) = line_of(event) {
            let _ = self.lines.send(line).await;
        }
    }

    /// From synchronous code (a response body's end): queued if there is room, else sent by
    /// a task so the order of one request's events may only be off when the queue is full.
    fn emit_now(self: &Arc<Self>, event: &Event<'_>) {
        let Some(line) = line_of(event) else {
            return;
        };
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(line)) = self.lines.try_send(line) {
            let tx = self.lines.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tx.send(line).await;
                });
            }
        }
    }
}

/// An event as one line of the log.
fn line_of(event: &Event<'_>) -> Option<Vec<u8>> {
    let mut line = serde_json::to_vec(event).ok()?;
    line.push(b'\n');
    Some(line)
}

/// The log file (or standard output) with size-based rotation as kube-apiserver's
/// (lumberjack: `audit.log` becomes `audit-2026-11-30T12-00-00.000.log`).
struct LogFile {
    path: PathBuf,
    out: Box<dyn std::io::Write + Send>,
    size: u64,
    max_bytes: u64,
    max_backups: usize,
}

impl LogFile {
    fn open(cfg: &AuditConfig) -> std::io::Result<LogFile> {
        let path = cfg.log_path.clone();
        let (out, size): (Box<dyn std::io::Write + Send>, u64) = if path.as_os_str() == "-" {
            (Box::new(std::io::stdout()), 0)
        } else {
            let f = Self::open_file(&path)?;
            let size = f.metadata()?.len();
            (Box::new(std::io::BufWriter::new(f)), size)
        };
        Ok(LogFile {
            path,
            out,
            size,
            max_bytes: cfg.max_size_mb.saturating_mul(1024 * 1024),
            max_backups: cfg.max_backups,
        })
    }

    fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.max_bytes > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "audit".into());
        let ext = self
            .path
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let stamp = chrono::Utc::now().format("%Y-%m-%dT%H-%M-%S%.3f");
        let backup = self.path.with_file_name(format!("{stem}-{stamp}{ext}"));
        std::fs::rename(&self.path, &backup)?;
        self.out = Box::new(std::io::BufWriter::new(Self::open_file(&self.path)?));
        self.size = 0;
        if self.max_backups > 0 {
            let dir = match self.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            };
            let prefix = format!("{stem}-");
            let mut backups: Vec<PathBuf> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&ext))
                })
                .collect();
            // The timestamps sort as the rotations happened.
            backups.sort();
            let excess = backups.len().saturating_sub(self.max_backups);
            for old in &backups[..excess] {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }
}

/// The caller as an event names it.
#[derive(Debug, Clone, Default, Serialize)]
struct UserInfo {
    #[serde(skip_serializing_if = "String::is_empty")]
    username: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
}

impl UserInfo {
    fn of(id: &Identity) -> UserInfo {
        UserInfo {
            username: id.user(),
            groups: id.groups().iter().map(|g| g.to_string()).collect(),
        }
    }
}

/// The object a resource request is about (`objectRef`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef {
    resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    api_group: String,
    api_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subresource: Option<String>,
}

/// Verb and object of a request, parsed from its method and URL as Kubernetes'
/// `RequestInfoFactory` does (for any resource, known to this server or not).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestInfo {
    verb: String,
    path: String,
    /// `None` for non-resource URLs (`/healthz`, `/version`, discovery roots...).
    object: Option<ObjectRef>,
    /// Watches, exec/attach/port-forward/proxy and followed logs.
    long_running: bool,
}

/// Namespace subresources: `/api/v1/namespaces/NAME/status` is the namespace's own status.
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

impl RequestInfo {
    fn parse(method: &Method, path: &str, query: Option<&str>) -> RequestInfo {
        let lower = method.as_str().to_ascii_lowercase();
        let non_resource = || RequestInfo {
            verb: lower.clone(),
            path: path.to_owned(),
            object: None,
            long_running: false,
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, mut rest) = match parts.as_slice() {
            ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest),
            ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
            _ => return non_resource(),
        };
        let flag = |name: &str| {
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .any(|(k, v)| k == name && (v == "true" || v == "1"))
        };
        let mut watch = false;
        if rest[0] == "watch" && matches!(*method, Method::GET | Method::HEAD) {
            watch = true;
            rest = &rest[1..];
        }
        let mut namespace = None;
        if rest.first() == Some(&"namespaces")
            && let Some(ns) = rest.get(1)
        {
            namespace = Some(ns.to_string());
            if rest.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
                rest = &rest[2..];
            }
        }
        let Some(resource) = rest.first().filter(|r| !r.is_empty()) else {
            return non_resource();
        };
        let name = rest.get(1).map(|s| s.to_string());
        let subresource = rest.get(2).map(|s| s.to_string());
        let verb = match *method {
            Method::GET | Method::HEAD if watch || flag("watch") => "watch".to_owned(),
            Method::GET | Method::HEAD if name.is_some() => "get".to_owned(),
            Method::GET | Method::HEAD => "list".to_owned(),
            Method::POST => "create".to_owned(),
            Method::PUT => "update".to_owned(),
            Method::PATCH => "patch".to_owned(),
            Method::DELETE if name.is_some() => "delete".to_owned(),
            Method::DELETE => "deletecollection".to_owned(),
            _ => lower.clone(),
        };
        let long_running = verb == "watch"
            || matches!(
                subresource.as_deref(),
                Some("exec" | "attach" | "portforward" | "proxy")
            )
            || (subresource.as_deref() == Some("log") && flag("follow"));
        RequestInfo {
            verb,
            path: path.to_owned(),
            object: Some(ObjectRef {
                resource: resource.to_string(),
                namespace,
                name,
                api_group: group.to_owned(),
                api_version: version.to_owned(),
                subresource,
            }),
            long_running,
        }
    }
}

/// `responseStatus`: the code, and for a failure the `Status` reason and message.
#[derive(Debug, Clone, Serialize)]
struct ResponseStatus {
    metadata: Value,
    #[serde(flatten)]
    failure: Option<Failure>,
    code: u16,
}

/// The failure half of a `responseStatus`.
#[derive(Debug, Clone, Serialize)]
struct Failure {
    status: &'static str,
    message: String,
    reason: &'static str,
}

/// The name of the object a response carries: completes `objectRef` for creates, whose URL
/// has no name (kube-apiserver takes it from the request object).
#[derive(Debug, Clone)]
pub(crate) struct ObjectName(pub String);

/// What an error answer tells the audit layer (a response extension the `Status` answers carry).
#[derive(Debug, Clone)]
pub(crate) struct FailureStatus {
    pub reason: &'static str,
    pub message: String,
}

impl ResponseStatus {
    fn of(resp: &Response) -> ResponseStatus {
        let code = resp.status().as_u16();
        let failure = resp.extensions().get::<FailureStatus>().map(|f| Failure {
            status: "Failure",
            message: f.message.clone(),
            reason: f.reason,
        });
        ResponseStatus {
            metadata: json!({}),
            failure,
            code,
        }
    }
}

/// One `audit.k8s.io/v1` `Event`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    kind: &'static str,
    api_version: &'static str,
    level: Level,
    #[serde(rename = "auditID")]
    audit_id: &'a str,
    stage: Stage,
    #[serde(rename = "requestURI")]
    request_uri: &'a str,
    verb: &'a str,
    user: &'a UserInfo,
    #[serde(rename = "sourceIPs", skip_serializing_if = "<[String]>::is_empty")]
    source_ips: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    object_ref: Option<&'a ObjectRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_status: Option<ResponseStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_object: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_object: Option<Value>,
    request_received_timestamp: &'a str,
    stage_timestamp: String,
}

/// The client's address, added to each request by the server's accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub std::net::SocketAddr);

fn micros_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// What is known of a request once it arrived; each stage's event is made from it.
struct Record {
    auditor: Arc<Auditor>,
    level: Level,
    omit: Vec<Stage>,
    omit_managed_fields: bool,
    audit_id: String,
    request_uri: String,
    user: UserInfo,
    source_ips: Vec<String>,
    user_agent: Option<String>,
    info: RequestInfo,
    request_object: Option<Value>,
    received: String,
}

impl Record {
    /// What the policy says of `req` by `user`, and what every event of it repeats.
    fn begin(auditor: &Arc<Auditor>, req: &Request, user: UserInfo) -> Record {
        let received = micros_now();
        let info = RequestInfo::parse(req.method(), req.uri().path(), req.uri().query());
        let (level, omit, omit_managed_fields) = auditor.policy.evaluate(&user, &info);
        Record {
            auditor: auditor.clone(),
            level,
            omit,
            omit_managed_fields,
            audit_id: super::handlers::new_uid(),
            request_uri: request_uri(req),
            user,
            source_ips: source_ips(req),
            user_agent: user_agent(req),
            info,
            request_object: None,
            received,
        }
    }

    fn event(
        &self,
        stage: Stage,
        status: Option<ResponseStatus>,
        response_object: Option<Value>,
    ) -> Event<'_> {
        Event {
            kind: "Event",
            api_version: "audit.k8s.io/v1",
            level: self.level,
            audit_id: &self.audit_id,
            stage,
            request_uri: &self.request_uri,
            verb: &self.info.verb,
            user: &self.user,
            source_ips: &self.source_ips,
            user_agent: self.user_agent.as_deref(),
            object_ref: self.info.object.as_ref(),
            response_status: status,
            request_object: self.request_object.as_ref(),
            response_object,
            request_received_timestamp: &self.received,
            stage_timestamp: micros_now(),
        }
    }

    fn wants(&self, stage: Stage) -> bool {
        !self.omit.contains(&stage)
    }
}

/// Request or response body as an event records it: JSON as is, protobuf decoded, anything
/// else left out.
fn body_object(
    content_type: Option<&HeaderValue>,
    body: &[u8],
    omit_managed: bool,
) -> Option<Value> {
    if body.is_empty() {
        return None;
    }
    let ct = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut v = if ct.starts_with("application/vnd.kubernetes.protobuf") {
        super::protobuf::decode_object(body).ok()?
    } else if ct.contains("json") || ct.contains("yaml") || ct.is_empty() {
        serde_json::from_slice::<Value>(body)
            .ok()
            .or_else(|| serde_yaml::from_slice::<Value>(body).ok())?
    } else {
        return None;
    };
    if omit_managed {
        strip_managed_fields(&mut v);
    }
    Some(v)
}

fn strip_managed_fields(v: &mut Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
        for i in items {
            strip_managed_fields(i);
        }
    }
}

/// Tower layer body: records the request's stages as the policy says; adds `Audit-Id` to the
/// response as kube-apiserver does.
pub(crate) async fn audit(
    State(auditor): State<Option<Arc<Auditor>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(auditor) = auditor else {
        return next.run(req).await;
    };
    let user = req
        .extensions()
        .get::<Identity>()
        .map(UserInfo::of)
        .unwrap_or_default();
    let mut record = Record::begin(&auditor, &req, user);
    let level = record.level;
    if level == Level::None {
        let mut resp = next.run(req).await;
        set_audit_id(&mut resp, &record.audit_id);
        return resp;
    }
    let mut refused = None;
    if level >= Level::Request
        && matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
    {
        // Read here (the body-limit layer is inside this one, so the limit applies here too);
        // a body past it is answered, and recorded, as the handlers would.
        let (parts, body) = req.into_parts();
        let limited = Body::new(http_body_util::Limited::new(
            body,
            super::limits::MAX_BODY_BYTES,
        ));
        match super::limits::read_all(limited).await {
            Ok(bytes) => {
                record.request_object = body_object(
                    parts.headers.get(header::CONTENT_TYPE),
                    &bytes,
                    record.omit_managed_fields,
                );
                req = Request::from_parts(parts, Body::from(bytes));
            }
            Err(e) => {
                refused = Some(e.into_response());
                req = Request::from_parts(parts, Body::empty());
            }
        }
    }
    if record.wants(Stage::RequestReceived) {
        auditor
            .emit(&record.event(Stage::RequestReceived, None, None))
            .await;
    }
    let mut resp = match refused {
        Some(r) => r,
        None => next.run(req).await,
    };
    set_audit_id(&mut resp, &record.audit_id);
    if let (Some(o), Some(ObjectName(n))) = (
        record.info.object.as_mut(),
        resp.extensions().get::<ObjectName>(),
    ) && o.name.is_none()
    {
        o.name = Some(n.clone());
    }
    let status = ResponseStatus::of(&resp);
    if record.info.long_running && status.code < 300 {
        if record.wants(Stage::ResponseStarted) {
            auditor
                .emit(&record.event(Stage::ResponseStarted, Some(status.clone()), None))
                .await;
        }
        // Complete when the stream ends (or the client goes away).
        let (parts, body) = resp.into_parts();
        let body = Body::new(AuditedBody {
            inner: body,
            done: Some((record, status)),
        });
        return Response::from_parts(parts, body);
    }
    if !record.wants(Stage::ResponseComplete) {
        return resp;
    }
    let mut response_object = None;
    if level == Level::RequestResponse {
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        response_object = body_object(
            parts.headers.get(header::CONTENT_TYPE),
            &bytes,
            record.omit_managed_fields,
        );
        resp = Response::from_parts(parts, Body::from(bytes));
    }
    auditor
        .emit(&record.event(Stage::ResponseComplete, Some(status), response_object))
        .await;
    resp
}

fn set_audit_id(resp: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("audit-id", v);
    }
}

/// Path and query, as the client sent them.
fn request_uri(req: &Request) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned())
}

fn user_agent(req: &Request) -> Option<String> {
    req.headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `X-Forwarded-For` addresses first, then the peer's, as kube-apiserver lists them.
fn source_ips(req: &Request) -> Vec<String> {
    let mut ips: Vec<String> = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| s.parse::<std::net::IpAddr>().is_ok())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(PeerAddr(a)) = req.extensions().get::<PeerAddr>() {
        let ip = a.ip().to_string();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// A request that failed authentication: recorded with no user at stage `ResponseStarted`,
/// as kube-apiserver's failed-authentication audit does, if the policy records anonymous
/// requests of this kind.
pub(crate) fn failed_authentication(auditor: &Arc<Auditor>, req: &Request, resp: &mut Response) {
    let mut record = Record::begin(auditor, req, UserInfo::default());
    set_audit_id(resp, &record.audit_id);
    if record.level == Level::None || !record.wants(Stage::ResponseStarted) {
        return;
    }
    // No body is read before authentication.
    record.level = record.level.min(Level::Metadata);
    auditor.emit_now(&record.event(Stage::ResponseStarted, Some(ResponseStatus::of(resp)), None));
}

/// A long-running response's body; writes the `ResponseComplete` event when it ends or is
/// dropped (the client went away).
struct AuditedBody {
    inner: Body,
    done: Option<(Record, ResponseStatus)>,
}

impl AuditedBody {
    fn complete(&mut self) {
        if let Some((record, status)) = self.done.take()
            && record.wants(Stage::ResponseComplete)
        {
            record
                .auditor
                .emit_now(&record.event(Stage::ResponseComplete, Some(status), None));
        }
    }
}

impl http_body::Body for AuditedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.complete();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        self.complete();
    }
}

#[cfg(test)]
mod tests;
