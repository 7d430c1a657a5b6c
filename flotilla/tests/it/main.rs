//! `flotilla` binary tests: real processes over loopback.

/// `flotilla store`: three processes, kill -9 of the leader under load.
mod store;

/// Issue 5: 3 servers joined with `--join` (embedded stores) + 3 agents, driven with kubectl;
/// kill -9 an agent and the store leader's server; `--join` refusing bad tokens.
mod cluster;
