//! Joining servers into an HA control plane (`flotilla server --join URL --token-file F`).
//!
//! The first server writes a k3s-style server token, `K10<ca-hash>::server:<secret>`, to
//! `DATA_DIR/server-token`. A joining server
//! 1. opens a TLS connection to `URL` trusting nothing, and keeps the CA certificate the
//!    server presents only if its SHA-256 equals the token's hash (no secret is sent on that
//!    connection);
//! 2. calls `POST /v1-flotilla/join` over a connection verified with that CA, with the token
//!    as bearer token, and receives the shared credentials ([`JoinBundle`]: CA and key, admin,
//!    read-only, node and server secrets) and the store it should add its member to
//!    ([`StoreJoinInfo`]).
//!
//! The route sits outside the authentication layer: only the server token may call it (401
//! without a known credential, 403 for any other credential), and no other route accepts it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rustls::pki_types::ServerName;
use serde_json::json;

use super::pki::{JoinBundle, Pki, ServerToken, ca_hash_der};
use super::status::ApiError;

/// Path of the join endpoint.
pub const JOIN_PATH: &str = "/v1-flotilla/join";

/// Where a joining server adds its store member: the first server's embedded store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoreJoinInfo {
    /// etcd v3 client URLs of the store (`MemberAdd` goes to one of them).
    pub client_urls: Vec<String>,
    /// The store's `--initial-cluster-token` (member ids derive from it).
    pub cluster_token: String,
}

/// What `POST /v1-flotilla/join` answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinAnswer {
    /// The shared credentials.
    pub bundle: JoinBundle,
    /// The embedded store to join; `None` when the server uses an external store.
    pub store: Option<StoreJoinInfo>,
}

/// State of the join route.
pub(crate) struct JoinState {
    pub pki: Option<Pki>,
    pub store: Option<StoreJoinInfo>,
}

/// The join route, to be merged outside the authentication layer.
pub(crate) fn routes(state: Arc<JoinState>) -> Router {
    Router::new().route(JOIN_PATH, post(join)).with_state(state)
}

async fn join(State(state): State<Arc<JoinState>>, headers: HeaderMap) -> Response {
    let Some(pki) = &state.pki else {
        return ApiError::not_found_path().into_response();
    };
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return ApiError::unauthorized().into_response();
    };
    if !pki.is_server_token(token) {
        return match pki.authenticate(token) {
            Some(id) => ApiError::new(
                403,
                "Forbidden",
                format!(
                    "User \"{}\" cannot join servers: only the server join token \
                     (DATA_DIR/server-token) may",
                    id.user()
                ),
            )
            .into_response(),
            None => ApiError::unauthorized().into_response(),
        };
    }
    let Some(bundle) = pki.join_bundle() else {
        return ApiError::new(
            409,
            "Conflict",
            "this server's CA key is not on disk (its data dir predates --join), so it cannot \
             admit servers; start the cluster from a fresh data dir",
        )
        .into_response();
    };
    tracing::info!("a server joined with the server token; handing over the cluster credentials");
    let answer = JoinAnswer {
        bundle,
        store: state.store.clone(),
    };
    match serde_json::to_string(&answer) {
        Ok(body) => ([(http::header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// Why joining failed; each message names the URL and what to do.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No TLS connection to the server.
    #[error(
        "cannot reach the server at {url}: {message}. Check that `flotilla server` runs there and \
         that --join names its --listen address as https://HOST:PORT"
    )]
    Unreachable {
        /// The `--join` URL.
        url: String,
        /// The cause.
        message: String,
    },
    /// The server's CA is not the one the token pins.
    #[error(
        "the server at {url} presented a CA whose hash is not the token's ({want}…; it presented \
         {got}): the token belongs to another cluster, or --join names the wrong server"
    )]
    CaMismatch {
        /// The `--join` URL.
        url: String,
        /// Start of the token's hash.
        want: String,
        /// Start of the hashes presented.
        got: String,
    },
    /// The server refused the token.
    #[error(
        "the server at {url} refused the join token ({code}: {message}); use the \
         DATA_DIR/server-token of a server of that cluster"
    )]
    Refused {
        /// The `--join` URL.
        url: String,
        /// HTTP status.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// Anything else (bad URL, unexpected answer).
    #[error("joining through {url} failed: {message}")]
    Other {
        /// The `--join` URL.
        url: String,
        /// The cause.
        message: String,
    },
}

/// Fetches the cluster credentials from the server at `url` (`https://host:port`) with the
/// server join `token`, pinning its CA by the token's hash.
pub async fn fetch_join(url: &str, token: &ServerToken) -> Result<JoinAnswer, JoinError> {
    let other = |message: String| JoinError::Other {
        url: url.to_string(),
        message,
    };
    let authority = url
        .strip_prefix("https://")
        .ok_or_else(|| other("--join must be an https:// URL".into()))?
        .trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse::<u16>()
                .map_err(|_| other(format!("bad port in {url:?}")))?,
        ),
        None => (authority.to_string(), 6443),
    };
    let ca_pem = pinned_ca(url, &host, port, &token.ca_hash).await?;
    let client = apiclient::ApiClient::new(
        &format!("https://{authority}"),
        Some(&token.to_string()),
        Some(&ca_pem),
    )
    .map_err(|e| other(e.to_string()))?;
    let answer = client
        .request(
            http::Method::POST,
            JOIN_PATH,
            Some(("application/json", &json!({}))),
        )
        .await
        .map_err(|e| match e {
            apiclient::ClientError::Status { code, message, .. } => JoinError::Refused {
                url: url.to_string(),
                code,
                message,
            },
            apiclient::ClientError::Transport(m) if m.contains("NotValidForName") => other(format!(
                "{m}: {host} is not among the server's certificate names (add it with --tls-san \
                 there, or join through an address it has)"
            )),
            apiclient::ClientError::Transport(message) => JoinError::Unreachable {
                url: url.to_string(),
                message,
            },
            e => other(e.to_string()),
        })?;
    serde_json::from_value(answer).map_err(|e| other(format!("unexpected answer: {e}")))
}

/// A TLS handshake that trusts nothing and records the chain; returns the PEM of the presented
/// certificate whose SHA-256 is `want`.
async fn pinned_ca(url: &str, host: &str, port: u16, want: &str) -> Result<String, JoinError> {
    let unreachable = |message: String| JoinError::Unreachable {
        url: url.to_string(),
        message,
    };
    let (cfg, captured) =
        apiclient::tls::capturing_client_config().map_err(|e| unreachable(e.to_string()))?;
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| unreachable("connect timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| JoinError::Other {
        url: url.to_string(),
        message: format!("server name: {e}"),
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let stream = tokio::time::timeout(std::time::Duration::from_secs(10), tls.connect(name, tcp))
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
    drop(stream);
    let chain = captured
        .lock()
        .map_err(|_| unreachable("poisoned".into()))?
        .clone();
    let hashes: Vec<String> = chain.iter().map(|c| ca_hash_der(c)).collect();
    match chain.iter().zip(&hashes).find(|(_, h)| h.as_str() == want) {
        Some((der, _)) => Ok(der_to_pem(der)),
        None => Err(JoinError::CaMismatch {
            url: url.to_string(),
            want: want.chars().take(16).collect(),
            got: hashes
                .iter()
                .map(|h| format!("{}…", &h[..16.min(h.len())]))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::{ApiServer, ApiServerConfig};
    use crate::storage::MemStore;

    /// A server on loopback; returns its URL, PKI and a stop token.
    async fn serve(dir: &std::path::Path) -> (String, Pki, tokio_util::sync::CancellationToken) {
        let mut server =
            ApiServer::new(ApiServerConfig::new(dir), MemStore::new()).expect("server");
        server.set_store_join(StoreJoinInfo {
            client_urls: vec!["http://127.0.0.1:1".into()],
            cluster_token: "t".into(),
        });
        let pki = server.pki().expect("pki").clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(server.serve(listener, stop.clone()));
        (url, pki, stop)
    }

    #[tokio::test]
    async fn only_the_server_token_joins_and_the_ca_is_pinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, pki, stop) = serve(dir.path()).await;
        let token = pki.server_token().expect("token");
        assert_eq!(ServerToken::parse(&token.to_string()), Ok(token.clone()));

        let answer = fetch_join(&url, &token).await.expect("join");
        assert_eq!(answer.bundle.admin_token, pki.admin_token);
        assert_eq!(answer.bundle.ca_cert, pki.ca_pem);
        assert_eq!(answer.store.map(|s| s.cluster_token).as_deref(), Some("t"));

        // A joiner's PKI from the bundle: its own serving certificate, the same credentials.
        let joined = tempfile::tempdir().expect("tempdir");
        answer.bundle.install(joined.path()).expect("install");
        let pki2 = Pki::load_or_create(joined.path(), &["10.9.8.7".into()]).expect("pki2");
        assert_eq!(pki2.ca_pem, pki.ca_pem);
        assert_eq!(
            pki2.authenticate(&pki.node_token("n1")),
            pki.authenticate(&pki.node_token("n1"))
        );
        assert_eq!(pki2.server_token().expect("t2"), token);
        assert!(pki2.server_config().is_ok());

        let wrong_secret = ServerToken {
            ca_hash: token.ca_hash.clone(),
            secret: "nope".into(),
        };
        match fetch_join(&url, &wrong_secret).await {
            Err(JoinError::Refused { code: 401, .. }) => {}
            other => panic!("want 401, got {other:?}"),
        }
        let wrong_ca = ServerToken {
            ca_hash: "0".repeat(64),
            secret: token.secret.clone(),
        };
        match fetch_join(&url, &wrong_ca).await {
            Err(JoinError::CaMismatch { .. }) => {}
            other => panic!("want a CA mismatch, got {other:?}"),
        }
        // Another valid credential is not enough.
        let admin = apiclient::ApiClient::new(&url, Some(&pki.admin_token), Some(&pki.ca_pem))
            .expect("client");
        let e = admin
            .request(
                http::Method::POST,
                JOIN_PATH,
                Some(("application/json", &json!({}))),
            )
            .await
            .expect_err("admin may not join");
        assert_eq!(e.code(), Some(403), "{e}");
        // And the server token is no credential for the API.
        let as_server =
            apiclient::ApiClient::new(&url, Some(&token.to_string()), Some(&pki.ca_pem))
                .expect("client");
        let e = as_server.get("/api/v1/namespaces").await.expect_err("401");
        assert_eq!(e.code(), Some(401), "{e}");
        stop.cancel();

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let gone = format!("https://{}", closed.local_addr().expect("addr"));
        drop(closed);
        match fetch_join(&gone, &token).await {
            Err(e @ JoinError::Unreachable { .. }) => assert!(e.to_string().contains(&gone)),
            other => panic!("want unreachable, got {other:?}"),
        }
    }

    #[test]
    fn server_token_format() {
        assert!(ServerToken::parse("flotilla-node-token:v1 abc").is_err());
        assert!(ServerToken::parse("K10abc::server:x").is_err());
        let t = format!("K10{}::server:s3cret\n", "a".repeat(64));
        let p = ServerToken::parse(&t).expect("parse");
        assert_eq!(p.secret, "s3cret");
        assert_eq!(format!("{p}\n"), t);
    }
}
