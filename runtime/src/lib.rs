//! Flotilla's node agent: pod runtimes and the loop that keeps them in sync with the API server.
//!
//! # Layout
//!
//! - [`pod_runtime`]: the [`PodRuntime`] seam (CRI-shaped), its data types and [`RuntimeError`].
//! - [`wasm`]: [`WasmRuntime`], pods as WASI preview 1 modules in wasmtime with CPU, memory and
//!   fuel limits enforced inside the sandbox.
//! - [`any`]: [`AnyRuntime`], `match` dispatch over the node's runtimes.
//! - `websocket` (private): the WebSocket channel protocol of streaming exec and attach.
//! - `spdy` (private): the SPDY/3.1 subset of `kubectl port-forward`'s WebSocket tunnel.
//! - `testing` (feature `test-util`): `FakeRuntime` and the conformance suite
//!   `testing::conformance::run_all` that every implementation passes.
//!
//! # Example
//!
//! ```no_run
//! use runtime::{PodConfig, PodRuntime, WasmRuntime, WasmRuntimeConfig};
//! use api::pod::{Container, PodSpec};
//! # async fn demo() -> Result<(), runtime::RuntimeError> {
//! let rt = WasmRuntime::new(WasmRuntimeConfig::new("/var/lib/flotilla"))?;
//! let spec = PodSpec {
//!     containers: vec![Container { name: "hello".into(), image: "/srv/hello.wasm".into(), ..Default::default() }],
//!     ..Default::default()
//! };
//! let id = rt.run_pod(&PodConfig::new("hello", spec)).await?;
//! println!("{:?}", rt.pod_status(&id).await?);
//! rt.remove_pod(&id).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod any;
pub mod cri;
pub mod node;
pub mod pod_runtime;
mod spdy;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod wasm;
mod websocket;

/// The object-model crate, re-exported so callers can build pod specs without naming it.
pub use api;

pub use any::AnyRuntime;
pub use cri::CriRuntime;
pub use pod_runtime::{
    ContainerStats, ContainerStatus, ExecOutput, PodConfig, PodId, PodRuntime, PodStats, PodStatus,
    RuntimeError, SandboxState, SessionIo, SessionReader, SessionWriter, TerminalSize,
};
pub use wasm::{WasmRuntime, WasmRuntimeConfig};
