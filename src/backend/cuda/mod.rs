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

/// Kernel arguments: pointers to each value, as `cuLaunchKernel` takes them.
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(&$a as *const _ as *mut c_void),*] };
}

mod device;
mod driver;
mod graph;
mod kernels;
mod ops;
mod plan;
mod products;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUstream};
use cudarc::driver::{result, CudaContext, CudaStream};

use super::{
    check_gemm_dims, AttentionShape, BackendError, Buffer, Device, DeviceBuffer, DeviceInfo, DeviceKind, FusedOps, Handle, KvLayer, Linear, ModelOps, Norm,
    Probes, Rope, RopeStyle, WeightData,
};
use crate::quant::{ActFormat, DType, QK};
use crate::region::{page_size, Region};
pub use driver::DevMem;
use driver::{err, Graph, Module, Pinned, Registrations};
use graph::{GraphSlot, PassState};
use kernels::Kernels;
use plan::{
    dense_plan, device_row_bytes, fast_rows, fusable_norm, k_slices, repack_rows, repacked, stage_bytes, warp_steps, DensePlan, DENSE_CHUNKS, DOWNLOAD_STAGED,
    STAGE_LIMIT,
};

pub use kernels::compile_kernels;

/// Longest pass the `Step` record holds (`MAX_BATCH` in the kernels).
const STEP_TOKENS: usize = crate::quant::MAX_PASS_TOKENS;
/// Bytes of the `Step` record: pos0, n, token ids.
const STEP_BYTES: usize = 8 + 4 * STEP_TOKENS;

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
        let k = Kernels::load(&ctx, &arch).map_err(na)?;
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

#[cfg(test)]
mod tests;
