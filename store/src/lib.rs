//! Flotilla's store: a Raft-replicated key-value store served over the etcd v3 gRPC API.
#![warn(missing_docs)]
