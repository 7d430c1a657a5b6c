//! Flotilla's control plane: the Kubernetes-compatible API server (and, later, the scheduler
//! and controllers).
//!
//! # Layout
//! - [`storage`]: the API server's port to its key-value store ([`storage::Store`]) with
//!   [`storage::MemStore`] (in memory) and [`storage::RemoteStore`] (etcd v3: the Flotilla
//!   store or a real etcd), plus [`storage::embedded`] (a one-member Flotilla store).
//! - [`apiserver`]: REST handlers, admission (defaulting, LimitRange, validation, Pod Security,
//!   ResourceQuota), discovery, Table output, patches, watch with a shared cache, protobuf
//!   bodies, HTTPS + bearer-token authentication and node/read-only authorization.
//! - [`bench`](mod@bench): the API server benchmark behind `flotilla bench api`.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), control::apiserver::ApiServerError> {
//! use control::apiserver::{ApiServer, ApiServerConfig};
//! use control::storage::MemStore;
//! let server = ApiServer::new(ApiServerConfig::new("/tmp/flotilla"), MemStore::new())?;
//! server.bootstrap().await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:6443").await?;
//! let kubeconfig = server.write_kubeconfig(listener.local_addr()?)?;
//! println!("kubeconfig: {}", kubeconfig.display());
//! server.serve(listener, tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```
#![warn(missing_docs)]

pub mod apiserver;
pub mod bench;
pub mod controllers;
pub mod scheduler;
pub mod storage;

pub use apiserver::{ApiServer, ApiServerConfig, ApiServerError};
pub use storage::{MemStore, Store, StoreError};
