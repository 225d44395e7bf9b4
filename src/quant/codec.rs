//! The row codec of every weight format: dequantize a packed row to f32, and quantize f32 to a
//! packed row exactly as ggml's `quantize_row_*_ref` does (so files Driftwood writes load in
//! llama.cpp and the reverse), plus the scalar helpers (f16/bf16 rounding, ggml's
//! `nearest_int`, K-quant scale unpacking) the CPU kernels share.
//!
//! Hand-written because no crate reads or writes ggml's block layouts bit-exactly.

use half::f16;

use super::{DType, QK, QK_K};

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

#[inline]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline]
pub fn f16_bits(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[inline]
pub fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaN kept quiet.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// ggml's `nearest_int` (round half to even) for the values it is used on; saturates beyond.
#[inline]
pub fn nearest_int(x: f32) -> i32 {
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
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

pub fn check_row(what: &str, dtype: DType, n: usize, bytes: usize) {
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
pub fn q6_quad(ql: &[u8], qh: &[u8], l: usize) -> [i8; 4] {
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
