//! A ring of stages seen from the client: open a session on every stage, push batches through
//! them in order, read the tail's logits, keep or roll back the KV on every stage.
//!
//! Stages are reached through [`StageLink`]s. [`LocalLink`] serves a [`StageServer`] in-process,
//! through the full wire encoding (every frame is encoded to bytes and decoded again), so the
//! protocol is exercised without a network; network links implement the same trait.

use std::time::Instant;

use specswarm_proto::wire::{Dtype, ErrorCode, Frame, Input, Message, SpecRound, VerifySpec, WireError};

use crate::stage::{StageServer, decode_hidden};

#[non_exhaustive]
#[derive(Clone, Debug, thiserror::Error)]
pub enum RingError {
    #[error("stage {stage} refused: {code:?}: {message}")]
    Refused { stage: usize, code: ErrorCode, message: String },
    #[error("stage {stage} sent a malformed frame: {source}")]
    Wire { stage: usize, source: WireError },
    #[error("stage {stage} is unreachable: {reason}")]
    Unreachable { stage: usize, reason: String },
    #[error("stage {stage} replied with an unexpected message")]
    Unexpected { stage: usize },
}

/// The `Open` of stage `i` of an `n`-stage ring serving `range` of model `model_id`, forwarding
/// to `next_hop` (none: replies go back to the opener). Only the tail gets `tail_argmax` and the
/// verification settings.
#[allow(clippy::too_many_arguments)]
pub fn open_message(
    i: usize,
    n: usize,
    model_id: [u8; 32],
    range: (u32, u32),
    next_hop: Option<String>,
    max_tokens: u32,
    tail_argmax: bool,
    verify: Option<&VerifySpec>,
) -> Message {
    let tail = i + 1 == n;
    Message::Open {
        model_id,
        start: range.0,
        end: range.1,
        max_tokens,
        next_hop,
        tail_argmax: tail_argmax && tail,
        verify: if tail { verify.cloned() } else { None },
    }
}

/// A batch of rows at `positions` (a tree when `tree_parents` is set): token ids for the head,
/// or a speculative round whose tokens ride along for the tail.
pub fn forward_message(
    input: Input,
    positions: &[u32],
    tree_parents: Option<&[i32]>,
    spec: Option<SpecRound>,
) -> Message {
    Message::Forward { positions: positions.to_vec(), tree_parents: tree_parents.map(<[i32]>::to_vec), input, spec }
}

/// What `frame`, received from stage `from`, means to a client of `session` waiting for the
/// reply to `seq` from `stage`: `None` for a frame to skip (an earlier round's, another
/// session's), else the reply or the error it carries (an error from any stage answers `seq`).
pub fn reply_for(
    frame: Frame,
    from: usize,
    stage: usize,
    seq: u32,
    session: u64,
) -> Option<Result<Message, RingError>> {
    if frame.seq != seq || frame.session != session {
        return None;
    }
    Some(match frame.message {
        Message::Error { code, message } => Err(RingError::Refused { stage: from, code, message }),
        m if from == stage => Ok(m),
        _ => Err(RingError::Unexpected { stage: from }),
    })
}

/// One request/reply exchange with a stage.
pub trait StageLink: Send {
    /// Send `frame` bytes, return the reply bytes.
    fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, String>;
}

/// A stage server in this process, reached through encoded frames.
pub struct LocalLink(pub StageServer);

impl StageLink for LocalLink {
    fn exchange(&mut self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let reply = match Frame::decode(bytes) {
            Ok(frame) => self.0.handle(&frame, Instant::now()),
            Err(e) => Frame {
                session: 0,
                epoch: 0,
                seq: 0,
                message: Message::Error { code: ErrorCode::Malformed, message: e.to_string() },
            },
        };
        Ok(reply.encode())
    }
}

/// Layer ranges and model id of the ring, in order, for `Open`.
#[derive(Clone, Debug)]
pub struct RingSpec {
    pub model_id: [u8; 32],
    pub ranges: Vec<(u32, u32)>,
}

/// A client session over a ring of stages.
pub struct RingClient {
    links: Vec<Box<dyn StageLink>>,
    spec: RingSpec,
    session: u64,
    epoch: u32,
    seq: u32,
    committed: usize,
}

impl RingClient {
    pub fn new(links: Vec<Box<dyn StageLink>>, spec: RingSpec, session: u64) -> RingClient {
        assert_eq!(links.len(), spec.ranges.len(), "one link per stage");
        RingClient { links, spec, session, epoch: 0, seq: 0, committed: 0 }
    }

    pub fn committed(&self) -> usize {
        self.committed
    }

    pub fn stages(&self) -> usize {
        self.links.len()
    }

    /// Put a new link in place of stage `stage` (after it failed).
    pub fn replace_link(&mut self, stage: usize, link: Box<dyn StageLink>) {
        self.links[stage] = link;
    }

    fn call(&mut self, stage: usize, message: Message) -> Result<Message, RingError> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame { session: self.session, epoch: self.epoch, seq: self.seq, message };
        let reply =
            self.links[stage].exchange(&frame.encode()).map_err(|reason| RingError::Unreachable { stage, reason })?;
        let reply = Frame::decode(&reply).map_err(|source| RingError::Wire { stage, source })?;
        match reply.message {
            Message::Error { code, message } => Err(RingError::Refused { stage, code, message }),
            m => Ok(m),
        }
    }

    /// Open the session on every stage with a KV budget of `max_tokens`.
    pub fn open(&mut self, max_tokens: u32) -> Result<(), RingError> {
        let n = self.spec.ranges.len();
        for i in 0..n {
            let open = open_message(i, n, self.spec.model_id, self.spec.ranges[i], None, max_tokens, false, None);
            self.call(i, open)?;
        }
        self.committed = 0;
        Ok(())
    }

    /// Run tokens through the ring; returns the tail's logits (last row of a causal batch, every
    /// row of a tree batch), row-major f32.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        tree_parents: Option<&[i32]>,
    ) -> Result<Vec<f32>, RingError> {
        let mut input = Input::Tokens(tokens.to_vec());
        for stage in 0..self.links.len() {
            match self.call(stage, forward_message(input, positions, tree_parents, None))? {
                Message::Output { input: out } => input = out,
                _ => return Err(RingError::Unexpected { stage }),
            }
        }
        if tree_parents.is_none() {
            self.committed += tokens.len();
        }
        match input {
            Input::Hidden { dtype, data, .. } => Ok(decode_hidden(dtype, &data)),
            Input::Tokens(_) => Err(RingError::Unexpected { stage: self.links.len() - 1 }),
        }
    }

    /// Keep one path of the last tree batch on every stage.
    pub fn accept(&mut self, path: &[usize]) -> Result<(), RingError> {
        let path: Vec<u32> = path.iter().map(|&i| i as u32).collect();
        for stage in 0..self.links.len() {
            self.call(stage, Message::Accept { path: path.clone() })?;
        }
        self.committed += path.len();
        Ok(())
    }

    /// Roll every stage back to `len` committed tokens; later frames use a new epoch, so stale
    /// in-flight frames of the old one are refused.
    pub fn truncate(&mut self, len: usize) -> Result<(), RingError> {
        self.epoch += 1;
        for stage in 0..self.links.len() {
            self.call(stage, Message::Truncate { len: len as u32 })?;
        }
        self.committed = len;
        Ok(())
    }

    pub fn close(&mut self) -> Result<(), RingError> {
        for stage in 0..self.links.len() {
            self.call(stage, Message::Close)?;
        }
        Ok(())
    }
}

/// The default hidden-state element type on the wire.
pub const WIRE_DTYPE_DEFAULT: Dtype = Dtype::F32;

/// Where replacements for failed stages come from.
pub trait Router {
    /// A link to another worker serving stage `stage`'s layer range, if any is available.
    fn replacement(&mut self, stage: usize) -> Option<Box<dyn StageLink>>;
}

/// A router with no spares.
pub struct NoSpares;

impl Router for NoSpares {
    fn replacement(&mut self, _stage: usize) -> Option<Box<dyn StageLink>> {
        None
    }
}

/// Which stage to blame for an error, if it is an operating failure (not a refusal).
fn failed_stage(e: &RingError) -> Option<usize> {
    match e {
        RingError::Unreachable { stage, .. } | RingError::Wire { stage, .. } | RingError::Unexpected { stage } => {
            Some(*stage)
        }
        // A stage that lost our session (restarted) is as good as gone.
        RingError::Refused { stage, code: ErrorCode::UnknownSession, .. } => Some(*stage),
        RingError::Refused { .. } => None,
    }
}

/// Most replacements one request may use before it gives up.
pub const FAILOVERS_PER_REQUEST_MAX: usize = 8;

/// Run `step` on the ring; when a stage fails, swap in a replacement from `router`, rebuild the
/// session on every stage by replaying `history` (the committed tokens), and run `step` again.
/// Outputs are deterministic and batch-invariant, so the request continues with the same tokens.
fn with_failover<T>(
    ring: &mut RingClient,
    router: &mut dyn Router,
    budget: u32,
    history: &[u32],
    failovers: &mut usize,
    mut step: impl FnMut(&mut RingClient) -> Result<T, RingError>,
) -> Result<T, RingError> {
    loop {
        let err = match step(ring) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Some(stage) = failed_stage(&err) else { return Err(err) };
        if *failovers >= FAILOVERS_PER_REQUEST_MAX {
            return Err(err);
        }
        let Some(link) = router.replacement(stage) else { return Err(err) };
        *failovers += 1;
        ring.replace_link(stage, link);
        // Rebuild: a fresh session everywhere (the survivors drop theirs), then the history.
        let _ = ring.close();
        ring.epoch += 1;
        ring.open(budget)?;
        if !history.is_empty() {
            let pos: Vec<u32> = (0..history.len() as u32).collect();
            ring.forward(history, &pos, None)?;
        }
    }
}

/// Plain decoding through a ring: the swarm counterpart of `specswarm_engine::generate::generate`
/// (same sampler, same stop rule), for comparing the two.
pub fn generate_ring(
    ring: &mut RingClient,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut specswarm_engine::sampling::Sampler,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, specswarm_engine::generate::GenerateStats), RingError> {
    generate_ring_failover(ring, &mut NoSpares, prompt, max_tokens, sampler, stop_ids, on_token).map(|(o, s, _)| (o, s))
}

/// [`generate_ring`] that survives failed stages: a stage that dies or stalls (the link's
/// timeout) is replaced through `router`, its session rebuilt from the committed tokens, and the
/// request finishes with the tokens it would have produced anyway. Returns the failovers used.
pub fn generate_ring_failover(
    ring: &mut RingClient,
    router: &mut dyn Router,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut specswarm_engine::sampling::Sampler,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, specswarm_engine::generate::GenerateStats, usize), RingError> {
    let mut stats = specswarm_engine::generate::GenerateStats { prompt_tokens: prompt.len(), ..Default::default() };
    let budget = (prompt.len() + max_tokens) as u32;
    let mut failovers = 0;
    with_failover(ring, router, budget, &[], &mut failovers, |r| r.open(budget))?;
    let t0 = Instant::now();
    let (body, last) = prompt.split_at(prompt.len() - 1);
    let mut history: Vec<u32> = body.to_vec();
    let mut next = last[0];
    let mut out = Vec::new();
    let mut first = true;
    loop {
        // Feed everything not yet committed (the whole prompt at first, then one token).
        let feed: Vec<u32> = if first { prompt.to_vec() } else { vec![next] };
        let committed = if first { 0 } else { history.len() };
        let logits = with_failover(ring, router, budget, &history[..committed], &mut failovers, |r| {
            let pos: Vec<u32> = (committed as u32..(committed + feed.len()) as u32).collect();
            r.forward(&feed, &pos, None)
        })?;
        if first {
            stats.prefill = t0.elapsed();
            first = false;
        }
        history.push(next);
        let tok = sampler.sample(&logits, &history);
        out.push(tok);
        next = tok;
        if stop_ids.contains(&tok) || !on_token(tok) || out.len() == max_tokens {
            break;
        }
    }
    stats.decode = t0.elapsed() - stats.prefill;
    stats.generated_tokens = out.len();
    let _ = ring.close();
    Ok((out, stats, failovers))
}

/// In-process WAN emulation: a link whose request and reply each take `one_way` to cross.
pub struct DelayLink<L> {
    pub inner: L,
    pub one_way: std::time::Duration,
}

impl<L: StageLink> StageLink for DelayLink<L> {
    fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, String> {
        std::thread::sleep(self.one_way);
        let reply = self.inner.exchange(frame);
        std::thread::sleep(self.one_way);
        reply
    }
}
