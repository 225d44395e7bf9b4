//! Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p and a
//! repetition penalty, driven by a seeded RNG whose whole state is two words, so a snapshot can
//! save it and a restored actor continues the exact same random sequence.

pub use crate::numeric::argmax;
use serde::{Deserialize, Serialize};

/// Sampling settings; the default is greedy (temperature 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability sums to at least p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

/// PCG-XSH-RR 64/32: small, fast, and its state is one `u64` plus the stream increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    pub state: u64,
    pub inc: u64,
}

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        let mut rng = Rng { state: 0, inc: (seed << 1) | 1 };
        rng.next_u32();
        rng.state = rng.state.wrapping_add(seed ^ 0x853c_49e6_748f_ea9b);
        rng.next_u32();
        rng
    }

    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(6364136223846793005).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

/// A sampler: settings, RNG state and reusable scratch (no allocation per token after the first).
#[derive(Debug, Clone)]
pub struct Sampler {
    pub config: SamplerConfig,
    pub rng: Rng,
    candidates: Vec<(u32, f32)>,
}

/// What a snapshot stores of a sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerState {
    pub config: SamplerConfig,
    pub rng: Rng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Sampler {
        let rng = Rng::seeded(config.seed);
        Sampler { config, rng, candidates: Vec::new() }
    }

    pub fn state(&self) -> SamplerState {
        SamplerState { config: self.config.clone(), rng: self.rng }
    }

    pub fn from_state(state: SamplerState) -> Sampler {
        Sampler { config: state.config, rng: state.rng, candidates: Vec::new() }
    }

    /// Picks a token. `logits` may be modified (penalty applied in place); `recent` is the token
    /// history the repetition penalty looks at.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let c = &self.config;
        if c.repeat_penalty != 1.0 && c.repeat_penalty > 0.0 {
            let start = recent.len().saturating_sub(c.repeat_last_n);
            let mut seen = recent[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / c.repeat_penalty } else { *l * c.repeat_penalty };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / c.temperature;
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l * inv_t)));
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        // Descending by logit; ties by id so the order is deterministic.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if c.top_k > 0 && c.top_k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(c.top_k - 1, by_logit);
            self.candidates.truncate(c.top_k);
        }
        self.candidates.sort_unstable_by(by_logit);
        let max = self.candidates[0].1;
        let mut sum = 0.0f32;
        for cand in self.candidates.iter_mut() {
            cand.1 = (cand.1 - max).exp();
            sum += cand.1;
        }
        for cand in self.candidates.iter_mut() {
            cand.1 /= sum;
        }
        if c.min_p > 0.0 {
            let floor = self.candidates[0].1 * c.min_p;
            let keep = self.candidates.iter().take_while(|x| x.1 >= floor).count().max(1);
            self.candidates.truncate(keep);
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = self.candidates.len();
            for (i, cand) in self.candidates.iter().enumerate() {
                acc += cand.1;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep.max(1));
        }
        let total: f32 = self.candidates.iter().map(|x| x.1).sum();
        let mut r = self.rng.next_f32() * total;
        for cand in &self.candidates {
            if r < cand.1 {
                return cand.0;
            }
            r -= cand.1;
        }
        self.candidates.last().map(|x| x.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_first_on_ties() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0], &[]), 1);
    }

    /// The index a plain scan finds: the first of the largest values, NaNs skipped, 0 if none.
    fn scan(xs: &[f32]) -> u32 {
        let mut best = (0, f32::NEG_INFINITY);
        for (i, &v) in xs.iter().enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        best.0 as u32
    }

    #[test]
    fn argmax_matches_a_plain_scan() {
        let mut r = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r
        };
        for len in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 100, 1000, 49152 + 7] {
            for case in 0..6 {
                // Few distinct values, so ties are common; the last cases add NaN and infinities.
                let mut xs: Vec<f32> = (0..len).map(|_| (next() % 7) as f32 - 3.0).collect();
                if case >= 3 && len > 0 {
                    let n = len;
                    xs[next() as usize % n] = f32::NAN;
                    xs[next() as usize % n] = f32::NEG_INFINITY;
                }
                if case == 4 && len > 0 {
                    let n = len;
                    xs[next() as usize % n] = f32::INFINITY;
                }
                if case == 5 {
                    xs.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                }
                assert_eq!(argmax(&xs), scan(&xs), "len {len} case {case}");
            }
        }
        let mut xs = vec![0.0f32; 40];
        xs[0] = f32::NAN;
        xs[33] = 1.0;
        xs[37] = 1.0;
        assert_eq!(argmax(&xs), 33, "first of the tied maxima, past a leading NaN");
        assert_eq!(argmax(&[f32::NAN; 20]), 0);
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let mut s = Sampler::new(SamplerConfig { repeat_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&mut [1.0, 1.5, 0.2], &[1]), 0, "1.5/2 < 1.0");
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplerConfig { temperature: 5.0, top_k: 1, seed: 7, ..Default::default() });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.1, 2.0, 1.9], &[]), 2);
        }
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, min_p: 0.5, seed: 3, ..Default::default() });
        for _ in 0..200 {
            let t = s.sample(&mut [5.0, 5.0 - 0.1, -3.0, -4.0], &[]);
            assert!(t < 2, "{t}");
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, seed: 11, ..Default::default() });
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()]; // probabilities 1/6, 2/6, 3/6
        let mut counts = [0usize; 3];
        for _ in 0..30000 {
            counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            let f = *c as f64 / 30000.0;
            assert!((f - p).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn saved_state_continues_the_same_sequence() {
        let mut a = Sampler::new(SamplerConfig { temperature: 0.8, top_p: 0.9, seed: 42, ..Default::default() });
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 17) as f32) * 0.3).collect();
        for _ in 0..10 {
            a.sample(&mut logits.clone(), &[]);
        }
        let mut b = Sampler::from_state(a.state());
        let xs: Vec<u32> = (0..20).map(|_| a.sample(&mut logits.clone(), &[])).collect();
        let ys: Vec<u32> = (0..20).map(|_| b.sample(&mut logits.clone(), &[])).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().any(|&t| t != xs[0]), "sampling should vary: {xs:?}");
    }
}
