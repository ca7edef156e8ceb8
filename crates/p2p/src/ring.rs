//! The client side of the libp2p swarm: discover the workers of a model in the DHT, measure
//! their RTT, choose a ring ([`crate::route`]), and generate through it as a ring with direct
//! return (each stage forwards to the next; the tail answers the client), replacing stages that
//! die or stall.
//!
//! Failover: any error other than a stage's refusal (a closed stream, no reply before the
//! timeout, an unknown session) makes the client probe every stage of the ring with a fresh
//! stream and a `Close` of an unused session, bounded by [`PROBE_TIMEOUT`]. Stages that do not
//! answer are marked dead; the client looks the model up again (new spares appear), chooses a
//! ring without the dead workers (keeping the live ones: sticky), re-opens the session under a
//! new epoch, replays the committed tokens to rebuild every stage's KV, and retries the step.
//! Forward passes are deterministic and batch-invariant, so the output is the same tokens.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use specswarm_net::ring::{FAILOVERS_PER_REQUEST_MAX, RingError, forward_message, open_message, reply_for};
use specswarm_net::stage::decode_hidden;
use specswarm_net::swarm_spec::{SpecRing, SwarmSpecError};
use specswarm_proto::limits::{DHT_LOOKUP_TIMEOUT_MS, PING_WAIT_MS, STREAM_SEND_QUEUE_FRAMES_MAX};
use specswarm_proto::wire::{ErrorCode, Frame, Input, Message, SpecRound, VerifySpec};
use tokio::sync::mpsc;

use crate::P2pError;
use crate::record::{WorkerRecord, hex, model_key, unix_ms, worker_key};
use crate::route::{Candidate, Plan, choose_ring, coverage_gaps};
use crate::stage::{open_stage_stream, read_frame, start_writer};
use crate::swarm::P2pNode;

/// Bound on a liveness probe of one stage.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The workers of `model_id` found in the DHT, with verified records and (where measured) RTT.
pub fn discover(node: &P2pNode, model_id: &[u8; 32]) -> Vec<Candidate> {
    discover_excluding(node, model_id, &HashSet::new())
}

/// [`discover`] without contacting the workers in `exclude` (known dead or stalled).
pub fn discover_excluding(node: &P2pNode, model_id: &[u8; 32], exclude: &HashSet<PeerId>) -> Vec<Candidate> {
    let wait = Duration::from_millis(DHT_LOOKUP_TIMEOUT_MS);
    let want = hex(model_id);
    let rt = node.runtime().clone();
    let mut providers = node.providers(model_key(model_id), wait);
    providers.retain(|p| !exclude.contains(p));
    let lookups = providers.iter().map(|peer| node.get_record_async(worker_key(peer), wait));
    let records = rt.block_on(futures::future::join_all(lookups));
    let mut cands = Vec::new();
    for (peer, bytes) in providers.into_iter().zip(records) {
        let Some(bytes) = bytes else { continue };
        let Ok(record) = WorkerRecord::verify(&bytes, &peer, unix_ms()) else { continue };
        if record.model_id == want {
            cands.push(Candidate { peer, record, rtt: None });
        }
    }
    // Connect to every candidate (ping starts on connection) and wait for the RTTs.
    let connects = cands.iter().map(|c| {
        let addrs: Vec<Multiaddr> = c.record.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let node = node.clone();
        let peer = c.peer;
        async move { node.connect(peer, addrs).await }
    });
    let reachable: Vec<bool> = rt.block_on(futures::future::join_all(connects)).iter().map(Result::is_ok).collect();
    // Ping runs as soon as a connection is up: wait for the reachable ones' first sample.
    let deadline = Instant::now() + Duration::from_millis(PING_WAIT_MS);
    loop {
        for c in cands.iter_mut() {
            c.rtt = node.rtt(&c.peer);
        }
        let done = cands.iter().zip(&reachable).all(|(c, &r)| !r || c.rtt.is_some());
        if done || Instant::now() >= deadline {
            return cands;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`discover`] until some ring covers the model's `n_layers` (or `wait` passes).
pub fn discover_ring(node: &P2pNode, model_id: &[u8; 32], n_layers: u32, wait: Duration) -> Vec<Candidate> {
    let deadline = Instant::now() + wait;
    loop {
        let cands = discover(node, model_id);
        let none = HashSet::new();
        let live: Vec<Candidate> = cands.iter().filter(|c| c.rtt.is_some()).cloned().collect();
        if choose_ring(&live, n_layers, 1, &none, &none).is_some() || Instant::now() >= deadline {
            return cands;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One stage of the ring as connected.
struct Stage {
    cand: Candidate,
    /// The address the connection uses (next hop of the previous stage).
    addr: Multiaddr,
    tx: mpsc::Sender<Vec<u8>>,
    /// Tags the replies of this connection (a replaced stage's late replies are ignored).
    conn: u64,
}

type Reply = (u64, Result<Frame, String>);

/// A session over a ring of libp2p workers with direct return.
pub struct P2pRing {
    node: P2pNode,
    model_id: [u8; 32],
    n_layers: u32,
    stages: Vec<Stage>,
    replies_tx: mpsc::Sender<Reply>,
    replies_rx: mpsc::Receiver<Reply>,
    next_conn: u64,
    session: u64,
    epoch: u32,
    seq: u32,
    committed: usize,
    timeout: Duration,
    /// Workers that failed during this ring's life; never chosen again.
    pub dead: HashSet<PeerId>,
    /// Candidates from the last lookup.
    pub candidates: Vec<Candidate>,
    /// Failovers of the current request (at most `FAILOVERS_PER_REQUEST_MAX`).
    pub failovers: usize,
}

/// Replies queued from all stages before readers wait.
const REPLY_QUEUE_MAX: usize = 4 * STREAM_SEND_QUEUE_FRAMES_MAX;

impl P2pRing {
    /// A ring for `model_id` (with `n_layers` layers) from `candidates`; stages are connected by
    /// [`P2pRing::plan`]. `timeout` bounds every wait for a reply.
    pub fn new(
        node: P2pNode,
        model_id: [u8; 32],
        n_layers: u32,
        candidates: Vec<Candidate>,
        session: u64,
        timeout: Duration,
    ) -> P2pRing {
        let (replies_tx, replies_rx) = mpsc::channel(REPLY_QUEUE_MAX);
        P2pRing {
            node,
            model_id,
            n_layers,
            stages: Vec::new(),
            replies_tx,
            replies_rx,
            next_conn: 0,
            session,
            epoch: 0,
            seq: 0,
            committed: 0,
            timeout,
            dead: HashSet::new(),
            candidates,
            failovers: 0,
        }
    }

    /// The stages in order: peer, layer range, the address used.
    pub fn describe(&self) -> Vec<(PeerId, (u32, u32), Multiaddr)> {
        self.stages.iter().map(|s| (s.cand.peer, (s.cand.record.start, s.cand.record.end), s.addr.clone())).collect()
    }

    pub fn committed(&self) -> usize {
        self.committed
    }

    /// [`P2pRing::plan`], skipping workers that cannot be connected to (they are marked dead).
    pub fn plan_connected(&mut self, kv_tokens: u64) -> Result<Plan, P2pError> {
        let mut tries = 0;
        loop {
            match self.plan(kv_tokens) {
                Err(P2pError::Ring(_)) if tries < self.candidates.len() => tries += 1,
                r => return r,
            }
        }
    }

    /// Choose the cheapest ring for sessions of `kv_tokens` and connect the stages that changed
    /// (a worker that cannot be reached is marked dead and the error returned).
    pub fn plan(&mut self, kv_tokens: u64) -> Result<Plan, P2pError> {
        let sticky: HashSet<PeerId> = self.stages.iter().map(|s| s.cand.peer).collect();
        let plan = choose_ring(&self.candidates, self.n_layers, kv_tokens, &self.dead, &sticky).ok_or_else(|| {
            let live: Vec<Candidate> =
                self.candidates.iter().filter(|c| !self.dead.contains(&c.peer)).cloned().collect();
            P2pError::NoRing { n_layers: self.n_layers, workers: live.len(), gaps: coverage_gaps(&live, self.n_layers) }
        })?;
        let mut old: Vec<Stage> = std::mem::take(&mut self.stages);
        for (i, &ci) in plan.stages.iter().enumerate() {
            let cand = self.candidates[ci].clone();
            if let Some(k) = old.iter().position(|s| s.cand.peer == cand.peer) {
                self.stages.push(old.swap_remove(k));
                continue;
            }
            match self.connect(cand.clone()) {
                Ok(s) => self.stages.push(s),
                Err(reason) => {
                    self.dead.insert(cand.peer);
                    return Err(P2pError::Ring(RingError::Unreachable { stage: i, reason }));
                }
            }
        }
        Ok(plan)
    }

    fn connect(&mut self, cand: Candidate) -> Result<Stage, String> {
        let addrs: Vec<Multiaddr> = cand.record.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let rt = self.node.runtime().clone();
        let (stream, addr) = rt.block_on(open_stage_stream(&self.node, cand.peer, addrs))?;
        let (mut r, tx) = start_writer(&rt, stream);
        self.next_conn += 1;
        let conn = self.next_conn;
        let replies = self.replies_tx.clone();
        rt.spawn(async move {
            loop {
                let item = match read_frame(&mut r).await {
                    Ok(Ok(f)) => Ok(f),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let stop = item.is_err();
                if replies.send((conn, item)).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Stage { cand, addr, tx, conn })
    }

    fn send(&mut self, stage: usize, message: Message) -> Result<u32, RingError> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame { session: self.session, epoch: self.epoch, seq: self.seq, message };
        let tx = self.stages[stage].tx.clone();
        let bytes = frame.encode();
        let timeout = self.timeout;
        self.node
            .runtime()
            .block_on(async move { tokio::time::timeout(timeout, tx.send(bytes)).await })
            .map_err(|_| RingError::Unreachable { stage, reason: "send queue full".into() })?
            .map_err(|_| RingError::Unreachable { stage, reason: "stream closed".into() })?;
        Ok(self.seq)
    }

    /// The reply with sequence number `seq` from `stage`; an error from any stage for `seq`.
    fn wait(&mut self, stage: usize, seq: u32) -> Result<Message, RingError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let rx = &mut self.replies_rx;
            let got = self.node.runtime().block_on(async { tokio::time::timeout(left, rx.recv()).await });
            let Ok(Some((conn, item))) = got else {
                return Err(RingError::Unreachable { stage, reason: "no reply before the timeout".into() });
            };
            let Some(from) = self.stages.iter().position(|s| s.conn == conn) else { continue };
            let frame = item.map_err(|reason| RingError::Unreachable { stage: from, reason })?;
            if let Some(reply) = reply_for(frame, from, stage, seq, self.session) {
                return reply;
            }
        }
    }

    /// Open the session on every stage, each forwarding to the next; with `tail_argmax` the
    /// tail answers token ids, otherwise logits.
    pub fn open(&mut self, max_tokens: u32, tail_argmax: bool) -> Result<(), RingError> {
        self.open_with(max_tokens, tail_argmax, None)
    }

    /// [`P2pRing::open`], with the tail verifying speculative rounds when `verify` is set.
    fn open_with(&mut self, max_tokens: u32, tail_argmax: bool, verify: Option<VerifySpec>) -> Result<(), RingError> {
        let n = self.stages.len();
        for i in 0..n {
            let range = (self.stages[i].cand.record.start, self.stages[i].cand.record.end);
            let next_hop = (i + 1 < n).then(|| self.stages[i + 1].addr.to_string());
            let msg = open_message(i, n, self.model_id, range, next_hop, max_tokens, tail_argmax, verify.as_ref());
            let seq = self.send(i, msg)?;
            self.wait(i, seq)?;
        }
        self.committed = 0;
        Ok(())
    }

    /// Send a causal batch to the head; what the tail answers.
    pub fn forward(&mut self, tokens: &[u32], positions: &[u32]) -> Result<Input, RingError> {
        let seq = self.send(0, forward_message(Input::Tokens(tokens.to_vec()), positions, None, None))?;
        let tail = self.stages.len() - 1;
        match self.wait(tail, seq)? {
            Message::Output { input } => {
                self.committed += tokens.len();
                Ok(input)
            }
            _ => Err(RingError::Unexpected { stage: tail }),
        }
    }

    /// Close the session on every stage (best effort).
    pub fn close(&mut self) {
        for i in 0..self.stages.len() {
            let _ = self.send(i, Message::Close);
        }
    }

    /// Whether `stage` answers a fresh stream within [`PROBE_TIMEOUT`].
    fn alive(&self, stage: usize) -> bool {
        let cand = &self.stages[stage].cand;
        let node = self.node.clone();
        let peer = cand.peer;
        let addrs: Vec<Multiaddr> = vec![self.stages[stage].addr.clone()];
        let probe = Frame { session: u64::MAX, epoch: 0, seq: 0, message: Message::Close };
        self.node.runtime().block_on(async move {
            let run = async {
                let (stream, _) = open_stage_stream(&node, peer, addrs).await?;
                let (mut r, tx) = start_writer(node.runtime(), stream);
                tx.send(probe.encode()).await.map_err(|e| e.to_string())?;
                read_frame(&mut r).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
            };
            matches!(tokio::time::timeout(PROBE_TIMEOUT, run).await, Ok(Ok(_)))
        })
    }

    /// After `err`: mark dead stages, look the model up again, re-plan, re-open the session
    /// under a new epoch and replay `history`. Errors that are a stage's considered refusal
    /// (other than a lost session) are returned as they are.
    fn recover(&mut self, err: RingError, kv_tokens: u32, tail_argmax: bool, history: &[u32]) -> Result<(), P2pError> {
        if let RingError::Refused { code, .. } = &err
            && *code != ErrorCode::UnknownSession
            && *code != ErrorCode::Internal
        {
            return Err(err.into());
        }
        if self.failovers >= FAILOVERS_PER_REQUEST_MAX {
            return Err(err.into());
        }
        self.failovers += 1;
        let dead: Vec<PeerId> =
            (0..self.stages.len()).filter(|&i| !self.alive(i)).map(|i| self.stages[i].cand.peer).collect();
        self.dead.extend(dead.iter().copied());
        for &p in &dead {
            self.node.forget(p);
        }
        self.stages.retain(|s| !dead.contains(&s.cand.peer));
        let fresh = discover_excluding(&self.node, &self.model_id, &self.dead);
        if !fresh.is_empty() {
            self.candidates = fresh;
        }
        self.plan_connected(kv_tokens as u64)?;
        self.epoch += 1;
        self.open(kv_tokens, tail_argmax)?;
        if !history.is_empty() {
            let pos: Vec<u32> = (0..history.len() as u32).collect();
            self.forward(history, &pos)?;
        }
        Ok(())
    }
}

/// What one swarm generation did.
#[derive(Clone, Debug, Default)]
pub struct SwarmStats {
    pub failovers: usize,
    pub prefill: Duration,
    pub decode: Duration,
    pub predicted_step_ms: f64,
}

/// Plain decoding through the ring with failover: the swarm counterpart of
/// `specswarm_engine::generate::generate`. With `greedy` the tail picks argmax token ids (only ids
/// travel back); otherwise logits come back and `sample(logits, history)` picks.
pub fn generate_swarm(
    ring: &mut P2pRing,
    prompt: &[u32],
    max_tokens: usize,
    greedy: bool,
    sample: &mut dyn FnMut(&[f32], &[u32]) -> u32,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, SwarmStats), P2pError> {
    assert!(!prompt.is_empty(), "a prompt has at least one token");
    let budget = (prompt.len() + max_tokens + 1) as u32;
    let mut stats =
        SwarmStats { predicted_step_ms: ring.plan_connected(budget as u64)?.predicted_ms, ..Default::default() };
    ring.failovers = 0; // the bound is per request
    if let Err(e) = ring.open(budget, greedy) {
        ring.recover(e, budget, greedy, &[])?;
    }
    let t0 = Instant::now();
    let mut history: Vec<u32> = prompt[..prompt.len() - 1].to_vec();
    let mut next = prompt[prompt.len() - 1];
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let (feed, committed): (Vec<u32>, usize) =
            if first { (prompt.to_vec(), 0) } else { (vec![next], history.len()) };
        let input = loop {
            let pos: Vec<u32> = (committed as u32..(committed + feed.len()) as u32).collect();
            match ring.forward(&feed, &pos) {
                Ok(input) => break input,
                Err(e) => ring.recover(e, budget, greedy, &history[..committed])?,
            }
        };
        if first {
            stats.prefill = t0.elapsed();
            first = false;
        }
        history.push(next);
        let tok = match input {
            Input::Tokens(ids) if greedy => {
                *ids.last().ok_or(RingError::Unexpected { stage: ring.stages.len() - 1 })?
            }
            Input::Hidden { dtype, data, .. } if !greedy => sample(&decode_hidden(dtype, &data), &history),
            _ => return Err(RingError::Unexpected { stage: ring.stages.len() - 1 }.into()),
        };
        out.push(tok);
        next = tok;
        if stop_ids.contains(&tok) || !on_token(tok) || out.len() == max_tokens {
            break;
        }
    }
    stats.decode = t0.elapsed() - stats.prefill;
    stats.failovers = ring.failovers;
    ring.close();
    Ok((out, stats))
}

/// Speculative decoding over the discovered ring (`specswarm_net::swarm_spec`): the same client
/// as over TCP, with libp2p streams, discovery-driven repair and replay.
impl SpecRing for P2pRing {
    fn open_session(&mut self, kv_tokens: u32, verify: VerifySpec) -> Result<(), RingError> {
        if self.stages.is_empty() {
            self.plan_connected(u64::from(kv_tokens))
                .map_err(|e| RingError::Unreachable { stage: 0, reason: e.to_string() })?;
        }
        // Replies to frames of an earlier session on these stages are stale from now on.
        self.epoch += 1;
        self.open_with(kv_tokens, true, Some(verify))
    }

    fn send_round(
        &mut self,
        positions: &[u32],
        tree_parents: Option<&[i32]>,
        spec: SpecRound,
    ) -> Result<u32, RingError> {
        let tokens = Input::Tokens(spec.tokens.clone());
        self.send(0, forward_message(tokens, positions, tree_parents, Some(spec)))
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<(usize, Frame), RingError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let rx = &mut self.replies_rx;
            let got = self.node.runtime().block_on(async { tokio::time::timeout(left, rx.recv()).await });
            let Ok(Some((conn, item))) = got else {
                let tail = self.stages.len().saturating_sub(1);
                return Err(RingError::Unreachable { stage: tail, reason: "no reply before the timeout".into() });
            };
            let Some(from) = self.stages.iter().position(|s| s.conn == conn) else { continue };
            let frame = item.map_err(|reason| RingError::Unreachable { stage: from, reason })?;
            if frame.session == self.session {
                return Ok((from, frame));
            }
        }
    }

    fn epoch(&self) -> u32 {
        self.epoch
    }

    fn bump_epoch(&mut self) {
        self.epoch += 1;
    }

    fn stages(&self) -> usize {
        self.stages.len()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn close_session(&mut self) {
        self.close();
    }

    fn repair(&mut self, cause: &RingError) -> Result<(), SwarmSpecError> {
        if let RingError::Refused { code, .. } = cause
            && *code != ErrorCode::UnknownSession
            && *code != ErrorCode::Internal
        {
            return Err(SwarmSpecError::Ring(cause.clone()));
        }
        let failed: Vec<usize> = (0..self.stages.len()).filter(|&i| !self.alive(i)).collect();
        let stage = failed.first().copied().unwrap_or(0);
        let dead: Vec<PeerId> = failed.iter().map(|&i| self.stages[i].cand.peer).collect();
        self.dead.extend(dead.iter().copied());
        for &p in &dead {
            self.node.forget(p);
        }
        self.stages.retain(|s| !dead.contains(&s.cand.peer));
        let fresh = discover_excluding(&self.node, &self.model_id, &self.dead);
        if !fresh.is_empty() {
            self.candidates = fresh;
        }
        // Plan for a default session size (every stage's Open checks the real budget again).
        self.plan_connected(specswarm_proto::limits::KV_TOKENS_PER_SESSION_DEFAULT as u64)
            .map_err(|_| SwarmSpecError::NoReplacement { stage, cause: cause.clone() })?;
        Ok(())
    }
}
