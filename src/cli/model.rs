//! `--model` and sampling flags shared by the commands that run a model.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use driftwood::backend::Backend;
use driftwood::engine::load;
use driftwood::engine::model::Model;
use driftwood::engine::registry;
use driftwood::engine::sampler::SamplerConfig;
use driftwood::engine::tokenizer::Tokenizer;
use driftwood::engine::Session;

#[derive(Args, Clone, Default)]
pub struct ModelArgs {
    /// Model: a registry name (smollm2-135m, the default; fetch with `bash models/fetch.sh`), a
    /// .gguf file, a Hugging Face Llama folder, or an HF cache name like llama-3.2-1b. Loaded
    /// when given, or when the actor imports model functions
    #[arg(short, long, value_name = "NAME|PATH")]
    pub model: Option<String>,
    /// KV cache size in tokens (default: the model's context, at most 4096)
    #[arg(long, value_name = "TOKENS")]
    pub ctx: Option<usize>,
    /// Sampling temperature (0 = greedy); actors may change sampling with set_sampler
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below min_p × the top probability (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalty for recently generated tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Sampling seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A loaded model and its tokenizer, shared by every actor of the process.
pub struct Loaded {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub load_ms: f64,
}

impl ModelArgs {
    pub fn sampler(&self) -> anyhow::Result<SamplerConfig> {
        if !(self.temperature >= 0.0 && (0.0..=1.0).contains(&self.top_p) && (0.0..=1.0).contains(&self.min_p) && self.repeat_penalty > 0.0) {
            anyhow::bail!("sampling flags out of range: --temperature ≥ 0, --top-p and --min-p in [0, 1], --repeat-penalty > 0");
        }
        Ok(SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
        })
    }

    /// Loads the model named by `--model` (or the default).
    pub fn load(&self, backend: Arc<dyn Backend>, quiet: bool) -> anyhow::Result<Loaded> {
        let spec = self.model.as_deref().unwrap_or(registry::DEFAULT_MODEL);
        let (path, name) = registry::resolve(spec)?;
        let started = Instant::now();
        let (model, tokenizer) = load::load(&path, backend.clone(), Some(&name))?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        if !quiet {
            let c = &model.config;
            eprintln!(
                "driftwood: model {} ({} layers, dim {}, vocab {}, {}) loaded in {load_ms:.0} ms on {}",
                model.identity.name,
                c.n_layers,
                c.dim,
                c.vocab_size,
                model.weights.layers.first().map(|l| l.wq.dtype.to_string()).unwrap_or_default(),
                backend.info().name
            );
        }
        Ok(Loaded { model: Arc::new(model), tokenizer: Arc::new(tokenizer), load_ms })
    }

    /// A fresh session on a loaded model.
    pub fn session(&self, loaded: &Loaded) -> anyhow::Result<Session> {
        let ctx = self.ctx.unwrap_or(loaded.model.config.context_length.min(4096));
        if ctx == 0 {
            anyhow::bail!("--ctx must be at least 1");
        }
        Ok(Session::new(loaded.model.clone(), loaded.tokenizer.clone(), ctx, self.sampler()?)?)
    }
}
