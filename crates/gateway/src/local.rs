//! The local backend: whole models in this process (engine [`ModelSlice`]), optionally with a
//! model-free speculative drafter (`specswarm_spec::decode`). Greedy output is the same with and
//! without the drafter (speculation is lossless); log-probabilities need the plain path, which is
//! used whenever they are asked for.
//!
//! **Plain generations are batched** ([`crate::batch`]): each model has one scheduler thread
//! that owns the caches of all its plain generations and runs their prefill chunks and decode
//! tokens through one [`ModelSlice::forward_many`] per step, admitting new requests between
//! steps. The request's own thread (the caller of [`Backend::generate`]) tokenizes, submits,
//! and turns the tokens that come back into text and log-probabilities. Output is token for
//! token what the request gets alone. **Speculative generations are not batched**: a request on
//! a model with a drafter runs its own rounds (`generate_speculative`) on the calling thread,
//! beside the scheduler, as before — verification trees of several requests could share a step
//! too, but the speculative loop owns its cache and its forward calls today.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;

use specswarm_engine::generate::FinishReason;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::{StreamDecoder, Tokenizer};
use specswarm_spec::drafter::DraftBudget;
use specswarm_spec::drafter::recipe::Recipe;
use specswarm_spec::policy::{Policy, PolicyMode};

use crate::backend::{
    Backend, BackendError, CancelToken, Finish, GenerateOutcome, GenerateRequest, ModelInfo, SwarmStatus, TokenLogprob,
    TokenPiece, WorkerStatus,
};
use crate::batch::{BatchStats, Job, Msg, Scheduler};
use crate::corpus::Corpora;
use crate::metrics::Throughput;
use crate::prompt::PromptFormat;

/// One served model.
pub struct LocalModel {
    pub id: String,
    pub path: PathBuf,
    slice: Arc<ModelSlice>,
    format: PromptFormat,
    /// The batch scheduler of plain generations.
    scheduler: Scheduler,
    /// The drafter (loaded once; one instance per request) and its draft length.
    drafter: Option<(Recipe, usize)>,
    /// Earlier answers per API key, for the suffix drafter.
    corpora: Corpora,
    active: AtomicUsize,
    throughput: Throughput,
}

impl LocalModel {
    /// Load `path` as model `id` with `threads` compute threads (0: one per core) and an optional
    /// drafter with draft length `draft_len`.
    pub fn load(id: &str, path: &Path, threads: usize, drafter: Option<(Recipe, usize)>) -> Result<LocalModel, String> {
        let slice = ModelSlice::load(path, &LoadOptions { layers: None, threads, ..Default::default() })
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        let format = PromptFormat::from_gguf(path)?;
        let slice = Arc::new(slice);
        let scheduler = Scheduler::spawn(id, slice.clone(), format.tokenizer.stop_ids().to_vec())?;
        Ok(LocalModel {
            id: id.to_string(),
            path: path.to_path_buf(),
            slice,
            format,
            scheduler,
            drafter,
            corpora: Corpora::default(),
            active: AtomicUsize::new(0),
            throughput: Throughput::default(),
        })
    }

    pub fn format(&self) -> &PromptFormat {
        &self.format
    }

    /// Counters of the batched steps this model has run.
    pub fn batch_stats(&self) -> BatchStats {
        self.scheduler.stats()
    }
}

/// Whole models in this process.
pub struct LocalBackend {
    models: Vec<Arc<LocalModel>>,
}

impl LocalBackend {
    pub fn new(models: Vec<LocalModel>) -> LocalBackend {
        LocalBackend { models: models.into_iter().map(Arc::new).collect() }
    }

    pub fn model(&self, id: &str) -> Option<&Arc<LocalModel>> {
        self.models.iter().find(|m| m.id == id)
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend for LocalBackend {
    fn models(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|m| ModelInfo {
                id: m.id.clone(),
                available: true,
                n_layers: m.slice.config().n_layers,
                context_len: m.slice.config().context_len,
                owned_by: "specswarm-local".into(),
            })
            .collect()
    }

    fn swarm_status(&self) -> SwarmStatus {
        SwarmStatus {
            backend: "local".into(),
            workers: self
                .models
                .iter()
                .map(|m| WorkerStatus {
                    id: format!("local/{}", m.id),
                    address: "in-process".into(),
                    model: m.id.clone(),
                    layers: [0, m.slice.config().n_layers],
                    healthy: true,
                    rtt_ms: Some(0.0),
                    tokens_per_s: m.throughput.recent_per_s(),
                    active_sessions: m.active.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    fn generate(
        &self,
        req: &GenerateRequest,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(TokenPiece) -> bool,
    ) -> Result<GenerateOutcome, BackendError> {
        let m = self.model(&req.model).ok_or_else(|| BackendError::UnknownModel(req.model.clone()))?;
        m.active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(&m.active);
        let prompt = m.format.encode(&req.prompt)?;
        if prompt.is_empty() {
            return Err(BackendError::Invalid("the prompt is empty".into()));
        }
        let context = m.slice.config().context_len;
        if prompt.len() + req.max_tokens > context {
            return Err(BackendError::ContextExceeded {
                prompt_tokens: prompt.len(),
                max_tokens: req.max_tokens,
                context,
            });
        }
        let mut sampler = Sampler::new(req.sampling.clone()).map_err(|e| BackendError::Invalid(e.to_string()))?;
        let tok = &m.format.tokenizer;
        let mut decoder = StreamDecoder::new(tok, true);
        let mut emit = |id: u32, logprob: Option<TokenLogprob>| -> bool {
            m.throughput.add(1);
            let text = decoder.push(id);
            !cancel.is_cancelled() && on_token(TokenPiece { prompt_tokens: prompt.len(), id, text, logprob })
        };
        let mut outcome = GenerateOutcome { prompt_tokens: prompt.len(), ..Default::default() };
        let finish = match (&m.drafter, req.top_logprobs) {
            (Some((recipe, draft_len)), None) => {
                let mut drafter = recipe.instantiate(Some(&m.corpora.get(req.tenant)));
                let mut policy = Policy::new(PolicyMode::Fixed(DraftBudget::chain(*draft_len)));
                let (ids, finish, s) = specswarm_spec::decode::generate_speculative(
                    &m.slice,
                    drafter.as_mut(),
                    &mut policy,
                    &prompt,
                    req.max_tokens,
                    &mut sampler,
                    tok.stop_ids(),
                    &mut |id| emit(id, None),
                )
                .map_err(|e| BackendError::Internal(e.to_string()))?;
                outcome.completion_tokens = ids.len();
                outcome.drafted_tokens = s.drafted_nodes;
                outcome.accepted_tokens = s.accepted_tokens;
                outcome.prefill_s = s.prefill.as_secs_f64();
                outcome.decode_s = s.decode.as_secs_f64();
                finish
            }
            _ => decode_batched(m, &prompt, req, sampler, &mut emit, &mut outcome)?,
        };
        outcome.finish = Some(match finish {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
            FinishReason::Cancelled => Finish::Cancelled,
        });
        Ok(outcome)
    }
}

/// Plain decoding through the model's batch scheduler: submit, then report each token that
/// comes back. When `emit` declines a token the scheduler is told to drop the sequence; its
/// `Done` (with the timings) still comes, and the tokens computed meanwhile are not reported.
fn decode_batched(
    m: &LocalModel,
    prompt: &[u32],
    req: &GenerateRequest,
    sampler: Sampler,
    emit: &mut dyn FnMut(u32, Option<TokenLogprob>) -> bool,
    outcome: &mut GenerateOutcome,
) -> Result<FinishReason, BackendError> {
    let (tx, rx) = sync_channel(specswarm_proto::limits::GATEWAY_STREAM_EVENTS_BUFFERED_MAX);
    let cancel = CancelToken::default();
    let job = Job {
        prompt: prompt.to_vec(),
        max_tokens: req.max_tokens,
        sampler,
        want_logits: req.top_logprobs.is_some(),
        cancel: cancel.clone(),
        tx,
    };
    m.scheduler.submit(job).map_err(BackendError::Internal)?;
    let tok = &m.format.tokenizer;
    let mut reported = 0;
    let mut declined = false;
    loop {
        match rx.recv() {
            Ok(Msg::Token { .. }) if declined => {}
            Ok(Msg::Token { id, logits }) => {
                let lp = req.top_logprobs.zip(logits).map(|(n, logits)| logprobs(tok, &logits, id, n));
                reported += 1;
                if !emit(id, lp) {
                    declined = true;
                    cancel.cancel();
                }
            }
            Ok(Msg::Done(result)) => {
                let s = result.map_err(BackendError::Internal)?;
                outcome.prefill_s = s.prefill_s;
                outcome.decode_s = s.decode_s;
                if declined {
                    outcome.completion_tokens = reported;
                    return Ok(FinishReason::Cancelled);
                }
                outcome.completion_tokens = s.completion_tokens;
                return Ok(s.finish);
            }
            Err(_) => return Err(BackendError::Internal("the model's batch scheduler stopped".into())),
        }
    }
}

/// Natural-log probabilities of `id` and of the `n` most likely tokens under softmax(`logits`).
pub fn logprobs(tok: &Tokenizer, logits: &[f32], id: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().filter(|l| l.is_finite()).map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |i: u32| (f64::from(logits[i as usize]) - lse) as f32;
    let piece = |i: u32| {
        let b = tok.token_bytes(i).to_vec();
        (String::from_utf8_lossy(&b).into_owned(), b)
    };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_logit);
    }
    idx.truncate(n);
    idx.sort_by(by_logit);
    let (token, bytes) = piece(id);
    TokenLogprob {
        token,
        logprob: lp(id),
        bytes,
        top: idx
            .into_iter()
            .map(|i| {
                let (t, b) = piece(i);
                (t, lp(i), b)
            })
            .collect(),
    }
}
