//! Fault-injection suite for the store: seeded in-process 3- and 5-member clusters behind a
//! controllable network and storage, a recorded concurrent workload (KV and leases), and the
//! invariant checks of etcd-semantics §12 after every scenario. `SEED=n` replays a
//! scenario's choices.
mod crash;
mod scenarios;
