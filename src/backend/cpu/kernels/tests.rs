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
        Some(ActFormat::Q8) => a.q.iter().enumerate().map(|(i, &q)| f32::from(q) * a.ds1[2 * (i / QK)]).collect(),
        Some(ActFormat::Q8K) => a.q.iter().enumerate().map(|(i, &q)| f32::from(q) * a.dk[i / QK_K]).collect(),
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
        Some(ActFormat::Q8) => a.q.iter().enumerate().map(|(i, &q)| f32::from(q).abs() * a.ds1[2 * (i / QK)]).collect(),
        Some(ActFormat::Q8K) => a.q.iter().enumerate().map(|(i, &q)| f32::from(q).abs() * a.dk[i / QK_K].abs()).collect(),
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
        let mut jobs: Vec<MatvecJob<'_>> = specs.iter().zip(&ws).zip(outs.iter_mut()).map(|((&(dtype, rows), w), y)| MatvecJob { dtype, w, rows, y }).collect();
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
