//! Tests of the CUDA backend that need no GPU: layouts, launch plans, the kernel source.

use super::kernels::{kernel_source, KERNELS};
use super::*;

/// kernels.cu uses the format table's names and defines none of them itself: every number it
/// shares with Rust comes from the generated prelude.
#[test]
fn kernel_source_takes_its_numbers_from_the_format_table() {
    let prelude = crate::quant::kernel_prelude();
    for d in DType::ALL {
        let name = format!("DT_{}", d.name().to_ascii_uppercase());
        assert!(prelude.contains(&format!("#define {name} {}\n", d.kernel_code())), "{name}");
    }
    for a in ActFormat::ALL {
        assert!(prelude.contains(&format!("#define {} {}\n", a.kernel_name(), a.kernel_code())));
    }
    for word in ["DT_", "AK_", "MAX_BATCH", "act_kind(int", "block_bytes(int"] {
        let defined = KERNELS.lines().any(|l| l.trim_start().starts_with(&format!("#define {word}")) || l.contains(&format!("constexpr int {word}")));
        assert!(!defined, "kernels.cu defines {word} by hand");
    }
    assert!(kernel_source().starts_with(&prelude));
}

/// `Seg` must have the layout of the kernel's struct: two pointers and an int, padded to 24.
#[test]
fn segment_layout_matches_the_kernel() {
    assert_eq!(std::mem::size_of::<Seg>(), 24);
    // RopeStore: three pointers, two ints, a pointer.
    assert_eq!(std::mem::size_of::<RopeStore>(), 40);
    assert_eq!(std::mem::align_of::<Seg>(), 8);
}

#[test]
fn small_matrices_are_split_across_more_warps() {
    let f16_2048 = warp_steps(DType::F16, 2048);
    assert_eq!(f16_2048, 8);
    let wave = 4 * 132; // an H100/H200 at 4 blocks per SM
    assert_eq!(k_slices(64_128, f16_2048, wave), 1); // output projection, 128256 rows in pairs
    assert_eq!(k_slices(8192, f16_2048, wave), 1);
    assert_eq!(k_slices(1024, f16_2048, wave), 4); // 2048 rows in pairs: 512 groups, one wave
    assert_eq!(k_slices(288, 8, 0), 8); // 576 rows in pairs, with long rows
    assert_eq!(k_slices(0, 8, 0), 8);
    // ...never more slices than a row has steps: SmolLM2's 576-wide rows...
    assert_eq!(k_slices(288, warp_steps(DType::F16, 576), wave), 2);
    assert_eq!(k_slices(288, warp_steps(DType::Q4_1, 576), wave), 1);
    assert_eq!(k_slices(768, warp_steps(DType::Q4_0, 2048), wave), 2);
    // ...and no more than one wave of groups: Llama-3.2-1B's q/k/v, 3072 rows in pairs.
    assert_eq!(k_slices(1536, f16_2048, wave), 2);
    assert_eq!(k_slices(1536, f16_2048, 0), 4);
}

#[test]
fn dense_plans_cover_rows_with_whole_chunks() {
    let plan = |rows, cols, m| dense_plan(DType::F16, rows, cols, m).map(|p| (DENSE_CHUNKS[p.chunks], 1usize << p.tl, p.rows_per_group, p.per_sm));
    // Llama-3.2-1B: q/k/v and o (2048 wide), gate/up, down (8192 wide).
    assert_eq!(plan(3072, 2048, 1), Some((1, 256, 4, 4)));
    assert_eq!(plan(8192, 2048, 2), Some((1, 256, 2, 4)));
    assert_eq!(plan(2048, 8192, 1), Some((4, 256, 2, 2)));
    // SmolLM2-135M: 576 wide (72 chunks: 128 threads), 1536 wide (192: 256 threads).
    assert_eq!(plan(576, 576, 1), Some((1, 128, 4, 4)));
    assert_eq!(plan(576, 1536, 1), Some((1, 256, 4, 4)));
    assert_eq!(plan(64, 64, 1), Some((1, 32, 4, 4)), "narrow rows still take a warp");
    assert_eq!(plan(64, 4096, 2), Some((2, 256, 2, 2)));
    // Not for it: too wide, partial chunks, odd rows, other formats.
    assert_eq!(plan(64, 8200, 1), None);
    assert_eq!(plan(64, 100, 1), None);
    assert_eq!(plan(63, 2048, 1), None);
    assert!(dense_plan(DType::Q4_0, 64, 2048, 1).is_none() && dense_plan(DType::F32, 64, 2048, 1).is_none());
    assert_eq!(dense_plan(DType::BF16, 64, 2048, 1).map(|p| p.dtype), Some(1));
    // Blocks: one per block step, at most per_sm per multiprocessor.
    let p = dense_plan(DType::F16, 3072, 2048, 1).unwrap();
    assert_eq!(p.blocks(3072, 132), 528, "768 groups of 4 rows, 4 blocks an SM");
    assert_eq!(p.blocks(400, 132), 100);
    let p = dense_plan(DType::F16, 576, 576, 1).unwrap();
    assert_eq!(p.blocks(576, 132), 72, "two 128-thread groups a block: 144 groups of 4 rows");
}

#[test]
fn persistent_grids_fit_in_one_wave() {
    // Llama-3.2-1B's gate/up compiled to 70 registers: 3 blocks of 256 threads fit an SM
    // where 4 were planned, and 132 of 528 blocks ran as a second wave.
    let p = dense_plan(DType::F16, 8192, 2048, 2).unwrap();
    assert_eq!(p.blocks(8192, 132), 528);
    assert_eq!(p.fitted(p.per_sm, 3).blocks(8192, 132), 396);
    assert_eq!(p.fitted(p.per_sm, 8).blocks(8192, 132), 528, "more room never adds blocks");
    assert_eq!(p.fitted(6, 8).blocks(8192, 132), 792, "an override within what fits is kept");
    assert_eq!(p.fitted(p.per_sm, 0).blocks(8192, 132), 132, "an occupancy of 0 still launches");
}

#[test]
fn argmax_keys_order_as_the_host_argmax() {
    // kernels.cu's argmax_f32 key: order-preserving value bits above, complemented index
    // below; NaN and -inf are skipped, 0 means none.
    let key = |i: usize, v: f32| -> u64 {
        if v.is_nan() || v == f32::NEG_INFINITY {
            return 0;
        }
        let b = v.to_bits();
        let ordered = if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 };
        (u64::from(ordered) << 32) | u64::from(!(i as u32))
    };
    let mut r = 0x2545_f491_4f6c_dd1du64;
    for len in [1usize, 2, 7, 100, 3000] {
        for case in 0..8 {
            let xs: Vec<f32> = (0..len)
                .map(|_| {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    match (r % 11, case) {
                        (0, c) if c >= 4 => f32::NAN,
                        (1, c) if c >= 4 => f32::NEG_INFINITY,
                        (2, 6) => f32::INFINITY,
                        _ if case == 7 => f32::NEG_INFINITY,
                        _ => ((r >> 20) % 9) as f32 * if case % 2 == 0 { -0.25 } else { 0.5 } - 1.0,
                    }
                })
                .collect();
            let best = xs.iter().enumerate().map(|(i, &v)| key(i, v)).max().unwrap_or(0);
            let got = if best == 0 { 0 } else { !(best as u32) };
            assert_eq!(got, crate::numeric::argmax(&xs), "len {len} case {case}");
        }
    }
}

#[test]
fn dense_instances_match_the_kernel_source() {
    for ch in DENSE_CHUNKS {
        for suffix in ["f16", "bf16"] {
            let inst = format!("DENSE({suffix}, DT_{}, {ch})", suffix.to_uppercase());
            assert!(KERNELS.contains(&inst), "kernels.cu lacks {inst}");
        }
    }
}

#[test]
fn decode_splits_depend_only_on_the_cache_size() {
    // Decode (one token): the same split count at every position, so a captured graph fits.
    assert_eq!(CudaBackend::splits(4096, 1, 10), CudaBackend::splits(4096, 1, 4000));
    assert_eq!(CudaBackend::splits(4096, 1, 1), (16, 256));
    // Small caches: one block per head, no combine pass.
    assert_eq!(CudaBackend::splits(1024, 1, 3), (1, 1024));
    assert_eq!(CudaBackend::splits(4096, 300, 300), (1, 300));
    let (s, chunk) = CudaBackend::splits(131072, 1, 5);
    assert!(s <= 64 && s * chunk >= 131072);
    // Prefill covers exactly its context.
    let (s, chunk) = CudaBackend::splits(4096, 512, 3000);
    assert!(s > 1 && s * chunk >= 3000 && (s - 1) * chunk < 3000);
    assert_eq!(CudaBackend::splits(64, 1, 1), (1, 64));
}

/// Compiles kernels.cu with NVRTC for Hopper when NVRTC is installed (CI installs it from
/// PyPI; see .ci/run). Without it the test says so and passes: it checks the source, not a GPU.
#[test]
fn kernels_compile_with_nvrtc() {
    // Hopper takes the programmatic-launch instructions; Ampere compiles without them.
    for (arch, pdl) in [("sm_90", true), ("sm_80", false)] {
        match compile_kernels(arch) {
            Ok(ptx) => {
                for name in ["embed", "matvec_q4_k", "matvec_bf16", "attn_partial", "attn_combine", "rms_norm", "rope", "kv_store", "act_prep", "copy_f32"] {
                    assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the {arch} PTX");
                }
                assert_eq!(ptx.contains("griddepcontrol.wait"), pdl, "{arch}");
            }
            Err(e) if e.contains("not installed") => eprintln!("skipped: {e}"),
            Err(e) => panic!("{arch}: {e}"),
        }
    }
}

/// The value kernels.cu's `dequant_one` reads at element `i` of a repacked row.
fn repacked_value(d: DType, row: &[u8], i: usize, cols: usize) -> f32 {
    let (nb, b, j) = (cols / 32, i / 32, i % 32);
    let h = |o: usize| half::f16::from_le_bytes([row[o], row[o + 1]]).to_f32();
    let nibble = |v: u8| f32::from(if j < 16 { v & 0xF } else { v >> 4 });
    match d {
        DType::Q8_0 => h(32 * nb + 2 * b) * f32::from(row[32 * b + j] as i8),
        DType::Q4_0 => h(16 * nb + 2 * b) * (nibble(row[16 * b + j % 16]) - 8.0),
        DType::Q4_1 => h(16 * nb + 4 * b) * nibble(row[16 * b + j % 16]) + h(16 * nb + 4 * b + 2),
        _ => unreachable!(),
    }
}

#[test]
fn repacked_rows_hold_the_same_values_at_aligned_strides() {
    use crate::quant::{dequantize_row, quantize_row};
    // 3 blocks a row: 54, 60 and 102 GGUF bytes, none a multiple of 16.
    let (rows, cols) = (3, 96);
    let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    for d in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
        let rb = d.row_bytes(cols).unwrap();
        let mut src = vec![0u8; rows * rb];
        for (xr, sr) in x.chunks_exact(cols).zip(src.chunks_exact_mut(rb)) {
            quantize_row(d, xr, sr);
        }
        let packed = repack_rows(d, cols, &src).unwrap();
        let stride = device_row_bytes(d, cols);
        assert!(stride.is_multiple_of(16) && stride >= rb, "{d}: stride {stride}");
        assert_eq!(packed.len(), rows * stride, "{d}");
        for (sr, pr) in src.chunks_exact(rb).zip(packed.chunks_exact(stride)) {
            let mut want = vec![0f32; cols];
            dequantize_row(d, sr, &mut want);
            for (i, w) in want.iter().enumerate() {
                assert_eq!(repacked_value(d, pr, i, cols), *w, "{d} element {i}");
            }
        }
        assert!(repack_rows(d, cols, &src[..rb + 1]).is_err(), "{d}: a partial row is refused");
    }
}

/// Without a CUDA driver, opening the backend is a clear error, not a panic.
#[test]
fn opening_without_a_driver_is_a_clear_error() {
    if driver::driver_present() {
        return;
    }
    let err = CudaBackend::new(0).err().expect("no driver, no backend").to_string();
    assert!(err.contains("cuda:0 is not available") && err.contains("libcuda"), "{err}");
}
