//! Compiled modules and components: checked, compiled once, cached on disk ahead of time,
//! `InstancePre` reused. Core modules are WASI preview 1 commands; components are WASI 0.2
//! commands (exporting `wasi:cli/run`) linked against wasmtime-wasi's p2 host.
//!
//! Artifacts live in `<dir>/<wasm sha256>-<engine hash>.cwasm`, where the engine hash is
//! `Engine::precompile_compatibility_hash()`: an engine with other settings (fuel, epochs,
//! Cranelift flags, wasmtime version) never loads an artifact it cannot run.
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wasmtime::component::{Component, Linker as ComponentLinker};
use wasmtime::{Engine, ExternType, InstancePre, Linker, Module, Precompiled, Store};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::container::{ComponentData, PodData};

/// A module or component ready to instantiate.
#[derive(Clone)]
pub(crate) enum Prepared {
    /// A WASI preview 1 core module.
    Module(InstancePre<PodData>),
    /// A WASI 0.2 command component.
    Component(CommandPre<ComponentData>),
}

impl Prepared {
    /// The core module, if this is one (exec by exported function needs it).
    pub(crate) fn module(&self) -> Option<&Module> {
        match self {
            Prepared::Module(pre) => Some(pre.module()),
            Prepared::Component(_) => None,
        }
    }
}
use crate::pod_runtime::RuntimeError;

pub(crate) struct Modules {
    engine: Engine,
    linker: Linker<PodData>,
    component_linker: ComponentLinker<ComponentData>,
    dir: PathBuf,
    engine_hash: String,
    /// `(module, name)` of every function the linker provides.
    provided: HashSet<(String, String)>,
    ready: Mutex<HashMap<String, Prepared>>,
}

impl Modules {
    pub(crate) fn new(engine: Engine, dir: PathBuf) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::Config(format!("cannot create module cache {}: {e}", dir.display()))
        })?;
        let mut linker: Linker<PodData> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |d: &mut PodData| &mut d.wasi)
            .map_err(|e| RuntimeError::Internal(format!("cannot link WASI: {e}")))?;
        let mut component_linker: ComponentLinker<ComponentData> = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| RuntimeError::Internal(format!("cannot link WASI 0.2: {e}")))?;
        let mut store = Store::new(&engine, PodData::placeholder());
        let provided = linker
            .iter(&mut store)
            .map(|(m, n, _)| (m.to_owned(), n.to_owned()))
            .collect();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_hash = format!("{:016x}", h.finish());
        Ok(Modules {
            engine,
            linker,
            component_linker,
            dir,
            engine_hash,
            provided,
            ready: Mutex::new(HashMap::new()),
        })
    }

    /// The prepared module for a digest, if this process prepared it before.
    pub(crate) fn get(&self, digest: &str) -> Option<Prepared> {
        self.ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(digest)
            .cloned()
    }

    fn artifact(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.cwasm", self.engine_hash))
    }

    /// Loads the artifact or checks and compiles the module (CPU-heavy: call from a blocking
    /// thread), then pre-links it.
    pub(crate) fn prepare(
        &self,
        image: &str,
        digest: &str,
        wasm: &Path,
    ) -> Result<Prepared, RuntimeError> {
        if let Some(pre) = self.get(digest) {
            return Ok(pre);
        }
        let artifact = self.artifact(digest);
        let compiled = match self.load_artifact(&artifact) {
            Some(m) => m,
            None => self.compile(image, wasm, &artifact)?,
        };
        let pre = match compiled {
            Compiled::Module(module) => {
                self.check_imports(image, &module)?;
                Prepared::Module(
                    self.linker
                        .instantiate_pre(&module)
                        .map_err(|e| refused(image, format!("cannot link: {e}")))?,
                )
            }
            Compiled::Component(component) => self.prepare_component(image, &component)?,
        };
        self.ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(digest.to_owned(), pre.clone());
        Ok(pre)
    }

    #[allow(
        unsafe_code,
        reason = "deserializes only artifacts this node compiled and wrote"
    )]
    fn load_artifact(&self, artifact: &Path) -> Option<Compiled> {
        if !artifact.exists() {
            return None;
        }
        let kind = Engine::detect_precompiled_file(artifact).ok().flatten();
        // SAFETY: the file was written by `compile` below from `Module::serialize` or
        // `Component::serialize` of this very engine configuration (its name carries the
        // compatibility hash), into the node's own cache directory; wasmtime still checks the
        // header and rejects foreign artifacts.
        let loaded = match kind {
            Some(Precompiled::Component) => {
                unsafe { Component::deserialize_file(&self.engine, artifact) }
                    .map(Compiled::Component)
            }
            _ => unsafe { Module::deserialize_file(&self.engine, artifact) }.map(Compiled::Module),
        };
        match loaded {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %artifact.display(), error = %e, "discarding bad artifact");
                let _ = std::fs::remove_file(artifact);
                None
            }
        }
    }

    fn compile(&self, image: &str, wasm: &Path, artifact: &Path) -> Result<Compiled, RuntimeError> {
        let bytes = std::fs::read(wasm)
            .map_err(|e| RuntimeError::Internal(format!("cannot read cached image: {e}")))?;
        // Check before writing the artifact so a refused module leaves nothing behind.
        let (compiled, serialized) = if is_component(&bytes) {
            let component = Component::new(&self.engine, &bytes)
                .map_err(|e| refused(image, format!("invalid component: {e:#}")))?;
            self.prepare_component(image, &component)?;
            let data = component.serialize();
            (Compiled::Component(component), data)
        } else {
            let module = Module::new(&self.engine, &bytes)
                .map_err(|e| refused(image, format!("invalid module: {e:#}")))?;
            self.check_imports(image, &module)?;
            let data = module.serialize();
            (Compiled::Module(module), data)
        };
        match serialized {
            Ok(data) => {
                let tmp = artifact.with_extension(super::temp_suffix());
                if let Err(e) =
                    std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, artifact))
                {
                    tracing::warn!(error = %e, "cannot write module artifact; will recompile next time");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize module"),
        }
        Ok(compiled)
    }

    /// Links a component against the WASI 0.2 host and finds its `wasi:cli/run` export.
    fn prepare_component(
        &self,
        image: &str,
        component: &Component,
    ) -> Result<Prepared, RuntimeError> {
        let pre = self
            .component_linker
            .instantiate_pre(component)
            .map_err(|e| {
                refused(
                    image,
                    format!("cannot link component (the node provides WASI 0.2 only): {e:#}"),
                )
            })?;
        let command = CommandPre::new(pre).map_err(|e| {
            refused(
                image,
                format!("component is not a WASI command (no `wasi:cli/run` export): {e:#}"),
            )
        })?;
        Ok(Prepared::Component(command))
    }

    fn check_imports(&self, image: &str, module: &Module) -> Result<(), RuntimeError> {
        for import in module.imports() {
            let key = (import.module().to_owned(), import.name().to_owned());
            if !matches!(import.ty(), ExternType::Func(_)) || !self.provided.contains(&key) {
                return Err(refused(
                    image,
                    format!(
                        "unknown import `{}::{}`: the node provides WASI preview 1 \
                         (wasi_snapshot_preview1) functions only",
                        key.0, key.1
                    ),
                ));
            }
        }
        match module.get_export("_start") {
            Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => Ok(()),
            _ => Err(refused(
                image,
                "module has no `_start` function (not a WASI command)".into(),
            )),
        }
    }
}

/// A freshly compiled or loaded artifact.
enum Compiled {
    Module(Module),
    Component(Component),
}

/// Binary components carry layer 1 in their header; text ones start with `(component`.
fn is_component(bytes: &[u8]) -> bool {
    if bytes.starts_with(b"\0asm") {
        return bytes.len() >= 8 && bytes[6..8] == [1, 0];
    }
    std::str::from_utf8(bytes)
        .map(|t| t.trim_start().starts_with("(component"))
        .unwrap_or(false)
}

fn refused(image: &str, reason: String) -> RuntimeError {
    RuntimeError::ImageRefused {
        image: image.to_owned(),
        reason,
    }
}
