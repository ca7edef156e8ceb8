//! The specswarm gateway: OpenAI- and Anthropic-compatible HTTP APIs in front of a [`Backend`],
//! with API keys, rate limits, Prometheus metrics, a web chat and a live swarm dashboard.
//!
//! - [`app`] builds the axum [`Router`] from an [`AppState`]; handlers are tested without sockets.
//! - [`backend`]: the narrow [`Backend`] trait (models, swarm status, blocking generate with a
//!   cancel token and a token callback); [`local`]: whole models in this process, whose plain
//!   generations [`batch`] runs together (continuous batching, one scheduler thread per model).
//! - [`session`]: admission, the compute-slot queue, stop strings, cancellation on disconnect.
//! - [`openai`], [`anthropic`]: request/response shapes and streaming for each API.
//! - [`prompt`]: chat templates with tools, and tool calls parsed out of generated text.
//! - [`auth`]: API keys stored as sha256 in SQLite, token-bucket rate limits.
//! - [`metrics`]: counters, histograms and the `/metrics` text; [`pages`]: the two HTML pages.
//! - [`error`]: one error enum mapped to HTTP statuses and OpenAI/Anthropic error bodies.

pub mod anthropic;
pub mod auth;
pub mod backend;
pub mod batch;
pub mod corpus;
pub mod error;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod pages;
pub mod prompt;
pub mod session;
pub mod swarm;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Semaphore;

pub use backend::Backend;
use error::{AnthropicError, ApiError};
use metrics::{Gauges, Metrics};

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Generations computed at once; the rest wait in the queue. The local backend batches
    /// them (one forward per step for all of them), so this is also its batch width.
    pub parallel: usize,
    /// Generations held at once, running or queued; beyond it requests get 503.
    pub sessions_max: usize,
    /// Largest request body, in bytes (413 beyond).
    pub body_bytes_max: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            parallel: specswarm_proto::limits::GATEWAY_PARALLEL_DEFAULT,
            sessions_max: specswarm_proto::limits::GATEWAY_SESSIONS_MAX,
            body_bytes_max: specswarm_proto::limits::GATEWAY_REQUEST_BODY_BYTES_MAX,
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    /// `None`: no authentication (local demo).
    pub keys: Option<auth::KeyStore>,
    pub limiter: auth::RateLimiter,
    pub metrics: Metrics,
    pub config: GatewayConfig,
    /// Compute slots (`config.parallel` permits).
    pub slots: Arc<Semaphore>,
    /// Generations admitted and not yet finished (queued or running).
    pub sessions: AtomicUsize,
    /// Generations running on a compute slot.
    pub running: AtomicUsize,
    pub started: Instant,
}

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, keys: Option<auth::KeyStore>, config: GatewayConfig) -> Arc<AppState> {
        Arc::new(AppState {
            backend,
            keys,
            limiter: auth::RateLimiter::default(),
            metrics: Metrics::default(),
            slots: Arc::new(Semaphore::new(config.parallel.max(1))),
            config,
            sessions: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            started: Instant::now(),
        })
    }

    /// Generations running or queued.
    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

/// The whole HTTP surface.
pub fn app(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/messages", post(anthropic::messages))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/", get(pages::chat))
        .route("/swarm", get(pages::swarm))
        .route("/v1/swarm", get(swarm_status))
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError::NotFound { message: "no such route".into(), code: "not_found" }.into_response()
        })
        .layer(DefaultBodyLimit::max(state.config.body_bytes_max))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Request counts by route and status, and latency.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    st.metrics.count_request(&route, resp.status().as_u16());
    if route.starts_with("/v1/") && route != "/v1/swarm" {
        st.metrics.request_latency.observe(t0.elapsed());
    }
    resp
}

/// The id of the API key a request was authenticated with (a request extension; absent when the
/// gateway runs without keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiKeyId(pub i64);

/// API key check (`Authorization: Bearer sk-…` or `x-api-key: sk-…`) and the key's rate limit.
async fn authenticate(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let anthropic = req.uri().path() == "/v1/messages";
    let fail = |e: ApiError| if anthropic { AnthropicError(e).into_response() } else { e.into_response() };
    let Some(keys) = &st.keys else { return next.run(req).await };
    let h = req.headers();
    let key = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .map(str::to_string);
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return fail(ApiError::Unauthorized(
            "missing API key: send 'Authorization: Bearer sk-...' (create one with 'specswarm keys create')".into(),
        ));
    };
    let record = match keys.lookup(&key) {
        Ok(Some(r)) => r,
        Ok(None) => return fail(ApiError::Unauthorized("invalid API key".into())),
        Err(e) => return fail(ApiError::Internal(e.to_string())),
    };
    if let Err(wait_s) = st.limiter.take(record.id, record.rate_per_minute, Instant::now()) {
        return fail(ApiError::RateLimited { retry_after_s: wait_s.ceil().max(1.0) as u64 });
    }
    req.extensions_mut().insert(ApiKeyId(record.id));
    next.run(req).await
}

/// A JSON body parsed strictly: 413 over the size limit, 400 for malformed JSON, unknown fields
/// and wrong types, with serde's message (which names the field).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("the request body is larger than the gateway accepts".into())
            } else {
                ApiError::invalid(format!("cannot read the request body: {e}"), None)
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Strict JSON parsing with OpenAI-style 400 errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) => Ok(v),
        Err(e) => Err(match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ApiError::invalid(format!("malformed JSON in the request body: {e}"), None)
            }
            _ => ApiError::invalid(format!("invalid request body: {e}"), None),
        }),
    }
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let models = st.backend.models();
    let ok = models.iter().any(|m| m.available);
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(json!({"ready": ok, "models": models}))).into_response()
}

/// Live state for the dashboard and tests: workers, sessions, throughput.
async fn swarm_status(State(st): State<Arc<AppState>>) -> Response {
    let status = st.backend.swarm_status();
    let models = st.backend.models();
    axum::Json(json!({
        "backend": status.backend,
        "models": models,
        "workers": status.workers,
        "active_sessions": st.active_sessions(),
        "running_sessions": st.running.load(Ordering::SeqCst),
        "sessions_max": st.config.sessions_max,
        "parallel": st.config.parallel,
        "recent_tokens_per_s": st.metrics.throughput.recent_per_s(),
        "completion_tokens_total": st.metrics.completion_tokens.load(Ordering::Relaxed),
        "uptime_s": st.started.elapsed().as_secs_f64(),
    }))
    .into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let status = st.backend.swarm_status();
    let g = Gauges {
        active_sessions: st.active_sessions(),
        running_sessions: st.running.load(Ordering::SeqCst),
        models: st.backend.models().into_iter().map(|m| (m.id, m.available)).collect(),
        workers_healthy: status.workers.iter().filter(|w| w.healthy).count(),
        workers_total: status.workers.len(),
    };
    ([("content-type", "text/plain; version=0.0.4")], st.metrics.render(&g)).into_response()
}

/// Serve `app` on `listener` until ctrl-c (or until `shutdown` resolves).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).await
}
