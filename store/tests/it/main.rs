//! Store integration tests: one binary, modules by topic.

/// Group commit and batched linearizable reads.
mod batching;
/// Three members: failover, restart, membership, snapshot catch-up.
mod cluster;
/// The real `etcdctl` (3.4) against a 3-member store.
mod etcdctl;
/// In-process cluster harness (loopback, port 0, sled in tempdirs).
mod harness;
/// One member: KV semantics and etcd error codes.
mod single;
/// openraft's storage conformance suite against the sled log store and state machine.
mod suite;
