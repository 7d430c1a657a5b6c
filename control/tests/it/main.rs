//! control's one integration test binary.
//!
//! - `harness`: in-process API server (HTTPS + tokens, MemStore) on port 0, kubectl/Python runners
//!   and a tiny HTTPS client.
//! - `rest`: exact REST semantics (status codes, selectors, paging, watch, deletion, auth roles).
//! - `kubectl`: the real kubectl 1.37.1 against the server.
//! - `python`: the official Python `kubernetes` client against the server.
//! - `local`: the in-process transport the scheduler and controllers use inside the server.

mod harness;
mod kubectl;
mod local;
mod python;
mod rest;
