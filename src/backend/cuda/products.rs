//! Matrix products on the device: one-token matvec kernels (weights in their stored blocks,
//! norms and the rotation fused in front), and dequantize + cuBLAS for prefill.

use super::*;

/// A one-token product's input arguments (see [`CudaBackend::product_input`]).
pub(super) struct ProductInput {
    pub(super) x: CUdeviceptr,
    pub(super) norm_w: CUdeviceptr,
    pub(super) eps: f32,
    pub(super) prep: i32,
    pub(super) xq: CUdeviceptr,
    pub(super) ds: CUdeviceptr,
    pub(super) smem: u32,
}

/// Activations `act_prep` wrote: rounded values, and for 8-bit activations the quants and a pair
/// per 32 values: (d, s) of each Q8 block, or (d of the super-block, sum of the group's quants)
/// for Q8_K (0 otherwise).
pub(super) struct Prepared {
    pub(super) y: CUdeviceptr,
    pub(super) q8: CUdeviceptr,
    pub(super) ds: CUdeviceptr,
}

impl CudaBackend {
    /// `y[t] (+)= W · x[t]` for `n` tokens: matvec kernels for one token, dequantize + cuBLAS
    /// SGEMM for more.
    pub(super) fn product(&self, ws: &[&Linear], x: CUdeviceptr, ys: &[CUdeviceptr], n: usize, add: bool) -> Result<(), BackendError> {
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
    pub(super) fn dense_plan(&self, w: &Linear, matrices: usize) -> Option<DensePlan> {
        let plan = if self.dense { dense_plan(w.dtype, w.rows, w.cols, matrices)? } else { return None };
        let per_sm = match self.dense_per_sm {
            Some(n) if plan.rows_per_group == 4 => n,
            _ => plan.per_sm,
        };
        let fit = if matrices == 2 { self.k.dense_ffn_fit } else { self.k.dense_fit }[plan.dtype][plan.chunks];
        Some(plan.fitted(per_sm, fit))
    }

    /// The row steps that bound a product's k-slices (`DRIFTWOOD_CUDA_SLICE_CAP=0`: no bound).
    pub(super) fn steps_cap(&self, w: &Linear) -> usize {
        if self.slice_cap {
            warp_steps(w.dtype, w.cols)
        } else {
            8
        }
    }

    /// Blocks for a one-token product of `groups` row groups: at most `max_blocks` (about one
    /// wave), each block taking every gridDim-th group (see `matvec` in kernels.cu).
    pub(super) fn product_blocks(&self, groups: usize) -> u32 {
        let cap = if self.max_blocks == 0 { groups } else { self.max_blocks };
        groups.min(cap).max(1) as u32
    }

    /// Runs `act_prep` on `n` tokens of `cols` activations into scratch: RMS-normalized with
    /// `norm` when given, then rounded as the CPU engine rounds activations for `dtype` weights.
    pub(super) fn prepare(&self, x: CUdeviceptr, n: usize, cols: usize, norm: Option<(CUdeviceptr, f32)>, dtype: DType) -> Result<Prepared, BackendError> {
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
    pub(super) fn matvec(&self, ws: &[&Linear], x: CUdeviceptr, ys: &[CUdeviceptr], add: bool, norm: Option<(CUdeviceptr, f32)>) -> Result<(), BackendError> {
        self.matvec_rope(ws, x, ys, add, norm, NO_ROPE)
    }

    /// [`CudaBackend::matvec`] with an optional fused rotation + cache write (q/k/v only).
    pub(super) fn matvec_rope(
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
    pub(super) fn product_input(&self, x: CUdeviceptr, w: &Linear, norm: Option<(CUdeviceptr, f32)>) -> Result<ProductInput, BackendError> {
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
    pub(super) fn gemm_weights(&self, w: &Linear, x: CUdeviceptr, y: CUdeviceptr, n: usize, add: bool) -> Result<(), BackendError> {
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

    /// Row-major `C[m×n] = A[m×k] · B[k×n]` through cuBLAS (column-major: `C^T = B^T · A^T`).
    pub(super) fn sgemm_row_major(&self, a: usize, b: usize, c: usize, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
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
}
