//! The swarm backend: models served by a ring of workers, found and built by a [`RingFactory`]
//! (the libp2p swarm in `specswarm gateway --swarm`), and driven by the speculative ring client
//! (`specswarm_net::swarm_spec`): the tail verifies with the request's sampler and sends back
//! token ids only. This process holds the tokenizer and chat template (and the drafter), never
//! the weights.
//!
//! Every request is its own session on every stage; when the client goes away the generation
//! stops at the next token and the session is closed on every stage.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use specswarm_engine::generate::FinishReason;
use specswarm_net::swarm_spec::{SpecRing, SwarmSpecSettings, generate_on_ring};
use specswarm_spec::drafter::{DraftBudget, Drafter, NoDraft};
use specswarm_spec::policy::{Policy, PolicyMode};

use crate::backend::{
    Backend, BackendError, CancelToken, Finish, GenerateOutcome, GenerateRequest, ModelInfo, SwarmStatus, TokenPiece,
    WorkerStatus,
};
use crate::corpus::Corpora;
use crate::metrics::Throughput;
use crate::prompt::PromptFormat;
use specswarm_spec::drafter::recipe::Recipe;

/// Finds workers for one model and builds rings through them.
pub trait RingFactory: Send + Sync {
    /// A ring covering every layer, for sessions of `kv_tokens`; the error says why there is
    /// none (the request gets 503).
    fn ring(&self, kv_tokens: usize) -> Result<Box<dyn SpecRing>, String>;
    /// Whether a whole ring exists now (from the last discovery).
    fn available(&self) -> bool;
    /// The workers known for this model.
    fn workers(&self) -> Vec<WorkerStatus>;
}

/// One model served by the swarm.
pub struct SwarmModel {
    pub id: String,
    format: PromptFormat,
    n_layers: usize,
    context_len: usize,
    factory: Box<dyn RingFactory>,
    /// The drafter (loaded once; one instance per request) and its draft length.
    drafter: Option<(Recipe, usize)>,
    /// Earlier answers per API key, for the suffix drafter.
    corpora: Corpora,
    /// Tree node budget B per round (at most the draft length: chains).
    tree_budget: usize,
    pipeline_depth: usize,
    active: AtomicUsize,
    throughput: Throughput,
}

impl SwarmModel {
    pub fn new(
        id: &str,
        path: &std::path::Path,
        factory: Box<dyn RingFactory>,
        drafter: Option<(Recipe, usize)>,
        pipeline_depth: usize,
    ) -> Result<SwarmModel, String> {
        let format = PromptFormat::from_gguf(path)?;
        let file = specswarm_engine::gguf::GgufFile::open(path).map_err(|e| e.to_string())?;
        let cfg = specswarm_engine::config::ModelConfig::from_gguf(&file).map_err(|e| e.to_string())?;
        Ok(SwarmModel {
            id: id.to_string(),
            format,
            n_layers: cfg.n_layers,
            context_len: cfg.context_len,
            factory,
            drafter,
            corpora: Corpora::default(),
            tree_budget: 0,
            pipeline_depth: pipeline_depth.max(1),
            active: AtomicUsize::new(0),
            throughput: Throughput::default(),
        })
    }

    /// Draft trees of `nodes` nodes per round (branching up to 3) instead of chains, when `nodes`
    /// exceeds the draft length; pipelined like chains.
    pub fn with_tree_budget(mut self, nodes: usize) -> SwarmModel {
        self.tree_budget = nodes;
        self
    }
}

/// Models served by rings of workers.
pub struct SwarmBackend {
    models: Vec<Arc<SwarmModel>>,
}

impl SwarmBackend {
    pub fn new(models: Vec<SwarmModel>) -> SwarmBackend {
        SwarmBackend { models: models.into_iter().map(Arc::new).collect() }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend for SwarmBackend {
    fn models(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|m| ModelInfo {
                id: m.id.clone(),
                available: m.factory.available(),
                n_layers: m.n_layers,
                context_len: m.context_len,
                owned_by: "specswarm-swarm".into(),
            })
            .collect()
    }

    fn swarm_status(&self) -> SwarmStatus {
        SwarmStatus { backend: "swarm".into(), workers: self.models.iter().flat_map(|m| m.factory.workers()).collect() }
    }

    fn generate(
        &self,
        req: &GenerateRequest,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(TokenPiece) -> bool,
    ) -> Result<GenerateOutcome, BackendError> {
        let m = self
            .models
            .iter()
            .find(|m| m.id == req.model)
            .ok_or_else(|| BackendError::UnknownModel(req.model.clone()))?;
        if req.top_logprobs.is_some() {
            return Err(BackendError::Invalid(
                "logprobs are not available through the swarm (only token ids leave the tail)".into(),
            ));
        }
        m.active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(&m.active);
        let prompt = m.format.encode(&req.prompt)?;
        if prompt.is_empty() {
            return Err(BackendError::Invalid("the prompt is empty".into()));
        }
        if prompt.len() + req.max_tokens > m.context_len {
            return Err(BackendError::ContextExceeded {
                prompt_tokens: prompt.len(),
                max_tokens: req.max_tokens,
                context: m.context_len,
            });
        }
        let (mut drafter, budget): (Box<dyn Drafter>, DraftBudget) = match &m.drafter {
            Some((recipe, len)) => {
                let drafter = recipe.instantiate(Some(&m.corpora.get(req.tenant)));
                let len = (*len).max(1);
                if m.tree_budget > len {
                    (drafter, DraftBudget { max_nodes: m.tree_budget, max_depth: len, max_branch: 3 })
                } else {
                    (drafter, DraftBudget::chain(len))
                }
            }
            None => (Box::new(NoDraft), DraftBudget::chain(1)),
        };
        let depth = if m.drafter.is_some() { m.pipeline_depth } else { 1 };
        let kv_tokens = prompt.len() + req.max_tokens + depth * (budget.max_nodes + 2) + 1;
        let mut ring = m.factory.ring(kv_tokens).map_err(|_| BackendError::Unavailable(req.model.clone()))?;
        let mut policy = Policy::new(PolicyMode::Fixed(budget));
        let settings = SwarmSpecSettings { depth_max: depth, adaptive_depth: true, ..SwarmSpecSettings::default() };
        let tok = &m.format.tokenizer;
        let mut decoder = specswarm_engine::tokenizer::StreamDecoder::new(tok, true);
        let mut emit = |id: u32| -> bool {
            m.throughput.add(1);
            let text = decoder.push(id);
            !cancel.is_cancelled() && on_token(TokenPiece { prompt_tokens: prompt.len(), id, text, logprob: None })
        };
        let (ids, finish, stats) = generate_on_ring(
            ring.as_mut(),
            drafter.as_mut(),
            &mut policy,
            &settings,
            &prompt,
            req.max_tokens,
            &req.sampling,
            tok.stop_ids(),
            &mut emit,
        )
        .map_err(|e| BackendError::Internal(e.to_string()))?;
        Ok(GenerateOutcome {
            finish: Some(match finish {
                FinishReason::Stop => Finish::Stop,
                FinishReason::Length => Finish::Length,
                FinishReason::Cancelled => Finish::Cancelled,
            }),
            prompt_tokens: prompt.len(),
            completion_tokens: ids.len(),
            drafted_tokens: stats.drafted_nodes,
            accepted_tokens: stats.accepted_tokens,
            prefill_s: 0.0,
            decode_s: stats.decode.as_secs_f64(),
        })
    }
}
