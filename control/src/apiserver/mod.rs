//! The Kubernetes-compatible API server: REST on a [`Store`], served over HTTPS with bearer
//! tokens. Authentication, request logging and timeouts are tower layers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::storage::Store;

mod admission;
mod admission_cache;
mod audit;
mod auth;
mod discovery;
pub mod endpoint_reconciler;
mod handlers;
mod join;
mod limits;
mod managed_fields;
mod node_proxy;
mod patch;
mod pki;
mod policy;
mod protobuf;
mod resources;
mod selector;
mod status;
mod table;
mod watch;
mod watch_cache;
mod write_batch;

pub use audit::{AuditConfig, AuditError, Level as AuditLevel, Policy as AuditPolicy};
pub use auth::Identity;
pub use join::{JOIN_PATH, JoinAnswer, JoinError, StoreJoinInfo, fetch_join};
pub use pki::{JoinBundle, Pki, PkiError, ServerToken, ca_hash};

/// API server settings.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Holds `pki/`, `auth/` and the kubeconfigs; created if missing.
    pub data_dir: PathBuf,
    /// Development only: plain HTTP with no authentication at all.
    pub insecure_http: bool,
    /// Extra names/IPs for the serving certificate (besides localhost and loopback).
    pub extra_sans: Vec<String>,
    /// Limit for non-watch requests.
    pub request_timeout: Duration,
    /// Audit log (`--audit-log-path`); `None` records nothing.
    pub audit: Option<AuditConfig>,
}

impl ApiServerConfig {
    /// HTTPS + tokens with material under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ApiServerConfig {
        ApiServerConfig {
            data_dir: data_dir.into(),
            insecure_http: false,
            extra_sans: Vec::new(),
            request_timeout: Duration::from_secs(60),
            audit: None,
        }
    }
}

/// Failures of the API server itself (request errors are `Status` answers, not these).
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Certificates, tokens or kubeconfig.
    #[error("security material")]
    Pki(#[from] PkiError),
    /// The listener failed.
    #[error("listener failed")]
    Io(#[from] std::io::Error),
    /// The audit log cannot be opened.
    #[error("cannot open the audit log {path}")]
    Audit {
        /// The configured log path.
        path: PathBuf,
        /// Why it cannot be opened.
        source: std::io::Error,
    },
    /// The store refused the bootstrap writes.
    #[error("store failed during bootstrap")]
    Store(#[from] crate::storage::StoreError),
}

/// An API server over store `S`.
pub struct ApiServer<S: Store> {
    app: Arc<handlers::App<S>>,
    pki: Option<Pki>,
    config: ApiServerConfig,
    /// Stops background tasks (watch-cache feeders) when serving ends.
    stop: CancellationToken,
    /// The embedded store joining servers add their member to (`--join`).
    store_join: Option<StoreJoinInfo>,
    /// The audit log's writer, when `config.audit` is set.
    auditor: Option<Arc<audit::Auditor>>,
}

/// Namespaces every cluster has.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

impl<S: Store> ApiServer<S> {
    /// Loads or creates the security material (unless `insecure_http`).
    pub fn new(config: ApiServerConfig, store: S) -> Result<ApiServer<S>, ApiServerError> {
        let pki = if config.insecure_http {
            None
        } else {
            Some(Pki::load_or_create(&config.data_dir, &config.extra_sans)?)
        };
        let auditor = match &config.audit {
            Some(a) => Some(
                audit::Auditor::start(a).map_err(|source| ApiServerError::Audit {
                    path: a.log_path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let tasks = tokio_util::task::TaskTracker::new();
        let stop = CancellationToken::new();
        Ok(ApiServer {
            app: Arc::new(handlers::App {
                watch_cache: Arc::new(watch_cache::WatchCache::new(
                    store.clone(),
                    tasks.clone(),
                    stop.clone(),
                )),
                writes: write_batch::WriteBatcher::new(store.clone()),
                store,
                admission_cache: admission_cache::AdmissionCache::default(),
                server_address: "127.0.0.1".into(),
                tasks,
            }),
            pki,
            config,
            stop,
            store_join: None,
            auditor,
        })
    }

    /// Offers the embedded store at `info` to servers joining with the server token.
    pub fn set_store_join(&mut self, info: StoreJoinInfo) {
        self.store_join = Some(info);
    }

    /// Certificates and tokens (`None` in insecure mode).
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// Creates the system namespaces if they are missing.
    pub async fn bootstrap(&self) -> Result<(), ApiServerError> {
        let res = resources::find("", "v1", "namespaces").ok_or_else(|| {
            crate::storage::StoreError::Internal("namespaces not registered".into())
        })?;
        for ns in SYSTEM_NAMESPACES {
            if self.app.store.get(&res.key(None, ns)).await?.is_some() {
                continue;
            }
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            match handlers::create(
                &self.app,
                res,
                None,
                obj,
                false,
                handlers::Owner::Update("flotilla-apiserver"),
            )
            .await
            {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => {
                    return Err(crate::storage::StoreError::Internal(e.message).into());
                }
            }
        }
        Ok(())
    }

    /// Writes `DATA_DIR/kubeconfig.yaml` (admin, mode 0600) for a server listening on `addr`;
    /// returns its path. Insecure mode writes a kubeconfig without credentials.
    pub fn write_kubeconfig(&self, addr: SocketAddr) -> Result<PathBuf, ApiServerError> {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else if addr.is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        match &self.pki {
            Some(pki) => Ok(pki.write_kubeconfigs(
                &self.config.data_dir,
                &format!("https://{host}:{}", addr.port()),
            )?),
            None => {
                let path = self.config.data_dir.join("kubeconfig.yaml");
                let text = format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: flotilla\n  cluster:\n    server: http://{host}:{}\nusers:\n- name: anon\n  user: {{}}\ncontexts:\n- name: flotilla\n  context:\n    cluster: flotilla\n    user: anon\n    namespace: default\ncurrent-context: flotilla\n",
                    addr.port()
                );
                pki::write_private(&path, text.as_bytes())?;
                Ok(path)
            }
        }
    }

    /// The axum router with every layer: request logging → authentication → audit → body
    /// limit → timeout → handlers.
    fn router(&self) -> Router {
        let timeout = self.config.request_timeout;
        Router::new()
            .merge(node_proxy::routes(Arc::new(node_proxy::NodeProxy {
                app: self.app.clone(),
                pki: self.pki.clone(),
            })))
            .fallback(handlers::dispatch::<S>)
            .with_state(self.app.clone())
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                timeout_layer(timeout, req, next)
            }))
            .layer(middleware::from_fn(limits::body_limit))
            .layer(middleware::from_fn_with_state(
                self.auditor.clone(),
                audit::audit,
            ))
            .layer(middleware::from_fn_with_state(
                auth::Authenticator {
                    pki: self.pki.clone(),
                    audit: self.auditor.clone(),
                },
                auth::authenticate,
            ))
            .layer(middleware::from_fn(log_layer))
            // After the layers: the join route checks the server token itself.
            .merge(join::routes(Arc::new(join::JoinState {
                pki: self.pki.clone(),
                store: self.store_join.clone(),
            })))
    }

    /// The server as an in-process service for [`apiclient::ApiClient::local`]: the same
    /// router (authentication, authorization, admission, logging, timeouts) without sockets,
    /// TLS or HTTP/2, for the scheduler and controllers running in this process. Usable while
    /// [`ApiServer::serve`] runs.
    pub fn local_service(&self) -> Arc<dyn apiclient::LocalService> {
        let router = self.router();
        Arc::new(
            move |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                let router = router.clone();
                let fut: apiclient::local::ResponseFuture = Box::pin(async move {
                    use http_body_util::BodyExt as _;
                    let resp = match router.oneshot(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    resp.map(|b| b.map_err(Into::into).boxed_unsync())
                });
                fut
            },
        )
    }

    /// A client of this server in this process (see [`ApiServer::local_service`]) sending
    /// `token`.
    pub fn local_client(&self, token: Option<&str>) -> apiclient::ApiClient {
        apiclient::ApiClient::local(self.local_service(), token)
    }

    /// Serves connections from `listener` until `shutdown` is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ApiServerError> {
        let router = self.router();
        let tls = match &self.pki {
            Some(p) => Some(tokio_rustls::TlsAcceptor::from(p.server_config()?)),
            None => None,
        };
        let conns = tokio_util::task::TaskTracker::new();
        let conn_cancel = shutdown.child_token();
        // The store's history is compacted as kube-apiserver does (every 5 minutes).
        self.app.tasks.spawn(crate::storage::compactor::run(
            self.app.store.clone(),
            crate::storage::compactor::DEFAULT_INTERVAL,
            shutdown.clone(),
        ));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(router.clone().map_request(
                move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(audit::PeerAddr(peer));
                    req
                },
            ));
            let tls = tls.clone();
            let cancel = conn_cancel.clone();
            conns.spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let served = async {
                    match tls {
                        Some(acceptor) => {
                            let s = match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            };
                            if let Err(e) = builder
                                .serve_connection_with_upgrades(TokioIo::new(s), service)
                                .await
                            {
                                tracing::debug!(%peer, error = %e, "connection ended");
                            }
                        }
                        None => {
                            if let Err(e) = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await
                            {
                                tracing::debug!(%peer, error = %e, "connection ended");
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = served => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
        // Watches never finish on their own: stop connections and watch pumps, then wait.
        conn_cancel.cancel();
        self.stop.cancel();
        conns.close();
        self.app.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
        Ok(())
    }
}

/// Bounds every non-watch request; watches end by their own `timeoutSeconds`.
async fn timeout_layer(limit: Duration, req: Request, next: Next) -> Response {
    let q = req.uri().query().unwrap_or("");
    let watching = q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1")
        || req.uri().path().contains("/watch/");
    if watching {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => status::ApiError::new(504, "Timeout", "the request did not complete in time")
            .into_response(),
    }
}

/// One log line per request: method, path, status, latency.
async fn log_layer(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let started = tokio::time::Instant::now();
    let resp = next.run(req).await;
    tracing::debug!(
        %method,
        uri = %uri,
        status = resp.status().as_u16(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Convenience: bootstrap, write the kubeconfig and serve until `shutdown`.
pub async fn run<S: Store>(
    config: ApiServerConfig,
    store: S,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ApiServerError> {
    let server = ApiServer::new(config, store)?;
    server.bootstrap().await?;
    let path = server.write_kubeconfig(listener.local_addr()?)?;
    tracing::info!(kubeconfig = %path.display(), "API server ready");
    server.serve(listener, shutdown).await
}

/// Helpers for `crate::bench`, which fills the store directly before timing LIST.
pub(crate) mod bench_support {
    /// Store prefix of the pods of namespace `ns`.
    pub(crate) fn pod_store_key_prefix(ns: &str) -> String {
        super::resources::find("", "v1", "pods")
            .map(|r| r.list_prefix(Some(ns)))
            .unwrap_or_default()
    }

    /// A typical stored pod (about 1 KiB of JSON).
    pub(crate) fn pod_json(ns: &str, name: &str) -> String {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app": "bench", "tier": "web"}},
            "spec": {"nodeName": "node-1", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                     "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                     "containers": [{"name": "web", "image": "nginx:1.25", "imagePullPolicy": "IfNotPresent",
                                     "ports": [{"containerPort": 80, "protocol": "TCP"}],
                                     "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                                     "terminationMessagePath": "/dev/termination-log",
                                     "terminationMessagePolicy": "File"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.7", "qosClass": "Burstable",
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0,
                                              "image": "nginx:1.25", "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}}]}
        })
        .to_string()
    }
}

/// Path of the admin kubeconfig under a data dir.
pub fn kubeconfig_path(data_dir: &Path) -> PathBuf {
    data_dir.join("kubeconfig.yaml")
}
