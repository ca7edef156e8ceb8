//! A ring with direct return, seen from the client: every stage is opened with the address of
//! the next one, the client sends a batch to the head, each stage forwards its output to the
//! next, and the tail's logits come straight back to the client. One token costs
//! (N + 1)·L + Σc instead of the client-driven 2·N·L + Σc.

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use specswarm_proto::wire::{Frame, Input, Message, SpecRound, VerifySpec};

use crate::ring::{RingError, RingSpec, forward_message, open_message, reply_for};
use crate::stage::decode_hidden;
use crate::tcp::read_frame;

pub struct DirectRing {
    writers: Vec<crate::delay::Sender>,
    addrs: Vec<SocketAddr>,
    rx: mpsc::Receiver<(usize, Result<Frame, String>)>,
    spec: RingSpec,
    session: u64,
    epoch: u32,
    seq: u32,
    committed: usize,
    timeout: Duration,
}

impl DirectRing {
    /// Connect to every stage (`addrs[i]` serves `spec.ranges[i]`); `timeout` bounds every wait.
    pub fn connect(
        addrs: &[SocketAddr],
        spec: RingSpec,
        session: u64,
        timeout: Duration,
    ) -> std::io::Result<DirectRing> {
        assert_eq!(addrs.len(), spec.ranges.len(), "one address per stage");
        let (tx, rx) = mpsc::channel();
        let mut writers = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            let s = TcpStream::connect_timeout(a, Duration::from_secs(10))?;
            s.set_nodelay(true)?;
            let mut reader = s.try_clone()?;
            let tx = tx.clone();
            std::thread::Builder::new().name(format!("ring-rx-{i}")).spawn(move || {
                loop {
                    let item = match read_frame(&mut reader) {
                        Ok(Ok(b)) => Frame::decode(&b).map_err(|e| e.to_string()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let stop = item.is_err();
                    if tx.send((i, item)).is_err() || stop {
                        return;
                    }
                }
            })?;
            writers.push(crate::delay::Sender::new(s));
        }
        Ok(DirectRing { writers, addrs: addrs.to_vec(), rx, spec, session, epoch: 0, seq: 0, committed: 0, timeout })
    }

    pub fn committed(&self) -> usize {
        self.committed
    }

    fn send(&mut self, stage: usize, message: Message) -> Result<u32, RingError> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame { session: self.session, epoch: self.epoch, seq: self.seq, message };
        self.writers[stage]
            .send(frame.encode())
            .map_err(|e| RingError::Unreachable { stage, reason: e.to_string() })?;
        Ok(self.seq)
    }

    /// The reply with sequence number `seq` from `stage`; an error from any stage for `seq`.
    fn wait(&mut self, stage: usize, seq: u32) -> Result<Message, RingError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (from, item) = self
                .rx
                .recv_timeout(left)
                .map_err(|_| RingError::Unreachable { stage, reason: "no reply before the timeout".into() })?;
            let frame = item.map_err(|reason| RingError::Unreachable { stage: from, reason })?;
            if let Some(reply) = reply_for(frame, from, stage, seq, self.session) {
                return reply;
            }
        }
    }

    /// Send `message` to every stage at once and collect every reply.
    fn all(&mut self, message: impl Fn() -> Message) -> Result<(), RingError> {
        let pending: Vec<Option<u32>> =
            (0..self.writers.len()).map(|i| self.send(i, message()).map(Some)).collect::<Result<_, _>>()?;
        self.collect(pending)
    }

    /// Wait for the reply of every stage with a pending sequence number.
    fn collect(&mut self, mut pending: Vec<Option<u32>>) -> Result<(), RingError> {
        let deadline = Instant::now() + self.timeout;
        while let Some(stage) = pending.iter().position(Option::is_some) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (from, item) = self
                .rx
                .recv_timeout(left)
                .map_err(|_| RingError::Unreachable { stage, reason: "no reply before the timeout".into() })?;
            let frame = item.map_err(|reason| RingError::Unreachable { stage: from, reason })?;
            if pending[from] != Some(frame.seq) || frame.session != self.session {
                continue;
            }
            if let Message::Error { code, message } = frame.message {
                return Err(RingError::Refused { stage: from, code, message });
            }
            pending[from] = None;
        }
        Ok(())
    }

    /// Open the session everywhere; the tail answers with logits.
    pub fn open(&mut self, max_tokens: u32) -> Result<(), RingError> {
        self.open_with(max_tokens, false)
    }

    /// Open the session everywhere; with `tail_argmax` the tail answers with token ids
    /// ([`DirectRing::forward_argmax`]).
    pub fn open_with(&mut self, max_tokens: u32, tail_argmax: bool) -> Result<(), RingError> {
        self.open_all(max_tokens, tail_argmax, None)
    }

    /// Open a speculative session: the tail verifies rounds with `verify` and answers them with
    /// verdicts (token ids only); plain forwards get argmax token ids.
    pub fn open_speculative(&mut self, max_tokens: u32, verify: VerifySpec) -> Result<(), RingError> {
        self.open_all(max_tokens, true, Some(verify))
    }

    fn open_all(&mut self, max_tokens: u32, tail_argmax: bool, verify: Option<VerifySpec>) -> Result<(), RingError> {
        let n = self.writers.len();
        // Every stage at once: each connects to its next hop while the others do the same.
        let mut pending: Vec<Option<u32>> = vec![None; n];
        for i in 0..n {
            let next_hop = (i + 1 < n).then(|| self.addrs[i + 1].to_string());
            let (model_id, range) = (self.spec.model_id, self.spec.ranges[i]);
            let open = open_message(i, n, model_id, range, next_hop, max_tokens, tail_argmax, verify.as_ref());
            pending[i] = Some(self.send(i, open)?);
        }
        self.collect(pending)?;
        self.committed = 0;
        Ok(())
    }

    /// The current epoch (frames of older epochs are stale).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Start a new epoch: replies to frames sent before are stale from now on.
    pub fn bump_epoch(&mut self) {
        self.epoch += 1;
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.writers.len()
    }

    /// The stages' addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Send a speculative round (or, with `spec.verify == false`, a plain causal batch carrying
    /// its tokens) to the head without waiting; returns its sequence number.
    pub fn send_round(
        &mut self,
        positions: &[u32],
        tree_parents: Option<&[i32]>,
        spec: SpecRound,
    ) -> Result<u32, RingError> {
        let tokens = Input::Tokens(spec.tokens.clone());
        self.send(0, forward_message(tokens, positions, tree_parents, Some(spec)))
    }

    /// The next frame of this session any stage sends back, waiting until `deadline`.
    pub fn next_frame(&mut self, deadline: Instant) -> Result<(usize, Frame), RingError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (from, item) = self.rx.recv_timeout(left).map_err(|_| RingError::Unreachable {
                stage: self.writers.len() - 1,
                reason: "no reply before the timeout".into(),
            })?;
            let frame = item.map_err(|reason| RingError::Unreachable { stage: from, reason })?;
            if frame.session == self.session {
                return Ok((from, frame));
            }
        }
    }

    /// How long one reply may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Send a batch to the head and return what the tail answers.
    fn forward_raw(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        tree_parents: Option<&[i32]>,
    ) -> Result<Input, RingError> {
        let seq = self.send(0, forward_message(Input::Tokens(tokens.to_vec()), positions, tree_parents, None))?;
        let tail = self.writers.len() - 1;
        match self.wait(tail, seq)? {
            Message::Output { input } => {
                if tree_parents.is_none() {
                    self.committed += tokens.len();
                }
                Ok(input)
            }
            _ => Err(RingError::Unexpected { stage: tail }),
        }
    }

    /// Send a batch to the head; the tail's logits come back directly.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        tree_parents: Option<&[i32]>,
    ) -> Result<Vec<f32>, RingError> {
        match self.forward_raw(tokens, positions, tree_parents)? {
            Input::Hidden { dtype, data, .. } => Ok(decode_hidden(dtype, &data)),
            Input::Tokens(_) => Err(RingError::Unexpected { stage: self.writers.len() - 1 }),
        }
    }

    /// Like [`DirectRing::forward`] on a session opened with `tail_argmax`: the argmax token id
    /// of each output row.
    pub fn forward_argmax(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        tree_parents: Option<&[i32]>,
    ) -> Result<Vec<u32>, RingError> {
        match self.forward_raw(tokens, positions, tree_parents)? {
            Input::Tokens(ids) => Ok(ids),
            Input::Hidden { .. } => Err(RingError::Unexpected { stage: self.writers.len() - 1 }),
        }
    }

    pub fn truncate(&mut self, len: usize) -> Result<(), RingError> {
        self.epoch += 1;
        self.all(|| Message::Truncate { len: len as u32 })?;
        self.committed = len;
        Ok(())
    }

    pub fn close(&mut self) -> Result<(), RingError> {
        self.all(|| Message::Close)
    }
}
