//! `driftwood bench snapshot`: freezing and thawing a conversation vs recomputing it.
//!
//! For each context length: prefill that many tokens (the cost a restore saves), save the actor
//! with its KV cache (capture + atomic write, fsync included), then read + thaw it into a fresh
//! actor (restore), and report file size and bytes per token.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::actor::{Runtime, RuntimeConfig};
use crate::engine::model::Model;
use crate::engine::sampler::SamplerConfig;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::Session;
use crate::snapshot::{self, format};

const BENCH_ACTOR: &str = r#"(module
  (memory (export "memory") 2)
  (global $calls (mut i32) (i32.const 0))
  (func (export "driftwood_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "driftwood_handle") (param i32 i32) (result i64)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1))) i64.const 0))"#;

#[derive(Debug, Serialize)]
pub struct SnapshotRow {
    pub tokens: usize,
    pub save_ms: f64,
    pub restore_ms: f64,
    pub reprefill_ms: f64,
    pub file_bytes: u64,
    pub bytes_per_token: f64,
    /// reprefill_ms / restore_ms
    pub speedup: f64,
}

#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub model: String,
    pub device: String,
    pub rows: Vec<SnapshotRow>,
}

pub fn run(model: Arc<Model>, tok: Arc<Tokenizer>, sizes: &[usize], dir: &Path, mut progress: impl FnMut(&str)) -> anyhow::Result<SnapshotReport> {
    let runtime = Runtime::new(RuntimeConfig { max_memory: 1 << 26, timeout: Duration::from_secs(600), backend: model.backend.clone(), verbose: false })?;
    let module = runtime.compile("snapshot-bench".into(), "<built-in snapshot bench actor>".into(), BENCH_ACTOR.as_bytes().to_vec())?;
    let text = "Snapshots let a conversation move between machines without recomputing it. ".repeat(4096 / 8);
    let all = tok.encode(&text, false)?;
    let mut rows = Vec::new();
    for &n in sizes {
        let ctx = (n + 8).min(model.config.context_length);
        let tokens: Vec<u32> = all.iter().copied().cycle().take(n).collect();
        progress(&format!("{n} tokens: prefill"));
        let mut session = Session::new(model.clone(), tok.clone(), ctx, SamplerConfig::default())?;
        let t = Instant::now();
        session.eval(&tokens)?;
        let reprefill_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut actor = runtime.instantiate(&module)?;
        actor.attach_session(session);
        actor.deliver(b"x")?;
        let path = dir.join(format!("bench-{n}.dws"));
        progress(&format!("{n} tokens: save"));
        let t = Instant::now();
        let stats = snapshot::save(&mut actor, &path)?;
        let save_ms = t.elapsed().as_secs_f64() * 1e3;
        progress(&format!("{n} tokens: restore"));
        let fresh = Session::new(model.clone(), tok.clone(), ctx, SamplerConfig::default())?;
        let t = Instant::now();
        let snap = format::read(&path)?;
        let (thawed, _) = snapshot::thaw(&runtime, &path, snap, Some(fresh), false)?;
        let restore_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(thawed.session().map(|s| s.kv_len()) == Some(n), "restored cache has the wrong length");
        let _ = std::fs::remove_file(&path);
        rows.push(SnapshotRow {
            tokens: n,
            save_ms,
            restore_ms,
            reprefill_ms,
            file_bytes: stats.file_bytes,
            bytes_per_token: stats.kv_bytes as f64 / n as f64,
            speedup: reprefill_ms / restore_ms,
        });
    }
    Ok(SnapshotReport { model: model.identity.name.clone(), device: model.backend.info().name.clone(), rows })
}
