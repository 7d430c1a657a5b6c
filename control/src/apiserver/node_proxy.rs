//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward`: the API server checks the caller, the pod and its container,
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
//! # exec and attach
//!
//! kubectl 1.37 asks for a WebSocket with subprotocol `v5.channel.k8s.io` (or `v4`). The API
//! server checks the request, opens the same upgrade to the agent's `/exec` or `/attach` (the
//! client's key and offered subprotocols passed on), answers the client with the agent's
//! `101`, and from then on copies bytes both ways: the agent speaks the channel protocol
//! (stdin 0, stdout 1, stderr 2, the final `Status` 3, resize 4, v5's close signal 255), so
//! output streams as it is produced and stdin and TTYs work where the runtime supports them.
//!
//! # port-forward
//!
//! kubectl 1.37 asks for a WebSocket with subprotocol `SPDY/3.1+portforward.k8s.io` (SPDY/3.1
//! frames inside binary messages). It is passed through the same way to the agent's
//! `/portForward`, with the pod's `status.podIP` for the agent to dial.
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
use serde_json::Value;

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
            stream_route(p2.clone(), "exec"),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/attach",
            stream_route(p2.clone(), "attach"),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/portforward",
            stream_route(p2, "portforward"),
        )
}

/// GET (WebSocket, kubectl 1.37) and POST (the SPDY fallback, answered with a Status) of a
/// streaming subresource.
fn stream_route<S: Store, T: Clone + Send + Sync + 'static>(
    p: Arc<NodeProxy<S>>,
    sub: &'static str,
) -> axum::routing::MethodRouter<T> {
    let handler = move |Path((ns, name)): Path<(String, String)>, req: Request| {
        let p = p.clone();
        async move {
            stream(p, sub, &ns, &name, req)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
    };
    get(handler.clone()).post(handler)
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
        None if names.len() == 1 || (sub == "portforward" && !names.is_empty()) => {
            // Port-forward targets the pod, not a container.
            names[0].to_string()
        }
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
    headers: &[(&'static str, String)],
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
        // Upgrades: the exec/attach WebSocket continues on this connection.
        let _ = conn.with_upgrades().await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(header::HOST, addr.as_str());
    if let Some(tok) = &t.token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {tok}"));
    }
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
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
    let resp = call_agent(&t, http::Method::GET, &path, &[], Bytes::new()).await?;
    if resp.status() != StatusCode::OK {
        return Err(relay_error(resp).await);
    }
    let mut out = Response::new(Body::new(resp.into_body()));
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Exec and attach: a WebSocket passed through to the agent

/// Subprotocols passed on (the agent serves both; v5 adds the client's close signal).
const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// `kubectl port-forward`'s subprotocol: SPDY/3.1 tunnelled in the WebSocket.
const PORT_FORWARD_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// `pods/exec` and `pods/attach`: checks the caller, pod and container, opens the same
/// WebSocket upgrade to the pod's agent, answers the client with the agent's `101` and then
/// copies bytes both ways until either side closes.
async fn stream<S: Store>(
    p: Arc<NodeProxy<S>>,
    sub: &'static str,
    ns: &str,
    name: &str,
    mut req: Request,
) -> Result<Response, ApiError> {
    let q = query_pairs(&req);
    let id = identity(&req)?;
    let (t, pod) = prepare(&p, &id, "create", sub, ns, name, first(&q, "container")).await?;
    let command: Vec<&str> = q
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.as_str())
        .collect();
    if sub == "exec" && command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    let forward = sub == "portforward";
    if forward {
        if pod.pointer("/status/phase").and_then(Value::as_str) != Some("Running") {
            return Err(ApiError::bad_request(format!(
                "unable to forward port because pod is not running. Current status={}",
                pod.pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown")
            )));
        }
    } else if let Some(reason) = first_wait(&pod, &t.container) {
        return Err(ApiError::bad_request(format!(
            "container \"{}\" in pod \"{name}\" is waiting to start: {reason}",
            t.container
        )));
    }
    let served: &[&str] = if forward {
        &[PORT_FORWARD_PROTOCOL]
    } else {
        PROTOCOLS
    };
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = h
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let offered: Vec<String> = h
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| served.contains(&p.as_str()))
        .collect();
    let (true, Some(key), false) = (is_ws, key, offered.is_empty()) else {
        return Err(ApiError::bad_request(format!(
            "{sub} is served over a WebSocket with subprotocol {} (plain SPDY is not supported)",
            served.join(" or ")
        )));
    };
    let agent_q = {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for c in &command {
            s.append_pair("command", c);
        }
        // Booleans are passed on normalised, whatever their spelling.
        for k in ["stdin", "stdout", "stderr", "tty"] {
            if flag(&q, k) {
                s.append_pair(k, "true");
            }
        }
        s.finish()
    };
    let path = if forward {
        // The agent dials the pod's address (its CNI IP, or the node's for pods sharing it).
        let ip = pod
            .pointer("/status/podIP")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("ip", ip)
            .finish();
        format!("/portForward/{ns}/{name}?{q}")
    } else {
        format!("/{sub}/{ns}/{name}/{}?{agent_q}", t.container)
    };
    let headers = [
        ("connection", "Upgrade".to_string()),
        ("upgrade", "websocket".to_string()),
        ("sec-websocket-version", "13".to_string()),
        ("sec-websocket-key", key),
        ("sec-websocket-protocol", offered.join(", ")),
    ];
    let resp = call_agent(&t, http::Method::GET, &path, &headers, Bytes::new()).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(relay_error(resp).await);
    }
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for k in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        if let Some(v) = resp.headers().get(&k) {
            out.headers_mut().insert(k, v.clone());
        }
    }
    let client = hyper::upgrade::on(&mut req);
    let agent = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let (client, agent) = match tokio::join!(client, agent) {
            (Ok(c), Ok(a)) => (c, a),
            (c, a) => {
                tracing::debug!(client = ?c.err(), agent = ?a.err(), "{sub} upgrade failed");
                return;
            }
        };
        let (mut client, mut agent) = (TokioIo::new(client), TokioIo::new(agent));
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
            tracing::debug!(error = %e, "{sub} session ended with an error");
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_token_matches_the_agent_derivation() {
        // Same vector as runtime::node::server's test: both sides must agree.
        assert_eq!(
            kubelet_token("node.n1.abc"),
            "a11ef30d975e5e09f9c89cee463c84f4d6435d315e471522122be3dc427b800e"
        );
    }
}
