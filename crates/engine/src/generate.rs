//! Plain (non-speculative) generation on a whole model: the reference every other path is
//! compared with.

use std::time::{Duration, Instant};

use crate::error::EngineError;
use crate::model::{Batch, ModelSlice, StepInput, Want};
use crate::sampling::Sampler;

/// Timing and counts of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
}

impl GenerateStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        per_s(self.prompt_tokens, self.prefill)
    }

    /// Decode rate: tokens after the first (which the prefill produced) over decode time.
    pub fn decode_tokens_per_s(&self) -> f64 {
        per_s(self.generated_tokens.saturating_sub(1), self.decode)
    }
}

fn per_s(n: usize, d: Duration) -> f64 {
    if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced (it is included in the output).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// Generate up to `max_tokens` tokens after `prompt` with `sampler`.
///
/// `on_token` sees each new token as it is produced and returns `false` to stop early. The KV
/// budget is `prompt.len() + max_tokens`, so an over-long request fails before any compute.
pub fn generate(
    model: &ModelSlice,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, FinishReason, GenerateStats), EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::BadBatch { reason: "empty prompt".into() });
    }
    let ctx = model.config().context_len;
    if prompt.len() + max_tokens > ctx {
        return Err(EngineError::ContextExceeded { needed: prompt.len() + max_tokens, context: ctx });
    }
    let mut kv = model.new_cache(prompt.len() + max_tokens);
    let mut history = prompt.to_vec();
    let mut out = Vec::with_capacity(max_tokens);
    let mut stats = GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    if max_tokens == 0 {
        return Ok((out, FinishReason::Length, stats));
    }

    let t0 = Instant::now();
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let batch = Batch { input: StepInput::Tokens(prompt), positions: &positions, tree_parents: None };
    let mut logits = model.forward(&mut kv, &batch, Want::LastLogits)?.into_data();
    stats.prefill = t0.elapsed();

    let t1 = Instant::now();
    let finish = loop {
        let tok = sampler.sample(&logits, &history);
        out.push(tok);
        history.push(tok);
        if stop_ids.contains(&tok) {
            break FinishReason::Stop;
        }
        if !on_token(tok) {
            break FinishReason::Cancelled;
        }
        if out.len() == max_tokens {
            break FinishReason::Length;
        }
        let pos = [kv.len() as u32];
        let batch = Batch { input: StepInput::Tokens(&[tok]), positions: &pos, tree_parents: None };
        logits = model.forward(&mut kv, &batch, Want::LastLogits)?.into_data();
    };
    stats.decode = t1.elapsed();
    stats.generated_tokens = out.len();
    Ok((out, finish, stats))
}
