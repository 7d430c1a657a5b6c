//! Store integration tests: one binary, modules by topic.

/// In-process cluster harness (loopback, port 0, sled in tempdirs).
mod harness;
/// One member: KV semantics and etcd error codes.
mod single;
/// openraft's storage conformance suite against the sled log store and state machine.
mod suite;
