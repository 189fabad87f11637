//! The wasmtime embedding: loading a puller component and calling its exports.
//!
//! - [`Runtime`] owns the wasmtime [`Engine`] and the on-disk cache of compiled components
//!   (`<root>/cache/<module digest>-<engine hash>.cwasm`), so a restart does not recompile.
//! - [`Puller`] is a loaded, linked and pre-instantiated component plus its settings. Each
//!   call gets a fresh [`Store`] and instance from the [`InstancePre`] (about 35 µs), is
//!   configured with the current settings, and then makes exactly one export call: guest
//!   state never leaks from one request to the next.
//! - [`CallState`] is the store data: the request's [`Session`] and the store limits. The
//!   host side of each WIT interface lives in `crate::interfaces`.
//!
//! A guest-visible error (the WIT `error` variant) is a [`CallError::Refused`]; a trap — a
//! host bug, a hostile guest, or a limit hit — is a [`CallError::Trap`].
//! [`MEMORY_LIMIT`] bounds a guest's linear memory (64 MiB: a puller parses manifests and
//! configs of at most 4 MiB each, so this leaves ample headroom while bounding a runaway).

use std::{
    hash::{Hash, Hasher as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use wasmtime::{
    component::{Component, HasSelf, Linker},
    Config, Engine, Store, StoreLimits, StoreLimitsBuilder,
};

use crate::{error::Code, oci::Digest, session::Session};

pub(crate) mod bindings {
    //! Bindings generated from `wit/`; private to the host.
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "puller-world",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

pub use bindings::exports::pullbox::image::puller::{ImageInfo, PullRequest};
use bindings::{PullerWorld, PullerWorldPre};

/// The most linear memory one guest instance may use.
pub const MEMORY_LIMIT: usize = 64 << 20;

/// The most core instances, memories and tables one component instance may create (a
/// component made by `wasm-tools component new` has a few core instances: the module and
/// its adapter shims).
pub const MAX_INSTANCES: usize = 16;

/// The store data of one call.
pub struct CallState {
    pub(crate) session: Arc<Session>,
    limits: StoreLimits,
}

/// What went wrong in a call into the guest.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest answered with an error.
    #[error("{message}")]
    Refused { code: Code, message: String },
    /// The guest trapped or hit a limit; the request fails, the daemon goes on.
    #[error("puller failed: {0:#}")]
    Trap(anyhow::Error),
}

impl CallError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CallError::Refused { code, .. } => *code,
            CallError::Trap(_) => Code::Internal,
        }
    }
}

/// The wasmtime engine and the compiled-component cache.
pub struct Runtime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
}

impl Runtime {
    /// An engine whose compiled components are cached under `cache_dir`.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config)?;
        Ok(Runtime { engine, cache_dir })
    }

    /// Loads, links and pre-instantiates the component in `path`, then checks that it accepts
    /// `settings`. A component that imports something pullbox does not provide, or lacks an
    /// export, is refused here with a message naming it.
    pub async fn load(&self, path: &Path, settings: String) -> anyhow::Result<Puller> {
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read puller {}: {e}", path.display()))?;
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 0x0d, 0, 1, 0]) => {}
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => anyhow::bail!(
                "puller {} is a core WebAssembly module, not a component (make one with `wasm-tools component new`)",
                path.display()
            ),
            _ => anyhow::bail!("puller {} is not a WebAssembly component", path.display()),
        }
        let component = self
            .compile(&bytes)
            .map_err(|e| anyhow::anyhow!("cannot load puller {}: {e:#}", path.display()))?;
        let mut linker: Linker<CallState> = Linker::new(&self.engine);
        PullerWorld::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("puller {} does not fit pullbox: {e:#}", path.display()))?;
        let pre = PullerWorldPre::new(pre)
            .map_err(|e| anyhow::anyhow!("puller {} does not fit pullbox: {e:#}", path.display()))?;
        let puller = Puller { engine: self.engine.clone(), pre, settings, path: path.to_owned() };
        Ok(puller)
    }

    /// Compiles `bytes`, or loads the compiled form from the cache.
    fn compile(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let file = dir.join(format!("{}-{:016x}.cwasm", Digest::sha256_of(bytes).hex(), h.finish()));
        if file.exists() {
            // SAFETY: the file is one this process's engine configuration wrote (its name
            // binds the module digest and the engine's compatibility hash) into a directory
            // under pullbox's root, which only root may write.
            match unsafe { Component::deserialize_file(&self.engine, &file) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!("ignoring unusable compiled-component cache {}: {e}", file.display()),
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        if let Err(e) = write_cache(dir, &file, &component.serialize()?) {
            tracing::warn!("cannot cache compiled component in {}: {e}", dir.display());
        }
        Ok(component)
    }
}

/// Writes a cache entry atomically.
fn write_cache(dir: &Path, file: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, file)
}

/// A loaded puller with its settings.
pub struct Puller {
    engine: Engine,
    pre: PullerWorldPre<CallState>,
    settings: String,
    path: PathBuf,
}

impl Puller {
    /// The file the puller was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh store and instance, configured with the current settings.
    async fn instance(&self, session: Arc<Session>) -> Result<(Store<CallState>, PullerWorld), CallError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(MEMORY_LIMIT)
            .instances(MAX_INSTANCES)
            .memories(MAX_INSTANCES)
            .tables(MAX_INSTANCES)
            .build();
        let mut store = Store::new(&self.engine, CallState { session, limits });
        store.limiter(|s| &mut s.limits);
        let world = self.pre.instantiate_async(&mut store).await.map_err(trap)?;
        world
            .pullbox_image_puller()
            .call_configure(&mut store, &self.settings)
            .await
            .map_err(trap)?
            .map_err(refused)?;
        Ok((store, world))
    }

    /// Checks that the puller accepts its settings.
    pub async fn check(&self, session: Arc<Session>) -> Result<(), CallError> {
        self.instance(session).await.map(|_| ())
    }

    /// Calls `pull-image`.
    pub async fn pull(&self, session: Arc<Session>, request: &PullRequest) -> Result<ImageInfo, CallError> {
        let (mut store, world) = self.instance(session).await?;
        world.pullbox_image_puller().call_pull_image(&mut store, request).await.map_err(trap)?.map_err(refused)
    }

    /// Calls `image-status`.
    pub async fn status(&self, session: Arc<Session>, reference: &str) -> Result<Option<ImageInfo>, CallError> {
        let (mut store, world) = self.instance(session).await?;
        world.pullbox_image_puller().call_image_status(&mut store, reference).await.map_err(trap)?.map_err(refused)
    }

    /// Calls `list-images`.
    pub async fn list(&self, session: Arc<Session>) -> Result<Vec<ImageInfo>, CallError> {
        let (mut store, world) = self.instance(session).await?;
        world.pullbox_image_puller().call_list_images(&mut store).await.map_err(trap)?.map_err(refused)
    }

    /// Calls `remove-image`.
    pub async fn remove(&self, session: Arc<Session>, reference: &str) -> Result<(), CallError> {
        let (mut store, world) = self.instance(session).await?;
        world.pullbox_image_puller().call_remove_image(&mut store, reference).await.map_err(trap)?.map_err(refused)
    }
}

fn trap(e: wasmtime::Error) -> CallError {
    CallError::Trap(e.into())
}

fn refused(e: bindings::pullbox::image::types::Error) -> CallError {
    let (code, message) = crate::interfaces::from_wit_error(e);
    CallError::Refused { code, message }
}
