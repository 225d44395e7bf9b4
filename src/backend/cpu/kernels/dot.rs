//! Scalar reference dot products of one packed row with quantized activations: the definition
//! every SIMD kernel is tested against, and the fallback where no SIMD kernel exists.

use super::*;

/// Q4_1 block × Q8_1 block (ggml `vec_dot_q4_1_q8_1` for one block).
#[inline]
pub(super) fn block_q4_1(b: &[u8], y: &[i8], dy: f32, s: f32) -> f32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let q = b[4 + j];
        sumi += i32::from(q & 0xF) * i32::from(y[j]) + i32::from(q >> 4) * i32::from(y[j + 16]);
    }
    f16_at(b, 0) * dy * sumi as f32 + f16_at(b, 2) * s
}

/// Q4_0 block × Q8_0 block.
#[inline]
pub(super) fn block_q4_0(b: &[u8], y: &[i8], dy: f32) -> f32 {
    let mut sumi = 0i32;
    for j in 0..16 {
        let q = b[2 + j];
        sumi += (i32::from(q & 0xF) - 8) * i32::from(y[j]) + (i32::from(q >> 4) - 8) * i32::from(y[j + 16]);
    }
    sumi as f32 * (f16_at(b, 0) * dy)
}

/// Q8_0 block × Q8_0 block.
#[inline]
pub(super) fn block_q8_0(b: &[u8], y: &[i8], dy: f32) -> f32 {
    let mut sumi = 0i32;
    for j in 0..32 {
        sumi += i32::from(b[2 + j] as i8) * i32::from(y[j]);
    }
    sumi as f32 * (f16_at(b, 0) * dy)
}

/// Q4_K / Q5_K super-block × Q8_K (ggml `vec_dot_q4_K_q8_K` / `q5_K` generic).
pub(super) fn block_q45_k(five: bool, b: &[u8], y: &[i8], dy: f32, bsums: &[i16]) -> f32 {
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
pub(super) fn block_q6_k(b: &[u8], y: &[i8], dy: f32) -> f32 {
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
pub(super) fn dot_scalar(dtype: DType, row: &[u8], a: Act<'_>) -> f32 {
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

pub(super) fn dot_row_with(isa: Isa, dtype: DType, row: &[u8], xq: &QuantizedActivations, y: &mut [f32; 1]) {
    xq.check("dot_row", dtype, xq.cols, 1);
    check_row("dot_row", dtype, xq.cols, row.len());
    rows_kernel(isa, dtype, row, xq.cols, xq.token(0), y);
}
