//! A stage server: one layer slice serving many sessions through the stage protocol.
//!
//! [`StageServer::handle`] is a pure request → reply function over [`Frame`]s (no I/O), so the
//! same logic runs behind any transport and is tested directly against hostile input.
//!
//! Rules (DESIGN §2):
//! - `Open` reserves KV for a session; refused with `Capacity` past the session or KV limits, and
//!   with `WrongModel` if the model hash or layer range is not this stage's.
//! - Frames carry an epoch: a frame older than the session's epoch is refused with `StaleEpoch`
//!   (the caller has rolled back past it); a newer one advances the session's epoch.
//! - `Forward` positions must continue the session's cache (`PositionMismatch` otherwise, never a
//!   silent recompute). The head takes token ids, other stages hidden states.
//! - Outputs: hidden states from inner stages; from the tail, logits of the last row of a causal
//!   batch or of every row of a tree batch.
//! - Every failure is an `Error` reply; the server keeps serving its other sessions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use specswarm_engine::EngineError;
use specswarm_engine::kv::KvCache;
use specswarm_engine::model::{Batch, ModelSlice, Step, StepInput, StepOutput, Want};
use specswarm_engine::sampling::{Sampler, SamplerConfig};
use specswarm_proto::wire::{Commit, Dtype, ErrorCode, Frame, Input, Message, VerifySpec};
use specswarm_spec::tree::DraftTree;
use specswarm_spec::verify::verify_tree;

/// Bounds of one stage server.
#[derive(Clone, Debug)]
pub struct StageLimits {
    pub sessions_max: usize,
    /// KV tokens all sessions together may reserve.
    pub kv_tokens_total_max: usize,
    /// Sessions idle longer than this are closed by [`StageServer::evict_idle`].
    pub session_idle_timeout: Duration,
    /// Element type of hidden states sent downstream (F32 keeps the ring bit-identical to one
    /// process; F16/BF16 halve the bytes).
    pub hidden_dtype: Dtype,
}

impl Default for StageLimits {
    fn default() -> Self {
        StageLimits {
            sessions_max: 64,
            kv_tokens_total_max: 1 << 18,
            session_idle_timeout: Duration::from_secs(300),
            hidden_dtype: Dtype::F32,
        }
    }
}

struct Session {
    kv: KvCache,
    /// Answer with argmax token ids instead of logits (tail only).
    tail_argmax: bool,
    /// The tail of a session that verifies speculative rounds.
    verifier: Option<TailVerifier>,
    epoch: u32,
    reserved_tokens: usize,
    last_used: Instant,
}

/// A verifying tail's per-session state: the sampler (positional, so rounds later rolled back
/// do not shift the randomness of the ones kept) and the token ids of its KV rows.
struct TailVerifier {
    sampler: Sampler,
    /// Token of every committed KV row, in order.
    committed: Vec<u32>,
    /// Tokens of the staged rows of the last tree batch (batch order).
    staged: Vec<u32>,
}

impl TailVerifier {
    fn apply(&mut self, commit: &Commit) {
        match commit {
            Commit::Keep => {}
            Commit::Path(path) => {
                let kept: Vec<u32> = path.iter().filter_map(|&i| self.staged.get(i as usize).copied()).collect();
                self.committed.extend(kept);
            }
            Commit::Len(len) => self.committed.truncate(*len as usize),
        }
        self.staged.clear();
    }
}

fn sampler_config(v: &VerifySpec) -> SamplerConfig {
    SamplerConfig {
        temperature: v.temperature,
        top_k: v.top_k as usize,
        top_p: v.top_p,
        min_p: v.min_p,
        repetition_penalty: v.repetition_penalty,
        frequency_penalty: v.frequency_penalty,
        presence_penalty: v.presence_penalty,
        penalty_last_n: v.penalty_last_n as usize,
        seed: v.seed,
    }
}

pub struct StageServer {
    slice: Arc<ModelSlice>,
    model_id: [u8; 32],
    limits: StageLimits,
    sessions: HashMap<u64, Session>,
    reserved_tokens: usize,
}

impl StageServer {
    pub fn new(slice: Arc<ModelSlice>, model_id: [u8; 32], limits: StageLimits) -> StageServer {
        StageServer { slice, model_id, limits, sessions: HashMap::new(), reserved_tokens: 0 }
    }

    pub fn slice(&self) -> &ModelSlice {
        &self.slice
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// KV tokens reserved by open sessions.
    pub fn reserved_tokens(&self) -> usize {
        self.reserved_tokens
    }

    /// Bytes held by all sessions' KV caches.
    pub fn kv_bytes(&self) -> usize {
        self.sessions.values().map(|s| s.kv.bytes()).sum()
    }

    /// Close sessions idle for longer than the limit; returns how many.
    pub fn evict_idle(&mut self, now: Instant) -> usize {
        let timeout = self.limits.session_idle_timeout;
        let stale: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_used) > timeout)
            .map(|(&id, _)| id)
            .collect();
        for id in &stale {
            self.close(*id);
        }
        stale.len()
    }

    fn close(&mut self, id: u64) -> bool {
        match self.sessions.remove(&id) {
            Some(s) => {
                self.reserved_tokens -= s.reserved_tokens;
                true
            }
            None => false,
        }
    }

    /// Handle one request frame and produce its reply.
    pub fn handle(&mut self, frame: &Frame, now: Instant) -> Frame {
        self.handle_many(std::slice::from_ref(frame), now).pop().expect("one reply per frame")
    }

    /// Handle several request frames; the replies, in order, are those [`StageServer::handle`]
    /// gives the frames one by one. `Forward` frames of different sessions run through the
    /// slice as one batch ([`ModelSlice::forward_many`]); a frame of a session already in the
    /// batch being gathered closes it, so a session's frames run in order. Other frames run as
    /// they come: they touch only their own session and the open-session and KV totals, which
    /// a `Forward` neither reads nor writes, so running them before a gathered batch of other
    /// sessions changes nothing.
    pub fn handle_many(&mut self, frames: &[Frame], now: Instant) -> Vec<Frame> {
        let mut replies: Vec<Option<Frame>> = vec![None; frames.len()];
        let mut group: Vec<usize> = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            if group.iter().any(|&j| frames[j].session == frame.session) {
                self.forward_group(frames, &group, now, &mut replies);
                group.clear();
            }
            if matches!(frame.message, Message::Forward { .. }) {
                group.push(i);
            } else {
                let result = self.dispatch(frame, now);
                replies[i] = Some(self.reply(frame, result));
            }
        }
        self.forward_group(frames, &group, now, &mut replies);
        replies.into_iter().map(|r| r.expect("every frame is answered")).collect()
    }

    /// The reply frame to `frame`, stamped with the session's epoch as it stands now.
    fn reply(&self, frame: &Frame, result: Result<Message, (ErrorCode, String)>) -> Frame {
        let message = result.unwrap_or_else(|(code, message)| Message::Error { code, message });
        let epoch = self.sessions.get(&frame.session).map_or(frame.epoch, |s| s.epoch);
        Frame { session: frame.session, epoch, seq: frame.seq, message }
    }

    /// Run the `Forward` frames `group` (of distinct sessions) as one batch; fill their replies.
    fn forward_group(&mut self, frames: &[Frame], group: &[usize], now: Instant, replies: &mut [Option<Frame>]) {
        let mut prepared: Vec<(usize, PreparedForward)> = Vec::with_capacity(group.len());
        for &i in group {
            match self.prepare_forward(&frames[i], now) {
                Ok(p) => prepared.push((i, p)),
                Err(e) => replies[i] = Some(self.reply(&frames[i], Err(e))),
            }
        }
        if prepared.is_empty() {
            return;
        }
        // Every prepared session's cache, borrowed at once (the sessions are distinct).
        let order: HashMap<u64, usize> =
            prepared.iter().enumerate().map(|(k, (i, _))| (frames[*i].session, k)).collect();
        let mut caches: Vec<Option<&mut KvCache>> = prepared.iter().map(|_| None).collect();
        for (id, session) in self.sessions.iter_mut() {
            if let Some(&k) = order.get(id) {
                caches[k] = Some(&mut session.kv);
            }
        }
        let mut steps: Vec<Step<'_>> = caches
            .into_iter()
            .zip(&prepared)
            .map(|(kv, (i, p))| Step {
                kv: kv.expect("a prepared session is open"),
                batch: p.batch(&frames[*i]),
                want: p.want,
            })
            .collect();
        let outs = self.slice.forward_many(&mut steps);
        drop(steps);
        for ((i, p), out) in prepared.into_iter().zip(outs) {
            let result = out.map_err(engine_error).and_then(|out| self.finish_forward(&frames[i], p, out));
            replies[i] = Some(self.reply(&frames[i], result));
        }
    }

    /// The session a frame addresses, after the epoch check (a newer epoch is adopted).
    fn session_for(&mut self, frame: &Frame, now: Instant) -> Result<&mut Session, (ErrorCode, String)> {
        let id = frame.session;
        let session = self.sessions.get_mut(&id).ok_or((ErrorCode::UnknownSession, format!("no session {id:#x}")))?;
        if frame.epoch < session.epoch {
            return Err((
                ErrorCode::StaleEpoch,
                format!("epoch {} is older than the session's {}", frame.epoch, session.epoch),
            ));
        }
        session.epoch = frame.epoch;
        session.last_used = now;
        Ok(session)
    }

    /// A `Forward`'s work before the slice runs: session and epoch, the round's commit, the input.
    fn prepare_forward(&mut self, frame: &Frame, now: Instant) -> Result<PreparedForward, (ErrorCode, String)> {
        let Message::Forward { positions, tree_parents, input, spec } = &frame.message else {
            unreachable!("only Forward frames are grouped")
        };
        let (is_tail, d_model) = (self.slice.is_tail(), self.slice.config().d_model);
        let session = self.session_for(frame, now)?;
        if let Some(round) = spec {
            apply_commit(session, &round.commit)?;
            if round.tokens.len() != positions.len() {
                return Err((
                    ErrorCode::Malformed,
                    format!("{} round tokens for {} positions", round.tokens.len(), positions.len()),
                ));
            }
        }
        let verifying = spec.as_ref().is_some_and(|r| r.verify) && session.verifier.is_some();
        let hidden = match input {
            Input::Tokens(_) => None,
            Input::Hidden { dtype, rows, dim, data } => {
                if *dim as usize != d_model || *rows as usize != positions.len() {
                    return Err((
                        ErrorCode::Malformed,
                        format!("hidden input {rows}×{dim}, expected {}×{d_model}", positions.len()),
                    ));
                }
                Some(decode_hidden(*dtype, data))
            }
        };
        let want = match (is_tail, tree_parents.is_some() || verifying) {
            (false, _) => Want::Hidden,
            (true, false) => Want::LastLogits,
            (true, true) => Want::AllLogits,
        };
        Ok(PreparedForward { hidden, want, verifying, base: session.kv.len() })
    }

    /// A `Forward`'s reply from the slice's output: a verdict, token ids, hidden states or logits.
    fn finish_forward(
        &mut self,
        frame: &Frame,
        p: PreparedForward,
        out: StepOutput,
    ) -> Result<Message, (ErrorCode, String)> {
        let Message::Forward { tree_parents, spec, .. } = &frame.message else {
            unreachable!("only Forward frames are grouped")
        };
        let session = self.sessions.get_mut(&frame.session).expect("a forwarded session is open");
        if let (Some(v), Some(round)) = (session.verifier.as_mut(), spec) {
            if tree_parents.is_some() {
                v.staged = round.tokens.clone();
            } else {
                v.committed.extend_from_slice(&round.tokens);
            }
            if p.verifying {
                let vocab = self.slice.config().vocab_size;
                return Ok(verify_round(v, p.base, &round.tokens, tree_parents.as_deref(), out.data(), vocab));
            }
        }
        let dim = match &out {
            StepOutput::Hidden { .. } => self.slice.config().d_model,
            StepOutput::Logits { .. } => self.slice.config().vocab_size,
        };
        let (rows, data) = match out {
            StepOutput::Hidden { data, rows } | StepOutput::Logits { data, rows } => (rows, data),
        };
        if p.want != Want::Hidden && session.tail_argmax {
            let ids = data.chunks_exact(dim).map(specswarm_engine::sampling::argmax).collect();
            return Ok(Message::Output { input: Input::Tokens(ids) });
        }
        let dtype = if p.want == Want::Hidden { self.limits.hidden_dtype } else { Dtype::F32 };
        Ok(Message::Output {
            input: Input::Hidden { dtype, rows: rows as u32, dim: dim as u32, data: encode_hidden(dtype, &data) },
        })
    }

    /// Every frame but `Forward` (which runs in groups, [`StageServer::forward_group`]).
    fn dispatch(&mut self, frame: &Frame, now: Instant) -> Result<Message, (ErrorCode, String)> {
        let id = frame.session;
        if let Message::Open { model_id, start, end, max_tokens, tail_argmax, verify, .. } = &frame.message {
            let range = self.slice.layers();
            if *model_id != self.model_id || (*start as usize, *end as usize) != (range.start, range.end) {
                return Err((
                    ErrorCode::WrongModel,
                    format!("this stage serves layers {}..{} of another model or range", range.start, range.end),
                ));
            }
            self.close(id);
            let want = *max_tokens as usize;
            if self.sessions.len() >= self.limits.sessions_max {
                return Err((ErrorCode::Capacity, format!("{} sessions open (limit)", self.sessions.len())));
            }
            if self.reserved_tokens + want > self.limits.kv_tokens_total_max {
                return Err((
                    ErrorCode::Capacity,
                    format!(
                        "{want} KV tokens requested, {} of {} free",
                        self.limits.kv_tokens_total_max - self.reserved_tokens,
                        self.limits.kv_tokens_total_max
                    ),
                ));
            }
            let verifier = match verify {
                Some(v) if self.slice.is_tail() => {
                    let sampler = Sampler::positional(sampler_config(v))
                        .map_err(|e| (ErrorCode::Malformed, format!("verification settings: {e}")))?;
                    Some(TailVerifier { sampler, committed: Vec::new(), staged: Vec::new() })
                }
                _ => None,
            };
            let kv = self.slice.new_cache(want);
            self.reserved_tokens += want;
            self.sessions.insert(
                id,
                Session {
                    kv,
                    tail_argmax: *tail_argmax,
                    verifier,
                    epoch: frame.epoch,
                    reserved_tokens: want,
                    last_used: now,
                },
            );
            return Ok(Message::Ack { committed: 0 });
        }
        let session = self.session_for(frame, now)?;
        match &frame.message {
            Message::Accept { path } => {
                apply_commit(session, &Commit::Path(path.clone()))?;
                Ok(Message::Ack { committed: session.kv.len() as u32 })
            }
            Message::Truncate { len } => {
                let len = *len as usize;
                if len > session.kv.len() {
                    return Err((
                        ErrorCode::PositionMismatch,
                        format!("cannot truncate to {len}: only {} tokens are committed", session.kv.len()),
                    ));
                }
                apply_commit(session, &Commit::Len(len as u32))?;
                Ok(Message::Ack { committed: len as u32 })
            }
            Message::Close => {
                self.close(id);
                Ok(Message::Ack { committed: 0 })
            }
            Message::Open { .. } => unreachable!("handled above"),
            Message::Forward { .. } => unreachable!("Forward frames run through forward_group"),
            Message::Ack { .. } | Message::Output { .. } | Message::Error { .. } | Message::Verdict { .. } => {
                Err((ErrorCode::Malformed, "a reply frame is not a request".into()))
            }
        }
    }
}

/// A `Forward` frame checked and decoded, waiting for its group's batch.
struct PreparedForward {
    /// The hidden-state input decoded to f32 (`None`: token ids, read from the frame).
    hidden: Option<Vec<f32>>,
    want: Want,
    /// The tail verifies this round (a verdict instead of logits).
    verifying: bool,
    /// Committed rows before the batch (after the round's commit).
    base: usize,
}

impl PreparedForward {
    fn batch<'a>(&'a self, frame: &'a Frame) -> Batch<'a> {
        let Message::Forward { positions, tree_parents, input, .. } = &frame.message else {
            unreachable!("only Forward frames are prepared")
        };
        let input = match (&self.hidden, input) {
            (Some(h), _) => StepInput::Hidden(h),
            (None, Input::Tokens(t)) => StepInput::Tokens(t),
            (None, Input::Hidden { .. }) => unreachable!("hidden inputs are decoded when prepared"),
        };
        Batch { input, positions, tree_parents: tree_parents.as_deref() }
    }
}

/// Apply a round's commit to the session's KV (and the verifier's token mirror).
fn apply_commit(session: &mut Session, commit: &Commit) -> Result<(), (ErrorCode, String)> {
    match commit {
        Commit::Keep => {}
        Commit::Path(path) => {
            let path: Vec<usize> = path.iter().map(|&i| i as usize).collect();
            session.kv.accept_path(&path).map_err(engine_error)?;
        }
        Commit::Len(len) => {
            let len = *len as usize;
            if len > session.kv.len() {
                return Err((
                    ErrorCode::PositionMismatch,
                    format!("cannot roll back to {len}: only {} tokens are committed", session.kv.len()),
                ));
            }
            session.kv.truncate(len);
        }
    }
    if let Some(v) = session.verifier.as_mut() {
        v.apply(commit);
    }
    Ok(())
}

/// The SpecExec verdict on a round `[root, nodes…]` whose logits (every row) are `logits`.
/// The KV keeps every row until the next round's commit says which survive.
fn verify_round(
    v: &mut TailVerifier,
    base: usize,
    tokens: &[u32],
    tree_parents: Option<&[i32]>,
    logits: &[f32],
    vocab: usize,
) -> Message {
    let n = tokens.len() - 1;
    let parents: Vec<i32> = match tree_parents {
        // Batch parents are shifted by one (row 0 is the root).
        Some(tp) => tp[1..].iter().map(|&p| p - 1).collect(),
        None => (0..n as i32).map(|i| i - 1).collect(),
    };
    let tree = DraftTree { tokens: tokens[1..].to_vec(), parents, probs: vec![1.0; n] };
    let mut history = v.committed[..base.min(v.committed.len())].to_vec();
    history.push(tokens[0]);
    let verdict = verify_tree(&tree, logits, vocab, &history, &mut v.sampler);
    Message::Verdict { accepted: verdict.accepted.iter().map(|&i| i as u32).collect(), next: verdict.next }
}

fn engine_error(e: EngineError) -> (ErrorCode, String) {
    let code = match &e {
        EngineError::PositionMismatch { .. } => ErrorCode::PositionMismatch,
        EngineError::KvBudgetExceeded { .. } | EngineError::ContextExceeded { .. } => ErrorCode::Capacity,
        EngineError::BadBatch { .. } | EngineError::TokenOutOfRange { .. } | EngineError::WrongSliceRole { .. } => {
            ErrorCode::Malformed
        }
        _ => ErrorCode::Internal,
    };
    (code, e.to_string())
}

/// Raw little-endian bytes of `dtype` → f32.
pub fn decode_hidden(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::Bf16 => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// f32 → raw little-endian bytes of `dtype`.
pub fn encode_hidden(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::Bf16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
    }
}
