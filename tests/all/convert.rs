//! `driftwood convert` and `engine::convert`: a converted model has its matrices in the new
//! format and everything else as it was, decodes like its source within the rounding of the
//! formats involved, round-trips to the same bytes where the formats allow, and bad requests
//! fail with a clear message and no file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use driftwood::backend::cpu::CpuBackend;
use driftwood::engine::convert::{self, ConvertError, Kept};
use driftwood::engine::gguf::{GgufFile, GgufWriter, MetaValue};
use driftwood::engine::load;
use driftwood::engine::sampler::{argmax, SamplerConfig};
use driftwood::engine::synth::{self, SynthShape};
use driftwood::engine::Session;
use driftwood::quant;
use driftwood::quant::DType;

use crate::common::{run, temp_dir};

/// SmolLM2-135M's shape with 2 layers, every matrix in `dtype` (norms f32).
fn tiny_smollm2(dir: &Path, dtype: DType) -> PathBuf {
    let path = dir.join(format!("tiny-{dtype}.gguf"));
    let shape = SynthShape::preset("smollm2-135m").unwrap().with_layers(2);
    synth::write_synth(&shape, dtype, 5, &path, |_, _| {}).unwrap();
    path
}

fn convert_to(src: &Path, dtype: DType) -> (PathBuf, convert::ConvertReport) {
    let out = src.with_file_name(format!("{}-to-{dtype}.gguf", src.file_stem().unwrap().to_string_lossy()));
    let report = convert::convert(src, &out, dtype, |_, _| {}).unwrap();
    (out, report)
}

fn decode(dtype: DType, bytes: &[u8], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / dtype.row_bytes(cols).unwrap() * cols];
    for (row, o) in bytes.chunks_exact(dtype.row_bytes(cols).unwrap()).zip(out.chunks_exact_mut(cols)) {
        quant::dequantize_row(dtype, row, o);
    }
    out
}

/// Logits after `prompt` and after each token of `follow`, fed one at a time (teacher forcing:
/// both models of a comparison see the same tokens).
fn logits_along(path: &Path, prompt: &[u32], follow: &[u32]) -> Vec<Vec<f32>> {
    let (model, tok) = load::load(path, Arc::new(CpuBackend::new(Some(2))), None).unwrap();
    let mut s = Session::new(Arc::new(model), Arc::new(tok), 64, SamplerConfig::default()).unwrap();
    s.eval(prompt).unwrap();
    let mut all = vec![s.logits().to_vec()];
    for &t in follow {
        s.eval(&[t]).unwrap();
        all.push(s.logits().to_vec());
    }
    all
}

/// Compares `got` with `want` step by step: max |diff| relative to the largest |want| logit.
/// Returns the worst relative error; checks the argmax wherever `want`'s top-2 gap is larger
/// than twice the step's max |diff| (a nearer tie may legitimately flip).
fn compare_logits(what: &str, want: &[Vec<f32>], got: &[Vec<f32>]) -> f32 {
    let mut worst = 0f32;
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let diff = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let rel = diff / scale;
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let gap = sorted[0] - sorted[1];
        let (aw, ag) = (argmax(w), argmax(g));
        println!("{what} step {i}: max |diff| {diff:.4} (rel {rel:.2e}), top-2 gap {gap:.4}, argmax {aw} vs {ag}; first {:?} vs {:?}", &w[..3], &g[..3]);
        if gap > 2.0 * diff {
            assert_eq!(aw, ag, "{what} step {i}: greedy token differs although the top-2 gap {gap} exceeds twice the max |diff| {diff}");
        }
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn converted_matrices_take_the_new_format_and_everything_else_stays() {
    let dir = temp_dir();
    let src_path = tiny_smollm2(dir.path(), DType::Q4_1);
    let src = GgufFile::open(&src_path).unwrap();
    for dtype in [DType::F16, DType::Q8_0] {
        let (out_path, report) = convert_to(&src_path, dtype);
        println!("{}", report.summary());
        // 2 layers × 7 matrices + the (tied) embedding; 2 layers × 2 norms + the output norm.
        assert_eq!((report.converted.len(), report.kept.len()), (15, 5));
        assert!(report.kept.iter().all(|k| k.why == Kept::NotAMatrix { n_dims: 1 } && k.dtype == DType::F32), "{:?}", report.kept);
        assert_eq!(report.output_bytes, std::fs::metadata(&out_path).unwrap().len());

        let out = GgufFile::open(&out_path).unwrap();
        let keys = |f: &GgufFile| f.metadata.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&out), keys(&src), "metadata keys and their order");
        for ((key, a), (_, b)) in src.metadata.iter().zip(&out.metadata) {
            if key == "general.file_type" {
                assert_eq!((a, b), (&MetaValue::U32(3), &MetaValue::U32(dtype.llama_file_type())));
            } else {
                assert_eq!(a, b, "metadata '{key}'");
            }
        }
        assert_eq!(src.tensors.len(), out.tensors.len());
        for (s, o) in src.tensors.iter().zip(&out.tensors) {
            assert_eq!((&s.name, &s.dims), (&o.name, &o.dims), "tensor order and shapes");
            if s.dims.len() == 1 {
                assert_eq!(o.dtype, s.dtype, "{}", s.name);
                assert!(out.tensor_bytes(o) == src.tensor_bytes(s), "{} changed", s.name);
                continue;
            }
            assert_eq!(o.dtype, dtype, "{}", s.name);
            assert!(report.converted.contains(&s.name));
            // Each value moves by at most the target's rounding: half a step of f16 (2^-11
            // relative), or for q8_0 half a step of the block's scale (amax/254) plus the f16
            // rounding of that scale (up to 127 · amax/127 · 2^-11).
            let cols = s.dims[0] as usize;
            let (a, b) = (decode(s.dtype, src.tensor_bytes(s), cols), decode(o.dtype, out.tensor_bytes(o), cols));
            let mut moved = 0usize;
            for (x, y) in a.chunks(32).zip(b.chunks(32)) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (&u, &v) in x.iter().zip(y) {
                    let bound = match dtype {
                        DType::F16 => u.abs() * 2f32.powi(-11) + 1e-7,
                        _ => amax * (0.5 / 127.0 + 2f32.powi(-11)) * 1.01,
                    };
                    assert!((u - v).abs() <= bound, "{}: {u} became {v} (bound {bound})", s.name);
                    moved += usize::from(u != v);
                }
            }
            assert!(moved > 0, "{}: no value moved: was it re-encoded at all?", s.name);
        }
    }

    // K-quants need rows of 256: only ffn_down (rows of 1536) fits; the rest stays q4_1.
    let (out_path, report) = convert_to(&src_path, DType::Q4_K);
    println!("{}", report.summary());
    assert_eq!(report.converted, ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]);
    let narrow = report.kept.iter().filter(|k| k.why == Kept::RowLength { cols: 576 } && k.dtype == DType::Q4_1).count();
    assert_eq!((narrow, report.kept.len()), (13, 18));
    assert!(report.summary().ends_with("5 vectors (norms), 13 with rows of 576 (not a multiple of the q4_K block size 256)"), "{}", report.summary());
    let out = GgufFile::open(&out_path).unwrap();
    assert_eq!(out.tensor("blk.1.ffn_down.weight").unwrap().dtype, DType::Q4_K);
    assert_eq!(out.tensor("blk.1.ffn_up.weight").unwrap().dtype, DType::Q4_1);
    assert!(out.tensor_bytes(out.tensor("blk.1.ffn_up.weight").unwrap()) == src.tensor_bytes(src.tensor("blk.1.ffn_up.weight").unwrap()));
    assert_eq!(out.get_u32("general.file_type").unwrap(), 15);
}

/// The f32 conversion holds the source's weights exactly and computes without rounding the
/// activations, so it is the reference every format is measured against (the source itself
/// included: on Q4_1 weights the CPU rounds activations to 8 bits). Tolerances, measured on this
/// model and set at 2-4 times that: f16 rounds weights and activations to 11 significant bits
/// (measured 1.1e-3, allowed 4e-3, below bf16's error so a precision loss would show); bf16 to 8
/// bits (9.4e-3, allowed 2.5e-2); q8_0 re-rounds weights to 255 levels a block and activations to
/// 8 bits (2.4e-2, allowed 5e-2), as does the q4_K mix (2.3e-2, allowed 5e-2).
#[test]
fn converted_model_decodes_like_its_source() {
    let dir = temp_dir();
    let src = tiny_smollm2(dir.path(), DType::Q4_1);
    let prompt = [synth::BOS_ID, b'T'.into()];
    let follow: Vec<u32> = b"he cat sat.".iter().map(|&b| b.into()).collect();
    let (exact, _) = convert_to(&src, DType::F32);
    let want = logits_along(&exact, &prompt, &follow);
    let source_rel = compare_logits("q4_1 source vs its f32 conversion", &want, &logits_along(&src, &prompt, &follow));
    for (dtype, tolerance) in [(DType::F16, 4e-3), (DType::BF16, 2.5e-2), (DType::Q8_0, 5e-2), (DType::Q4_K, 5e-2)] {
        let (out, _) = convert_to(&src, dtype);
        let rel = compare_logits(&format!("{dtype} vs f32"), &want, &logits_along(&out, &prompt, &follow));
        println!("{dtype}: worst relative logits error {rel:.2e} (tolerance {tolerance:.0e}; the q4_1 source's {source_rel:.2e})");
        assert!(rel < tolerance, "{dtype}: relative logits error {rel} exceeds {tolerance}");
    }
    assert!(source_rel > 4.0 * 4e-3, "f16 should be closer to exact than 8-bit activations are ({source_rel})");
}

#[test]
fn converting_to_the_same_format_or_through_f32_and_back_gives_the_same_bytes() {
    let dir = temp_dir();
    // A matrix already in the target format is copied as it was: the whole file is unchanged.
    let src = tiny_smollm2(dir.path(), DType::Q4_1);
    let (same, report) = convert_to(&src, DType::Q4_1);
    assert!(report.converted.is_empty() && report.kept.iter().filter(|k| k.why == Kept::AlreadyTarget).count() == 15);
    assert!(std::fs::read(&same).unwrap() == std::fs::read(&src).unwrap(), "q4_1 -> q4_1 changed the file");
    // f32 holds every value of these formats exactly, and their reference quantizers give back
    // their own blocks (see the unit test in engine::convert; K-quants do not always, so are not
    // checked): out to f32 and back is the same file, general.file_type included.
    for dtype in [DType::Q4_1, DType::Q8_0, DType::Q4_0, DType::F16, DType::BF16] {
        let src = if dtype == DType::Q4_1 { src.clone() } else { tiny_smollm2(dir.path(), dtype) };
        let (f32_path, _) = convert_to(&src, DType::F32);
        let (back, report) = convert_to(&f32_path, dtype);
        assert_eq!(report.converted.len(), 15);
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        println!("{dtype} -> f32 -> {dtype}: {} vs {} bytes, {differing} differ", a.len(), b.len());
        assert!(a.len() == b.len() && differing == 0, "{dtype} -> f32 -> {dtype} changed {differing} bytes");
    }
}

#[test]
fn convert_cli_writes_what_the_library_writes_and_says_what_it_kept() {
    let dir = temp_dir();
    let src = tiny_smollm2(dir.path(), DType::Q4_1);
    let out = dir.path().join("cli.gguf");
    let r = run(&["convert", src.to_str().unwrap(), "--dtype", "F16", "-o", out.to_str().unwrap()]);
    r.assert_code(0);
    assert!(r.stderr.contains("converted 15 of 20 tensors to f16; kept 5 as they were: 5 vectors (norms)"), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("wrote {}", out.display())), "{}", r.stderr);
    let (lib, _) = convert_to(&src, DType::F16);
    assert!(std::fs::read(&lib).unwrap() == std::fs::read(&out).unwrap(), "cli and library files differ");
}

#[test]
fn convert_refuses_bad_input_with_a_clear_message_and_no_file() {
    let dir = temp_dir();
    let d = dir.path();
    let src = tiny_smollm2(d, DType::Q4_1);
    let garbage = d.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").unwrap();
    let truncated = d.join("truncated.gguf");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let tmp_named = d.join("x.gguf.tmp");
    std::fs::copy(&src, &tmp_named).unwrap();
    let before: Vec<PathBuf> = list(d);
    let out = d.join("out.gguf");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());

    let cases: [(Vec<String>, String); 7] = [
        (
            args(&[&d.join("absent.gguf").display().to_string(), "--dtype", "f16", "-o", o]),
            format!("{}: cannot open: No such file", d.join("absent.gguf").display()),
        ),
        (args(&[garbage.to_str().unwrap(), "--dtype", "f16", "-o", o]), format!("{}: not a gguf file", garbage.display())),
        (args(&[truncated.to_str().unwrap(), "--dtype", "f16", "-o", o]), format!("gguf: {}: tensor '", truncated.display())),
        (args(&[s, "--dtype", "q5_1", "-o", o]), "invalid value 'q5_1' for '--dtype <FORMAT>': unknown weight format 'q5_1'".into()),
        (args(&[s, "--dtype", "f16", "-o", s]), format!("convert: {s}: the output would overwrite the input {s}")),
        // The same file spelled another way, and an output whose temporary file is the input.
        (args(&[s, "--dtype", "f16", "-o", &d.join("sub/../tiny-q4_1.gguf").display().to_string()]), "the output would overwrite the input".into()),
        (args(&[tmp_named.to_str().unwrap(), "--dtype", "f16", "-o", &d.join("x.gguf").display().to_string()]), "the output would overwrite the input".into()),
    ];
    std::fs::create_dir(d.join("sub")).unwrap();
    for (argv, want) in &cases {
        let argv: Vec<&str> = std::iter::once("convert").chain(argv.iter().map(String::as_str)).collect();
        let r = run(&argv);
        println!("{argv:?}: {}", r.stderr.trim());
        r.assert_code(2);
        assert!(r.stderr.contains(want.as_str()), "expected {want:?} in: {}", r.stderr);
    }
    std::fs::remove_dir(d.join("sub")).unwrap();
    assert_eq!(list(d), before, "a refused conversion leaves no file");
    assert!(std::fs::read(&src).unwrap() == bytes && std::fs::read(&tmp_named).unwrap() == bytes, "an input was modified");

    // A model with no matrix that fits whole blocks of the format: nothing to convert.
    let narrow = d.join("narrow.gguf");
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    w.add_tensor("norm.weight", DType::F32, &[48], vec![0u8; 48 * 4]).add_tensor("w.weight", DType::F32, &[48, 2], vec![0u8; 96 * 4]);
    w.write(&narrow).unwrap();
    let e = convert::convert(&narrow, &out, DType::Q8_0, |_, _| {}).unwrap_err();
    assert!(matches!(e, ConvertError::NothingFits { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("narrow.gguf: no weight matrix can be stored as q8_0: its rows of 48 are not multiples of the q8_0 block size 32"), "{msg}");
    assert!(!out.exists());
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}
