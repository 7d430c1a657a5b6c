//! Fault-injection suite for the store: seeded in-process 3-member clusters behind a
//! controllable network and storage, a recorded concurrent workload, and the invariant checks
//! of etcd-semantics §12 after every scenario. `SEED=n` replays a scenario's choices.
mod scenarios;
