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
}
