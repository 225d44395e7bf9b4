//! Compute devices behind one trait.
//!
//! A [`Backend`] is a device the runtime computes on: the CPU (always there) or a CUDA GPU
//! (loaded at run time when the machine has one). It names its capabilities ([`DeviceInfo::can_use_host_pointer`]) instead of model code
//! asking "is this CUDA?". Actor memory reaches a backend as a [`Region`]: the CPU computes on its
//! bytes as they are, a GPU host-registers them so kernels read and write guest memory directly.

pub mod cpu;
pub mod cuda;
mod handle;

pub use handle::{foreign, Handle};

use std::any::Any;
use std::sync::Arc;

use crate::quant::DType;
use crate::region::Region;

/// Which device the user asked for (`--device auto|cpu|cuda[:N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    /// The CPU with its kernels at a given SIMD level (`cpu:scalar`, `cpu:avx2`, `cpu:avx512`).
    CpuIsa(cpu::Isa),
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                if let Some(isa) = other.strip_prefix("cpu:") {
                    return cpu::Isa::parse(isa)
                        .map(DeviceSpec::CpuIsa)
                        .ok_or_else(|| format!("unknown CPU level '{isa}': expected cpu:scalar, cpu:avx2 or cpu:avx512"));
                }
                match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                    _ => Err(format!("unknown device '{other}': expected auto, cpu, cpu:ISA, cuda or cuda:N")),
                }
            }
        }
    }
}

/// What kind of device a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// A device and what it can do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    /// Human-readable, e.g. "cpu (2 threads, avx512f)" or "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// The device can address host memory at the same pointer value the host uses.
    pub can_use_host_pointer: bool,
    /// Worker threads (CPU) or streaming multiprocessors (GPU).
    pub parallelism: usize,
}

/// Errors from a compute backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{device} is not available: {reason}")]
    NotAvailable { device: String, reason: String },
    #[error("{op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },
    #[error("{op} failed on {device}: {reason}")]
    Device { op: &'static str, device: String, reason: String },
}

/// A buffer in device memory holding a copy of host bytes (the explicit-copy path that the
/// zero-copy path is measured against).
pub trait DeviceBuffer: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A compute device and the memory it shares with the host: what the actor runtime needs.
pub trait Device: Send + Sync {
    fn info(&self) -> &DeviceInfo;
    /// Makes a region's committed bytes (and every later growth) accessible to the device.
    fn share_region(&self, region: &Region) -> Result<(), BackendError>;

    /// The address at which the device sees `host`, a pointer into a shared region.
    fn device_ptr(&self, host: *const u8) -> Result<usize, BackendError>;

    /// `C[m×n] = A[m×k] · B[k×n]` (row-major `f32`) computed in place on shared memory.
    ///
    /// # Safety
    /// `a`, `b` and `c` must point into a region shared with [`Device::share_region`], be
    /// 4-byte aligned and valid for `m*k`, `k*n` and `m*n` elements; `c` must not overlap `a` or
    /// `b`, and nothing else may access these bytes during the call.
    unsafe fn gemm_shared(&self, a: *const f32, b: *const f32, c: *mut f32, m: usize, n: usize, k: usize) -> Result<(), BackendError>;

    /// Writes the first `n` values of `src` straight into host memory this device shares through
    /// [`Device::share_region`] (an actor's linear memory): the device stores into the guest's
    /// pages, with no staging copy. `Ok(false)` when this backend has no such path or `dst` is
    /// not shared with it; the caller then downloads and copies.
    ///
    /// # Safety
    /// `dst` must be 4-byte aligned and valid for `n` writes, and nothing else may access those
    /// bytes during the call.
    unsafe fn write_shared(&self, _src: &Buffer, _dst: *mut f32, _n: usize) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Runs `f` on the backend's compute threads (CPU: inside its rayon pool, so the many
    /// parallel ops of a forward pass dispatch cheaply). Other devices just call `f`.
    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }
}

/// Measurements the benchmarks take of a device: the explicit-copy path zero copy is measured
/// against, and the device's memory.
pub trait Probes {
    /// The same product through explicit copies: operands copied into device buffers, the
    /// product computed there and copied back into `c`.
    fn gemm_copied(&self, a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<(), BackendError>;

    /// Device memory in use on the whole device, where the device has its own memory (GPUs).
    fn device_memory_used(&self) -> Option<usize> {
        None
    }

    /// Measured device-memory bandwidth in GB/s (bytes read + written per second by a large
    /// device-to-device copy), where the device has its own memory. Used for the decode floor.
    fn memory_bandwidth(&self) -> Option<f64> {
        None
    }

    /// Copies host bytes into a new device buffer.
    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn DeviceBuffer>, BackendError>;
}

/// The operations the Llama forward pass is written in, one method each, on buffers the backend
/// made ([`Buffer`], [`KvLayer`], device-resident [`Linear`]s).
pub trait ModelOps: Send + Sync {
    /// Runs `pass`, the ops of one forward pass over `tokens` at positions `pos0..`, for the
    /// session state `state` (a process-unique id). A GPU uses it to stage the token ids and
    /// position once and to replay a captured graph of the ops for later single-token passes of
    /// the same state; the default just runs the ops.
    fn forward_pass(&self, state: u64, tokens: &[u32], pos0: usize, pass: &mut dyn FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
        let _ = (state, tokens, pos0);
        pass()
    }

    /// A zeroed activation buffer of `len` f32 values.
    fn buffer(&self, len: usize) -> Result<Buffer, BackendError>;
    /// A buffer holding `data`.
    fn upload_f32(&self, data: &[f32]) -> Result<Buffer, BackendError>;
    /// Copies a buffer's first `out.len()` values to host memory (e.g. guest memory).
    fn download(&self, buf: &Buffer, out: &mut [f32]) -> Result<(), BackendError>;
    /// Index of the largest of a buffer's first `n` values: the first on ties, NaNs never win,
    /// 0 when nothing beats -inf ([`crate::numeric::argmax`]). Greedy decoding on a GPU
    /// reads back this one index instead of the logits. The default downloads the values.
    fn argmax(&self, buf: &Buffer, n: usize) -> Result<u32, BackendError> {
        let mut values = vec![0.0f32; n];
        self.download(buf, &mut values)?;
        Ok(crate::numeric::argmax(&values))
    }
    /// Makes a weight usable by this device (CPU: the mapped bytes as they are).
    fn load_linear(&self, w: Linear) -> Result<Linear, BackendError>;
    /// A KV cache layer of `max_seq × kv_dim` f16 values for K and for V.
    fn kv_layer(&self, max_seq: usize, kv_dim: usize) -> Result<KvLayer, BackendError>;
    /// `out[t] = table[tokens[t]]` (rows dequantized to f32).
    fn embed(&self, table: &Linear, tokens: &[u32], out: &mut Buffer) -> Result<(), BackendError>;
    /// `out[r] = x[r] / rms(x[r]) * w` for `rows` rows of `dim`.
    fn rms_norm(&self, x: &Buffer, w: &Buffer, out: &mut Buffer, rows: usize, dim: usize, eps: f32) -> Result<(), BackendError>;
    /// `out[t][r] = W[r] · x[t]` for `n_tokens` tokens (decode when 1, prefill otherwise).
    fn matmul(&self, w: &Linear, x: &Buffer, out: &mut Buffer, n_tokens: usize) -> Result<(), BackendError>;
    /// Several products of the same input (q/k/v, gate/up) in one dispatch.
    fn matmul_many(&self, ws: &[&Linear], x: &Buffer, outs: &mut [&mut Buffer], n_tokens: usize) -> Result<(), BackendError>;
    /// Rotary position embedding in place on `n_tokens × n_heads × head_dim`, positions from `pos0`.
    fn rope(&self, x: &mut Buffer, rope: &Rope, n_tokens: usize, n_heads: usize, pos0: usize) -> Result<(), BackendError>;
    /// Appends `k`/`v` (`n_tokens × kv_dim`) at `pos0` and computes causal attention of `q`
    /// over positions `0..pos0 + t + 1` for each token into `out` (`n_tokens × n_heads × head_dim`).
    fn attention(&self, q: &Buffer, k: &Buffer, v: &Buffer, kv: &mut KvLayer, out: &mut Buffer, shape: AttentionShape) -> Result<(), BackendError>;
    /// `gate[i] = silu(gate[i]) * up[i]` for the first `n` values.
    fn silu_mul(&self, gate: &mut Buffer, up: &Buffer, n: usize) -> Result<(), BackendError>;
    /// `x[i] += y[i]` for the first `n` values.
    fn add(&self, x: &mut Buffer, y: &Buffer, n: usize) -> Result<(), BackendError>;
    /// Copies `n` values from `src[src_off..]` to `dst[dst_off..]`.
    fn copy(&self, src: &Buffer, src_off: usize, dst: &mut Buffer, dst_off: usize, n: usize) -> Result<(), BackendError>;
    /// Reads K and V of positions `0..len` as f16 bits (snapshot export): `len × kv_dim` each.
    fn kv_export(&self, kv: &KvLayer, len: usize, k: &mut [u16], v: &mut [u16]) -> Result<(), BackendError>;
    /// Writes K and V of positions `0..len` (snapshot import).
    fn kv_import(&self, kv: &mut KvLayer, len: usize, k: &[u16], v: &[u16]) -> Result<(), BackendError>;
}

/// Blocks of several model ops that a device may run as one. Each default is the composition of
/// [`ModelOps`] it replaces, which is what the CPU runs; a GPU overrides them with fused kernels
/// that compute the same function.
pub trait FusedOps: ModelOps {
    /// `out[t] += W · x[t]` (a residual connection); `scratch` (`n_tokens × rows`) is free for
    /// backends that cannot fuse the addition.
    fn matmul_add(&self, w: &Linear, x: &Buffer, out: &mut Buffer, scratch: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
        self.matmul(w, x, scratch, n_tokens)?;
        self.add(out, scratch, n_tokens * w.rows)
    }
    /// `matmul_many` of the RMS-normalized input: `xn = norm(x)` (written to `xn` unless the
    /// backend fuses the norm into the products), then the products of `xn`.
    fn norm_matmul_many(
        &self,
        x: &Buffer,
        norm: Norm<'_>,
        xn: &mut Buffer,
        ws: &[&Linear],
        outs: &mut [&mut Buffer],
        n_tokens: usize,
    ) -> Result<(), BackendError> {
        let cols = ws.first().map(|w| w.cols).unwrap_or(0);
        self.rms_norm(x, norm.weight, xn, n_tokens, cols, norm.eps)?;
        self.matmul_many(ws, xn, outs, n_tokens)
    }
    /// Rotates `q` and `k`, then [`ModelOps::attention`]: the ops always run together, and a GPU
    /// fuses the rotation with the cache write.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        q: &mut Buffer,
        k: &mut Buffer,
        v: &Buffer,
        rope: &Rope,
        kv: &mut KvLayer,
        out: &mut Buffer,
        shape: AttentionShape,
    ) -> Result<(), BackendError> {
        self.rope(q, rope, shape.n_tokens, shape.n_heads, shape.pos0)?;
        self.rope(k, rope, shape.n_tokens, shape.n_kv_heads, shape.pos0)?;
        self.attention(q, k, v, kv, out, shape)
    }
    /// A layer's attention half up to the output projection: `xn = norm(x)`, q/k/v products,
    /// rotation, cache write and attention into `out`. The default composes the ops above; a GPU
    /// fuses the rotation and cache write into the products for one token.
    #[allow(clippy::too_many_arguments)]
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
        shape: AttentionShape,
    ) -> Result<(), BackendError> {
        let [q, k, v] = qkv;
        self.norm_matmul_many(x, norm, xn, &w, &mut [&mut *q, &mut *k, &mut *v], shape.n_tokens)?;
        self.rope_attention(q, k, v, rope, kv, out, shape)
    }
    /// The feed-forward's first half on the normalized input: `xn = norm(x)`, then
    /// `gate = silu(w_gate · xn) * (w_up · xn)`; `xn` and `up` are scratch.
    #[allow(clippy::too_many_arguments)]
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
        self.norm_matmul_many(x, norm, xn, &[w_gate, w_up], &mut [&mut *gate, &mut *up], n_tokens)?;
        self.silu_mul(gate, up, n_tokens * w_gate.rows)
    }
}

/// One compute device with everything the runtime asks of it. Implement the four traits; this
/// one comes with them.
pub trait Backend: Device + Probes + FusedOps {}

impl<T: Device + Probes + FusedOps> Backend for T {}

/// Activations on a device (f32). Model code never indexes into one; it only hands buffers to
/// backend ops, so the same forward pass runs wherever the bytes live.
pub struct Buffer {
    len: usize,
    mem: Handle,
}

impl Buffer {
    /// `len` f32 values held in `mem`, the making backend's own memory type.
    pub fn new<T: Any + Send + Sync>(len: usize, mem: T) -> Buffer {
        Buffer { len, mem: Handle::new(mem) }
    }

    /// The backend's memory, for `op`; an error when another backend made the buffer.
    #[inline]
    pub fn mem<T: Any>(&self, op: &'static str) -> Result<&T, BackendError> {
        self.mem.get(op)
    }

    #[inline]
    pub fn mem_mut<T: Any>(&mut self, op: &'static str) -> Result<&mut T, BackendError> {
        self.mem.get_mut(op)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes of a weight in host memory: a view into a memory-mapped model file, or owned bytes
/// (converted or generated weights).
#[derive(Clone)]
pub enum HostBytes {
    Mapped { map: Arc<memmap2::Mmap>, start: usize, len: usize },
    Owned(Arc<Vec<u8>>),
}

impl std::ops::Deref for HostBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            HostBytes::Mapped { map, start, len } => &map[*start..*start + *len],
            HostBytes::Owned(v) => v,
        }
    }
}

/// Where a weight's bytes are.
#[derive(Clone)]
pub enum WeightData {
    Host(HostBytes),
    /// Memory of the device that loaded it, shared by clones (tied embeddings are uploaded once).
    Device(Arc<Handle>),
}

/// A weight matrix (`rows × cols`, row-major, packed blocks for quantized types) in its stored
/// format: one interface for every dtype.
#[derive(Clone)]
pub struct Linear {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl Linear {
    /// Bytes the weight occupies.
    pub fn nbytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0) * self.rows
    }
}

/// One layer of the KV cache: K and V for `max_seq` positions of `kv_dim` values, stored as f16.
pub struct KvLayer {
    pub max_seq: usize,
    pub kv_dim: usize,
    mem: Handle,
}

impl KvLayer {
    pub fn new<T: Any + Send + Sync>(max_seq: usize, kv_dim: usize, mem: T) -> KvLayer {
        KvLayer { max_seq, kv_dim, mem: Handle::new(mem) }
    }

    /// The backend's memory, for `op`; an error when another backend made the layer.
    #[inline]
    pub fn mem<T: Any>(&self, op: &'static str) -> Result<&T, BackendError> {
        self.mem.get(op)
    }

    #[inline]
    pub fn mem_mut<T: Any>(&mut self, op: &'static str) -> Result<&mut T, BackendError> {
        self.mem.get_mut(op)
    }
}

/// An RMS norm to apply to a product's input: `x / rms(x) * weight`.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub weight: &'a Buffer,
    pub eps: f32,
}

/// Shapes for one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_tokens: usize,
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// How rotary embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): GGUF Llama weights (llama.cpp's converter permutes Q/K for it).
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face Llama weights.
    HalfSplit,
}

/// Rotary embedding parameters: the per-pair inverse frequencies (Llama 3 scaling already
/// applied) and the pairing style.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    pub head_dim: usize,
    /// `head_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
}

/// Opens the backend the user asked for. `auto` takes CUDA device 0 when the machine has one
/// and the CPU otherwise; `auto` that picks a GPU says so on stderr.
pub fn open(spec: DeviceSpec, threads: Option<usize>) -> Result<Arc<dyn Backend>, BackendError> {
    match spec {
        DeviceSpec::Cpu => Ok(Arc::new(cpu::CpuBackend::new(threads))),
        DeviceSpec::CpuIsa(isa) => Ok(Arc::new(cpu::CpuBackend::with_isa(threads, isa)?)),
        DeviceSpec::Cuda(n) => Ok(Arc::new(cuda::CudaBackend::new(n)?)),
        DeviceSpec::Auto => {
            if cuda::unavailable_reason(0).is_none() {
                match cuda::CudaBackend::new(0) {
                    Ok(b) => {
                        eprintln!("driftwood: --device auto chose {}", b.info().name);
                        return Ok(Arc::new(b));
                    }
                    Err(e) => eprintln!("driftwood: --device auto: {e}; using the CPU"),
                }
            }
            Ok(Arc::new(cpu::CpuBackend::new(threads)))
        }
    }
}

/// Checks the sizes of a GEMM's operands; shared by every backend.
pub fn check_gemm_dims(a: usize, b: usize, c: usize, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
    let need = |rows: usize, cols: usize| rows.checked_mul(cols);
    match (need(m, k), need(k, n), need(m, n)) {
        (Some(na), Some(nb), Some(nc)) if a >= na && b >= nb && c >= nc && m > 0 && n > 0 && k > 0 => Ok(()),
        _ => Err(BackendError::InvalidArgument { op: "gemm", reason: format!("operands of {a}, {b}, {c} elements do not fit m={m} n={n} k={k}") }),
    }
}
