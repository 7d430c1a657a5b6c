//! Flotilla's store: a Raft-replicated key-value store served over the etcd v3 gRPC API.
//!
//! Consensus is openraft 0.9 (storage-v2), persistence is sled, and members talk to each other
//! and to clients over tonic. Clients see etcd 3.4: the same protobuf packages
//! (`etcdserverpb`, `mvccpb`), the same revisions, errors and limits, so `etcdctl` and etcd
//! client libraries work unchanged.
//!
//! # Layout
//!
//! - [`pb`]: generated etcd v3 types, clients and servers.
//! - `config`: [`StoreConfig`] and [`Tunables`] (validated before start).
//! - `node`: [`Node::start`] and the [`NodeHandle`] of a running member.
//! - `types`: openraft type configuration and the replicated commands.
//! - `log_store` / `state_machine`: openraft storage (the log in sled, the state machine in
//!   memory, persisted as `snapshot` files); `mvcc` is the etcd data model.
//! - `network`: the Raft transport over tonic, behind openraft's `RaftNetworkFactory`.
//! - `batcher` / `read_index` / `lessor`: group commit, batched ReadIndex, leader-side leases.
//! - `service/*`: one tonic service per etcd service, plus the internal peer service.
//! - `backup`: what `Maintenance.Snapshot` streams (`etcdctl snapshot save`), and [`restore`].
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), store::StoreError> {
//! let handle = store::Node::start(store::StoreConfig::default()).await?;
//! println!("serving etcd v3 on {}", handle.client_addr());
//! handle.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod backup;
mod batcher;
mod commit_gate;
mod config;
mod error;
mod faults;
mod forwarder;
mod lessor;
mod log_store;
mod mvcc;
mod network;
mod node;
mod read_index;
mod service;
mod snapshot;
mod state_machine;
mod stats;
mod trash;
mod types;
mod wal;

pub use backup::{Restored, restore};
pub use config::{AutoCompaction, ClusterState, ConfigError, StoreConfig, Tunables, member_id};
pub use error::StoreError;
pub use faults::{CrashHook, CrashPoint, FaultHooks, ForwardFilter, LinkFate};
pub use log_store::SledLogStore;
pub use network::TonicNetworkFactory;
pub use node::{Node, NodeHandle, NodeMetrics};
pub use state_machine::SledStateMachine;
pub use types::{Member, TypeConfig};

/// Generated protobuf code: the etcd v3 API (`etcdserverpb`, `mvccpb`) and the internal peer
/// protocol.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    reason = "generated"
)]
pub mod pb {
    /// etcd's `mvccpb` package: `KeyValue` and `Event`.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// etcd's `etcdserverpb` package: KV, Watch, Lease, Cluster, Maintenance.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// Flotilla's member-to-member protocol (`flotilla.raft.v1`).
    pub mod raftpb {
        tonic::include_proto!("flotilla.raft.v1");
    }
}
