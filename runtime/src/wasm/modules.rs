//! Compiled modules: checked, compiled once, cached on disk ahead of time, `InstancePre` reused.
//!
//! Artifacts live in `<dir>/<wasm sha256>-<engine hash>.cwasm`, where the engine hash is
//! `Engine::precompile_compatibility_hash()`: an engine with other settings (fuel, epochs,
//! Cranelift flags, wasmtime version) never loads an artifact it cannot run.
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wasmtime::{Engine, ExternType, InstancePre, Linker, Module, Store};

use super::container::PodData;
use crate::pod_runtime::RuntimeError;

pub(crate) struct Modules {
    engine: Engine,
    linker: Linker<PodData>,
    dir: PathBuf,
    engine_hash: String,
    /// `(module, name)` of every function the linker provides.
    provided: HashSet<(String, String)>,
    ready: Mutex<HashMap<String, InstancePre<PodData>>>,
}

impl Modules {
    pub(crate) fn new(engine: Engine, dir: PathBuf) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            RuntimeError::Config(format!("cannot create module cache {}: {e}", dir.display()))
        })?;
        let mut linker: Linker<PodData> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |d: &mut PodData| &mut d.wasi)
            .map_err(|e| RuntimeError::Internal(format!("cannot link WASI: {e}")))?;
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
            dir,
            engine_hash,
            provided,
            ready: Mutex::new(HashMap::new()),
        })
    }

    /// The prepared module for a digest, if this process prepared it before.
    pub(crate) fn get(&self, digest: &str) -> Option<InstancePre<PodData>> {
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
    ) -> Result<InstancePre<PodData>, RuntimeError> {
        if let Some(pre) = self.get(digest) {
            return Ok(pre);
        }
        let artifact = self.artifact(digest);
        let module = match self.load_artifact(&artifact) {
            Some(m) => m,
            None => self.compile(image, wasm, &artifact)?,
        };
        self.check_imports(image, &module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| refused(image, format!("cannot link: {e}")))?;
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
    fn load_artifact(&self, artifact: &Path) -> Option<Module> {
        if !artifact.exists() {
            return None;
        }
        // SAFETY: the file was written by `compile` below from `Module::serialize` of this very
        // engine configuration (its name carries the compatibility hash), into the node's own
        // cache directory; wasmtime still checks the header and rejects foreign artifacts.
        match unsafe { Module::deserialize_file(&self.engine, artifact) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %artifact.display(), error = %e, "discarding bad artifact");
                let _ = std::fs::remove_file(artifact);
                None
            }
        }
    }

    fn compile(&self, image: &str, wasm: &Path, artifact: &Path) -> Result<Module, RuntimeError> {
        let bytes = std::fs::read(wasm)
            .map_err(|e| RuntimeError::Internal(format!("cannot read cached image: {e}")))?;
        if bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] != [1, 0, 0, 0] {
            return Err(refused(
                image,
                "this is a WebAssembly component (WASI 0.2); only WASI preview 1 core modules \
                 are supported"
                    .into(),
            ));
        }
        let module = Module::new(&self.engine, &bytes)
            .map_err(|e| refused(image, format!("invalid module: {e:#}")))?;
        // Check before writing the artifact so a refused module leaves nothing behind.
        self.check_imports(image, &module)?;
        match module.serialize() {
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
        Ok(module)
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

fn refused(image: &str, reason: String) -> RuntimeError {
    RuntimeError::ImageRefused {
        image: image.to_owned(),
        reason,
    }
}
