//! `flotilla` binary tests: real processes over loopback.

/// `flotilla store`: three processes, kill -9 of the leader under load.
mod store;
