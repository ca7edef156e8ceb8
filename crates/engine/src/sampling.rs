//! The seeded sampler chain.
//!
//! Order (vLLM / OpenAI semantics): penalties → temperature → top-k → top-p → min-p →
//! renormalise. [`Sampler::distribution`] returns the exact post-chain distribution (the
//! speculative verifier samples from it), [`Sampler::sample`] draws from it with one uniform
//! number from a [`Rng`] whose stream is fixed forever for a given seed.

use std::collections::HashMap;

/// xoshiro256** seeded through splitmix64. The output stream for a seed is part of our
/// reproducibility contract: never change it.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// 0: greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off. Tokens with probability below `min_p × max probability` are dropped.
    pub min_p: f32,
    /// 1: off. For tokens in the window: logit > 0 ? logit / p : logit × p.
    pub repetition_penalty: f32,
    /// 0: off. logit −= count × f.
    pub frequency_penalty: f32,
    /// 0: off. logit −= p if the token occurred.
    pub presence_penalty: f32,
    /// How many of the most recent history tokens the penalties look at (0: none).
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid {name} = {value}: expected {expected}")]
    InvalidParameter { name: &'static str, value: f64, expected: &'static str },
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    fn has_penalties(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0)
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad =
            |name, value: f32, expected| Err(SamplingError::InvalidParameter { name, value: value.into(), expected });
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad("temperature", self.temperature, "a number in [0, 100]");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a number in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "a number in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", self.repetition_penalty, "a positive number");
        }
        if !self.frequency_penalty.is_finite() || self.frequency_penalty.abs() > 100.0 {
            return bad("frequency_penalty", self.frequency_penalty, "a number in [-100, 100]");
        }
        if !self.presence_penalty.is_finite() || self.presence_penalty.abs() > 100.0 {
            return bad("presence_penalty", self.presence_penalty, "a number in [-100, 100]");
        }
        Ok(())
    }
}

/// A distribution after the whole chain: sorted by descending probability (ties by id), summing
/// to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
}

impl Distribution {
    /// Probability of `token` (0 if it was cut).
    pub fn prob(&self, token: u32) -> f32 {
        self.tokens.iter().position(|&t| t == token).map_or(0.0, |i| self.probs[i])
    }
}

#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Sampler, SamplingError> {
        cfg.validate()?;
        let rng = Rng::new(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    pub fn rng_mut(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Logits after the penalties (a copy only when a penalty applies).
    fn penalised<'a>(&self, logits: &'a [f32], history: &[u32]) -> std::borrow::Cow<'a, [f32]> {
        if !self.cfg.has_penalties() || history.is_empty() {
            return std::borrow::Cow::Borrowed(logits);
        }
        let window = &history[history.len().saturating_sub(self.cfg.penalty_last_n)..];
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        let mut out = logits.to_vec();
        for (&t, &c) in &counts {
            let Some(l) = out.get_mut(t as usize) else { continue };
            let r = self.cfg.repetition_penalty;
            if r != 1.0 {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
            *l -= c as f32 * self.cfg.frequency_penalty + self.cfg.presence_penalty;
        }
        std::borrow::Cow::Owned(out)
    }

    /// The post-chain distribution for `logits` after `history`. Consumes no randomness.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Distribution {
        let logits = self.penalised(logits, history);
        if self.cfg.is_greedy() {
            return Distribution { tokens: vec![argmax(&logits)], probs: vec![1.0] };
        }
        let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, clean(l))).collect();
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.cfg.top_k > 0 && self.cfg.top_k < cand.len() {
            cand.select_nth_unstable_by(self.cfg.top_k - 1, by_logit);
            cand.truncate(self.cfg.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        if max == f32::NEG_INFINITY {
            let lowest = cand.iter().map(|c| c.0).min().unwrap_or(0);
            return Distribution { tokens: vec![lowest], probs: vec![1.0] };
        }
        let t = f64::from(self.cfg.temperature);
        let mut probs: Vec<f64> = cand.iter().map(|c| ((f64::from(c.1) - f64::from(max)) / t).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= f64::from(self.cfg.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.cfg.min_p > 0.0 {
            let floor = probs[0] * f64::from(self.cfg.min_p);
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        Distribution {
            tokens: cand[..keep].iter().map(|c| c.0).collect(),
            probs: probs.iter().map(|p| (p / total) as f32).collect(),
        }
    }

    /// Draw the next token. Greedy consumes no randomness; otherwise exactly one `next_f64`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.cfg.is_greedy() {
            return argmax(&self.penalised(logits, history));
        }
        let dist = self.distribution(logits, history);
        self.sample_from(&dist)
    }

    /// Inverse-CDF draw from `dist` with one uniform number.
    pub fn sample_from(&mut self, dist: &Distribution) -> u32 {
        if dist.tokens.len() == 1 {
            // Still consume the number so the stream does not depend on the cut.
            self.rng.next_f64();
            return dist.tokens[0];
        }
        let u = self.rng.next_f64();
        let mut acc = 0f64;
        for (&t, &p) in dist.tokens.iter().zip(&dist.probs) {
            acc += f64::from(p);
            if u < acc {
                return t;
            }
        }
        *dist.tokens.last().expect("distribution is never empty")
    }
}

/// Index of the largest value; ties and NaN resolve to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}
