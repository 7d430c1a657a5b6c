//! `pods/log` and `pods/exec`: the API server checks the caller, the pod and its container,
//! then reaches the pod's node agent (`runtime::node::server`) over HTTPS.
//!
//! # Trust between API server and agent
//!
//! - The API server authenticates to the agent with the node's *kubelet token*, a one-way
//!   derivation of that node's bearer token ([`kubelet_token`]); the API server can derive
//!   every node token from its node secret, the agent knows its own. Nobody without that
//!   node's token can call the agent.
//! - The agent's serving certificate is self-signed; the API server pins its SHA-256, which the
//!   agent published in its Node annotation (writable only by that node and admins), so the
//!   credential is only ever sent to the real agent.
//! - Who may ask: `get pods/log` and `create pods/exec` per the role model (`auth.rs`): admins
//!   both, the read-only role logs only, node identities neither.
//!
//! # exec
//!
//! kubectl 1.37 asks for a WebSocket with subprotocol `v5.channel.k8s.io` (or `v4`). The API
//! server terminates it: the command runs to completion on the node (`PodRuntime::exec`), then
//! stdout goes out on channel 1, stderr on channel 2 and the final `Status` on channel 3
//! (`Success`, or `Failure`/`NonZeroExitCode` with an `ExitCode` cause, from which kubectl
//! takes its own exit code). Output is therefore delivered when the command ends, and stdin
//! and TTYs are refused.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::auth::{Attributes, Decision, Identity, authorize};
use super::handlers::{App, get_object};
use super::pki::Pki;
use super::resources;
use super::status::ApiError;
use crate::storage::Store;

/// Node annotation with the hex SHA-256 of the agent's serving certificate (as the agent's
/// `SERVING_CERT_ANNOTATION`).
const SERVING_CERT_ANNOTATION: &str = "flotilla.dev/kubelet-serving-cert-sha256";

/// How long connecting to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest an exec may run (the agent bounds the command with it).
const EXEC_TIMEOUT_SECONDS: u64 = 300;

/// The credential for the agent of the node whose bearer token is `node_token` (the same
/// derivation as `runtime::node::server::kubelet_token`).
fn kubelet_token(node_token: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"flotilla kubelet api\0");
    h.update(node_token.as_bytes());
    hex::encode(h.finalize())
}

/// Shared state of the proxy routes.
pub(crate) struct NodeProxy<S> {
    pub app: Arc<App<S>>,
    /// `None` in insecure mode: agents are then called without a credential (and refuse).
    pub pki: Option<Pki>,
}

/// The `log` and `exec` routes, for any router state.
pub(crate) fn routes<S: Store, T: Clone + Send + Sync + 'static>(
    proxy: Arc<NodeProxy<S>>,
) -> Router<T> {
    let p1 = proxy.clone();
    let p2 = proxy;
    Router::new()
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/log",
            get(
                move |Path((ns, name)): Path<(String, String)>, req: Request| {
                    let p = p1.clone();
                    async move {
                        log(&p, &ns, &name, req)
                            .await
                            .unwrap_or_else(IntoResponse::into_response)
                    }
                },
            ),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/exec",
            get({
                let p = p2.clone();
                move |Path((ns, name)): Path<(String, String)>, req: Request| {
                    let p = p.clone();
                    async move {
                        exec(p, &ns, &name, req)
                            .await
                            .unwrap_or_else(IntoResponse::into_response)
                    }
                }
            })
            .post(
                move |Path((ns, name)): Path<(String, String)>, req: Request| {
                    let p = p2.clone();
                    async move {
                        exec(p, &ns, &name, req)
                            .await
                            .unwrap_or_else(IntoResponse::into_response)
                    }
                },
            ),
        )
}

/// Every value of each query parameter, in order.
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn first<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter()
        .find(|(key, v)| key == k && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// A boolean query parameter (the Python client sends `True`).
fn flag(q: &[(String, String)], k: &str) -> bool {
    first(q, k).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn identity(req: &Request) -> Result<Identity, ApiError> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(ApiError::unauthorized)
}

/// Where the pod's container runs.
#[derive(Debug)]
struct Target {
    container: String,
    node: String,
    host: String,
    port: u16,
    pin: String,
    token: Option<String>,
}

/// Authorization, pod, container and node checks shared by logs and exec.
async fn prepare<S: Store>(
    p: &NodeProxy<S>,
    id: &Identity,
    verb: &'static str,
    sub: &'static str,
    ns: &str,
    name: &str,
    container: Option<&str>,
) -> Result<(Target, Value), ApiError> {
    let attrs = Attributes {
        verb,
        group: "",
        resource: "pods",
        subresource: Some(sub),
        namespace: Some(ns),
        name: Some(name),
        field_node_name: None,
        field_name: None,
    };
    if authorize(id, &attrs) != Decision::Allow {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "pods \"{name}\" is forbidden: User \"{}\" cannot {verb} resource \"pods/{sub}\" in API group \"\" in the namespace \"{ns}\"",
                id.user()
            ),
        ));
    }
    let pods = resources::find("", "v1", "pods")
        .ok_or_else(|| ApiError::internal("pods not registered"))?;
    let nodes = resources::find("", "v1", "nodes")
        .ok_or_else(|| ApiError::internal("nodes not registered"))?;
    let pod = get_object(&p.app, pods, Some(ns), name).await?;
    let names_of = |field: &str| -> Vec<&str> {
        pod.pointer(field)
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default()
    };
    let names = names_of("/spec/containers");
    let init_names = names_of("/spec/initContainers");
    let container = match container {
        // Init containers may be named explicitly, as in Kubernetes.
        Some(c) if names.contains(&c) || init_names.contains(&c) => c.to_string(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None if names.len() == 1 => names[0].to_string(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )));
        }
    };
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?
        .to_string();
    let unavailable = |why: String| ApiError::new(503, "ServiceUnavailable", why);
    let node_obj = match get_object(&p.app, nodes, None, &node).await {
        Ok(n) => n,
        Err(e) if e.code == 404 => {
            return Err(unavailable(format!(
                "node {node} of pod {name} does not exist"
            )));
        }
        Err(e) => return Err(e),
    };
    let host = node_obj
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|x| x["type"] == "InternalIP")
                .or_else(|| a.iter().find(|x| x["type"] == "Hostname"))
        })
        .and_then(|x| x["address"].as_str())
        .map(str::to_string);
    let port = node_obj
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let pin = node_obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(SERVING_CERT_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_string);
    let (Some(host), Some(port), Some(pin)) = (host, port, pin) else {
        return Err(unavailable(format!(
            "node {node} has not published a kubelet endpoint (address, daemonEndpoints.kubeletEndpoint.Port and {SERVING_CERT_ANNOTATION})"
        )));
    };
    let token = p
        .pki
        .as_ref()
        .map(|pki| kubelet_token(&pki.node_token(&node)));
    Ok((
        Target {
            container,
            node,
            host,
            port,
            pin,
            token,
        },
        pod,
    ))
}

/// State of a container from the pod status: `Some(reason)` while it waits to start for the
/// first time.
fn first_wait(pod: &Value, container: &str) -> Option<String> {
    let cs = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["name"] == container)?;
    if cs["restartCount"].as_i64().unwrap_or(0) > 0 {
        return None;
    }
    cs.pointer("/state/waiting").map(|w| {
        w.get("reason")
            .and_then(Value::as_str)
            .unwrap_or("ContainerCreating")
            .to_string()
    })
}

// ---------------------------------------------------------------------------------------------
// Talking to the agent

/// One request to the agent of `t` (a fresh connection; these calls are rare).
async fn call_agent(
    t: &Target,
    method: http::Method,
    path_and_query: &str,
    body: Bytes,
) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
    let unreachable = |why: String| {
        ApiError::new(
            503,
            "ServiceUnavailable",
            format!(
                "error dialing backend: node {} ({}:{}): {why}",
                t.node, t.host, t.port
            ),
        )
    };
    let pin = hex::decode(&t.pin).map_err(|_| unreachable("malformed certificate pin".into()))?;
    let mut cfg = apiclient::tls::client_config(apiclient::tls::ServerCheck::Pinned(pin))
        .map_err(|e| unreachable(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls::pki_types::ServerName::try_from(t.host.clone())
        .map_err(|e| unreachable(e.to_string()))?;
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    let addr = format!("{host}:{}", t.port);
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(server_name, tcp)
            .await
    };
    let tls = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable("connection timed out".into())),
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, addr.as_str());
    if let Some(tok) = &t.token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {tok}"));
    }
    let req = req
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    send.send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// An agent's non-200 answer, relayed as the `Status` it carries.
async fn relay_error(resp: http::Response<hyper::body::Incoming>) -> ApiError {
    let code = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let st: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let message = st["message"].as_str().map_or_else(
        || String::from_utf8_lossy(&body).into_owned(),
        str::to_string,
    );
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        501 => "NotImplemented",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    ApiError::new(code, reason, message)
}

// ---------------------------------------------------------------------------------------------
// Logs

async fn log<S: Store>(
    p: &NodeProxy<S>,
    ns: &str,
    name: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let q = query_pairs(&req);
    let id = identity(&req)?;
    let (t, pod) = prepare(p, &id, "get", "log", ns, name, first(&q, "container")).await?;
    if let Some(reason) = first_wait(&pod, &t.container) {
        return Err(ApiError::bad_request(format!(
            "container \"{}\" in pod \"{name}\" is waiting to start: {reason}",
            t.container
        )));
    }
    let agent_q = {
        let mut s = form_urlencoded::Serializer::new(String::new());
        // Booleans are passed on normalised, whatever their spelling.
        for k in ["follow", "timestamps", "previous"] {
            if flag(&q, k) {
                s.append_pair(k, "true");
            }
        }
        for k in ["tailLines", "sinceSeconds", "sinceTime", "limitBytes"] {
            if let Some(v) = first(&q, k) {
                s.append_pair(k, v);
            }
        }
        s.finish()
    };
    let path = format!("/containerLogs/{ns}/{name}/{}?{agent_q}", t.container);
    let resp = call_agent(&t, http::Method::GET, &path, Bytes::new()).await?;
    if resp.status() != StatusCode::OK {
        return Err(relay_error(resp).await);
    }
    let mut out = Response::new(Body::new(resp.into_body()));
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Exec over WebSocket (RFC 6455) with the Kubernetes channel protocol

/// Subprotocols served, most preferred first (same framing; v5 adds a client close signal).
const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// The WebSocket `Sec-WebSocket-Accept` for a client key.
fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The subprotocol to answer with, if the client offers one we serve.
fn choose_protocol(offered: &str) -> Option<&'static str> {
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    PROTOCOLS.iter().copied().find(|p| offered.contains(p))
}

async fn exec<S: Store>(
    p: Arc<NodeProxy<S>>,
    ns: &str,
    name: &str,
    mut req: Request,
) -> Result<Response, ApiError> {
    let q = query_pairs(&req);
    let id = identity(&req)?;
    let (t, pod) = prepare(&p, &id, "create", "exec", ns, name, first(&q, "container")).await?;
    let command: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    if flag(&q, "tty") {
        return Err(ApiError::bad_request(
            "tty is not supported: Flotilla runs exec commands to completion (drop -t)",
        ));
    }
    if flag(&q, "stdin") {
        return Err(ApiError::bad_request(
            "stdin is not supported: Flotilla runs exec commands to completion (drop -i)",
        ));
    }
    if let Some(reason) = first_wait(&pod, &t.container) {
        return Err(ApiError::bad_request(format!(
            "container \"{}\" in pod \"{name}\" is waiting to start: {reason}",
            t.container
        )));
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
        .and_then(choose_protocol);
    let (true, Some(key), Some(proto)) = (is_ws, key, proto) else {
        return Err(ApiError::bad_request(format!(
            "exec is served over a WebSocket with subprotocol {} (SPDY is not supported)",
            PROTOCOLS.join(" or ")
        )));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (want_out, want_err) = (flag(&q, "stdout"), flag(&q, "stderr"));
    let path = format!("/exec/{ns}/{name}/{}", t.container);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "exec upgrade failed");
                return;
            }
        };
        let frames = async move {
            let outcome = run_on_agent(&t, &path, &command).await;
            exec_frames(&command, outcome, want_out, want_err)
        };
        if let Err(e) = session(TokioIo::new(upgraded), frames).await {
            tracing::debug!(error = %e, "exec session ended with an error");
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept_key(&key)).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    hs.insert("sec-websocket-protocol", HeaderValue::from_static(proto));
    Ok(resp)
}

/// What the command did: exit code and output, or why it could not run.
#[derive(Debug, Clone, PartialEq)]
struct ExecResult {
    exit_code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

async fn run_on_agent(t: &Target, path: &str, command: &[String]) -> Result<ExecResult, ApiError> {
    let body = json!({"command": command, "timeoutSeconds": EXEC_TIMEOUT_SECONDS}).to_string();
    let resp = call_agent(t, http::Method::POST, path, Bytes::from(body)).await?;
    if resp.status() != StatusCode::OK {
        return Err(relay_error(resp).await);
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::internal(format!("reading the agent's answer: {e}")))?
        .to_bytes();
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::internal(format!("the agent's answer is not JSON: {e}")))?;
    let bytes = |k: &str| hex::decode(v[k].as_str().unwrap_or_default()).unwrap_or_default();
    Ok(ExecResult {
        exit_code: v["exitCode"]
            .as_i64()
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(-1),
        stdout: bytes("stdout"),
        stderr: bytes("stderr"),
    })
}

/// The final `Status` sent on channel 3.
fn exec_status(command: &[String], outcome: &Result<ExecResult, ApiError>) -> Value {
    match outcome {
        Ok(r) if r.exit_code == 0 => json!({"metadata": {}, "status": "Success"}),
        Ok(r) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {}",
                command.join(" "), r.exit_code
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": r.exit_code.to_string()}]},
        }),
        Err(e) => json!({
            "metadata": {}, "status": "Failure", "message": e.message,
            "reason": e.reason, "code": e.code,
        }),
    }
}

/// Channel-prefixed messages for the session: stdout (1), stderr (2), then the status (3).
fn exec_frames(
    command: &[String],
    outcome: Result<ExecResult, ApiError>,
    want_out: bool,
    want_err: bool,
) -> Vec<Vec<u8>> {
    let mut msgs = Vec::new();
    if let Ok(r) = &outcome {
        // Chunked so no single WebSocket message gets large.
        for (ch, data, wanted) in [(1u8, &r.stdout, want_out), (2u8, &r.stderr, want_err)] {
            if wanted {
                for chunk in data.chunks(32 * 1024) {
                    msgs.push(channel_message(ch, chunk));
                }
            }
        }
    }
    msgs.push(channel_message(
        3,
        exec_status(command, &outcome).to_string().as_bytes(),
    ));
    msgs
}

fn channel_message(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(data.len() + 1);
    m.push(channel);
    m.extend_from_slice(data);
    m
}

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Largest client frame accepted (clients only send stdin, close signals and pings here).
const MAX_CLIENT_FRAME: u64 = 1 << 20;

/// One unmasked server frame with FIN set.
fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(u8::try_from(n).unwrap_or(0)),
        n if n <= 0xFFFF => {
            f.push(126);
            f.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Reads one client frame: `(opcode, payload)` with the mask removed.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > MAX_CLIENT_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "WebSocket frame too large",
        ));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((opcode, payload))
}

/// Sends the messages `produce` yields as binary frames, then a normal close. Pings are
/// answered from the start, while the command still runs (client-go gives up on a connection
/// whose pings go unanswered for a few seconds); what else the client sends is ignored
/// (stdin is not served).
async fn session<IO, F>(io: IO, produce: F) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = Vec<Vec<u8>>>,
{
    let (mut rd, wr) = tokio::io::split(io);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let reader = {
        let wr = wr.clone();
        tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok((OP_PING, data)) => {
                        let mut w = wr.lock().await;
                        if w.write_all(&encode_frame(OP_PONG, &data)).await.is_err() {
                            return;
                        }
                        let _ = w.flush().await;
                    }
                    Ok((OP_CLOSE, _)) | Err(_) => return,
                    Ok((OP_CONT | OP_TEXT | OP_BINARY | OP_PONG, _)) | Ok(_) => {}
                }
            }
        })
    };
    let messages = produce.await;
    {
        let mut w = wr.lock().await;
        for m in &messages {
            w.write_all(&encode_frame(OP_BINARY, m)).await?;
        }
        // Close 1000 (normal closure).
        w.write_all(&encode_frame(OP_CLOSE, &1000u16.to_be_bytes()))
            .await?;
        w.flush().await?;
    }
    // Give the client a moment to answer the close, then drop the connection.
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    let mut w = wr.lock().await;
    let _ = w.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_key_matches_rfc6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            choose_protocol("v4.channel.k8s.io, v5.channel.k8s.io"),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(choose_protocol("channel.k8s.io"), None);
    }

    #[test]
    fn kubelet_token_matches_the_agent_derivation() {
        // Same vector as runtime::node::server's test: both sides must agree.
        assert_eq!(
            kubelet_token("node.n1.abc"),
            "a11ef30d975e5e09f9c89cee463c84f4d6435d315e471522122be3dc427b800e"
        );
    }

    #[tokio::test]
    async fn frames_round_trip_through_a_masked_client_encoding() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let server = encode_frame(OP_BINARY, &payload);
            // Re-encode as a client would: mask bit and key.
            let mut client = server.clone();
            client[1] |= 0x80;
            let hdr = match len {
                n if n < 126 => 2,
                n if n <= 0xFFFF => 4,
                _ => 10,
            };
            let key = [0x12, 0x34, 0x56, 0x78];
            let mut masked: Vec<u8> = client[..hdr].to_vec();
            masked.extend_from_slice(&key);
            masked.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            let (op, got) = read_frame(&mut masked.as_slice()).await.expect("frame");
            assert_eq!((op, got), (OP_BINARY, payload.clone()), "len {len}");
            let (op, got) = read_frame(&mut server.as_slice()).await.expect("frame");
            assert_eq!((op, got.len()), (OP_BINARY, len));
        }
    }

    #[test]
    fn exec_frames_carry_channels_and_the_exit_code_status() {
        let cmd = vec!["sh".to_string(), "-c".into(), "exit 3".into()];
        let ok = ExecResult {
            exit_code: 3,
            stdout: b"out".to_vec(),
            stderr: b"err".to_vec(),
        };
        let msgs = exec_frames(&cmd, Ok(ok.clone()), true, true);
        assert_eq!(msgs[0], b"\x01out");
        assert_eq!(msgs[1], b"\x02err");
        assert_eq!(msgs[2][0], 3);
        let st: Value = serde_json::from_slice(&msgs[2][1..]).expect("status json");
        assert_eq!(st["status"], "Failure");
        assert_eq!(st["reason"], "NonZeroExitCode");
        assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(st["details"]["causes"][0]["message"], "3");
        // stderr not asked for: not sent.
        let msgs = exec_frames(&cmd, Ok(ok), true, false);
        assert_eq!(msgs.len(), 2);
        let success = ExecResult {
            exit_code: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        let msgs = exec_frames(&cmd, Ok(success), true, true);
        assert_eq!(msgs.len(), 1);
        let st: Value = serde_json::from_slice(&msgs[0][1..]).expect("status json");
        assert_eq!(st, json!({"metadata": {}, "status": "Success"}));
        let err = ApiError::new(404, "NotFound", "pod default/x is not running on this node");
        let msgs = exec_frames(&cmd, Err(err), true, true);
        let st: Value = serde_json::from_slice(&msgs[0][1..]).expect("status json");
        assert_eq!(
            (st["status"].as_str(), st["code"].as_i64()),
            (Some("Failure"), Some(404))
        );
    }

    #[tokio::test]
    async fn session_answers_pings_while_waiting_then_sends_and_closes() {
        let (server_io, mut client) = tokio::io::duplex(1 << 16);
        let msgs = vec![channel_message(1, b"hi\n"), channel_message(3, b"{}")];
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(session(server_io, async move {
            let _ = wait.await;
            msgs
        }));
        // A masked ping from the client is answered while the command still runs.
        client
            .write_all(&[0x80 | OP_PING, 0x80 | 2, 0, 0, 0, 0, b'p', b'!'])
            .await
            .expect("ping");
        assert_eq!(
            read_frame(&mut client).await.expect("pong"),
            (OP_PONG, b"p!".to_vec())
        );
        go.send(()).expect("session waits");
        let mut seen = Vec::new();
        loop {
            let (op, data) = read_frame(&mut client).await.expect("frame");
            seen.push((op, data));
            if op == OP_CLOSE {
                break;
            }
        }
        assert!(seen.contains(&(OP_BINARY, b"\x01hi\n".to_vec())));
        assert!(seen.contains(&(OP_BINARY, b"\x03{}".to_vec())));
        assert_eq!(seen.last(), Some(&(OP_CLOSE, vec![0x03, 0xE8])));
        // Answer the close; the session then ends.
        client
            .write_all(&[0x80 | OP_CLOSE, 0x80, 0, 0, 0, 0])
            .await
            .expect("close");
        task.await.expect("join").expect("session");
    }
}
