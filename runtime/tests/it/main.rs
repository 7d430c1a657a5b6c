//! Runtime integration tests: one binary, modules by topic.
//!
//! - `conformance`: the `PodRuntime` contract for the wasm runtime and the fake (via `AnyRuntime`).
//! - `wasi`: args, env, exit codes, logs, volumes and the sandbox boundary.
//! - `limits`: memory, CPU quota, fair share, fuel and the pod cap, each failing if not enforced.
//! - `cri`: `CriRuntime` against a real containerd (`FLOTILLA_CRI_SOCKET`, see the module).
//! - `hostile`: guests that loop, trap, or are malformed, next to pods that must keep running.
//! - `components`: WASI 0.2 components under the same limits as core modules.
//! - `wasm_exec`: wasm stdin, exec (commands and exported functions), https images, and where a
//!   container's first poll runs.
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use api::pod::{Container, EnvVar, PodSpec};
use runtime::testing::conformance::wait_for_status;
use runtime::{PodConfig, PodId, PodRuntime, PodStatus, WasmRuntime, WasmRuntimeConfig};

mod components;
mod conformance;
mod cri;
mod hostile;
mod limits;
mod wasi;
mod wasm_exec;

/// One compiled-module cache for the whole binary, so each guest compiles once.
fn shared_cache() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("cache tempdir"))
        .path()
        .to_owned()
}

/// Tests that measure CPU take this exclusively, every other test takes it shared, so a CPU
/// measurement never shares the 2 cores with another test.
static CPU_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Node {
    rt: WasmRuntime,
    _root: tempfile::TempDir,
}

fn node_with(f: impl FnOnce(&mut WasmRuntimeConfig)) -> Node {
    let root = tempfile::tempdir().expect("root tempdir");
    let mut cfg = WasmRuntimeConfig::new(root.path());
    cfg.cache_dir = Some(shared_cache());
    cfg.max_pods = 64;
    f(&mut cfg);
    Node {
        rt: WasmRuntime::new(cfg).expect("wasm runtime"),
        _root: root,
    }
}

fn node() -> Node {
    node_with(|_| {})
}

fn guest(name: &str) -> String {
    let p = runtime::wasm::guests::path(name);
    assert!(
        p.exists(),
        "guest {} not built (is wasm32-wasip1 installed?)",
        p.display()
    );
    p.display().to_string()
}

fn container(name: &str, guest_name: &str, args: &[&str]) -> Container {
    Container {
        name: name.into(),
        image: guest(guest_name),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..Container::default()
    }
}

fn with_env(mut c: Container, kv: &[(&str, &str)]) -> Container {
    c.env = kv
        .iter()
        .map(|(k, v)| EnvVar {
            name: (*k).into(),
            value: (*v).into(),
        })
        .collect();
    c
}

fn with_limits(mut c: Container, limits: &[(&str, &str)], requests: &[(&str, &str)]) -> Container {
    let map = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    c.resources.limits = map(limits);
    c.resources.requests = map(requests);
    c
}

fn pod(name: &str, containers: Vec<Container>) -> PodConfig {
    PodConfig::new(
        name,
        PodSpec {
            containers,
            ..PodSpec::default()
        },
    )
}

async fn run(rt: &WasmRuntime, p: &PodConfig) -> PodId {
    rt.run_pod(p).await.expect("run_pod")
}

async fn wait_done(rt: &WasmRuntime, id: &PodId) -> PodStatus {
    wait_for_status(rt, id, Duration::from_secs(30), PodStatus::all_terminated).await
}

async fn wait_running(rt: &WasmRuntime, id: &PodId) -> PodStatus {
    wait_for_status(rt, id, Duration::from_secs(30), |s| {
        s.containers.iter().all(|c| c.state.is_running())
    })
    .await
}

/// Writes a module (binary or WAT text, which wasmtime also accepts) to a file image.
fn module_file(dir: &std::path::Path, name: &str, contents: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write module");
    p.display().to_string()
}
