//! The CPU implementation of the model ops: norms, RoPE, attention over an f16 KV cache,
//! activations. Matrix products live in `kernels/` (packed-block kernels).

use half::f16;
use rayon::prelude::*;

use super::kernels;
use crate::backend::{foreign, AttentionShape, BackendError, Buffer, KvLayer, Linear, Rope, RopeStyle, WeightData};

/// The CPU's memory behind a [`Buffer`]: its f32 values.
pub(super) fn cpu<'a>(b: &'a Buffer, op: &'static str) -> Result<&'a [f32], BackendError> {
    b.mem::<Vec<f32>>(op).map(Vec::as_slice)
}

pub(super) fn cpu_mut<'a>(b: &'a mut Buffer, op: &'static str) -> Result<&'a mut [f32], BackendError> {
    b.mem_mut::<Vec<f32>>(op).map(Vec::as_mut_slice)
}

/// The CPU's memory behind a [`KvLayer`]: K and V as f16 bits, and the attention scores scratch.
pub(super) struct CpuKv {
    pub k: Vec<u16>,
    pub v: Vec<u16>,
    pub scores: Vec<f32>,
}

pub(super) fn weight_bytes<'a>(w: &'a Linear, op: &'static str) -> Result<&'a [u8], BackendError> {
    match &w.data {
        WeightData::Host(bytes) => Ok(bytes),
        WeightData::Device(_) => Err(foreign(op)),
    }
}

pub(super) fn check_len(op: &'static str, what: &str, have: usize, need: usize) -> Result<(), BackendError> {
    if have < need {
        return Err(BackendError::InvalidArgument { op, reason: format!("{what} holds {have} values, needs {need}") });
    }
    Ok(())
}

pub fn rms_norm(x: &[f32], w: &[f32], out: &mut [f32], rows: usize, dim: usize, eps: f32) {
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, xi), wi) in out[r * dim..(r + 1) * dim].iter_mut().zip(xr).zip(w) {
            *o = xi * scale * wi;
        }
    }
}

pub fn rope(x: &mut [f32], rope: &Rope, n_tokens: usize, n_heads: usize, pos0: usize) {
    let hd = rope.head_dim;
    let half = hd / 2;
    let mut cs = [(0f32, 0f32); 256];
    for t in 0..n_tokens {
        let p = (pos0 + t) as f32;
        for (i, c) in cs.iter_mut().take(half).enumerate() {
            let theta = p * rope.inv_freq[i];
            *c = (theta.cos(), theta.sin());
        }
        for h in 0..n_heads {
            let v = &mut x[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
            for (i, &(cos, sin)) in cs.iter().take(half).enumerate() {
                let (a, b) = match rope.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * cos - x1 * sin;
                v[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Dot product of f32 `q` with an f16 row.
#[inline]
fn dot_f16(isa: kernels::Isa, q: &[f32], k: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= kernels::Isa::Avx2 && q.len().is_multiple_of(8) {
            // SAFETY: AVX2/F16C/FMA are present (isa() detected them); lengths are equal multiples of 8.
            return unsafe { dot_f16_avx2(q, k) };
        }
    }
    q.iter().zip(k).map(|(a, b)| a * f16::from_bits(*b).to_f32()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(q: &[f32], k: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(k.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n for both slices.
        unsafe {
            let kh = _mm_loadu_si128(k.as_ptr().add(i) as *const __m128i);
            let kf = _mm256_cvtph_ps(kh);
            let qf = _mm256_loadu_ps(q.as_ptr().add(i));
            acc = _mm256_fmadd_ps(qf, kf, acc);
        }
        i += 8;
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_hadd_ps(s, s);
    let s = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(s)
}

/// `out += w * row` with an f16 row.
#[inline]
fn axpy_f16(isa: kernels::Isa, out: &mut [f32], w: f32, row: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= kernels::Isa::Avx2 && out.len().is_multiple_of(8) {
            // SAFETY: as in `dot_f16`.
            return unsafe { axpy_f16_avx2(out, w, row) };
        }
    }
    for (o, r) in out.iter_mut().zip(row) {
        *o += w * f16::from_bits(*r).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_avx2(out: &mut [f32], w: f32, row: &[u16]) {
    use std::arch::x86_64::*;
    let n = out.len().min(row.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n for both slices.
        unsafe {
            let r = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(i) as *const __m128i));
            let o = _mm256_loadu_ps(out.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(wv, r, o));
        }
        i += 8;
    }
}

fn to_f16_bits(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s).to_bits();
    }
}

/// Writes the new K/V rows into the cache, then causal attention for each new token.
/// `isa`: the SIMD level of the f16 dot products (at most the CPU's).
pub fn attention(isa: kernels::Isa, q: &[f32], k: &[f32], v: &[f32], kv: &mut KvLayer, out: &mut [f32], s: AttentionShape) -> Result<(), BackendError> {
    let (max_seq, kv_dim) = (kv.max_seq, kv.kv_dim);
    let CpuKv { k: kc, v: vc, scores } = kv.mem_mut::<CpuKv>("attention")?;
    let (hd, nh, nkv) = (s.head_dim, s.n_heads, s.n_kv_heads);
    if s.pos0 + s.n_tokens > max_seq {
        return Err(BackendError::InvalidArgument {
            op: "attention",
            reason: format!("positions up to {} exceed the cache of {max_seq}", s.pos0 + s.n_tokens),
        });
    }
    debug_assert_eq!(kv_dim, nkv * hd);
    let kvd = kv_dim;
    to_f16_bits(&k[..s.n_tokens * kvd], &mut kc[s.pos0 * kvd..(s.pos0 + s.n_tokens) * kvd]);
    to_f16_bits(&v[..s.n_tokens * kvd], &mut vc[s.pos0 * kvd..(s.pos0 + s.n_tokens) * kvd]);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let (kc, vc) = (&*kc, &*vc);
    // One task per (token, head); each owns its output slice and a scores row.
    let work = |(idx, (o, sc)): (usize, (&mut [f32], &mut [f32]))| {
        let (t, h) = (idx / nh, idx % nh);
        let n_ctx = s.pos0 + t + 1;
        let qh = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
        let kvh = h / group;
        let sc = &mut sc[..n_ctx];
        let mut max = f32::NEG_INFINITY;
        for (j, slot) in sc.iter_mut().enumerate() {
            let kr = &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
            *slot = dot_f16(isa, qh, kr) * scale;
            max = max.max(*slot);
        }
        let mut sum = 0.0;
        for slot in sc.iter_mut() {
            *slot = (*slot - max).exp();
            sum += *slot;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (j, &p) in sc.iter().enumerate() {
            axpy_f16(isa, o, p * inv, &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]);
        }
    };
    let out = &mut out[..s.n_tokens * nh * hd];
    let n_tasks = s.n_tokens * nh;
    // Scores scratch: one row of max_seq per head; prefill reuses rows token by token.
    if scores.len() < nh * max_seq {
        scores.resize(nh * max_seq, 0.0);
    }
    for t in 0..s.n_tokens {
        let o = &mut out[t * nh * hd..(t + 1) * nh * hd];
        let n_ctx = s.pos0 + t + 1;
        if n_ctx * nh < 2048 {
            o.chunks_mut(hd).zip(scores.chunks_mut(max_seq)).enumerate().for_each(|(h, x)| work((t * nh + h, x)));
        } else {
            o.par_chunks_mut(hd).zip(scores.par_chunks_mut(max_seq)).enumerate().for_each(|(h, x)| work((t * nh + h, x)));
        }
    }
    debug_assert!(n_tasks > 0);
    Ok(())
}
