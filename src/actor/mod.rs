//! Actors: Wasm modules run by Wasmtime on memory the runtime owns.
//!
//! One [`Runtime`] per process holds the Wasmtime `Engine` and `Linker` (built once) and an epoch
//! ticker that enforces `--timeout`. Each [`Actor`] is one `Store<ActorState>` with its typed
//! exports looked up once, and its linear memory in a shared [`crate::region::Region`]. Messages are
//! delivered one at a time; between messages no Wasm frame is live, which is when snapshots are
//! taken.

pub mod abi;
pub mod instrument;
pub mod memory;
pub mod model_abi;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driftwood_guest::abi::{exports, unpack_reply, MODULE};
use wasmtime::{Config, Engine, ExternType, Instance, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc, ValType};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::WasiCtxBuilder;

use crate::backend::Backend;
use crate::region::Region;

/// How often the epoch ticker advances; `--timeout` is counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Errors loading or running an actor.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid WebAssembly module: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: not a driftwood actor: {reason}")]
    NotAnActor { path: PathBuf, reason: String },
    #[error("{actor}: cannot instantiate: {reason}")]
    Instantiate { actor: String, reason: String },
    #[error("{actor}: exceeded the {seconds:.1}s timeout in {func} (raise --timeout if it is meant to run longer)")]
    Timeout { actor: String, func: &'static str, seconds: f64 },
    #[error("{actor}: trapped in {func}: {message}")]
    Trap { actor: String, func: &'static str, message: String },
    #[error("{actor}: {reason}")]
    Protocol { actor: String, reason: String },
    #[error("runtime: {0}")]
    Runtime(String),
}

impl ActorError {
    /// True when the actor itself failed (exit code 1), false for bad input or setup (exit 2).
    pub fn is_actor_failure(&self) -> bool {
        matches!(self, ActorError::Timeout { .. } | ActorError::Trap { .. } | ActorError::Protocol { .. })
    }
}

/// Settings for every actor of a runtime.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Most bytes an actor's linear memory may grow to.
    pub max_memory: usize,
    /// Wall-clock limit for one call into the actor (init or one message).
    pub timeout: Duration,
    pub backend: Arc<dyn Backend>,
    /// Print the actor's debug-level log lines.
    pub verbose: bool,
}

/// Per-actor host state, the `T` of `Store<T>`.
pub struct ActorState {
    pub name: String,
    pub wasi: WasiP1Ctx,
    pub limits: StoreLimits,
    pub backend: Arc<dyn Backend>,
    /// Set once the instance exists; host functions use it instead of a by-name lookup.
    pub memory: Option<Memory>,
    pub verbose: bool,
    /// The actor's conversation with the model (None when the runtime has no model).
    pub session: Option<crate::engine::Session>,
    /// Time spent inside model host calls, to report the host-boundary cost.
    pub host_stats: HostStats,
}

/// Counters of model host calls.
#[derive(Debug, Default, Clone)]
pub struct HostStats {
    pub calls: u64,
    pub tokens_evaluated: u64,
    pub compute: Duration,
    /// `eval` calls whose logits the device stored straight into the actor's memory.
    pub logits_in_place: u64,
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("driftwood-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .ok();
        EpochTicker { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The Wasmtime engine and linker, built once per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<ActorState>,
    config: RuntimeConfig,
    _ticker: EpochTicker,
}

/// A compiled, validated actor module.
#[derive(Clone)]
pub struct ActorModule {
    pub name: String,
    pub path: PathBuf,
    pub bytes: Arc<Vec<u8>>,
    module: Module,
    has_init: bool,
    has_wasi_initialize: bool,
    /// Every mutable global, exported by instrumentation so snapshots can read and write it.
    pub globals: Vec<instrument::GlobalSlot>,
}

impl ActorModule {
    /// True when the actor imports any model function (so it needs a model loaded).
    pub fn uses_model(&self) -> bool {
        use driftwood_guest::abi::imports;
        const NON_MODEL: [&str; 3] = [imports::ABI_VERSION, imports::LOG, imports::GEMM];
        self.module.imports().any(|i| i.module() == MODULE && !NON_MODEL.contains(&i.name()))
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Runtime, ActorError> {
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            .memory_may_move(false)
            // Copy-on-write images need Wasmtime-owned mmaps; our region is initialised by copy.
            .memory_init_cow(false)
            .with_host_memory(Arc::new(memory::RegionMemoryCreator { limit: config.max_memory }));
        let engine = Engine::new(&wasm).map_err(|e| ActorError::Runtime(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut ActorState| &mut s.wasi).map_err(|e| ActorError::Runtime(format!("{e:#}")))?;
        abi::add_to_linker(&mut linker).map_err(|e| ActorError::Runtime(format!("{e:#}")))?;
        model_abi::add_to_linker(&mut linker).map_err(|e| ActorError::Runtime(format!("{e:#}")))?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(Runtime { engine, linker, config, _ticker: ticker })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Reads, compiles and validates an actor file.
    pub fn load(&self, path: &Path) -> Result<ActorModule, ActorError> {
        let bytes = std::fs::read(path).map_err(|source| ActorError::Read { path: path.to_owned(), source })?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
        self.compile(name, path.to_owned(), bytes)
    }

    /// Compiles and validates actor bytes (from a file or a snapshot).
    pub fn compile(&self, name: String, path: PathBuf, bytes: Vec<u8>) -> Result<ActorModule, ActorError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            let looks_like_wat = bytes.iter().take(64).any(|b| *b == b'(');
            if !looks_like_wat {
                return Err(ActorError::Invalid { path, reason: "missing the \\0asm magic number".into() });
            }
        }
        let binary = wat::parse_bytes(&bytes).map_err(|e| ActorError::Invalid { path: path.clone(), reason: e.to_string() })?;
        let (instrumented, globals) = instrument::instrument(&binary).map_err(|e| ActorError::Invalid { path: path.clone(), reason: e.to_string() })?;
        let module = Module::new(&self.engine, &instrumented).map_err(|e| ActorError::Invalid { path: path.clone(), reason: format!("{e:#}") })?;
        let (has_init, has_wasi_initialize) = check_contract(&module).map_err(|reason| ActorError::NotAnActor { path: path.clone(), reason })?;
        let bytes = binary.into_owned();
        Ok(ActorModule { name, path, bytes: Arc::new(bytes), module, has_init, has_wasi_initialize, globals })
    }

    /// Instantiates an actor (without calling its init: see [`Actor::init`]).
    pub fn instantiate(&self, module: &ActorModule) -> Result<Actor, ActorError> {
        let wasi = WasiCtxBuilder::new().inherit_stdout().inherit_stderr().arg(&module.name).build_p1();
        let state = ActorState {
            name: module.name.clone(),
            wasi,
            limits: StoreLimitsBuilder::new().memory_size(self.config.max_memory).instances(1).build(),
            backend: self.config.backend.clone(),
            memory: None,
            verbose: self.config.verbose,
            session: None,
            host_stats: HostStats::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.deadline_ticks());
        memory::take_created_regions();
        let fail = |reason: String| ActorError::Instantiate { actor: module.name.clone(), reason };
        let instance = self.linker.instantiate(&mut store, &module.module).map_err(|e| fail(format!("{e:#}")))?;
        let regions = memory::take_created_regions();
        let memory = instance.get_memory(&mut store, exports::MEMORY).ok_or_else(|| fail("no memory export".into()))?;
        let region = regions
            .into_iter()
            .find(|r| r.base() == memory.data_ptr(&store))
            .ok_or_else(|| fail("the exported memory is not backed by a driftwood region".into()))?;
        store.data_mut().memory = Some(memory);
        self.config.backend.share_region(&region).map_err(|e| fail(e.to_string()))?;
        let handle = instance.get_typed_func(&mut store, exports::HANDLE).map_err(|e| fail(format!("{e:#}")))?;
        let alloc = instance.get_typed_func(&mut store, exports::ALLOC).map_err(|e| fail(format!("{e:#}")))?;
        let init = if module.has_init { Some(instance.get_typed_func(&mut store, exports::INIT).map_err(|e| fail(format!("{e:#}")))?) } else { None };
        let mut actor = Actor { module: module.clone(), store, instance, memory, region, handle, alloc, init, timeout: self.config.timeout };
        if module.has_wasi_initialize {
            let start: TypedFunc<(), ()> = instance.get_typed_func(&mut actor.store, exports::WASI_INITIALIZE).map_err(|e| fail(format!("{e:#}")))?;
            actor.call("_initialize", |store| start.call(store, ()))?;
        }
        Ok(actor)
    }

    fn deadline_ticks(&self) -> u64 {
        (self.config.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

/// Checks the exports and imports an actor must have; returns (has init, has _initialize).
fn check_contract(module: &Module) -> Result<(bool, bool), String> {
    let mut missing = Vec::new();
    let export = |name: &str| module.get_export(name);
    match export(exports::MEMORY) {
        Some(ExternType::Memory(_)) => {}
        Some(_) => return Err(format!("export `{}` is not a memory", exports::MEMORY)),
        None => missing.push(format!("`{}` (memory)", exports::MEMORY)),
    }
    let check_func = |name: &str, params: &[ValType], results: &[ValType], missing: &mut Vec<String>| -> Result<bool, String> {
        let sig = format!("({}) -> ({})", fmt_types(params), fmt_types(results));
        match export(name) {
            Some(ExternType::Func(f)) => {
                let p: Vec<ValType> = f.params().collect();
                let r: Vec<ValType> = f.results().collect();
                if same_types(&p, params) && same_types(&r, results) {
                    Ok(true)
                } else {
                    Err(format!("export `{name}` has type ({}) -> ({}), expected {sig}", fmt_types(&p), fmt_types(&r)))
                }
            }
            Some(_) => Err(format!("export `{name}` is not a function")),
            None => {
                missing.push(format!("`{name}` {sig}"));
                Ok(false)
            }
        }
    };
    check_func(exports::HANDLE, &[ValType::I32, ValType::I32], &[ValType::I64], &mut missing)?;
    check_func(exports::ALLOC, &[ValType::I32], &[ValType::I32], &mut missing)?;
    if !missing.is_empty() {
        return Err(format!("missing export{} {}", if missing.len() > 1 { "s" } else { "" }, missing.join(", ")));
    }
    let mut ignore = Vec::new();
    let has_init = check_func(exports::INIT, &[], &[], &mut ignore)?;
    let has_start = check_func(exports::WASI_INITIALIZE, &[], &[], &mut ignore)?;
    for import in module.imports() {
        let m = import.module();
        if m != MODULE && m != "wasi_snapshot_preview1" {
            return Err(format!("imports `{m}::{}`, but driftwood provides only modules `{MODULE}` and `wasi_snapshot_preview1`", import.name()));
        }
    }
    Ok((has_init, has_start))
}

fn same_types(a: &[ValType], b: &[ValType]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| ValType::eq(x, y))
}

fn fmt_types(t: &[ValType]) -> String {
    t.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

/// One live actor.
pub struct Actor {
    pub module: ActorModule,
    store: Store<ActorState>,
    instance: Instance,
    memory: Memory,
    region: Region,
    handle: TypedFunc<(i32, i32), i64>,
    alloc: TypedFunc<i32, i32>,
    init: Option<TypedFunc<(), ()>>,
    timeout: Duration,
}

impl Actor {
    /// Calls `driftwood_init` if the actor exports it (once, on a fresh start).
    pub fn init(&mut self) -> Result<(), ActorError> {
        if let Some(init) = self.init.clone() {
            self.call(exports::INIT, |store| init.call(store, ()))?;
        }
        Ok(())
    }

    /// Delivers one message and returns the actor's reply bytes.
    pub fn deliver(&mut self, message: &[u8]) -> Result<Vec<u8>, ActorError> {
        let len = i32::try_from(message.len()).map_err(|_| self.protocol(format!("message of {} bytes is too large", message.len())))?;
        let alloc = self.alloc.clone();
        let ptr = self.call(exports::ALLOC, |store| alloc.call(store, len))? as u32;
        let data = self.memory.data_mut(&mut self.store);
        let range = abi::guest_range(data.len(), ptr, message.len() as u64, 1, exports::ALLOC, "returned buffer")
            .map_err(|e| ActorError::Protocol { actor: self.module.name.clone(), reason: e.to_string() })?;
        data[range].copy_from_slice(message);
        let handle = self.handle.clone();
        let packed = self.call(exports::HANDLE, |store| handle.call(store, (ptr as i32, len)))?;
        let (rptr, rlen) = unpack_reply(packed);
        let data = self.memory.data(&self.store);
        let range = abi::guest_range(data.len(), rptr, u64::from(rlen), 1, exports::HANDLE, "reply")
            .map_err(|e| ActorError::Protocol { actor: self.module.name.clone(), reason: e.to_string() })?;
        Ok(data[range].to_vec())
    }

    /// Runs one call into the actor under the timeout, turning traps into [`ActorError`]s.
    fn call<R>(&mut self, func: &'static str, f: impl FnOnce(&mut Store<ActorState>) -> wasmtime::Result<R>) -> Result<R, ActorError> {
        let ticks = (self.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        self.store.set_epoch_deadline(ticks);
        f(&mut self.store).map_err(|e| {
            let actor = self.module.name.clone();
            if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                ActorError::Timeout { actor, func, seconds: self.timeout.as_secs_f64() }
            } else {
                ActorError::Trap { actor, func, message: format!("{e:?}") }
            }
        })
    }

    fn protocol(&self, reason: String) -> ActorError {
        ActorError::Protocol { actor: self.module.name.clone(), reason }
    }

    /// The region backing the actor's linear memory.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// `memory.data_ptr()` as Wasmtime reports it (equal to the region base).
    pub fn memory_ptr(&self) -> *mut u8 {
        self.memory.data_ptr(&self.store)
    }

    /// Current linear memory size in bytes.
    pub fn memory_size(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    pub fn memory(&self) -> Memory {
        self.memory
    }

    pub fn store(&self) -> &Store<ActorState> {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut Store<ActorState> {
        &mut self.store
    }

    /// Gives the actor a model session (its KV cache, history and sampler).
    pub fn attach_session(&mut self, session: crate::engine::Session) {
        self.store.data_mut().session = Some(session);
    }

    pub fn session(&self) -> Option<&crate::engine::Session> {
        self.store.data().session.as_ref()
    }

    pub fn session_mut(&mut self) -> Option<&mut crate::engine::Session> {
        self.store.data_mut().session.as_mut()
    }

    pub fn host_stats(&self) -> &HostStats {
        &self.store.data().host_stats
    }
}

impl Actor {
    /// Grows linear memory (from the host side) to at least `bytes`.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), ActorError> {
        let have = self.memory_size();
        if bytes <= have {
            return Ok(());
        }
        let pages = (bytes - have).div_ceil(65536) as u64;
        self.memory.grow(&mut self.store, pages).map_err(|e| self.protocol(format!("cannot grow memory to {bytes} bytes: {e:#}")))?;
        Ok(())
    }

    /// Values of every mutable global, by global index (for snapshots; between messages).
    pub fn global_values(&mut self) -> Result<Vec<(u32, wasmtime::Val)>, ActorError> {
        let mut out = Vec::with_capacity(self.module.globals.len());
        for slot in &self.module.globals {
            let g =
                self.instance.get_global(&mut self.store, &slot.export).ok_or_else(|| self.protocol(format!("global export `{}` is missing", slot.export)))?;
            out.push((slot.index, g.get(&mut self.store)));
        }
        Ok(out)
    }

    /// Overwrites linear memory (growing it to `bytes.len()`) and mutable globals with a
    /// snapshot's. Fails without partial effect on globals if any value has the wrong type.
    pub fn restore_state(&mut self, bytes: &[u8], globals: &[(u32, wasmtime::Val)]) -> Result<(), ActorError> {
        let mut targets = Vec::with_capacity(globals.len());
        for (index, val) in globals {
            let slot = self
                .module
                .globals
                .iter()
                .find(|s| s.index == *index)
                .ok_or_else(|| self.protocol(format!("the snapshot sets global {index}, which is not a mutable global of this module")))?;
            let g =
                self.instance.get_global(&mut self.store, &slot.export).ok_or_else(|| self.protocol(format!("global export `{}` is missing", slot.export)))?;
            if !g.ty(&self.store).content().matches(&val.ty(&self.store).map_err(|e| self.protocol(format!("{e:#}")))?) {
                return Err(self.protocol(format!("global {index} has type {}, the snapshot holds another type", g.ty(&self.store).content())));
            }
            targets.push((g, *val));
        }
        if self.memory_size() > bytes.len() {
            return Err(self.protocol(format!(
                "the fresh instance already has {} bytes of memory, more than the snapshot's {}",
                self.memory_size(),
                bytes.len()
            )));
        }
        self.grow_to(bytes.len())?;
        self.memory.data_mut(&mut self.store)[..bytes.len()].copy_from_slice(bytes);
        for (g, val) in targets {
            g.set(&mut self.store, val).map_err(|e| self.protocol(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// The whole linear memory (a copy).
    pub fn memory_bytes(&self) -> Vec<u8> {
        self.memory.data(&self.store).to_vec()
    }

    /// Takes the model session out (e.g. to rebuild it), leaving none.
    pub fn take_session(&mut self) -> Option<crate::engine::Session> {
        self.store.data_mut().session.take()
    }
}
