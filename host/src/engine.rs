//! The wasmtime embedding: loading a puller component and calling its exports.
//!
//! - [`Runtime`] owns the wasmtime [`Engine`] and the on-disk cache of compiled components
//!   (`<root>/cache/<module digest>-<engine hash>.cwasm`), so a restart does not recompile.
//! - [`Puller`] is a loaded, linked and pre-instantiated component plus its settings. Each
//!   call gets a fresh [`Store`] and instance from the [`InstancePre`] (about 35 µs), is
//!   configured with the current settings, and then makes exactly one export call: guest
//!   state never leaks from one request to the next.
//! - [`CallState`] (`crate::call`) is the store data: the request's [`Session`] and the store
//!   limits. The host side of each WIT interface lives in `crate::interfaces`; the generated
//!   bindings and their conversions to host types in `crate::bindings`. This module speaks
//!   host types only ([`PullRequest`], [`ImageInfo`], [`Code`]).
//!
//! A guest-visible error (the WIT `error` variant) is a [`CallError::Refused`]; a limit hit
//! is a [`CallError::Limit`], recognised by the type of the trap's error (see `trap`); any
//! other trap — a host bug or a hostile guest — is a [`CallError::Trap`].
//!
//! The sandbox ([`Limits`], the daemon's `[sandbox]` section):
//! - linear memory per instance (64 MiB by default: a puller parses manifests and configs
//!   of at most 4 MiB each, so this leaves ample headroom while bounding a runaway), and
//!   counts of core instances, memories and tables;
//! - wasm stack depth (1 MiB by default; deep enough for any parser, shallow enough that
//!   unbounded recursion traps at once);
//! - guest CPU time per call (5 s by default): a call hook accounts the time spent executing
//!   guest code, excluding host imports (downloads, unpacking); an epoch ticker
//!   ([`TICK`] = 10 ms) interrupts guest code, which then yields to the async executor — so
//!   a looping guest never starves other requests — and traps once over budget. An import's
//!   answer is copied into guest memory through the guest's allocator (one call into the guest
//!   per string of it); from the first such call to the import's return counts as guest time,
//!   as one slice, so that a 21,000-string answer costs two clock reads, not 42,000 (see
//!   [`crate::call::CpuClock`]);
//! - the pooling allocator where the machine allows it (a pool of [`Limits::max_calls`]
//!   instances; calls beyond it fail with `resource-exhausted`), the on-demand allocator
//!   otherwise;
//! - what host imports may do for one call ([`crate::interfaces::grants`]): an import budget
//!   (1,000,000 units by default: a pull of a 100-layer image spends about a thousand, a
//!   list of 100,000 records about 400,000, a guest looping on an import a second's worth),
//!   caps on the snapshots (1024) and records (1024) it creates and the blobs and snapshots
//!   it holds (16,384), and write access only for `pull-image` (delete for `remove-image`);
//! - a wall-clock deadline per export call, host imports included: 1 h for `pull-image`
//!   (a multi-gigabyte image on a slow link; the transport's stall timeout catches a dead
//!   one much sooner), 30 s for the others, whose real work takes milliseconds.

use std::{
    hash::{Hash, Hasher as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use wasmtime::{
    component::{Component, HasSelf, Linker},
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig, Store,
    StoreLimitsBuilder, UpdateDeadline,
};

use crate::{
    bindings::{from_wit_error, PullerWorld, PullerWorldPre},
    call::{CallState, CpuClock, CpuLimit, GrowLimit, Limiter},
    error::Code,
    image::{ImageInfo, PullRequest},
    interfaces::grants::{Access, BudgetSpent, Caps, Grants},
    oci::Digest,
    session::Session,
};

pub use crate::call::guest_time;

/// How often the epoch ticker interrupts guest code to account its CPU time.
pub const TICK: Duration = Duration::from_millis(10);

/// The sandbox's limits (the daemon's `[sandbox]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes of linear memory one instance may use.
    pub memory_limit: usize,
    /// Milliseconds of guest execution one call may use (host imports do not count).
    pub cpu_limit_ms: u64,
    /// Bytes of wasm stack.
    pub stack_limit: usize,
    /// Calls that may run at once (the size of the instance pool).
    pub max_calls: u32,
    /// Import budget units one call may spend (see [`crate::interfaces::grants`]).
    pub import_budget: u64,
    /// Snapshots one call may create.
    pub max_snapshots: u32,
    /// Image records one call may create.
    pub max_records: u32,
    /// Blobs and snapshots one pull may hold under its lease.
    pub max_holds: u32,
    /// Seconds a `pull-image` call may take, host imports included.
    pub pull_timeout_s: u64,
    /// Milliseconds any other export call (and `configure`) may take.
    pub call_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_limit: 64 << 20,
            cpu_limit_ms: 5000,
            stack_limit: 1 << 20,
            max_calls: 64,
            import_budget: 1_000_000,
            max_snapshots: 1024,
            max_records: 1024,
            max_holds: 16_384,
            pull_timeout_s: 3600,
            call_timeout_ms: 30_000,
        }
    }
}

impl Limits {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if !(1 << 20..=4 << 30).contains(&self.memory_limit) {
            return Err("sandbox.memory_limit must be between 1 MiB and 4 GiB".into());
        }
        if self.cpu_limit_ms == 0 {
            return Err("sandbox.cpu_limit_ms must be positive".into());
        }
        if !(64 << 10..=64 << 20).contains(&self.stack_limit) {
            return Err("sandbox.stack_limit must be between 64 KiB and 64 MiB".into());
        }
        if !(1..=10_000).contains(&self.max_calls) {
            return Err("sandbox.max_calls must be between 1 and 10000".into());
        }
        if !(1_000..=1_000_000_000).contains(&self.import_budget) {
            return Err("sandbox.import_budget must be between 1000 and 1000000000".into());
        }
        for (name, value) in
            [("max_snapshots", self.max_snapshots), ("max_records", self.max_records), ("max_holds", self.max_holds)]
        {
            if !(1..=1_000_000).contains(&value) {
                return Err(format!("sandbox.{name} must be between 1 and 1000000"));
            }
        }
        if !(1..=86_400).contains(&self.pull_timeout_s) {
            return Err("sandbox.pull_timeout_s must be between 1 and 86400".into());
        }
        if !(100..=3_600_000).contains(&self.call_timeout_ms) {
            return Err("sandbox.call_timeout_ms must be between 100 and 3600000".into());
        }
        Ok(())
    }

    /// The caps of one call.
    fn caps(&self) -> Caps {
        Caps {
            budget: self.import_budget,
            snapshots: self.max_snapshots,
            records: self.max_records,
            holds: self.max_holds,
        }
    }
}

/// The most core instances, memories and tables one component instance may create (a
/// component made by `wasm-tools component new` has a few core instances: the module and
/// its adapter shims).
pub const MAX_INSTANCES: usize = 16;

/// The most bytes one import call may copy from the guest into the host (the largest real
/// argument, a fetch of 1024 descriptors, is about 300 kB; wasmtime's default is 128 MiB).
pub const HOSTCALL_BYTES: usize = 4 << 20;

/// The most elements one table may hold (function tables of real pullers hold hundreds).
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What went wrong in a call into the guest.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest answered with an error.
    #[error("{message}")]
    Refused { code: Code, message: String },
    /// The guest hit a sandbox limit (CPU time, memory, stack, instance pool).
    #[error("puller stopped: {0}")]
    Limit(String),
    /// The guest trapped; the request fails, the daemon goes on.
    #[error("puller failed: {0:#}")]
    Trap(anyhow::Error),
}

impl CallError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CallError::Refused { code, .. } => *code,
            CallError::Limit(_) => Code::ResourceExhausted,
            CallError::Trap(_) => Code::Internal,
        }
    }
}

/// The wasmtime engine and the compiled-component cache.
pub struct Runtime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    limits: Limits,
}

impl Runtime {
    /// An engine with `limits` whose compiled components are cached under `cache_dir`.
    pub fn new(cache_dir: Option<PathBuf>, limits: Limits) -> anyhow::Result<Runtime> {
        limits.validate().map_err(anyhow::Error::msg)?;
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(limits.stack_limit)
            .async_stack_size(limits.stack_limit + (1 << 20));
        let mut pool = PoolingAllocationConfig::default();
        let n = limits.max_calls;
        pool.total_component_instances(n)
            .total_core_instances(n * MAX_INSTANCES as u32)
            .total_memories(n * MAX_INSTANCES as u32)
            .total_tables(n * MAX_INSTANCES as u32)
            .total_stacks(n)
            .max_core_instances_per_component(MAX_INSTANCES as u32)
            .max_memories_per_component(MAX_INSTANCES as u32)
            .max_tables_per_component(MAX_INSTANCES as u32)
            .max_memory_size(limits.memory_limit);
        let mut pooled = config.clone();
        pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = match Engine::new(&pooled) {
            Ok(e) => e,
            Err(e) => {
                tracing::info!("pooling allocator unavailable ({e}); allocating instances on demand");
                Engine::new(&config)?
            }
        };
        let weak = engine.weak();
        std::thread::Builder::new().name("pullbox-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })?;
        Ok(Runtime { engine, cache_dir, limits })
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
        let component =
            self.compile(&bytes).map_err(|e| anyhow::anyhow!("cannot load puller {}: {e:#}", path.display()))?;
        let mut linker: Linker<CallState> = Linker::new(&self.engine);
        PullerWorld::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow::anyhow!("puller {} does not fit pullbox: {e:#}", path.display()))?;
        let pre = PullerWorldPre::new(pre)
            .map_err(|e| anyhow::anyhow!("puller {} does not fit pullbox: {e:#}", path.display()))?;
        check_exports(&self.engine, &component)
            .map_err(|e| anyhow::anyhow!("puller {} does not fit pullbox: {e}", path.display()))?;
        let puller =
            Puller { engine: self.engine.clone(), pre, settings, path: path.to_owned(), limits: self.limits.clone() };
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

/// The exported interface every puller implements.
const PULLER_EXPORT: &str = "pullbox:image/puller@0.2.0";

/// Checks the shape of each export function (parameter and result kinds), so a component
/// whose export has the right name but another type is refused at load, naming the export,
/// instead of at its first call.
fn check_exports(engine: &Engine, component: &Component) -> anyhow::Result<()> {
    use wasmtime::component::types::{ComponentItem, Type};
    let ty = component.component_type();
    let Some(export) = ty.get_export(engine, PULLER_EXPORT) else {
        anyhow::bail!("it does not export {PULLER_EXPORT}");
    };
    let ComponentItem::ComponentInstance(instance) = export.ty else {
        anyhow::bail!("its export {PULLER_EXPORT} is not an instance");
    };
    /// A test of one parameter's type.
    type Param<'a> = &'a dyn Fn(&Type) -> bool;
    let is_string = |t: &Type| matches!(t, Type::String);
    let is_record = |t: &Type| matches!(t, Type::Record(_));
    let expected: [(&str, &[Param]); 5] = [
        ("configure", &[&is_string]),
        ("pull-image", &[&is_record]),
        ("image-status", &[&is_string]),
        ("list-images", &[]),
        ("remove-image", &[&is_string]),
    ];
    for (name, params) in expected {
        let Some(item) = instance.get_export(engine, name) else {
            anyhow::bail!("it lacks the export {PULLER_EXPORT}#{name}");
        };
        let ComponentItem::ComponentFunc(f) = item.ty else {
            anyhow::bail!("its export {PULLER_EXPORT}#{name} is not a function");
        };
        let got: Vec<Type> = f.params().map(|(_, t)| t).collect();
        let results: Vec<Type> = f.results().collect();
        let params_ok = got.len() == params.len() && got.iter().zip(params).all(|(t, ok)| ok(t));
        let results_ok = results.len() == 1 && matches!(results[0], Type::Result(_));
        if !params_ok || !results_ok {
            anyhow::bail!("its export {PULLER_EXPORT}#{name} has the wrong type ({got:?} -> {results:?})");
        }
    }
    Ok(())
}

/// Writes a cache entry atomically, readable by its owner alone (the store's root is).
fn write_cache(dir: &Path, file: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?.write_all(data)?;
    std::fs::rename(&tmp, file)
}

/// A loaded puller with its settings.
pub struct Puller {
    engine: Engine,
    pre: PullerWorldPre<CallState>,
    settings: String,
    path: PathBuf,
    limits: Limits,
}

impl Puller {
    /// The file the puller was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh store and instance, configured with the current settings (read-only, under the
    /// short deadline); the export call that follows gets `access`.
    async fn instance(
        &self,
        session: Arc<Session>,
        access: Access,
    ) -> Result<(Store<CallState>, PullerWorld), CallError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_limit)
            .instances(MAX_INSTANCES)
            .memories(MAX_INSTANCES)
            .tables(MAX_INSTANCES)
            .table_elements(MAX_TABLE_ELEMENTS)
            .build();
        let limits = Limiter::new(limits, MAX_TABLE_ELEMENTS);
        let clock = CpuClock::new(Duration::from_millis(self.limits.cpu_limit_ms));
        let grants = Grants::new(Access::Read, self.limits.caps());
        let snapshots = session.backend.snapshots.clone();
        let mut store =
            Store::new(&self.engine, CallState { session, limits, clock, log_events: 0, grants, snapshots });
        store.limiter(|s| &mut s.limits);
        store.set_hostcall_fuel(HOSTCALL_BYTES);
        store.call_hook(|mut ctx, hook| {
            ctx.data_mut().clock.hook(hook);
            Ok(())
        });
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let clock = &ctx.data().clock;
            if clock.used_now() > clock.limit {
                return Err(wasmtime::Error::new(CpuLimit(clock.limit)));
            }
            // Let other requests run between slices of this guest's execution.
            Ok(UpdateDeadline::Yield(1))
        });
        let short = Duration::from_millis(self.limits.call_timeout_ms);
        let world = deadline("configure", short, "sandbox.call_timeout_ms", async {
            let world = self.pre.instantiate_async(&mut store).await.map_err(trap)?;
            world
                .pullbox_image_puller()
                .call_configure(&mut store, &self.settings)
                .await
                .map_err(trap)?
                .map_err(refused)?;
            Ok(world)
        })
        .await?;
        store.data_mut().grants.set_access(access);
        Ok((store, world))
    }

    /// The deadline of an export call other than `pull-image`.
    fn short(&self) -> Duration {
        Duration::from_millis(self.limits.call_timeout_ms)
    }

    /// Checks that the puller accepts its settings.
    pub async fn check(&self, session: Arc<Session>) -> Result<(), CallError> {
        self.instance(session, Access::Read).await.map(|_| ())
    }

    /// Calls `pull-image`.
    pub async fn pull(&self, session: Arc<Session>, request: &PullRequest) -> Result<ImageInfo, CallError> {
        let (mut store, world) = self.instance(session, Access::Pull).await?;
        let limit = Duration::from_secs(self.limits.pull_timeout_s);
        let pulled = deadline("pull-image", limit, "sandbox.pull_timeout_s", async {
            world
                .pullbox_image_puller()
                .call_pull_image(&mut store, &request.into())
                .await
                .map_err(trap)?
                .map(ImageInfo::from)
                .map_err(refused)
        })
        .await;
        tracing::debug!(units = store.data().grants.spent(), "import budget spent by the pull");
        pulled
    }

    /// Calls `image-status`.
    pub async fn status(&self, session: Arc<Session>, reference: &str) -> Result<Option<ImageInfo>, CallError> {
        let (mut store, world) = self.instance(session, Access::Read).await?;
        deadline("image-status", self.short(), "sandbox.call_timeout_ms", async {
            world
                .pullbox_image_puller()
                .call_image_status(&mut store, reference)
                .await
                .map_err(trap)?
                .map(|i| i.map(ImageInfo::from))
                .map_err(refused)
        })
        .await
    }

    /// Calls `list-images`.
    pub async fn list(&self, session: Arc<Session>) -> Result<Vec<ImageInfo>, CallError> {
        let (mut store, world) = self.instance(session, Access::Read).await?;
        deadline("list-images", self.short(), "sandbox.call_timeout_ms", async {
            world
                .pullbox_image_puller()
                .call_list_images(&mut store)
                .await
                .map_err(trap)?
                .map(|l| l.into_iter().map(ImageInfo::from).collect())
                .map_err(refused)
        })
        .await
    }

    /// Calls `remove-image`.
    pub async fn remove(&self, session: Arc<Session>, reference: &str) -> Result<(), CallError> {
        let (mut store, world) = self.instance(session, Access::Remove).await?;
        deadline("remove-image", self.short(), "sandbox.call_timeout_ms", async {
            world.pullbox_image_puller().call_remove_image(&mut store, reference).await.map_err(trap)?.map_err(refused)
        })
        .await
    }
}

/// Runs one call into the guest under its wall-clock deadline. Past it the call's future is
/// dropped — guest code and any host import it was in stop where they are — and the call
/// fails as a limit hit naming `setting`; the caller (the image service) then cleans up as
/// for any failed call.
async fn deadline<T>(
    export: &str,
    limit: Duration,
    setting: &str,
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Limit(format!(
            "the puller's {export} call ran past its deadline of {} ({setting})",
            humantime(limit)
        ))),
    }
}

/// `limit` for people: whole seconds, or milliseconds below 10 s.
fn humantime(limit: Duration) -> String {
    if limit >= Duration::from_secs(10) {
        format!("{} s", limit.as_secs())
    } else {
        format!("{} ms", limit.as_millis())
    }
}

/// Classifies a trap by the type of its error: a limit hit, or anything else.
fn trap(e: wasmtime::Error) -> CallError {
    if let Some(l) = e.downcast_ref::<CpuLimit>() {
        return CallError::Limit(l.to_string());
    }
    if let Some(b) = e.downcast_ref::<BudgetSpent>() {
        return CallError::Limit(b.to_string());
    }
    if let Some(g) = e.downcast_ref::<GrowLimit>() {
        return CallError::Limit(g.to_string());
    }
    if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return CallError::Limit("too many puller calls at once (sandbox.max_calls)".into());
    }
    if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::StackOverflow) {
        return CallError::Limit("the puller exhausted its stack (stack limit)".into());
    }
    if hostcall_fuel_spent(&e) {
        return CallError::Limit(format!(
            "the puller passed too much data to one host call (more than {HOSTCALL_BYTES} bytes)"
        ));
    }
    // The cause first, for people and kubelet; the wasm backtrace goes to the debug log.
    tracing::debug!("puller trap: {e:?}");
    CallError::Trap(anyhow::anyhow!("{}", e.root_cause()))
}

/// Whether `e` is wasmtime's refusal to copy more than [`HOSTCALL_BYTES`] into one host
/// call. wasmtime 48 keeps that error's type (`HostcallFuelExhausted`) private, so this one
/// limit is recognised by its message: the root cause, as wasmtime writes it.
fn hostcall_fuel_spent(e: &wasmtime::Error) -> bool {
    e.root_cause().to_string().starts_with("too much data is being copied between the host and the guest")
}

fn refused(e: crate::bindings::wit::Error) -> CallError {
    let (code, message) = from_wit_error(e);
    CallError::Refused { code, message }
}
