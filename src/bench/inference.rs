//! `driftwood bench inference`: model load, prefill, decode and the host-function boundary.
//!
//! Prefill and decode run the engine directly. The boundary is measured with a built-in actor
//! whose loop calls `generate_step` from Wasm: (wall time − time inside the host calls) per
//! token is what the Wasm ↔ host crossing costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{median_ms, rss_bytes};
use crate::actor::{Runtime, RuntimeConfig};
use crate::engine::model::Model;
use crate::engine::sampler::SamplerConfig;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::Session;

#[derive(Debug, Serialize)]
pub struct PrefillRow {
    pub tokens: usize,
    pub ms: f64,
    pub tok_s: f64,
}

#[derive(Debug, Serialize)]
pub struct DecodeRow {
    pub tokens: usize,
    pub ms_per_token: f64,
    pub tok_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Boundary {
    pub tokens: usize,
    /// Wall time per token of a loop driven from Wasm.
    pub ms_per_token_wasm: f64,
    /// Of which inside the host call (the model's compute).
    pub ms_per_token_host: f64,
    /// The difference: the cost of crossing the boundary, per token.
    pub overhead_us_per_token: f64,
    pub overhead_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct InferenceReport {
    pub model: String,
    pub device: String,
    pub threads: usize,
    pub load_ms: f64,
    pub weights_mb: f64,
    pub rss_after_load_mb: f64,
    pub prefill: Vec<PrefillRow>,
    /// Greedy decoding with the argmax taken where the logits are (a GPU sends back one index).
    pub decode: DecodeRow,
    /// Greedy decoding with every token's logits copied to the host and the argmax taken there.
    pub decode_host_logits: DecodeRow,
    /// Measured device-memory bandwidth (GPUs), and the decode floor it implies: every weight
    /// byte read once per token.
    pub bandwidth_gb_s: Option<f64>,
    pub floor_ms_per_token: Option<f64>,
    pub boundary: Option<Boundary>,
}

/// A WAT actor whose one message runs `generate_step` N times (N = message length in bytes).
const BOUNDARY_ACTOR: &str = r#"(module
  (import "driftwood" "generate_step" (func $step (result i32)))
  (memory (export "memory") 1)
  (func (export "driftwood_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "driftwood_handle") (param $p i32) (param $n i32) (result i64)
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (br_if $done (i32.lt_s (call $step) (i32.const 0)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    i64.const 0))"#;

fn prompt_tokens(tok: &Tokenizer, n: usize) -> Vec<u32> {
    let text = "The history of computing is a story of people, ideas and machines. ".repeat(n / 8 + 2);
    let mut ids = tok.encode(&text, false).unwrap_or_default();
    ids.resize(n, ids.first().copied().unwrap_or(0));
    ids
}

pub struct Options {
    pub prefill_sizes: Vec<usize>,
    pub decode_tokens: usize,
    pub repeats: usize,
    pub boundary: bool,
    /// KV cache size of the timed sessions (at least what the runs need).
    pub context: usize,
}

/// Where greedy decoding picks the next token.
#[derive(Clone, Copy)]
enum Greedy {
    /// [`Session::eval_greedy`]: on the device that holds the logits.
    WhereTheLogitsAre,
    /// [`Session::eval`], then the argmax of the host copy of the logits.
    OnTheHost,
}

/// Median ms/token over `opts.repeats` greedy runs of `opts.decode_tokens` tokens after a
/// 5-token prompt, each in a fresh session.
fn decode_row(model: &Arc<Model>, tok: &Arc<Tokenizer>, ctx: usize, opts: &Options, how: Greedy) -> anyhow::Result<DecodeRow> {
    let step = |s: &mut Session, t: u32| -> anyhow::Result<u32> {
        Ok(match how {
            Greedy::WhereTheLogitsAre => s.eval_greedy(&[t])?,
            Greedy::OnTheHost => {
                s.eval(&[t])?;
                crate::engine::sampler::argmax(s.logits())
            }
        })
    };
    let mut per_run = Vec::new();
    for _ in 0..opts.repeats.max(1) {
        let mut s = Session::new(model.clone(), tok.clone(), ctx, SamplerConfig::default())?;
        let mut next = s.eval_greedy(&prompt_tokens(tok, 5))?;
        // Two untimed steps: a GPU captures its decode graph on the second.
        for _ in 0..2 {
            next = step(&mut s, next)?;
        }
        let t = Instant::now();
        for _ in 0..opts.decode_tokens {
            next = step(&mut s, next)?;
        }
        per_run.push(t.elapsed().as_secs_f64() * 1e3 / opts.decode_tokens as f64);
    }
    let ms_per_token = median_ms(&mut per_run);
    Ok(DecodeRow { tokens: opts.decode_tokens, ms_per_token, tok_s: 1e3 / ms_per_token })
}

/// Runs the benchmark on a loaded model.
pub fn run(model: Arc<Model>, tok: Arc<Tokenizer>, load_ms: f64, opts: &Options, mut progress: impl FnMut(&str)) -> anyhow::Result<InferenceReport> {
    let greedy = SamplerConfig::default();
    let max_prefill = opts.prefill_sizes.iter().copied().max().unwrap_or(0);
    let ctx = (max_prefill + opts.decode_tokens + 16).max(opts.context).min(model.config.context_length);
    let mut prefill = Vec::new();
    for &n in &opts.prefill_sizes {
        progress(&format!("prefill {n} tokens"));
        let tokens = prompt_tokens(&tok, n);
        let mut samples = Vec::new();
        for _ in 0..opts.repeats.max(1) {
            let mut s = Session::new(model.clone(), tok.clone(), ctx, greedy.clone())?;
            let t = Instant::now();
            s.eval(&tokens)?;
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ms = median_ms(&mut samples);
        prefill.push(PrefillRow { tokens: n, ms, tok_s: n as f64 / ms * 1e3 });
    }

    progress(&format!("decode {} tokens", opts.decode_tokens));
    let decode = decode_row(&model, &tok, ctx, opts, Greedy::WhereTheLogitsAre)?;
    progress(&format!("decode {} tokens, logits to the host", opts.decode_tokens));
    let decode_host_logits = decode_row(&model, &tok, ctx, opts, Greedy::OnTheHost)?;

    let boundary = if opts.boundary {
        progress("host-function boundary");
        Some(boundary(model.clone(), tok.clone(), ctx, opts.decode_tokens)?)
    } else {
        None
    };
    let weights: usize = model
        .weights
        .layers
        .iter()
        .map(|l| l.wq.nbytes() + l.wk.nbytes() + l.wv.nbytes() + l.wo.nbytes() + l.w_gate.nbytes() + l.w_up.nbytes() + l.w_down.nbytes())
        .sum::<usize>()
        + model.weights.output.nbytes();
    let bandwidth_gb_s = model.backend.memory_bandwidth();
    Ok(InferenceReport {
        bandwidth_gb_s,
        floor_ms_per_token: bandwidth_gb_s.map(|bw| weights as f64 / (bw * 1e9) * 1e3),
        model: model.identity.name.clone(),
        device: model.backend.info().name.clone(),
        threads: model.backend.info().parallelism,
        load_ms,
        weights_mb: weights as f64 / 1e6,
        rss_after_load_mb: rss_bytes() as f64 / 1e6,
        prefill,
        decode,
        decode_host_logits,
        boundary,
    })
}

fn boundary(model: Arc<Model>, tok: Arc<Tokenizer>, ctx: usize, n: usize) -> anyhow::Result<Boundary> {
    let runtime = Runtime::new(RuntimeConfig { max_memory: 1 << 26, timeout: Duration::from_secs(600), backend: model.backend.clone(), verbose: false })?;
    let module = runtime.compile("boundary-bench".into(), "<built-in boundary actor>".into(), BOUNDARY_ACTOR.as_bytes().to_vec())?;
    let mut actor = runtime.instantiate(&module)?;
    // Penalise repeats so greedy decoding never stops early on an end-of-turn token.
    let mut session = Session::new(model, tok.clone(), ctx, SamplerConfig { repeat_penalty: 1.3, ..SamplerConfig::default() })?;
    session.eval(&prompt_tokens(&tok, 5))?;
    actor.attach_session(session);
    let message = vec![b'x'; n];
    let t = Instant::now();
    actor.deliver(&message)?;
    let wall = t.elapsed();
    let stats = actor.host_stats().clone();
    let tokens = stats.tokens_evaluated.max(1) as usize;
    let wasm = wall.as_secs_f64() * 1e3 / tokens as f64;
    let host = stats.compute.as_secs_f64() * 1e3 / tokens as f64;
    let overhead_us = (wasm - host) * 1e3;
    Ok(Boundary {
        tokens,
        ms_per_token_wasm: wasm,
        ms_per_token_host: host,
        overhead_us_per_token: overhead_us,
        overhead_percent: overhead_us / 1e3 / wasm * 100.0,
    })
}
