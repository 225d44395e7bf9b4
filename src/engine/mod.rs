//! The model side: formats (GGUF, safetensors, re-encoding between weight formats), tokenizer,
//! the Llama forward pass, sampling, synthesized random-weight models for speed work, and
//! [`Session`], one actor's conversation state (KV cache, token history, sampler).

pub mod convert;
pub mod gguf;
pub mod load;
pub mod model;
pub mod registry;
pub mod sampler;
pub mod synth;
pub mod tokenizer;

use std::sync::Arc;

use crate::backend::BackendError;
use model::{forward, Model, State};
use sampler::{Sampler, SamplerConfig};
use tokenizer::Tokenizer;

/// Largest number of tokens one forward pass processes (longer prompts go in chunks).
pub const MAX_BATCH: usize = crate::quant::MAX_PASS_TOKENS;

/// Recoverable and unrecoverable errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("context full: {have} tokens in the cache + {adding} new exceed the context of {max} (raise --ctx or truncate)")]
    ContextFull { have: usize, adding: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One conversation with a model: what the KV cache holds and how to continue it.
pub struct Session {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    state: State,
    /// Token ids whose K/V are in the cache, in order (`tokens.len() == kv len`).
    pub tokens: Vec<u32>,
    pub sampler: Sampler,
    /// Host copy of the last logits (valid after an eval).
    logits: Vec<f32>,
    has_logits: bool,
    /// Scratch for sampling (penalties modify logits; the originals stay readable).
    scratch: Vec<f32>,
}

impl Session {
    /// A fresh session with a cache of `max_seq` positions (capped at the model's context).
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, max_seq: usize, sampler: SamplerConfig) -> Result<Session, EngineError> {
        let max_seq = max_seq.clamp(1, model.config.context_length);
        let state = State::new(model.backend.as_ref(), &model.config, max_seq, MAX_BATCH.min(max_seq))?;
        let vocab = model.config.vocab_size;
        Ok(Session {
            model,
            tokenizer,
            state,
            tokens: Vec::new(),
            sampler: Sampler::new(sampler),
            logits: vec![0.0; vocab],
            has_logits: false,
            scratch: vec![0.0; vocab],
        })
    }

    pub fn max_seq(&self) -> usize {
        self.state.kv.max_seq
    }

    pub fn kv_len(&self) -> usize {
        self.state.kv.len
    }

    /// Appends tokens to the cache; afterwards [`Session::logits`] are the last token's.
    pub fn eval(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        self.run(tokens)?;
        self.model.backend.download(&self.state.logits, &mut self.logits)?;
        self.has_logits = true;
        Ok(())
    }

    /// [`Session::eval`], with the logits also stored into `out` (little-endian `f32`s, an actor's
    /// memory). Where the backend shares that memory with its device, the device writes them
    /// there itself (CUDA: a kernel stores into the registered pages) and the session reads its
    /// copy back from `out`; otherwise they are downloaded and copied into `out`. Returns whether
    /// the device wrote them.
    pub fn eval_into(&mut self, tokens: &[u32], out: &mut [u8]) -> Result<bool, EngineError> {
        let vocab = self.logits.len();
        assert!(out.len() >= vocab * 4 && (out.as_ptr() as usize).is_multiple_of(4), "eval_into: {} bytes for {vocab} logits", out.len());
        if tokens.is_empty() {
            // Nothing evaluated: the current logits, if there are any, as `eval` leaves them.
            for (c, v) in out.chunks_exact_mut(4).zip(self.logits()) {
                c.copy_from_slice(&v.to_le_bytes());
            }
            return Ok(false);
        }
        self.run(tokens)?;
        // SAFETY: `out` is an exclusively borrowed, 4-byte aligned slice of at least `vocab` f32s.
        let direct = unsafe { self.model.backend.write_shared(&self.state.logits, out.as_mut_ptr().cast(), vocab) }?;
        if direct {
            for (v, c) in self.logits.iter_mut().zip(out.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        } else {
            self.model.backend.download(&self.state.logits, &mut self.logits)?;
            for (c, v) in out.chunks_exact_mut(4).zip(&self.logits) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        self.has_logits = true;
        Ok(direct)
    }

    /// Greedy decoding: runs `tokens` (none: keeps the current pass) and returns the index of
    /// the largest logit, found where the logits are: a GPU reduces them itself and sends back
    /// one index instead of the vocabulary. The host copy is not refreshed: [`Session::logits`]
    /// is empty and [`Session::sample`] has nothing to sample until the next eval.
    pub fn eval_greedy(&mut self, tokens: &[u32]) -> Result<u32, EngineError> {
        self.run(tokens)?;
        let vocab = self.logits.len();
        let token = self.model.backend.argmax(&self.state.logits, vocab)?;
        if !tokens.is_empty() {
            self.has_logits = false;
        }
        Ok(token)
    }

    /// Runs `tokens` through the model (logits left on the backend).
    fn run(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Ok(());
        }
        let (have, max) = (self.state.kv.len, self.state.kv.max_seq);
        if have + tokens.len() > max {
            return Err(EngineError::ContextFull { have, adding: tokens.len(), max });
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        let m = self.model.clone();
        let mut result = Ok(());
        m.backend.install(&mut || {
            for chunk in tokens.chunks(self.state.max_batch) {
                if let Err(e) = forward(m.backend.as_ref(), &m.config, &m.weights, &mut self.state, chunk) {
                    // A failed pass may have written some K/V: keep the cache consistent with history.
                    self.state.kv.len = self.tokens.len();
                    self.has_logits = false;
                    result = Err(e);
                    return;
                }
                self.tokens.extend_from_slice(chunk);
            }
        });
        Ok(result?)
    }

    /// The logits after the last eval (empty before any).
    pub fn logits(&self) -> &[f32] {
        if self.has_logits {
            &self.logits
        } else {
            &[]
        }
    }

    /// Samples the next token from the current logits (does not append it).
    pub fn sample(&mut self) -> Option<u32> {
        if !self.has_logits {
            return None;
        }
        self.scratch.copy_from_slice(&self.logits);
        Some(self.sampler.sample(&mut self.scratch, &self.tokens))
    }

    /// One generation step: sample a token; unless it ends generation, evaluate it so the next
    /// logits are ready. Returns the token and whether it ended generation.
    pub fn generate_step(&mut self) -> Result<Option<(u32, bool)>, EngineError> {
        let Some(t) = self.sample() else { return Ok(None) };
        if self.tokenizer.is_end_of_generation(t) {
            return Ok(Some((t, true)));
        }
        self.eval(&[t])?;
        Ok(Some((t, false)))
    }

    /// Drops cached positions from `n` on.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.tokens.len());
        self.tokens.truncate(n);
        self.state.kv.truncate(n);
        self.has_logits = false;
    }

    /// The KV cache state, for snapshots.
    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    /// Restores the cache length and history after an import, with the given logits.
    pub fn set_restored(&mut self, tokens: Vec<u32>, logits: Option<Vec<f32>>) {
        self.state.kv.len = tokens.len();
        self.tokens = tokens;
        match logits {
            Some(l) if l.len() == self.logits.len() => {
                self.logits = l;
                self.has_logits = true;
            }
            _ => self.has_logits = false,
        }
    }
}
