//! The CPU backend: the numerical reference, and fast.
//!
//! Sharing actor memory with the CPU is trivial — the device pointer is the host pointer — so
//! "zero copy" here means the GEMM runs on the guest's bytes where they lie. Products use the
//! `matrixmultiply` crate (blocked, SIMD, threaded) rather than a hand-written loop.

pub mod kernels;
pub mod ops;

pub use kernels::Isa;

use std::sync::Mutex;

use crate::region::Region;

use super::{
    check_gemm_dims, AttentionShape, BackendError, Buffer, Device, DeviceBuffer, DeviceInfo, DeviceKind, FusedOps, KvLayer, Linear, ModelOps, Probes, Rope,
};
use kernels::QuantizedActivations;
use ops::{check_len, cpu, cpu_mut, weight_bytes, CpuKv};

/// The CPU as a compute device.
pub struct CpuBackend {
    info: DeviceInfo,
    /// Spare quantized-activation buffers (reused: no allocation per token). A product takes
    /// one out and puts it back; the lock is never held across parallel work, because a pool
    /// thread waiting inside a parallel op may pick up another session's forward pass, and a
    /// lock held across that would deadlock.
    xq: Mutex<Vec<QuantizedActivations>>,
    /// Compute threads. Work is dispatched from inside the pool (see [`Backend::install`]):
    /// a parallel call from a foreign thread costs ~12 µs, from inside ~0.1 µs.
    pool: rayon::ThreadPool,
    /// The SIMD level of this backend's kernels.
    isa: kernels::Isa,
}

impl CpuBackend {
    /// `threads`: worker threads for compute (default: all cores). The kernels use the best SIMD
    /// level the CPU has, capped by `DRIFTWOOD_CPU_ISA`.
    pub fn new(threads: Option<usize>) -> CpuBackend {
        Self::build(threads, kernels::isa())
    }

    /// A backend whose kernels use `isa` (`--device cpu:avx2`, ...): every level computes the same
    /// products up to the order of float additions, so this is for comparisons. Fails when the
    /// CPU lacks it.
    pub fn with_isa(threads: Option<usize>, isa: kernels::Isa) -> Result<CpuBackend, BackendError> {
        let best = kernels::Isa::best();
        if isa > best {
            return Err(BackendError::NotAvailable { device: format!("cpu:{}", isa.name()), reason: format!("this CPU's best SIMD level is {}", best.name()) });
        }
        Ok(Self::build(threads, isa))
    }

    fn build(threads: Option<usize>, isa: kernels::Isa) -> CpuBackend {
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("driftwood-cpu-{i}"))
            .build()
            .unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool"));
        let threads = pool.current_num_threads();
        CpuBackend {
            info: DeviceInfo {
                kind: DeviceKind::Cpu,
                name: format!("cpu ({threads} threads, {})", isa.name()),
                can_use_host_pointer: true,
                parallelism: threads,
            },
            xq: Mutex::new(Vec::new()),
            pool,
            isa,
        }
    }
}

struct HostBuffer(Vec<u8>);

impl DeviceBuffer for HostBuffer {
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// # Safety
/// As [`Backend::gemm_shared`]: the pointers are valid for the sizes and `c` overlaps neither input.
unsafe fn sgemm(a: *const f32, b: *const f32, c: *mut f32, m: usize, n: usize, k: usize) {
    // SAFETY: row-major strides describe exactly the m×k, k×n and m×n ranges the caller vouched
    // for; beta = 0 so `c` is only written.
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a, k as isize, 1, b, n as isize, 1, 0.0, c, n as isize, 1);
    }
}

impl Device for CpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn share_region(&self, _region: &Region) -> Result<(), BackendError> {
        Ok(())
    }

    fn device_ptr(&self, host: *const u8) -> Result<usize, BackendError> {
        Ok(host as usize)
    }

    unsafe fn gemm_shared(&self, a: *const f32, b: *const f32, c: *mut f32, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        check_gemm_dims(m * k, k * n, m * n, m, n, k)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { sgemm(a, b, c, m, n, k) };
        Ok(())
    }

    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        self.pool.install(f)
    }
}

impl Probes for CpuBackend {
    fn gemm_copied(&self, a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<(), BackendError> {
        check_gemm_dims(a.len(), b.len(), c.len(), m, n, k)?;
        let (da, db) = (a[..m * k].to_vec(), b[..k * n].to_vec());
        let mut dc = vec![0f32; m * n];
        // SAFETY: three distinct vectors of exactly the sizes the product needs.
        unsafe { sgemm(da.as_ptr(), db.as_ptr(), dc.as_mut_ptr(), m, n, k) };
        c[..m * n].copy_from_slice(&dc);
        Ok(())
    }

    fn upload(&self, bytes: &[u8]) -> Result<Box<dyn DeviceBuffer>, BackendError> {
        Ok(Box::new(HostBuffer(bytes.to_vec())))
    }
}

impl ModelOps for CpuBackend {
    fn buffer(&self, len: usize) -> Result<Buffer, BackendError> {
        Ok(Buffer::new(len, vec![0.0f32; len]))
    }

    fn upload_f32(&self, data: &[f32]) -> Result<Buffer, BackendError> {
        Ok(Buffer::new(data.len(), data.to_vec()))
    }

    fn download(&self, buf: &Buffer, out: &mut [f32]) -> Result<(), BackendError> {
        let src = cpu(buf, "download")?;
        check_len("download", "buffer", src.len(), out.len())?;
        out.copy_from_slice(&src[..out.len()]);
        Ok(())
    }

    fn load_linear(&self, w: Linear) -> Result<Linear, BackendError> {
        Ok(w)
    }

    fn kv_layer(&self, max_seq: usize, kv_dim: usize) -> Result<KvLayer, BackendError> {
        // vec![0; n] of a primitive is calloc'ed: pages are committed only as positions fill.
        Ok(KvLayer::new(max_seq, kv_dim, CpuKv { k: vec![0u16; max_seq * kv_dim], v: vec![0u16; max_seq * kv_dim], scores: Vec::new() }))
    }

    fn embed(&self, table: &Linear, tokens: &[u32], out: &mut Buffer) -> Result<(), BackendError> {
        let bytes = weight_bytes(table, "embed")?;
        let out = cpu_mut(out, "embed")?;
        let row_bytes = table.dtype.row_bytes(table.cols).unwrap_or(0);
        check_len("embed", "output", out.len(), tokens.len() * table.cols)?;
        for (t, &id) in tokens.iter().enumerate() {
            let id = id as usize;
            if id >= table.rows {
                return Err(BackendError::InvalidArgument { op: "embed", reason: format!("token id {id} is outside the vocabulary of {}", table.rows) });
            }
            crate::quant::dequantize_row(table.dtype, &bytes[id * row_bytes..(id + 1) * row_bytes], &mut out[t * table.cols..(t + 1) * table.cols]);
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Buffer, w: &Buffer, out: &mut Buffer, rows: usize, dim: usize, eps: f32) -> Result<(), BackendError> {
        let (x, w, out) = (cpu(x, "rms_norm")?, cpu(w, "rms_norm")?, cpu_mut(out, "rms_norm")?);
        check_len("rms_norm", "input", x.len(), rows * dim)?;
        check_len("rms_norm", "output", out.len(), rows * dim)?;
        check_len("rms_norm", "weight", w.len(), dim)?;
        ops::rms_norm(x, w, out, rows, dim, eps);
        Ok(())
    }

    fn matmul(&self, w: &Linear, x: &Buffer, out: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
        self.matmul_many(&[w], x, &mut [out], n_tokens)
    }

    fn matmul_many(&self, ws: &[&Linear], x: &Buffer, outs: &mut [&mut Buffer], n_tokens: usize) -> Result<(), BackendError> {
        let x = cpu(x, "matmul")?;
        let Some(first) = ws.first() else { return Ok(()) };
        let cols = first.cols;
        check_len("matmul", "input", x.len(), n_tokens * cols)?;
        let mut xq = self.xq.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        xq.quantize_batch_with(self.isa, first.dtype, &x[..n_tokens * cols], n_tokens, cols);
        let result = self.products(ws, outs, n_tokens, cols, &xq);
        self.xq.lock().unwrap_or_else(|e| e.into_inner()).push(xq);
        result
    }

    fn rope(&self, x: &mut Buffer, rope: &Rope, n_tokens: usize, n_heads: usize, pos0: usize) -> Result<(), BackendError> {
        let x = cpu_mut(x, "rope")?;
        check_len("rope", "input", x.len(), n_tokens * n_heads * rope.head_dim)?;
        ops::rope(x, rope, n_tokens, n_heads, pos0);
        Ok(())
    }

    fn attention(&self, q: &Buffer, k: &Buffer, v: &Buffer, kv: &mut KvLayer, out: &mut Buffer, shape: AttentionShape) -> Result<(), BackendError> {
        let (q, k, v, out) = (cpu(q, "attention")?, cpu(k, "attention")?, cpu(v, "attention")?, cpu_mut(out, "attention")?);
        let qd = shape.n_heads * shape.head_dim;
        let kvd = shape.n_kv_heads * shape.head_dim;
        check_len("attention", "q", q.len(), shape.n_tokens * qd)?;
        check_len("attention", "k", k.len(), shape.n_tokens * kvd)?;
        check_len("attention", "v", v.len(), shape.n_tokens * kvd)?;
        check_len("attention", "output", out.len(), shape.n_tokens * qd)?;
        ops::attention(self.isa, q, k, v, kv, out, shape)
    }

    fn silu_mul(&self, gate: &mut Buffer, up: &Buffer, n: usize) -> Result<(), BackendError> {
        let (gate, up) = (cpu_mut(gate, "silu_mul")?, cpu(up, "silu_mul")?);
        check_len("silu_mul", "gate", gate.len(), n)?;
        check_len("silu_mul", "up", up.len(), n)?;
        ops::silu_mul(&mut gate[..n], &up[..n]);
        Ok(())
    }

    fn add(&self, x: &mut Buffer, y: &Buffer, n: usize) -> Result<(), BackendError> {
        let (x, y) = (cpu_mut(x, "add")?, cpu(y, "add")?);
        check_len("add", "x", x.len(), n)?;
        check_len("add", "y", y.len(), n)?;
        x[..n].iter_mut().zip(&y[..n]).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn copy(&self, src: &Buffer, src_off: usize, dst: &mut Buffer, dst_off: usize, n: usize) -> Result<(), BackendError> {
        let (src, dst) = (cpu(src, "copy")?, cpu_mut(dst, "copy")?);
        check_len("copy", "source", src.len(), src_off + n)?;
        check_len("copy", "destination", dst.len(), dst_off + n)?;
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
        Ok(())
    }

    fn kv_export(&self, kv: &KvLayer, len: usize, k: &mut [u16], v: &mut [u16]) -> Result<(), BackendError> {
        let (max_seq, kv_dim) = (&kv.max_seq, &kv.kv_dim);
        let CpuKv { k: kc, v: vc, .. } = kv.mem::<CpuKv>("kv_export")?;
        let n = len * kv_dim;
        if len > *max_seq || k.len() < n || v.len() < n {
            return Err(BackendError::InvalidArgument { op: "kv_export", reason: format!("{len} positions of {kv_dim} do not fit") });
        }
        k[..n].copy_from_slice(&kc[..n]);
        v[..n].copy_from_slice(&vc[..n]);
        Ok(())
    }

    fn kv_import(&self, kv: &mut KvLayer, len: usize, k: &[u16], v: &[u16]) -> Result<(), BackendError> {
        let (max_seq, kv_dim) = (kv.max_seq, kv.kv_dim);
        let CpuKv { k: kc, v: vc, .. } = kv.mem_mut::<CpuKv>("kv_import")?;
        let n = len * kv_dim;
        if len > max_seq || k.len() < n || v.len() < n {
            return Err(BackendError::InvalidArgument { op: "kv_import", reason: format!("{len} positions of {kv_dim} do not fit a cache of {max_seq}") });
        }
        kc[..n].copy_from_slice(&k[..n]);
        vc[..n].copy_from_slice(&v[..n]);
        Ok(())
    }
}

impl FusedOps for CpuBackend {}

impl CpuBackend {
    fn products(&self, ws: &[&Linear], outs: &mut [&mut Buffer], n_tokens: usize, cols: usize, xq: &QuantizedActivations) -> Result<(), BackendError> {
        if n_tokens == 1 {
            fn make<'a>(w: &'a Linear, out: &'a mut Buffer) -> Result<kernels::MatvecJob<'a>, BackendError> {
                let y = cpu_mut(out, "matmul")?;
                check_len("matmul", &w.name, y.len(), w.rows)?;
                Ok(kernels::MatvecJob { dtype: w.dtype, w: weight_bytes(w, "matmul")?, rows: w.rows, y: &mut y[..w.rows] })
            }
            // Fixed-size job lists: no allocation per token.
            match (ws, outs) {
                ([a], [ya]) => kernels::matvec_many_with(self.isa, &mut [make(a, ya)?], cols, xq),
                ([a, b], [ya, yb]) => kernels::matvec_many_with(self.isa, &mut [make(a, ya)?, make(b, yb)?], cols, xq),
                ([a, b, c], [ya, yb, yc]) => kernels::matvec_many_with(self.isa, &mut [make(a, ya)?, make(b, yb)?, make(c, yc)?], cols, xq),
                (ws, outs) => {
                    for (w, out) in ws.iter().zip(outs.iter_mut()) {
                        kernels::matvec_many_with(self.isa, &mut [make(w, out)?], cols, xq);
                    }
                }
            }
        } else {
            for (w, out) in ws.iter().zip(outs.iter_mut()) {
                let y = cpu_mut(out, "matmul")?;
                check_len("matmul", &w.name, y.len(), w.rows * n_tokens)?;
                kernels::matmul_with(self.isa, w.dtype, weight_bytes(w, "matmul")?, w.rows, cols, xq, n_tokens, &mut y[..w.rows * n_tokens]);
            }
        }
        Ok(())
    }
}
