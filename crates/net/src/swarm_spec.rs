//! Speculative decoding across a ring: the client drafts, the ring verifies, the tail decides.
//!
//! Each round is one traversal of a [`DirectRing`]: the client sends `[root, draft nodes…]`
//! (a chain or a tree) to the head with the commit of the previous round; every stage applies the
//! commit (keep a tree path, or roll back to a length), runs its layers and forwards; the tail
//! verifies with the SpecExec rule and the request's sampler (positional randomness, see
//! [`specswarm_engine::sampling::Sampler::positional`]) and sends only a [`Message::Verdict`]
//! (accepted node indices and its own next token) straight back to the client. Lossless: greedy
//! output is the target's greedy output, sampled output is the target's sampled output for the
//! same seed, token for token.
//!
//! **Pipelining.** With `depth_max > 1` the client does not wait: it assumes the round in flight
//! will accept its *spine* whole (the drafter's most likely path, first child at every level: the
//! whole chain for a chain) and that the target's next token will be the drafter's guess after
//! the spine, and sends the round after it built on that assumption. That round carries what
//! every stage must keep of the one before: `Commit::Keep` after a chain (its rows sit at their
//! final positions already), `Commit::Path(root + spine)` after a tree (the other branches are
//! dropped, the spine compacted behind the committed prefix). Up to `depth` rounds are in
//! flight; the policy's budget (tree size, depth, branching) applies to each as to a lone round.
//! A verdict that breaks the assumption makes every later round stale: the client starts a new
//! epoch and rolls every stage back with `Commit::Len(base + 1 + common)`, where `common` is how
//! far the accepted path follows the spine (the stages committed the spine through the first
//! stale round's commit); accepted tokens beyond that point (a branch off the spine, whose rows
//! the stages dropped) are sent again as a plain causal batch that carries its tokens to the
//! tail, which thus keeps the exact token history its sampler and penalties read. Frames
//! travel the ring in order, so stale rounds are always overtaken by the rollback, never the
//! other way round; verdicts of older epochs are dropped. With nothing in flight, a tree round's
//! verdict is committed as at depth 1 (`Commit::Path(accepted)`). The depth adapts: it follows
//! the measured probability `s` that a round survives whole, as the expected run of survivals
//! `s / (1 − s)` (pipelining only pays when in-flight rounds usually survive).
//!
//! **Failover.** If a stage dies or stalls (every wait is bounded by the ring's timeout), the
//! caller's `spares` names a replacement for that stage's span; the client reconnects, reopens
//! the session everywhere, replays the committed tokens to rebuild the KV caches, and continues.
//! The tail's randomness depends only on (seed, position), so the output is unchanged.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use specswarm_engine::generate::FinishReason;
use specswarm_engine::sampling::SamplerConfig;
use specswarm_proto::wire::{Commit, Message, SpecRound, VerifySpec};
use specswarm_spec::drafter::{DraftBudget, Drafter};
use specswarm_spec::policy::{Policy, PolicyMode};
use specswarm_spec::tree::DraftTree;

use crate::direct::DirectRing;
use crate::ring::{RingError, RingSpec};

/// How a speculative request runs through the ring.
#[derive(Clone, Debug)]
pub struct SwarmSpecSettings {
    /// Most rounds in flight (1: wait for each verdict).
    pub depth_max: usize,
    /// Adapt the depth to the measured survival rate (otherwise always `depth_max`).
    pub adaptive_depth: bool,
    /// Failovers allowed per request.
    pub failovers_max: usize,
}

impl Default for SwarmSpecSettings {
    fn default() -> Self {
        SwarmSpecSettings { depth_max: 1, adaptive_depth: true, failovers_max: 3 }
    }
}

/// Counts and timings of one request.
#[derive(Clone, Debug, Default)]
pub struct SwarmSpecStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Verdicts used (stale ones excluded).
    pub rounds: usize,
    /// Rounds sent whose verdicts came back stale (wasted by a broken pipeline assumption).
    pub stale_rounds: usize,
    pub drafted_nodes: usize,
    pub accepted_tokens: usize,
    /// Verdicts whose `next` token was not among the tokens already sent (the target's token
    /// missed the drafts): each costs at least one traversal.
    pub misses: usize,
    pub failovers: usize,
    /// Sum and count of send → verdict times of the rounds used, the first excluded (it waits
    /// for the prompt's prefill).
    pub traversal_s_sum: f64,
    pub timed_rounds: usize,
    pub decode: Duration,
    /// From the start of the request to the first verdict (session open and prompt prefill
    /// included): the "prefill" of a swarm request.
    pub time_to_first_token: Duration,
    /// When the request started (for `time_to_first_token`).
    pub started: Option<Instant>,
    /// Mean pipeline depth over rounds sent.
    pub depth_sum: usize,
    pub rounds_sent: usize,
    /// Seconds the client spent drafting (outside the ring's traversals unless pipelined).
    pub draft_s_sum: f64,
    /// Accepted tokens sent again after a pipeline rollback (a branch off a tree round's spine).
    pub replayed_tokens: usize,
}

impl SwarmSpecStats {
    /// Tokens after the first over the time after the first (the first verdict pays for opening
    /// the session and the prompt), like plain decoding's decode rate.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let s = self.decode.saturating_sub(self.time_to_first_token).as_secs_f64();
        if s == 0.0 { 0.0 } else { self.generated_tokens.saturating_sub(1) as f64 / s }
    }

    /// Probability that the target's token was among those sent (DESIGN §3's `a`).
    pub fn acceptance_rate(&self) -> f64 {
        if self.generated_tokens == 0 { 0.0 } else { 1.0 - self.misses as f64 / self.generated_tokens as f64 }
    }

    /// Accepted draft tokens over drafted nodes.
    pub fn draft_acceptance(&self) -> f64 {
        if self.drafted_nodes == 0 { 0.0 } else { self.accepted_tokens as f64 / self.drafted_nodes as f64 }
    }

    pub fn tokens_per_round(&self) -> f64 {
        if self.rounds == 0 { 0.0 } else { self.generated_tokens as f64 / self.rounds as f64 }
    }

    /// Mean send → verdict time of one round (seconds).
    pub fn traversal_s(&self) -> f64 {
        if self.timed_rounds == 0 { 0.0 } else { self.traversal_s_sum / self.timed_rounds as f64 }
    }

    pub fn mean_depth(&self) -> f64 {
        if self.rounds_sent == 0 { 0.0 } else { self.depth_sum as f64 / self.rounds_sent as f64 }
    }
}

/// Why a swarm request failed.
#[derive(Debug, thiserror::Error)]
pub enum SwarmSpecError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Spec(#[from] specswarm_spec::SpecError),
    #[error("{0}")]
    Invalid(String),
    #[error("stage {stage} failed and no replacement is available: {cause}")]
    NoReplacement { stage: usize, cause: RingError },
}

/// A round in flight.
struct Round {
    seq: u32,
    sent: Instant,
    /// KV rows committed before this round (the root's position).
    base: usize,
    tree: DraftTree,
    /// A causal chain batch (rows committed as they run) rather than a tree batch.
    causal: bool,
    /// The path of nodes the next round assumes accepted (the drafter's most likely path; the
    /// whole chain for a chain), node indices from the root's child down. Empty when nothing is
    /// assumed.
    spine: Vec<usize>,
    /// The token assumed to follow the spine (the next round's root), if any.
    assumed: Option<u32>,
    /// Seconds the drafter spent proposing this round.
    draft_s: f64,
}

/// A ring the speculative client drives, over any transport: frames go to the head, replies
/// come back from any stage (the tail's verdicts, errors). Implemented over TCP by
/// [`TcpSpecRing`] and over libp2p streams by the p2p crate.
pub trait SpecRing {
    /// (Re)connect every stage and open a fresh speculative session on all of them.
    fn open_session(&mut self, kv_tokens: u32, verify: VerifySpec) -> Result<(), RingError>;
    /// Send a round (or a plain causal batch carrying its tokens) to the head; its seq.
    fn send_round(
        &mut self,
        positions: &[u32],
        tree_parents: Option<&[i32]>,
        spec: SpecRound,
    ) -> Result<u32, RingError>;
    /// The next frame of this session from any stage, waiting until `deadline`.
    fn next_frame(&mut self, deadline: Instant) -> Result<(usize, specswarm_proto::wire::Frame), RingError>;
    fn epoch(&self) -> u32;
    fn bump_epoch(&mut self);
    fn stages(&self) -> usize;
    /// How long one reply may take.
    fn timeout(&self) -> Duration;
    /// Close the session everywhere (best effort).
    fn close_session(&mut self);
    /// After `cause`: replace the stage(s) that failed so that [`SpecRing::open_session`] can
    /// rebuild the ring; an error when no replacement exists.
    fn repair(&mut self, cause: &RingError) -> Result<(), SwarmSpecError>;
}

/// Everything needed to (re)build a TCP ring.
#[derive(Clone, Debug)]
pub struct RingPlan {
    pub addrs: Vec<SocketAddr>,
    pub spec: RingSpec,
    pub session: u64,
    pub timeout: Duration,
}

/// [`SpecRing`] over TCP workers at known addresses, with spares handed out by a callback.
pub struct TcpSpecRing<'a> {
    pub plan: &'a mut RingPlan,
    pub spares: &'a mut dyn FnMut(usize) -> Option<SocketAddr>,
    ring: Option<DirectRing>,
}

impl<'a> TcpSpecRing<'a> {
    pub fn new(plan: &'a mut RingPlan, spares: &'a mut dyn FnMut(usize) -> Option<SocketAddr>) -> TcpSpecRing<'a> {
        TcpSpecRing { plan, spares, ring: None }
    }

    fn ring(&mut self) -> Result<&mut DirectRing, RingError> {
        self.ring.as_mut().ok_or(RingError::Unreachable { stage: 0, reason: "the ring is not open".into() })
    }
}

impl SpecRing for TcpSpecRing<'_> {
    fn open_session(&mut self, kv_tokens: u32, verify: VerifySpec) -> Result<(), RingError> {
        self.ring = None;
        let p = &self.plan;
        let mut ring = DirectRing::connect(&p.addrs, p.spec.clone(), p.session, p.timeout)
            .map_err(|e| RingError::Unreachable { stage: 0, reason: e.to_string() })?;
        ring.open_speculative(kv_tokens, verify)?;
        self.ring = Some(ring);
        Ok(())
    }

    fn send_round(
        &mut self,
        positions: &[u32],
        tree_parents: Option<&[i32]>,
        spec: SpecRound,
    ) -> Result<u32, RingError> {
        self.ring()?.send_round(positions, tree_parents, spec)
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<(usize, specswarm_proto::wire::Frame), RingError> {
        self.ring()?.next_frame(deadline)
    }

    fn epoch(&self) -> u32 {
        self.ring.as_ref().map_or(0, DirectRing::epoch)
    }

    fn bump_epoch(&mut self) {
        if let Some(r) = self.ring.as_mut() {
            r.bump_epoch();
        }
    }

    fn stages(&self) -> usize {
        self.plan.addrs.len()
    }

    fn timeout(&self) -> Duration {
        self.plan.timeout
    }

    fn close_session(&mut self) {
        if let Some(mut r) = self.ring.take() {
            let _ = r.close();
        }
    }

    fn repair(&mut self, cause: &RingError) -> Result<(), SwarmSpecError> {
        self.ring = None;
        // The stage that does not accept connections any more; if all do (a stall), the one the
        // error names.
        let dead = self
            .plan
            .addrs
            .iter()
            .position(|a| TcpStream::connect_timeout(a, Duration::from_millis(500)).is_err())
            .unwrap_or(match cause {
                RingError::Unreachable { stage, .. }
                | RingError::Refused { stage, .. }
                | RingError::Unexpected { stage }
                | RingError::Wire { stage, .. } => *stage,
            });
        let Some(addr) = (self.spares)(dead) else {
            return Err(SwarmSpecError::NoReplacement { stage: dead, cause: cause.clone() });
        };
        self.plan.addrs[dead] = addr;
        self.plan.session = self.plan.session.wrapping_add(0x9E37_79B9);
        Ok(())
    }
}

/// [`generate_on_ring`] over TCP workers at `plan.addrs`. `spares(stage)` names a replacement
/// worker for a stage that failed (`None`: give up).
pub fn generate_swarm_speculative(
    plan: &mut RingPlan,
    drafter: &mut dyn Drafter,
    policy: &mut Policy,
    settings: &SwarmSpecSettings,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &SamplerConfig,
    stop_ids: &[u32],
    spares: &mut dyn FnMut(usize) -> Option<SocketAddr>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, FinishReason, SwarmSpecStats), SwarmSpecError> {
    let mut ring = TcpSpecRing::new(plan, spares);
    generate_on_ring(&mut ring, drafter, policy, settings, prompt, max_tokens, sampler, stop_ids, on_token)
}

/// Generate up to `max_tokens` tokens after `prompt` through `ring`, speculatively (see the
/// module docs), repairing the ring and replaying the committed tokens after a failure.
pub fn generate_on_ring(
    ring: &mut dyn SpecRing,
    drafter: &mut dyn Drafter,
    policy: &mut Policy,
    settings: &SwarmSpecSettings,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &SamplerConfig,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, FinishReason, SwarmSpecStats), SwarmSpecError> {
    if prompt.is_empty() {
        return Err(SwarmSpecError::Invalid("empty prompt".into()));
    }
    if settings.depth_max == 0 {
        return Err(SwarmSpecError::Invalid("pipeline depth must be at least 1".into()));
    }
    policy.next_budget().validate()?;
    sampler.validate().map_err(|e| SwarmSpecError::Invalid(e.to_string()))?;
    let max_nodes = match policy.mode() {
        PolicyMode::Fixed(b) => b.max_nodes,
        PolicyMode::Adaptive { max_nodes, .. } => *max_nodes,
    };
    let kv_tokens = prompt.len() + max_tokens + settings.depth_max * (max_nodes + 2) + 1;
    let verify = verify_spec(sampler);

    let mut stats = SwarmSpecStats { prompt_tokens: prompt.len(), ..Default::default() };
    let mut state = State { seq: prompt.to_vec(), out: Vec::with_capacity(max_tokens), finish: None };
    if max_tokens == 0 {
        return Ok((state.out, FinishReason::Length, stats));
    }
    let t0 = Instant::now();
    stats.started = Some(t0);
    loop {
        let result =
            open_and_replay(ring, kv_tokens, &verify, &state.seq).map_err(SwarmSpecError::Ring).and_then(|()| {
                run_rounds(ring, drafter, policy, settings, max_tokens, stop_ids, &mut state, &mut stats, on_token)
            });
        match result {
            Ok(()) => {
                // Every token is out: closing the sessions is cleanup, not decoding time.
                stats.decode = t0.elapsed();
                ring.close_session();
                break;
            }
            Err(SwarmSpecError::Ring(e)) => {
                if stats.failovers >= settings.failovers_max {
                    ring.close_session();
                    return Err(SwarmSpecError::Ring(e));
                }
                stats.failovers += 1;
                ring.repair(&e)?;
            }
            Err(e) => {
                ring.close_session();
                return Err(e);
            }
        }
    }
    stats.generated_tokens = state.out.len();
    drafter.finish(&state.out);
    let finish = state.finish.unwrap_or(FinishReason::Length);
    Ok((state.out, finish, stats))
}

struct State {
    /// Prompt and every committed output token; its last token is the next round's root.
    seq: Vec<u32>,
    out: Vec<u32>,
    finish: Option<FinishReason>,
}

impl State {
    /// Commit one token; false once the request is finished.
    fn push(&mut self, tok: u32, max_tokens: usize, stop_ids: &[u32], on_token: &mut dyn FnMut(u32) -> bool) -> bool {
        self.out.push(tok);
        self.seq.push(tok);
        if stop_ids.contains(&tok) {
            self.finish = Some(FinishReason::Stop);
        } else if !on_token(tok) {
            self.finish = Some(FinishReason::Cancelled);
        } else if self.out.len() == max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        self.finish.is_none()
    }
}

fn verify_spec(s: &SamplerConfig) -> VerifySpec {
    VerifySpec {
        temperature: s.temperature,
        top_k: s.top_k.min(u32::MAX as usize) as u32,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        penalty_last_n: s.penalty_last_n.min(u32::MAX as usize) as u32,
        seed: s.seed,
    }
}

/// Open the session everywhere and send the committed tokens but the last (the next root) as
/// plain causal batches that carry their tokens to the tail.
fn open_and_replay(
    ring: &mut dyn SpecRing,
    kv_tokens: usize,
    verify: &VerifySpec,
    seq: &[u32],
) -> Result<(), RingError> {
    ring.open_session(kv_tokens as u32, verify.clone())?;
    let body = &seq[..seq.len() - 1];
    for (i, chunk) in body.chunks(specswarm_proto::limits::FORWARD_BATCH_TOKENS_MAX).enumerate() {
        let start = i * specswarm_proto::limits::FORWARD_BATCH_TOKENS_MAX;
        let positions: Vec<u32> = (start as u32..(start + chunk.len()) as u32).collect();
        ring.send_round(&positions, None, SpecRound { tokens: chunk.to_vec(), commit: Commit::Keep, verify: false })?;
    }
    Ok(())
}

/// Rounds until the request finishes. A ring failure returns `Err(Ring)` with `state` holding
/// every token committed so far.
#[allow(clippy::too_many_arguments)]
fn run_rounds(
    ring: &mut dyn SpecRing,
    drafter: &mut dyn Drafter,
    policy: &mut Policy,
    settings: &SwarmSpecSettings,
    max_tokens: usize,
    stop_ids: &[u32],
    state: &mut State,
    stats: &mut SwarmSpecStats,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(), SwarmSpecError> {
    let pipelined = settings.depth_max > 1;
    let mut in_flight: VecDeque<Round> = VecDeque::new();
    // Commit the next round sent must carry (when nothing is in flight).
    let mut pending = Commit::Keep;
    // EMA of the probability that a round survives whole (its assumption holds).
    let mut survival = 0.5f64;
    loop {
        // Fill the pipeline.
        let depth = if !pipelined {
            1
        } else if settings.adaptive_depth {
            let run = survival / (1.0 - survival).max(1e-3);
            (1.0 + run).floor().clamp(1.0, settings.depth_max as f64) as usize
        } else {
            settings.depth_max
        };
        while in_flight.len() < depth {
            // The speculative sequence: committed tokens plus what in-flight rounds assume.
            let mut spec_seq = state.seq.clone();
            for r in &in_flight {
                match r.assumed {
                    Some(a) => {
                        spec_seq.extend(r.spine.iter().map(|&i| r.tree.tokens[i]));
                        spec_seq.push(a);
                    }
                    None => unreachable!("a round without an assumption is always the last in flight"),
                }
            }
            let speculated = spec_seq.len() - state.seq.len();
            let room = max_tokens.saturating_sub(state.out.len() + speculated);
            if room == 0 {
                break;
            }
            let budget = policy.next_budget();
            let drafting = Instant::now();
            let (tree, spine, assumed) = if pipelined {
                draft_pipelined(drafter, &spec_seq, &budget, room)?
            } else {
                let tree = drafter.propose(&spec_seq, &budget)?;
                let room = room - 1;
                let keep: Vec<usize> =
                    (0..tree.len()).filter(|&i| i < budget.max_nodes && tree.depth(i) <= room).collect();
                (if keep.len() == tree.len() { tree } else { tree.prune(&keep) }, Vec::new(), None)
            };
            let draft_s = drafting.elapsed().as_secs_f64();
            let causal = tree.is_chain();
            let root = *spec_seq.last().expect("never empty");
            let base = spec_seq.len() - 1;
            let tokens = tree.batch_tokens(root);
            let positions = tree.batch_positions(base);
            let parents = (!causal).then(|| tree.batch_parents());
            // What every stage keeps of the previous round before running this one: what this
            // round is built on.
            let commit = match in_flight.back() {
                None => std::mem::replace(&mut pending, Commit::Keep),
                Some(prev) => prev.assumed_commit(),
            };
            let seq = ring.send_round(&positions, parents.as_deref(), SpecRound { tokens, commit, verify: true })?;
            stats.rounds_sent += 1;
            stats.depth_sum += in_flight.len() + 1;
            stats.drafted_nodes += tree.len();
            stats.draft_s_sum += draft_s;
            let stop = assumed.is_none();
            in_flight.push_back(Round { seq, sent: Instant::now(), base, tree, causal, spine, assumed, draft_s });
            if stop {
                break;
            }
        }

        // The verdict of the oldest round.
        let round = in_flight.front().expect("a round is in flight");
        let (accepted, next) = wait_verdict(ring, round.seq)?;
        let round = in_flight.pop_front().expect("checked above");
        let traversal_s = round.sent.elapsed().as_secs_f64();
        stats.rounds += 1;
        if stats.rounds == 1 {
            stats.time_to_first_token = stats.started.map_or(Duration::ZERO, |t| t.elapsed());
        } else {
            stats.traversal_s_sum += traversal_s;
            stats.timed_rounds += 1;
        }
        let path_ok = accepted.windows(2).all(|w| round.tree.parents[w[1] as usize] == w[0] as i32)
            && accepted.first().is_none_or(|&c| round.tree.parents.get(c as usize) == Some(&-1))
            && accepted.iter().all(|&i| (i as usize) < round.tree.len());
        if !path_ok {
            return Err(SwarmSpecError::Ring(RingError::Unexpected { stage: ring.stages() - 1 }));
        }
        stats.accepted_tokens += accepted.len();
        let accepted: Vec<usize> = accepted.iter().map(|&i| i as usize).collect();
        let whole = accepted.len() == round.tree.len() && round.causal;
        let survived = round.assumed == Some(next) && accepted == round.spine;
        if !survived {
            stats.misses += 1;
        }
        policy.record(
            (0..round.tree.len()).map(|i| round.tree.depth(i)).max().unwrap_or(0),
            accepted.len(),
            round.draft_s,
            round.tree.len() + 1,
            traversal_s,
        );
        if round.assumed.is_some() {
            survival += 0.2 * (f64::from(u8::from(survived)) - survival);
        }

        let emitted: Vec<u32> = accepted.iter().map(|&i| round.tree.tokens[i]).chain(std::iter::once(next)).collect();
        let mut live = true;
        for tok in emitted {
            if !state.push(tok, max_tokens, stop_ids, on_token) {
                live = false;
                break;
            }
        }
        if !live {
            stats.stale_rounds += in_flight.len();
            return Ok(());
        }
        drafter.observe(&state.seq);
        if survived && !in_flight.is_empty() {
            continue; // the next round in flight was built on exactly this and carries its commit
        }
        if in_flight.is_empty() {
            // Every stage holds this round as it ran: keep what the verdict accepted.
            pending = if !round.causal {
                Commit::Path(std::iter::once(0).chain(accepted.iter().map(|&i| i as u32 + 1)).collect())
            } else if whole {
                Commit::Keep
            } else {
                Commit::Len((round.base + 1 + accepted.len()) as u32)
            };
            continue;
        }
        // The later rounds are stale. By the time the next frame of the new epoch reaches a stage,
        // the stage has run them (frames travel the ring in order), so it keeps this round's root
        // and spine (the first stale round's commit) and whatever the stale rounds committed
        // after it: roll back to where the accepted path leaves the spine, and send the accepted
        // tokens beyond that point again as a plain causal batch that carries its tokens to the
        // tail (whose token mirror then matches the committed sequence exactly).
        stats.stale_rounds += in_flight.len();
        in_flight.clear();
        ring.bump_epoch();
        let common = accepted.iter().zip(&round.spine).take_while(|(a, s)| a == s).count();
        let keep = round.base + 1 + common;
        let replay: Vec<u32> = accepted[common..].iter().map(|&i| round.tree.tokens[i]).collect();
        if replay.is_empty() {
            pending = Commit::Len(keep as u32);
        } else {
            stats.replayed_tokens += replay.len();
            let positions: Vec<u32> = (keep as u32..(keep + replay.len()) as u32).collect();
            let spec = SpecRound { tokens: replay, commit: Commit::Len(keep as u32), verify: false };
            ring.send_round(&positions, None, spec)?;
            pending = Commit::Keep;
        }
    }
}

impl Round {
    /// The commit of the round built on this one: keep the root and the spine.
    fn assumed_commit(&self) -> Commit {
        if !self.causal {
            Commit::Path(std::iter::once(0).chain(self.spine.iter().map(|&i| i as u32 + 1)).collect())
        } else if self.spine.len() == self.tree.len() {
            Commit::Keep // a chain's rows are committed as they run
        } else {
            Commit::Len((self.base + 1 + self.spine.len()) as u32)
        }
    }
}

/// A pipelined round's drafts: the tree within `budget` (depth also within `room`), its spine
/// (the drafter's most likely path: first child at every level) and the drafter's guess of the
/// target's token after the spine, which the next round assumes.
///
/// The drafter is asked for one level and one node more than the budget; the guess is the last
/// node of the proposal's spine, and is not sent (the next round's root is). Siblings of the
/// guess stay in the tree when the depth allows (a spine the drafter cut short): they cannot
/// keep the assumption alive, but they still turn a miss into an accepted token.
fn draft_pipelined(
    drafter: &mut dyn Drafter,
    seq: &[u32],
    budget: &DraftBudget,
    room: usize,
) -> Result<(DraftTree, Vec<usize>, Option<u32>), SwarmSpecError> {
    let gamma = budget.max_depth.min(room);
    let wide = DraftBudget { max_nodes: budget.max_nodes + 1, max_depth: gamma + 1, max_branch: budget.max_branch };
    let proposal = drafter.propose(seq, &wide)?;
    // Within the widened budget whatever the drafter returned (parents precede children, so a
    // prefix keeps every kept node's ancestors).
    let keep: Vec<usize> =
        (0..proposal.len()).filter(|&i| i < wide.max_nodes && proposal.depth(i) <= wide.max_depth).collect();
    let proposal = if keep.len() == proposal.len() { proposal } else { proposal.prune(&keep) };
    let mut path = spine(&proposal);
    let Some(guess) = path.pop() else {
        return Ok((proposal, Vec::new(), None));
    };
    // The guess is a leaf and every node deeper than γ goes with its whole subtree, so `prune`
    // keeps exactly `keep` and a node's new index is its rank in `keep`.
    let keep: Vec<usize> = (0..proposal.len()).filter(|&i| i != guess && proposal.depth(i) <= gamma).collect();
    let tree = proposal.prune(&keep);
    debug_assert_eq!(tree.len(), keep.len());
    let spine = path.iter().map(|i| keep.binary_search(i).expect("spine nodes are kept")).collect();
    Ok((tree, spine, Some(proposal.tokens[guess])))
}

/// The verdict for round `seq` of the current epoch; stale frames are skipped.
fn wait_verdict(ring: &mut dyn SpecRing, seq: u32) -> Result<(Vec<u32>, u32), RingError> {
    let deadline = Instant::now() + ring.timeout();
    loop {
        let (from, frame) = ring.next_frame(deadline)?;
        if frame.epoch < ring.epoch() {
            continue;
        }
        match frame.message {
            Message::Verdict { accepted, next } if frame.seq == seq => return Ok((accepted, next)),
            Message::Error { code, message } => return Err(RingError::Refused { stage: from, code, message }),
            _ => continue, // replies to replays, or verdicts of rounds already given up
        }
    }
}

/// The first chain of a proposal (its spine: first child at every level), as node indices.
fn spine(tree: &DraftTree) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = None;
    while let Some(c) = tree.children(at).next() {
        out.push(c);
        at = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proposes a fixed tree (whatever the budget) and records the budget it was asked for.
    struct Fixed(DraftTree, Option<DraftBudget>);

    impl Drafter for Fixed {
        fn name(&self) -> String {
            "fixed".into()
        }
        fn propose(&mut self, _: &[u32], budget: &DraftBudget) -> Result<DraftTree, specswarm_spec::SpecError> {
            self.1 = Some(*budget);
            Ok(self.0.clone())
        }
    }

    fn tree(nodes: &[(u32, i32)]) -> DraftTree {
        let mut t = DraftTree::default();
        for &(tok, parent) in nodes {
            t.push(tok, parent, 1.0);
        }
        t
    }

    fn round(tree: DraftTree, spine: Vec<usize>) -> Round {
        let causal = tree.is_chain();
        Round { seq: 0, sent: Instant::now(), base: 10, tree, causal, spine, assumed: Some(0), draft_s: 0.0 }
    }

    #[test]
    fn a_pipelined_chain_sends_gamma_tokens_and_assumes_the_next() {
        let mut d = Fixed(DraftTree::chain(&[1, 2, 3, 4, 5]), None);
        let (t, spine, guess) = draft_pipelined(&mut d, &[9], &DraftBudget::chain(4), 100).unwrap();
        assert_eq!(d.1, Some(DraftBudget { max_nodes: 5, max_depth: 5, max_branch: 1 }));
        assert_eq!((t.tokens.as_slice(), spine.as_slice(), guess), (&[1, 2, 3, 4][..], &[0, 1, 2, 3][..], Some(5)));
        assert_eq!(round(t, spine).assumed_commit(), Commit::Keep);
        // Room for two tokens: one drafted, one guessed.
        let (t, spine, guess) = draft_pipelined(&mut d, &[9], &DraftBudget::chain(4), 1).unwrap();
        assert_eq!((t.tokens.as_slice(), spine.as_slice(), guess), (&[1][..], &[0][..], Some(2)));
    }

    #[test]
    fn a_pipelined_tree_keeps_the_budget_and_assumes_its_spine() {
        // Spine 1 → 2 → 3 → 4 (4 is the guess at depth γ + 1 = 4), siblings 10 (of 1), 20 (of 2),
        // 40 (of 4, too deep) and 21 under 20.
        let proposal = tree(&[(1, -1), (2, 0), (10, -1), (3, 1), (20, 0), (4, 3), (40, 3), (21, 4)]);
        let mut d = Fixed(proposal, None);
        let budget = DraftBudget { max_nodes: 7, max_depth: 3, max_branch: 3 };
        let (t, spine, guess) = draft_pipelined(&mut d, &[9], &budget, 100).unwrap();
        assert_eq!(d.1, Some(DraftBudget { max_nodes: 8, max_depth: 4, max_branch: 3 }));
        assert_eq!(t.tokens, vec![1, 2, 10, 3, 20, 21]);
        assert_eq!(spine, vec![0, 1, 3]);
        assert_eq!(guess, Some(4));
        assert_eq!(round(t, spine).assumed_commit(), Commit::Path(vec![0, 1, 2, 4]));
        // Over the node budget: a prefix in index order (ancestors first) is kept, and the spine
        // and guess are those of what is kept.
        let budget = DraftBudget { max_nodes: 4, max_depth: 3, max_branch: 3 };
        let (t, spine, guess) = draft_pipelined(&mut d, &[9], &budget, 100).unwrap();
        assert_eq!((t.tokens, spine, guess), (vec![1, 2, 10, 20], vec![0, 1], Some(3)));
    }

    #[test]
    fn siblings_of_a_short_spines_guess_stay_and_the_commit_keeps_the_spine_only() {
        // Spine 1 → 2 (the guess), its sibling 7: the tree sent is the chain 1 → 7, whose rows
        // every stage commits as they run; the next round keeps the root and 1 only.
        let mut d = Fixed(tree(&[(1, -1), (2, 0), (7, 0)]), None);
        let (t, spine, guess) = draft_pipelined(&mut d, &[9], &DraftBudget::chain(4), 100).unwrap();
        assert_eq!((t.tokens.as_slice(), spine.as_slice(), guess), (&[1, 7][..], &[0][..], Some(2)));
        assert_eq!(round(t, spine).assumed_commit(), Commit::Len(12));
        // Nothing proposed: the root alone, nothing assumed.
        let mut d = Fixed(DraftTree::default(), None);
        let (t, spine, guess) = draft_pipelined(&mut d, &[9], &DraftBudget::chain(4), 100).unwrap();
        assert!(t.is_empty() && spine.is_empty() && guess.is_none());
    }
}
