//! Builds the `wasm-examples` guests for `wasm32-wasip1` with a nested cargo, into a target
//! directory of their own (sharing the outer one would deadlock on its build lock), and tells
//! the crate where they are through `FLOTILLA_GUESTS_DIR`. Also compiles the CRI `runtime.v1`
//! subset in `proto/` with protox (no protoc needed).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    compile_cri_protos();
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let workspace = manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.clone());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("wasm-examples/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("wasm-examples/Cargo.toml").display()
    );
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_root = out_dir
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.clone());
    let guest_target = target_root.join("wasm-guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--offline", "--release", "--target", "wasm32-wasip1", "-p", "wasm-examples"])
        .env("CARGO_TARGET_DIR", &guest_target)
        // Small guests, as wasmtime-notes §3 measured them.
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true");
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let guests = guest_target.join("wasm32-wasip1/release");
    let built = match cmd.status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            println!(
                "cargo:warning=building wasm-examples for wasm32-wasip1 failed ({s}); is the \
                 target installed (`rustup target add wasm32-wasip1`)? Tests that run guests \
                 will fail."
            );
            false
        }
        Err(e) => {
            println!("cargo:warning=cannot run cargo to build wasm-examples: {e}");
            false
        }
    };
    if !built {
        // Cargo reruns a build script while a file it watches is missing: without this, a
        // build made before `rustup target add wasm32-wasip1` kept its failure (and its
        // warning) until the guests' sources changed.
        println!(
            "cargo:rerun-if-changed={}",
            guest_target.join("no-guests-yet").display()
        );
    }
    println!("cargo:rustc-env=FLOTILLA_GUESTS_DIR={}", guests.display());
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

/// Generates the CRI client and server (`runtime.v1`) from `proto/`; a broken proto is a build
/// error, unlike a missing wasm target.
fn compile_cri_protos() {
    let fds = protox::compile(["runtime/v1/cri.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("compiling proto/runtime/v1/cri.proto: {e}"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating CRI code: {e}"));
    println!("cargo:rerun-if-changed=proto");
}
