//! Activations rounded once per product into the encoding each weight format pairs with
//! ([`crate::quant::ActFormat`], ggml's `vec_dot_type`), reproducing ggml's x86 quantizer bit for
//! bit.

use super::*;

/// Activations quantized once per matvec and reused for every row, the way ggml does
/// (`vec_dot_type`): Q4_0/Q4_1/Q8_0 -> Q8 blocks (carrying both the Q8_0 and the Q8_1 sums),
/// K-quants -> Q8_K, F16 -> values rounded to f16, BF16 -> rounded to bf16, F32 -> f32.
/// One value serves every weight type of the same family, so q/k/v (or gate/up) share it.
/// Buffers are reused: no allocation after the first call at a given size.
#[derive(Debug)]
pub struct QuantizedActivations {
    /// What the last call produced (`None` before the first).
    pub(super) kind: Option<ActFormat>,
    pub(super) cols: usize,
    pub(super) n_tokens: usize,
    /// Float kinds: `n_tokens * cols` values.
    pub(super) f: Vec<f32>,
    /// Q8 / Q8_K: `n_tokens * cols` quants.
    pub(super) q: Vec<i8>,
    /// Q8: the same quants with each block pair reordered as [lo(b0), lo(b1), hi(b0), hi(b1)]
    /// (16 bytes each), the order the AVX-512 Q4 kernels unpack nibbles in.
    pub(super) q_pair: Vec<i8>,
    /// Q8: per block `[d, s]` with `s = f16(d · Σq)` (Q8_1, for Q4_1 weights).
    pub(super) ds1: Vec<f32>,
    /// Q8: per block `[d, -8 · d · Σq]` (the Q4_0 offset folded in as a "min" term).
    pub(super) ds0: Vec<f32>,
    /// Q8_K: per super-block scale.
    pub(super) dk: Vec<f32>,
    /// Q8_K: sums of each 16 quants.
    pub(super) bsums: Vec<i16>,
}

impl Default for QuantizedActivations {
    fn default() -> Self {
        Self::new()
    }
}

/// One token's activations, borrowed from a [`QuantizedActivations`].
#[derive(Clone, Copy)]
pub(super) struct Act<'a> {
    pub(super) f: &'a [f32],
    pub(super) q: &'a [i8],
    pub(super) q_pair: &'a [i8],
    pub(super) ds1: &'a [f32],
    pub(super) ds0: &'a [f32],
    pub(super) dk: &'a [f32],
    pub(super) bsums: &'a [i16],
}

impl QuantizedActivations {
    pub fn new() -> Self {
        QuantizedActivations {
            kind: None,
            cols: 0,
            n_tokens: 0,
            f: Vec::new(),
            q: Vec::new(),
            q_pair: Vec::new(),
            ds1: Vec::new(),
            ds0: Vec::new(),
            dk: Vec::new(),
            bsums: Vec::new(),
        }
    }

    /// Number of columns (the length of one token's activation vector).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of tokens quantized by the last call.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Quantizes one activation vector for weights of type `weight_dtype`.
    pub fn quantize(&mut self, weight_dtype: DType, x: &[f32]) {
        self.quantize_batch(weight_dtype, x, 1, x.len());
    }

    /// Quantizes `n_tokens` activation vectors of `cols` values each (`x` is token-major).
    /// Panics if `x.len() != n_tokens * cols` or `cols` is not a multiple of the weight type's
    /// block size (caller bugs: shapes are validated at model load).
    pub fn quantize_batch(&mut self, weight_dtype: DType, x: &[f32], n_tokens: usize, cols: usize) {
        self.quantize_batch_with(isa(), weight_dtype, x, n_tokens, cols);
    }

    /// [`QuantizedActivations::quantize_batch`] with the kernels of `isa` (at most the CPU's).
    pub fn quantize_batch_with(&mut self, isa: Isa, weight_dtype: DType, x: &[f32], n_tokens: usize, cols: usize) {
        assert_eq!(x.len(), n_tokens * cols, "quantize_batch: {n_tokens} tokens × {cols} cols");
        assert!(
            cols.is_multiple_of(weight_dtype.block_elems()),
            "quantize_batch: {cols} cols is not a multiple of the {weight_dtype} block size {}",
            weight_dtype.block_elems()
        );
        let kind = Some(weight_dtype.activation());
        self.kind = kind;
        self.cols = cols;
        self.n_tokens = n_tokens;
        let n = n_tokens * cols;
        match kind {
            None => {}
            Some(ActFormat::F32) => {
                self.f.clear();
                self.f.extend_from_slice(x);
            }
            Some(ActFormat::F16) => {
                self.f.clear();
                self.f.extend(x.iter().map(|&v| f16_round(v)));
            }
            Some(ActFormat::BF16) => {
                self.f.clear();
                self.f.extend(x.iter().map(|&v| bf16_to_f32(bf16_bits(v))));
            }
            Some(ActFormat::Q8) => {
                let nb = n / QK;
                self.q.resize(n, 0);
                self.ds1.resize(2 * nb, 0.0);
                self.ds0.resize(2 * nb, 0.0);
                quantize_q8_act(isa, x, &mut self.q, &mut self.ds1, &mut self.ds0);
                self.q_pair.resize(n, 0);
                pair_order(&self.q, &mut self.q_pair, cols);
            }
            Some(ActFormat::Q8K) => {
                let nb = n / QK_K;
                self.q.resize(n, 0);
                self.dk.resize(nb, 0.0);
                self.bsums.resize(n / 16, 0);
                quantize_q8k_act(x, &mut self.q, &mut self.dk, &mut self.bsums);
            }
        }
    }

    /// The activations of token `t`.
    pub(super) fn token(&self, t: usize) -> Act<'_> {
        let c = self.cols;
        let (f, q, ds, dk, bs) = match self.kind {
            Some(ActFormat::F32 | ActFormat::F16 | ActFormat::BF16) => (c * t..c * (t + 1), 0..0, 0..0, 0..0, 0..0),
            Some(ActFormat::Q8) => {
                let nb = c / QK;
                (0..0, c * t..c * (t + 1), 2 * nb * t..2 * nb * (t + 1), 0..0, 0..0)
            }
            Some(ActFormat::Q8K) => {
                let nb = c / QK_K;
                (0..0, c * t..c * (t + 1), 0..0, nb * t..nb * (t + 1), c / 16 * t..c / 16 * (t + 1))
            }
            None => (0..0, 0..0, 0..0, 0..0, 0..0),
        };
        Act {
            f: &self.f[f],
            q: &self.q[q.clone()],
            q_pair: if self.kind == Some(ActFormat::Q8) { &self.q_pair[q] } else { &[] },
            ds1: &self.ds1[ds.clone()],
            ds0: &self.ds0[ds],
            dk: &self.dk[dk],
            bsums: &self.bsums[bs],
        }
    }

    pub(super) fn check(&self, what: &str, dtype: DType, cols: usize, n_tokens: usize) {
        let kind = self.kind.map_or("nothing".to_string(), |k| format!("{k:?}"));
        assert!(self.kind == Some(dtype.activation()), "{what}: activations were quantized as {kind}, {dtype} weights need {:?}", dtype.activation());
        assert!(
            self.cols == cols && self.n_tokens >= n_tokens,
            "{what}: activations hold {} tokens × {} cols, expected {n_tokens} × {cols}",
            self.n_tokens,
            self.cols
        );
    }
}

/// Q8_0/Q8_1 activation blocks as ggml's AVX2 `quantize_row_q8_0/q8_1` make them: scale
/// `amax/127`, multiplier `127/amax`, round half to even; the Q8_1 sum is `f16(d · Σq)` with the
/// unrounded `d`.
pub(super) fn quantize_q8_act(isa: Isa, x: &[f32], q: &mut [i8], ds1: &mut [f32], ds0: &mut [f32]) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        #[cfg(target_arch = "x86_64")]
        let simd = x86::quantize_q8_block(isa, xb, qb);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = None;
        let (d, sum) = match simd {
            Some(r) => r,
            None => {
                let _ = isa;
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (o, &v) in qb.iter_mut().zip(xb) {
                    let r = nearest_int(v * id);
                    *o = r as i8;
                    sum += r;
                }
                (amax / 127.0, sum)
            }
        };
        let d16 = f16_round(d);
        ds1[2 * b] = d16;
        ds1[2 * b + 1] = f16_round(d * sum as f32);
        ds0[2 * b] = d16;
        ds0[2 * b + 1] = -8.0 * d16 * sum as f32;
    }
}

/// Copies each token's quants (`cols` per token) with every block pair reordered as
/// [lo(b0), lo(b1), hi(b0), hi(b1)]; an odd last block stays as is.
pub(super) fn pair_order(q: &[i8], out: &mut [i8], cols: usize) {
    for (qt, ot) in q.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mut pairs = qt.chunks_exact(2 * QK);
        let mut outs = ot.chunks_exact_mut(2 * QK);
        for (src, dst) in (&mut pairs).zip(&mut outs) {
            dst[..16].copy_from_slice(&src[..16]);
            dst[16..32].copy_from_slice(&src[32..48]);
            dst[32..48].copy_from_slice(&src[16..32]);
            dst[48..].copy_from_slice(&src[48..]);
        }
        outs.into_remainder().copy_from_slice(pairs.remainder());
    }
}

/// ggml's `quantize_row_q8_K_ref` (the x86 build uses it as is).
pub(super) fn quantize_q8k_act(x: &[f32], q: &mut [i8], dk: &mut [f32], bsums: &mut [i16]) {
    for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K)).enumerate() {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let sums = &mut bsums[16 * b..16 * b + 16];
        if amax == 0.0 {
            dk[b] = 0.0;
            qb.fill(0);
            sums.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in sums.iter_mut().zip(qb.chunks_exact(16)) {
            *s = g.iter().map(|&v| i16::from(v)).sum();
        }
        dk[b] = 1.0 / iscale;
    }
}
