//! x86 SIMD kernels (AVX2, AVX-512 VNNI) for every weight format.
//!
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
                    let p16 = if K == 8 { _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(yv[t], x)) } else { _mm256_maddubs_epi16(x, yv[t]) };
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
