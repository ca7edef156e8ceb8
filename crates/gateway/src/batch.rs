//! Continuous batching for the local backend: one scheduler thread per model owns every plain
//! generation's KV cache and runs all of them through the model together.
//!
//! A request's own (blocking) thread renders and tokenizes the prompt, builds its sampler and
//! submits a [`Job`] to the model's bounded queue ([`GATEWAY_BATCH_QUEUE_REQUESTS_MAX`]; the
//! submitting thread waits when it is full). The scheduler loops:
//!
//! 1. **Admit** every job already queued (up to [`GATEWAY_BATCH_SEQUENCES_MAX`] sequences) —
//!    between steps, never waiting for more, so a lone request adds no latency.
//! 2. **Deliver and retire**: messages a request's channel had no room for are retried; a
//!    sequence whose request was cancelled (client gone, stop string, `on_token` said no) or
//!    whose receiver is gone is dropped with its cache.
//! 3. **Gather** one step per runnable sequence: its sampled token (decode), or the next chunk
//!    of its prompt (prefill; `Want::Hidden` until the chunk that ends the prompt). Decode rows
//!    come first, prompt chunks fill the rest of [`GATEWAY_BATCH_STEP_TOKENS_MAX`] rows, so a
//!    long prompt delays the others by at most one chunk per token.
//! 4. **One [`ModelSlice::forward_many`]** over all of them, then per sequence: sample with its
//!    own sampler and history, and send the token (and its raw logits when log-probabilities
//!    were asked for) to the request's channel; a stop token or `max_tokens` ends it.
//!
//! Every kernel is batch-invariant and a chunked causal prefill writes the same cache rows as
//! a one-shot one, so each sequence gets bit for bit the logits it would get alone, and with
//! its own seeded sampler the same tokens (`tests/batching.rs`).
//!
//! **Backpressure without stalls**: a request's channel is bounded
//! (`GATEWAY_STREAM_EVENTS_BUFFERED_MAX`, by the local backend) and written with `try_send`. A full channel (a slow
//! client) parks that sequence — it is left out of steps until its message is taken — instead of
//! blocking the scheduler and every other sequence. When every sequence is parked the
//! scheduler polls its queue every [`PARKED_POLL`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use specswarm_engine::generate::FinishReason;
use specswarm_engine::kv::KvCache;
use specswarm_engine::model::{Batch, ModelSlice, Step, StepInput, StepOutput, Want};
use specswarm_engine::sampling::Sampler;
use specswarm_proto::limits::{
    GATEWAY_BATCH_QUEUE_REQUESTS_MAX, GATEWAY_BATCH_SEQUENCES_MAX, GATEWAY_BATCH_STEP_TOKENS_MAX,
};

use crate::backend::CancelToken;

/// How often a scheduler whose every sequence is parked on a full channel looks again.
const PARKED_POLL: Duration = Duration::from_millis(1);

/// One plain generation, validated and tokenized by the request's thread.
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: Sampler,
    /// Send each token's raw logits along (for log-probabilities).
    pub want_logits: bool,
    /// Set by the request's thread when it stops listening (any reason).
    pub cancel: CancelToken,
    pub tx: SyncSender<Msg>,
}

/// What the scheduler sends a request, in order: tokens, then one `Done`.
pub(crate) enum Msg {
    Token { id: u32, logits: Option<Vec<f32>> },
    Done(Result<Summary, String>),
}

/// How a sequence ended, as the scheduler saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Summary {
    pub finish: FinishReason,
    /// Tokens sampled, a stop token included (the engine's `generate` counts the same way).
    pub completion_tokens: usize,
    /// Wall time from the sequence's first step to its first logits.
    pub prefill_s: f64,
    /// Wall time from its first logits to its end.
    pub decode_s: f64,
}

/// Counters of a model's batched steps (for tests and tuning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// `forward_many` calls.
    pub steps: u64,
    /// Sequences stepped, summed over steps (`sequences / steps` is the mean batch width).
    pub sequences: u64,
    /// Rows (tokens) computed, summed over steps.
    pub rows: u64,
    /// The most sequences in one step.
    pub widest: usize,
}

#[derive(Default)]
struct Counters {
    steps: AtomicU64,
    sequences: AtomicU64,
    rows: AtomicU64,
    widest: AtomicUsize,
}

/// The handle a model keeps: its scheduler's queue. Dropping it ends the scheduler once its
/// sequences are done.
pub(crate) struct Scheduler {
    queue: SyncSender<Job>,
    counters: Arc<Counters>,
}

impl Scheduler {
    /// Start the scheduler thread of `slice` (which must hold the whole model).
    pub fn spawn(name: &str, slice: Arc<ModelSlice>, stop_ids: Vec<u32>) -> Result<Scheduler, String> {
        let (queue, jobs) = sync_channel(GATEWAY_BATCH_QUEUE_REQUESTS_MAX);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name(format!("batch-{name}"))
            .spawn(move || Runner { slice, stop_ids, jobs, counters: c, seqs: Vec::new() }.run())
            .map_err(|e| format!("starting the batch scheduler: {e}"))?;
        Ok(Scheduler { queue, counters })
    }

    /// Queue `job` (waits while the queue is full); `Err` if the scheduler has stopped.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.queue.send(job).map_err(|_| "the model's batch scheduler has stopped".to_string())
    }

    pub fn stats(&self) -> BatchStats {
        let c = &self.counters;
        BatchStats {
            steps: c.steps.load(Ordering::Relaxed),
            sequences: c.sequences.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            widest: c.widest.load(Ordering::Relaxed),
        }
    }
}

/// One admitted generation.
struct Seq {
    job: Job,
    kv: KvCache,
    /// Prompt and sampled tokens (the samplers' penalties read it).
    history: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The sampled token not yet in the cache (decoding); `None` while prefilling.
    next: Option<u32>,
    generated: usize,
    /// Messages the request's channel had no room for yet, oldest first (at most a token and
    /// a `Done`).
    outbox: VecDeque<Msg>,
    /// Set once its `Done` is in the outbox: nothing more to compute.
    finished: bool,
    started: Option<Instant>,
    first_logits: Option<Instant>,
}

impl Seq {
    fn new(job: Job, slice: &ModelSlice) -> Seq {
        let kv = slice.new_cache(job.prompt.len() + job.max_tokens);
        let history = job.prompt.clone();
        Seq {
            job,
            kv,
            history,
            prefilled: 0,
            next: None,
            generated: 0,
            outbox: VecDeque::new(),
            finished: false,
            started: None,
            first_logits: None,
        }
    }

    fn summary(&self, finish: FinishReason) -> Summary {
        let now = Instant::now();
        let started = self.started.unwrap_or(now);
        let first = self.first_logits.unwrap_or(now);
        Summary {
            finish,
            completion_tokens: self.generated,
            prefill_s: (first - started).as_secs_f64(),
            decode_s: (now - first).as_secs_f64(),
        }
    }

    fn finish(&mut self, result: Result<Summary, String>) {
        self.outbox.push_back(Msg::Done(result));
        self.finished = true;
    }

    /// Send what the outbox holds; `false` if the request is gone.
    fn deliver(&mut self) -> bool {
        while let Some(msg) = self.outbox.pop_front() {
            match self.job.tx.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    self.outbox.push_front(msg);
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        true
    }

    /// Whether it takes part in the next step.
    fn runnable(&self) -> bool {
        !self.finished && self.outbox.is_empty()
    }

    /// Its logits (the last row of a step that ended the prompt, or a decode step) arrived.
    fn on_logits(&mut self, logits: Vec<f32>, stop_ids: &[u32]) {
        self.first_logits.get_or_insert_with(Instant::now);
        let id = self.job.sampler.sample(&logits, &self.history);
        self.generated += 1;
        self.history.push(id);
        if stop_ids.contains(&id) {
            let s = self.summary(FinishReason::Stop);
            return self.finish(Ok(s));
        }
        let logits = self.job.want_logits.then_some(logits);
        self.outbox.push_back(Msg::Token { id, logits });
        if self.generated == self.job.max_tokens {
            let s = self.summary(FinishReason::Length);
            return self.finish(Ok(s));
        }
        self.next = Some(id);
    }
}

/// The scheduler thread's state.
struct Runner {
    slice: Arc<ModelSlice>,
    stop_ids: Vec<u32>,
    jobs: Receiver<Job>,
    counters: Arc<Counters>,
    seqs: Vec<Seq>,
}

impl Runner {
    fn run(mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.retire();
            if !self.step() {
                // Every sequence is parked on a full channel (or none is left): wait for room
                // or a new job.
                if self.seqs.len() >= GATEWAY_BATCH_SEQUENCES_MAX {
                    std::thread::sleep(PARKED_POLL);
                    continue;
                }
                match self.jobs.recv_timeout(PARKED_POLL) {
                    Ok(job) => self.add(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if self.seqs.is_empty() => return,
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(PARKED_POLL),
                }
            }
        }
    }

    /// Take every job already queued; block for one when idle. `false`: the model is gone and
    /// nothing is left to do.
    fn admit(&mut self) -> bool {
        if self.seqs.is_empty() {
            match self.jobs.recv() {
                Ok(job) => self.add(job),
                Err(_) => return false,
            }
        }
        while self.seqs.len() < GATEWAY_BATCH_SEQUENCES_MAX {
            match self.jobs.try_recv() {
                Ok(job) => self.add(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        true
    }

    fn add(&mut self, job: Job) {
        let mut seq = Seq::new(job, &self.slice);
        if seq.job.max_tokens == 0 {
            let s = seq.summary(FinishReason::Length);
            seq.finish(Ok(s));
        }
        self.seqs.push(seq);
    }

    /// Deliver pending messages; drop sequences that are done, cancelled or unheard.
    fn retire(&mut self) {
        self.seqs.retain_mut(|s| {
            if !s.finished && s.job.cancel.is_cancelled() {
                // The request stopped listening; it still waits for the `Done` (and its timings).
                s.outbox.clear();
                let summary = s.summary(FinishReason::Cancelled);
                s.finish(Ok(summary));
            }
            s.deliver() && !(s.finished && s.outbox.is_empty())
        });
    }

    /// Run one batched step over every runnable sequence; `false` if none could run.
    fn step(&mut self) -> bool {
        // Decode rows first, then prompt chunks in arrival order within the step's row budget.
        let mut budget = GATEWAY_BATCH_STEP_TOKENS_MAX;
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, s) in self.seqs.iter().enumerate() {
            if s.runnable() && s.next.is_some() && budget > 0 {
                plan.push((i, 0..1));
                budget -= 1;
            }
        }
        for (i, s) in self.seqs.iter().enumerate() {
            if s.runnable() && s.next.is_none() && budget > 0 {
                let end = s.job.prompt.len().min(s.prefilled + budget);
                plan.push((i, s.prefilled..end));
                budget -= end - s.prefilled;
            }
        }
        if plan.is_empty() {
            return false;
        }
        let now = Instant::now();
        let inputs: Vec<(Vec<u32>, Vec<u32>, Want)> = plan
            .iter()
            .map(|(i, rows)| {
                let s = &self.seqs[*i];
                let base = s.kv.len() as u32;
                match s.next {
                    Some(id) => (vec![id], vec![base], Want::LastLogits),
                    None => {
                        let want = if rows.end == s.job.prompt.len() { Want::LastLogits } else { Want::Hidden };
                        let positions = (base..base + rows.len() as u32).collect();
                        (s.job.prompt[rows.clone()].to_vec(), positions, want)
                    }
                }
            })
            .collect();
        // Every planned sequence's cache, borrowed at once (`plan` is in no particular order).
        let mut caches: Vec<Option<&mut KvCache>> = self.seqs.iter_mut().map(|s| Some(&mut s.kv)).collect();
        let mut steps: Vec<Step<'_>> = plan
            .iter()
            .zip(&inputs)
            .map(|((i, _), (tokens, positions, want))| Step {
                kv: caches[*i].take().expect("each sequence is planned once"),
                batch: Batch { input: StepInput::Tokens(tokens), positions, tree_parents: None },
                want: *want,
            })
            .collect();
        let outs = self.slice.forward_many(&mut steps);
        drop(steps);
        let rows: usize = inputs.iter().map(|(t, _, _)| t.len()).sum();
        let c = &self.counters;
        c.steps.fetch_add(1, Ordering::Relaxed);
        c.sequences.fetch_add(plan.len() as u64, Ordering::Relaxed);
        c.rows.fetch_add(rows as u64, Ordering::Relaxed);
        c.widest.fetch_max(plan.len(), Ordering::Relaxed);
        for ((i, range), out) in plan.into_iter().zip(outs) {
            let s = &mut self.seqs[i];
            s.started.get_or_insert(now);
            match out {
                Err(e) => s.finish(Err(e.to_string())),
                Ok(StepOutput::Hidden { .. }) => s.prefilled = range.end,
                Ok(StepOutput::Logits { data, .. }) => {
                    if s.next.is_none() {
                        s.prefilled = range.end;
                    }
                    s.on_logits(data, &self.stop_ids);
                }
            }
            // Send at once; a full channel leaves the message in the outbox (parked).
            if !s.deliver() {
                s.job.cancel.cancel();
            }
        }
        true
    }
}
