//! `StageServer::handle_many` (several sessions' frames through one batch) answers every frame
//! exactly as `StageServer::handle` does one frame at a time: speculative rounds with commits,
//! tail verification, trees, argmax tails, hidden-state stages, and every kind of refusal.

use std::sync::Arc;
use std::time::Instant;

use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_net::stage::{StageLimits, StageServer, encode_hidden};
use specswarm_proto::wire::{Commit, Dtype, Frame, Input, Message, SpecRound, VerifySpec};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Builds one session's frames (in order) for a stage serving `slice`.
struct Script<'a> {
    slice: &'a ModelSlice,
    model_id: [u8; 32],
    session: u64,
    epoch: u32,
    seq: u32,
    frames: Vec<Frame>,
}

impl Script<'_> {
    fn push(&mut self, message: Message) {
        self.seq += 1;
        self.frames.push(Frame { session: self.session, epoch: self.epoch, seq: self.seq, message });
    }

    fn input(&self, rng: &mut Rng, tokens: &[u32]) -> Input {
        if self.slice.is_head() {
            return Input::Tokens(tokens.to_vec());
        }
        let d = self.slice.config().d_model;
        let values: Vec<f32> = (0..tokens.len() * d).map(|_| (rng.below(2001) as f32 - 1000.0) / 500.0).collect();
        Input::Hidden {
            dtype: Dtype::F32,
            rows: tokens.len() as u32,
            dim: d as u32,
            data: encode_hidden(Dtype::F32, &values),
        }
    }

    fn tokens(&self, rng: &mut Rng, n: usize) -> Vec<u32> {
        (0..n).map(|_| rng.below(self.slice.config().vocab_size) as u32).collect()
    }

    /// Open, prefill, speculative chain and tree rounds (with the commits that follow them), an
    /// epoch bump, refusals, and a close.
    fn build(mut self, rng: &mut Rng) -> Vec<Frame> {
        let range = self.slice.layers();
        let speculative = !self.session.is_multiple_of(3);
        let verify = (speculative && self.slice.is_tail()).then_some(VerifySpec {
            temperature: if self.session.is_multiple_of(2) { 0.0 } else { 0.8 },
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.1,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: self.session,
        });
        self.push(Message::Open {
            model_id: self.model_id,
            start: range.start as u32,
            end: range.end as u32,
            max_tokens: 256,
            next_hop: None,
            tail_argmax: self.session.is_multiple_of(2),
            verify,
        });
        let prefill_len = 2 + rng.below(20);
        let prefill = self.tokens(rng, prefill_len);
        let positions: Vec<u32> = (0..prefill.len() as u32).collect();
        let mut base = prefill.len();
        let spec = speculative.then(|| SpecRound { tokens: prefill.clone(), commit: Commit::Keep, verify: false });
        let input = self.input(rng, &prefill);
        self.push(Message::Forward { positions, tree_parents: None, input, spec });
        let mut commit = Commit::Keep;
        for round in 0..5 {
            if round == 3 {
                self.epoch += 1;
            }
            if round % 2 == 0 {
                // A chain [root, drafts…]; the next round keeps the root and some drafts.
                let n = 1 + rng.below(6);
                let tokens = self.tokens(rng, n);
                let positions: Vec<u32> = (base as u32..(base + n) as u32).collect();
                let spec =
                    speculative.then(|| SpecRound { tokens: tokens.clone(), commit: commit.clone(), verify: true });
                let input = self.input(rng, &tokens);
                self.push(Message::Forward { positions, tree_parents: None, input, spec });
                let kept = 1 + rng.below(n);
                if speculative {
                    commit = Commit::Len((base + kept) as u32);
                } else {
                    self.push(Message::Truncate { len: (base + kept) as u32 });
                }
                base += kept;
            } else {
                // A tree; the next round keeps the path 0 → 1 → 3.
                let parents = vec![-1, 0, 0, 1, 2];
                let depths = [0u32, 1, 1, 2, 2];
                let tokens = self.tokens(rng, parents.len());
                let positions: Vec<u32> = depths.iter().map(|d| base as u32 + d).collect();
                let spec =
                    speculative.then(|| SpecRound { tokens: tokens.clone(), commit: commit.clone(), verify: true });
                let input = self.input(rng, &tokens);
                self.push(Message::Forward { positions, tree_parents: Some(parents), input, spec });
                if speculative {
                    commit = Commit::Path(vec![0, 1, 3]);
                } else {
                    self.push(Message::Accept { path: vec![0, 1, 3] });
                }
                base += 3;
            }
            if round == 1 {
                // Refused: positions that do not continue the cache (harmless to the session).
                let tokens = self.tokens(rng, 2);
                let positions = vec![base as u32 + 5, base as u32 + 6];
                let input = self.input(rng, &tokens);
                let spec = speculative.then_some(SpecRound { tokens, commit: Commit::Keep, verify: true });
                self.push(Message::Forward { positions, tree_parents: None, input, spec });
            }
            if round == 4 {
                // Refused: an epoch older than the session's.
                self.epoch -= 1;
                let tokens = self.tokens(rng, 1);
                let input = self.input(rng, &tokens);
                self.push(Message::Forward { positions: vec![base as u32], tree_parents: None, input, spec: None });
                self.epoch += 1;
            }
        }
        self.push(Message::Close);
        // Refused: the session is gone.
        let tokens = self.tokens(rng, 1);
        let input = self.input(rng, &tokens);
        self.push(Message::Forward { positions: vec![base as u32], tree_parents: None, input, spec: None });
        self.frames
    }
}

/// Sessions' scripts interleaved at random (each session's frames stay in order); one server
/// handles them one by one, another in `handle_many` calls of random sizes.
fn check(slice: ModelSlice, model_id: [u8; 32], sessions: u64, seed: u64) {
    let slice = Arc::new(slice);
    let mut rng = Rng(seed);
    let mut scripts: Vec<std::collections::VecDeque<Frame>> = (1..=sessions)
        .map(|session| {
            let script = Script { slice: &slice, model_id, session, epoch: 1, seq: 0, frames: Vec::new() };
            script.build(&mut rng).into()
        })
        .collect();
    let mut frames = Vec::new();
    while scripts.iter().any(|s| !s.is_empty()) {
        let open: Vec<usize> = (0..scripts.len()).filter(|&i| !scripts[i].is_empty()).collect();
        let i = open[rng.below(open.len())];
        frames.push(scripts[i].pop_front().unwrap());
    }
    let now = Instant::now();
    let mut one_by_one = StageServer::new(Arc::clone(&slice), model_id, StageLimits::default());
    let want: Vec<Frame> = frames.iter().map(|f| one_by_one.handle(f, now)).collect();
    let mut batched = StageServer::new(Arc::clone(&slice), model_id, StageLimits::default());
    let mut got = Vec::new();
    let mut rest = &frames[..];
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at((1 + rng.below(16)).min(rest.len()));
        got.extend(batched.handle_many(chunk, now));
        rest = tail;
    }
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "reply to frame {i} ({:?} of session {})", frames[i].message, frames[i].session);
    }
    let errors = want.iter().filter(|f| matches!(f.message, Message::Error { .. })).count();
    let verdicts = want.iter().filter(|f| matches!(f.message, Message::Verdict { .. })).count();
    assert!(errors >= 3 * sessions as usize, "every script's refusals happen ({errors} errors)");
    assert!(slice.is_tail() == (verdicts > 0), "{verdicts} verdicts");
    assert_eq!(batched.sessions(), 0);
    assert_eq!(batched.reserved_tokens(), 0);
}

#[test]
fn handle_many_equals_one_by_one() {
    let path = hub::ensure(hub::known("smollm2-135m").unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let id = specswarm_net::model_id(&path).unwrap();
    let load = |layers| ModelSlice::load(&path, &LoadOptions { layers, threads: 2, ..Default::default() }).unwrap();
    // One stage holding the whole model: token ids in, logits, argmax ids and verdicts out.
    check(load(None), id, 8, 1);
    // An inner stage: hidden states in and out, commits applied without a verifier.
    check(load(Some(10..20)), id, 6, 2);
}
