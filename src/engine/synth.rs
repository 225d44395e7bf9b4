//! Synthesized Llama models: deterministic random weights in a real model's shape, written as a
//! GGUF file that both Driftwood's loader and llama.cpp accept.
//!
//! Speed work needs a model of the right size and layout, not a trained one, and GPU machines
//! often cannot reach a model hub. [`write_synth`] writes such a model from a [`SynthShape`] (the
//! presets copy Llama 3.2 1B and SmolLM2 135M), a weight format and a seed. Weights are uniform
//! noise scaled like an initialisation (std `1/sqrt(cols)` for projections, norms at 1.0), so
//! activations stay finite through every layer and the logits vary; the same seed gives the same
//! bytes whatever the thread count, because every row is seeded from (seed, tensor name, row).
//! Rows are generated and quantized in parallel and streamed into the file in batches, so memory
//! stays at a few tens of megabytes whatever the model size.
//!
//! The vocabulary is byte-level BPE without merges: the 256 GPT-2 byte tokens (token id = byte),
//! a BOS and an EOS control token, then unique filler tokens up to the vocabulary size. Any text
//! encodes to one token per byte, and no byte token ends a generation.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::Path;

use rayon::prelude::*;

use super::gguf::{GgufError, GgufWriter, MetaValue};
use super::model::Llama3RopeScaling;
use crate::quant;
use crate::quant::DType;

/// Id of the BOS token (the first after the 256 byte tokens).
pub const BOS_ID: u32 = 256;
/// Id of the EOS token; byte tokens never end a generation.
pub const EOS_ID: u32 = 257;
/// The smallest vocabulary: 256 byte tokens, BOS and EOS.
pub const MIN_VOCAB: usize = 258;

/// Std of the token embedding: with tied embeddings the logits get a std of about
/// `EMBED_STD · sqrt(dim)` (1–3 for the presets), varied enough for greedy decoding to wander.
const EMBED_STD: f32 = 0.05;
/// Output bytes generated per batch; two batches (one being written, one being filled) are live.
const BATCH_BYTES: usize = 32 << 20;

/// A plain chat template, so chat actors run on a synthesized model (its replies are noise).
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}";

/// Errors of synthesizing a model.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("synth: unknown shape '{name}', expected one of {}", SynthShape::PRESETS.join(", "))]
    UnknownShape { name: String },
    #[error("synth: shape {shape}: {reason}")]
    BadShape { shape: String, reason: String },
    #[error("synth: {shape} cannot be stored as {dtype}: {reason}")]
    Incompatible { shape: String, dtype: DType, reason: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("synth: {}: cannot read the written file: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
}

/// The hyperparameters of a synthesized Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthShape {
    /// Short name (`llama-3.2-1b`); the file's `general.name` is "synthetic {name}".
    pub name: String,
    pub n_layers: usize,
    /// Model width.
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Feed-forward hidden width.
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Llama 3 frequency scaling, written as llama.cpp's converter does: a `rope_freqs.weight`
    /// tensor of `head_dim / 2` per-frequency divisors.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// The output projection reuses the token embedding (the file has no `output.weight`).
    pub tied_embeddings: bool,
}

impl SynthShape {
    /// Names accepted by [`SynthShape::preset`].
    pub const PRESETS: [&'static str; 2] = ["llama-3.2-1b", "smollm2-135m"];

    /// A preset shape by name.
    pub fn preset(name: &str) -> Result<SynthShape, SynthError> {
        let shape = match name {
            // meta-llama/Llama-3.2-1B: 1,235,814,400 parameters.
            "llama-3.2-1b" => SynthShape {
                name: name.to_owned(),
                n_layers: 16,
                dim: 2048,
                n_heads: 32,
                n_kv_heads: 8,
                head_dim: 64,
                ffn_dim: 8192,
                vocab_size: 128256,
                context_length: 131072,
                rope_theta: 500000.0,
                rms_eps: 1e-5,
                rope_scaling: Some(Llama3RopeScaling { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 }),
                tied_embeddings: true,
            },
            // HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters.
            "smollm2-135m" => SynthShape {
                name: name.to_owned(),
                n_layers: 30,
                dim: 576,
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                ffn_dim: 1536,
                vocab_size: 49152,
                context_length: 8192,
                rope_theta: 100000.0,
                rms_eps: 1e-5,
                rope_scaling: None,
                tied_embeddings: true,
            },
            _ => return Err(SynthError::UnknownShape { name: name.to_owned() }),
        };
        Ok(shape)
    }

    /// The same shape with `n` layers (a smaller variant for tests and quick runs).
    pub fn with_layers(self, n: usize) -> SynthShape {
        SynthShape { n_layers: n, ..self }
    }

    /// Width of the attention output (`n_heads · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of K and V (`n_kv_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Number of parameters (norms and the untied output included, RoPE factors not).
    pub fn n_params(&self) -> u64 {
        let (dim, q, kv, ffn) = (self.dim as u64, self.q_dim() as u64, self.kv_dim() as u64, self.ffn_dim as u64);
        let layer = 2 * q * dim + 2 * kv * dim + 3 * ffn * dim + 2 * dim;
        let embd = self.vocab_size as u64 * dim;
        embd + self.n_layers as u64 * layer + dim + if self.tied_embeddings { 0 } else { embd }
    }

    /// Checks that the shape is a consistent Llama and that every matrix row fits whole blocks
    /// of `dtype`.
    pub fn check(&self, dtype: DType) -> Result<(), SynthError> {
        let bad = |reason: String| Err(SynthError::BadShape { shape: self.name.clone(), reason });
        if !(1..=1024).contains(&self.n_layers) {
            return bad(format!("{} layers, expected 1 to 1024", self.n_layers));
        }
        if self.dim == 0 || self.ffn_dim == 0 || self.context_length == 0 {
            return bad(format!("dim {}, ffn {}, context {}: expected all positive", self.dim, self.ffn_dim, self.context_length));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} heads and {} kv heads, expected a positive multiple", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > 512 {
            return bad(format!("head_dim {}, expected an even number up to 512", self.head_dim));
        }
        if self.vocab_size < MIN_VOCAB || self.vocab_size > i32::MAX as usize {
            return bad(format!("vocabulary of {}, expected at least {MIN_VOCAB} (256 bytes, BOS, EOS)", self.vocab_size));
        }
        if !(self.rope_theta > 0.0 && self.rms_eps > 0.0) {
            return bad(format!("rope_theta {} and rms_eps {}, expected both positive", self.rope_theta, self.rms_eps));
        }
        let block = dtype.block_elems();
        for (what, cols) in [("embedding_length", self.dim), ("attention width (heads × head_dim)", self.q_dim()), ("feed_forward_length", self.ffn_dim)] {
            if !cols.is_multiple_of(block) {
                let fit: Vec<&str> = DType::ALL.iter().filter(|t| self.fits(**t)).map(|t| t.name()).collect();
                return Err(SynthError::Incompatible {
                    shape: self.name.clone(),
                    dtype,
                    reason: format!("{what} {cols} is not a multiple of the {dtype} block size {block} (formats that fit: {})", fit.join(", ")),
                });
            }
        }
        Ok(())
    }

    /// Whether every matrix row of this shape is whole blocks of `dtype`.
    fn fits(&self, dtype: DType) -> bool {
        [self.dim, self.q_dim(), self.ffn_dim].iter().all(|c| c.is_multiple_of(dtype.block_elems()))
    }

    /// The hyperparameters the loader reads back from the written file (GGUF pair layout).
    pub fn config(&self) -> crate::engine::model::Config {
        crate::engine::model::Config {
            n_layers: self.n_layers,
            dim: self.dim,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            ffn_dim: self.ffn_dim,
            vocab_size: self.vocab_size,
            context_length: self.context_length,
            rms_eps: self.rms_eps,
            rope_theta: self.rope_theta,
            rope_style: crate::backend::RopeStyle::Interleaved,
            rope_scaling: self.rope_scaling.clone(),
        }
    }

    /// Llama 3 RoPE factors as llama.cpp's converter computes them (`head_dim / 2` divisors of
    /// the inverse frequencies), or `None` without scaling.
    pub fn rope_factors(&self) -> Option<Vec<f32>> {
        let s = self.rope_scaling.as_ref()?;
        let (orig, low, high) = (f64::from(s.original_max_position_embeddings), f64::from(s.low_freq_factor), f64::from(s.high_freq_factor));
        let (low_wavelen, high_wavelen) = (orig / low, orig / high);
        let factors = (0..self.head_dim / 2)
            .map(|i| {
                let freq = 1.0 / f64::from(self.rope_theta).powf(2.0 * i as f64 / self.head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    s.factor
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / f64::from(s.factor) + smooth)) as f32
                }
            })
            .collect();
        Some(factors)
    }
}

/// What [`write_synth`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthReport {
    pub n_params: u64,
    /// Size of the file.
    pub file_bytes: u64,
}

/// GPT-2's byte-to-unicode table: token `b` spells byte `b`. Printable bytes stand for
/// themselves; the other 68 map to U+0100.. in byte order.
fn byte_tokens() -> impl Iterator<Item = String> {
    let mut next = 0x100u32;
    (0..=255u8).map(move |b| {
        if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(b).to_string()
        } else {
            next += 1;
            // Below U+0144: always a valid scalar value.
            char::from_u32(next - 1).map_or_else(String::new, String::from)
        }
    })
}

/// Adds the metadata llama.cpp and Driftwood read for a Llama model and its tokenizer.
fn add_metadata(w: &mut GgufWriter<'_>, shape: &SynthShape, dtype: DType) {
    let u32m = |v: usize| MetaValue::U32(v as u32);
    w.add_meta("general.architecture", MetaValue::String("llama".into()))
        .add_meta("general.type", MetaValue::String("model".into()))
        .add_meta("general.name", MetaValue::String(format!("synthetic {}", shape.name)))
        .add_meta("general.file_type", MetaValue::U32(dtype.llama_file_type()))
        .add_meta("general.quantization_version", MetaValue::U32(2))
        .add_meta("llama.block_count", u32m(shape.n_layers))
        .add_meta("llama.context_length", u32m(shape.context_length))
        .add_meta("llama.embedding_length", u32m(shape.dim))
        .add_meta("llama.feed_forward_length", u32m(shape.ffn_dim))
        .add_meta("llama.attention.head_count", u32m(shape.n_heads))
        .add_meta("llama.attention.head_count_kv", u32m(shape.n_kv_heads))
        .add_meta("llama.rope.freq_base", MetaValue::F32(shape.rope_theta))
        .add_meta("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(shape.rms_eps))
        .add_meta("llama.rope.dimension_count", u32m(shape.head_dim))
        .add_meta("llama.vocab_size", u32m(shape.vocab_size));
    if shape.head_dim * shape.n_heads != shape.dim {
        w.add_meta("llama.attention.key_length", u32m(shape.head_dim)).add_meta("llama.attention.value_length", u32m(shape.head_dim));
    }

    let mut tokens: Vec<MetaValue> = byte_tokens().map(MetaValue::String).collect();
    tokens.push(MetaValue::String("<|synth_bos|>".into()));
    tokens.push(MetaValue::String("<|synth_eos|>".into()));
    tokens.extend((tokens.len()..shape.vocab_size).map(|i| MetaValue::String(format!("<|synth_{i}|>"))));
    // llama.cpp token types: 1 normal, 3 control.
    let types = (0..shape.vocab_size).map(|i| MetaValue::I32(if i == BOS_ID as usize || i == EOS_ID as usize { 3 } else { 1 })).collect();
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .add_meta("tokenizer.ggml.pre", MetaValue::String("gpt-2".into()))
        .add_meta("tokenizer.ggml.tokens", MetaValue::Array(tokens))
        .add_meta("tokenizer.ggml.token_type", MetaValue::Array(types))
        // llama.cpp requires the key for gpt2 vocabularies; byte tokens need no merges.
        .add_meta("tokenizer.ggml.merges", MetaValue::Array(Vec::new()))
        .add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(BOS_ID))
        .add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(EOS_ID))
        .add_meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))
        .add_meta("tokenizer.ggml.add_eos_token", MetaValue::Bool(false))
        .add_meta("tokenizer.chat_template", MetaValue::String(CHAT_TEMPLATE.into()));
}

/// SplitMix64's finalizer: a bijective mix, so distinct inputs give distinct seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name: a tensor's values depend on its name, not on its position, so a
/// variant with fewer layers has the same first layers.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// Fills `out` with uniform values in `[-half_range, half_range)` from one row's seed (wyrand:
/// one multiply per two values, so generation keeps up with quantization).
fn fill_row(row_seed: u64, half_range: f32, out: &mut [f32]) {
    let mut state = row_seed;
    let scale = half_range * 2.0 / (1u32 << 24) as f32;
    for pair in out.chunks_mut(2) {
        state = state.wrapping_add(0xA076_1D64_78BD_642F);
        let t = u128::from(state) * u128::from(state ^ 0xE703_7ED1_A0B4_28DB);
        let r = ((t >> 64) as u64) ^ (t as u64);
        for (o, bits) in pair.iter_mut().zip([r as u32, (r >> 32) as u32]) {
            *o = (bits >> 8) as f32 * scale - half_range;
        }
    }
}

/// One random matrix: `rows × cols` values of the given std, packed as `dtype`.
struct RandomMatrix {
    dtype: DType,
    rows: usize,
    cols: usize,
    /// Half-width of the uniform distribution (`std · sqrt(3)`).
    half_range: f32,
    /// Mixed from the file seed and the tensor name; row `r` uses `mix(seed ^ mix(r))`.
    seed: u64,
}

impl RandomMatrix {
    fn row_bytes(&self) -> usize {
        // Checked by `SynthShape::check` before any matrix is planned.
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    fn nbytes(&self) -> u64 {
        self.rows as u64 * self.row_bytes() as u64
    }

    /// Packs rows `first..first + buf.len() / row_bytes` into `buf`, in parallel.
    fn fill(&self, first: usize, buf: &mut [u8]) {
        let row_bytes = self.row_bytes();
        buf.par_chunks_mut(row_bytes).enumerate().for_each_init(
            || vec![0f32; self.cols],
            |values, (i, packed)| {
                fill_row(mix(self.seed ^ mix((first + i) as u64)), self.half_range, values);
                quant::quantize_row(self.dtype, values, packed);
            },
        );
    }

    /// Writes the whole matrix to `out` in batches, filling the next batch while the current
    /// one is written. `progress` gets the bytes of each batch written. The two batch buffers
    /// are reused from matrix to matrix (no fresh pages to zero for every tensor); their old
    /// contents are overwritten.
    fn stream(&self, out: &mut (dyn Write + Send), progress: &dyn Fn(u64), buffers: &mut [Vec<u8>; 2]) -> std::io::Result<()> {
        crate::engine::gguf::stream_batches(out, self.rows, self.row_bytes(), BATCH_BYTES, buffers, progress, &|first, buf| self.fill(first, buf))
    }
}

/// One tensor of the file, in the order written.
enum Planned {
    /// A small F32 vector (norm weights, RoPE factors), as bytes.
    Vector(Vec<u8>),
    Matrix(RandomMatrix),
}

impl Planned {
    fn nbytes(&self) -> u64 {
        match self {
            Planned::Vector(v) => v.len() as u64,
            Planned::Matrix(m) => m.nbytes(),
        }
    }
}

/// Every tensor of a `shape` model, in llama.cpp's converter order.
fn plan(shape: &SynthShape, dtype: DType, seed: u64) -> Vec<(String, Planned)> {
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let ones = || Planned::Vector(f32_bytes(&vec![1.0; shape.dim]));
    let matrix = |name: &str, rows: usize, cols: usize, std: f32| {
        (name.to_owned(), Planned::Matrix(RandomMatrix { dtype, rows, cols, half_range: std * 3f32.sqrt(), seed: mix(seed ^ mix(name_hash(name))) }))
    };
    // Projections keep the variance of their (normalized) input.
    let projection = |name: &str, rows: usize, cols: usize| matrix(name, rows, cols, 1.0 / (cols as f32).sqrt());

    let mut tensors = Vec::with_capacity(3 + 9 * shape.n_layers);
    if let Some(factors) = shape.rope_factors() {
        tensors.push(("rope_freqs.weight".to_owned(), Planned::Vector(f32_bytes(&factors))));
    }
    tensors.push(matrix("token_embd.weight", shape.vocab_size, shape.dim, EMBED_STD));
    for l in 0..shape.n_layers {
        let n = |t: &str| format!("blk.{l}.{t}.weight");
        tensors.push((n("attn_norm"), ones()));
        tensors.push(projection(&n("attn_q"), shape.q_dim(), shape.dim));
        tensors.push(projection(&n("attn_k"), shape.kv_dim(), shape.dim));
        tensors.push(projection(&n("attn_v"), shape.kv_dim(), shape.dim));
        tensors.push(projection(&n("attn_output"), shape.dim, shape.q_dim()));
        tensors.push((n("ffn_norm"), ones()));
        tensors.push(projection(&n("ffn_gate"), shape.ffn_dim, shape.dim));
        tensors.push(projection(&n("ffn_up"), shape.ffn_dim, shape.dim));
        tensors.push(projection(&n("ffn_down"), shape.dim, shape.ffn_dim));
    }
    tensors.push(("output_norm.weight".to_owned(), ones()));
    if !shape.tied_embeddings {
        tensors.push(projection("output.weight", shape.vocab_size, shape.dim));
    }
    tensors
}

/// Writes a random-weight Llama GGUF of `shape` with every matrix in `dtype` (norms and RoPE
/// factors in F32) to `path`. The same `shape`, `dtype` and `seed` give the same bytes, whatever
/// the size of the rayon pool it runs on. `progress(done, total)` reports tensor bytes written.
/// The file appears under `path` only once complete.
pub fn write_synth(shape: &SynthShape, dtype: DType, seed: u64, path: &Path, progress: impl Fn(u64, u64)) -> Result<SynthReport, SynthError> {
    shape.check(dtype)?;
    let tensors = plan(shape, dtype, seed);
    let total = tensors.iter().map(|(_, t)| t.nbytes()).sum();
    let done = Cell::new(0u64);
    let advance = |n: u64| {
        done.set(done.get() + n);
        progress(done.get(), total);
    };
    let buffers = RefCell::new([Vec::new(), Vec::new()]);

    let mut w = GgufWriter::new();
    add_metadata(&mut w, shape, dtype);
    for (name, t) in &tensors {
        match t {
            Planned::Vector(bytes) => w.add_tensor_streamed(name.as_str(), DType::F32, &[(bytes.len() / 4) as u64], |out| {
                out.write_all(bytes)?;
                advance(bytes.len() as u64);
                Ok(())
            }),
            Planned::Matrix(m) => {
                w.add_tensor_streamed(name.as_str(), m.dtype, &[m.cols as u64, m.rows as u64], |out| m.stream(out, &advance, &mut buffers.borrow_mut()))
            }
        };
    }
    progress(0, total);
    w.write(path)?;
    let file_bytes = std::fs::metadata(path).map_err(|source| SynthError::Io { path: path.to_owned(), source })?.len();
    Ok(SynthReport { n_params: shape.n_params(), file_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_parameter_counts() {
        assert_eq!(SynthShape::preset("llama-3.2-1b").unwrap().n_params(), 1_235_814_400);
        assert_eq!(SynthShape::preset("smollm2-135m").unwrap().n_params(), 134_515_008);
        for name in SynthShape::PRESETS {
            assert_eq!(SynthShape::preset(name).unwrap().name, name);
        }
        let e = SynthShape::preset("llama-9b").unwrap_err().to_string();
        assert_eq!(e, "synth: unknown shape 'llama-9b', expected one of llama-3.2-1b, smollm2-135m");
    }

    #[test]
    fn k_quants_need_rows_of_whole_super_blocks() {
        let llama = SynthShape::preset("llama-3.2-1b").unwrap();
        let smol = SynthShape::preset("smollm2-135m").unwrap();
        for t in DType::ALL {
            llama.check(t).unwrap();
            assert_eq!(smol.check(t).is_ok(), !matches!(t, DType::Q4_K | DType::Q5_K | DType::Q6_K), "{t}");
        }
        let e = smol.check(DType::Q6_K).unwrap_err().to_string();
        assert!(e.contains("smollm2-135m cannot be stored as q6_K: embedding_length 576 is not a multiple of the q6_K block size 256"), "{e}");
        assert!(e.contains("(formats that fit: f32, f16, q4_0, q4_1, q8_0, bf16)"), "{e}");
        let e = smol.with_layers(0).check(DType::F32).unwrap_err().to_string();
        assert!(e.contains("0 layers, expected 1 to 1024"), "{e}");
    }

    #[test]
    fn rope_factors_reproduce_llama3_scaling() {
        let s = SynthShape::preset("llama-3.2-1b").unwrap();
        let c = s.config();
        let factors = s.rope_factors().unwrap();
        assert_eq!(factors.len(), 32);
        assert_eq!((factors[0], factors[31]), (1.0, 32.0), "high frequencies kept, low ones divided by the factor");
        let from_factors = c.rope(Some(&factors)).inv_freq;
        let from_scaling = c.rope(None).inv_freq;
        for (i, (a, b)) in from_factors.iter().zip(&from_scaling).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "pair {i}: {a} from rope_freqs vs {b} from rope_scaling");
        }
        assert!(SynthShape::preset("smollm2-135m").unwrap().rope_factors().is_none());
    }

    #[test]
    fn byte_tokens_are_gpt2s_table() {
        let t: Vec<String> = byte_tokens().collect();
        assert_eq!(t.len(), 256);
        assert_eq!((t[b'A' as usize].as_str(), t[b'\n' as usize].as_str(), t[b' ' as usize].as_str(), t[0].as_str()), ("A", "Ċ", "Ġ", "Ā"));
        assert_eq!(t[0xAD], "Ń");
        let unique: std::collections::HashSet<&String> = t.iter().collect();
        assert_eq!(unique.len(), 256);
    }

    #[test]
    fn random_rows_have_the_asked_for_spread() {
        let mut v = vec![0f32; 4096];
        fill_row(mix(1), 3f32.sqrt() * 0.5, &mut v);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(mean.abs() < 0.03 && (std - 0.5).abs() < 0.02, "mean {mean}, std {std}");
        let mut w = vec![0f32; 4096];
        fill_row(mix(2), 1.0, &mut w);
        assert_ne!(v[..8], w[..8]);
    }
}
