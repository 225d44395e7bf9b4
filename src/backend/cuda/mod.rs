//! The CUDA backend: NVIDIA GPUs through the driver API, loaded at run time.
//!
//! * Actor memory is host-registered (`cuMemHostRegister`, device-mapped) chunk by chunk as it
//!   is committed, so kernels and cuBLAS read and write guest bytes in place; on devices with
//!   unified addressing the device pointer is the host pointer itself.
//! * Weights are copied to device memory once, in their stored format (GGUF blocks stay blocks).
//! * One stream carries all work. A reentrant lock around each forward pass keeps passes of
//!   different sessions from interleaving, which also makes graph capture safe.
//! * Token ids and positions live in a device-side [`Step`] record that kernels read, so a decode
//!   step captured once as a CUDA graph replays for every later token of the same session.
//!
//! Kernels are CUDA C++ in `kernels.cu`, compiled with NVRTC on first use for the device's
//! architecture and cached on disk.

mod driver;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUstream};
use cudarc::driver::{result, CudaContext, CudaStream};

use super::{
    check_gemm_dims, AttentionShape, BackendError, Buffer, Device, DeviceBuffer, DeviceInfo, DeviceKind, FusedOps, Handle, KvLayer, Linear, ModelOps, Norm, Probes, Rope, RopeStyle,
    WeightData,
};
use crate::region::{page_size, Region};
use crate::quant::{ActFormat, DType, QK};
pub use driver::DevMem;
use driver::{err, Graph, Module, Pinned, Registrations};

/// The kernels' hand-written source; [`kernel_source`] puts the generated format table in front.
const KERNELS: &str = include_str!("kernels.cu");

/// The source NVRTC compiles: the numbers shared with Rust ([`crate::quant::kernel_prelude`]),
/// then kernels.cu.
fn kernel_source() -> String {
    crate::quant::kernel_prelude() + KERNELS
}

/// Longest pass the `Step` record holds (`MAX_BATCH` in the kernels).
const STEP_TOKENS: usize = crate::quant::MAX_PASS_TOKENS;
/// Bytes of the `Step` record: pos0, n, token ids.
const STEP_BYTES: usize = 8 + 4 * STEP_TOKENS;
/// Captured decode graphs kept (one per live session, least recently used dropped first).
const GRAPH_CACHE: usize = 8;

/// Why CUDA cannot be used on this machine, or `None` when a device is there.
pub fn unavailable_reason(ordinal: usize) -> Option<String> {
    if !driver::driver_present() {
        return Some("no CUDA driver (libcuda.so) was found on this machine".into());
    }
    if let Err(e) = result::init() {
        return Some(err("cuInit", e));
    }
    match result::device::get_count() {
        Ok(0) => Some("the CUDA driver reports no devices".into()),
        Ok(n) if ordinal >= n as usize => Some(format!("there are only {n} CUDA devices (cuda:0 to cuda:{})", n - 1)),
        Ok(_) => None,
        Err(e) => Some(err("cuDeviceGetCount", e)),
    }
}

/// Where compiled kernels are cached: `DRIFTWOOD_KERNEL_CACHE` ([`crate::options`]), else
/// `$XDG_CACHE_HOME/driftwood/kernels`, else `~/.cache/driftwood/kernels`.
fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    crate::options::get()
        .kernel_cache
        .clone()
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("driftwood/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/driftwood/kernels")))
}

/// Kernel handles, resolved once.
struct Kernels {
    embed: CUfunction,
    dequant_rows: CUfunction,
    /// Indexed by [`DType::kernel_code`].
    matvec: [CUfunction; 9],
    /// Fused gate/up/SiLU for one token, indexed by [`DType::kernel_code`].
    ffn: [CUfunction; 9],
    /// Dense one-token products (`dense_mv`), by [F16, BF16] and chunks per thread [1, 2, 4].
    dense: [[CUfunction; 3]; 2],
    dense_ffn: [[CUfunction; 3]; 2],
    /// Blocks of 256 threads of each `dense` / `dense_ffn` instance that fit on one
    /// multiprocessor (the driver's occupancy of the compiled kernel): a persistent grid larger
    /// than what fits would run its surplus as a second wave.
    dense_fit: [[usize; 3]; 2],
    dense_ffn_fit: [[usize; 3]; 2],
    matvec_any: CUfunction,
    rope_store: CUfunction,
    rms_norm: CUfunction,
    rope: CUfunction,
    silu_mul: CUfunction,
    add: CUfunction,
    kv_store: CUfunction,
    attn_partial: CUfunction,
    attn_combine: CUfunction,
    attn_small: CUfunction,
    act_prep: CUfunction,
    copy_f32: CUfunction,
    argmax_f32: CUfunction,
    to_half: CUfunction,
    _module: Module,
}

// SAFETY: function handles are immutable and valid in every thread that binds the context.
unsafe impl Send for Kernels {}
// SAFETY: as above.
unsafe impl Sync for Kernels {}

/// One matrix of a fused matvec launch (`Seg` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct Seg {
    w: CUdeviceptr,
    y: CUdeviceptr,
    rows: i32,
}

const EMPTY_SEG: Seg = Seg { w: 0, y: 0, rows: 0 };

/// The fused rotation + cache write of a decode step's q/k/v product (`RopeStore` in
/// kernels.cu); `inv_freq == 0` means plain products.
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeStore {
    inv_freq: CUdeviceptr,
    kc: CUdeviceptr,
    vc: CUdeviceptr,
    kv_dim: i32,
    head_dim: i32,
    step: CUdeviceptr,
}

const NO_ROPE: RopeStore = RopeStore { inv_freq: 0, kc: 0, vc: 0, kv_dim: 0, head_dim: 0, step: 0 };

/// Scratch space reused across ops; growing it invalidates captured graphs (they hold its
/// addresses), hence the generation counter.
#[derive(Default)]
struct Scratch {
    /// Dequantized weight rows for cuBLAS (prefill).
    weights: Option<DevMem>,
    /// Attention partial results.
    partials: Option<DevMem>,
    /// Activations prepared for a product (normalized and rounded, see `act_prep`).
    act: Option<DevMem>,
    /// Those activations as 16-bit values, for tensor-core prefill products.
    half: Option<DevMem>,
    generation: u64,
}

/// Where the current pass stands (under the backend lock).
#[derive(Default)]
struct PassState {
    /// Inside [`Backend::forward_pass`]: the Step record already holds this pass.
    active: bool,
    pos0: usize,
    n: usize,
}

struct CachedGraph {
    graph: Graph,
    generation: u64,
    last_used: u64,
}

/// A session's decode graph: not yet captured (one plain pass ran), or ready to replay.
enum GraphSlot {
    Warm,
    Ready(CachedGraph),
}

thread_local! {
    /// The backend (by address) whose lock this thread holds, making the lock reentrant.
    static HOLDING: Cell<usize> = const { Cell::new(0) };
}

/// An NVIDIA GPU as a compute device.
pub struct CudaBackend {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: BlasHandle,
    k: Kernels,
    /// Serializes passes and standalone ops (reentrant through [`HOLDING`]).
    lock: Mutex<()>,
    step_host: Pinned,
    step_dev: DevMem,
    pass: Mutex<PassState>,
    scratch: Mutex<Scratch>,
    graphs: Mutex<HashMap<u64, GraphSlot>>,
    graph_clock: Mutex<u64>,
    /// Reused device buffers of the explicit-copy GEMM path (the zero-copy comparison).
    copy_bufs: Mutex<Vec<DevMem>>,
    /// Pinned staging for large downloads, and its capacity in bytes.
    download_pin: Mutex<Option<(Pinned, usize)>>,
    /// A device result of a few bytes (argmax's index) and its pinned host copy.
    result_dev: DevMem,
    result_host: Pinned,
    /// Rotary frequency tables already on the device, by content.
    rope_tables: Mutex<HashMap<Vec<u32>, DevMem>>,
    /// Decode graphs on (`DRIFTWOOD_CUDA_GRAPHS=0` turns them off, for comparison).
    use_graphs: bool,
    /// Kernels launched with programmatic dependent launch: each may start (and prefetch its
    /// weights) while the previous one finishes (`DRIFTWOOD_CUDA_PDL=0` turns it off).
    pdl: bool,
    /// Most blocks a one-token product launches (0: no cap).
    max_blocks: usize,
    /// F16/BF16 one-token products through `dense_mv` (see [`DensePlan`]).
    dense: bool,
    /// Overrides [`DensePlan::per_sm`] where a thread holds one chunk a row (for tuning).
    dense_per_sm: Option<usize>,
    /// F16/BF16 prefill products through cublasGemmEx on the tensor cores.
    tensor_prefill: bool,
    /// Multiprocessors of the device.
    sms: usize,
    /// Widest input of 8-bit-activation products that each block quantizes itself.
    stage_q8_cols: usize,
    /// Whether k-slices are bounded by the steps of a row (see [`k_slices`]).
    slice_cap: bool,
    /// Whether device pointers of registered host memory equal the host pointers.
    identity_mapping: bool,
}

struct BlasHandle(cublas_sys::cublasHandle_t);
// SAFETY: the handle is only used under the backend lock.
unsafe impl Send for BlasHandle {}
// SAFETY: as above.
unsafe impl Sync for BlasHandle {}

/// Holds the backend lock (or nothing when this thread already holds it).
struct Entered<'a> {
    _guard: Option<MutexGuard<'a, ()>>,
    outer: bool,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if self.outer {
            HOLDING.with(|h| h.set(0));
        }
    }
}

fn dev_err(op: &'static str, reason: String) -> BackendError {
    BackendError::Device { op, device: "cuda".into(), reason }
}

/// The device memory behind a [`Buffer`].
fn cuda_buf<'a>(b: &'a Buffer, op: &'static str) -> Result<&'a DevMem, BackendError> {
    b.mem::<DevMem>(op)
}

/// The device memory of a loaded weight.
fn weight_mem<'a>(w: &'a Linear, op: &'static str) -> Result<&'a DevMem, BackendError> {
    match &w.data {
        WeightData::Device(m) => m.get::<DevMem>(op),
        WeightData::Host(_) => Err(BackendError::InvalidArgument { op, reason: format!("weight {} is not on the GPU", w.name) }),
    }
}

/// The device memory behind a [`KvLayer`]: K and V, `max_seq × kv_dim` f16 values each.
struct CudaKv {
    k: DevMem,
    v: DevMem,
}

fn check_len(op: &'static str, what: &str, have_bytes: usize, need: usize) -> Result<(), BackendError> {
    if have_bytes / 4 < need {
        return Err(BackendError::InvalidArgument { op, reason: format!("{what} holds {} values, needs {need}", have_bytes / 4) });
    }
    Ok(())
}

/// Kernel arguments: pointers to each value, as cuLaunchKernel wants them.
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(&$a as *const _ as *mut c_void),*] };
}

impl CudaBackend {
    /// Opens device `ordinal`: context, stream, cuBLAS, and the kernels (compiled or cached).
    pub fn new(ordinal: usize) -> Result<CudaBackend, BackendError> {
        let device = format!("cuda:{ordinal}");
        let na = |reason: String| BackendError::NotAvailable { device: device.clone(), reason };
        if let Some(reason) = unavailable_reason(ordinal) {
            return Err(na(reason));
        }
        let (nvrtc, cublas) = driver::libraries_present();
        if !nvrtc || !cublas {
            let missing = [(!nvrtc).then_some("NVRTC (libnvrtc.so)"), (!cublas).then_some("cuBLAS (libcublas.so)")];
            return Err(na(format!("the CUDA driver is present but {} is not", missing.into_iter().flatten().collect::<Vec<_>>().join(" and "))));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| na(err("creating a context", e)))?;
        let name = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        let (major, minor) = ctx.compute_capability().map_err(|e| na(err("compute capability", e)))?;
        let attr = |a| ctx.attribute(a).unwrap_or(0);
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) as usize;
        let host_ptr = attr(A::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM) == 1;
        let stream = ctx.new_stream().map_err(|e| na(err("creating a stream", e)))?;
        let blas = cudarc::cublas::result::create_handle().map_err(|e| na(format!("cublasCreate: {e:?}")))?;
        // SAFETY: a fresh handle and the backend's live stream.
        unsafe { cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _) }.map_err(|e| na(format!("cublasSetStream: {e:?}")))?;
        let arch = format!("sm_{major}{minor}");
        let ptx = driver::compile_cached(&kernel_source(), &arch, kernel_cache_dir()).map_err(na)?;
        let module = Module::load_ptx(&ctx, &ptx).map_err(na)?;
        let f = |n: &str| module.function(n).map_err(&na);
        let suffixes = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"];
        let (mut matvec, mut ffn) = ([std::ptr::null_mut(); 9], [std::ptr::null_mut(); 9]);
        for (i, suffix) in suffixes.iter().enumerate() {
            matvec[i] = f(&format!("matvec_{suffix}"))?;
            ffn[i] = f(&format!("ffn_{suffix}"))?;
        }
        let (mut dense, mut dense_ffn) = ([[std::ptr::null_mut(); 3]; 2], [[std::ptr::null_mut(); 3]; 2]);
        let (mut dense_fit, mut dense_ffn_fit) = ([[0; 3]; 2], [[0; 3]; 2]);
        for (i, suffix) in ["f16", "bf16"].iter().enumerate() {
            for (j, ch) in DENSE_CHUNKS.iter().enumerate() {
                dense[i][j] = f(&format!("dense_{suffix}_c{ch}"))?;
                dense_ffn[i][j] = f(&format!("dense_ffn_{suffix}_c{ch}"))?;
                dense_fit[i][j] = module.resident_blocks(dense[i][j], 256).map_err(&na)?;
                dense_ffn_fit[i][j] = module.resident_blocks(dense_ffn[i][j], 256).map_err(&na)?;
            }
        }
        let k = Kernels {
            embed: f("embed")?,
            dequant_rows: f("dequant_rows")?,
            matvec,
            ffn,
            dense,
            dense_ffn,
            dense_fit,
            dense_ffn_fit,
            matvec_any: f("matvec_any")?,
            rope_store: f("rope_store")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            silu_mul: f("silu_mul")?,
            add: f("add")?,
            kv_store: f("kv_store")?,
            attn_partial: f("attn_partial")?,
            attn_combine: f("attn_combine")?,
            attn_small: f("attn_small")?,
            act_prep: f("act_prep")?,
            copy_f32: f("copy_f32")?,
            argmax_f32: f("argmax_f32")?,
            to_half: f("to_half")?,
            _module: module,
        };
        let step_host = Pinned::alloc(&ctx, STEP_BYTES).map_err(na)?;
        let step_dev = DevMem::zeroed(&ctx, STEP_BYTES).map_err(na)?;
        let result_dev = DevMem::zeroed(&ctx, 16).map_err(na)?;
        let result_host = Pinned::alloc(&ctx, 16).map_err(na)?;
        // The switches (`DRIFTWOOD_CUDA_*`, see crate::options) are for comparisons. Staging Q8
        // activations per block is off by default: on an H200 the launch it saves costs less than
        // every block quantizing (SmolLM2-135M Q4_1 decode 1.056 vs 1.136 ms/token, Llama-3.2-1B
        // Q4_0 1.284 vs 1.454).
        let o = &crate::options::get().cuda;
        // Programmatic dependent launch needs Hopper (sm_90) or newer.
        let pdl = major >= 9 && o.pdl;
        Ok(CudaBackend {
            info: DeviceInfo {
                kind: DeviceKind::Cuda,
                name: format!("{device} ({name}, {arch}, {sms} SMs)"),
                can_use_host_pointer: host_ptr,
                parallelism: sms,
            },
            ctx,
            stream,
            blas: BlasHandle(blas),
            k,
            lock: Mutex::new(()),
            step_host,
            step_dev,
            pass: Mutex::new(PassState::default()),
            scratch: Mutex::new(Scratch::default()),
            graphs: Mutex::new(HashMap::new()),
            graph_clock: Mutex::new(0),
            copy_bufs: Mutex::new(Vec::new()),
            download_pin: Mutex::new(None),
            result_dev,
            result_host,
            rope_tables: Mutex::new(HashMap::new()),
            use_graphs: o.graphs,
            pdl,
            max_blocks: o.blocks_per_sm * sms,
            stage_q8_cols: o.stage_q8_cols,
            slice_cap: o.slice_cap,
            dense: o.dense,
            dense_per_sm: o.dense_per_sm,
            tensor_prefill: o.tensor_prefill,
            sms,
            identity_mapping: host_ptr,
        })
    }

    fn s(&self) -> CUstream {
        self.stream.cu_stream()
    }

    /// Takes the backend lock unless this thread holds it, and binds the context.
    fn enter(&self, op: &'static str) -> Result<Entered<'_>, BackendError> {
        let me = self as *const _ as usize;
        let entered = if HOLDING.with(|h| h.get()) == me {
            Entered { _guard: None, outer: false }
        } else {
            let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            HOLDING.with(|h| h.set(me));
            Entered { _guard: Some(guard), outer: true }
        };
        self.ctx.bind_to_thread().map_err(|e| dev_err(op, err("cuCtxSetCurrent", e)))?;
        Ok(entered)
    }

    fn sync(&self, op: &'static str) -> Result<(), BackendError> {
        self.stream.synchronize().map_err(|e| dev_err(op, err("cuStreamSynchronize", e)))
    }

    /// Launches `f` on the backend's stream.
    fn launch(&self, op: &'static str, f: CUfunction, grid: (u32, u32, u32), block: u32, args: &mut [*mut c_void]) -> Result<(), BackendError> {
        self.launch_smem(op, f, grid, block, 0, args)
    }

    /// [`CudaBackend::launch`] with `smem` bytes of dynamic shared memory.
    fn launch_smem(&self, op: &'static str, f: CUfunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &mut [*mut c_void]) -> Result<(), BackendError> {
        if !self.pdl {
            // SAFETY: `f` is a kernel of the loaded module; `args` point to values of the types the
            // kernel declares (each call site mirrors the kernel signature in kernels.cu) that
            // live until this call returns (the driver copies them at launch).
            return unsafe { result::launch_kernel(f, grid, (block, 1, 1), smem, self.s(), args) }.map_err(|e| dev_err(op, err("cuLaunchKernel", e)));
        }
        use cudarc::driver::sys;
        // SAFETY: an all-zero launch attribute is a valid (empty) value; the fields are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.s(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above; every kernel in kernels.cu calls `pdl_wait` before it reads what an
        // earlier kernel wrote, which is what this attribute requires.
        unsafe { sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(|e| dev_err(op, err("cuLaunchKernelEx", e)))
    }

    /// Writes `pos0`/`tokens` into the Step record (copied on the stream) unless a pass already
    /// did. `tokens: None` keeps the ids (ops that only need the position).
    fn stage_step(&self, op: &'static str, pos0: usize, n: usize, tokens: Option<&[u32]>) -> Result<(), BackendError> {
        {
            let pass = self.pass.lock().unwrap_or_else(|e| e.into_inner());
            if pass.active {
                if pass.pos0 != pos0 || pass.n != n {
                    return Err(BackendError::InvalidArgument { op, reason: format!("pass is at {}+{}, op asked for {pos0}+{n}", pass.pos0, pass.n) });
                }
                return Ok(());
            }
        }
        self.write_step(op, pos0, n, tokens)?;
        self.copy_step(op)
    }

    /// Fills the pinned Step record (after the stream has consumed the previous one).
    fn write_step(&self, op: &'static str, pos0: usize, n: usize, tokens: Option<&[u32]>) -> Result<(), BackendError> {
        if n > STEP_TOKENS {
            return Err(BackendError::InvalidArgument { op, reason: format!("{n} tokens in one pass exceed {STEP_TOKENS}") });
        }
        self.sync(op)?;
        let p = self.step_host.ptr();
        // SAFETY: the pinned record is STEP_BYTES long and no copy from it is in flight (synced).
        unsafe {
            (p as *mut i32).write(pos0 as i32);
            (p.add(4) as *mut i32).write(n as i32);
            if let Some(t) = tokens {
                std::ptr::copy_nonoverlapping(t.as_ptr(), p.add(8) as *mut u32, t.len().min(STEP_TOKENS));
            }
        }
        Ok(())
    }

    fn copy_step(&self, op: &'static str) -> Result<(), BackendError> {
        // SAFETY: pinned source and device destination are both STEP_BYTES long.
        unsafe { cudarc::driver::sys::cuMemcpyHtoDAsync_v2(self.step_dev.ptr(), self.step_host.ptr() as *const c_void, STEP_BYTES, self.s()) }
            .result()
            .map_err(|e| dev_err(op, err("cuMemcpyHtoDAsync", e)))
    }

    /// A scratch buffer of at least `bytes` (grown on demand; growing drops captured graphs).
    fn scratch(&self, op: &'static str, which: fn(&mut Scratch) -> &mut Option<DevMem>, bytes: usize) -> Result<CUdeviceptr, BackendError> {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let slot = which(&mut s);
        if let Some(m) = slot.as_ref() {
            if m.bytes() >= bytes {
                return Ok(m.ptr());
            }
        }
        self.sync(op)?;
        *slot = None;
        let m = DevMem::alloc(&self.ctx, bytes.next_power_of_two()).map_err(|e| dev_err(op, e))?;
        let ptr = m.ptr();
        *which(&mut s) = Some(m);
        s.generation += 1;
        Ok(ptr)
    }

    fn rope_table(&self, rope: &Rope) -> Result<CUdeviceptr, BackendError> {
        let key: Vec<u32> = rope.inv_freq.iter().map(|f| f.to_bits()).collect();
        let mut tables = self.rope_tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = tables.get(&key) {
            return Ok(m.ptr());
        }
        let m = self.upload_bytes("rope", bytemuck_f32(&rope.inv_freq))?;
        let ptr = m.ptr();
        tables.insert(key, m);
        Ok(ptr)
    }

    fn upload_bytes(&self, op: &'static str, bytes: &[u8]) -> Result<DevMem, BackendError> {
        let m = DevMem::alloc(&self.ctx, bytes.len()).map_err(|e| dev_err(op, e))?;
        // SAFETY: `m` holds exactly `bytes.len()` bytes.
        unsafe { result::memcpy_htod_sync(m.ptr(), bytes) }.map_err(|e| dev_err(op, err("cuMemcpyHtoD", e)))?;
        Ok(m)
    }

    /// `y[t] (+)= W · x[t]` for `n` tokens: matvec kernels for one token, dequantize + cuBLAS
    /// SGEMM for more.
    fn product(&self, ws: &[&Linear], x: CUdeviceptr, ys: &[CUdeviceptr], n: usize, add: bool) -> Result<(), BackendError> {
        let Some(first) = ws.first() else { return Ok(()) };
        let cols = first.cols;
        if n == 1 {
            let fusable = ws.len() <= 3 && ws.iter().all(|w| w.dtype == first.dtype && w.cols == cols);
            if fusable {
                return self.matvec(ws, x, ys, add, None);
            }
            for (w, &y) in ws.iter().zip(ys) {
                self.matvec(&[w], x, &[y], add, None)?;
            }
            return Ok(());
        }
        // Each weight sees the activations rounded as the CPU engine rounds them for its format;
        // q/k/v (or gate/up) of one format share one preparation.
        let mut prepared: Option<((ActFormat, usize), CUdeviceptr)> = None;
        for (w, &y) in ws.iter().zip(ys) {
            let kind = (w.dtype.activation(), w.cols);
            let xin = match prepared {
                _ if kind.0 == ActFormat::F32 => x,
                Some((k, p)) if k == kind => p,
                _ => {
                    let p = self.prepare(x, n, w.cols, None, w.dtype)?.y;
                    prepared = Some((kind, p));
                    p
                }
            };
            self.gemm_weights(w, xin, y, n, add)?;
        }
        Ok(())
    }

    /// [`dense_plan`] unless `DRIFTWOOD_CUDA_DENSE=0` turned the kernel off.
    /// Blocks per multiprocessor are capped at what fits of the compiled kernel.
    fn dense_plan(&self, w: &Linear, matrices: usize) -> Option<DensePlan> {
        let plan = if self.dense { dense_plan(w.dtype, w.rows, w.cols, matrices)? } else { return None };
        let per_sm = match self.dense_per_sm {
            Some(n) if plan.rows_per_group == 4 => n,
            _ => plan.per_sm,
        };
        let fit = if matrices == 2 { self.k.dense_ffn_fit } else { self.k.dense_fit }[plan.dtype][plan.chunks];
        Some(plan.fitted(per_sm, fit))
    }

    /// The row steps that bound a product's k-slices (`DRIFTWOOD_CUDA_SLICE_CAP=0`: no bound).
    fn steps_cap(&self, w: &Linear) -> usize {
        if self.slice_cap {
            warp_steps(w.dtype, w.cols)
        } else {
            8
        }
    }

    /// Blocks for a one-token product of `groups` row groups: at most `max_blocks` (about one
    /// wave), each block taking every gridDim-th group (see `matvec` in kernels.cu).
    fn product_blocks(&self, groups: usize) -> u32 {
        let cap = if self.max_blocks == 0 { groups } else { self.max_blocks };
        groups.min(cap).max(1) as u32
    }

    /// Runs `act_prep` on `n` tokens of `cols` activations into scratch: RMS-normalized with
    /// `norm` when given, then rounded as the CPU engine rounds activations for `dtype` weights.
    fn prepare(&self, x: CUdeviceptr, n: usize, cols: usize, norm: Option<(CUdeviceptr, f32)>, dtype: DType) -> Result<Prepared, BackendError> {
        let ak = dtype.activation();
        let (values, quants) = (n * cols * 4, (n * cols).next_multiple_of(16));
        let buf = self.scratch("matmul", |s| &mut s.act, values + quants + n * cols.div_ceil(32) * 8)?;
        let (y, q8, ds) = (buf, buf + values as u64, buf + (values + quants) as u64);
        let (q8, ds) = if ak.block_elems() > 1 { (q8, ds) } else { (0, 0) };
        let (nw, eps) = norm.unwrap_or((0, 0.0));
        let (c, aki) = (cols as i32, ak as i32);
        let units = cols.div_ceil(ak.block_elems().max(QK));
        self.launch("matmul", self.k.act_prep, (units.div_ceil(8) as u32, n as u32, 1), 256, &mut args![x, nw, eps, c, aki, y, q8, ds])?;
        Ok(Prepared { y, q8, ds })
    }

    /// One-token products; `norm`: (weight, eps) of an RMS norm fused in front (the caller checked
    /// [`fusable_norm`]).
    fn matvec(&self, ws: &[&Linear], x: CUdeviceptr, ys: &[CUdeviceptr], add: bool, norm: Option<(CUdeviceptr, f32)>) -> Result<(), BackendError> {
        self.matvec_rope(ws, x, ys, add, norm, NO_ROPE)
    }

    /// [`CudaBackend::matvec`] with an optional fused rotation + cache write (q/k/v only).
    fn matvec_rope(
        &self,
        ws: &[&Linear],
        x: CUdeviceptr,
        ys: &[CUdeviceptr],
        add: bool,
        norm: Option<(CUdeviceptr, f32)>,
        rs: RopeStore,
    ) -> Result<(), BackendError> {
        if !ws.iter().all(|w| fast_rows(w)) {
            // Callers fuse a norm only where `fusable_norm` holds, which implies fast rows.
            for (w, &y) in ws.iter().zip(ys) {
                let x = if w.dtype.activation() == ActFormat::F32 { x } else { self.prepare(x, 1, w.cols, None, w.dtype)?.y };
                let seg = Seg { w: weight_mem(w, "matmul")?.ptr(), y, rows: w.rows as i32 };
                let (dt, row_bytes, cols, add) = (w.dtype.kernel_code() as usize as i32, device_row_bytes(w.dtype, w.cols) as i64, w.cols as i32, add as i32);
                self.launch("matmul", self.k.matvec_any, (w.rows.div_ceil(8) as u32, 1, 1), 256, &mut args![seg, dt, row_bytes, cols, x, add])?;
            }
            return Ok(());
        }
        let mut segs = [EMPTY_SEG; 3];
        let mut rows = 0usize;
        for (i, (w, &y)) in ws.iter().zip(ys).enumerate() {
            segs[i] = Seg { w: weight_mem(w, "matmul")?.ptr(), y, rows: w.rows as i32 };
            rows += w.rows;
        }
        let w0 = ws[0];
        if let Some(plan) = self.dense_plan(w0, 1) {
            let (row_bytes, cols, add, (nw, eps)) = (device_row_bytes(w0.dtype, w0.cols) as i64, w0.cols as i32, add as i32, norm.unwrap_or((0, 0.0)));
            let (f, tl) = (self.k.dense[plan.dtype][plan.chunks], plan.tl);
            return self.launch(
                "matmul",
                f,
                (plan.blocks(rows, self.sms), 1, 1),
                256,
                &mut args![segs[0], segs[1], segs[2], row_bytes, cols, x, add, nw, eps, tl, rs],
            );
        }
        let row_bytes = device_row_bytes(w0.dtype, w0.cols) as i64;
        let cols = w0.cols as i32;
        let add = add as i32;
        // Pairs of rows, each pair on `slices` warps of an 8-warp block.
        let slices = k_slices(rows / 2, self.steps_cap(w0), self.max_blocks);
        let grid = self.product_blocks((rows / 2).div_ceil(8 / slices));
        let sl = slices as i32;
        let f = self.k.matvec[w0.dtype.kernel_code() as usize];
        let input = self.product_input(x, w0, norm)?;
        let (x, nw, eps, prep, xq, ds, smem) = (input.x, input.norm_w, input.eps, input.prep, input.xq, input.ds, input.smem);
        self.launch_smem("matmul", f, (grid, 1, 1), 256, smem, &mut args![segs[0], segs[1], segs[2], row_bytes, cols, x, add, nw, eps, sl, rs, prep, xq, ds])
    }

    /// How a one-token product kernel gets its input (see `stage_input` in kernels.cu). Each
    /// block stages it in shared memory, normalized and rounded, when a norm is fused or the
    /// format takes 8-bit activations and the row is narrow enough (`stage_q8_cols`) that
    /// quantizing it per block costs less than a launch of `act_prep`; otherwise `act_prep`
    /// prepares it once (K-quants always). Unnormalized F32/F16/BF16 input is rounded as it is read.
    fn product_input(&self, x: CUdeviceptr, w: &Linear, norm: Option<(CUdeviceptr, f32)>) -> Result<ProductInput, BackendError> {
        let (norm_w, eps) = norm.unwrap_or((0, 0.0));
        let plain = ProductInput { x, norm_w, eps, prep: 0, xq: 0, ds: 0, smem: 0 };
        let ak = w.dtype.activation();
        let staged = stage_bytes(w.cols, ak);
        let stage = match ak {
            ActFormat::Q8 => w.cols <= self.stage_q8_cols,
            ActFormat::Q8K => false,
            _ => norm.is_some(),
        };
        if stage && staged <= STAGE_LIMIT {
            return Ok(ProductInput { prep: 1, smem: staged as u32, ..plain });
        }
        if ak.block_elems() > 1 || norm.is_some() {
            let p = self.prepare(x, 1, w.cols, norm, w.dtype)?;
            return Ok(ProductInput { x: p.y, xq: p.q8, ds: p.ds, norm_w: 0, eps: 0.0, ..plain });
        }
        Ok(plain)
    }

    /// Prefill product. F16/BF16 weights multiply in place on the tensor cores (cublasGemmEx,
    /// 16-bit inputs, f32 accumulation: the activations are already rounded to 16 bits, so this
    /// is the same function as f32 arithmetic on them, up to the order of additions). Other
    /// formats are dequantized to f32 rows in scratch, then SGEMM.
    fn gemm_weights(&self, w: &Linear, x: CUdeviceptr, y: CUdeviceptr, n: usize, add: bool) -> Result<(), BackendError> {
        let wm = weight_mem(w, "matmul")?.ptr();
        let (rows, cols) = (w.rows, w.cols);
        if self.tensor_prefill && matches!(w.dtype, DType::F16 | DType::BF16) {
            let bf = (w.dtype == DType::BF16) as i32;
            let total = n * cols;
            let xh = self.scratch("matmul", |s| &mut s.half, total * 2)?;
            let ti = total as i64;
            self.launch("matmul", self.k.to_half, (total.div_ceil(256).min(65535) as u32, 1, 1), 256, &mut args![x, xh, ti, bf])?;
            let dt = if bf == 1 { cublas_sys::cudaDataType::CUDA_R_16BF } else { cublas_sys::cudaDataType::CUDA_R_16F };
            let (alpha, beta) = (1.0f32, if add { 1.0f32 } else { 0.0f32 });
            // Row-major Y[n][rows] = X[n][cols] · W[rows][cols]^T, as in the SGEMM below.
            // SAFETY: W holds rows×cols 16-bit values (its format), xh n×cols, y n×rows f32
            // (checked by callers); alpha/beta are f32 as the f32 compute type requires.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    self.blas.0,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    rows as i32,
                    n as i32,
                    cols as i32,
                    (&alpha as *const f32).cast(),
                    wm as *const c_void,
                    dt,
                    cols as i32,
                    xh as *const c_void,
                    dt,
                    cols as i32,
                    (&beta as *const f32).cast(),
                    y as *mut c_void,
                    cublas_sys::cudaDataType::CUDA_R_32F,
                    rows as i32,
                    cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
            .map_err(|e| dev_err("matmul", format!("cublasGemmEx: {e:?}")))?;
            return Ok(());
        }
        let row_bytes = device_row_bytes(w.dtype, cols) as i64;
        // Large matrices (the output projection) go in slabs of rows to bound the scratch.
        let slab = rows.min((64 << 20) / (4 * cols)).max(1);
        let scratch = self.scratch("matmul", |s| &mut s.weights, slab * cols * 4)?;
        let mut r0 = 0;
        while r0 < rows {
            let r = slab.min(rows - r0);
            let total = (r * cols) as u64;
            let grid = total.div_ceil(256).min(65535 * 8) as u32;
            let (dt, c, r0i, ri) = (w.dtype.kernel_code() as usize as i32, cols as i32, r0 as i64, r as i64);
            self.launch("matmul", self.k.dequant_rows, (grid, 1, 1), 256, &mut args![wm, dt, row_bytes, c, r0i, ri, scratch])?;
            // Row-major Y[n][rows] (ld rows) = X[n][cols] · W[r0..r0+r][cols]^T: in cuBLAS's
            // column-major terms, Y^T = W^T' · X^T with W read transposed.
            let (alpha, beta) = (1.0f32, if add { 1.0f32 } else { 0.0f32 });
            // SAFETY: scratch holds r×cols f32, x holds n×cols, y holds n×rows (checked by callers).
            unsafe {
                cudarc::cublas::result::sgemm(
                    self.blas.0,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    r as i32,
                    n as i32,
                    cols as i32,
                    &alpha,
                    scratch as *const f32,
                    cols as i32,
                    x as *const f32,
                    cols as i32,
                    &beta,
                    (y as *mut f32).add(r0),
                    rows as i32,
                )
            }
            .map_err(|e| dev_err("matmul", format!("cublasSgemm: {e:?}")))?;
            r0 += r;
        }
        Ok(())
    }

    /// Attention splits for a cache of `max_seq`: decode uses a fixed split count (so a captured
    /// graph fits every later position); each split covers `chunk` positions.
    fn splits(max_seq: usize, n_tokens: usize, ctx: usize) -> (usize, usize) {
        let span = if n_tokens == 1 { max_seq } else { ctx };
        // Up to 1024 positions one block per head is quicker than splitting and combining.
        if span <= 1024 {
            return (1, span.max(1));
        }
        let splits = span.div_ceil(256).clamp(1, if n_tokens == 1 { 64 } else { 8 });
        (splits, span.div_ceil(splits))
    }

    fn graph_tick(&self) -> u64 {
        let mut c = self.graph_clock.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        *c
    }
}

/// Warps that share a group of rows (1, 2, 4 or 8; the k-slices): enough that a launch has some
/// 4096 warps streaming weights, so small matrices still fill the GPU's memory pipeline.
/// No more warps than a row has loop steps (`steps`), so that every slice has work, and no more
/// than keep the row groups (8 / S row pairs or rows each) within one wave of `max_blocks` blocks
/// (0: no bound), so that no block works through two groups while others idle.
fn k_slices(row_groups: usize, steps: usize, max_blocks: usize) -> usize {
    let want = 4096usize.div_ceil(row_groups.max(1));
    let mut s = [1, 2, 4, 8].into_iter().find(|&s| s >= want).unwrap_or(8);
    while s > 1 && max_blocks > 0 && (row_groups * s).div_ceil(8) > max_blocks {
        s /= 2;
    }
    let most = [8, 4, 2, 1].into_iter().find(|&m| m <= steps.max(1)).unwrap_or(1);
    s.min(most)
}

/// Steps of row_dots' loop one warp needs for a whole row of `cols` values (kernels.cu's
/// `warp_step_bytes`): 128 f32 or 256 f16/bf16 values a step, 32 blocks of 32 for the rest.
fn warp_steps(d: DType, cols: usize) -> usize {
    cols.div_ceil(match d {
        DType::F32 => 128,
        DType::F16 | DType::BF16 => 256,
        _ => 1024,
    })
}

/// Chunks of 16 bytes a thread holds per row in `dense_mv`, by instance (kernels.cu's DENSE).
const DENSE_CHUNKS: [usize; 3] = [1, 2, 4];

/// A `dense_mv` launch: format index (F16, BF16), instance, log2 threads per row, rows per row
/// group, blocks per multiprocessor.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DensePlan {
    dtype: usize,
    chunks: usize,
    tl: i32,
    rows_per_group: usize,
    per_sm: usize,
}

impl DensePlan {
    /// This plan at `per_sm` blocks a multiprocessor, or at `fit` (the most that are resident at
    /// once, at least one) where fewer fit.
    fn fitted(self, per_sm: usize, fit: usize) -> DensePlan {
        DensePlan { per_sm: per_sm.min(fit.max(1)), ..self }
    }

    /// Blocks for `rows` rows: one per block step (256 / threads-per-row groups of
    /// `rows_per_group` rows), at most `per_sm` per multiprocessor; blocks stride over the rest.
    fn blocks(&self, rows: usize, sms: usize) -> u32 {
        let groups_per_block = 256 >> self.tl;
        let steps = rows.div_ceil(self.rows_per_group).div_ceil(groups_per_block);
        steps.min(self.per_sm * sms).max(1) as u32
    }
}

/// How `dense_mv` multiplies a `rows × cols` weight (with `matrices` = 2 its twin too: gate and
/// up), if it can: F16/BF16 rows of whole 16-byte chunks, at most 8192 values, in pairs.
fn dense_plan(dtype: DType, rows: usize, cols: usize, matrices: usize) -> Option<DensePlan> {
    let dtype = match dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        _ => return None,
    };
    if !cols.is_multiple_of(8) || !rows.is_multiple_of(2) {
        return None;
    }
    let chunks = cols / 8;
    // Threads per row: a power of two from 32 to 256 covering the row in one chunk each, or 256
    // with 2 or 4 chunks each.
    let (ch, tpr) = match chunks {
        0..=256 => (1, chunks.next_power_of_two().max(32)),
        257..=512 => (2, 256),
        513..=1024 => (4, 256),
        _ => return None,
    };
    let chunks = DENSE_CHUNKS.iter().position(|&c| c == ch)?;
    // Rows a group: 4 where a thread holds one chunk of one matrix, else 2 (kernels.cu's DENSE).
    // Blocks a multiprocessor: 4 where a thread holds one chunk a row (16 KB in flight a block),
    // else 2 (their registers allow no more), which measured fastest on an H200 (bench/gemv, and
    // Llama-3.2-1B decode: 2, 3, 4, 5, 6 blocks gave 877, 944, 957, 923, 938 tok/s).
    let rows_per_group = if matrices == 1 && ch == 1 { 4 } else { 2 };
    let per_sm = if ch == 1 { 4 } else { 2 };
    Some(DensePlan { dtype, chunks, tl: tpr.trailing_zeros() as i32, rows_per_group, per_sm })
}

/// Downloads of at least this many bytes go through pinned staging memory.
const DOWNLOAD_STAGED: usize = 64 * 1024;

/// Shared memory a block gets without opting in: the most a product kernel stages.
const STAGE_LIMIT: usize = 48 * 1024;

/// Bytes a product kernel stages for an input of `cols` values of activation kind `ak`: f32
/// values, or for 8-bit blocks the quants (padded to 16 bytes) and a (d, s) pair per block.
fn stage_bytes(cols: usize, ak: ActFormat) -> usize {
    if ak == ActFormat::Q8 {
        cols.next_multiple_of(16) + cols / 32 * 8
    } else {
        4 * cols
    }
}

/// A one-token product's input arguments (see [`CudaBackend::product_input`]).
struct ProductInput {
    x: CUdeviceptr,
    norm_w: CUdeviceptr,
    eps: f32,
    prep: i32,
    xq: CUdeviceptr,
    ds: CUdeviceptr,
    smem: u32,
}

/// Activations `act_prep` wrote: rounded values, and for 8-bit activations the quants and a pair
/// per 32 values: (d, s) of each Q8 block, or (d of the super-block, sum of the group's quants)
/// for Q8_K (0 otherwise).
struct Prepared {
    y: CUdeviceptr,
    q8: CUdeviceptr,
    ds: CUdeviceptr,
}

/// Whether the one-token kernels can fuse an RMS norm in front: the staged input must fit the
/// shared memory a block gets without opting in.
fn fusable_norm(ws: &[&Linear]) -> bool {
    let first = ws[0];
    ws.len() <= 3 && stage_bytes(first.cols, ActFormat::F32) <= STAGE_LIMIT && ws.iter().all(|w| fast_rows(w) && w.dtype == first.dtype && w.cols == first.cols)
}

/// Formats whose rows are stored on the device in the repacked layout of kernels.cu: each row's
/// block quants first, then the block scales, padded to 16 bytes.
fn repacked(d: DType) -> bool {
    matches!(d, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
}

/// Bytes per row in device memory: the GGUF row size, padded to 16 for repacked formats.
fn device_row_bytes(d: DType, cols: usize) -> usize {
    let bytes = d.row_bytes(cols).unwrap_or(0);
    if repacked(d) {
        bytes.next_multiple_of(16)
    } else {
        bytes
    }
}

/// GGUF rows of a repacked format (Q4_0: [d f16][16 quant bytes], Q4_1: [d][m][16], Q8_0: [d][32])
/// rearranged as kernels.cu reads them: per row, every block's quant bytes in order, then every
/// block's scale bytes (d, or d and m), then zero padding up to [`device_row_bytes`].
fn repack_rows(d: DType, cols: usize, src: &[u8]) -> Result<Vec<u8>, String> {
    let (block, scale) = (d.block_bytes(), if d == DType::Q4_1 { 4 } else { 2 });
    let (quants, nb) = (block - scale, cols / 32);
    let (row, dev_row) = (nb * block, device_row_bytes(d, cols));
    if !cols.is_multiple_of(32) || row == 0 || !src.len().is_multiple_of(row) {
        return Err(format!("{} bytes are not whole rows of {cols} {d} values", src.len()));
    }
    let mut out = vec![0u8; src.len() / row * dev_row];
    for (s, o) in src.chunks_exact(row).zip(out.chunks_exact_mut(dev_row)) {
        let (qs, sc) = o.split_at_mut(nb * quants);
        for (b, blk) in s.chunks_exact(block).enumerate() {
            sc[b * scale..(b + 1) * scale].copy_from_slice(&blk[..scale]);
            qs[b * quants..(b + 1) * quants].copy_from_slice(&blk[scale..]);
        }
    }
    Ok(out)
}

/// Whether the specialized matvec kernels can read this weight's rows (16-byte aligned dense rows).
fn fast_rows(w: &Linear) -> bool {
    // The kernels also take rows in pairs.
    w.rows.is_multiple_of(2)
        && match w.dtype {
            DType::F32 => w.cols.is_multiple_of(4),
            DType::F16 | DType::BF16 => w.cols.is_multiple_of(8),
            _ => true,
        }
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns as bytes; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn bytemuck_u16(v: &[u16]) -> &[u8] {
    // SAFETY: as above, for u16.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

impl DeviceBuffer for DevMem {
    fn len(&self) -> usize {
        self.bytes()
    }
}

impl Device for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn share_region(&self, region: &Region) -> Result<(), BackendError> {
        let regs = Registrations::new(&self.ctx);
        let page = page_size();
        region
            .add_grow_hook(Box::new(move |base, old, new| {
                let (from, to) = (old.div_ceil(page) * page, new.div_ceil(page) * page);
                if to > from {
                    // SAFETY: `from..to` was just committed by the region and stays mapped until
                    // the region drops this hook (and with it `regs`, which unregisters).
                    regs.register(unsafe { base.add(from) }, to - from)?;
                }
                Ok(())
            }))
            .map_err(|e| dev_err("share_region", e.to_string()))
    }

    fn device_ptr(&self, host: *const u8) -> Result<usize, BackendError> {
        let _e = self.enter("device_ptr")?;
        driver::device_pointer(host).map_err(|e| dev_err("device_ptr", e))
    }

    unsafe fn gemm_shared(&self, a: *const f32, b: *const f32, c: *mut f32, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        check_gemm_dims(m * k, k * n, m * n, m, n, k)?;
        let _e = self.enter("gemm")?;
        let dev = |p: *const f32| -> Result<usize, BackendError> {
            if self.identity_mapping {
                Ok(p as usize)
            } else {
                driver::device_pointer(p.cast()).map_err(|e| dev_err("gemm", e))
            }
        };
        let (da, db, dc) = (dev(a)?, dev(b)?, dev(c)?);
        self.sgemm_row_major(da, db, dc, m, n, k)?;
        self.sync("gemm")
    }

    unsafe fn write_shared(&self, src: &Buffer, dst: *mut f32, n: usize) -> Result<bool, BackendError> {
        if n == 0 {
            return Ok(true);
        }
        let _e = self.enter("write_shared")?;
        let m = cuda_buf(src, "write_shared")?;
        check_len("write_shared", "source", m.bytes(), n)?;
        // Both ends must be registered and map to one contiguous device range (they always do
        // where device pointers equal host pointers); otherwise the caller copies.
        // SAFETY: `dst..dst + n` is valid (caller); only its addresses are looked up here.
        let last = unsafe { dst.add(n - 1) };
        let (Ok(first), Ok(end)) = (driver::device_pointer(dst.cast()), driver::device_pointer(last.cast())) else { return Ok(false) };
        if end != first + 4 * (n - 1) {
            return Ok(false);
        }
        let (sp, dp, ni) = (m.ptr(), first as CUdeviceptr, n as i64);
        self.launch("write_shared", self.k.copy_f32, (n.div_ceil(256).min(1024) as u32, 1, 1), 256, &mut args![sp, dp, ni])?;
        self.sync("write_shared")?;
        Ok(true)
    }

    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        match self.enter("install") {
            Ok(_e) => f(),
            // A context that cannot be bound fails every op inside with the same error.
            Err(_) => f(),
        }
    }
}

impl Probes for CudaBackend {
    fn gemm_copied(&self, a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        check_gemm_dims(a.len(), b.len(), c.len(), m, n, k)?;
        let _e = self.enter("gemm")?;
        let need = [m * k * 4, k * n * 4, m * n * 4];
        let mut bufs = self.copy_bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() != 3 || bufs.iter().zip(need).any(|(b, n)| b.bytes() < n) {
            bufs.clear();
            for bytes in need {
                bufs.push(DevMem::alloc(&self.ctx, bytes).map_err(|e| dev_err("gemm", e))?);
            }
        }
        let op = |e| dev_err("gemm", err("cuMemcpy", e));
        // The operands may lie in actor memory, which is registered chunk by chunk as it grew,
        // and the driver refuses a copy that spans two registrations: stage through ordinary
        // host memory, as a program without zero-copy would.
        let (ha, hb) = (a[..m * k].to_vec(), b[..k * n].to_vec());
        let mut hc = vec![0f32; m * n];
        // SAFETY: each device buffer holds at least the bytes copied into or out of it.
        unsafe {
            result::memcpy_htod_sync(bufs[0].ptr(), &ha).map_err(op)?;
            result::memcpy_htod_sync(bufs[1].ptr(), &hb).map_err(op)?;
        }
        self.sgemm_row_major(bufs[0].ptr() as usize, bufs[1].ptr() as usize, bufs[2].ptr() as usize, m, n, k)?;
        self.sync("gemm")?;
        // SAFETY: as above.
        unsafe { result::memcpy_dtoh_sync(&mut hc, bufs[2].ptr()) }.map_err(op)?;
        c[..m * n].copy_from_slice(&hc);
        Ok(())
    }

    fn device_memory_used(&self) -> Option<usize> {
        let _e = self.enter("memory").ok()?;
        self.sync("memory").ok()?;
        result::mem_get_info().ok().map(|(free, total)| total - free)
    }

    fn memory_bandwidth(&self) -> Option<f64> {
        let _e = self.enter("bandwidth").ok()?;
        const BYTES: usize = 1 << 30;
        const COPIES: usize = 8;
        let (src, dst) = (DevMem::zeroed(&self.ctx, BYTES).ok()?, DevMem::zeroed(&self.ctx, BYTES).ok()?);
        // Timed with device events: a host clock also counts the host's scheduling (a busy CPU
        // halved this figure once).
        use cudarc::driver::{result::event, sys::CUevent_flags};
        let (start, end) = (event::create(CUevent_flags::CU_EVENT_DEFAULT).ok()?, event::create(CUevent_flags::CU_EVENT_DEFAULT).ok()?);
        let mut samples = Vec::new();
        for _ in 0..5 {
            // SAFETY: both events and buffers are live; each copy stays inside BYTES.
            let ms = unsafe {
                event::record(start, self.s()).ok()?;
                for _ in 0..COPIES {
                    result::memcpy_dtod_async(dst.ptr(), src.ptr(), BYTES, self.s()).ok()?;
                }
                event::record(end, self.s()).ok()?;
                self.sync("bandwidth").ok()?;
                event::elapsed(start, end).ok()?
            };
            samples.push(f64::from(ms) / 1e3);
        }
        // SAFETY: the stream is synchronized; nothing uses the events any more.
        unsafe {
            let _ = event::destroy(start);
            let _ = event::destroy(end);
        }
        let secs = crate::numeric::median_ms(&mut samples[1..]);
        Some((2 * BYTES * COPIES) as f64 / secs / 1e9)
    }

    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn DeviceBuffer>, BackendError> {
        let _e = self.enter("upload")?;
        Ok(Box::new(self.upload_bytes("upload", bytes)?))
    }
}

impl ModelOps for CudaBackend {
    fn forward_pass(&self, state: u64, tokens: &[u32], pos0: usize, pass: &mut dyn FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
        let _e = self.enter("forward")?;
        self.write_step("forward", pos0, tokens.len(), Some(tokens))?;
        *self.pass.lock().unwrap_or_else(|e| e.into_inner()) = PassState { active: true, pos0, n: tokens.len() };
        let result = self.run_pass(state, tokens.len(), pass);
        self.pass.lock().unwrap_or_else(|e| e.into_inner()).active = false;
        result
    }

    fn buffer(&self, len: usize) -> Result<Buffer, BackendError> {
        let _e = self.enter("buffer")?;
        Ok(Buffer::new(len, DevMem::zeroed(&self.ctx, len * 4).map_err(|e| dev_err("buffer", e))?))
    }

    fn upload_f32(&self, data: &[f32]) -> Result<Buffer, BackendError> {
        let _e = self.enter("upload")?;
        Ok(Buffer::new(data.len(), self.upload_bytes("upload", bytemuck_f32(data))?))
    }

    fn download(&self, buf: &Buffer, out: &mut [f32]) -> Result<(), BackendError> {
        let _e = self.enter("download")?;
        let m = cuda_buf(buf, "download")?;
        check_len("download", "buffer", m.bytes(), out.len())?;
        let bytes = out.len() * 4;
        if bytes < DOWNLOAD_STAGED {
            self.sync("download")?;
            // SAFETY: the buffer holds at least `out.len()` values.
            return unsafe { result::memcpy_dtoh_sync(out, m.ptr()) }.map_err(|e| dev_err("download", err("cuMemcpyDtoH", e)));
        }
        // Large results (a vocabulary of logits) go through pinned memory: queued behind the
        // pass, one synchronization, and a DMA straight into host memory, where a copy into
        // pageable memory is staged in pieces by the driver (about 0.1 ms for 128k logits).
        let mut pin = self.download_pin.lock().unwrap_or_else(|e| e.into_inner());
        if pin.as_ref().is_none_or(|(_, cap)| *cap < bytes) {
            *pin = None;
            let cap = bytes.next_power_of_two();
            *pin = Some((Pinned::alloc(&self.ctx, cap).map_err(|e| dev_err("download", e))?, cap));
        }
        let (staging, _) = pin.as_ref().expect("allocated above");
        // SAFETY: the pinned buffer holds at least `bytes` (4 * out.len()), f32-aligned (page
        // aligned), and only this call, under the lock, touches it.
        let staged = unsafe { std::slice::from_raw_parts_mut(staging.ptr().cast::<f32>(), out.len()) };
        // SAFETY: the device buffer holds at least `out.len()` values (checked above); the stream
        // is synchronized before the staging buffer is read or reused.
        unsafe { result::memcpy_dtoh_async(staged, m.ptr(), self.s()) }.map_err(|e| dev_err("download", err("cuMemcpyDtoHAsync", e)))?;
        self.sync("download")?;
        out.copy_from_slice(staged);
        Ok(())
    }

    fn argmax(&self, buf: &Buffer, n: usize) -> Result<u32, BackendError> {
        let _e = self.enter("argmax")?;
        let m = cuda_buf(buf, "argmax")?;
        check_len("argmax", "buffer", m.bytes(), n)?;
        let (x, ni, key) = (m.ptr(), n as i64, self.result_dev.ptr());
        // SAFETY: result_dev holds 16 bytes; the memset is ordered before the kernel on the stream.
        unsafe { cudarc::driver::sys::cuMemsetD32Async(key, 0, 2, self.s()) }.result().map_err(|e| dev_err("argmax", err("cuMemsetD32Async", e)))?;
        let blocks = n.div_ceil(256 * 8).clamp(1, 4 * self.sms) as u32;
        self.launch("argmax", self.k.argmax_f32, (blocks, 1, 1), 256, &mut args![x, ni, key])?;
        let host = self.result_host.ptr().cast::<u64>();
        // SAFETY: both ends hold 16 bytes; the stream is synchronized before the host reads it,
        // and only this call (under the backend lock) uses the pinned buffer.
        unsafe { cudarc::driver::sys::cuMemcpyDtoHAsync_v2(host.cast(), key, 8, self.s()) }
            .result()
            .map_err(|e| dev_err("argmax", err("cuMemcpyDtoHAsync", e)))?;
        self.sync("argmax")?;
        // SAFETY: written by the copy above, which the synchronization completed.
        let key = unsafe { host.read() };
        // The low half holds the complemented index of the winner; 0: nothing beat -inf.
        Ok(if key == 0 { 0 } else { !(key as u32) })
    }

    fn load_linear(&self, w: Linear) -> Result<Linear, BackendError> {
        let _e = self.enter("load")?;
        let mem = match &w.data {
            WeightData::Host(bytes) if repacked(w.dtype) => {
                let packed = repack_rows(w.dtype, w.cols, bytes)
                    .map_err(|reason| BackendError::InvalidArgument { op: "load", reason: format!("{}: {reason}", w.name) })?;
                self.upload_bytes("load", &packed)?
            }
            WeightData::Host(bytes) => self.upload_bytes("load", bytes)?,
            WeightData::Device(_) => return Ok(w),
        };
        Ok(Linear { data: WeightData::Device(Arc::new(Handle::new(mem))), ..w })
    }

    fn kv_layer(&self, max_seq: usize, kv_dim: usize) -> Result<KvLayer, BackendError> {
        let _e = self.enter("kv_layer")?;
        let bytes = max_seq * kv_dim * 2;
        let alloc = || DevMem::zeroed(&self.ctx, bytes).map_err(|e| dev_err("kv_layer", e));
        Ok(KvLayer::new(max_seq, kv_dim, CudaKv { k: alloc()?, v: alloc()? }))
    }

    fn embed(&self, table: &Linear, tokens: &[u32], out: &mut Buffer) -> Result<(), BackendError> {
        let _e = self.enter("embed")?;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(BackendError::InvalidArgument { op: "embed", reason: format!("token id {id} is outside the vocabulary of {}", table.rows) });
        }
        let o = cuda_buf(out, "embed")?;
        check_len("embed", "output", o.bytes(), tokens.len() * table.cols)?;
        // Embedding needs the token ids, not a position: keep the pass's (or the last) position.
        let pos0 = self.pass.lock().unwrap_or_else(|e| e.into_inner()).pos0;
        self.stage_step("embed", pos0, tokens.len(), Some(tokens))?;
        let (dt, rb, cols) = (table.dtype.kernel_code() as usize as i32, device_row_bytes(table.dtype, table.cols) as i64, table.cols as i32);
        let (tbl, step, op) = (weight_mem(table, "embed")?.ptr(), self.step_dev.ptr(), o.ptr());
        let grid = (table.cols.div_ceil(256) as u32, tokens.len() as u32, 1);
        self.launch("embed", self.k.embed, grid, 256, &mut args![tbl, dt, rb, cols, step, op])
    }

    fn rms_norm(&self, x: &Buffer, w: &Buffer, out: &mut Buffer, rows: usize, dim: usize, eps: f32) -> Result<(), BackendError> {
        let _e = self.enter("rms_norm")?;
        let (xm, wm, om) = (cuda_buf(x, "rms_norm")?, cuda_buf(w, "rms_norm")?, cuda_buf(out, "rms_norm")?);
        check_len("rms_norm", "input", xm.bytes(), rows * dim)?;
        check_len("rms_norm", "output", om.bytes(), rows * dim)?;
        check_len("rms_norm", "weight", wm.bytes(), dim)?;
        let (xp, wp, op, d) = (xm.ptr(), wm.ptr(), om.ptr(), dim as i32);
        let block = if dim >= 1024 { 1024 } else { dim.div_ceil(32).max(1) as u32 * 32 };
        self.launch("rms_norm", self.k.rms_norm, (rows as u32, 1, 1), block, &mut args![xp, wp, op, d, eps])
    }

    fn matmul(&self, w: &Linear, x: &Buffer, out: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
        self.matmul_many(&[w], x, &mut [out], n_tokens)
    }

    fn matmul_many(&self, ws: &[&Linear], x: &Buffer, outs: &mut [&mut Buffer], n_tokens: usize) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        let xm = cuda_buf(x, "matmul")?;
        let mut ys = [0 as CUdeviceptr; 8];
        if ws.len() > ys.len() || ws.len() != outs.len() {
            return Err(BackendError::InvalidArgument { op: "matmul", reason: format!("{} weights for {} outputs", ws.len(), outs.len()) });
        }
        for (i, (w, out)) in ws.iter().zip(outs.iter()).enumerate() {
            check_len("matmul", "input", xm.bytes(), n_tokens * w.cols)?;
            let o = cuda_buf(out, "matmul")?;
            check_len("matmul", &w.name, o.bytes(), n_tokens * w.rows)?;
            ys[i] = o.ptr();
        }
        self.product(ws, xm.ptr(), &ys[..ws.len()], n_tokens, false)
    }

    fn rope(&self, x: &mut Buffer, rope: &Rope, n_tokens: usize, n_heads: usize, pos0: usize) -> Result<(), BackendError> {
        let _e = self.enter("rope")?;
        let xm = cuda_buf(x, "rope")?;
        check_len("rope", "input", xm.bytes(), n_tokens * n_heads * rope.head_dim)?;
        self.stage_step("rope", pos0, n_tokens, None)?;
        let table = self.rope_table(rope)?;
        let (xp, n, h, hd, hs, step) =
            (xm.ptr(), n_tokens as i32, n_heads as i32, rope.head_dim as i32, (rope.style == RopeStyle::HalfSplit) as i32, self.step_dev.ptr());
        let total = n_tokens * n_heads * rope.head_dim / 2;
        self.launch("rope", self.k.rope, (total.div_ceil(256) as u32, 1, 1), 256, &mut args![xp, table, n, h, hd, hs, step])
    }

    fn attention(&self, q: &Buffer, k: &Buffer, v: &Buffer, kv: &mut KvLayer, out: &mut Buffer, s: AttentionShape) -> Result<(), BackendError> {
        let _e = self.enter("attention")?;
        let (kc, vc, max_seq) = self.check_attention(q, k, v, kv, out, s)?;
        let (kp, vp, step, ni, kvd) =
            (cuda_buf(k, "attention")?.ptr(), cuda_buf(v, "attention")?.ptr(), self.step_dev.ptr(), s.n_tokens as i32, (s.n_kv_heads * s.head_dim) as i32);
        let total = (s.n_tokens * s.n_kv_heads * s.head_dim) as u32;
        self.launch("attention", self.k.kv_store, (total.div_ceil(256), 1, 1), 256, &mut args![kp, vp, kc, vc, ni, kvd, step])?;
        self.attend(cuda_buf(q, "attention")?.ptr(), kc, vc, cuda_buf(out, "attention")?.ptr(), max_seq, s)
    }

    fn silu_mul(&self, gate: &mut Buffer, up: &Buffer, n: usize) -> Result<(), BackendError> {
        let _e = self.enter("silu_mul")?;
        let (g, u) = (cuda_buf(gate, "silu_mul")?, cuda_buf(up, "silu_mul")?);
        check_len("silu_mul", "gate", g.bytes(), n)?;
        check_len("silu_mul", "up", u.bytes(), n)?;
        let (gp, up_, ni) = (g.ptr(), u.ptr(), n as i64);
        self.launch("silu_mul", self.k.silu_mul, (n.div_ceil(256).min(65535) as u32, 1, 1), 256, &mut args![gp, up_, ni])
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, n: usize) -> Result<(), BackendError> {
        let _e = self.enter("add")?;
        let (xm, ym) = (cuda_buf(x, "add")?, cuda_buf(y, "add")?);
        check_len("add", "x", xm.bytes(), n)?;
        check_len("add", "y", ym.bytes(), n)?;
        let (xp, yp, ni) = (xm.ptr(), ym.ptr(), n as i64);
        self.launch("add", self.k.add, (n.div_ceil(256).min(65535) as u32, 1, 1), 256, &mut args![xp, yp, ni])
    }

    fn copy(&self, src: &Buffer, src_off: usize, dst: &mut Buffer, dst_off: usize, n: usize) -> Result<(), BackendError> {
        let _e = self.enter("copy")?;
        let (sm, dm) = (cuda_buf(src, "copy")?, cuda_buf(dst, "copy")?);
        check_len("copy", "source", sm.bytes(), src_off + n)?;
        check_len("copy", "destination", dm.bytes(), dst_off + n)?;
        // SAFETY: both ranges were checked against their buffers.
        unsafe { result::memcpy_dtod_async(dm.ptr() + (dst_off * 4) as u64, sm.ptr() + (src_off * 4) as u64, n * 4, self.s()) }
            .map_err(|e| dev_err("copy", err("cuMemcpyDtoDAsync", e)))
    }

    fn kv_export(&self, kv: &KvLayer, len: usize, k: &mut [u16], v: &mut [u16]) -> Result<(), BackendError> {
        let _e = self.enter("kv_export")?;
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CudaKv { k: kc, v: vc } = kv.mem::<CudaKv>("kv_export")?;
        let n = len * kv_dim;
        if len > *max_seq || k.len() < n || v.len() < n {
            return Err(BackendError::InvalidArgument { op: "kv_export", reason: format!("{len} positions of {kv_dim} do not fit") });
        }
        self.sync("kv_export")?;
        let e = |e| dev_err("kv_export", err("cuMemcpyDtoH", e));
        // SAFETY: both caches hold max_seq × kv_dim values, of which the first n are read.
        unsafe {
            result::memcpy_dtoh_sync(&mut k[..n], kc.ptr()).map_err(e)?;
            result::memcpy_dtoh_sync(&mut v[..n], vc.ptr()).map_err(e)
        }
    }

    fn kv_import(&self, kv: &mut KvLayer, len: usize, k: &[u16], v: &[u16]) -> Result<(), BackendError> {
        let _e = self.enter("kv_import")?;
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CudaKv { k: kc, v: vc } = kv.mem::<CudaKv>("kv_import")?;
        let n = len * *kv_dim;
        if len > *max_seq || k.len() < n || v.len() < n {
            return Err(BackendError::InvalidArgument { op: "kv_import", reason: format!("{len} positions of {kv_dim} do not fit a cache of {max_seq}") });
        }
        self.sync("kv_import")?;
        let e = |e| dev_err("kv_import", err("cuMemcpyHtoD", e));
        // SAFETY: as in kv_export.
        unsafe {
            result::memcpy_htod_sync(kc.ptr(), bytemuck_u16(&k[..n])).map_err(e)?;
            result::memcpy_htod_sync(vc.ptr(), bytemuck_u16(&v[..n])).map_err(e)
        }
    }
}

impl FusedOps for CudaBackend {
    fn matmul_add(&self, w: &Linear, x: &Buffer, out: &mut Buffer, _scratch: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        let (xm, om) = (cuda_buf(x, "matmul")?, cuda_buf(out, "matmul")?);
        check_len("matmul", "input", xm.bytes(), n_tokens * w.cols)?;
        check_len("matmul", &w.name, om.bytes(), n_tokens * w.rows)?;
        self.product(&[w], xm.ptr(), &[om.ptr()], n_tokens, true)
    }

    fn norm_matmul_many(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        ws: &[&Linear],
        outs: &mut [&mut Buffer],
        n_tokens: usize,
    ) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        if n_tokens != 1 || ws.is_empty() || !fusable_norm(ws) || ws.len() != outs.len() {
            let cols = ws.first().map(|w| w.cols).unwrap_or(0);
            self.rms_norm(x, norm.weight, xn, n_tokens, cols, norm.eps)?;
            return self.matmul_many(ws, xn, outs, n_tokens);
        }
        let (xm, nm) = (cuda_buf(x, "matmul")?, cuda_buf(norm.weight, "matmul")?);
        check_len("matmul", "input", xm.bytes(), ws[0].cols)?;
        check_len("matmul", "norm", nm.bytes(), ws[0].cols)?;
        let mut ys = [0 as CUdeviceptr; 3];
        for (i, (w, out)) in ws.iter().zip(outs.iter()).enumerate() {
            let o = cuda_buf(out, "matmul")?;
            check_len("matmul", &w.name, o.bytes(), w.rows)?;
            ys[i] = o.ptr();
        }
        self.matvec(ws, xm.ptr(), &ys[..ws.len()], false, Some((nm.ptr(), norm.eps)))
    }

    fn attention_block(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        w: [&Linear; 3],
        qkv: [&mut Buffer; 3],
        rope: &Rope,
        kv: &mut KvLayer,
        out: &mut Buffer,
        s: AttentionShape,
    ) -> Result<(), BackendError> {
        let _e = self.enter("attention")?;
        let [q, k, v] = qkv;
        // Fused for one token with GGUF's pair layout (rows 2i, 2i+1 rotate together).
        let fusable = s.n_tokens == 1 && rope.style == RopeStyle::Interleaved && rope.head_dim == s.head_dim && fusable_norm(&w);
        if !fusable {
            self.norm_matmul_many(x, norm, xn, &w, &mut [&mut *q, &mut *k, &mut *v], s.n_tokens)?;
            return self.rope_attention(q, k, v, rope, kv, out, s);
        }
        let (kc, vc, max_seq) = self.check_attention(q, k, v, kv, out, s)?;
        let (xm, nm) = (cuda_buf(x, "attention")?, cuda_buf(norm.weight, "attention")?);
        check_len("attention", "input", xm.bytes(), w[0].cols)?;
        check_len("attention", "norm", nm.bytes(), w[0].cols)?;
        let ys = [cuda_buf(q, "attention")?.ptr(), cuda_buf(k, "attention")?.ptr(), cuda_buf(v, "attention")?.ptr()];
        let rs = RopeStore {
            inv_freq: self.rope_table(rope)?,
            kc,
            vc,
            kv_dim: (s.n_kv_heads * s.head_dim) as i32,
            head_dim: s.head_dim as i32,
            step: self.step_dev.ptr(),
        };
        self.matvec_rope(&w, xm.ptr(), &ys, false, Some((nm.ptr(), norm.eps)), rs)?;
        self.attend(ys[0], kc, vc, cuda_buf(out, "attention")?.ptr(), max_seq, s)
    }

    fn ffn_gate_up(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        w_gate: &Linear,
        w_up: &Linear,
        gate: &mut Buffer,
        up: &mut Buffer,
        n_tokens: usize,
    ) -> Result<(), BackendError> {
        let _e = self.enter("matmul")?;
        let fusable = n_tokens == 1 && w_gate.rows == w_up.rows && fusable_norm(&[w_gate, w_up]);
        if !fusable {
            self.norm_matmul_many(x, norm, xn, &[w_gate, w_up], &mut [&mut *gate, &mut *up], n_tokens)?;
            return self.silu_mul(gate, up, n_tokens * w_gate.rows);
        }
        let (xm, gm, nm) = (cuda_buf(x, "matmul")?, cuda_buf(gate, "matmul")?, cuda_buf(norm.weight, "matmul")?);
        check_len("matmul", "input", xm.bytes(), w_gate.cols)?;
        check_len("matmul", "norm", nm.bytes(), w_gate.cols)?;
        check_len("matmul", &w_gate.name, gm.bytes(), w_gate.rows)?;
        let (wg, wu, out) = (weight_mem(w_gate, "matmul")?.ptr(), weight_mem(w_up, "matmul")?.ptr(), gm.ptr());
        let (rows, row_bytes, cols) = (w_gate.rows as i32, device_row_bytes(w_gate.dtype, w_gate.cols) as i64, w_gate.cols as i32);
        if let Some(plan) = self.dense_plan(w_gate, 2) {
            let (f, tl, gate, (nw, eps)) = (self.k.dense_ffn[plan.dtype][plan.chunks], plan.tl, Seg { w: wg, y: out, rows }, (nm.ptr(), norm.eps));
            return self.launch("matmul", f, (plan.blocks(w_gate.rows, self.sms), 1, 1), 256, &mut args![gate, wu, row_bytes, cols, xm.ptr(), nw, eps, tl]);
        }
        let f = self.k.ffn[w_gate.dtype.kernel_code() as usize];
        let input = self.product_input(xm.ptr(), w_gate, Some((nm.ptr(), norm.eps)))?;
        let (xp, nw, eps, prep, xq, ds) = (input.x, input.norm_w, input.eps, input.prep, input.xq, input.ds);
        let slices = k_slices(w_gate.rows, self.steps_cap(w_gate), self.max_blocks);
        let (grid, sl) = (self.product_blocks(w_gate.rows.div_ceil(8 / slices)), slices as i32);
        self.launch_smem("matmul", f, (grid, 1, 1), 256, input.smem, &mut args![wg, wu, out, rows, row_bytes, cols, xp, nw, eps, sl, prep, xq, ds])
    }

    fn rope_attention(
        &self,
        q: &mut Buffer,
        k: &mut Buffer,
        v: &Buffer,
        rope: &Rope,
        kv: &mut KvLayer,
        out: &mut Buffer,
        s: AttentionShape,
    ) -> Result<(), BackendError> {
        let _e = self.enter("attention")?;
        if rope.head_dim != s.head_dim {
            return Err(BackendError::InvalidArgument { op: "attention", reason: format!("rope head_dim {} != {}", rope.head_dim, s.head_dim) });
        }
        let (kc, vc, max_seq) = self.check_attention(q, k, v, kv, out, s)?;
        let table = self.rope_table(rope)?;
        let (qp, kp, vp, step) = (cuda_buf(q, "attention")?.ptr(), cuda_buf(k, "attention")?.ptr(), cuda_buf(v, "attention")?.ptr(), self.step_dev.ptr());
        let (n, nh, nkv, hd, hs) = (s.n_tokens as i32, s.n_heads as i32, s.n_kv_heads as i32, s.head_dim as i32, (rope.style == RopeStyle::HalfSplit) as i32);
        let threads = (s.n_tokens * (s.n_heads + s.n_kv_heads) * s.head_dim / 2).max(s.n_tokens * s.n_kv_heads * s.head_dim);
        self.launch(
            "attention",
            self.k.rope_store,
            (threads.div_ceil(256) as u32, 1, 1),
            256,
            &mut args![qp, kp, vp, kc, vc, table, n, nh, nkv, hd, hs, step],
        )?;
        self.attend(qp, kc, vc, cuda_buf(out, "attention")?.ptr(), max_seq, s)
    }
}


impl CudaBackend {
    /// Checks an attention call's buffers and cache, stages the position, and returns the cache.
    fn check_attention(
        &self,
        q: &Buffer,
        k: &Buffer,
        v: &Buffer,
        kv: &KvLayer,
        out: &Buffer,
        s: AttentionShape,
    ) -> Result<(CUdeviceptr, CUdeviceptr, usize), BackendError> {
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CudaKv { k: kc, v: vc } = kv.mem::<CudaKv>("attention")?;
        let (hd, nh, nkv, n) = (s.head_dim, s.n_heads, s.n_kv_heads, s.n_tokens);
        if s.pos0 + n > *max_seq {
            return Err(BackendError::InvalidArgument { op: "attention", reason: format!("positions up to {} exceed the cache of {max_seq}", s.pos0 + n) });
        }
        if hd % 32 != 0 || hd > 256 || nkv == 0 || nh % nkv != 0 || *kv_dim != nkv * hd {
            return Err(BackendError::InvalidArgument { op: "attention", reason: format!("unsupported shape: head_dim {hd}, {nh} heads, {nkv} KV heads") });
        }
        check_len("attention", "q", cuda_buf(q, "attention")?.bytes(), n * nh * hd)?;
        check_len("attention", "k", cuda_buf(k, "attention")?.bytes(), n * nkv * hd)?;
        check_len("attention", "v", cuda_buf(v, "attention")?.bytes(), n * nkv * hd)?;
        check_len("attention", "output", cuda_buf(out, "attention")?.bytes(), n * nh * hd)?;
        self.stage_step("attention", s.pos0, n, None)?;
        Ok((kc.ptr(), vc.ptr(), *max_seq))
    }

    /// Attention over the cache (K/V of the new tokens already stored): one block per head up
    /// to 1024 positions, split over the context and combined beyond.
    fn attend(&self, q: CUdeviceptr, kc: CUdeviceptr, vc: CUdeviceptr, out: CUdeviceptr, max_seq: usize, s: AttentionShape) -> Result<(), BackendError> {
        let (hd, nh, n) = (s.head_dim, s.n_heads, s.n_tokens);
        let (splits, chunk) = Self::splits(max_seq, n, s.pos0 + n);
        let step = self.step_dev.ptr();
        let (nhi, nkvi, hdi, chunki, scale) = (nh as i32, s.n_kv_heads as i32, hd as i32, chunk as i32, 1.0f32 / (hd as f32).sqrt());
        if splits == 1 {
            return self.launch("attention", self.k.attn_small, (nh as u32, n as u32, 1), 256, &mut args![q, kc, vc, out, nhi, nkvi, hdi, scale, step]);
        }
        let part = self.scratch("attention", |s| &mut s.partials, n * nh * splits * (hd + 2) * 4)?;
        self.launch(
            "attention",
            self.k.attn_partial,
            (nh as u32, n as u32, splits as u32),
            128,
            &mut args![q, kc, vc, part, nhi, nkvi, hdi, chunki, scale, step],
        )?;
        let spl = splits as i32;
        self.launch("attention", self.k.attn_combine, (nh as u32, n as u32, 1), hd as u32, &mut args![part, out, nhi, hdi, spl])
    }

    /// Row-major `C[m×n] = A[m×k] · B[k×n]` through cuBLAS (column-major: `C^T = B^T · A^T`).
    fn sgemm_row_major(&self, a: usize, b: usize, c: usize, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: a, b and c address m×k, k×n and m×n f32 values the device can reach (device
        // memory or registered host memory), as the callers checked.
        unsafe {
            cudarc::cublas::result::sgemm(
                self.blas.0,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha,
                b as *const f32,
                n as i32,
                a as *const f32,
                k as i32,
                &beta,
                c as *mut f32,
                n as i32,
            )
        }
        .map_err(|e| dev_err("gemm", format!("cublasSgemm: {e:?}")))
    }

    /// Runs a pass: replays the session's captured decode graph, or captures one on a
    /// single-token pass that follows an uncaptured one (which has grown any scratch buffer the
    /// pass needs, so nothing allocates during capture), or runs the ops directly.
    fn run_pass(&self, state: u64, n: usize, pass: &mut dyn FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
        if n != 1 || !self.use_graphs {
            self.copy_step("forward")?;
            return pass();
        }
        let generation = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).generation;
        let tick = self.graph_tick();
        let ready = {
            let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            match graphs.get_mut(&state) {
                Some(GraphSlot::Ready(g)) if g.generation == generation => {
                    g.last_used = tick;
                    return g.graph.launch(self.s()).map_err(|e| dev_err("forward", e));
                }
                Some(GraphSlot::Warm) => true,
                _ => {
                    graphs.insert(state, GraphSlot::Warm);
                    false
                }
            }
        };
        if ready {
            let captured = Graph::capture(&self.ctx, self.s(), || {
                self.copy_step("forward")?;
                pass()
            });
            let unchanged = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).generation == generation;
            match captured {
                Ok(Ok(graph)) if unchanged => {
                    graph.launch(self.s()).map_err(|e| dev_err("forward", e))?;
                    let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
                    graphs.insert(state, GraphSlot::Ready(CachedGraph { graph, generation, last_used: tick }));
                    while graphs.len() > GRAPH_CACHE {
                        let oldest = graphs.iter().min_by_key(|(_, g)| if let GraphSlot::Ready(g) = g { g.last_used } else { 0 }).map(|(k, _)| *k);
                        if let Some(k) = oldest {
                            graphs.remove(&k);
                        }
                    }
                    return Ok(());
                }
                // A buffer moved under the capture: nothing ran; run it plainly (and capture later).
                Ok(Ok(_)) => {}
                // The capture failed: nothing ran; run it plainly, and say so once.
                Ok(Err(e)) => warn_capture_failed(&e),
                Err(e) => warn_capture_failed(&e.to_string()),
            }
        }
        self.copy_step("forward")?;
        pass()
    }
}

fn warn_capture_failed(e: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("driftwood: capturing the CUDA decode graph failed ({e}); this pass runs without it"));
}

/// Compiles the kernels to PTX for `arch` with NVRTC alone (no GPU needed): a check that the
/// kernel source builds, for tests and for machines that only have NVRTC.
pub fn compile_kernels(arch: &str) -> Result<String, String> {
    if !driver::libraries_present().0 {
        return Err("NVRTC (libnvrtc.so) is not installed".into());
    }
    driver::compile(&kernel_source(), &[format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-default-device".into()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kernels.cu uses the format table's names and defines none of them itself: every number it
    /// shares with Rust comes from the generated prelude.
    #[test]
    fn kernel_source_takes_its_numbers_from_the_format_table() {
        let prelude = crate::quant::kernel_prelude();
        for d in DType::ALL {
            let name = format!("DT_{}", d.name().to_ascii_uppercase());
            assert!(prelude.contains(&format!("#define {name} {}
", d.kernel_code())), "{name}");
        }
        for a in ActFormat::ALL {
            assert!(prelude.contains(&format!("#define {} {}
", a.kernel_name(), a.kernel_code())));
        }
        for word in ["DT_", "AK_", "MAX_BATCH", "act_kind(int", "block_bytes(int"] {
            let defined = KERNELS.lines().any(|l| l.trim_start().starts_with(&format!("#define {word}")) || l.contains(&format!("constexpr int {word}")));
            assert!(!defined, "kernels.cu defines {word} by hand");
        }
        assert!(kernel_source().starts_with(&prelude));
    }

    /// `Seg` must have the layout of the kernel's struct: two pointers and an int, padded to 24.
    #[test]
    fn segment_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<Seg>(), 24);
        // RopeStore: three pointers, two ints, a pointer.
        assert_eq!(std::mem::size_of::<RopeStore>(), 40);
        assert_eq!(std::mem::align_of::<Seg>(), 8);
    }

    #[test]
    fn small_matrices_are_split_across_more_warps() {
        let f16_2048 = warp_steps(DType::F16, 2048);
        assert_eq!(f16_2048, 8);
        let wave = 4 * 132; // an H100/H200 at 4 blocks per SM
        assert_eq!(k_slices(64_128, f16_2048, wave), 1); // output projection, 128256 rows in pairs
        assert_eq!(k_slices(8192, f16_2048, wave), 1);
        assert_eq!(k_slices(1024, f16_2048, wave), 4); // 2048 rows in pairs: 512 groups, one wave
        assert_eq!(k_slices(288, 8, 0), 8); // 576 rows in pairs, with long rows
        assert_eq!(k_slices(0, 8, 0), 8);
        // ...never more slices than a row has steps: SmolLM2's 576-wide rows...
        assert_eq!(k_slices(288, warp_steps(DType::F16, 576), wave), 2);
        assert_eq!(k_slices(288, warp_steps(DType::Q4_1, 576), wave), 1);
        assert_eq!(k_slices(768, warp_steps(DType::Q4_0, 2048), wave), 2);
        // ...and no more than one wave of groups: Llama-3.2-1B's q/k/v, 3072 rows in pairs.
        assert_eq!(k_slices(1536, f16_2048, wave), 2);
        assert_eq!(k_slices(1536, f16_2048, 0), 4);
    }

    #[test]
    fn dense_plans_cover_rows_with_whole_chunks() {
        let plan = |rows, cols, m| dense_plan(DType::F16, rows, cols, m).map(|p| (DENSE_CHUNKS[p.chunks], 1usize << p.tl, p.rows_per_group, p.per_sm));
        // Llama-3.2-1B: q/k/v and o (2048 wide), gate/up, down (8192 wide).
        assert_eq!(plan(3072, 2048, 1), Some((1, 256, 4, 4)));
        assert_eq!(plan(8192, 2048, 2), Some((1, 256, 2, 4)));
        assert_eq!(plan(2048, 8192, 1), Some((4, 256, 2, 2)));
        // SmolLM2-135M: 576 wide (72 chunks: 128 threads), 1536 wide (192: 256 threads).
        assert_eq!(plan(576, 576, 1), Some((1, 128, 4, 4)));
        assert_eq!(plan(576, 1536, 1), Some((1, 256, 4, 4)));
        assert_eq!(plan(64, 64, 1), Some((1, 32, 4, 4)), "narrow rows still take a warp");
        assert_eq!(plan(64, 4096, 2), Some((2, 256, 2, 2)));
        // Not for it: too wide, partial chunks, odd rows, other formats.
        assert_eq!(plan(64, 8200, 1), None);
        assert_eq!(plan(64, 100, 1), None);
        assert_eq!(plan(63, 2048, 1), None);
        assert!(dense_plan(DType::Q4_0, 64, 2048, 1).is_none() && dense_plan(DType::F32, 64, 2048, 1).is_none());
        assert_eq!(dense_plan(DType::BF16, 64, 2048, 1).map(|p| p.dtype), Some(1));
        // Blocks: one per block step, at most per_sm per multiprocessor.
        let p = dense_plan(DType::F16, 3072, 2048, 1).unwrap();
        assert_eq!(p.blocks(3072, 132), 528, "768 groups of 4 rows, 4 blocks an SM");
        assert_eq!(p.blocks(400, 132), 100);
        let p = dense_plan(DType::F16, 576, 576, 1).unwrap();
        assert_eq!(p.blocks(576, 132), 72, "two 128-thread groups a block: 144 groups of 4 rows");
    }

    #[test]
    fn persistent_grids_fit_in_one_wave() {
        // Llama-3.2-1B's gate/up compiled to 70 registers: 3 blocks of 256 threads fit an SM
        // where 4 were planned, and 132 of 528 blocks ran as a second wave.
        let p = dense_plan(DType::F16, 8192, 2048, 2).unwrap();
        assert_eq!(p.blocks(8192, 132), 528);
        assert_eq!(p.fitted(p.per_sm, 3).blocks(8192, 132), 396);
        assert_eq!(p.fitted(p.per_sm, 8).blocks(8192, 132), 528, "more room never adds blocks");
        assert_eq!(p.fitted(6, 8).blocks(8192, 132), 792, "an override within what fits is kept");
        assert_eq!(p.fitted(p.per_sm, 0).blocks(8192, 132), 132, "an occupancy of 0 still launches");
    }

    #[test]
    fn argmax_keys_order_as_the_host_argmax() {
        // kernels.cu's argmax_f32 key: order-preserving value bits above, complemented index
        // below; NaN and -inf are skipped, 0 means none.
        let key = |i: usize, v: f32| -> u64 {
            if v.is_nan() || v == f32::NEG_INFINITY {
                return 0;
            }
            let b = v.to_bits();
            let ordered = if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 };
            (u64::from(ordered) << 32) | u64::from(!(i as u32))
        };
        let mut r = 0x2545_f491_4f6c_dd1du64;
        for len in [1usize, 2, 7, 100, 3000] {
            for case in 0..8 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        match (r % 11, case) {
                            (0, c) if c >= 4 => f32::NAN,
                            (1, c) if c >= 4 => f32::NEG_INFINITY,
                            (2, 6) => f32::INFINITY,
                            _ if case == 7 => f32::NEG_INFINITY,
                            _ => ((r >> 20) % 9) as f32 * if case % 2 == 0 { -0.25 } else { 0.5 } - 1.0,
                        }
                    })
                    .collect();
                let best = xs.iter().enumerate().map(|(i, &v)| key(i, v)).max().unwrap_or(0);
                let got = if best == 0 { 0 } else { !(best as u32) };
                assert_eq!(got, crate::numeric::argmax(&xs), "len {len} case {case}");
            }
        }
    }

    #[test]
    fn dense_instances_match_the_kernel_source() {
        for ch in DENSE_CHUNKS {
            for suffix in ["f16", "bf16"] {
                let inst = format!("DENSE({suffix}, DT_{}, {ch})", suffix.to_uppercase());
                assert!(KERNELS.contains(&inst), "kernels.cu lacks {inst}");
            }
        }
    }

    #[test]
    fn decode_splits_depend_only_on_the_cache_size() {
        // Decode (one token): the same split count at every position, so a captured graph fits.
        assert_eq!(CudaBackend::splits(4096, 1, 10), CudaBackend::splits(4096, 1, 4000));
        assert_eq!(CudaBackend::splits(4096, 1, 1), (16, 256));
        // Small caches: one block per head, no combine pass.
        assert_eq!(CudaBackend::splits(1024, 1, 3), (1, 1024));
        assert_eq!(CudaBackend::splits(4096, 300, 300), (1, 300));
        let (s, chunk) = CudaBackend::splits(131072, 1, 5);
        assert!(s <= 64 && s * chunk >= 131072);
        // Prefill covers exactly its context.
        let (s, chunk) = CudaBackend::splits(4096, 512, 3000);
        assert!(s > 1 && s * chunk >= 3000 && (s - 1) * chunk < 3000);
        assert_eq!(CudaBackend::splits(64, 1, 1), (1, 64));
    }

    /// Compiles kernels.cu with NVRTC for Hopper when NVRTC is installed (CI installs it from
    /// PyPI; see .ci/run). Without it the test says so and passes: it checks the source, not a GPU.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // Hopper takes the programmatic-launch instructions; Ampere compiles without them.
        for (arch, pdl) in [("sm_90", true), ("sm_80", false)] {
            match compile_kernels(arch) {
                Ok(ptx) => {
                    for name in ["embed", "matvec_q4_k", "matvec_bf16", "attn_partial", "attn_combine", "rms_norm", "rope", "kv_store", "act_prep", "copy_f32"]
                    {
                        assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the {arch} PTX");
                    }
                    assert_eq!(ptx.contains("griddepcontrol.wait"), pdl, "{arch}");
                }
                Err(e) if e.contains("not installed") => eprintln!("skipped: {e}"),
                Err(e) => panic!("{arch}: {e}"),
            }
        }
    }

    /// The value kernels.cu's `dequant_one` reads at element `i` of a repacked row.
    fn repacked_value(d: DType, row: &[u8], i: usize, cols: usize) -> f32 {
        let (nb, b, j) = (cols / 32, i / 32, i % 32);
        let h = |o: usize| half::f16::from_le_bytes([row[o], row[o + 1]]).to_f32();
        let nibble = |v: u8| f32::from(if j < 16 { v & 0xF } else { v >> 4 });
        match d {
            DType::Q8_0 => h(32 * nb + 2 * b) * f32::from(row[32 * b + j] as i8),
            DType::Q4_0 => h(16 * nb + 2 * b) * (nibble(row[16 * b + j % 16]) - 8.0),
            DType::Q4_1 => h(16 * nb + 4 * b) * nibble(row[16 * b + j % 16]) + h(16 * nb + 4 * b + 2),
            _ => unreachable!(),
        }
    }

    #[test]
    fn repacked_rows_hold_the_same_values_at_aligned_strides() {
        use crate::quant::{dequantize_row, quantize_row};
        // 3 blocks a row: 54, 60 and 102 GGUF bytes, none a multiple of 16.
        let (rows, cols) = (3, 96);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for d in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let rb = d.row_bytes(cols).unwrap();
            let mut src = vec![0u8; rows * rb];
            for (xr, sr) in x.chunks_exact(cols).zip(src.chunks_exact_mut(rb)) {
                quantize_row(d, xr, sr);
            }
            let packed = repack_rows(d, cols, &src).unwrap();
            let stride = device_row_bytes(d, cols);
            assert!(stride.is_multiple_of(16) && stride >= rb, "{d}: stride {stride}");
            assert_eq!(packed.len(), rows * stride, "{d}");
            for (sr, pr) in src.chunks_exact(rb).zip(packed.chunks_exact(stride)) {
                let mut want = vec![0f32; cols];
                dequantize_row(d, sr, &mut want);
                for (i, w) in want.iter().enumerate() {
                    assert_eq!(repacked_value(d, pr, i, cols), *w, "{d} element {i}");
                }
            }
            assert!(repack_rows(d, cols, &src[..rb + 1]).is_err(), "{d}: a partial row is refused");
        }
    }

    /// Without a CUDA driver, opening the backend is a clear error, not a panic.
    #[test]
    fn opening_without_a_driver_is_a_clear_error() {
        if driver::driver_present() {
            return;
        }
        let err = CudaBackend::new(0).err().expect("no driver, no backend").to_string();
        assert!(err.contains("cuda:0 is not available") && err.contains("libcuda"), "{err}");
    }
}
