//! Loading a model: GGUF files and Hugging Face Llama folders (config.json, tokenizer.json,
//! *.safetensors) into a [`Model`] and a [`Tokenizer`].
//!
//! Weights are memory-mapped and handed to the backend as views (the CPU computes on the mapped
//! bytes; a GPU uploads them). Every tensor's presence, dtype and shape is checked against the
//! config before use, so a wrong or truncated file is a clear error, never a panic later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::gguf::{GgufError, GgufFile, TensorInfo};
use super::model::{Config, LayerWeights, Llama3RopeScaling, Model, ModelIdentity, Weights};
use super::tokenizer::{GgufVocab, Tokenizer, TokenizerError};
use crate::backend::{Backend, BackendError, Buffer, HostBytes, Linear, RopeStyle, WeightData};
use crate::quant;
use crate::quant::DType;

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {source}")]
    Tokenizer { path: PathBuf, source: TokenizerError },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: unsupported architecture '{arch}' (driftwood runs Llama-family models: llama)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{path}: tensor '{name}' has unsupported dtype {dtype} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Backend { path: PathBuf, source: BackendError },
}

fn invalid(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid { path: path.to_owned(), reason: reason.into() }
}

/// A tensor found in a model file: dtype, shape (outermost first) and its bytes.
struct RawTensor {
    dtype: DType,
    /// Row-major shape, outermost first: `[rows, cols]` for matrices, `[n]` for vectors.
    shape: Vec<usize>,
    bytes: HostBytes,
}

/// Tensors by name, whatever the file format.
trait TensorSource {
    fn path(&self) -> &Path;
    fn get(&self, name: &str) -> Option<RawTensor>;
}

fn linear(src: &dyn TensorSource, backend: &dyn Backend, name: &str, rows: usize, cols: usize) -> Result<Linear, ModelError> {
    let t = src.get(name).ok_or_else(|| invalid(src.path(), format!("missing tensor '{name}'")))?;
    if t.shape != [rows, cols] {
        return Err(invalid(src.path(), format!("tensor '{name}' has shape {:?}, expected [{rows}, {cols}]", t.shape)));
    }
    let need = t.dtype.row_bytes(cols).map(|rb| rb * rows);
    if need != Some(t.bytes.len()) {
        return Err(invalid(src.path(), format!("tensor '{name}' holds {} bytes, {} {rows}×{cols} needs {need:?}", t.bytes.len(), t.dtype)));
    }
    let w = Linear { name: name.to_owned(), dtype: t.dtype, rows, cols, data: WeightData::Host(t.bytes) };
    backend.load_linear(w).map_err(|source| ModelError::Backend { path: src.path().to_owned(), source })
}

fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = src.get(name).ok_or_else(|| invalid(src.path(), format!("missing tensor '{name}'")))?;
    if t.shape.iter().product::<usize>() != len || t.dtype.row_bytes(len) != Some(t.bytes.len()) {
        return Err(invalid(src.path(), format!("tensor '{name}' has shape {:?} ({}), expected [{len}]", t.shape, t.dtype)));
    }
    let mut out = vec![0f32; len];
    quant::dequantize_row(t.dtype, &t.bytes, &mut out);
    Ok(out)
}

fn upload(backend: &dyn Backend, path: &Path, v: &[f32]) -> Result<Buffer, ModelError> {
    backend.upload_f32(v).map_err(|source| ModelError::Backend { path: path.to_owned(), source })
}

/// Builds the weights of a Llama model from any tensor source, with per-format tensor names.
fn build_weights(src: &dyn TensorSource, backend: &dyn Backend, c: &Config, names: &Names, rope_freqs: Option<Vec<f32>>) -> Result<Weights, ModelError> {
    let path = src.path();
    let token_embd = linear(src, backend, names.embd, c.vocab_size, c.dim)?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let n = |suffix: &str| (names.layer)(l, suffix);
        layers.push(LayerWeights {
            attn_norm: upload(backend, path, &vector(src, &n("attn_norm"), c.dim)?)?,
            wq: linear(src, backend, &n("q"), c.q_dim(), c.dim)?,
            wk: linear(src, backend, &n("k"), c.kv_dim(), c.dim)?,
            wv: linear(src, backend, &n("v"), c.kv_dim(), c.dim)?,
            wo: linear(src, backend, &n("o"), c.dim, c.q_dim())?,
            ffn_norm: upload(backend, path, &vector(src, &n("ffn_norm"), c.dim)?)?,
            w_gate: linear(src, backend, &n("gate"), c.ffn_dim, c.dim)?,
            w_up: linear(src, backend, &n("up"), c.ffn_dim, c.dim)?,
            w_down: linear(src, backend, &n("down"), c.dim, c.ffn_dim)?,
        });
    }
    let output_norm = upload(backend, path, &vector(src, names.output_norm, c.dim)?)?;
    let output = if src.get(names.output).is_some() { linear(src, backend, names.output, c.vocab_size, c.dim)? } else { token_embd.clone() };
    let rope = c.rope(rope_freqs.as_deref());
    Ok(Weights { token_embd, layers, output_norm, output, rope })
}

struct Names {
    embd: &'static str,
    output_norm: &'static str,
    output: &'static str,
    layer: fn(usize, &str) -> String,
}

const GGUF_NAMES: Names = Names {
    embd: "token_embd.weight",
    output_norm: "output_norm.weight",
    output: "output.weight",
    layer: |l, s| {
        let t = match s {
            "attn_norm" => "attn_norm",
            "q" => "attn_q",
            "k" => "attn_k",
            "v" => "attn_v",
            "o" => "attn_output",
            "ffn_norm" => "ffn_norm",
            "gate" => "ffn_gate",
            "up" => "ffn_up",
            _ => "ffn_down",
        };
        format!("blk.{l}.{t}.weight")
    },
};

const HF_NAMES: Names = Names {
    embd: "model.embed_tokens.weight",
    output_norm: "model.norm.weight",
    output: "lm_head.weight",
    layer: |l, s| {
        let t = match s {
            "attn_norm" => "input_layernorm",
            "q" => "self_attn.q_proj",
            "k" => "self_attn.k_proj",
            "v" => "self_attn.v_proj",
            "o" => "self_attn.o_proj",
            "ffn_norm" => "post_attention_layernorm",
            "gate" => "mlp.gate_proj",
            "up" => "mlp.up_proj",
            _ => "mlp.down_proj",
        };
        format!("model.layers.{l}.{t}.weight")
    },
};

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

struct GgufSource<'a>(&'a GgufFile);

impl TensorSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        &self.0.path
    }

    fn get(&self, name: &str) -> Option<RawTensor> {
        let t: &TensorInfo = self.0.tensor(name)?;
        let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
        Some(RawTensor { dtype: t.dtype, shape, bytes: HostBytes::Mapped { map: self.0.mmap().clone(), start: t.offset as usize, len: t.nbytes as usize } })
    }
}

/// Loads a GGUF Llama model and its tokenizer.
pub fn load_gguf(path: &Path, backend: Arc<dyn Backend>, name: Option<&str>) -> Result<(Model, Tokenizer), ModelError> {
    let file = GgufFile::open(path)?;
    let arch = file.get_str("general.architecture")?.to_owned();
    if arch != "llama" {
        return Err(ModelError::UnsupportedArch { path: path.to_owned(), arch });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let dim = file.get_u32(&key("embedding_length"))? as usize;
    let n_heads = file.get_u32(&key("attention.head_count"))? as usize;
    let n_kv_heads = file.get_u32_opt(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_heads);
    if n_heads == 0 || n_kv_heads == 0 || !dim.is_multiple_of(n_heads) || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(invalid(path, format!("inconsistent heads: dim {dim}, {n_heads} heads, {n_kv_heads} kv heads")));
    }
    let head_dim = file.get_u32_opt(&key("attention.key_length"))?.map(|v| v as usize).unwrap_or(dim / n_heads);
    let embd = file.tensor("token_embd.weight").ok_or_else(|| invalid(path, "missing tensor 'token_embd.weight'"))?;
    let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
    let config = Config {
        n_layers: file.get_u32(&key("block_count"))? as usize,
        dim,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim: file.get_u32(&key("feed_forward_length"))? as usize,
        vocab_size,
        context_length: file.get_u32_opt(&key("context_length"))?.unwrap_or(2048) as usize,
        rms_eps: file.get_f32_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: file.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_style: RopeStyle::Interleaved,
        rope_scaling: None,
    };
    check_config(path, &config)?;
    for t in &file.tensors {
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4_K | DType::Q5_K | DType::Q6_K) {
            return Err(ModelError::UnsupportedDtype { path: path.to_owned(), name: t.name.clone(), dtype: t.dtype.to_string() });
        }
    }
    let src = GgufSource(&file);
    let rope_freqs = match src.get("rope_freqs.weight") {
        Some(_) => Some(vector(&src, "rope_freqs.weight", head_dim / 2)?),
        None => None,
    };
    let weights = build_weights(&src, backend.as_ref(), &config, &GGUF_NAMES, rope_freqs)?;
    let vocab = gguf_vocab(&file)?;
    let tokenizer = Tokenizer::from_gguf_vocab(vocab).map_err(|source| ModelError::Tokenizer { path: path.to_owned(), source })?;
    let mut hasher = Sha256::new();
    for t in &file.tensors {
        hasher.update(format!("{}:{}:{:?};", t.name, t.dtype, t.dims));
        hash_sample(&mut hasher, file.tensor_bytes(t));
    }
    let display = name.map(str::to_owned).or_else(|| file.get_str_opt("general.name").ok().flatten().map(str::to_owned)).unwrap_or_else(|| file_stem(path));
    let identity =
        ModelIdentity { name: display, architecture: arch, weights_hash: hex(&hasher.finalize()), file: path.display().to_string(), format: "gguf".into() };
    Ok((Model { config, weights, backend, identity }, tokenizer))
}

fn gguf_vocab(file: &GgufFile) -> Result<GgufVocab, ModelError> {
    let model = file.get_str("tokenizer.ggml.model")?.to_owned();
    let pre = file.get_str_opt("tokenizer.ggml.pre")?.map(str::to_owned);
    let id = |k: &str| file.get_u32_opt(k);
    let add_bos = match file.get_bool_opt("tokenizer.ggml.add_bos_token")? {
        Some(b) => b,
        None => GgufVocab::default_add_bos(&model, pre.as_deref()),
    };
    Ok(GgufVocab {
        tokens: file.get_str_array("tokenizer.ggml.tokens")?.into_iter().map(str::to_owned).collect(),
        token_types: file.get_i32_array_opt("tokenizer.ggml.token_type")?.unwrap_or_default(),
        merges: file.get_str_array_opt("tokenizer.ggml.merges")?.unwrap_or_default().into_iter().map(str::to_owned).collect(),
        scores: file.get_f32_array_opt("tokenizer.ggml.scores")?.unwrap_or_default(),
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        eot: id("tokenizer.ggml.eot_token_id")?,
        eom: id("tokenizer.ggml.eom_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos,
        add_eos: file.get_bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        chat_template: file.get_str_opt("tokenizer.chat_template")?.map(str::to_owned),
        model,
        pre,
    })
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folders
// ---------------------------------------------------------------------------------------------

struct SafetensorsSource {
    dir: PathBuf,
    tensors: std::collections::HashMap<String, (DType, Vec<usize>, HostBytes)>,
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn get(&self, name: &str) -> Option<RawTensor> {
        self.tensors.get(name).map(|(dtype, shape, bytes)| RawTensor { dtype: *dtype, shape: shape.clone(), bytes: bytes.clone() })
    }
}

fn open_safetensors(dir: &Path) -> Result<SafetensorsSource, ModelError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io { path: dir.to_owned(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(dir, "no *.safetensors files in the model folder"));
    }
    let mut tensors = std::collections::HashMap::new();
    for path in files {
        let f = std::fs::File::open(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        // SAFETY: the file is opened read-only; driftwood never writes model files, and a model
        // changed under a running process is outside what any mmap-based loader can defend.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&f) }.map_err(|source| ModelError::Io { path: path.clone(), source })?);
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| invalid(&path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => return Err(ModelError::UnsupportedDtype { path: path.clone(), name, dtype: format!("{other:?}") }),
            };
            let (start, end) = info.data_offsets;
            tensors.insert(name, (dtype, info.shape.clone(), HostBytes::Mapped { map: map.clone(), start: data_start + start, len: end - start }));
        }
    }
    Ok(SafetensorsSource { dir: dir.to_owned(), tensors })
}

/// Loads a Hugging Face Llama folder (config.json, tokenizer.json, *.safetensors).
pub fn load_hf_dir(dir: &Path, backend: Arc<dyn Backend>, name: Option<&str>) -> Result<(Model, Tokenizer), ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io { path: cfg_path.clone(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&cfg_path, format!("not valid JSON: {e}")))?;
    let arch = v["model_type"].as_str().unwrap_or("").to_owned();
    if arch != "llama" {
        return Err(ModelError::UnsupportedArch { path: cfg_path, arch });
    }
    let num = |k: &str| v[k].as_u64().map(|x| x as usize).ok_or_else(|| invalid(&cfg_path, format!("missing integer '{k}'")));
    let dim = num("hidden_size")?;
    let n_heads = num("num_attention_heads")?;
    let n_kv_heads = v["num_key_value_heads"].as_u64().map(|x| x as usize).unwrap_or(n_heads);
    if n_heads == 0 || n_kv_heads == 0 || dim % n_heads != 0 || n_heads % n_kv_heads != 0 {
        return Err(invalid(&cfg_path, format!("inconsistent heads: dim {dim}, {n_heads} heads, {n_kv_heads} kv heads")));
    }
    let rope_scaling = match &v["rope_scaling"] {
        serde_json::Value::Object(o) if o.get("rope_type").or(o.get("type")).and_then(|t| t.as_str()) == Some("llama3") => {
            let f = |k: &str| o.get(k).and_then(|x| x.as_f64()).map(|x| x as f32).ok_or_else(|| invalid(&cfg_path, format!("rope_scaling: missing '{k}'")));
            Some(Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            })
        }
        serde_json::Value::Null => None,
        other => return Err(invalid(&cfg_path, format!("unsupported rope_scaling {other}"))),
    };
    let config = Config {
        n_layers: num("num_hidden_layers")?,
        dim,
        n_heads,
        n_kv_heads,
        head_dim: v["head_dim"].as_u64().map(|x| x as usize).unwrap_or(dim / n_heads),
        ffn_dim: num("intermediate_size")?,
        vocab_size: num("vocab_size")?,
        context_length: v["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
        rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        rope_theta: v["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
        rope_style: RopeStyle::HalfSplit,
        rope_scaling,
    };
    check_config(&cfg_path, &config)?;
    let src = open_safetensors(dir)?;
    let weights = build_weights(&src, backend.as_ref(), &config, &HF_NAMES, None)?;
    let tokenizer = Tokenizer::from_hf_dir(dir).map_err(|source| ModelError::Tokenizer { path: dir.to_owned(), source })?;
    let mut names: Vec<&String> = src.tensors.keys().collect();
    names.sort();
    let mut hasher = Sha256::new();
    for n in names {
        let (dtype, shape, bytes) = &src.tensors[n];
        hasher.update(format!("{n}:{dtype}:{shape:?};"));
        hash_sample(&mut hasher, bytes);
    }
    let display = name.map(str::to_owned).unwrap_or_else(|| file_stem(dir));
    let identity = ModelIdentity {
        name: display,
        architecture: arch,
        weights_hash: hex(&hasher.finalize()),
        file: dir.display().to_string(),
        format: "safetensors".into(),
    };
    Ok((Model { config, weights, backend, identity }, tokenizer))
}

fn check_config(path: &Path, c: &Config) -> Result<(), ModelError> {
    let sane = c.n_layers > 0
        && c.n_layers <= 1024
        && c.dim > 0
        && c.head_dim > 0
        && c.head_dim.is_multiple_of(2)
        && c.head_dim <= 512
        && c.ffn_dim > 0
        && c.vocab_size > 0
        && c.context_length > 0
        && c.rms_eps > 0.0
        && c.rope_theta > 0.0;
    if !sane {
        return Err(invalid(path, format!("implausible model hyperparameters: {c:?}")));
    }
    Ok(())
}

/// Hashes a tensor by its length and three 4 KiB samples (start, middle, end): fast enough for
/// a ≤ 100 ms load, and any re-quantization or different checkpoint changes it.
fn hash_sample(h: &mut Sha256, bytes: &[u8]) {
    const S: usize = 4096;
    h.update((bytes.len() as u64).to_le_bytes());
    if bytes.len() <= 3 * S {
        h.update(bytes);
    } else {
        let mid = bytes.len() / 2;
        h.update(&bytes[..S]);
        h.update(&bytes[mid..mid + S]);
        h.update(&bytes[bytes.len() - S..]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Loads a model from a `.gguf` file or a Hugging Face folder.
pub fn load(path: &Path, backend: Arc<dyn Backend>, name: Option<&str>) -> Result<(Model, Tokenizer), ModelError> {
    if path.is_dir() {
        load_hf_dir(path, backend, name)
    } else {
        load_gguf(path, backend, name)
    }
}
