//! The seam between the HTTP front and whatever runs the model: one narrow trait.
//!
//! A [`Backend`] answers three questions: which models it serves and whether each is available
//! now ([`Backend::models`]), what its workers look like ([`Backend::swarm_status`], for the
//! dashboard and metrics), and "generate this" ([`Backend::generate`]). The local backend
//! (`crate::local`) runs whole models in this process; a swarm backend implements the same trait
//! over a ring of workers. Everything protocol-specific (OpenAI/Anthropic shapes, stop strings,
//! tool-call parsing, auth, queueing) stays in the gateway, above this trait.
//!
//! Contract of [`Backend::generate`]:
//! - it is **blocking** (the gateway calls it on a blocking thread, at most `parallel` at once);
//! - it renders [`Prompt::Chat`] with the model's chat template (see [`crate::prompt`]) and
//!   tokenizes it, or tokenizes [`Prompt::Text`] as is;
//! - it calls `on_token` once per generated token, in order, with the token's text (UTF-8 held
//!   back until complete; special tokens give empty text), the prompt's length in tokens and,
//!   when asked, its log-probabilities;
//! - it stops as soon as `on_token` returns `false` or `cancel` is set, frees the session's
//!   resources and returns [`Finish::Cancelled`]; a stop token ends with [`Finish::Stop`]
//!   (its text is not reported), `max_tokens` with [`Finish::Length`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use specswarm_engine::sampling::SamplerConfig;

/// A cancellation flag shared between the HTTP side and a running generation.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What to continue.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Messages (`{"role", "content": string}` plus, for tool round trips, `tool_calls` on
    /// assistant turns and `tool_call_id`/`name` on tool turns), optional tools (OpenAI function
    /// definitions), and text that the assistant's answer is forced to begin with (it is part of
    /// the prompt, not reported as generated).
    Chat { messages: Vec<serde_json::Value>, tools: Option<serde_json::Value>, assistant_prefix: String },
    /// Raw text, tokenized with the model's BOS rule.
    Text(String),
}

/// One generation request, already validated and bounded by the gateway.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// `Some(n)`: report each token's log-probability and the `n` most likely alternatives.
    pub top_logprobs: Option<usize>,
    /// Whose earlier answers the drafter may reuse (the API key; see [`crate::corpus`]).
    pub tenant: crate::corpus::Tenant,
}

/// Log-probability of a generated token and of its most likely alternatives (natural log, over
/// the model's raw distribution before temperature and filters).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top: Vec<(String, f32, Vec<u8>)>,
}

/// One generated token as the backend reports it.
#[derive(Clone, Debug)]
pub struct TokenPiece {
    /// Length of the rendered prompt in tokens (the same in every piece of a generation).
    pub prompt_tokens: usize,
    pub id: u32,
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

/// Counts and timings of one finished generation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GenerateOutcome {
    pub finish: Option<Finish>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Draft tokens sent to the target and accepted (0 without speculation).
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Errors a backend reports; the gateway maps them to HTTP statuses.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("model {0:?} is not served here")]
    UnknownModel(String),
    #[error("model {0:?} has no available backend")]
    Unavailable(String),
    #[error("the prompt has {prompt_tokens} tokens and asks for {max_tokens} more; the context is {context} tokens")]
    ContextExceeded { prompt_tokens: usize, max_tokens: usize, context: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("generation failed: {0}")]
    Internal(String),
}

/// A model the backend serves.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub id: String,
    /// Whether a generation could start now (a whole ring, or the local model, is up).
    pub available: bool,
    pub n_layers: usize,
    pub context_len: usize,
    pub owned_by: String,
}

/// One worker as the dashboard shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    pub id: String,
    pub address: String,
    pub model: String,
    /// Half-open layer range `[start, end)`.
    pub layers: [usize; 2],
    pub healthy: bool,
    pub rtt_ms: Option<f64>,
    /// Tokens/s this worker processed recently.
    pub tokens_per_s: f64,
    pub active_sessions: usize,
}

/// The backend's workers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwarmStatus {
    pub backend: String,
    pub workers: Vec<WorkerStatus>,
}

/// What serves the models. See the module docs for the contract.
pub trait Backend: Send + Sync + 'static {
    /// The models served and whether each is available now.
    fn models(&self) -> Vec<ModelInfo>;

    /// The workers behind the models (the local backend: one worker covering all layers).
    fn swarm_status(&self) -> SwarmStatus;

    /// Run one generation (blocking). See the module docs.
    fn generate(
        &self,
        request: &GenerateRequest,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(TokenPiece) -> bool,
    ) -> Result<GenerateOutcome, BackendError>;
}
