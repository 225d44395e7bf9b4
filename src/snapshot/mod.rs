//! Freezing and thawing a live actor: its linear memory, mutable globals, KV cache, token
//! history and sampler, in one `.dws` file (a safetensors container, see [`format`]).
//!
//! Capture happens between messages, when no Wasm frame is live. Thaw instantiates the module
//! embedded in the snapshot, skips `driftwood_init`, writes memory and globals back, then either
//! imports the KV cache (same model) or rebuilds it by re-prefilling the conversation text
//! (another model), and says which it did.

pub mod format;

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::Val;

use crate::actor::{Actor, ActorError, Runtime};
use crate::engine::model::Model;
use crate::engine::sampler::{Sampler, SamplerState};
use crate::engine::{EngineError, Session};
use format::{GlobalValue, ModelRef, Snapshot, SnapshotError, SnapshotMeta, WriteStats};

/// Errors freezing or thawing.
#[derive(Debug, thiserror::Error)]
pub enum ThawError {
    #[error(transparent)]
    Format(#[from] SnapshotError),
    #[error(transparent)]
    Actor(#[from] ActorError),
    #[error("{path}: {reason}")]
    Mismatch { path: String, reason: String },
    #[error("{path}: rebuilding the KV cache failed: {source}")]
    Engine { path: String, source: EngineError },
    #[error("{path}: {reason}")]
    Backend { path: String, reason: String },
}

/// The identity a snapshot records for a model.
pub fn model_ref(model: &Model, tokenizer_hash: String) -> ModelRef {
    ModelRef {
        name: model.identity.name.clone(),
        architecture: model.identity.architecture.clone(),
        weights_hash: model.identity.weights_hash.clone(),
        tokenizer_hash,
        n_layers: model.config.n_layers,
        kv_dim: model.config.kv_dim(),
        vocab_size: model.config.vocab_size,
    }
}

fn to_global(v: &Val) -> Option<GlobalValue> {
    match v {
        Val::I32(x) => Some(GlobalValue::I32(*x)),
        Val::I64(x) => Some(GlobalValue::I64(*x)),
        Val::F32(x) => Some(GlobalValue::F32(*x)),
        Val::F64(x) => Some(GlobalValue::F64(*x)),
        _ => None,
    }
}

fn from_global(v: GlobalValue) -> Val {
    match v {
        GlobalValue::I32(x) => Val::I32(x),
        GlobalValue::I64(x) => Val::I64(x),
        GlobalValue::F32(x) => Val::F32(x),
        GlobalValue::F64(x) => Val::F64(x),
    }
}

/// Captures an idle actor (between messages).
pub fn capture(actor: &mut Actor) -> Result<Snapshot, ThawError> {
    let name = actor.module.name.clone();
    let mut globals = Vec::new();
    for (index, val) in actor.global_values()? {
        let g = to_global(&val).ok_or_else(|| ThawError::Mismatch {
            path: name.clone(),
            reason: format!("global {index} holds a reference or vector value, which a snapshot cannot carry"),
        })?;
        globals.push((index, g));
    }
    let memory = actor.memory_bytes();
    let (model, sampler, tokens, kv, logits, text) = match actor.session() {
        None => (None, None, Vec::new(), Vec::new(), None, None),
        Some(s) => {
            let m = &s.model;
            let len = s.kv_len();
            let kv_dim = m.config.kv_dim();
            let mut kv = Vec::with_capacity(m.config.n_layers);
            for layer in &s.state().kv.layers {
                let (mut k, mut v) = (vec![0u16; len * kv_dim], vec![0u16; len * kv_dim]);
                m.backend.kv_export(layer, len, &mut k, &mut v).map_err(|e| ThawError::Backend { path: name.clone(), reason: e.to_string() })?;
                kv.push((k, v));
            }
            let logits = if s.logits().is_empty() { None } else { Some(s.logits().to_vec()) };
            let text = s.tokenizer.decode(&s.tokens, false).ok();
            let sampler = serde_json::to_value(s.sampler.state()).ok();
            (Some(model_ref(m, s.tokenizer.fingerprint())), sampler, s.tokens.clone(), kv, logits, text)
        }
    };
    let meta = SnapshotMeta {
        format_version: format::FORMAT_VERSION,
        driftwood_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        actor_name: name,
        module_sha256: format::module_sha256(&actor.module.bytes),
        memory_bytes: memory.len() as u64,
        globals,
        model,
        sampler,
        kv_len: tokens.len(),
        conversation_text: text,
    };
    Ok(Snapshot { meta, module: actor.module.bytes.to_vec(), memory, tokens, kv, logits })
}

/// Captures and writes atomically (temp file, fsync, rename).
pub fn save(actor: &mut Actor, path: &Path) -> Result<WriteStats, ThawError> {
    let snap = capture(actor)?;
    Ok(format::write(path, &snap)?)
}

/// How the KV cache came back.
#[derive(Debug, Clone, PartialEq)]
pub enum KvRestore {
    /// No model in the snapshot or none given.
    None,
    /// Same model: the cache was imported as it was.
    Imported { tokens: usize },
    /// Another model: the conversation was re-tokenized and prefilled.
    Reprefilled { old_tokens: usize, new_tokens: usize, ms: f64 },
}

/// Thaws a snapshot into a new actor. `session` is a fresh session on the model to continue
/// with (None for model-less actors); `allow_model_change` permits a different model.
pub fn thaw(runtime: &Runtime, path: &Path, snap: Snapshot, session: Option<Session>, allow_model_change: bool) -> Result<(Actor, KvRestore), ThawError> {
    let p = path.display().to_string();
    let module = runtime.compile(snap.meta.actor_name.clone(), path.to_owned(), snap.module.clone())?;
    let mut actor = runtime.instantiate(&module)?;
    let globals: Vec<(u32, Val)> = snap.meta.globals.iter().map(|(i, g)| (*i, from_global(*g))).collect();
    actor.restore_state(&snap.memory, &globals)?;
    let restore = match (snap.meta.model.as_ref(), session) {
        (_, None) => KvRestore::None,
        (None, Some(s)) => {
            actor.attach_session(s);
            KvRestore::None
        }
        (Some(mref), Some(mut s)) => {
            let same = mref.weights_hash == s.model.identity.weights_hash && mref.tokenizer_hash == s.tokenizer.fingerprint();
            if let Some(state) = snap.meta.sampler.clone().and_then(|v| serde_json::from_value::<SamplerState>(v).ok()) {
                s.sampler = Sampler::from_state(state);
            }
            let r = if same {
                if snap.tokens.len() > s.max_seq() {
                    return Err(ThawError::Mismatch {
                        path: p,
                        reason: format!("the snapshot holds {} tokens, more than --ctx {}", snap.tokens.len(), s.max_seq()),
                    });
                }
                let backend = s.model.backend.clone();
                let len = snap.tokens.len();
                for (layer, (k, v)) in s.state_mut().kv.layers.iter_mut().zip(&snap.kv) {
                    backend.kv_import(layer, len, k, v).map_err(|e| ThawError::Backend { path: p.clone(), reason: e.to_string() })?;
                }
                s.set_restored(snap.tokens.clone(), snap.logits.clone());
                KvRestore::Imported { tokens: len }
            } else {
                if !allow_model_change {
                    return Err(ThawError::Mismatch {
                        path: p,
                        reason: format!(
                            "the snapshot was taken with model '{}' (weights {}), not '{}' (weights {}); pass --model explicitly to continue on another model (the KV cache is then rebuilt by re-prefilling the conversation)",
                            mref.name,
                            &mref.weights_hash[..12.min(mref.weights_hash.len())],
                            s.model.identity.name,
                            &s.model.identity.weights_hash[..12.min(s.model.identity.weights_hash.len())]
                        ),
                    });
                }
                let text = snap.meta.conversation_text.clone().unwrap_or_default();
                let tokens = s
                    .tokenizer
                    .encode(&text, true)
                    .map_err(|e| ThawError::Mismatch { path: p.clone(), reason: format!("re-tokenizing the conversation: {e}") })?;
                // A BOS the new tokenizer adds is part of the new cache; an empty conversation has nothing to evaluate.
                let started = Instant::now();
                s.eval(&tokens).map_err(|source| ThawError::Engine { path: p.clone(), source })?;
                KvRestore::Reprefilled { old_tokens: snap.tokens.len(), new_tokens: tokens.len(), ms: started.elapsed().as_secs_f64() * 1e3 }
            };
            actor.attach_session(s);
            r
        }
    };
    Ok((actor, restore))
}
