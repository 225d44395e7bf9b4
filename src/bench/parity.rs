//! `driftwood bench parity`: does a device compute what the CPU computes?
//!
//! The same model file is loaded on the CPU (the numerical reference) and on the device under
//! test. A prompt is prefilled on both (the batched path), then `steps` greedy tokens are decoded
//! teacher-forced with the CPU's choice (the single-token path, and on CUDA the captured graph).
//! At every step the logits are compared: the largest absolute difference over the largest
//! absolute CPU logit is the relative error, and the greedy tokens must agree. Since both sides
//! see the same inputs, agreeing greedy tokens at every step means free-running greedy output is
//! identical.

use std::sync::Arc;

use serde::Serialize;

use crate::engine::model::Model;
use crate::engine::sampler::{argmax, SamplerConfig};
use crate::engine::tokenizer::Tokenizer;
use crate::engine::Session;

#[derive(Debug, Serialize)]
pub struct StepRow {
    /// 0 is the prompt (prefill); then one row per decoded token.
    pub step: usize,
    pub cpu_token: u32,
    pub device_token: u32,
    /// The device's own argmax of its logits (greedy decoding where the logits are): must be
    /// `device_token`.
    pub device_argmax: u32,
    pub max_abs_diff: f32,
    pub rel_err: f32,
    /// Gap between the CPU's top two logits (a small gap excuses a flipped token).
    pub cpu_top2_gap: f32,
}

#[derive(Debug, Serialize)]
pub struct ParityReport {
    pub model: String,
    pub reference: String,
    pub device: String,
    pub prompt_tokens: usize,
    pub steps: Vec<StepRow>,
    pub tokens_agree: usize,
    /// Steps where the device's argmax matched the host's argmax of the device's logits.
    pub device_argmax_agrees: usize,
    pub max_rel_err: f32,
    pub mean_abs_diff: f32,
}

impl ParityReport {
    /// Every greedy token agreed (and the device's own argmax with the host's), and the worst
    /// relative error is within `tolerance`.
    pub fn passes(&self, tolerance: f32) -> bool {
        self.tokens_agree == self.steps.len() && self.device_argmax_agrees == self.steps.len() && self.max_rel_err <= tolerance
    }
}

/// Compares `device` against `reference` (both loaded from the same file) over `prompt` and
/// `steps` greedy tokens.
pub fn run(reference: Arc<Model>, device: Arc<Model>, tok: Arc<Tokenizer>, prompt: &[u32], steps: usize) -> anyhow::Result<ParityReport> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let ctx = (prompt.len() + steps + 1).min(reference.config.context_length);
    let mut a = Session::new(reference.clone(), tok.clone(), ctx, SamplerConfig::default())?;
    let mut b = Session::new(device.clone(), tok, ctx, SamplerConfig::default())?;
    a.eval(prompt)?;
    b.eval(prompt)?;
    let mut rows = Vec::new();
    let (mut sum_abs, mut count) = (0f64, 0usize);
    for step in 0..=steps {
        let device_argmax = b.eval_greedy(&[])?;
        let (la, lb) = (a.logits(), b.logits());
        anyhow::ensure!(la.len() == lb.len() && !la.is_empty(), "logits missing after step {step}");
        let mut max_abs = 0f32;
        for (x, y) in la.iter().zip(lb) {
            let d = (x - y).abs();
            max_abs = if d.is_nan() { f32::INFINITY } else { max_abs.max(d) };
            sum_abs += d as f64;
        }
        count += la.len();
        let scale = la.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let (ta, tb) = (argmax(la), argmax(lb));
        rows.push(StepRow {
            step,
            cpu_token: ta,
            device_token: tb,
            device_argmax,
            max_abs_diff: max_abs,
            rel_err: max_abs / scale,
            cpu_top2_gap: top2_gap(la),
        });
        if step == steps || a.kv_len() >= ctx {
            break;
        }
        a.eval(&[ta])?;
        b.eval(&[ta])?;
    }
    Ok(ParityReport {
        model: reference.identity.name.clone(),
        reference: reference.backend.info().name.clone(),
        device: device.backend.info().name.clone(),
        prompt_tokens: prompt.len(),
        tokens_agree: rows.iter().filter(|r| r.cpu_token == r.device_token).count(),
        device_argmax_agrees: rows.iter().filter(|r| r.device_argmax == r.device_token).count(),
        max_rel_err: rows.iter().map(|r| r.rel_err).fold(0.0, f32::max),
        mean_abs_diff: (sum_abs / count.max(1) as f64) as f32,
        steps: rows,
    })
}

fn top2_gap(l: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in l {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}
