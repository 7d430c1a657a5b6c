//! Failover between servers, against fake HTTP/2 API servers on loopback.
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::*;

/// A fake server: answers every request with its name and the method, or with `status`; counts
/// what it received. Stopping it aborts the accept loop and every connection, like a kill.
struct Fake {
    url: String,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

type Answer = Arc<dyn Fn(&Request<Incoming>) -> (StatusCode, Value) + Send + Sync>;

async fn fake(name: &'static str, answer: Option<Answer>) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (h, answer) = (h.clone(), answer.clone());
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = match &answer {
                        Some(f) => f(&req),
                        None => (
                            StatusCode::OK,
                            json!({"server": name, "method": req.method().as_str()}),
                        ),
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body.to_string())))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Fake { url, hits, task }
}

impl Fake {
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn server_of(v: &Value) -> &str {
    v["server"].as_str().unwrap_or_default()
}

/// A URL nothing listens on.
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

#[test]
fn parses_comma_separated_servers_and_rejects_mixed_schemes() {
    let c = ApiClient::new(
        "http://127.0.0.1:1, http://127.0.0.1:2/,http://127.0.0.1:1",
        None,
        None,
    )
    .expect("client");
    assert_eq!(c.servers(), ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    assert_eq!(c.server(), "http://127.0.0.1:1");
    assert!(ApiClient::new("http://a:1,https://b:2", None, Some("")).is_err());
    assert!(ApiClient::new("", None, None).is_err());
}

#[test]
fn endpoint_urls_lists_every_address_and_port() {
    let ep = json!({"subsets": [
        {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"name": "https", "port": 6443}]},
        {"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 7443}]},
        {"notReadyAddresses": [{"ip": "10.0.0.9"}], "ports": [{"port": 6443}]}
    ]});
    assert_eq!(
        endpoint_urls(&ep, "https"),
        [
            "https://10.0.0.1:6443",
            "https://10.0.0.2:6443",
            "https://[fd00::1]:7443"
        ]
    );
    assert!(endpoint_urls(&json!({}), "https").is_empty());
}

#[test]
fn set_servers_keeps_seeds_and_the_server_in_use() {
    let c = ApiClient::new("http://127.0.0.1:1", None, None).expect("client");
    c.set_servers(&["http://127.0.0.1:2".into(), "https://127.0.0.1:3".into()]);
    assert_eq!(c.servers(), ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    c.switch("http://127.0.0.1:1", "http://127.0.0.1:2", "test");
    c.set_servers(&["http://127.0.0.1:4".into(), "http://127.0.0.1:2".into()]);
    assert_eq!(
        c.servers(),
        [
            "http://127.0.0.1:1",
            "http://127.0.0.1:4",
            "http://127.0.0.1:2"
        ]
    );
    assert_eq!(c.server(), "http://127.0.0.1:2");
    // A learned server that is no longer published is dropped; the seed stays.
    c.set_servers(&["http://127.0.0.1:4".into()]);
    assert_eq!(c.servers(), ["http://127.0.0.1:1", "http://127.0.0.1:4"]);
    assert_eq!(c.server(), "http://127.0.0.1:1");
}

#[tokio::test]
async fn fails_over_when_the_server_in_use_dies_and_stays_there() {
    let a = fake("a", None).await;
    let b = fake("b", None).await;
    let c = ApiClient::new(&format!("{},{}", a.url, b.url), None, None).expect("client");
    let v = c.request(Method::GET, "/x", None).await.expect("get a");
    assert_eq!(server_of(&v), "a");
    let b_url = b.url.clone();
    a.kill().await;
    // The open connection to a is gone; a non-idempotent POST that never reached anyone
    // (connecting failed) goes to b.
    let v = c
        .request(Method::POST, "/x", Some(("application/json", &json!({}))))
        .await
        .expect("post fails over");
    assert_eq!(server_of(&v), "b");
    assert_eq!(c.server(), b_url);
    let v = c.request(Method::GET, "/x", None).await.expect("get b");
    assert_eq!(server_of(&v), "b");
    assert_eq!(b.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_first_server_is_skipped() {
    let dead = dead_url().await;
    let b = fake("b", None).await;
    let c = ApiClient::new(&format!("{dead},{}", b.url), None, None).expect("client");
    let v = c.request(Method::GET, "/x", None).await.expect("get");
    assert_eq!(server_of(&v), "b");
    assert_eq!(c.server(), b.url);
    // All down: the error names the last server tried.
    let all_dead = ApiClient::new(&format!("{dead},{}", dead_url().await), None, None).expect("c");
    let e = all_dead
        .request(Method::GET, "/x", None)
        .await
        .expect_err("all down");
    assert!(matches!(e, ClientError::Transport(_)), "{e}");
}

#[tokio::test]
async fn unavailable_answers_fail_over_only_replayable_requests() {
    let unavailable: Answer = Arc::new(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"kind": "Status", "reason": "ServiceUnavailable", "message": "store down"}),
        )
    });
    let a = fake("a", Some(unavailable)).await;
    let b = fake("b", None).await;
    let c = ApiClient::new(&format!("{},{}", a.url, b.url), None, None).expect("client");
    // A POST that reached a and was refused is not replayed elsewhere: the caller sees the 503.
    let e = c
        .request(Method::POST, "/x", Some(("application/json", &json!({}))))
        .await
        .expect_err("post answered 503");
    assert_eq!(e.code(), Some(503));
    assert_eq!(a.hits.load(Ordering::SeqCst), 1);
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);
    // A PUT (carrying its resourceVersion) and a GET are.
    let v = c
        .request(Method::PUT, "/x", Some(("application/json", &json!({}))))
        .await
        .expect("put fails over");
    assert_eq!(server_of(&v), "b");
    assert_eq!(c.server(), b.url);
}

#[tokio::test]
async fn learns_servers_from_the_kubernetes_endpoints() {
    let b = fake("b", None).await;
    let b_port: u16 = b
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let publish: Answer = Arc::new(move |req| {
        if req.uri().path() == SERVERS_ENDPOINTS_PATH {
            (
                StatusCode::OK,
                json!({"kind": "Endpoints", "subsets": [
                    {"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": b_port}]}
                ]}),
            )
        } else {
            (StatusCode::OK, json!({"server": "a"}))
        }
    });
    let a = fake("a", Some(publish)).await;
    let c = ApiClient::new(&a.url, None, None).expect("client");
    let servers = c.refresh_servers().await.expect("refresh");
    assert_eq!(servers, [a.url.clone(), b.url.clone()]);
    a.kill().await;
    let v = c
        .request(Method::GET, "/x", None)
        .await
        .expect("learned server answers");
    assert_eq!(server_of(&v), "b");
}

#[tokio::test]
async fn a_watch_restarted_after_its_server_died_lands_on_the_next() {
    let a = fake("a", None).await;
    let b = fake("b", None).await;
    let c = ApiClient::new(&format!("{},{}", a.url, b.url), None, None).expect("client");
    let mut w = c
        .watch("/api/v1/pods?watch=true&resourceVersion=5")
        .await
        .expect("watch a");
    a.kill().await;
    // The fake answers one JSON line without a newline and closes the stream on a's death.
    while let Some(Ok(_)) = w.next().await {}
    let _w = c
        .watch("/api/v1/pods?watch=true&resourceVersion=5")
        .await
        .expect("watch b");
    assert_eq!(c.server(), b.url);
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);
}

/// An in-process server: echoes method, path, bearer token and body; `/watch` streams two
/// events; `/missing` answers a 404 `Status`.
fn local_echo() -> Arc<dyn LocalService> {
    Arc::new(|req: Request<Full<Bytes>>| -> local::ResponseFuture {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.expect("full body").to_bytes();
            let auth = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (status, text) = match parts.uri.path() {
                "/watch" => (
                    StatusCode::OK,
                    "{\"type\":\"ADDED\",\"object\":{\"n\":1}}\n\n{\"type\":\"DELETED\",\"object\":{\"n\":2}}\n"
                        .to_string(),
                ),
                "/missing" => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "reason": "NotFound", "message": "gone"}).to_string(),
                ),
                _ => (
                    StatusCode::OK,
                    json!({
                        "method": parts.method.as_str(),
                        "uri": parts.uri.to_string(),
                        "auth": auth,
                        "body": String::from_utf8_lossy(&body),
                    })
                    .to_string(),
                ),
            };
            Response::builder()
                .status(status)
                .body(
                    Full::new(Bytes::from(text))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .expect("response")
        })
    })
}

#[tokio::test]
async fn a_local_client_calls_the_service_with_its_token() {
    let c = ApiClient::local(local_echo(), Some("secret"));
    assert_eq!(c.server(), LOCAL_SERVER);
    let v = c
        .create("/api/v1/namespaces/a/pods?dryRun=All", &json!({"x": 1}))
        .await
        .expect("create");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/api/v1/namespaces/a/pods?dryRun=All");
    assert_eq!(v["auth"], "Bearer secret");
    assert_eq!(v["body"], r#"{"x":1}"#);
    let e = c.get("/missing").await.expect("a 404 is None");
    assert!(e.is_none());
    let err = c.create("/missing", &json!({})).await.expect_err("404");
    assert!(err.is_not_found(), "{err}");
    // Learned servers do not apply to an in-process client.
    c.set_servers(&["https://10.0.0.1:6443".into()]);
    assert_eq!(c.servers(), Vec::<String>::new());
}

#[tokio::test]
async fn a_local_watch_streams_events() {
    let c = ApiClient::local(local_echo(), None);
    let mut w = c.watch("/watch").await.expect("watch");
    let a = w.next().await.expect("first").expect("decoded");
    assert_eq!(
        (a.kind.as_str(), a.object["n"].as_i64()),
        ("ADDED", Some(1))
    );
    let b = w.next().await.expect("second").expect("decoded");
    assert_eq!(
        (b.kind.as_str(), b.object["n"].as_i64()),
        ("DELETED", Some(2))
    );
    assert!(w.next().await.is_none());
}
