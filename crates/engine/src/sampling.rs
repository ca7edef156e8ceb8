//! Deterministic, seeded token sampling.
//!
//! # The sampler chain
//!
//! [`Sampler::distribution`] turns raw logits into the exact distribution a
//! token is drawn from. The chain follows vLLM / OpenAI semantics and is applied
//! in this fixed order:
//!
//! 1. **Penalties**, over the last `penalty_last_n` ids of `history` (ids outside
//!    the vocabulary are ignored). For every token with `count > 0` in that window:
//!    * repetition (CTRL / llama.cpp): `l = if l > 0 { l / rep } else { l * rep }`;
//!    * then frequency and presence (OpenAI): `l -= count * freq + pres`.
//! 2. **Sanitizing**: NaN logits become `-inf`, `+inf` becomes `f32::MAX`.
//!    If every logit is `-inf` (or the vocabulary is empty) the result is token 0
//!    with probability 1.
//! 3. **Greedy** (`temperature == 0`): the argmax of the penalized logits, ties
//!    to the lowest id, with probability 1. Nothing below applies.
//! 4. **Temperature**: `s_i = (l_i - max l) / T`, weights `w_i = exp(s_i)` (f64).
//!    Tokens with `s_i < -104` have `w_i < 2^-150` and hence probability exactly
//!    0 in `f32`; they are dropped up front.
//! 5. **Top-k** (`top_k > 0`): keep the `k` largest `s_i` (ties to the lowest id).
//! 6. **Top-p**: with `Z` the total weight of the tokens kept so far, keep the
//!    smallest prefix of the tokens (sorted by descending `s`, ties by id) whose
//!    cumulative weight is `>= top_p * Z` (always at least one token).
//! 7. **Min-p**: keep tokens with `p_i >= min_p * p_max`, where `p` is the
//!    renormalized distribution after step 6. As `w_max = 1` this is `w_i >= min_p`.
//! 8. **Renormalize**: `p_i = (w_i / Σ kept w) as f32`; tokens whose `f32`
//!    probability is 0 are dropped; the list is sorted by descending `p`, ties by id.
//!
//! # Randomness
//!
//! A non-greedy draw consumes exactly **one** [`Rng::next_f64`] `u` and returns
//! the first token of the sorted [`Distribution`] whose cumulative probability
//! (summed in f64, in list order) exceeds `u` (the last token if rounding leaves
//! the total below `u`). Greedy sampling consumes no randomness. Hence
//! `sample(l, h)` and `sample_from(&distribution(l, h))` always agree and leave
//! the RNG in the same state, which is what the speculative verifier relies on.

pub use crate::rng::Rng;

/// Sampling parameters. `Default` is greedy decoding; missing fields
/// deserialize to their default values.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// `0` => greedy (argmax; ties -> lowest id). Must be in `[0, 100]`.
    pub temperature: f32,
    /// `0` => off.
    pub top_k: usize,
    /// `1.0` => off. Must be in `(0, 1]`.
    pub top_p: f32,
    /// `0.0` => off; relative to the max probability after temperature. In `[0, 1]`.
    pub min_p: f32,
    /// `1.0` => off; CTRL/llama.cpp style: `logit > 0 ? logit / pen : logit * pen`. Must be `> 0`.
    pub repetition_penalty: f32,
    /// `0` => off; OpenAI style: `logit -= count * freq`.
    pub frequency_penalty: f32,
    /// `0` => off; OpenAI style: `logit -= (count > 0) * pres`.
    pub presence_penalty: f32,
    /// Number of trailing history ids considered by the penalties (`0` = none).
    pub penalty_last_n: usize,
    /// Seed of the sampler's [`Rng`].
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

impl SamplerConfig {
    /// Greedy decoding with all filters and penalties off (same as `Default`).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// `true` when the sampler takes the argmax (`temperature == 0`).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        fn check(ok: bool, name: &'static str, value: f32, expected: &'static str) -> Result<(), SamplingError> {
            if ok { Ok(()) } else { Err(SamplingError::InvalidParameter { name, value: f64::from(value), expected }) }
        }
        let t = self.temperature;
        check((0.0..=100.0).contains(&t), "temperature", t, "a finite value in [0, 100]")?;
        let p = self.top_p;
        check(p > 0.0 && p <= 1.0, "top_p", p, "a value in (0, 1]")?;
        let m = self.min_p;
        check((0.0..=1.0).contains(&m), "min_p", m, "a value in [0, 1]")?;
        let r = self.repetition_penalty;
        check(r.is_finite() && r > 0.0, "repetition_penalty", r, "a finite value > 0")?;
        let f = self.frequency_penalty;
        check(f.is_finite(), "frequency_penalty", f, "a finite value")?;
        let pr = self.presence_penalty;
        check(pr.is_finite(), "presence_penalty", pr, "a finite value")?;
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0)
    }
}

/// Errors from sampler construction.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A [`SamplerConfig`] field is out of range.
    #[error("invalid sampling parameter {name} = {value}: expected {expected}")]
    InvalidParameter { name: &'static str, value: f64, expected: &'static str },
}

/// The distribution after the whole chain: sparse (only tokens with non-zero
/// probability), sorted by descending probability (ties by ascending id), with
/// probabilities summing to 1 (up to `f32` rounding). Never empty when produced
/// by [`Sampler::distribution`]; greedy gives one token with probability 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
}

impl Distribution {
    fn single(token: u32) -> Distribution {
        Distribution { tokens: vec![token], probs: vec![1.0] }
    }

    /// Probability of `token` (0 if absent). Linear scan.
    /// Alias of [`Distribution::prob_of`].
    pub fn prob(&self, token: u32) -> f32 {
        self.prob_of(token)
    }

    pub fn prob_of(&self, token: u32) -> f32 {
        self.tokens.iter().position(|&t| t == token).map_or(0.0, |i| self.probs[i])
    }

    /// Number of tokens with non-zero probability.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// `true` if there are no tokens (never for a chain output).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Inverse CDF: first token whose cumulative probability (f64, list order)
    /// exceeds `u`; the last token if none does; 0 if empty.
    pub fn inverse_cdf(&self, u: f64) -> u32 {
        let mut cum = 0.0f64;
        for (&t, &p) in self.tokens.iter().zip(&self.probs) {
            cum += f64::from(p);
            if u < cum {
                return t;
            }
        }
        self.tokens.last().copied().unwrap_or(0)
    }
}

/// A configured, seeded sampler. See the [module docs](self) for the chain.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    /// Draw the uniform for the token at position `p` from `(seed, p)` instead of the stream.
    positional: bool,
}

/// Tempered weights below `exp(PRUNE_S)` are < 2^-150 and round to probability 0 in f32.
const PRUNE_S: f32 = -104.0;

/// Order-preserving map from f32 (not NaN) to u32, ascending.
#[inline]
fn f32_ord(x: f32) -> u32 {
    let b = (x + 0.0).to_bits(); // + 0.0 turns -0.0 into +0.0
    if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }
}

#[inline]
fn f32_from_ord(o: u32) -> f32 {
    f32::from_bits(if o & 0x8000_0000 != 0 { o & 0x7FFF_FFFF } else { !o })
}

/// Sort key: ascending key order == descending `s`, then ascending id.
#[inline]
fn key(s: f32, id: u32) -> u64 {
    (u64::from(!f32_ord(s)) << 32) | u64::from(id)
}

#[inline]
fn key_s(k: u64) -> f32 {
    f32_from_ord(!((k >> 32) as u32))
}

#[inline]
fn key_id(k: u64) -> u32 {
    k as u32
}

#[inline]
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else if l == f32::INFINITY {
        f32::MAX
    } else {
        l
    }
}

/// First index and value of the maximum of the sanitized `xs`; `None` if all
/// are `-inf`/NaN (or `xs` is empty).
fn argmax_slice(xs: &[f32]) -> Option<(usize, f32)> {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let v = sanitize(c[j]);
            lanes[j] = if v > lanes[j] { v } else { lanes[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rem) {
        let v = sanitize(v);
        if v > m {
            m = v;
        }
    }
    if m == f32::NEG_INFINITY {
        return None;
    }
    xs.iter().position(|&x| sanitize(x) == m).map(|i| (i, m))
}

/// Iterates the penalized, sanitized logits in id order, merging with the
/// sorted `(id, count)` list.
fn for_each_logit(cfg: &SamplerConfig, logits: &[f32], counts: &[(u32, u32)], mut f: impl FnMut(u32, f32)) {
    let mut next = counts.iter().peekable();
    for (i, &l) in logits.iter().enumerate() {
        let mut l = l;
        if let Some(&&(id, c)) = next.peek()
            && id as usize == i
        {
            next.next();
            l = penalize(cfg, l, c);
        }
        f(i as u32, sanitize(l));
    }
}

/// Applies the penalties for a token seen `count > 0` times in the window.
#[inline]
fn penalize(cfg: &SamplerConfig, mut l: f32, count: u32) -> f32 {
    let rep = cfg.repetition_penalty;
    if rep != 1.0 {
        l = if l > 0.0 { l / rep } else { l * rep };
    }
    l - (count as f32 * cfg.frequency_penalty + cfg.presence_penalty)
}

impl Sampler {
    /// Validates `cfg` and seeds the RNG with `cfg.seed`.
    pub fn new(cfg: SamplerConfig) -> Result<Sampler, SamplingError> {
        cfg.validate()?;
        let rng = Rng::new(cfg.seed);
        Ok(Sampler { cfg, rng, positional: false })
    }

    /// A sampler whose draw for the token at position `p` uses a uniform that depends only on
    /// `(seed, p)` (counter-based, see [`Rng::at`]), not on how many draws came before.
    ///
    /// Plain decoding, speculative decoding (the SpecExec rule draws the target's token at each
    /// position exactly once along the emitted path) and a verifying tail that also worked on
    /// rounds later rolled back all produce the *same* sampled text for the same seed. Each draw
    /// is still uniform and independent of the logits, so every token keeps exactly the target's
    /// distribution.
    pub fn positional(cfg: SamplerConfig) -> Result<Sampler, SamplingError> {
        Ok(Sampler { positional: true, ..Sampler::new(cfg)? })
    }

    pub fn is_positional(&self) -> bool {
        self.positional
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    pub fn rng_mut(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Sorted `(id, count)` over the penalty window; empty when penalties are off.
    fn counts(&self, vocab: usize, history: &[u32]) -> Vec<(u32, u32)> {
        if !self.cfg.has_penalties() || history.is_empty() {
            return Vec::new();
        }
        let start = history.len().saturating_sub(self.cfg.penalty_last_n);
        let mut ids: Vec<u32> = history[start..].iter().copied().filter(|&t| (t as usize) < vocab).collect();
        ids.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::new();
        for t in ids {
            match out.last_mut() {
                Some((id, c)) if *id == t => *c += 1,
                _ => out.push((t, 1)),
            }
        }
        out
    }

    /// The logits after penalties and sanitizing (NaN -> -inf, +inf -> f32::MAX),
    /// i.e. step 1-2 of the chain. Mostly useful for tests and debugging.
    pub fn penalized_logits(&self, logits: &[f32], history: &[u32]) -> Vec<f32> {
        let counts = self.counts(logits.len(), history);
        let mut out = Vec::with_capacity(logits.len());
        for_each_logit(&self.cfg, logits, &counts, |_, l| out.push(l));
        out
    }

    /// Argmax of the penalized logits (ties -> lowest id; all -inf -> 0). O(V):
    /// vectorizable scans over the runs between penalized ids, which are
    /// handled one by one, in id order.
    fn argmax(&self, logits: &[f32], counts: &[(u32, u32)]) -> u32 {
        let mut best = 0usize;
        let mut best_l = f32::NEG_INFINITY;
        let mut start = 0usize;
        for &(id, c) in counts {
            let id = id as usize;
            if let Some((i, l)) = argmax_slice(&logits[start..id])
                && l > best_l
            {
                (best, best_l) = (start + i, l);
            }
            let l = sanitize(penalize(&self.cfg, logits[id], c));
            if l > best_l {
                (best, best_l) = (id, l);
            }
            start = id + 1;
        }
        if let Some((i, l)) = argmax_slice(&logits[start..])
            && l > best_l
        {
            best = start + i;
        }
        best as u32
    }

    /// Applies the whole chain to `logits` (length = vocabulary) given `history`
    /// (prompt + generated ids, for the penalties). Consumes no randomness.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Distribution {
        let cfg = &self.cfg;
        let counts = self.counts(logits.len(), history);
        if cfg.is_greedy() {
            return Distribution::single(self.argmax(logits, &counts));
        }

        // Max of the penalized logits.
        let mut m = f32::NEG_INFINITY;
        for_each_logit(cfg, logits, &counts, |_, l| m = m.max(l));
        if m == f32::NEG_INFINITY {
            return Distribution::single(0);
        }

        // Temperature (+ pruning of exact zeros).
        let t = cfg.temperature;
        let mut cands: Vec<u64> = Vec::with_capacity(logits.len());
        for_each_logit(cfg, logits, &counts, |i, l| {
            let d = l - m;
            let s = if d == 0.0 { 0.0 } else { d / t };
            if s >= PRUNE_S {
                cands.push(key(s, i));
            }
        });
        // cands is non-empty: the max token has s == 0.

        // Top-k.
        if cfg.top_k > 0 && cfg.top_k < cands.len() {
            cands.select_nth_unstable(cfg.top_k - 1);
            cands.truncate(cfg.top_k);
        }

        let w = |k: u64| f64::from(key_s(k)).exp();

        // Top-p and min-p both keep a prefix of the sorted candidates.
        let top_p_on = cfg.top_p < 1.0;
        if top_p_on || cfg.min_p > 0.0 {
            let z: f64 = if top_p_on { cands.iter().map(|&k| w(k)).sum() } else { 0.0 };
            // Min-p first: it is a prefix filter and does not depend on Z.
            if cfg.min_p > 0.0 {
                let min_p = f64::from(cfg.min_p);
                cands.retain(|&k| w(k) >= min_p);
            }
            if top_p_on {
                let target = f64::from(cfg.top_p) * z;
                let keep = nucleus_len(&mut cands, target, &w);
                cands.truncate(keep);
            }
        }

        // Renormalize and sort (by probability, ties by id).
        let z: f64 = cands.iter().map(|&k| w(k)).sum();
        let mut out: Vec<u64> = Vec::with_capacity(cands.len());
        for &k in &cands {
            let p = (w(k) / z) as f32;
            if p > 0.0 {
                out.push((u64::from(!p.to_bits()) << 32) | u64::from(key_id(k)));
            }
        }
        if out.is_empty() {
            // Unreachable in practice (the max token has w = 1); never panic.
            return Distribution::single(key_id(cands[0]));
        }
        out.sort_unstable();
        let tokens = out.iter().map(|&k| k as u32).collect();
        let probs = out.iter().map(|&k| f32::from_bits(!((k >> 32) as u32))).collect();
        Distribution { tokens, probs }
    }

    /// Draws one token. Greedy: O(V) argmax, no randomness consumed and no
    /// allocation beyond the penalty counts. Otherwise exactly
    /// `self.sample_from(&self.distribution(logits, history))`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.cfg.is_greedy() {
            let counts = self.counts(logits.len(), history);
            return self.argmax(logits, &counts);
        }
        let dist = self.distribution(logits, history);
        self.sample_at(&dist, history.len())
    }

    /// Draws the token at `position` (= the length of the history before it) from `dist`: like
    /// [`Sampler::sample_from`], except that a positional sampler takes its uniform from
    /// `(seed, position)`.
    pub fn sample_at(&mut self, dist: &Distribution, position: usize) -> u32 {
        if self.cfg.is_greedy() || !self.positional {
            return self.sample_from(dist);
        }
        dist.inverse_cdf(Rng::at(self.cfg.seed, position as u64).next_f64())
    }

    /// Draws from `dist` by inverse CDF with exactly one `next_f64()`; a greedy
    /// sampler returns `dist.tokens[0]` (its most probable token) without
    /// consuming randomness. An empty distribution yields 0.
    pub fn sample_from(&mut self, dist: &Distribution) -> u32 {
        if self.cfg.is_greedy() {
            return dist.tokens.first().copied().unwrap_or(0);
        }
        let u = self.rng.next_f64();
        dist.inverse_cdf(u)
    }
}

/// Length of the smallest prefix (in key order) of `cands` whose cumulative
/// weight reaches `target`, at least 1; reorders `cands` so that this prefix
/// is sorted and in front. Avoids a full sort by growing a selected prefix.
fn nucleus_len(cands: &mut [u64], target: f64, w: &impl Fn(u64) -> f64) -> usize {
    let n = cands.len();
    let mut sorted = 0usize; // cands[..sorted] are the `sorted` best, in order
    let mut cum = 0.0f64;
    let mut chunk = 256usize;
    while sorted < n {
        let end = (sorted + chunk).min(n);
        let rest = &mut cands[sorted..];
        if end < n {
            rest.select_nth_unstable(end - sorted - 1);
        }
        cands[sorted..end].sort_unstable();
        for (i, &k) in cands[sorted..end].iter().enumerate() {
            cum += w(k);
            if cum >= target {
                return sorted + i + 1;
            }
        }
        sorted = end;
        chunk = chunk.saturating_mul(4);
    }
    n.max(1)
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
