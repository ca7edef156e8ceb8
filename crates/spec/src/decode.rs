//! The speculative generation loop and its KV bookkeeping.
//!
//! Each round: the drafter proposes a tree after the committed sequence; the target runs the root
//! (the last committed token, not yet in its cache) and the tree as one tree batch; the verifier
//! walks the tree with the target's sampler; the target's cache keeps exactly the root and the
//! accepted path (`KvCache::accept_path`), and the target's own next token becomes the next root.

use std::time::{Duration, Instant};

use specswarm_engine::EngineError;
use specswarm_engine::generate::FinishReason;
use specswarm_engine::model::{Batch, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::Sampler;

use crate::SpecError;
use crate::drafter::Drafter;
use crate::policy::Policy;
use crate::verify::verify_tree;

/// Counts and timings of one speculative generation.
#[derive(Clone, Debug, Default)]
pub struct SpecStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub rounds: usize,
    /// Draft tree nodes sent to the target.
    pub drafted_nodes: usize,
    /// Draft tokens the target accepted.
    pub accepted_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
    pub draft: Duration,
    pub verify: Duration,
}

impl SpecStats {
    /// Accepted draft tokens over drafted nodes.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted_nodes == 0 { 0.0 } else { self.accepted_tokens as f64 / self.drafted_nodes as f64 }
    }

    /// Generated tokens per verification round.
    pub fn tokens_per_round(&self) -> f64 {
        if self.rounds == 0 { 0.0 } else { self.generated_tokens as f64 / self.rounds as f64 }
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        let s = self.decode.as_secs_f64();
        if s == 0.0 { 0.0 } else { self.generated_tokens as f64 / s }
    }

    pub fn prefill_tokens_per_s(&self) -> f64 {
        let s = self.prefill.as_secs_f64();
        if s == 0.0 { 0.0 } else { self.prompt_tokens as f64 / s }
    }
}

/// Generate up to `max_tokens` tokens after `prompt` with speculative decoding.
///
/// Lossless: with a greedy sampler the output is token-for-token [`specswarm_engine::generate::generate`]'s;
/// with a stochastic one each token is drawn from the target's distribution.
pub fn generate_speculative(
    target: &ModelSlice,
    drafter: &mut dyn Drafter,
    policy: &mut Policy,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, FinishReason, SpecStats), SpecError> {
    if prompt.is_empty() {
        return Err(EngineError::BadBatch { reason: "empty prompt".into() }.into());
    }
    let budget0 = policy.next_budget();
    budget0.validate()?;
    let cfg = target.config();
    let (vocab, ctx) = (cfg.vocab_size, cfg.context_len);
    if prompt.len() + max_tokens > ctx {
        return Err(EngineError::ContextExceeded { needed: prompt.len() + max_tokens, context: ctx }.into());
    }
    let max_nodes = match policy.mode() {
        crate::policy::PolicyMode::Fixed(b) => b.max_nodes,
        crate::policy::PolicyMode::Adaptive { max_nodes, .. } => *max_nodes,
    };
    let mut kv = target.new_cache(prompt.len() + max_tokens + max_nodes + 1);
    let mut stats = SpecStats { prompt_tokens: prompt.len(), ..Default::default() };
    let mut seq = prompt.to_vec();
    let mut out = Vec::with_capacity(max_tokens);
    if max_tokens == 0 {
        return Ok((out, FinishReason::Length, stats));
    }

    let t0 = Instant::now();
    if prompt.len() > 1 {
        let body = &prompt[..prompt.len() - 1];
        let pos: Vec<u32> = (0..body.len() as u32).collect();
        target.forward(
            &mut kv,
            &Batch { input: StepInput::Tokens(body), positions: &pos, tree_parents: None },
            Want::Hidden,
        )?;
    }
    stats.prefill = t0.elapsed();

    let t1 = Instant::now();
    let finish = 'rounds: loop {
        let budget = policy.next_budget();
        let td = Instant::now();
        let mut tree = drafter.propose(&seq, &budget)?;
        let draft_s = td.elapsed();
        // Never send more than the budget or past the request's end.
        let room = (max_tokens - out.len()).saturating_sub(1);
        let keep_nodes: Vec<usize> =
            (0..tree.len()).filter(|&i| i < budget.max_nodes && tree.depth(i) <= room).collect();
        if keep_nodes.len() != tree.len() {
            tree = tree.prune(&keep_nodes);
        }
        let root = *seq.last().expect("sequence is never empty");
        let tokens = tree.batch_tokens(root);
        let positions = tree.batch_positions(kv.len());
        let parents = tree.batch_parents();
        let tv = Instant::now();
        let logits = target
            .forward(
                &mut kv,
                &Batch { input: StepInput::Tokens(&tokens), positions: &positions, tree_parents: Some(&parents) },
                Want::AllLogits,
            )?
            .into_data();
        let verdict = verify_tree(&tree, &logits, vocab, &seq, sampler);
        let mut path = vec![0usize];
        path.extend(verdict.accepted.iter().map(|&i| i + 1));
        kv.accept_path(&path)?;
        let verify_s = tv.elapsed();

        stats.rounds += 1;
        stats.drafted_nodes += tree.len();
        stats.accepted_tokens += verdict.accepted.len();
        stats.draft += draft_s;
        stats.verify += verify_s;
        let depth = (0..tree.len()).map(|i| tree.depth(i)).max().unwrap_or(0);
        policy.record(depth, verdict.accepted.len(), draft_s.as_secs_f64(), tokens.len(), verify_s.as_secs_f64());

        let new: Vec<u32> = verdict.accepted.iter().map(|&i| tree.tokens[i]).chain([verdict.next]).collect();
        for tok in new {
            out.push(tok);
            seq.push(tok);
            if stop_ids.contains(&tok) {
                break 'rounds FinishReason::Stop;
            }
            if !on_token(tok) {
                break 'rounds FinishReason::Cancelled;
            }
            if out.len() == max_tokens {
                break 'rounds FinishReason::Length;
            }
        }
        drafter.observe(&seq);
    };
    stats.decode = t1.elapsed();
    stats.generated_tokens = out.len();
    drafter.finish(&out);
    Ok((out, finish, stats))
}
