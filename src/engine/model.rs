//! The Llama forward pass, written once over the [`Backend`] trait.
//!
//! `Config` (hyperparameters), `Weights` (every tensor, shapes in comments, checked at load),
//! `State` (scratch buffers and the KV cache, preallocated) and one `forward` that allocates
//! nothing per token and writes K/V straight into the cache slots for its positions.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{AttentionShape, Backend, BackendError, Buffer, KvLayer, Linear, Norm, Rope, RopeStyle};

/// Llama hyperparameters, read from the model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub n_layers: usize,
    /// Model width.
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Feed-forward hidden width.
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Llama 3 frequency scaling, when the model uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
}

/// `rope_scaling` of type `llama3`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

impl Config {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies, with Llama 3 scaling or explicit per-pair factors applied.
    pub fn rope(&self, freq_factors: Option<&[f32]>) -> Rope {
        let half = self.head_dim / 2;
        let mut inv_freq = Vec::with_capacity(half);
        let step = self.rope_theta.powf(-2.0 / self.head_dim as f32);
        let mut f = 1.0f32;
        for i in 0..half {
            let mut freq = f;
            if let Some(factors) = freq_factors {
                freq /= factors.get(i).copied().unwrap_or(1.0);
            } else if let Some(s) = &self.rope_scaling {
                freq = llama3_scale(freq, s);
            }
            inv_freq.push(freq);
            f *= step;
        }
        Rope { style: self.rope_style, head_dim: self.head_dim, inv_freq }
    }
}

/// Llama 3's frequency-dependent scaling of one inverse frequency.
fn llama3_scale(freq: f32, s: &Llama3RopeScaling) -> f32 {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// One transformer block's weights.
pub struct LayerWeights {
    pub attn_norm: Buffer, // [dim]
    pub wq: Linear,        // [q_dim, dim]
    pub wk: Linear,        // [kv_dim, dim]
    pub wv: Linear,        // [kv_dim, dim]
    pub wo: Linear,        // [dim, q_dim]
    pub ffn_norm: Buffer,  // [dim]
    pub w_gate: Linear,    // [ffn_dim, dim]
    pub w_up: Linear,      // [ffn_dim, dim]
    pub w_down: Linear,    // [dim, ffn_dim]
}

/// Every tensor of the model, on the backend's device.
pub struct Weights {
    pub token_embd: Linear, // [vocab, dim]
    pub layers: Vec<LayerWeights>,
    pub output_norm: Buffer, // [dim]
    /// [vocab, dim]; the token embedding itself when the model ties them.
    pub output: Linear,
    pub rope: Rope,
}

/// The KV cache: preallocated for `max_seq` positions, `len` of them valid.
pub struct KvCache {
    pub layers: Vec<KvLayer>,
    pub len: usize,
    pub max_seq: usize,
}

impl KvCache {
    /// Forgets positions from `n` on (the next eval overwrites them).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
}

/// Scratch buffers for up to `max_batch` tokens, plus the KV cache.
pub struct State {
    /// Process-unique: backends key per-session resources (a captured decode graph) by it.
    pub id: u64,
    pub max_batch: usize,
    x: Buffer,          // [batch, dim] residual stream
    xn: Buffer,         // [batch, dim] normalized
    q: Buffer,          // [batch, q_dim]
    k: Buffer,          // [batch, kv_dim]
    v: Buffer,          // [batch, kv_dim]
    att: Buffer,        // [batch, q_dim]
    proj: Buffer,       // [batch, dim]
    gate: Buffer,       // [batch, ffn_dim]
    up: Buffer,         // [batch, ffn_dim]
    last: Buffer,       // [dim] the last token's normalized state
    pub logits: Buffer, // [vocab]
    pub kv: KvCache,
}

impl State {
    pub fn new(backend: &dyn Backend, c: &Config, max_seq: usize, max_batch: usize) -> Result<State, BackendError> {
        let b = max_batch;
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(backend.kv_layer(max_seq, c.kv_dim())?);
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(State {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            max_batch,
            x: backend.buffer(b * c.dim)?,
            xn: backend.buffer(b * c.dim)?,
            q: backend.buffer(b * c.q_dim())?,
            k: backend.buffer(b * c.kv_dim())?,
            v: backend.buffer(b * c.kv_dim())?,
            att: backend.buffer(b * c.q_dim())?,
            proj: backend.buffer(b * c.dim)?,
            gate: backend.buffer(b * c.ffn_dim)?,
            up: backend.buffer(b * c.ffn_dim)?,
            last: backend.buffer(c.dim)?,
            logits: backend.buffer(c.vocab_size)?,
            kv: KvCache { layers, len: 0, max_seq },
        })
    }
}

/// Runs `tokens` (at most `state.max_batch`) through the model at positions `kv.len..`, appends
/// their K/V to the cache and leaves the last token's logits in `state.logits`.
///
/// The closure below may run only once for many tokens: a GPU captures a session's single-token
/// pass and replays it without calling the closure again (`backend/cuda/graph.rs`). So the ops,
/// their shapes and buffers must not depend on the position or the token ids (which ops see only
/// through `forward_pass`'s `pos0`/`tokens` and `AttentionShape::pos0`, staged on the device). No
/// `if` on `pos0` here.
pub fn forward(backend: &dyn Backend, c: &Config, w: &Weights, s: &mut State, tokens: &[u32]) -> Result<(), BackendError> {
    let n = tokens.len();
    let pos0 = s.kv.len;
    debug_assert!(n > 0 && n <= s.max_batch && pos0 + n <= s.kv.max_seq);
    let dim = c.dim;
    let shape = AttentionShape { n_tokens: n, pos0, n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
    let state = s.id;
    backend.forward_pass(state, tokens, pos0, &mut || {
        // x = embedding rows of the tokens
        backend.embed(&w.token_embd, tokens, &mut s.x)?;
        for (l, lw) in w.layers.iter().enumerate() {
            // attention: xn = norm(x); q, k, v = projections; rotate q, k; att = softmax(qK)V over the cache
            let attn_norm = Norm { weight: &lw.attn_norm, eps: c.rms_eps };
            let (wqkv, qkv) = ([&lw.wq, &lw.wk, &lw.wv], [&mut s.q, &mut s.k, &mut s.v]);
            backend.attention_block(&s.x, attn_norm, &mut s.xn, wqkv, qkv, &w.rope, &mut s.kv.layers[l], &mut s.att, shape)?;
            // x += wo · att
            backend.matmul_add(&lw.wo, &s.att, &mut s.x, &mut s.proj, n)?;
            // feed-forward: x += w_down · (silu(w_gate · xn) * (w_up · xn)), xn = norm(x)
            let ffn_norm = Norm { weight: &lw.ffn_norm, eps: c.rms_eps };
            backend.ffn_gate_up(&s.x, ffn_norm, &mut s.xn, &lw.w_gate, &lw.w_up, &mut s.gate, &mut s.up, n)?;
            backend.matmul_add(&lw.w_down, &s.gate, &mut s.x, &mut s.proj, n)?;
        }
        // logits of the last token only: output · norm(x[n-1])
        backend.copy(&s.x, (n - 1) * dim, &mut s.xn, 0, dim)?;
        backend.rms_norm(&s.xn, &w.output_norm, &mut s.last, 1, dim, c.rms_eps)?;
        backend.matmul(&w.output, &s.last, &mut s.logits, 1)
    })?;
    s.kv.len = pos0 + n;
    Ok(())
}

/// A loaded model: configuration, weights on a device, and where they came from.
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub backend: Arc<dyn Backend>,
    pub identity: ModelIdentity,
}

/// What identifies a model for snapshots: a different identity means a different KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub architecture: String,
    /// Hex digest over the tensor names, dtypes, shapes and a sample of their bytes.
    pub weights_hash: String,
    pub file: String,
    pub format: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.2-1B's hyperparameters (the synthesizer's preset), with Hugging Face pairing.
    fn llama32_config() -> Config {
        let c = crate::engine::synth::SynthShape::preset("llama-3.2-1b").expect("a preset").config();
        Config { rope_style: RopeStyle::HalfSplit, ..c }
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let c = llama32_config();
        let scaled = c.rope(None).inv_freq;
        let plain = Config { rope_scaling: None, ..c }.rope(None).inv_freq;
        assert_eq!(scaled.len(), 32);
        // Wavelength 2π/f below 8192/4 = 2048: unchanged.
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[5], plain[5]);
        // Wavelength above 8192: divided by the factor.
        let last = plain.len() - 1;
        assert!((2.0 * std::f32::consts::PI / plain[last]) > 8192.0);
        assert!((scaled[last] - plain[last] / 32.0).abs() <= plain[last] * 1e-6);
        // In between: strictly between the two, and monotone in frequency.
        for i in 0..scaled.len() {
            assert!(scaled[i] <= plain[i] && scaled[i] >= plain[i] / 32.0 * (1.0 - 1e-6), "pair {i}");
        }
        assert!(scaled.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn explicit_rope_factors_divide_frequencies() {
        let c = Config { rope_scaling: None, ..llama32_config() };
        let factors: Vec<f32> = (0..32).map(|i| 1.0 + i as f32).collect();
        let f = c.rope(Some(&factors)).inv_freq;
        let plain = c.rope(None).inv_freq;
        for i in 0..32 {
            assert!((f[i] - plain[i] / factors[i]).abs() <= plain[i] * 1e-6);
        }
    }

    /// A backend that runs the CPU's ops and records each call's name and shapes: everything a
    /// captured CUDA graph freezes, without the position and the token ids (which reach a replayed
    /// graph through the device's Step record).
    struct Recorder {
        cpu: crate::backend::cpu::CpuBackend,
        trace: std::sync::Mutex<Vec<String>>,
    }

    mod recorder {
        use super::Recorder;
        use crate::backend::*;
        use crate::region::Region;

        fn lin(w: &Linear) -> String {
            format!("{}[{}x{} {}]", w.name, w.rows, w.cols, w.dtype)
        }

        fn shape(s: &AttentionShape) -> String {
            // Everything but pos0.
            format!("n={} heads={}/{} hd={}", s.n_tokens, s.n_heads, s.n_kv_heads, s.head_dim)
        }

        impl Recorder {
            fn log(&self, op: String) {
                self.trace.lock().unwrap().push(op);
            }
        }

        impl Device for Recorder {
            fn info(&self) -> &DeviceInfo {
                self.cpu.info()
            }
            fn share_region(&self, region: &Region) -> Result<(), BackendError> {
                self.cpu.share_region(region)
            }
            fn device_ptr(&self, host: *const u8) -> Result<usize, BackendError> {
                self.cpu.device_ptr(host)
            }
            unsafe fn gemm_shared(&self, a: *const f32, b: *const f32, c: *mut f32, m: usize, n: usize, k: usize) -> Result<(), BackendError> {
                // SAFETY: forwarded from the caller.
                unsafe { self.cpu.gemm_shared(a, b, c, m, n, k) }
            }
        }

        impl Probes for Recorder {
            fn gemm_copied(&self, a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<(), BackendError> {
                self.cpu.gemm_copied(a, b, c, m, n, k)
            }
            fn upload(&self, bytes: &[u8]) -> Result<Box<dyn DeviceBuffer>, BackendError> {
                self.cpu.upload(bytes)
            }
        }

        impl ModelOps for Recorder {
            fn forward_pass(&self, state: u64, tokens: &[u32], pos0: usize, pass: &mut dyn FnMut() -> Result<(), BackendError>) -> Result<(), BackendError> {
                self.log(format!("forward_pass n={}", tokens.len()));
                self.cpu.forward_pass(state, tokens, pos0, pass)
            }
            fn buffer(&self, len: usize) -> Result<Buffer, BackendError> {
                self.log(format!("buffer {len}"));
                self.cpu.buffer(len)
            }
            fn upload_f32(&self, data: &[f32]) -> Result<Buffer, BackendError> {
                self.cpu.upload_f32(data)
            }
            fn download(&self, buf: &Buffer, out: &mut [f32]) -> Result<(), BackendError> {
                self.log(format!("download {}", out.len()));
                self.cpu.download(buf, out)
            }
            fn load_linear(&self, w: Linear) -> Result<Linear, BackendError> {
                self.cpu.load_linear(w)
            }
            fn kv_layer(&self, max_seq: usize, kv_dim: usize) -> Result<KvLayer, BackendError> {
                self.cpu.kv_layer(max_seq, kv_dim)
            }
            fn embed(&self, table: &Linear, tokens: &[u32], out: &mut Buffer) -> Result<(), BackendError> {
                self.log(format!("embed {} n={} out={}", lin(table), tokens.len(), out.len()));
                self.cpu.embed(table, tokens, out)
            }
            fn rms_norm(&self, x: &Buffer, w: &Buffer, out: &mut Buffer, rows: usize, dim: usize, eps: f32) -> Result<(), BackendError> {
                self.log(format!("rms_norm {} {} {} {rows}x{dim} {eps}", x.len(), w.len(), out.len()));
                self.cpu.rms_norm(x, w, out, rows, dim, eps)
            }
            fn matmul(&self, w: &Linear, x: &Buffer, out: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
                self.log(format!("matmul {} n={n_tokens}", lin(w)));
                self.cpu.matmul(w, x, out, n_tokens)
            }
            fn matmul_many(&self, ws: &[&Linear], x: &Buffer, outs: &mut [&mut Buffer], n_tokens: usize) -> Result<(), BackendError> {
                self.log(format!("matmul_many {:?} n={n_tokens}", ws.iter().map(|w| lin(w)).collect::<Vec<_>>()));
                self.cpu.matmul_many(ws, x, outs, n_tokens)
            }
            fn rope(&self, x: &mut Buffer, rope: &Rope, n_tokens: usize, n_heads: usize, pos0: usize) -> Result<(), BackendError> {
                self.log(format!("rope n={n_tokens} heads={n_heads}"));
                self.cpu.rope(x, rope, n_tokens, n_heads, pos0)
            }
            fn attention(&self, q: &Buffer, k: &Buffer, v: &Buffer, kv: &mut KvLayer, out: &mut Buffer, s: AttentionShape) -> Result<(), BackendError> {
                self.log(format!("attention {} cache={}x{}", shape(&s), kv.max_seq, kv.kv_dim));
                self.cpu.attention(q, k, v, kv, out, s)
            }
            fn silu_mul(&self, gate: &mut Buffer, up: &Buffer, n: usize) -> Result<(), BackendError> {
                self.log(format!("silu_mul {n}"));
                self.cpu.silu_mul(gate, up, n)
            }
            fn add(&self, x: &mut Buffer, y: &Buffer, n: usize) -> Result<(), BackendError> {
                self.log(format!("add {n}"));
                self.cpu.add(x, y, n)
            }
            fn copy(&self, src: &Buffer, src_off: usize, dst: &mut Buffer, dst_off: usize, n: usize) -> Result<(), BackendError> {
                self.log(format!("copy {src_off} {dst_off} {n}"));
                self.cpu.copy(src, src_off, dst, dst_off, n)
            }
            fn kv_export(&self, kv: &KvLayer, len: usize, k: &mut [u16], v: &mut [u16]) -> Result<(), BackendError> {
                self.cpu.kv_export(kv, len, k, v)
            }
            fn kv_import(&self, kv: &mut KvLayer, len: usize, k: &[u16], v: &[u16]) -> Result<(), BackendError> {
                self.cpu.kv_import(kv, len, k, v)
            }
        }

        impl FusedOps for Recorder {
            fn matmul_add(&self, w: &Linear, x: &Buffer, out: &mut Buffer, scratch: &mut Buffer, n_tokens: usize) -> Result<(), BackendError> {
                self.log(format!("matmul_add {} n={n_tokens}", lin(w)));
                self.cpu.matmul_add(w, x, out, scratch, n_tokens)
            }
            fn norm_matmul_many(
                &self,
                x: &Buffer,
                norm: Norm<'_>,
                xn: &mut Buffer,
                ws: &[&Linear],
                outs: &mut [&mut Buffer],
                n_tokens: usize,
            ) -> Result<(), BackendError> {
                self.log(format!("norm_matmul_many {} n={n_tokens}", ws.len()));
                self.cpu.norm_matmul_many(x, norm, xn, ws, outs, n_tokens)
            }
            fn attention_block(
                &self,
                x: &Buffer,
                norm: Norm<'_>,
                xn: &mut Buffer,
                w: [&Linear; 3],
                qkv: [&mut Buffer; 3],
                rope: &Rope,
                kv: &mut KvLayer,
                out: &mut Buffer,
                s: AttentionShape,
            ) -> Result<(), BackendError> {
                self.log(format!("attention_block {} {} {} {}", lin(w[0]), lin(w[1]), lin(w[2]), shape(&s)));
                self.cpu.attention_block(x, norm, xn, w, qkv, rope, kv, out, s)
            }
            fn ffn_gate_up(
                &self,
                x: &Buffer,
                norm: Norm<'_>,
                xn: &mut Buffer,
                w_gate: &Linear,
                w_up: &Linear,
                gate: &mut Buffer,
                up: &mut Buffer,
                n_tokens: usize,
            ) -> Result<(), BackendError> {
                self.log(format!("ffn_gate_up {} {} n={n_tokens}", lin(w_gate), lin(w_up)));
                self.cpu.ffn_gate_up(x, norm, xn, w_gate, w_up, gate, up, n_tokens)
            }
        }
    }

    /// A tiny random model on `backend`: 2 layers, width 64, GQA 4/2 heads of 16.
    fn tiny_model(backend: &dyn Backend) -> (Config, Weights) {
        use crate::backend::{HostBytes, WeightData};
        let c = Config {
            n_layers: 2,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_dim: 96,
            vocab_size: 50,
            context_length: 64,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: None,
        };
        let mut seed = 7u64;
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
                })
                .collect()
        };
        let mut linear = |name: &str, rows: usize, cols: usize| {
            let bytes: Vec<u8> = values(rows * cols).iter().flat_map(|v| v.to_le_bytes()).collect();
            let w = Linear { name: name.into(), dtype: crate::quant::DType::F32, rows, cols, data: WeightData::Host(HostBytes::Owned(Arc::new(bytes))) };
            backend.load_linear(w).unwrap()
        };
        let ones = |n| backend.upload_f32(&vec![1.0; n]).unwrap();
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let layers = (0..c.n_layers)
            .map(|l| LayerWeights {
                attn_norm: ones(d),
                wq: linear(&format!("{l}.q"), q, d),
                wk: linear(&format!("{l}.k"), kv, d),
                wv: linear(&format!("{l}.v"), kv, d),
                wo: linear(&format!("{l}.o"), d, q),
                ffn_norm: ones(d),
                w_gate: linear(&format!("{l}.gate"), f, d),
                w_up: linear(&format!("{l}.up"), f, d),
                w_down: linear(&format!("{l}.down"), d, f),
            })
            .collect();
        let token_embd = linear("embd", c.vocab_size, d);
        let w = Weights { output: token_embd.clone(), token_embd, layers, output_norm: ones(d), rope: c.rope(None) };
        (c, w)
    }

    /// The graph contract (backend/cuda/graph.rs): a single-token pass issues the same ops, with
    /// the same shapes, weights and cache, at every position, so replaying one captured pass is
    /// the pass. A prefill of several tokens is allowed to differ, and does.
    #[test]
    fn decode_steps_run_the_same_ops_at_every_position() {
        let rec = Recorder { cpu: crate::backend::cpu::CpuBackend::new(Some(1)), trace: Default::default() };
        let (c, w) = tiny_model(&rec);
        let mut s = State::new(&rec, &c, 32, 8).unwrap();
        let pass = |tokens: &[u32], s: &mut State| {
            rec.trace.lock().unwrap().clear();
            forward(&rec, &c, &w, s, tokens).unwrap();
            std::mem::take(&mut *rec.trace.lock().unwrap())
        };
        let prefill = pass(&[1, 2, 3, 4, 5], &mut s);
        let mut steps = Vec::new();
        for (i, t) in [7u32, 49, 0, 12, 33, 7].into_iter().enumerate() {
            let trace = pass(&[t], &mut s);
            assert_eq!(s.kv.len, 6 + i);
            steps.push(trace);
        }
        assert!(steps[0].len() > 4 * c.n_layers, "the recorder saw the ops: {:?}", steps[0]);
        for (i, step) in steps.iter().enumerate() {
            assert_eq!(step, &steps[0], "decode step {i} (position {}) differs from the first", 5 + i);
        }
        assert_ne!(prefill, steps[0], "a 5-token pass has other shapes");
        // The logits are real numbers that depend on the input (the recorder ran the CPU ops).
        let mut logits = vec![0f32; c.vocab_size];
        crate::backend::ModelOps::download(&rec, &s.logits, &mut logits).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()) && logits.iter().any(|&v| v != logits[0]));
    }
}
