//! CPU kernels for ggml-quantized weights: (de)quantization, dot products, matvec and matmul.
//!
//! Weights stay in ggml's packed block layout (straight from the GGUF mapping, never repacked).
//! Activations are quantized once per matvec into the type ggml pairs with each weight type
//! (its `vec_dot_type`) and reused for every row: Q4_0/Q4_1/Q8_0 weights meet Q8 activations,
//! K-quants meet Q8_K, F16/BF16 weights meet activations rounded to f16/bf16, F32 meets f32. The
//! activation quantizer reproduces ggml's x86 one bit for bit (scale `amax/127`, multiplier
//! `127/amax`, round half to even), so integer block sums equal llama.cpp's and only the order of
//! float additions differs.
//!
//! Every dtype has a scalar reference ([`dot_row_reference`]); every dtype also has SIMD
//! kernels chosen at run time ([`isa`]): AVX-512 VNNI for Q4_0/Q4_1/Q8_0 and F32/F16/BF16, AVX2
//! (maddubs) for all of them plus Q4_K/Q5_K/Q6_K. Decode is memory-bound, so [`matvec`] walks
//! rows one after another (one sequential stream, which the prefetchers follow best) and splits
//! them over the current rayon pool; [`matvec_many`] runs several matrices in one dispatch;
//! [`matmul`] (prefill) tiles four rows × four tokens so each weight block is unpacked once per
//! sixteen dot products.

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use crate::engine::dtype::{DType, QK, QK_K};

// ---------------------------------------------------------------------------------------------
// Instruction set selection
// ---------------------------------------------------------------------------------------------

/// The SIMD level the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI (plus AVX2, FMA, F16C).
    Avx512,
}

impl Isa {
    /// Parses the names `DRIFTWOOD_CPU_ISA` and `--device cpu:ISA` take.
    pub fn parse(s: &str) -> Option<Isa> {
        match s {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512-vnni" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// The best level this CPU has.
    pub fn best() -> Isa {
        detect_isa()
    }

    /// Short name for benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512-vnni",
        }
    }
}

/// The level the kernels use, detected once: the best the CPU has (AVX-512 VNNI on Zen 4,
/// where it decodes a few percent faster than AVX2 and is as accurate);
/// `DRIFTWOOD_CPU_ISA=scalar|avx2|avx512` caps it, for comparisons. Every level gives a prefill
/// tile bit for bit what one-token decode gives (see
/// `avx512_q4_matches_scalar_on_outlier_activations`). Never above what the CPU has.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detect_isa();
        let wanted = match std::env::var("DRIFTWOOD_CPU_ISA").ok().as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detected.min(wanted)
    })
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Levels usable on this machine, lowest first (for tests comparing kernels).
#[cfg(test)]
fn available_isas() -> Vec<Isa> {
    let best = detect_isa();
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect()
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline]
fn f16_bits(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[inline]
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaN kept quiet.
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[inline]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// ggml's `nearest_int` (round half to even) for the values it is used on; saturates beyond.
#[inline]
fn nearest_int(x: f32) -> i32 {
    if x.abs() <= 4_194_303.0 {
        // ggml's trick: adding 1.5·2^23 leaves the rounded integer in the low mantissa bits.
        // (Plain `round_ties_even` becomes a libm call on baseline x86-64.)
        ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
    } else {
        x.round_ties_even() as i32
    }
}

/// ggml's `get_scale_min_k4`: 6-bit scale and min `j` of a Q4_K/Q5_K super-block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn check_row(what: &str, dtype: DType, n: usize, bytes: usize) {
    let need = dtype.row_bytes(n);
    assert!(need == Some(bytes), "{what}: {n} {dtype} elements need {need:?} bytes, got {bytes}");
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Expands one packed row of `dtype` into f32 (`dst.len()` elements). Panics if `src` is not
/// exactly the row's size (a caller bug: shapes are validated when a model is loaded).
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    check_row("dequantize_row", dtype, dst.len(), src.len());
    let bs = dtype.block_bytes();
    match dtype {
        DType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::Q8_0 => {
            for (b, o) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..]) {
                    *v = f32::from(q as i8) * d;
                }
            }
        }
        DType::Q4_0 => {
            for (b, o) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = (i32::from(q & 0xF) - 8) as f32 * d;
                    o[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
                }
            }
        }
        DType::Q4_1 => {
            for (b, o) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = f32::from(q & 0xF) * d + m;
                    o[j + 16] = f32::from(q >> 4) * d + m;
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            for (b, o) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, ql) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for j in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
                    for l in 0..32 {
                        let q = ql[32 * j + l];
                        let (mut lo, mut hi) = (q & 0xF, q >> 4);
                        if five {
                            lo += ((qh[l] >> (2 * j)) & 1) << 4;
                            hi += ((qh[l] >> (2 * j + 1)) & 1) << 4;
                        }
                        o[64 * j + l] = d1 * f32::from(lo) - m1;
                        o[64 * j + 32 + l] = d2 * f32::from(hi) - m2;
                    }
                }
            }
        }
        DType::Q6_K => {
            for (b, o) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, 208);
                for n in 0..2 {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    let o = &mut o[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = q6_quad(ql, qh, l);
                        for (k, &qk) in q.iter().enumerate() {
                            o[l + 32 * k] = d * f32::from(sc[is + 2 * k] as i8) * f32::from(qk);
                        }
                    }
                }
            }
        }
    }
}

/// The four 6-bit values (minus 32) that Q6_K stores around position `l` of a 128-half.
#[inline]
fn q6_quad(ql: &[u8], qh: &[u8], l: usize) -> [i8; 4] {
    let h = qh[l];
    [
        ((ql[l] & 0xF) | ((h & 3) << 4)) as i8 - 32,
        ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32,
        ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32,
        ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32,
    ]
}

// ---------------------------------------------------------------------------------------------
// Quantization (ggml's `quantize_row_*_ref`, used to write model files)
// ---------------------------------------------------------------------------------------------

/// Packs one row of f32 into `dtype` exactly as ggml's reference quantizers do (the functions
/// llama-quantize uses without an importance matrix). Panics if `dst` is not the row's size.
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    check_row("quantize_row", dtype, src.len(), dst.len());
    let bs = dtype.block_bytes();
    match dtype {
        DType::F32 => {
            for (c, &v) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, &v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16_bits(v));
            }
        }
        DType::BF16 => {
            for (c, &v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16_bits(v).to_le_bytes());
            }
        }
        DType::Q8_0 => {
            for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(bs)) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f16_bits(d));
                for (o, &v) in b[2..].iter_mut().zip(x) {
                    *o = ((v * id).round() as i8) as u8;
                }
            }
        }
        DType::Q4_0 => {
            for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(bs)) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f16_bits(d));
                for j in 0..16 {
                    let x0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
                    let x1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
                    b[2 + j] = x0 | (x1 << 4);
                }
            }
        }
        DType::Q4_1 => {
            for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(bs)) {
                let min = x.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
                let max = x.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[..2].copy_from_slice(&f16_bits(d));
                b[2..4].copy_from_slice(&f16_bits(min));
                for j in 0..16 {
                    let x0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
                    let x1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
                    b[4 + j] = x0 | (x1 << 4);
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(bs)) {
                quantize_block_q45_k(dtype == DType::Q5_K, x, b);
            }
        }
        DType::Q6_K => {
            for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(bs)) {
                quantize_block_q6_k(x, b);
            }
        }
    }
}

/// ggml's `make_qkx2_quants`: asymmetric `nmax`-level quantization of one sub-block, searching
/// the scale that minimizes the weighted error. Returns (scale, -min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(x: &[f32], weights: &[f32], nmax: i32, l_out: &mut [u8], laux: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (weights[0], weights[0] * x[0]);
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * diff * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(laux[i]) + this_min - x[i];
                cur_error += weights[i] * diff * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` for one super-block.
fn quantize_block_q45_k(five: bool, x: &[f32], b: &mut [u8]) {
    let nmax = if five { 31 } else { 15 };
    let (rmin, nstep) = if five { (-0.5, 15) } else { (-1.0, 20) };
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &weights, nmax, &mut l[32 * j..32 * j + 32], &mut laux, rmin, 0.1, nstep);
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut b[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    b[0..2].copy_from_slice(&f16_bits(max_scale / 63.0));
    b[2..4].copy_from_slice(&f16_bits(max_min / 63.0));
    let (d_all, dmin_all) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &b[4..16]);
        let d = d_all * f32::from(s);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    if five {
        let (qh, ql) = b[16..176].split_at_mut(32);
        qh.fill(0);
        for n in 0..4 {
            for j in 0..32 {
                let (mut l1, mut l2) = (l[64 * n + j], l[64 * n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= 1 << (2 * n);
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= 2 << (2 * n);
                }
                ql[32 * n + j] = l1 | (l2 << 4);
            }
        }
    } else {
        let q = &mut b[16..144];
        for n in 0..4 {
            for j in 0..32 {
                q[32 * n + j] = l[64 * n + j] | (l[64 * n + j + 32] << 4);
            }
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type == 1` and no importance weights.
fn make_qx_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l_out.fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * (l * l) as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * (l * l) as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
                l_out[i] = (nmax + l) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref` for one super-block.
fn quantize_block_q6_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    b[208..210].copy_from_slice(&f16_bits(1.0 / iscale));
    for ib in 0..16 {
        b[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = f16_at(b, 208);
    for j in 0..16 {
        let d = d_all * f32::from(b[192 + j] as i8);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    for n in 0..2 {
        let (j, ql, qh) = (128 * n, 64 * n, 128 + 32 * n);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            b[ql + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            b[ql + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            b[qh + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantized activations
// ---------------------------------------------------------------------------------------------

/// Which activation encoding a weight type is paired with (ggml's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    Empty,
    /// f32 as is (F32 weights).
    F32,
    /// f32 values rounded through f16 (F16 weights).
    F16,
    /// f32 values rounded through bf16 (BF16 weights).
    BF16,
    /// Q8_0 / Q8_1 blocks of 32 (Q4_0, Q4_1 and Q8_0 weights).
    Q8,
    /// Q8_K super-blocks of 256 (K-quant weights).
    Q8K,
}

fn act_kind(dtype: DType) -> ActKind {
    match dtype {
        DType::F32 => ActKind::F32,
        DType::F16 => ActKind::F16,
        DType::BF16 => ActKind::BF16,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => ActKind::Q8,
        DType::Q4_K | DType::Q5_K | DType::Q6_K => ActKind::Q8K,
    }
}

/// Activations quantized once per matvec and reused for every row, the way ggml does
/// (`vec_dot_type`): Q4_0/Q4_1/Q8_0 -> Q8 blocks (carrying both the Q8_0 and the Q8_1 sums),
/// K-quants -> Q8_K, F16 -> values rounded to f16, BF16 -> rounded to bf16, F32 -> f32.
/// One value serves every weight type of the same family, so q/k/v (or gate/up) share it.
/// Buffers are reused: no allocation after the first call at a given size.
#[derive(Debug)]
pub struct QuantizedActivations {
    kind: ActKind,
    cols: usize,
    n_tokens: usize,
    /// Float kinds: `n_tokens * cols` values.
    f: Vec<f32>,
    /// Q8 / Q8_K: `n_tokens * cols` quants.
    q: Vec<i8>,
    /// Q8: the same quants with each block pair reordered as [lo(b0), lo(b1), hi(b0), hi(b1)]
    /// (16 bytes each), the order the AVX-512 Q4 kernels unpack nibbles in.
    q_pair: Vec<i8>,
    /// Q8: per block `[d, s]` with `s = f16(d · Σq)` (Q8_1, for Q4_1 weights).
    ds1: Vec<f32>,
    /// Q8: per block `[d, -8 · d · Σq]` (the Q4_0 offset folded in as a "min" term).
    ds0: Vec<f32>,
    /// Q8_K: per super-block scale.
    dk: Vec<f32>,
    /// Q8_K: sums of each 16 quants.
    bsums: Vec<i16>,
}

impl Default for QuantizedActivations {
    fn default() -> Self {
        Self::new()
    }
}

/// One token's activations, borrowed from a [`QuantizedActivations`].
#[derive(Clone, Copy)]
struct Act<'a> {
    f: &'a [f32],
    q: &'a [i8],
    q_pair: &'a [i8],
    ds1: &'a [f32],
    ds0: &'a [f32],
    dk: &'a [f32],
    bsums: &'a [i16],
}

impl QuantizedActivations {
    pub fn new() -> Self {
        QuantizedActivations {
            kind: ActKind::Empty,
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
        let kind = act_kind(weight_dtype);
        self.kind = kind;
        self.cols = cols;
        self.n_tokens = n_tokens;
        let n = n_tokens * cols;
        match kind {
            ActKind::Empty => {}
            ActKind::F32 => {
                self.f.clear();
                self.f.extend_from_slice(x);
            }
            ActKind::F16 => {
                self.f.clear();
                self.f.extend(x.iter().map(|&v| f16_round(v)));
            }
            ActKind::BF16 => {
                self.f.clear();
                self.f.extend(x.iter().map(|&v| bf16_to_f32(bf16_bits(v))));
            }
            ActKind::Q8 => {
                let nb = n / QK;
                self.q.resize(n, 0);
                self.ds1.resize(2 * nb, 0.0);
                self.ds0.resize(2 * nb, 0.0);
                quantize_q8_act(isa, x, &mut self.q, &mut self.ds1, &mut self.ds0);
                self.q_pair.resize(n, 0);
                pair_order(&self.q, &mut self.q_pair, cols);
            }
            ActKind::Q8K => {
                let nb = n / QK_K;
                self.q.resize(n, 0);
                self.dk.resize(nb, 0.0);
                self.bsums.resize(n / 16, 0);
                quantize_q8k_act(x, &mut self.q, &mut self.dk, &mut self.bsums);
            }
        }
    }

    /// The activations of token `t`.
    fn token(&self, t: usize) -> Act<'_> {
        let c = self.cols;
        let (f, q, ds, dk, bs) = match self.kind {
            ActKind::F32 | ActKind::F16 | ActKind::BF16 => (c * t..c * (t + 1), 0..0, 0..0, 0..0, 0..0),
            ActKind::Q8 => {
                let nb = c / QK;
                (0..0, c * t..c * (t + 1), 2 * nb * t..2 * nb * (t + 1), 0..0, 0..0)
            }
            ActKind::Q8K => {
                let nb = c / QK_K;
                (0..0, c * t..c * (t + 1), 0..0, nb * t..nb * (t + 1), c / 16 * t..c / 16 * (t + 1))
            }
            ActKind::Empty => (0..0, 0..0, 0..0, 0..0, 0..0),
        };
        Act {
            f: &self.f[f],
            q: &self.q[q.clone()],
            q_pair: if self.kind == ActKind::Q8 { &self.q_pair[q] } else { &[] },
            ds1: &self.ds1[ds.clone()],
            ds0: &self.ds0[ds],
            dk: &self.dk[dk],
            bsums: &self.bsums[bs],
        }
    }

    fn check(&self, what: &str, dtype: DType, cols: usize, n_tokens: usize) {
        assert!(self.kind == act_kind(dtype), "{what}: activations were quantized as {:?}, {dtype} weights need {:?}", self.kind, act_kind(dtype));
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
fn quantize_q8_act(isa: Isa, x: &[f32], q: &mut [i8], ds1: &mut [f32], ds0: &mut [f32]) {
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
fn pair_order(q: &[i8], out: &mut [i8], cols: usize) {
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
fn quantize_q8k_act(x: &[f32], q: &mut [i8], dk: &mut [f32], bsums: &mut [i16]) {
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

// ---------------------------------------------------------------------------------------------
// Scalar reference dot products
// ---------------------------------------------------------------------------------------------

/// Q4_1 block × Q8_1 block (ggml `vec_dot_q4_1_q8_1` for one block).
#[inline]
fn block_q4_1(b: &[u8], y: &[i8], dy: f32, s: f32) -> f32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let q = b[4 + j];
        sumi += i32::from(q & 0xF) * i32::from(y[j]) + i32::from(q >> 4) * i32::from(y[j + 16]);
    }
    f16_at(b, 0) * dy * sumi as f32 + f16_at(b, 2) * s
}

/// Q4_0 block × Q8_0 block.
#[inline]
fn block_q4_0(b: &[u8], y: &[i8], dy: f32) -> f32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let q = b[2 + j];
        sumi += (i32::from(q & 0xF) - 8) * i32::from(y[j]) + (i32::from(q >> 4) - 8) * i32::from(y[j + 16]);
    }
    sumi as f32 * (f16_at(b, 0) * dy)
}

/// Q8_0 block × Q8_0 block.
#[inline]
fn block_q8_0(b: &[u8], y: &[i8], dy: f32) -> f32 {
    let mut sumi = 0i32;
    for j in 0..32 {
        sumi += i32::from(b[2 + j] as i8) * i32::from(y[j]);
    }
    sumi as f32 * (f16_at(b, 0) * dy)
}

/// Q4_K / Q5_K super-block × Q8_K (ggml `vec_dot_q4_K_q8_K` / `q5_K` generic).
fn block_q45_k(five: bool, b: &[u8], y: &[i8], dy: f32, bsums: &[i16]) -> f32 {
    let scales = &b[4..16];
    let (qh, ql) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
    let mut sumi = 0i32;
    let mut summ = 0i32;
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (mut lo, mut hi) = (0i32, 0i32);
        for l in 0..32 {
            let q = ql[32 * j + l];
            let (mut a, mut c) = (i32::from(q & 0xF), i32::from(q >> 4));
            if five {
                a += i32::from((qh[l] >> (2 * j)) & 1) << 4;
                c += i32::from((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            lo += a * i32::from(y[64 * j + l]);
            hi += c * i32::from(y[64 * j + 32 + l]);
        }
        sumi += i32::from(sc1) * lo + i32::from(sc2) * hi;
        summ += i32::from(m1) * (i32::from(bsums[4 * j]) + i32::from(bsums[4 * j + 1]));
        summ += i32::from(m2) * (i32::from(bsums[4 * j + 2]) + i32::from(bsums[4 * j + 3]));
    }
    f16_at(b, 0) * dy * sumi as f32 - f16_at(b, 2) * dy * summ as f32
}

/// Q6_K super-block × Q8_K.
fn block_q6_k(b: &[u8], y: &[i8], dy: f32) -> f32 {
    let mut sumi = 0i32;
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &y[128 * n..128 * n + 128];
        let mut part = [0i32; 8];
        for l in 0..32 {
            let is = l / 16;
            for (k, &q) in q6_quad(ql, qh, l).iter().enumerate() {
                part[is + 2 * k] += i32::from(q) * i32::from(y[l + 32 * k]);
            }
        }
        for (p, &s) in part.iter().zip(sc) {
            sumi += p * i32::from(s as i8);
        }
    }
    f16_at(b, 208) * dy * sumi as f32
}

/// Scalar dot of one packed row with one token's activations.
fn dot_scalar(dtype: DType, row: &[u8], a: Act<'_>) -> f32 {
    let bs = dtype.block_bytes();
    match dtype {
        DType::F32 => row.chunks_exact(4).zip(a.f).map(|(c, &x)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * x).sum(),
        DType::F16 => row.chunks_exact(2).zip(a.f).map(|(c, &x)| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * x).sum(),
        DType::BF16 => row.chunks_exact(2).zip(a.f).map(|(c, &x)| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])) * x).sum(),
        DType::Q8_0 => row.chunks_exact(bs).zip(a.q.chunks_exact(QK)).zip(a.ds1.chunks_exact(2)).map(|((b, y), ds)| block_q8_0(b, y, ds[0])).sum(),
        DType::Q4_0 => row.chunks_exact(bs).zip(a.q.chunks_exact(QK)).zip(a.ds1.chunks_exact(2)).map(|((b, y), ds)| block_q4_0(b, y, ds[0])).sum(),
        DType::Q4_1 => row.chunks_exact(bs).zip(a.q.chunks_exact(QK)).zip(a.ds1.chunks_exact(2)).map(|((b, y), ds)| block_q4_1(b, y, ds[0], ds[1])).sum(),
        DType::Q4_K | DType::Q5_K => row
            .chunks_exact(bs)
            .zip(a.q.chunks_exact(QK_K))
            .zip(a.dk.iter().zip(a.bsums.chunks_exact(16)))
            .map(|((b, y), (&d, s))| block_q45_k(dtype == DType::Q5_K, b, y, d, s))
            .sum(),
        DType::Q6_K => row.chunks_exact(bs).zip(a.q.chunks_exact(QK_K)).zip(a.dk).map(|((b, y), &d)| block_q6_k(b, y, d)).sum(),
    }
}

/// Dot of one packed row with token 0 of `xq`, using the fastest kernel this CPU has.
pub fn dot_row(dtype: DType, row: &[u8], xq: &QuantizedActivations) -> f32 {
    let mut y = [0f32];
    dot_row_with(isa(), dtype, row, xq, &mut y);
    y[0]
}

/// The scalar reference for [`dot_row`] (what the SIMD kernels are tested against).
pub fn dot_row_reference(dtype: DType, row: &[u8], xq: &QuantizedActivations) -> f32 {
    let mut y = [0f32];
    dot_row_with(Isa::Scalar, dtype, row, xq, &mut y);
    y[0]
}

fn dot_row_with(isa: Isa, dtype: DType, row: &[u8], xq: &QuantizedActivations, y: &mut [f32; 1]) {
    xq.check("dot_row", dtype, xq.cols, 1);
    check_row("dot_row", dtype, xq.cols, row.len());
    rows_kernel(isa, dtype, row, xq.cols, xq.token(0), y);
}

// ---------------------------------------------------------------------------------------------
// Row kernels: y[r] = W[r,:] · a for a contiguous group of rows
// ---------------------------------------------------------------------------------------------

/// Computes `y.len()` consecutive rows of `w` (packed, `cols` each) against one token.
/// `w.len()` must be `y.len() * row_bytes(cols)` (checked by callers).
fn rows_kernel(isa: Isa, dtype: DType, w: &[u8], cols: usize, a: Act<'_>, y: &mut [f32]) {
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
fn rows_kernel_tokens(isa: Isa, dtype: DType, w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) {
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
const SERIAL_BYTES: usize = 48 * 1024;
/// Aim for chunks of about this many weight bytes (large enough to amortize task overhead,
/// small enough for work stealing to balance two threads).
const CHUNK_BYTES: usize = 192 * 1024;

/// Rows per parallel matvec chunk for a matrix of `rows` rows of `row_bytes` each, a multiple
/// of 4; `rows` itself when the work should stay on one thread.
fn chunk_rows(rows: usize, row_bytes: usize) -> usize {
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

fn matvec_with(isa: Isa, dtype: DType, w: &[u8], rows: usize, cols: usize, xq: &QuantizedActivations, y: &mut [f32]) {
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

fn row_bytes_checked(what: &str, dtype: DType, w: &[u8], rows: usize, cols: usize) -> usize {
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
struct OutPtr(*mut f32);
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

// ---------------------------------------------------------------------------------------------
// x86 SIMD kernels
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The kernels take whole slices, check every size once on entry, and then read through raw
    //! pointers inside the checked bounds. With one token they go row by row: measured on Zen 4,
    //! interleaving four rows (to share activation loads) made cold-weight matvecs up to twice as
    //! slow, because four strided streams defeat the prefetchers. With several tokens (prefill)
    //! they go four rows × up to four tokens per step, where compute dominates.

    use super::*;
    use std::arch::x86_64::*;

    /// Runs a SIMD row kernel if one exists for `isa` and `dtype`; false means "use scalar".
    pub(super) fn rows(isa: Isa, dtype: DType, w: &[u8], cols: usize, a: Act<'_>, y: &mut [f32]) -> bool {
        match isa {
            Isa::Avx512 => {
                // SAFETY: `Isa::Avx512` is only chosen when the CPU reports avx512f/bw/vl/vnni,
                // avx2, fma and f16c (`detect_isa`); tests only pass levels `detect_isa` allows.
                unsafe { avx512::rows(dtype, w, cols, a, y) }
            }
            Isa::Avx2 => {
                // SAFETY: `Isa::Avx2` (or better) implies avx2, fma and f16c (`detect_isa`).
                unsafe { avx2::rows(dtype, w, cols, a, y) }
            }
            Isa::Scalar => false,
        }
    }

    /// Tiled (several tokens) kernel if one exists; false means "one token at a time".
    pub(super) fn rows_tokens(isa: Isa, dtype: DType, w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) -> bool {
        match isa {
            // SAFETY: as in `rows`.
            Isa::Avx512 => unsafe { avx512::rows_tokens(dtype, w, cols, acts, ys) },
            // SAFETY: as in `rows`.
            Isa::Avx2 => unsafe { avx2::rows_tokens(dtype, w, cols, acts, ys) },
            Isa::Scalar => false,
        }
    }

    /// Checks the slices a quantized kernel will read through raw pointers: `rows` rows of
    /// `row_bytes` in `w`, and per token `cols` quants plus `2 * nb` scale floats.
    fn check_q8(w: &[u8], row_bytes: usize, cols: usize, acts: &[Act<'_>], ys: &[&mut [f32]], ds0: bool) -> usize {
        let rows = ys.first().map_or(0, |y| y.len());
        assert_eq!(w.len(), rows * row_bytes, "kernel: weights do not match {rows} rows");
        assert_eq!(acts.len(), ys.len(), "kernel: tokens and outputs differ");
        let nb = cols / QK;
        for (a, y) in acts.iter().zip(ys) {
            let ds = if ds0 { a.ds0 } else { a.ds1 };
            assert!(a.q.len() >= cols && a.q_pair.len() >= cols && ds.len() >= 2 * nb && y.len() == rows, "kernel: activations too short");
        }
        rows
    }

    /// Software prefetch distance past the rows being read (bytes beyond the next row group).
    const PF_EXTRA: usize = 256;
    /// Rows per step in matvec (one token): one sequential stream.
    const MV_ROWS: usize = 1;

    /// Asks for the cache line at `p` ahead of use (weights are read once per token and come
    /// from DRAM). A hint: it never faults, even past the end of the weights.
    #[inline]
    fn prefetch(p: *const u8) {
        // SAFETY: prefetch is a hint; it does not access memory architecturally or fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

    /// One Q8 activation block exactly as ggml's AVX2 `quantize_row_q8_1` makes it; returns
    /// the unrounded scale and the sum of the quants, or `None` below AVX2.
    pub(super) fn quantize_q8_block(isa: Isa, x: &[f32], q: &mut [i8]) -> Option<(f32, i32)> {
        if isa < Isa::Avx2 {
            return None;
        }
        assert!(x.len() == QK && q.len() == QK, "quantize_q8_block: blocks of 32");
        // SAFETY: `Isa::Avx2` or better implies avx2, fma and f16c (`detect_isa`).
        Some(unsafe { quantize_q8_block_avx2(x, q) })
    }

    /// # Safety
    /// The CPU must support avx2; `x` and `q` must hold 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        // SAFETY: x holds 32 floats (caller).
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        // Default MXCSR rounding is to nearest even, as in ggml.
        let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)));
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: q holds 32 bytes (caller).
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p) };
        (amax / 127.0, _mm_cvtsi128_si32(s))
    }

    /// Scalar tail block (odd block count) of row `row` for every token, added to `out`.
    fn tail_block<const T: usize>(dtype: DType, row: &[u8], nb: usize, acts: &[Act<'_>], out: &mut [f32; T]) {
        let bs = dtype.block_bytes();
        let b = &row[(nb - 1) * bs..nb * bs];
        for (o, a) in out.iter_mut().zip(acts) {
            let y = &a.q[(nb - 1) * QK..nb * QK];
            let ds = &a.ds1[2 * (nb - 1)..2 * nb];
            *o += match dtype {
                DType::Q4_1 => block_q4_1(b, y, ds[0], ds[1]),
                DType::Q4_0 => block_q4_0(b, y, ds[0]),
                _ => block_q8_0(b, y, ds[0]),
            };
        }
    }

    pub(super) mod avx512 {
        use super::*;

        /// # Safety
        /// The CPU must support avx512f, avx512bw, avx512vl, avx512vnni, avx2, fma and f16c.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows(dtype: DType, w: &[u8], cols: usize, a: Act<'_>, y: &mut [f32]) -> bool {
            let acts = [a];
            match dtype {
                DType::Q4_1 => q4::<true, 1>(w, cols, &acts, &mut [y]),
                DType::Q4_0 => q4::<false, 1>(w, cols, &acts, &mut [y]),
                DType::Q8_0 => q8::<1>(w, cols, &acts, &mut [y]),
                DType::F32 => floats::<0>(w, cols, a.f, y),
                DType::F16 => floats::<1>(w, cols, a.f, y),
                DType::BF16 => floats::<2>(w, cols, a.f, y),
                DType::Q4_K => super::avx2::kquant::<4>(w, cols, a, y),
                DType::Q5_K => super::avx2::kquant::<5>(w, cols, a, y),
                DType::Q6_K => super::avx2::kquant::<6>(w, cols, a, y),
            }
            true
        }

        /// # Safety
        /// As for [`rows`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_tokens(dtype: DType, w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) -> bool {
            macro_rules! by_tokens {
                ($f:ident $(::<$($g:tt),*>)?) => {
                    match acts.len() {
                        1 => $f::<$($($g,)*)? 1>(w, cols, acts, ys),
                        2 => $f::<$($($g,)*)? 2>(w, cols, acts, ys),
                        3 => $f::<$($($g,)*)? 3>(w, cols, acts, ys),
                        4 => $f::<$($($g,)*)? 4>(w, cols, acts, ys),
                        _ => return false,
                    }
                };
            }
            match dtype {
                DType::Q4_1 => by_tokens!(q4::<true>),
                DType::Q4_0 => by_tokens!(q4::<false>),
                DType::Q8_0 => by_tokens!(q8),
                _ => return false,
            }
            true
        }

        /// Lanes 0..8 take element 0, lanes 8..16 element 2: a Q8_0 block pair [b0, b1].
        const IDX_Q8: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2];

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn idx_vec(i: [i32; 16]) -> __m512i {
            _mm512_setr_epi32(i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8], i[9], i[10], i[11], i[12], i[13], i[14], i[15])
        }

        /// Q4_0 / Q4_1 weights × Q8 activations for `T` tokens.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn q4<const Q41: bool, const T: usize>(w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) {
            let dtype = if Q41 { DType::Q4_1 } else { DType::Q4_0 };
            let rb = cols / QK * dtype.block_bytes();
            let rows = check_q8(w, rb, cols, acts, ys, !Q41);
            assert_eq!(acts.len(), T);
            let step = if T == 1 { MV_ROWS } else { 4 };
            let main = rows / step * step;
            // SAFETY: rows 0..rows lie in `w` and every token covers `cols` (`check_q8`).
            unsafe {
                if T == 1 {
                    q4_rows::<Q41, T, MV_ROWS>(w, rb, cols, acts, ys, 0, main);
                } else {
                    q4_rows::<Q41, T, 4>(w, rb, cols, acts, ys, 0, main);
                }
                q4_rows::<Q41, T, 1>(w, rb, cols, acts, ys, main, rows);
            }
        }

        /// Rows `r0..r1` (a multiple of `R` apart), `R` at a time, against `T` tokens, written
        /// to `ys[t][r0..r1]`.
        ///
        /// # Safety
        /// Rows `r0..r1` must lie in `w` (`rb` bytes each), each token must hold `cols` quants
        /// and their scales, and `ys[t]` must have at least `r1` entries; CPU features as for
        /// [`rows`].
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn q4_rows<const Q41: bool, const T: usize, const R: usize>(
            w: &[u8],
            rb: usize,
            cols: usize,
            acts: &[Act<'_>],
            ys: &mut [&mut [f32]],
            r0: usize,
            r1: usize,
        ) {
            let dtype = if Q41 { DType::Q4_1 } else { DType::Q4_0 };
            let nb = cols / QK;
            let mut r = r0;
            while r < r1 {
                let w0 = w.as_ptr().wrapping_add(r * rb);
                let qp: [*const i8; T] = std::array::from_fn(|t| acts[t].q_pair.as_ptr());
                let dp: [*const f32; T] = std::array::from_fn(|t| if Q41 { acts[t].ds1.as_ptr() } else { acts[t].ds0.as_ptr() });
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let mut accm = [_mm512_setzero_ps(); R];
                for p in 0..nb / 2 {
                    // SAFETY: pair p lies within the rows and tokens (caller).
                    unsafe { q4_step::<Q41, T, R>(w0, rb, p, &qp, &dp, &mut acc, &mut accm) };
                }
                for k in 0..R {
                    let row = &w[(r + k) * rb..(r + k + 1) * rb];
                    let mut m = [0f32; 16];
                    // SAFETY: `m` holds 16 floats.
                    unsafe { _mm512_storeu_ps(m.as_mut_ptr(), accm[k]) };
                    let mut out = [0f32; T];
                    for t in 0..T {
                        let v = acc[k][t];
                        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                        let v = _mm_add_ss(v, _mm_movehdup_ps(v));
                        out[t] = _mm_cvtss_f32(v) + (m[4 * t + 1] + m[4 * t + 3]);
                    }
                    if nb % 2 == 1 {
                        tail_block::<T>(dtype, row, nb, acts, &mut out);
                    }
                    for t in 0..T {
                        ys[t][r + k] = out[t];
                    }
                }
                r += R;
            }
        }

        /// One block pair `p` of `R` rows against `T` tokens. Works on 256-bit vectors (on Zen 4
        /// they run at full rate, 512-bit ones at half): the low nibbles of both blocks meet
        /// [lo(b0), lo(b1)] of the pair-ordered activations and the high nibbles [hi(b0), hi(b1)],
        /// so lanes 0..4 hold block 0 and lanes 4..8 block 1.
        ///
        /// Every (row, token) gets the same float operations whatever `T` and `R` are, so a
        /// prefill tile gives bit for bit what one-token decode gives: the integer dots go
        /// through one FMA by `d·dy`, and the m·s terms add up in `accm` (token `t` in lanes
        /// 4t..4t+4, [d0·dy0, m0·s0, d1·dy1, m1·s1], one 512-bit multiply and add for all
        /// tokens). The model quantizes every matmul output again, and its activations reach
        /// |x| ~ 3000 (Q8 steps of ~20), so a last-bit difference that moves a value across a
        /// rounding boundary changes logits by tenths: prefill and decode must agree exactly.
        ///
        /// # Safety
        /// Pair `p` of rows `w0 .. w0 + R * rb` and of every token's pair-ordered quants (`qp`)
        /// and scales (`dp`) must be readable; CPU features as for [`rows`].
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn q4_step<const Q41: bool, const T: usize, const R: usize>(
            w0: *const u8,
            rb: usize,
            p: usize,
            qp: &[*const i8; T],
            dp: &[*const f32; T],
            acc: &mut [[__m256; T]; R],
            accm: &mut [__m512; R],
        ) {
            let (bb, off) = if Q41 { (20, 4) } else { (18, 2) };
            // Broadcast element 0 to lanes 0..4 and element 2 to lanes 4..8.
            let bcast = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
            let m0f = _mm256_set1_epi8(0x0F);
            let mut yl = [_mm256_setzero_si256(); T];
            let mut yh = [_mm256_setzero_si256(); T];
            // Token t's [dy0, s0, dy1, s1] in lanes 4t..4t+4 (one token: the low 128 bits).
            let mut ds = _mm512_setzero_ps();
            for t in 0..T {
                // SAFETY: block pair p of token t lies within its quants/scales (caller).
                unsafe {
                    yl[t] = _mm256_loadu_si256(qp[t].add(64 * p) as *const __m256i);
                    yh[t] = _mm256_loadu_si256(qp[t].add(64 * p + 32) as *const __m256i);
                    let d = _mm_loadu_ps(dp[t].add(4 * p));
                    ds = if T == 1 { _mm512_castps128_ps512(d) } else { _mm512_mask_broadcast_f32x4(ds, 0xF << (4 * t), d) };
                }
            }
            for k in 0..R {
                let blk = w0.wrapping_add(k * rb + 2 * p * bb);
                prefetch(blk.wrapping_add(R * rb + PF_EXTRA));
                // SAFETY: row k's block pair p lies within the rows at `w0` (caller).
                let (q, d0, d1) = unsafe {
                    let lo = _mm_loadu_si128(blk.add(off) as *const __m128i);
                    let hi = _mm_loadu_si128(blk.add(bb + off) as *const __m128i);
                    let (d0, d1) = if Q41 {
                        ((blk as *const i32).read_unaligned(), (blk.add(bb) as *const i32).read_unaligned())
                    } else {
                        // Q4_0 has no min: duplicate d so the lanes read [d0, d0, d1, d1].
                        let d0 = i32::from((blk as *const u16).read_unaligned());
                        let d1 = i32::from((blk.add(bb) as *const u16).read_unaligned());
                        (d0 | (d0 << 16), d1 | (d1 << 16))
                    };
                    (_mm256_set_m128i(hi, lo), d0, d1)
                };
                let zl = _mm256_and_si256(q, m0f);
                let zh = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m0f);
                // [d0, m0, d1, m1] for every token: products [d0·dy0, m0·s0, d1·dy1, m1·s1].
                let dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, d1, d0));
                // The same products lane for lane whatever T is (one token in 128 bits).
                let prod = if T == 1 {
                    let prod = _mm_mul_ps(dm, _mm512_castps512_ps128(ds));
                    accm[k] = _mm512_castps128_ps512(_mm_add_ps(_mm512_castps512_ps128(accm[k]), prod));
                    _mm512_castps128_ps512(prod)
                } else {
                    let prod = _mm512_mul_ps(_mm512_broadcast_f32x4(dm), ds);
                    accm[k] = _mm512_add_ps(accm[k], prod);
                    prod
                };
                for t in 0..T {
                    let dot = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), zl, yl[t]), zh, yh[t]);
                    // d0·dy0 in lanes 0..4, d1·dy1 in lanes 4..8.
                    let scale = if T == 1 {
                        _mm256_permutevar8x32_ps(_mm512_castps512_ps256(prod), bcast)
                    } else {
                        let (b0, b1) = (4 * t as i32, 4 * t as i32 + 2);
                        let idx = [b0, b0, b0, b0, b1, b1, b1, b1, 0, 0, 0, 0, 0, 0, 0, 0];
                        _mm512_castps512_ps256(_mm512_permutexvar_ps(idx_vec(idx), prod))
                    };
                    acc[k][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[k][t]);
                }
            }
        }

        /// Q8_0 weights × Q8 activations for `T` tokens.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn q8<const T: usize>(w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) {
            let rb = cols / QK * 34;
            let rows = check_q8(w, rb, cols, acts, ys, false);
            assert_eq!(acts.len(), T);
            let step = if T == 1 { MV_ROWS } else { 4 };
            let main = rows / step * step;
            // SAFETY: rows 0..rows lie in `w` and every token covers `cols` (`check_q8`).
            unsafe {
                if T == 1 {
                    q8_rows::<T, MV_ROWS>(w, rb, cols, acts, ys, 0, main);
                } else {
                    q8_rows::<T, 4>(w, rb, cols, acts, ys, 0, main);
                }
                q8_rows::<T, 1>(w, rb, cols, acts, ys, main, rows);
            }
        }

        /// # Safety
        /// As for [`q4_rows`].
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn q8_rows<const T: usize, const R: usize>(w: &[u8], rb: usize, cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]], r0: usize, r1: usize) {
            let nb = cols / QK;
            let idx = idx_vec(IDX_Q8);
            let mut r = r0;
            while r < r1 {
                let w0 = w.as_ptr().wrapping_add(r * rb);
                let mut acc = [[_mm512_setzero_ps(); T]; R];
                let qp: [*const i8; T] = std::array::from_fn(|t| acts[t].q.as_ptr());
                let dp: [*const f32; T] = std::array::from_fn(|t| acts[t].ds1.as_ptr());
                for p in 0..nb / 2 {
                    let mut yv = [_mm512_setzero_si512(); T];
                    let mut dsv = [_mm_setzero_ps(); T];
                    for t in 0..T {
                        // SAFETY: block pair p of token t lies within its quants/scales (caller).
                        unsafe {
                            yv[t] = _mm512_loadu_si512(qp[t].add(64 * p) as *const _);
                            dsv[t] = _mm_loadu_ps(dp[t].add(4 * p));
                        }
                    }
                    for (k, acc_k) in acc.iter_mut().enumerate() {
                        let blk = w0.wrapping_add(k * rb + 2 * p * 34);
                        prefetch(blk.wrapping_add(R * rb + PF_EXTRA));
                        prefetch(blk.wrapping_add(R * rb + PF_EXTRA + 64));
                        // SAFETY: row r + k's block pair p (68 bytes at `blk`) lies within `w`.
                        let (x, d0, d1) = unsafe {
                            let x0 = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                            let x1 = _mm256_loadu_si256(blk.add(36) as *const __m256i);
                            let d0 = (blk as *const u16).read_unaligned();
                            let d1 = (blk.add(34) as *const u16).read_unaligned();
                            (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(x0), x1), d0, d1)
                        };
                        let dw = _mm_cvtph_ps(_mm_set_epi32(0, 0, i32::from(d1), i32::from(d0)));
                        // Signed × signed through the unsigned×signed dot: |x| · (y with x's sign).
                        let ax = _mm512_abs_epi8(x);
                        let neg = _mm512_movepi8_mask(x);
                        for t in 0..T {
                            let sy = _mm512_mask_sub_epi8(yv[t], neg, _mm512_setzero_si512(), yv[t]);
                            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy);
                            let scale = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_mul_ps(dw, dsv[t])));
                            acc_k[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc_k[t]);
                        }
                    }
                }
                for k in 0..R {
                    let row = &w[(r + k) * rb..(r + k + 1) * rb];
                    let mut out = [0f32; T];
                    for t in 0..T {
                        out[t] = _mm512_reduce_add_ps(acc[k][t]);
                    }
                    if nb % 2 == 1 {
                        tail_block::<T>(DType::Q8_0, row, nb, acts, &mut out);
                    }
                    for t in 0..T {
                        ys[t][r + k] = out[t];
                    }
                }
                r += R;
            }
        }

        /// Loads 16 weights (F32 = 0, F16 = 1, BF16 = 2) as f32, only the lanes in `m`.
        ///
        /// # Safety
        /// The `m` lanes starting at element `i` of the row at `p` must be readable.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn load_w16<const K: u8>(p: *const u8, i: usize, m: __mmask16) -> __m512 {
            // SAFETY: masked-off lanes are not accessed (masked loads do not fault); the rest
            // are readable (caller).
            unsafe {
                match K {
                    0 => _mm512_maskz_loadu_ps(m, (p as *const f32).add(i)),
                    1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (p as *const i16).add(i))),
                    _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (p as *const i16).add(i))))),
                }
            }
        }

        /// F32 / F16 / BF16 weights × f32 activations (already rounded like the weights), one
        /// row at a time with four independent accumulators.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        fn floats<const K: u8>(w: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
            let es = if K == 0 { 4 } else { 2 };
            let rb = cols * es;
            assert!(w.len() == y.len() * rb && x.len() >= cols, "kernel: float shapes");
            let xp = x.as_ptr();
            let full = cols / 64 * 64;
            for (r, o) in y.iter_mut().enumerate() {
                let wp = w.as_ptr().wrapping_add(r * rb);
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i < full {
                    prefetch(wp.wrapping_add(i * es + 1024));
                    for (k, a) in acc.iter_mut().enumerate() {
                        // SAFETY: elements i + 16k .. i + 16k + 16 < cols lie in row r and x.
                        unsafe {
                            let xv = _mm512_loadu_ps(xp.add(i + 16 * k));
                            *a = _mm512_fmadd_ps(load_w16::<K>(wp, i + 16 * k, 0xFFFF), xv, *a);
                        }
                    }
                    i += 64;
                }
                while i < cols {
                    let m: __mmask16 = if cols - i >= 16 { 0xFFFF } else { ((1u32 << (cols - i)) - 1) as __mmask16 };
                    // SAFETY: only the lanes of `m`, all below `cols`, are read.
                    unsafe {
                        let xv = _mm512_maskz_loadu_ps(m, xp.add(i));
                        acc[0] = _mm512_fmadd_ps(load_w16::<K>(wp, i, m), xv, acc[0]);
                    }
                    i += 16;
                }
                let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                *o = _mm512_reduce_add_ps(s);
            }
        }
    }

    pub(super) mod avx2 {
        use super::*;

        /// # Safety
        /// The CPU must support avx2, fma and f16c.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows(dtype: DType, w: &[u8], cols: usize, a: Act<'_>, y: &mut [f32]) -> bool {
            let acts = [a];
            match dtype {
                DType::Q4_1 => q::<1, 1>(w, cols, &acts, &mut [y]),
                DType::Q4_0 => q::<0, 1>(w, cols, &acts, &mut [y]),
                DType::Q8_0 => q::<8, 1>(w, cols, &acts, &mut [y]),
                DType::F32 => floats::<0>(w, cols, a.f, y),
                DType::F16 => floats::<1>(w, cols, a.f, y),
                DType::BF16 => floats::<2>(w, cols, a.f, y),
                DType::Q4_K => kquant::<4>(w, cols, a, y),
                DType::Q5_K => kquant::<5>(w, cols, a, y),
                DType::Q6_K => kquant::<6>(w, cols, a, y),
            }
            true
        }

        /// # Safety
        /// As for [`rows`].
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_tokens(dtype: DType, w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) -> bool {
            macro_rules! by_tokens {
                ($k:literal) => {
                    match acts.len() {
                        1 => q::<$k, 1>(w, cols, acts, ys),
                        2 => q::<$k, 2>(w, cols, acts, ys),
                        3 => q::<$k, 3>(w, cols, acts, ys),
                        4 => q::<$k, 4>(w, cols, acts, ys),
                        _ => return false,
                    }
                };
            }
            match dtype {
                DType::Q4_1 => by_tokens!(1),
                DType::Q4_0 => by_tokens!(0),
                DType::Q8_0 => by_tokens!(8),
                _ => return false,
            }
            true
        }

        /// Horizontal sum of 8 floats.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        /// Horizontal sum of 8 i32.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn hsum_i32(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
        }

        /// Q4_K (K = 4), Q5_K (5) or Q6_K (6) weights × Q8_K activations, one row at a time.
        /// Integer block sums equal the scalar reference's, so results match it exactly.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) fn kquant<const K: u8>(w: &[u8], cols: usize, a: Act<'_>, y: &mut [f32]) {
            let bs = match K {
                4 => 144,
                5 => 176,
                _ => 210,
            };
            let nb = cols / QK_K;
            let rb = nb * bs;
            assert!(w.len() == y.len() * rb && a.q.len() >= cols && a.dk.len() >= nb && a.bsums.len() >= cols / 16, "kernel: k-quant shapes");
            for (o, row) in y.iter_mut().zip(w.chunks_exact(rb)) {
                let mut sum = 0f32;
                for (i, b) in row.chunks_exact(bs).enumerate() {
                    prefetch(b.as_ptr().wrapping_add(2 * bs));
                    let yq = &a.q[i * QK_K..(i + 1) * QK_K];
                    let bsums = &a.bsums[16 * i..16 * i + 16];
                    sum += if K == 6 { block_q6_k(b, yq, a.dk[i], bsums) } else { block_q45_k::<K>(b, yq, a.dk[i], bsums) };
                }
                *o = sum;
            }
        }

        /// One Q4_K / Q5_K super-block × Q8_K (maddubs, then madd by the 6-bit scale).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn block_q45_k<const K: u8>(b: &[u8], y: &[i8], dy: f32, bsums: &[i16]) -> f32 {
            assert!(b.len() == if K == 5 { 176 } else { 144 } && y.len() == QK_K && bsums.len() == 16);
            let mut summ = 0i32;
            let mut scales = [0i16; 8];
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                scales[j] = i16::from(sc);
                summ += i32::from(m) * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1]));
            }
            let ql = if K == 5 { &b[48..176] } else { &b[16..144] };
            let m0f = _mm256_set1_epi8(0x0F);
            let one = _mm256_set1_epi8(1);
            let hb = if K == 5 {
                // SAFETY: a Q5_K block holds 32 bytes of high bits at 16..48 (length asserted).
                unsafe { _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i) }
            } else {
                _mm256_setzero_si256()
            };
            let mut acc = _mm256_setzero_si256();
            for j in 0..4 {
                // SAFETY: ql holds 128 bytes and y 256 (lengths asserted above).
                let (q, yl, yh) = unsafe {
                    (
                        _mm256_loadu_si256(ql.as_ptr().add(32 * j) as *const __m256i),
                        _mm256_loadu_si256(y.as_ptr().add(64 * j) as *const __m256i),
                        _mm256_loadu_si256(y.as_ptr().add(64 * j + 32) as *const __m256i),
                    )
                };
                let mut lo = _mm256_and_si256(q, m0f);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m0f);
                if K == 5 {
                    // Bit 2j of each high-bit byte belongs to the low nibbles, bit 2j + 1 to the
                    // high ones; a 16-bit shift never brings a neighbour's bit into bit 0.
                    let bl = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * j as i32)), one);
                    let bh = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * j as i32 + 1)), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bl));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(bh));
                }
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, yl), _mm256_set1_epi16(scales[2 * j]));
                let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yh), _mm256_set1_epi16(scales[2 * j + 1]));
                acc = _mm256_add_epi32(acc, _mm256_add_epi32(pl, ph));
            }
            f16_at(b, 0) * dy * hsum_i32(acc) as f32 - f16_at(b, 2) * dy * summ as f32
        }

        /// One Q6_K super-block × Q8_K: unsigned 6-bit values through maddubs, the offset of 32
        /// taken off with the activation group sums.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn block_q6_k(b: &[u8], y: &[i8], dy: f32, bsums: &[i16]) -> f32 {
            assert!(b.len() == 210 && y.len() == QK_K && bsums.len() == 16);
            let sc = &b[192..208];
            let mut corr = 0i32;
            for (&s, &g) in sc.iter().zip(bsums) {
                corr += i32::from(s as i8) * i32::from(g);
            }
            let m0f = _mm256_set1_epi8(0x0F);
            let m3 = _mm256_set1_epi8(3);
            let mut acc = _mm256_setzero_si256();
            for n in 0..2 {
                // SAFETY: ql is b[0..128], qh b[128..192] (length asserted above).
                let (ql0, ql1, qh) = unsafe {
                    (
                        _mm256_loadu_si256(b.as_ptr().add(64 * n) as *const __m256i),
                        _mm256_loadu_si256(b.as_ptr().add(64 * n + 32) as *const __m256i),
                        _mm256_loadu_si256(b.as_ptr().add(128 + 32 * n) as *const __m256i),
                    )
                };
                let high = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m3));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m0f), high(qh)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m0f), high(_mm256_srli_epi16::<2>(qh))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m0f), high(_mm256_srli_epi16::<4>(qh))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m0f), high(_mm256_srli_epi16::<6>(qh))),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    // SAFETY: y holds 256 quants (asserted above).
                    let yk = unsafe { _mm256_loadu_si256(y.as_ptr().add(128 * n + 32 * k) as *const __m256i) };
                    let g = 8 * n + 2 * k;
                    let scale = _mm256_set_m128i(_mm_set1_epi16(i16::from(sc[g + 1] as i8)), _mm_set1_epi16(i16::from(sc[g] as i8)));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(qk, yk), scale));
                }
            }
            f16_at(b, 208) * dy * (hsum_i32(acc) - 32 * corr) as f32
        }

        /// Q4_0 (K = 0), Q4_1 (K = 1) or Q8_0 (K = 8) weights × Q8 activations, `T` tokens,
        /// one block at a time (ggml's AVX2 scheme: maddubs + madd, FMA per block).
        #[target_feature(enable = "avx2,fma,f16c")]
        fn q<const K: u8, const T: usize>(w: &[u8], cols: usize, acts: &[Act<'_>], ys: &mut [&mut [f32]]) {
            let bb = match K {
                0 => 18,
                1 => 20,
                _ => 34,
            };
            let nb = cols / QK;
            let rb = nb * bb;
            let rows = check_q8(w, rb, cols, acts, ys, K == 0);
            assert_eq!(acts.len(), T);
            let wp = w.as_ptr();
            // One token streams rows one at a time (a single sequential stream prefetches
            // best); tiles of tokens take four rows so each unpacked block serves 16 dots.
            let group = if T == 1 { 1 } else { 4 };
            let mut r = 0;
            while r < rows {
                let n = if rows - r >= group { group } else { 1 };
                let out = if n == 4 {
                    // SAFETY: rows r..r+4 lie in `w` (checked by `check_q8`).
                    unsafe { q_rows::<K, T, 4>(wp.add(r * rb), rb, nb, acts) }
                } else {
                    // SAFETY: row r lies in `w`.
                    let o = unsafe { q_rows::<K, T, 1>(wp.add(r * rb), rb, nb, acts) };
                    [o[0], [0.0; T], [0.0; T], [0.0; T]]
                };
                for (k, o) in out.into_iter().take(n).enumerate() {
                    for (t, v) in o.into_iter().enumerate() {
                        ys[t][r + k] = v;
                    }
                }
                r += n;
            }
        }

        /// # Safety
        /// `w0` must be readable for `R * rb` bytes; each token's quants and scales must cover
        /// `nb` blocks; the CPU must support avx2, fma and f16c.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn q_rows<const K: u8, const T: usize, const R: usize>(w0: *const u8, rb: usize, nb: usize, acts: &[Act<'_>]) -> [[f32; T]; R] {
            let bb = match K {
                0 => 18,
                1 => 20,
                _ => 34,
            };
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut accm = [[_mm_setzero_ps(); T]; R];
            let ones = _mm256_set1_epi16(1);
            let m0f = _mm256_set1_epi8(0x0F);
            let qp: [*const i8; T] = std::array::from_fn(|t| acts[t].q.as_ptr());
            let dp: [*const f32; T] = std::array::from_fn(|t| if K == 0 { acts[t].ds0.as_ptr() } else { acts[t].ds1.as_ptr() });
            for b in 0..nb {
                let mut yv = [_mm256_setzero_si256(); T];
                let mut dsv = [_mm_setzero_ps(); T];
                for t in 0..T {
                    // SAFETY: block b of token t lies within its quants and scales (caller).
                    unsafe {
                        yv[t] = _mm256_loadu_si256(qp[t].add(32 * b) as *const __m256i);
                        dsv[t] = _mm_castpd_ps(_mm_load_sd(dp[t].add(2 * b) as *const f64));
                    }
                }
                for k in 0..R {
                    let blk = w0.wrapping_add(k * rb + b * bb);
                    if b % 2 == 0 {
                        prefetch(blk.wrapping_add(R * rb + PF_EXTRA));
                    }
                    // SAFETY: block b of row k lies within the R rows at `w0` (caller).
                    let (x, dm) = unsafe {
                        match K {
                            8 => {
                                let x = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                                let d = i32::from((blk as *const u16).read_unaligned());
                                (x, _mm_cvtph_ps(_mm_cvtsi32_si128(d)))
                            }
                            _ => {
                                let off = if K == 1 { 4 } else { 2 };
                                let q = _mm_loadu_si128(blk.add(off) as *const __m128i);
                                let x = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), m0f);
                                let d = if K == 1 {
                                    (blk as *const i32).read_unaligned()
                                } else {
                                    let d = i32::from((blk as *const u16).read_unaligned());
                                    d | (d << 16)
                                };
                                (x, _mm_cvtph_ps(_mm_cvtsi32_si128(d)))
                            }
                        }
                    };
                    for t in 0..T {
                        let p16 =
                            if K == 8 { _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(yv[t], x)) } else { _mm256_maddubs_epi16(x, yv[t]) };
                        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        let prod = _mm_mul_ps(dm, dsv[t]);
                        acc[k][t] = _mm256_fmadd_ps(dot, _mm256_broadcastss_ps(prod), acc[k][t]);
                        if K != 8 {
                            accm[k][t] = _mm_add_ps(accm[k][t], prod);
                        }
                    }
                }
            }
            let mut out = [[0f32; T]; R];
            for k in 0..R {
                for t in 0..T {
                    // Lane 1 of `accm` gathered m·s over the blocks.
                    let m = _mm_cvtss_f32(_mm_movehdup_ps(accm[k][t]));
                    out[k][t] = hsum(acc[k][t]) + if K == 8 { 0.0 } else { m };
                }
            }
            out
        }

        /// F32 (K = 0) / F16 (1) / BF16 (2) weights × f32 activations, one row at a time with
        /// four independent accumulators.
        #[target_feature(enable = "avx2,fma,f16c")]
        fn floats<const K: u8>(w: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
            let es = if K == 0 { 4 } else { 2 };
            let rb = cols * es;
            assert!(w.len() == y.len() * rb && x.len() >= cols, "kernel: float shapes");
            let dtype = [DType::F32, DType::F16, DType::BF16][K as usize];
            let full = cols / 32 * 32;
            for (r, o) in y.iter_mut().enumerate() {
                let wp = w.as_ptr().wrapping_add(r * rb);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i < full {
                    prefetch(wp.wrapping_add(i * es + 1024));
                    for (k, a) in acc.iter_mut().enumerate() {
                        let j = i + 8 * k;
                        let p = wp.wrapping_add(j * es);
                        // SAFETY: elements j..j + 8 < cols lie in row r and in x.
                        let (wv, xv) = unsafe {
                            let wv = match K {
                                0 => _mm256_loadu_ps(p as *const f32),
                                1 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))),
                            };
                            (wv, _mm256_loadu_ps(x.as_ptr().add(j)))
                        };
                        *a = _mm256_fmadd_ps(wv, xv, *a);
                    }
                    i += 32;
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let row = &w[r * rb..(r + 1) * rb];
                let a = Act { f: &x[full..cols], q: &[], q_pair: &[], ds1: &[], ds0: &[], dk: &[], bsums: &[] };
                *o = hsum(s) + dot_scalar(dtype, &row[full * es..], a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift generator (tests must not depend on an RNG crate's stream).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [-1, 1).
        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        /// Roughly normal, like activations.
        fn normal(&mut self) -> f32 {
            (0..4).map(|_| self.f()).sum::<f32>() * 0.9
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.normal() * scale).collect()
        }
    }

    fn quantized(dtype: DType, x: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; dtype.row_bytes(x.len()).unwrap()];
        quantize_row(dtype, x, &mut out);
        out
    }

    fn dequantized(dtype: DType, b: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        dequantize_row(dtype, b, &mut out);
        out
    }

    #[test]
    fn quantize_dequantize_round_trip_error_is_small() {
        let mut rng = Rng(1);
        let x = rng.vec(4096, 1.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        // Expected relative RMS error of each format on Gaussian data.
        for (dtype, tol) in [
            (DType::F32, 0.0),
            (DType::F16, 1e-3),
            (DType::BF16, 5e-3),
            (DType::Q8_0, 0.01),
            (DType::Q4_0, 0.15),
            (DType::Q4_1, 0.12),
            (DType::Q4_K, 0.10),
            (DType::Q5_K, 0.05),
            (DType::Q6_K, 0.025),
        ] {
            let back = dequantized(dtype, &quantized(dtype, &x), x.len());
            let err = (x.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x.len() as f32).sqrt();
            println!("{dtype}: relative rms error {:.5}", err / rms);
            assert!(err / rms <= tol, "{dtype}: relative rms error {} > {tol}", err / rms);
        }
    }

    #[test]
    fn q4_1_and_q8_0_blocks_match_hand_computed_ggml_values() {
        // One block 0..31: Q4_1 min 0, d = 31/15; value j quantizes to round(j·15/31).
        let x: Vec<f32> = (0..32).map(|j| j as f32).collect();
        let b = quantized(DType::Q4_1, &x);
        assert_eq!(f16_at(&b, 0), f16_round(31.0 / 15.0));
        assert_eq!(f16_at(&b, 2), 0.0);
        // Element 0 -> nibble 0 (low), element 16 -> round(16·15/31) = 8 (high).
        assert_eq!(b[4], ((16.0f32 * (15.0 / 31.0) + 0.5) as u8) << 4);
        assert_eq!(b[4], 0x80);
        // Q8_0 reference rounds half away from zero: 63.5 -> 64.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 63.5;
        x[2] = -63.5;
        let b = quantized(DType::Q8_0, &x);
        assert_eq!((b[2] as i8, b[3] as i8, b[4] as i8), (127, 64, -64));
        // Activations round half to even like ggml's AVX2 quantizer: 63.5 -> 64, 62.5 -> 62.
        x[1] = 62.5;
        let mut xq = QuantizedActivations::new();
        xq.quantize(DType::Q8_0, &x);
        assert_eq!((xq.q[0], xq.q[1], xq.q[2]), (127, 62, -64));
        assert_eq!(xq.ds1[0], 1.0);
        assert_eq!(xq.ds1[1], f16_round(127.0 + 62.0 - 64.0));
    }

    #[test]
    fn bf16_rounding_matches_ggml() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80, "tie to even (down)");
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82, "tie to even (up)");
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
    }

    /// Reference dot in f64 over dequantized weights and (de)quantized activations.
    fn dot_dequantized(dtype: DType, row: &[u8], xq: &QuantizedActivations, t: usize) -> f64 {
        let w = dequantized(dtype, row, xq.cols);
        let a = xq.token(t);
        let x: Vec<f32> = match xq.kind {
            ActKind::Q8 => a.q.iter().enumerate().map(|(i, &q)| f32::from(q) * a.ds1[2 * (i / QK)]).collect(),
            ActKind::Q8K => a.q.iter().enumerate().map(|(i, &q)| f32::from(q) * a.dk[i / QK_K]).collect(),
            _ => a.f.to_vec(),
        };
        w.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
    }

    /// How far a kernel may be from the exact f64 dot of the dequantized operands: f32
    /// accumulation (1e-5 of the absolute-value sum) plus, for Q4_1, ggml's rounding of the Q8_1
    /// block sum `s` to f16 (half an f16 ulp of `s`, times the block min).
    fn dot_tolerance(dtype: DType, row: &[u8], xq: &QuantizedActivations, t: usize) -> f64 {
        let w = dequantized(dtype, row, xq.cols);
        let a = xq.token(t);
        let abs_x: Vec<f32> = match xq.kind {
            ActKind::Q8 => a.q.iter().enumerate().map(|(i, &q)| f32::from(q).abs() * a.ds1[2 * (i / QK)]).collect(),
            ActKind::Q8K => a.q.iter().enumerate().map(|(i, &q)| f32::from(q).abs() * a.dk[i / QK_K].abs()).collect(),
            _ => a.f.iter().map(|v| v.abs()).collect(),
        };
        let abs_sum: f64 = w.iter().zip(&abs_x).map(|(&a, &b)| f64::from(a.abs()) * f64::from(b)).sum();
        let mut tol = 1e-5 * abs_sum + 1e-6;
        if dtype == DType::Q4_1 {
            for (b, ds) in row.chunks_exact(20).zip(a.ds1.chunks_exact(2)) {
                tol += f64::from(f16_at(b, 2).abs()) * f64::from(ds[1].abs()) * 2f64.powi(-11);
            }
        }
        tol
    }

    fn random_weights(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
        let rb = dtype.row_bytes(cols).unwrap();
        let mut w = vec![0u8; rows * rb];
        for r in 0..rows {
            let x = rng.vec(cols, 0.05);
            quantize_row(dtype, &x, &mut w[r * rb..(r + 1) * rb]);
        }
        w
    }

    #[test]
    fn scalar_dot_matches_dequantized_f64_dot() {
        let mut rng = Rng(7);
        for dtype in DType::ALL {
            let cols = 512;
            let w = random_weights(&mut rng, dtype, 8, cols);
            let x = rng.vec(cols, 1.0);
            let mut xq = QuantizedActivations::new();
            xq.quantize(dtype, &x);
            let rb = dtype.row_bytes(cols).unwrap();
            for row in w.chunks_exact(rb) {
                let got = dot_row_reference(dtype, row, &xq);
                let want = dot_dequantized(dtype, row, &xq, 0);
                let tol = dot_tolerance(dtype, row, &xq, 0);
                assert!((f64::from(got) - want).abs() <= tol, "{dtype}: scalar {got} vs dequantized {want} (tol {tol})");
            }
        }
    }

    /// Every kernel level against the scalar reference and the f64 dot of the dequantized
    /// operands, on SmolLM2's matrix shapes (rows × cols).
    #[test]
    fn simd_kernels_match_scalar_on_real_shapes() {
        let mut rng = Rng(11);
        let shapes = [(576, 576), (1536, 576), (576, 1536), (192, 576)];
        for dtype in DType::ALL {
            for &(rows, cols) in &shapes {
                if dtype.row_bytes(cols).is_none() {
                    continue;
                }
                compare_kernels(&mut rng, dtype, rows, cols);
            }
        }
    }

    /// Odd block counts (tail block), row counts that are not a multiple of four, float rows
    /// whose length is not a multiple of the vector width.
    #[test]
    fn simd_kernels_handle_ragged_shapes() {
        let mut rng = Rng(12);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            for (rows, cols) in [(7, 96), (1, 32), (5, 160), (3, 64)] {
                compare_kernels(&mut rng, dtype, rows, cols);
            }
        }
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (rows, cols) in [(5, 100), (1, 7), (6, 17), (4, 33)] {
                compare_kernels(&mut rng, dtype, rows, cols);
            }
        }
        for dtype in [DType::Q4_K, DType::Q5_K, DType::Q6_K] {
            for (rows, cols) in [(7, 256), (64, 768), (3, 2048)] {
                compare_kernels(&mut rng, dtype, rows, cols);
            }
        }
    }

    /// The tied output matrix of SmolLM2: Q8_0, 49152 × 576.
    #[test]
    fn q8_0_output_matrix_49152_rows() {
        let mut rng = Rng(13);
        compare_kernels(&mut rng, DType::Q8_0, 49152, 576);
    }

    fn compare_kernels(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) {
        let w = random_weights(rng, dtype, rows, cols);
        let x = rng.vec(cols, 1.0);
        let mut xq = QuantizedActivations::new();
        xq.quantize(dtype, &x);
        let rb = dtype.row_bytes(cols).unwrap();
        let reference: Vec<f32> = w.chunks_exact(rb).map(|row| dot_scalar(dtype, row, xq.token(0))).collect();
        // Scalar reference against exact arithmetic on a sample of rows.
        for r in (0..rows).step_by(rows.div_ceil(64)) {
            let row = &w[r * rb..(r + 1) * rb];
            let want = dot_dequantized(dtype, row, &xq, 0);
            let tol = dot_tolerance(dtype, row, &xq, 0);
            assert!((f64::from(reference[r]) - want).abs() <= tol, "{dtype} {rows}x{cols} row {r}: scalar {} vs exact {want}", reference[r]);
        }
        for isa in available_isas() {
            let mut y = vec![f32::NAN; rows];
            matvec_with(isa, dtype, &w, rows, cols, &xq, &mut y);
            let mut worst = (0.0f64, 0);
            for r in 0..rows {
                // Same integer block sums; only the order of f32 additions differs.
                let tol = dot_tolerance(dtype, &w[r * rb..(r + 1) * rb], &xq, 0);
                let err = f64::from((y[r] - reference[r]).abs());
                assert!(
                    err <= tol,
                    "{dtype} {rows}x{cols} {isa:?} row {r}: {} vs scalar {} (tol {tol})\n first values: {:?}\n scalar:       {:?}",
                    y[r],
                    reference[r],
                    &y[..rows.min(4)],
                    &reference[..rows.min(4)]
                );
                if err / tol > worst.0 {
                    worst = (err / tol, r);
                }
            }
            let d = dot_row_with_isa(isa, dtype, &w[..rb], &xq);
            assert_eq!(d, y[0], "{dtype} {isa:?}: dot_row differs from matvec row 0");
            if rows >= 4096 {
                println!("{dtype} {rows}x{cols} {isa:?}: worst error {:.3} of tolerance at row {}", worst.0, worst.1);
            }
        }
    }

    /// Activations like SmolLM2's: most values around 1, a few dimensions (the same in every
    /// token) near ±180 as in the residual stream, and in odd tokens some near ±3000 as in the
    /// input of ffn_down, so one block's scale is 100 to 3000 times the others'.
    fn outlier_activations(rng: &mut Rng, n_tokens: usize, cols: usize) -> Vec<f32> {
        let mut x = rng.vec(n_tokens * cols, 1.0);
        for (t, xt) in x.chunks_exact_mut(cols).enumerate() {
            let big = if t % 2 == 1 { 2900.0 } else { 150.0 };
            for (k, &i) in [3usize, 17, 40, 129, 300, 1100].iter().enumerate() {
                if i < cols {
                    let sign = if (k + t) % 2 == 0 { 1.0 } else { -1.0 };
                    xt[i] = sign * (big + 7.0 * k as f32 + t as f32);
                }
            }
        }
        x
    }

    /// Regression: with `DRIFTWOOD_CPU_ISA=avx512`, SmolLM2's logits after a batched prefill
    /// differed by up to 0.84 from token-by-token evaluation. The AVX-512 Q4 kernel added the
    /// Q4_1 m·s terms in a different order for one token than for a tile of tokens; each result
    /// stayed within f32 rounding of the scalar reference, but the model quantizes every output
    /// again with Q8 steps of up to ~20 (activations near 3000), so last-bit differences flip
    /// quants and grow into visible logit changes. So: every level within rounding of the
    /// scalar reference, and a prefill tile of 1..4 tokens (matmul) bit for bit equal to
    /// one-token decode (matvec), over odd and even block counts and row counts leaving every
    /// remainder of the four-row tiles.
    #[test]
    fn avx512_q4_matches_scalar_on_outlier_activations() {
        let mut rng = Rng(41);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            for cols in [1536, 576, 96, 32] {
                for rows in [8, 5, 6, 7, 1] {
                    let w = random_weights(&mut rng, dtype, rows, cols);
                    let rb = dtype.row_bytes(cols).unwrap();
                    for n_tokens in 1..=4 {
                        let x = outlier_activations(&mut rng, n_tokens, cols);
                        let mut xq = QuantizedActivations::new();
                        xq.quantize_batch(dtype, &x, n_tokens, cols);
                        for isa in available_isas() {
                            let mut ym = vec![f32::NAN; rows * n_tokens];
                            matmul_with(isa, dtype, &w, rows, cols, &xq, n_tokens, &mut ym);
                            let mut one = QuantizedActivations::new();
                            for t in 0..n_tokens {
                                one.quantize(dtype, &x[t * cols..(t + 1) * cols]);
                                let mut yv = vec![f32::NAN; rows];
                                matvec_with(isa, dtype, &w, rows, cols, &one, &mut yv);
                                for r in 0..rows {
                                    let row = &w[r * rb..(r + 1) * rb];
                                    let want = dot_scalar(dtype, row, xq.token(t));
                                    let tol = dot_tolerance(dtype, row, &xq, t);
                                    let (m, v) = (ym[t * rows + r], yv[r]);
                                    let at = format!("{dtype} {rows}x{cols} {isa:?} token {t} of {n_tokens} row {r}");
                                    assert!(f64::from((v - want).abs()) <= tol, "{at}: matvec {v} vs scalar {want} (tol {tol})");
                                    assert_eq!(m.to_bits(), v.to_bits(), "{at}: matmul {m} vs matvec {v} (scalar {want})");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn dot_row_with_isa(isa: Isa, dtype: DType, row: &[u8], xq: &QuantizedActivations) -> f32 {
        let mut y = [0f32];
        dot_row_with(isa, dtype, row, xq, &mut y);
        y[0]
    }

    /// Prefill: every token of `matmul` equals a `matvec` of that token (same integer block
    /// sums; the tiled kernels add the Q4_1 min terms in another order, so allow f32 rounding).
    #[test]
    fn matmul_equals_matvec_per_token() {
        let mut rng = Rng(21);
        for dtype in DType::ALL {
            let (rows, cols) = (if dtype.block_elems() == QK_K { 36 } else { 70 }, 512);
            let w = random_weights(&mut rng, dtype, rows, cols);
            for n_tokens in [1, 3, 4, 5, 9] {
                let x = rng.vec(n_tokens * cols, 1.0);
                let mut xq = QuantizedActivations::new();
                xq.quantize_batch(dtype, &x, n_tokens, cols);
                for isa in available_isas() {
                    let mut y = vec![f32::NAN; rows * n_tokens];
                    matmul_with(isa, dtype, &w, rows, cols, &xq, n_tokens, &mut y);
                    let mut one = QuantizedActivations::new();
                    for t in 0..n_tokens {
                        one.quantize(dtype, &x[t * cols..(t + 1) * cols]);
                        let mut yt = vec![0f32; rows];
                        matvec_with(isa, dtype, &w, rows, cols, &one, &mut yt);
                        let rb = dtype.row_bytes(cols).unwrap();
                        for r in 0..rows {
                            let tol = dot_tolerance(dtype, &w[r * rb..(r + 1) * rb], &xq, t);
                            let (a, b) = (y[t * rows + r], yt[r]);
                            assert!(f64::from((a - b).abs()) <= tol, "{dtype} {isa:?} token {t} of {n_tokens} row {r}: matmul {a} vs matvec {b}");
                        }
                    }
                }
            }
        }
    }

    /// A large prefill that actually splits across threads and row chunks.
    #[test]
    fn matmul_parallel_chunks_cover_every_row() {
        let mut rng = Rng(22);
        let (rows, cols, n_tokens) = (1536, 576, 7);
        let w = random_weights(&mut rng, DType::Q4_1, rows, cols);
        let x = rng.vec(n_tokens * cols, 1.0);
        let mut xq = QuantizedActivations::new();
        xq.quantize_batch(DType::Q4_1, &x, n_tokens, cols);
        let mut y = vec![f32::NAN; rows * n_tokens];
        matmul(DType::Q4_1, &w, rows, cols, &xq, n_tokens, &mut y);
        let rb = DType::Q4_1.row_bytes(cols).unwrap();
        for t in 0..n_tokens {
            for r in 0..rows {
                let want = dot_scalar(DType::Q4_1, &w[r * rb..(r + 1) * rb], xq.token(t));
                let tol = dot_tolerance(DType::Q4_1, &w[r * rb..(r + 1) * rb], &xq, t);
                assert!(f64::from((y[t * rows + r] - want).abs()) <= tol, "token {t} row {r}");
            }
        }
    }

    #[test]
    fn matvec_many_equals_separate_matvecs() {
        let mut rng = Rng(23);
        let cols = 576;
        let specs = [(DType::Q4_1, 576), (DType::Q8_0, 192), (DType::Q4_0, 1536), (DType::Q4_1, 5)];
        let ws: Vec<Vec<u8>> = specs.iter().map(|&(d, r)| random_weights(&mut rng, d, r, cols)).collect();
        let x = rng.vec(cols, 1.0);
        let mut xq = QuantizedActivations::new();
        xq.quantize(DType::Q4_1, &x);
        let mut outs: Vec<Vec<f32>> = specs.iter().map(|&(_, r)| vec![f32::NAN; r]).collect();
        {
            let mut jobs: Vec<MatvecJob<'_>> =
                specs.iter().zip(&ws).zip(outs.iter_mut()).map(|((&(dtype, rows), w), y)| MatvecJob { dtype, w, rows, y }).collect();
            matvec_many(&mut jobs, cols, &xq);
        }
        for ((&(dtype, rows), w), got) in specs.iter().zip(&ws).zip(&outs) {
            let mut want = vec![0f32; rows];
            matvec(dtype, w, rows, cols, &xq, &mut want);
            assert_eq!(got, &want, "{dtype} {rows} rows");
        }
    }

    #[test]
    fn activation_buffers_are_reused() {
        let mut rng = Rng(24);
        let x = rng.vec(4 * 576, 1.0);
        let mut xq = QuantizedActivations::new();
        xq.quantize_batch(DType::Q4_1, &x, 4, 576);
        let ptrs = (xq.q.as_ptr(), xq.ds1.as_ptr(), xq.ds0.as_ptr());
        for t in 0..4 {
            xq.quantize(DType::Q8_0, &x[t * 576..(t + 1) * 576]);
            xq.quantize_batch(DType::Q4_0, &x, 4, 576);
        }
        assert_eq!(ptrs, (xq.q.as_ptr(), xq.ds1.as_ptr(), xq.ds0.as_ptr()));
        xq.quantize(DType::F16, &x[..576]);
        let fp = xq.f.as_ptr();
        xq.quantize(DType::BF16, &x[576..1152]);
        assert_eq!(fp, xq.f.as_ptr());
    }

    #[test]
    #[should_panic(expected = "activations were quantized as Q8K, q8_0 weights need Q8")]
    fn mismatched_activation_kind_is_refused() {
        let mut xq = QuantizedActivations::new();
        xq.quantize(DType::Q4_K, &[0.5; 256]);
        let w = vec![0u8; DType::Q8_0.row_bytes(256).unwrap()];
        let mut y = [0f32];
        matvec(DType::Q8_0, &w, 1, 256, &xq, &mut y);
    }

    /// The SIMD activation quantizer gives the scalar one's bytes exactly, ties included.
    #[test]
    fn q8_activation_quantizers_agree_bit_for_bit() {
        let mut rng = Rng(31);
        let mut x = rng.vec(64 * 32, 3.0);
        // Exact ties after scaling: amax 127 makes the multiplier 1.
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 16.5 };
        }
        x[32..64].fill(0.0);
        let n = x.len();
        let mut want = (vec![0i8; n], vec![0f32; n / 16], vec![0f32; n / 16]);
        quantize_q8_act(Isa::Scalar, &x, &mut want.0, &mut want.1, &mut want.2);
        assert_eq!(&want.0[1..6], &[-16, -14, -14, -12, -12], "ties go to even");
        for isa in available_isas() {
            let mut got = (vec![0i8; n], vec![0f32; n / 16], vec![0f32; n / 16]);
            quantize_q8_act(isa, &x, &mut got.0, &mut got.1, &mut got.2);
            assert_eq!(got, want, "{isa:?}");
        }
    }

    #[test]
    fn nearest_int_matches_round_ties_even() {
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 4_194_303.0, 1e9, -1e9, 0.49999997] {
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }
}
