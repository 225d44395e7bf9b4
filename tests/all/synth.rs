//! `driftwood synth` and `engine::synth`: synthesized models load with the shape they were asked
//! for, give finite and varied logits, are the same bytes for the same seed (whatever the thread
//! count), and bad requests fail with a clear message and no file.

use std::path::Path;
use std::sync::Arc;

use driftwood::backend::cpu::CpuBackend;
use driftwood::engine::gguf::GgufFile;
use driftwood::engine::load;
use driftwood::engine::model::{Config, Llama3RopeScaling};
use driftwood::engine::sampler::{self, SamplerConfig};
use driftwood::engine::synth::{self, SynthShape, BOS_ID, EOS_ID};
use driftwood::engine::Session;
use driftwood::quant::DType;

use crate::common::{run, temp_dir};

/// A small shape with everything the presets have (GQA, Llama 3 RoPE scaling, tied embeddings)
/// and widths that fit every format, K-quants included.
fn small_shape() -> SynthShape {
    SynthShape {
        name: "test-small".into(),
        n_layers: 2,
        dim: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn_dim: 512,
        vocab_size: 384,
        context_length: 1024,
        rope_theta: 500000.0,
        rms_eps: 1e-5,
        rope_scaling: Some(Llama3RopeScaling { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 }),
        tied_embeddings: true,
    }
}

fn assert_config_is_shape(c: &Config, s: &SynthShape) {
    let got = (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size, c.context_length, c.rope_theta, c.rms_eps);
    let want = (s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim, s.vocab_size, s.context_length, s.rope_theta, s.rms_eps);
    assert_eq!(got, want, "(layers, dim, heads, kv heads, head_dim, ffn, vocab, context, rope_theta, rms_eps)");
}

/// Loads `path` on the CPU, evaluates a short text and checks the logits after each of its
/// bytes: all finite, not all equal. Returns the last logits.
fn eval_logits(path: &Path, shape: &SynthShape) -> Vec<f32> {
    let (model, tok) = load::load(path, Arc::new(CpuBackend::new(Some(2))), None).unwrap();
    assert_config_is_shape(&model.config, shape);
    let ids = tok.encode("Hi!\n", false).unwrap();
    assert_eq!(ids, [BOS_ID, 72, 105, 33, 10], "BOS, then one token per byte with id = byte");
    assert!(!tok.is_end_of_generation(ids[1]) && tok.is_end_of_generation(EOS_ID));
    let mut s = Session::new(Arc::new(model), Arc::new(tok), 64, SamplerConfig::default()).unwrap();
    s.eval(&ids[..1]).unwrap();
    for &id in &ids[1..] {
        s.eval(&[id]).unwrap();
        let l = s.logits();
        let (min, max) = l.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        println!("{}: after {id}: logits in [{min:.3}, {max:.3}], first {:?}", path.display(), &l[..3]);
        assert!(l.iter().all(|x| x.is_finite()), "non-finite logits after token {id}");
        assert!(max - min > 0.5, "logits nearly constant after token {id}: [{min}, {max}]");
    }
    s.logits().to_vec()
}

fn correlation(a: &[f32], b: &[f32]) -> f32 {
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (ma, mb) = (mean(a), mean(b));
    let (mut ab, mut aa, mut bb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        ab += (x - ma) * (y - mb);
        aa += (x - ma) * (x - ma);
        bb += (y - mb) * (y - mb);
    }
    ab / (aa * bb).sqrt()
}

#[test]
fn synthesized_small_model_loads_in_two_formats_with_finite_varied_logits() {
    let dir = temp_dir();
    let shape = small_shape();
    let mut last = Vec::new();
    for dtype in [DType::BF16, DType::Q4_K] {
        let path = dir.path().join(format!("small-{dtype}.gguf"));
        let report = synth::write_synth(&shape, dtype, 1, &path, |_, _| {}).unwrap();
        assert_eq!(report.n_params, shape.n_params());
        assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u32("general.file_type").unwrap(), if dtype == DType::BF16 { 32 } else { 15 });
        assert_eq!(f.get_u32("llama.rope.dimension_count").unwrap(), 64);
        assert_eq!(f.tensor("blk.1.ffn_down.weight").unwrap().dtype, dtype);
        assert_eq!(f.tensor("blk.1.ffn_norm.weight").unwrap().dtype, DType::F32);
        assert!(f.tensor("output.weight").is_none(), "tied embeddings");
        let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!((tokens.len(), tokens[10], tokens[32]), (384, "Ċ", "Ġ"));

        // rope_freqs.weight gives the frequencies Llama 3 scaling calls for.
        let (model, _) = load::load(&path, Arc::new(CpuBackend::new(Some(1))), None).unwrap();
        let scaled = Config { rope_scaling: shape.rope_scaling.clone(), ..model.config.clone() }.rope(None).inv_freq;
        let plain = Config { rope_scaling: None, ..model.config.clone() }.rope(None).inv_freq;
        let loaded = &model.weights.rope.inv_freq;
        assert!(loaded.iter().zip(&scaled).all(|(a, b)| (a - b).abs() <= 1e-5 * b), "{loaded:?} vs {scaled:?}");
        assert!(loaded[31] < plain[31] / 30.0, "the lowest frequency is divided by the factor");

        let logits = eval_logits(&path, &shape);
        if !last.is_empty() {
            // The same seed draws the same values: the formats differ only by rounding.
            let diff = logits.iter().zip(&last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let r = correlation(&logits, &last);
            println!("q4_K vs bf16: max |diff| {diff:.3}, correlation {r:.4}; first {:?} vs {:?}", &logits[..3], &last[..3]);
            assert!(r > 0.9, "q4_K logits barely follow the bf16 ones (correlation {r})");
        }
        last = logits;
    }
}

#[test]
fn same_seed_gives_the_same_bytes_whatever_the_thread_count() {
    let dir = temp_dir();
    let shape = small_shape();
    let write = |name: &str, seed: u64, threads: usize| {
        let path = dir.path().join(name);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| synth::write_synth(&shape, DType::Q8_0, seed, &path, |_, _| {})).unwrap();
        std::fs::read(&path).unwrap()
    };
    let a = write("a.gguf", 7, 1);
    let b = write("b.gguf", 7, 3);
    let c = write("c.gguf", 8, 2);
    assert!(a == b, "seed 7 on 1 and 3 threads differs");
    assert_eq!(a.len(), c.len());
    let differing = a.iter().zip(&c).filter(|(x, y)| x != y).count();
    println!("seed 7 vs seed 8: {differing} of {} bytes differ", a.len());
    assert!(differing > a.len() / 2, "only {differing} bytes differ between seeds");
}

#[test]
fn synth_cli_writes_smollm2_shape_that_loads() {
    let dir = temp_dir();
    let path = dir.path().join("smol.gguf");
    let p = path.to_str().unwrap();
    let r = run(&["synth", "--shape", "smollm2-135m", "--dtype", "q8_0", "--layers", "2", "--seed", "3", "-o", p]);
    r.assert_code(0);
    assert!(r.stderr.contains("smollm2-135m, 2 layers, q8_0"), "{}", r.stderr);
    let shape = SynthShape::preset("smollm2-135m").unwrap().with_layers(2);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u32("llama.vocab_size").unwrap(), 49152);
    assert!(f.tensor("rope_freqs.weight").is_none(), "smollm2 has no rope scaling");
    drop(f);
    eval_logits(&path, &shape);
    // The library with the same arguments writes the same file.
    let lib = dir.path().join("lib.gguf");
    synth::write_synth(&shape, DType::Q8_0, 3, &lib, |_, _| {}).unwrap();
    assert!(std::fs::read(&lib).unwrap() == std::fs::read(&path).unwrap(), "cli and library files differ");
}

#[test]
fn synth_cli_refuses_unknown_shapes_and_formats_that_do_not_fit() {
    let dir = temp_dir();
    let path = dir.path().join("x.gguf");
    let p = path.to_str().unwrap();
    let r = run(&["synth", "--shape", "llama-9b", "--dtype", "q8_0", "-o", p]);
    r.assert_code(2);
    assert!(r.stderr.contains("invalid value 'llama-9b' for '--shape <NAME>'") && r.stderr.contains("llama-3.2-1b, smollm2-135m"), "{}", r.stderr);
    let r = run(&["synth", "--shape", "smollm2-135m", "--dtype", "q4_k", "-o", p]);
    r.assert_code(2);
    assert!(r.stderr.contains("smollm2-135m cannot be stored as q4_K: embedding_length 576 is not a multiple of the q4_K block size 256"), "{}", r.stderr);
    let r = run(&["synth", "--shape", "smollm2-135m", "--dtype", "q5_1", "-o", p]);
    r.assert_code(2);
    assert!(r.stderr.contains("unknown weight format 'q5_1'"), "{}", r.stderr);
    let r = run(&["synth", "--shape", "smollm2-135m", "--dtype", "f16", "--layers", "0", "-o", p]);
    r.assert_code(2);
    assert!(r.stderr.contains("0 layers, expected 1 to 1024"), "{}", r.stderr);
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a refused request leaves no file");
}

#[test]
fn parity_against_the_cpus_own_scalar_kernels_differs_only_by_float_order_on_f32_weights() {
    let dir = temp_dir();
    let path = dir.path().join("f32.gguf");
    let p = path.to_str().unwrap();
    run(&["synth", "--shape", "smollm2-135m", "--dtype", "f32", "--layers", "1", "-o", p]).assert_code(0);
    // The reference runs the CPU's best kernels; the device under test the portable ones.
    let r = run(&["bench", "parity", "-m", p, "--device", "cpu:scalar", "--steps", "4", "--json"]);
    r.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert!(report["device"].as_str().unwrap().ends_with("scalar)"), "{}", report["device"]);
    assert_eq!(report["tokens_agree"].as_u64(), Some(5));
    let err = report["max_rel_err"].as_f64().unwrap();
    assert!(err < 1e-4, "f32 weights, no activation rounding: only the order of additions differs, got {err}");
    if driftwood::backend::cpu::Isa::best() > driftwood::backend::cpu::Isa::Scalar {
        assert!(err > 0.0, "the scalar kernels ran as the SIMD ones: the level was not applied");
    }
}

#[test]
fn eval_into_stores_the_logits_eval_leaves_and_an_empty_eval_stores_the_current_ones() {
    let dir = temp_dir();
    let path = dir.path().join("small.gguf");
    let shape = small_shape();
    synth::write_synth(&shape, DType::Q8_0, 5, &path, |_, _| {}).unwrap();
    let (model, tok) = load::load(&path, Arc::new(CpuBackend::new(Some(2))), None).unwrap();
    let (model, tok) = (Arc::new(model), Arc::new(tok));
    let session = || Session::new(model.clone(), tok.clone(), 64, SamplerConfig::default()).unwrap();
    let (mut a, mut b) = (session(), session());
    let vocab = shape.vocab_size;
    // An actor's logits buffer: 4-byte aligned, as the host function checks.
    let mut words = vec![0xABAB_ABABu32; vocab];
    // SAFETY: u32 storage viewed as its bytes; same length, no other access while `out` lives.
    let out = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), vocab * 4) };
    // Nothing evaluated yet: the buffer is left alone.
    assert!(!a.eval_into(&[], out).unwrap());
    assert!(out.iter().all(|&b| b == 0xAB));
    let ids = tok.encode("Hi!\n", false).unwrap();
    // The CPU has no device-side path: the host copies (false), the same values `eval` leaves.
    assert!(!a.eval_into(&ids, out).unwrap());
    b.eval(&ids).unwrap();
    let stored: Vec<f32> = out.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(stored, b.logits());
    assert_eq!(a.logits(), b.logits());
    // An empty eval stores the current logits again.
    out.fill(0);
    assert!(!a.eval_into(&[], out).unwrap());
    let again: Vec<f32> = out.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(again, stored);
}

#[test]
fn eval_greedy_follows_the_same_tokens_as_eval_and_argmax() {
    let dir = temp_dir();
    let path = dir.path().join("small.gguf");
    let shape = small_shape();
    synth::write_synth(&shape, DType::Q4_0, 9, &path, |_, _| {}).unwrap();
    let (model, tok) = load::load(&path, Arc::new(CpuBackend::new(Some(2))), None).unwrap();
    let (model, tok) = (Arc::new(model), Arc::new(tok));
    let session = || Session::new(model.clone(), tok.clone(), 64, SamplerConfig::default()).unwrap();
    let (mut a, mut b) = (session(), session());
    let ids = tok.encode("Once upon", false).unwrap();
    let mut next = a.eval_greedy(&ids).unwrap();
    b.eval(&ids).unwrap();
    assert_eq!(next, sampler::argmax(b.logits()));
    // The host copy is not refreshed by eval_greedy, so there is nothing to read or sample.
    assert!(a.logits().is_empty());
    assert!(a.sample().is_none());
    let mut seen = vec![next];
    for _ in 0..12 {
        let t = a.eval_greedy(&[next]).unwrap();
        b.eval(&[next]).unwrap();
        assert_eq!(t, sampler::argmax(b.logits()), "after {seen:?}");
        // An empty eval keeps the pass: the same index again.
        assert_eq!(a.eval_greedy(&[]).unwrap(), t);
        next = t;
        seen.push(t);
    }
    assert_eq!(a.tokens, b.tokens);
    assert!(seen.iter().any(|&t| t != seen[0]), "a random model should not repeat one token: {seen:?}");
}
