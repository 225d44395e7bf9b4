//! Tiny generated Llama models written both as GGUF (Q/K permuted for interleaved RoPE, as
//! llama.cpp's converter does) and as a Hugging Face safetensors folder (half-split RoPE) must
//! give the same logits: this pins the permutation, both RoPE styles and both loaders.

use std::path::Path;
use std::sync::Arc;

use driftwood::backend::cpu::CpuBackend;
use driftwood::bench::XorShift;
use driftwood::engine::gguf::{GgufWriter, MetaValue};
use driftwood::engine::load;
use driftwood::engine::sampler::SamplerConfig;
use driftwood::engine::Session;
use driftwood::quant::DType;

use crate::common::temp_dir;

const DIM: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = DIM / HEADS;
const FFN: usize = 128;
const LAYERS: usize = 2;
const VOCAB: usize = 256;

/// GPT-2's byte ↔ unicode table, so a 256-token byte-level vocabulary needs no merges.
fn byte_tokens() -> Vec<String> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![String::new(); 256];
    for (b, c) in bs.iter().zip(&cs) {
        out[*b as usize] = char::from_u32(*c).unwrap().to_string();
    }
    out
}

struct Tensors(Vec<(String, Vec<usize>, Vec<f32>)>);

fn random_model() -> Tensors {
    let mut rng = XorShift(0xD1F7_0001);
    let mut t = Vec::new();
    let mut mat = |name: &str, rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() * scale).collect();
        (name.to_string(), vec![rows, cols], v)
    };
    t.push(mat("embed", VOCAB, DIM, 1.0));
    for l in 0..LAYERS {
        for (n, r, c) in [
            ("q", HEADS * HD, DIM),
            ("k", KV_HEADS * HD, DIM),
            ("v", KV_HEADS * HD, DIM),
            ("o", DIM, DIM),
            ("gate", FFN, DIM),
            ("up", FFN, DIM),
            ("down", DIM, FFN),
        ] {
            t.push(mat(&format!("{l}.{n}"), r, c, 0.3));
        }
        t.push((format!("{l}.attn_norm"), vec![DIM], (0..DIM).map(|i| 1.0 + 0.01 * i as f32).collect()));
        t.push((format!("{l}.ffn_norm"), vec![DIM], (0..DIM).map(|i| 1.0 - 0.005 * i as f32).collect()));
    }
    t.push(("norm".into(), vec![DIM], vec![1.0; DIM]));
    t.push(mat("lm_head", VOCAB, DIM, 0.5));
    Tensors(t)
}

/// llama.cpp's converter: within each head, HF row `j * hd/2 + i` becomes row `2i + j`.
fn permute_rows(w: &[f32], heads: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..HD / 2 {
            for j in 0..2 {
                let src = (h * HD + j * HD / 2 + i) * DIM;
                let dst = (h * HD + 2 * i + j) * DIM;
                out[dst..dst + DIM].copy_from_slice(&w[src..src + DIM]);
            }
        }
    }
    out
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_gguf(t: &Tensors, path: &Path) {
    let mut w = GgufWriter::new();
    let u32m = |v: usize| MetaValue::U32(v as u32);
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    w.add_meta("llama.block_count", u32m(LAYERS));
    w.add_meta("llama.embedding_length", u32m(DIM));
    w.add_meta("llama.feed_forward_length", u32m(FFN));
    w.add_meta("llama.attention.head_count", u32m(HEADS));
    w.add_meta("llama.attention.head_count_kv", u32m(KV_HEADS));
    w.add_meta("llama.context_length", u32m(256));
    w.add_meta("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.add_meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5));
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.add_meta("tokenizer.ggml.tokens", MetaValue::Array(byte_tokens().into_iter().map(MetaValue::String).collect()));
    w.add_meta("tokenizer.ggml.merges", MetaValue::Array(Vec::new()));
    w.add_meta("tokenizer.ggml.eos_token_id", u32m(0));
    let gguf_name = |n: &str| -> String {
        match n {
            "embed" => "token_embd.weight".into(),
            "norm" => "output_norm.weight".into(),
            "lm_head" => "output.weight".into(),
            _ => {
                let (l, k) = n.split_once('.').unwrap();
                let t = match k {
                    "q" => "attn_q",
                    "k" => "attn_k",
                    "v" => "attn_v",
                    "o" => "attn_output",
                    "gate" => "ffn_gate",
                    "up" => "ffn_up",
                    "down" => "ffn_down",
                    other => other,
                };
                format!("blk.{l}.{t}.weight")
            }
        }
    };
    for (name, shape, v) in &t.0 {
        let data = if name.ends_with(".q") {
            permute_rows(v, HEADS)
        } else if name.ends_with(".k") {
            permute_rows(v, KV_HEADS)
        } else {
            v.clone()
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        w.add_tensor(gguf_name(name), DType::F32, &dims, bytes(&data));
    }
    w.write(path).unwrap();
}

fn write_hf(t: &Tensors, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": DIM, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "intermediate_size": FFN, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = byte_tokens().into_iter().enumerate().map(|(i, t)| (t, serde_json::json!(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let hf_name = |n: &str| -> String {
        match n {
            "embed" => "model.embed_tokens.weight".into(),
            "norm" => "model.norm.weight".into(),
            "lm_head" => "lm_head.weight".into(),
            _ => {
                let (l, k) = n.split_once('.').unwrap();
                let t = match k {
                    "q" => "self_attn.q_proj",
                    "k" => "self_attn.k_proj",
                    "v" => "self_attn.v_proj",
                    "o" => "self_attn.o_proj",
                    "gate" => "mlp.gate_proj",
                    "up" => "mlp.up_proj",
                    "down" => "mlp.down_proj",
                    "attn_norm" => "input_layernorm",
                    _ => "post_attention_layernorm",
                };
                format!("model.layers.{l}.{t}.weight")
            }
        }
    };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = t.0.iter().map(|(n, s, v)| (hf_name(n), s.clone(), bytes(v))).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        data.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn tiny_model_gives_the_same_logits_from_gguf_and_from_safetensors() {
    let t = random_model();
    let dir = temp_dir();
    let gguf = dir.path().join("tiny.gguf");
    let hf = dir.path().join("tiny-hf");
    write_gguf(&t, &gguf);
    write_hf(&t, &hf);
    let backend = Arc::new(CpuBackend::new(Some(2)));
    let (mg, tg) = load::load(&gguf, backend.clone(), None).unwrap();
    let (mh, th) = load::load(&hf, backend, None).unwrap();
    assert_eq!(mg.config.rope_style, driftwood::backend::RopeStyle::Interleaved);
    assert_eq!(mh.config.rope_style, driftwood::backend::RopeStyle::HalfSplit);
    let tokens = [72u32, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100];
    let mut a = Session::new(Arc::new(mg), Arc::new(tg), 64, SamplerConfig::default()).unwrap();
    let mut b = Session::new(Arc::new(mh), Arc::new(th), 64, SamplerConfig::default()).unwrap();
    a.eval(&tokens[..6]).unwrap();
    b.eval(&tokens[..6]).unwrap();
    for &t in &tokens[6..] {
        let max = a.logits().iter().zip(b.logits()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        println!("gguf vs safetensors: max |diff| {max:.2e}; first {:?} vs {:?}", &a.logits()[..3], &b.logits()[..3]);
        assert!(max < 1e-3, "max diff {max}");
        a.eval(&[t]).unwrap();
        b.eval(&[t]).unwrap();
    }
    // The logits are not trivially small, so 1e-3 agreement means something.
    let max_abs = a.logits().iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_abs > 0.1, "logits are not trivially small ({max_abs})");
}

/// Writes the tiny random model as GGUF (for other tests).
pub fn tiny_gguf(path: &Path) {
    write_gguf(&random_model(), path);
}

/// Restoring onto another model is refused unless asked for; when asked, the conversation is
/// re-tokenized and re-prefilled on the new model and the actor's memory is kept.
#[test]
fn model_swap_is_refused_by_default_and_reprefills_when_asked() {
    use driftwood::snapshot::{self, format, KvRestore};
    let Some((model, tok)) = crate::model::default_model() else { return };
    let rt = driftwood::actor::Runtime::new(driftwood::actor::RuntimeConfig {
        max_memory: 1 << 30,
        timeout: std::time::Duration::from_secs(120),
        backend: Arc::new(CpuBackend::new(Some(2))),
        verbose: false,
    })
    .unwrap();
    let module = rt.load(&crate::common::example_wasm("chat")).unwrap();
    let mut actor = rt.instantiate(&module).unwrap();
    actor.attach_session(Session::new(model, tok, 512, SamplerConfig::default()).unwrap());
    actor.init().unwrap();
    actor.deliver(b"/max 4").unwrap();
    actor.deliver(b"Hi!").unwrap();
    let dir = temp_dir();
    let snap = dir.path().join("chat.dws");
    snapshot::save(&mut actor, &snap).unwrap();
    let tiny = dir.path().join("tiny.gguf");
    tiny_gguf(&tiny);
    let (m, t) = load::load(&tiny, Arc::new(CpuBackend::new(Some(2))), Some("tiny")).unwrap();
    let (m, t) = (Arc::new(m), Arc::new(t));
    let err = snapshot::thaw(&rt, &snap, format::read(&snap).unwrap(), Some(Session::new(m.clone(), t.clone(), 256, SamplerConfig::default()).unwrap()), false)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("pass --model explicitly"), "{err}");
    let (mut thawed, how) =
        snapshot::thaw(&rt, &snap, format::read(&snap).unwrap(), Some(Session::new(m, t, 256, SamplerConfig::default()).unwrap()), true).unwrap();
    let text = format::read(&snap).unwrap().meta.conversation_text.unwrap();
    match how {
        KvRestore::Reprefilled { new_tokens, .. } => assert_eq!(new_tokens, text.len(), "byte-level tiny vocabulary: one token per byte"),
        other => panic!("expected a re-prefill, got {other:?}"),
    }
    assert_eq!(thawed.session().unwrap().kv_len(), text.len());
    assert_eq!(thawed.memory_bytes(), actor.memory_bytes(), "the actor's memory is kept");
    // The actor keeps working on the new model.
    thawed.deliver(b"/max 3").unwrap();
}
