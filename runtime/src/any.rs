//! `AnyRuntime`: the runtimes of a node, dispatched by `match` (no trait objects).
use std::time::Duration;

use crate::cri::CriRuntime;
use crate::pod_runtime::{
    ExecOutput, PodConfig, PodId, PodRuntime, PodStats, PodStatus, RuntimeError, SessionIo,
};
#[cfg(any(test, feature = "test-util"))]
use crate::testing::FakeRuntime;
use crate::wasm::WasmRuntime;

/// One of the node's pod runtimes.
pub enum AnyRuntime {
    /// WASI modules in wasmtime.
    Wasm(WasmRuntime),
    /// OCI containers through a CRI runtime (containerd).
    Cri(CriRuntime),
    /// The scripted test double.
    #[cfg(any(test, feature = "test-util"))]
    Fake(FakeRuntime),
}

macro_rules! dispatch {
    ($self:ident, $rt:ident => $e:expr) => {
        match $self {
            AnyRuntime::Wasm($rt) => $e,
            AnyRuntime::Cri($rt) => $e,
            #[cfg(any(test, feature = "test-util"))]
            AnyRuntime::Fake($rt) => $e,
        }
    };
}

impl PodRuntime for AnyRuntime {
    fn name(&self) -> &'static str {
        dispatch!(self, rt => rt.name())
    }

    async fn run_pod(&self, pod: &PodConfig) -> Result<PodId, RuntimeError> {
        dispatch!(self, rt => rt.run_pod(pod).await)
    }

    async fn stop_pod(&self, id: &PodId, grace: Duration) -> Result<(), RuntimeError> {
        dispatch!(self, rt => rt.stop_pod(id, grace).await)
    }

    async fn remove_pod(&self, id: &PodId) -> Result<(), RuntimeError> {
        dispatch!(self, rt => rt.remove_pod(id).await)
    }

    async fn pod_status(&self, id: &PodId) -> Result<PodStatus, RuntimeError> {
        dispatch!(self, rt => rt.pod_status(id).await)
    }

    async fn list_pods(&self) -> Result<Vec<PodStatus>, RuntimeError> {
        dispatch!(self, rt => rt.list_pods().await)
    }

    async fn logs(&self, id: &PodId, container: &str) -> Result<String, RuntimeError> {
        dispatch!(self, rt => rt.logs(id, container).await)
    }

    async fn stats(&self, id: &PodId) -> Result<PodStats, RuntimeError> {
        dispatch!(self, rt => rt.stats(id).await)
    }

    async fn exec(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        dispatch!(self, rt => rt.exec(id, container, command, timeout).await)
    }

    async fn exec_stream(
        &self,
        id: &PodId,
        container: &str,
        command: Vec<String>,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        dispatch!(self, rt => rt.exec_stream(id, container, command, io).await)
    }

    async fn attach(
        &self,
        id: &PodId,
        container: &str,
        io: SessionIo,
    ) -> Result<i32, RuntimeError> {
        dispatch!(self, rt => rt.attach(id, container, io).await)
    }
}
