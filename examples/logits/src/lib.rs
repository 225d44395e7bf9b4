//! The zero-copy path for inference: the host writes each step's logits straight into a buffer
//! in this actor's linear memory (`eval` with a logits pointer) and the actor picks the next
//! token itself, in Wasm — greedy argmax by default, or top-k sampling with its own RNG when the
//! message starts with `/sample`. Continues raw text (no chat template).
//!
//! Reply: the continuation, then a line `tokens=[…]` with the generated ids (for tests).

use driftwood_guest::{model, Actor};

struct Logits {
    /// The logits buffer the host writes into; allocated once, reused every step.
    logits: Vec<f32>,
    rng: u64,
}

impl Logits {
    fn pick(&mut self, sample: bool) -> u32 {
        if !sample {
            let mut best = 0;
            for (i, &v) in self.logits.iter().enumerate() {
                if v > self.logits[best] {
                    best = i;
                }
            }
            return best as u32;
        }
        // Top-40 at temperature 0.8, sampled with a xorshift RNG living in linear memory.
        let mut idx: Vec<usize> = (0..self.logits.len()).collect();
        idx.select_nth_unstable_by(39, |a, b| self.logits[*b].total_cmp(&self.logits[*a]));
        idx.truncate(40);
        let max = idx.iter().map(|&i| self.logits[i]).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = idx.iter().map(|&i| ((self.logits[i] - max) / 0.8).exp()).collect();
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let mut r = (self.rng >> 40) as f32 / (1u64 << 24) as f32 * weights.iter().sum::<f32>();
        for (k, w) in weights.iter().enumerate() {
            if r < *w {
                return idx[k] as u32;
            }
            r -= w;
        }
        idx[0] as u32
    }
}

impl Actor for Logits {
    fn init() -> Self {
        Logits { logits: Vec::new(), rng: 0x2545F4914F6CDD1D }
    }

    fn handle(&mut self, msg: &str) -> String {
        let (sample, text) = match msg.strip_prefix("/sample ") {
            Some(rest) => (true, rest),
            None => (false, msg),
        };
        let prompt = match model::tokenize(text, false) {
            Ok(t) => t,
            Err(e) => return format!("error: tokenize: {e}"),
        };
        let mut logits = std::mem::take(&mut self.logits);
        if let Err(e) = model::eval_logits(&prompt, &mut logits) {
            return format!("error: eval: {e}");
        }
        self.logits = logits;
        let mut generated = Vec::new();
        for _ in 0..24 {
            let t = self.pick(sample);
            if model::is_eog(t) {
                break;
            }
            generated.push(t);
            let mut logits = std::mem::take(&mut self.logits);
            let r = model::eval_logits(&[t], &mut logits);
            self.logits = logits;
            if let Err(e) = r {
                return format!("error: eval: {e}");
            }
        }
        let text = model::detokenize(&generated).unwrap_or_default();
        format!("{text}\ntokens={generated:?}")
    }
}

driftwood_guest::export_actor!(Logits);
