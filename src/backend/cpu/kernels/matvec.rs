//! Row kernels and the parallel drivers over them: matvec (one token, rows in one sequential
//! stream split over the rayon pool), several matrices in one dispatch, and the tiled matmul of
//! prefill.

use super::*;

/// Computes `y.len()` consecutive rows of `w` (packed, `cols` each) against one token.
/// `w.len()` must be `y.len() * row_bytes(cols)` (checked by callers).
pub(super) fn rows_kernel(isa: Isa, dtype: DType, w: &[u8], cols: usize, a: Act<'_>, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::rows(isa, dtype, w, cols, a, y) {
            return;
        }
    }
    let _ = isa;
    let rb = dtype.row_bytes(cols).unwrap_or(0);
    for (r, o) in y.iter_mut().enumerate() {
        *o = dot_scalar(dtype, &w[r * rb..(r + 1) * rb], a);
    }
}

/// Computes rows of `w` against up to four tokens at once: `ys[t][r] = W[r,:] · acts[t]`.
/// Weight blocks are unpacked once per tile; falls back to one token at a time where no tiled
/// kernel exists.
pub(super) fn rows_kernel_tokens(isa: Isa, dtype: DType, w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::rows_tokens(isa, dtype, w, cols, acts, ys) {
            return;
        }
    }
    for (a, y) in acts.iter().zip(ys.iter_mut()) {
        rows_kernel(isa, dtype, w, cols, *a, y);
    }
}

// ---------------------------------------------------------------------------------------------
// Parallel drivers
// ---------------------------------------------------------------------------------------------

/// Work below this many weight bytes runs on the calling thread: a rayon dispatch costs more.
pub(super) const SERIAL_BYTES: usize = 48 * 1024;
/// Aim for chunks of about this many weight bytes (large enough to amortize task overhead,
/// small enough for work stealing to balance two threads).
pub(super) const CHUNK_BYTES: usize = 192 * 1024;

/// Rows per parallel matvec chunk for a matrix of `rows` rows of `row_bytes` each, a multiple
/// of 4; `rows` itself when the work should stay on one thread.
pub(super) fn chunk_rows(rows: usize, row_bytes: usize) -> usize {
    let threads = rayon::current_num_threads();
    let bytes = rows.saturating_mul(row_bytes);
    if threads <= 1 || bytes < SERIAL_BYTES || rows < 8 {
        return rows.max(1);
    }
    let n_chunks = (bytes / CHUNK_BYTES).max(2 * threads);
    let per = rows.div_ceil(n_chunks);
    per.div_ceil(4) * 4
}

/// `y[r] = W[r,:] · x` for `rows` rows of `cols` (weights row-major, packed blocks), with rows
/// split across the current rayon pool. `xq` must have been quantized for `dtype` with `cols`
/// columns; only token 0 is used.
pub fn matvec(dtype: DType, w: &[u8], rows: usize, cols: usize, xq: &QuantizedActivations, y: &mut [f32]) {
    matvec_with(isa(), dtype, w, rows, cols, xq, y);
}

pub(super) fn matvec_with(isa: Isa, dtype: DType, w: &[u8], rows: usize, cols: usize, xq: &QuantizedActivations, y: &mut [f32]) {
    xq.check("matvec", dtype, cols, 1);
    let rb = row_bytes_checked("matvec", dtype, w, rows, cols);
    assert_eq!(y.len(), rows, "matvec: output has {} rows, expected {rows}", y.len());
    let a = xq.token(0);
    let per = chunk_rows(rows, rb);
    if per >= rows {
        rows_kernel(isa, dtype, w, cols, a, y);
        return;
    }
    y.par_chunks_mut(per).zip(w.par_chunks(per * rb)).for_each(|(yc, wc)| rows_kernel(isa, dtype, wc, cols, a, yc));
}

pub(super) fn row_bytes_checked(what: &str, dtype: DType, w: &[u8], rows: usize, cols: usize) -> usize {
    let rb = dtype.row_bytes(cols);
    assert!(
        rb.is_some_and(|rb| rb.checked_mul(rows) == Some(w.len())),
        "{what}: {rows} × {cols} {dtype} weights need {:?} bytes, got {}",
        rb.map(|rb| rb * rows),
        w.len()
    );
    rb.unwrap_or(0)
}

/// One matrix of a [`matvec_many`] call.
pub struct MatvecJob<'a> {
    pub dtype: DType,
    /// `rows × cols` packed weights.
    pub w: &'a [u8],
    pub rows: usize,
    /// `rows` outputs.
    pub y: &'a mut [f32],
}

/// Several matvecs over the same input (q/k/v, gate/up) in one parallel dispatch. All jobs
/// share `cols` and `xq`, so their dtypes must share an activation type (e.g. all of Q4_0,
/// Q4_1, Q8_0, or all K-quants).
pub fn matvec_many(jobs: &mut [MatvecJob<'_>], cols: usize, xq: &QuantizedActivations) {
    matvec_many_with(isa(), jobs, cols, xq);
}

/// [`matvec_many`] with the kernels of `isa` (at most the CPU's).
pub fn matvec_many_with(isa: Isa, jobs: &mut [MatvecJob<'_>], cols: usize, xq: &QuantizedActivations) {
    let mut total = 0usize;
    for job in jobs.iter() {
        xq.check("matvec_many", job.dtype, cols, 1);
        let rb = row_bytes_checked("matvec_many", job.dtype, job.w, job.rows, cols);
        assert_eq!(job.y.len(), job.rows, "matvec_many: output has {} rows, expected {}", job.y.len(), job.rows);
        total += rb * job.rows;
    }
    let a = xq.token(0);
    let run = |job: &mut MatvecJob<'_>| {
        let rb = job.dtype.row_bytes(cols).unwrap_or(0);
        let per = chunk_rows(job.rows, rb);
        if per >= job.rows {
            rows_kernel(isa, job.dtype, job.w, cols, a, job.y);
        } else {
            let dtype = job.dtype;
            job.y.par_chunks_mut(per).zip(job.w.par_chunks(per * rb)).for_each(|(yc, wc)| rows_kernel(isa, dtype, wc, cols, a, yc));
        }
    };
    if total < SERIAL_BYTES || rayon::current_num_threads() <= 1 {
        jobs.iter_mut().for_each(run);
    } else {
        jobs.par_iter_mut().for_each(run);
    }
}

/// Raw output pointer shared by matmul tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(*mut f32);
// SAFETY: matmul tasks write disjoint (token, row) ranges through it; see `matmul_with`.
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer is only used to build non-overlapping slices.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not a field access) so closures capture the whole Send/Sync wrapper.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `Y[t*rows + r] = W[r,:] · X[t,:]` for `n_tokens` tokens (prefill). `xq` must come from
/// [`QuantizedActivations::quantize_batch`] with at least `n_tokens` tokens of `cols`. Rows are
/// split into chunks that stay in cache while every token passes over them; inside a chunk,
/// tokens go four at a time so each weight block is unpacked once per four tokens.
pub fn matmul(dtype: DType, w: &[u8], rows: usize, cols: usize, xq: &QuantizedActivations, n_tokens: usize, y: &mut [f32]) {
    matmul_with(isa(), dtype, w, rows, cols, xq, n_tokens, y);
}

#[allow(clippy::too_many_arguments)]
/// [`matmul`] with the kernels of `isa` (at most the CPU's).
pub fn matmul_with(isa: Isa, dtype: DType, w: &[u8], rows: usize, cols: usize, xq: &QuantizedActivations, n_tokens: usize, y: &mut [f32]) {
    xq.check("matmul", dtype, cols, n_tokens);
    let rb = row_bytes_checked("matmul", dtype, w, rows, cols);
    assert_eq!(y.len(), rows * n_tokens, "matmul: output has {} values, expected {rows} × {n_tokens}", y.len());
    if rows == 0 || n_tokens == 0 {
        return;
    }
    // Row chunks of at most ~64 KiB of weights stay in L2 while all tokens pass over them, and
    // there are at least four per thread so work stealing can balance them.
    let threads = rayon::current_num_threads();
    let per = if threads <= 1 || rows.saturating_mul(rb).saturating_mul(n_tokens) < SERIAL_BYTES {
        rows
    } else {
        let by_cache = 64 * 1024 / rb.max(1);
        let by_balance = rows.div_ceil(4 * threads);
        by_cache.min(by_balance).max(4).div_ceil(4) * 4
    };
    let n_chunks = rows.div_ceil(per);
    let out = OutPtr(y.as_mut_ptr());
    let task = |c: usize| {
        let r0 = c * per;
        let r1 = (r0 + per).min(rows);
        let wc = &w[r0 * rb..r1 * rb];
        let mut t = 0;
        while t < n_tokens {
            let tn = (n_tokens - t).min(4);
            let acts: [Act<'_>; 4] = std::array::from_fn(|k| xq.token(t + k.min(tn - 1)));
            // SAFETY: `y` has `rows * n_tokens` elements and outlives this call; chunk `c` owns
            // rows r0..r1 of every token, so the slices built here never overlap those of
            // another task or of another token within this task.
            let mut ys: [&mut [f32]; 4] = std::array::from_fn(|k| unsafe {
                let tk = t + k.min(tn - 1);
                if k < tn {
                    std::slice::from_raw_parts_mut(out.ptr().add(tk * rows + r0), r1 - r0)
                } else {
                    &mut []
                }
            });
            rows_kernel_tokens(isa, dtype, wc, cols, &acts[..tn], &mut ys[..tn]);
            t += tn;
        }
    };
    if n_chunks <= 1 {
        task(0);
    } else {
        (0..n_chunks).into_par_iter().for_each(task);
    }
}
