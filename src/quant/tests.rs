use super::*;

#[test]
fn ggml_ids_round_trip() {
    for t in DType::ALL {
        assert_eq!(DType::from_ggml(t.ggml_id()), Some(t), "{t}");
        assert_eq!(DType::parse(t.name()), Some(t), "{t}");
        assert_eq!(DType::parse(&t.name().to_ascii_uppercase()), Some(t), "{t}");
    }
    assert_eq!(DType::from_ggml(4), None, "q4_2 was removed from ggml");
    assert_eq!(DType::from_ggml(9), None, "q8_1 is never a tensor type here");
    assert_eq!(DType::parse("q4_K_M"), None);
}

#[test]
fn block_sizes_match_ggml_common_h() {
    // static_asserts of ggml-common.h, spelled out.
    let expect = [
        (DType::F32, 1, 4),
        (DType::F16, 1, 2),
        (DType::BF16, 1, 2),
        (DType::Q8_0, 32, 34),
        (DType::Q4_0, 32, 18),
        (DType::Q4_1, 32, 20),
        (DType::Q4_K, 256, 144),
        (DType::Q5_K, 256, 176),
        (DType::Q6_K, 256, 210),
    ];
    for (t, elems, bytes) in expect {
        assert_eq!(t.block_elems(), elems, "{t}");
        assert_eq!(t.block_bytes(), bytes, "{t}");
        assert_eq!(t.is_quantized(), elems > 1, "{t}");
    }
}

#[test]
fn row_bytes_requires_whole_blocks() {
    assert_eq!(DType::Q4_1.row_bytes(576), Some(18 * 20));
    assert_eq!(DType::Q8_0.row_bytes(576), Some(18 * 34));
    assert_eq!(DType::Q4_1.row_bytes(577), None);
    assert_eq!(DType::Q6_K.row_bytes(576), None);
    assert_eq!(DType::Q6_K.row_bytes(2048), Some(8 * 210));
    assert_eq!(DType::F16.row_bytes(3), Some(6));
    assert_eq!(DType::F32.row_bytes(usize::MAX), None);
}

#[test]
fn the_table_is_indexed_by_kernel_code() {
    for (i, f) in FORMATS.iter().enumerate() {
        assert_eq!(f.dtype as usize, i, "{} sits at row {i}", f.name);
        assert_eq!(f.dtype.kernel_code() as usize, i);
        assert_eq!(f.dtype.format().name, f.name);
    }
    assert_eq!(DType::ALL.len(), FORMATS.len());
}

#[test]
fn the_kernel_prelude_carries_the_table() {
    let p = kernel_prelude();
    assert!(p.contains("#define DT_Q4_K 6\n"), "{p}");
    assert!(p.contains("#define AK_Q8K 4\n"), "{p}");
    assert!(p.contains(&format!("#define MAX_BATCH {MAX_PASS_TOKENS}\n")), "{p}");
    // The pairing is spelled per format, not derived from the numbering.
    assert!(p.contains("dt == DT_Q4_1 ? AK_Q8 :"), "{p}");
    assert!(p.contains("dt == DT_Q6_K ? 210 :"), "{p}");
}
