//! OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models[/{id}]`.
//!
//! Requests are parsed strictly (`deny_unknown_fields`): every field the official SDK can send
//! is declared; fields we cannot honour (`n > 1`, `logit_bias`, JSON mode…) are refused with a
//! 400 naming the parameter rather than silently ignored. Responses add one extension object,
//! `specswarm` (tokens/s and draft acceptance), which SDKs keep as an extra attribute.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use specswarm_engine::sampling::SamplerConfig;
use specswarm_proto::limits::{
    GATEWAY_COMPLETION_TOKENS_DEFAULT, GATEWAY_COMPLETION_TOKENS_MAX, GATEWAY_MESSAGES_MAX,
    GATEWAY_STOP_SEQUENCE_BYTES_MAX, GATEWAY_STOP_SEQUENCES_MAX, GATEWAY_TOOLS_MAX, GATEWAY_TOP_LOGPROBS_MAX,
};
use tokio::sync::mpsc;

use crate::backend::{Finish, GenerateRequest, Prompt, TokenLogprob};
use crate::corpus::Tenant;
use crate::error::ApiError;
use crate::prompt::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN, may_be_tool_call, parse_tool_calls};
use crate::session::{self, Done, Event};
use crate::{ApiKeyId, AppState, JsonBody};

pub(crate) fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}{:x}{n:04x}", t as u64 ^ u64::from(std::process::id()).rotate_left(40))
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

pub(crate) fn check_stops(stops: &[String], param: &str) -> Result<(), ApiError> {
    if stops.len() > GATEWAY_STOP_SEQUENCES_MAX {
        return Err(ApiError::invalid(format!("at most {GATEWAY_STOP_SEQUENCES_MAX} stop sequences"), Some(param)));
    }
    if stops.iter().any(|s| s.len() > GATEWAY_STOP_SEQUENCE_BYTES_MAX) {
        return Err(ApiError::invalid(
            format!("stop sequences are limited to {GATEWAY_STOP_SEQUENCE_BYTES_MAX} bytes"),
            Some(param),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub include_obfuscation: Option<bool>,
}

/// Message content: a string or a list of parts (only text parts are supported).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub image_url: Option<Value>,
    #[serde(default)]
    pub input_audio: Option<Value>,
    #[serde(default)]
    pub file: Option<Value>,
}

impl Content {
    fn into_text(self, param: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => out.push_str(&t),
                        (k, _) => {
                            return Err(ApiError::invalid(
                                format!("content parts of type {k:?} are not supported; only text"),
                                Some(param),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCallIn {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    // Sent back by clients that append a previous response message as is.
    #[serde(default)]
    pub refusal: Option<String>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub annotations: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDef {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceIn>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub logit_bias: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub service_tier: Option<String>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    // Accepted so that every SDK parameter parses; the ones that would change the answer are
    // refused in `plan_chat`, the rest (caching, moderation, routing hints) do not apply here.
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub prediction: Option<Value>,
    #[serde(default)]
    pub web_search_options: Option<Value>,
    #[serde(default)]
    pub moderation: Option<Value>,
    #[serde(default)]
    pub prompt_cache_key: Option<Value>,
    #[serde(default)]
    pub prompt_cache_options: Option<Value>,
    #[serde(default)]
    pub prompt_cache_retention: Option<Value>,
    #[serde(default)]
    pub safety_identifier: Option<Value>,
    #[serde(default)]
    pub verbosity: Option<Value>,
}

/// Sampling settings shared by the three APIs, validated.
pub(crate) struct SamplingIn {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingIn {
    pub fn build(self, default_temperature: f32) -> Result<SamplerConfig, ApiError> {
        let t = self.temperature.unwrap_or(default_temperature);
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid("temperature must be between 0 and 2", Some("temperature")));
        }
        let cfg = SamplerConfig {
            temperature: t,
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0) as usize,
            min_p: self.min_p.unwrap_or(0.0),
            seed: self.seed.unwrap_or(0) as u64,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            ..SamplerConfig::default()
        };
        if !(-2.0..=2.0).contains(&cfg.frequency_penalty) {
            return Err(ApiError::invalid("frequency_penalty must be between -2 and 2", Some("frequency_penalty")));
        }
        if !(-2.0..=2.0).contains(&cfg.presence_penalty) {
            return Err(ApiError::invalid("presence_penalty must be between -2 and 2", Some("presence_penalty")));
        }
        cfg.validate().map_err(|e| ApiError::invalid(e.to_string(), None))?;
        Ok(cfg)
    }
}

pub(crate) fn max_tokens(v: Option<u32>, default: usize, param: &str) -> Result<usize, ApiError> {
    let n = v.map_or(default, |v| v as usize);
    if n == 0 || n > GATEWAY_COMPLETION_TOKENS_MAX {
        return Err(ApiError::invalid(
            format!("{param} must be between 1 and {GATEWAY_COMPLETION_TOKENS_MAX}"),
            Some(param),
        ));
    }
    Ok(n)
}

/// How the request's tools shape generation.
#[derive(Clone, Debug, Default)]
pub(crate) struct ToolMode {
    /// Tool names, when generated text should be parsed for calls.
    pub names: Vec<String>,
    /// Text the answer is forced to start with (the opening of a call).
    pub prefix: String,
}

impl ToolMode {
    pub fn active(&self) -> bool {
        !self.names.is_empty()
    }

    /// "auto": parse calls; "required": force a call to some tool; `Some(name)`: to that tool.
    pub fn new(names: Vec<String>, choice: &str, named: Option<&str>) -> ToolMode {
        let prefix = match (choice, named) {
            (_, Some(n)) => format!("{TOOL_CALL_OPEN}\n{{\"name\": \"{n}\", \"arguments\": "),
            ("required", None) => format!("{TOOL_CALL_OPEN}\n{{\"name\": \""),
            _ => String::new(),
        };
        if choice == "none" { ToolMode::default() } else { ToolMode { names, prefix } }
    }

    /// Internal stop strings: a call is complete at its closing tag.
    pub fn stops(&self) -> Vec<String> {
        if self.active() { vec![TOOL_CALL_CLOSE.to_string()] } else { Vec::new() }
    }
}

/// A parsed chat request, ready to run.
struct ChatPlan {
    req: GenerateRequest,
    stops: Vec<String>,
    tools: ToolMode,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

fn plan_chat(r: ChatRequest) -> Result<ChatPlan, ApiError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    if r.logit_bias.as_ref().is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(ApiError::invalid("logit_bias is not supported", Some("logit_bias")));
    }
    if let Some(f) = &r.response_format
        && f.get("type").and_then(Value::as_str).is_some_and(|t| t != "text")
    {
        return Err(ApiError::invalid("only response_format type \"text\" is supported", Some("response_format")));
    }
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    for (name, v) in [("functions", &r.functions), ("function_call", &r.function_call), ("audio", &r.audio)] {
        if set(v) {
            return Err(ApiError::invalid(
                format!("{name} is not supported (use tools for function calling)"),
                Some(name),
            ));
        }
    }
    if set(&r.prediction) || set(&r.web_search_options) {
        return Err(ApiError::invalid("prediction and web_search_options are not supported", None));
    }
    if r.modalities.as_ref().is_some_and(|m| m.iter().any(|m| m != "text")) {
        return Err(ApiError::invalid("only the text modality is supported", Some("modalities")));
    }
    if r.messages.is_empty() || r.messages.len() > GATEWAY_MESSAGES_MAX {
        return Err(ApiError::invalid(
            format!("messages must hold 1 to {GATEWAY_MESSAGES_MAX} messages"),
            Some("messages"),
        ));
    }
    let max = max_tokens(r.max_completion_tokens.or(r.max_tokens), GATEWAY_COMPLETION_TOKENS_DEFAULT, "max_tokens")?;
    let logprobs = r.logprobs.unwrap_or(false);
    let top = r.top_logprobs.unwrap_or(0) as usize;
    if top > GATEWAY_TOP_LOGPROBS_MAX {
        return Err(ApiError::invalid(
            format!("top_logprobs must be at most {GATEWAY_TOP_LOGPROBS_MAX}"),
            Some("top_logprobs"),
        ));
    }
    if top > 0 && !logprobs {
        return Err(ApiError::invalid("top_logprobs needs logprobs = true", Some("top_logprobs")));
    }
    let stops = r.stop.map(StopField::into_vec).unwrap_or_default();
    check_stops(&stops, "stop")?;

    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => return Err(ApiError::invalid(format!("unknown role {other:?}"), Some(&param))),
        };
        let content = match m.content {
            Some(c) => c.into_text(&param)?,
            None if role == "assistant" && m.tool_calls.is_some() => String::new(),
            None => return Err(ApiError::invalid("content is required", Some(&format!("{param}.content")))),
        };
        let mut v = json!({"role": role, "content": content});
        if let Some(calls) = m.tool_calls {
            v["tool_calls"] = calls
                .into_iter()
                .map(|c| json!({"id": c.id, "type": c.kind, "function": {"name": c.function.name, "arguments": c.function.arguments}}))
                .collect();
        }
        if let Some(id) = m.tool_call_id {
            v["tool_call_id"] = id.into();
        }
        if let Some(n) = m.name {
            v["name"] = n.into();
        }
        messages.push(v);
    }

    let tool_defs = r.tools.unwrap_or_default();
    if tool_defs.len() > GATEWAY_TOOLS_MAX {
        return Err(ApiError::invalid(format!("at most {GATEWAY_TOOLS_MAX} tools"), Some("tools")));
    }
    if let Some(t) = tool_defs.iter().find(|t| t.kind != "function") {
        return Err(ApiError::invalid(format!("tool type {:?} is not supported", t.kind), Some("tools")));
    }
    let names: Vec<String> = tool_defs.iter().map(|t| t.function.name.clone()).collect();
    let (choice, named) = match &r.tool_choice {
        None => ("auto".to_string(), None),
        Some(ToolChoiceIn::Mode(m)) if ["none", "auto", "required"].contains(&m.as_str()) => (m.clone(), None),
        Some(ToolChoiceIn::Mode(m)) => {
            return Err(ApiError::invalid(
                format!("tool_choice {m:?} must be none, auto, required or a function"),
                Some("tool_choice"),
            ));
        }
        Some(ToolChoiceIn::Named(n)) => ("function".to_string(), Some(n.function.name.clone())),
    };
    if let Some(n) = &named
        && !names.contains(n)
    {
        return Err(ApiError::invalid(format!("tool_choice names {n:?}, which is not in tools"), Some("tool_choice")));
    }
    if names.is_empty() && (choice == "required" || named.is_some()) {
        return Err(ApiError::invalid("tool_choice requires tools", Some("tool_choice")));
    }
    let tools = ToolMode::new(names, &choice, named.as_deref());
    let tools_json = (!tool_defs.is_empty())
        .then(|| Value::Array(tool_defs.iter().map(|t| json!({"type": "function", "function": t.function})).collect()));
    let sampling = SamplingIn {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        min_p: r.min_p,
        seed: r.seed,
        frequency_penalty: r.frequency_penalty,
        presence_penalty: r.presence_penalty,
        repetition_penalty: r.repetition_penalty,
    }
    .build(1.0)?;
    let mut all_stops = stops;
    all_stops.extend(tools.stops());
    Ok(ChatPlan {
        req: GenerateRequest {
            model: r.model,
            prompt: Prompt::Chat { messages, tools: tools_json, assistant_prefix: tools.prefix.clone() },
            max_tokens: max,
            sampling,
            top_logprobs: logprobs.then_some(top),
            tenant: None,
        },
        stops: all_stops,
        tools,
        stream: r.stream.unwrap_or(false),
        include_usage: r.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        logprobs,
    })
}

fn logprob_json(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": lp.top.iter().map(|(t, l, b)| json!({"token": t, "logprob": l, "bytes": b})).collect::<Vec<_>>(),
    })
}

fn usage_json(d: &Done) -> Value {
    let o = &d.outcome;
    json!({"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens, "total_tokens": o.prompt_tokens + o.completion_tokens})
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::Cancelled => "stop",
        Finish::Length => "length",
    }
}

fn tool_calls_json(calls: &[crate::prompt::ParsedToolCall]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "id": new_id("call_"), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments.to_string()}})
        })
        .collect()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    key: Option<Extension<ApiKeyId>>,
    JsonBody(r): JsonBody<ChatRequest>,
) -> Response {
    match chat_inner(st, r, key.map(|k| k.0.0)).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(st: Arc<AppState>, r: ChatRequest, tenant: Tenant) -> Result<Response, ApiError> {
    let mut plan = plan_chat(r)?;
    plan.req.tenant = tenant;
    let model = plan.req.model.clone();
    let mut rx = session::start(&st, plan.req.clone(), plan.stops.clone())?;
    let id = new_id("chatcmpl-");
    let created = now_s();
    if !plan.stream {
        let (text, lps, done) = session::collect(rx).await?;
        let full = format!("{}{text}", plan.tools.prefix);
        let parsed = if plan.tools.active() { parse_tool_calls(&full, &plan.tools.names) } else { None };
        let (message, finish) = match parsed {
            Some((content, calls)) => (
                json!({"role": "assistant", "content": if content.is_empty() { Value::Null } else { content.into() },
                       "tool_calls": tool_calls_json(&calls).into_iter().map(|mut c| { c.as_object_mut().map(|o| o.remove("index")); c }).collect::<Vec<_>>(),
                       "refusal": null}),
                "tool_calls",
            ),
            None => (json!({"role": "assistant", "content": full, "refusal": null}), finish_str(done.finish)),
        };
        let logprobs = plan
            .logprobs
            .then(|| json!({"content": lps.iter().map(logprob_json).collect::<Vec<_>>(), "refusal": null}));
        return Ok(axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage_json(&done), "system_fingerprint": null, "specswarm": done.stats_json(),
        }))
        .into_response());
    }
    // Wait for the first event so that errors found before any token (a prompt over the
    // context, say) are still answered with their HTTP status.
    let first = rx.recv().await.ok_or_else(|| ApiError::Internal("generation ended early".into()))?;
    if let Event::Done(Err(e)) = first {
        return Err(e);
    }
    let chunk = move |delta: Value, finish: Option<&str>, lp: Option<Value>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": null,
               "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]})
    };
    let stream = chat_stream(rx, first, plan.tools, plan.include_usage, plan.logprobs, chunk);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The chunks of a streamed chat completion, ending with `[DONE]`.
fn chat_stream(
    rx: mpsc::Receiver<Event>,
    first: Event,
    tools: ToolMode,
    include_usage: bool,
    logprobs: bool,
    chunk: impl Fn(Value, Option<&str>, Option<Value>) -> Value + Send + 'static,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct S<F> {
        rx: mpsc::Receiver<Event>,
        first: Option<Event>,
        tools: ToolMode,
        // Text held back while it may still be a tool call (`None`: streaming freely).
        held: Option<String>,
        chunk: F,
        include_usage: bool,
        logprobs: bool,
        done: bool,
    }
    let held = tools.active().then(|| tools.prefix.clone());
    let s = S { rx, first: Some(first), tools, held, chunk, include_usage, logprobs, done: false };
    let first_chunk = (s.chunk)(json!({"role": "assistant", "content": ""}), None, None);
    let body = stream::unfold(s, |mut s| async move {
        if s.done {
            return None;
        }
        let ev = match s.first.take() {
            Some(ev) => Some(ev),
            None => s.rx.recv().await,
        };
        let mut out: Vec<String> = Vec::new();
        match ev {
            None => {
                s.done = true;
                out.push("[DONE]".into());
            }
            Some(Event::Token { text, logprob, .. }) => {
                let lp = if s.logprobs {
                    logprob.as_ref().map(|l| json!({"content": [logprob_json(l)], "refusal": null}))
                } else {
                    None
                };
                match &mut s.held {
                    Some(h) => {
                        h.push_str(&text);
                        if !may_be_tool_call(h) {
                            let text = s.held.take().unwrap_or_default();
                            out.push((s.chunk)(json!({"content": text}), None, lp).to_string());
                        } else if lp.is_some() {
                            out.push((s.chunk)(json!({"content": ""}), None, lp).to_string());
                        }
                    }
                    None if !text.is_empty() || lp.is_some() => {
                        out.push((s.chunk)(json!({"content": text}), None, lp).to_string());
                    }
                    None => {}
                }
            }
            Some(Event::Done(result)) => {
                s.done = true;
                match result {
                    Ok(d) => {
                        let mut finish = finish_str(d.finish);
                        if let Some(h) = s.held.take() {
                            match parse_tool_calls(&h, &s.tools.names) {
                                Some((content, calls)) => {
                                    if !content.is_empty() {
                                        out.push((s.chunk)(json!({"content": content}), None, None).to_string());
                                    }
                                    out.push(
                                        (s.chunk)(json!({"tool_calls": tool_calls_json(&calls)}), None, None)
                                            .to_string(),
                                    );
                                    finish = "tool_calls";
                                }
                                None if !h.is_empty() => {
                                    out.push((s.chunk)(json!({"content": h}), None, None).to_string())
                                }
                                None => {}
                            }
                        }
                        let mut last = (s.chunk)(json!({}), Some(finish), None);
                        last["specswarm"] = d.stats_json();
                        out.push(last.to_string());
                        if s.include_usage {
                            let mut u = (s.chunk)(json!({}), None, None);
                            u["choices"] = json!([]);
                            u["usage"] = usage_json(&d);
                            out.push(u.to_string());
                        }
                    }
                    Err(e) => out.push(e.openai_body().to_string()),
                }
                out.push("[DONE]".into());
            }
        }
        let events: Vec<Result<SseEvent, Infallible>> =
            out.into_iter().map(|d| Ok(SseEvent::default().data(d))).collect();
        Some((stream::iter(events), s))
    })
    .flatten();
    stream::once(async move { Ok(SseEvent::default().data(first_chunk.to_string())) }).chain(body)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptIn,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub logit_bias: Option<Value>,
}

/// `POST /v1/completions`.
pub async fn completions(
    State(st): State<Arc<AppState>>,
    key: Option<Extension<ApiKeyId>>,
    JsonBody(r): JsonBody<CompletionRequest>,
) -> Response {
    match completions_inner(st, r, key.map(|k| k.0.0)).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn completion_logprobs(lps: &[TokenLogprob], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut offsets = Vec::new();
    for l in lps {
        offsets.push(offset);
        offset += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, p, _)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

async fn completions_inner(st: Arc<AppState>, r: CompletionRequest, tenant: Tenant) -> Result<Response, ApiError> {
    if r.n.is_some_and(|n| n != 1) || r.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 and best_of = 1 are supported", Some("n")));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", Some("suffix")));
    }
    if r.logit_bias.as_ref().is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(ApiError::invalid("logit_bias is not supported", Some("logit_bias")));
    }
    let prompt = match r.prompt {
        PromptIn::One(p) => p,
        PromptIn::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptIn::Many(_) => return Err(ApiError::invalid("exactly one prompt is supported", Some("prompt"))),
    };
    let top = r.logprobs.map(|n| n as usize);
    if top.is_some_and(|n| n > GATEWAY_TOP_LOGPROBS_MAX) {
        return Err(ApiError::invalid(
            format!("logprobs must be at most {GATEWAY_TOP_LOGPROBS_MAX}"),
            Some("logprobs"),
        ));
    }
    let stops = r.stop.map(StopField::into_vec).unwrap_or_default();
    check_stops(&stops, "stop")?;
    let sampling = SamplingIn {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        min_p: r.min_p,
        seed: r.seed,
        frequency_penalty: r.frequency_penalty,
        presence_penalty: r.presence_penalty,
        repetition_penalty: r.repetition_penalty,
    }
    .build(1.0)?;
    let echo = r.echo.unwrap_or(false);
    let req = GenerateRequest {
        model: r.model.clone(),
        prompt: Prompt::Text(prompt.clone()),
        max_tokens: max_tokens(r.max_tokens, 16, "max_tokens")?,
        sampling,
        top_logprobs: top,
        tenant,
    };
    let mut rx = session::start(&st, req, stops)?;
    let (id, created, model) = (new_id("cmpl-"), now_s(), r.model);
    let prefix = if echo { prompt } else { String::new() };
    if !r.stream.unwrap_or(false) {
        let (text, lps, done) = session::collect(rx).await?;
        let logprobs = top.map(|_| completion_logprobs(&lps, prefix.len()));
        return Ok(axum::Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": format!("{prefix}{text}"), "logprobs": logprobs, "finish_reason": finish_str(done.finish)}],
            "usage": usage_json(&done), "specswarm": done.stats_json(),
        }))
        .into_response());
    }
    let first = rx.recv().await.ok_or_else(|| ApiError::Internal("generation ended early".into()))?;
    if let Event::Done(Err(e)) = first {
        return Err(e);
    }
    let include_usage = r.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let chunk = move |text: String, lp: Value, finish: Option<&str>| {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]})
    };
    let events = stream::unfold((Some(first), rx, false, prefix), move |(first, mut rx, done, prefix)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            let ev = match first {
                Some(e) => Some(e),
                None => rx.recv().await,
            };
            let mut out = Vec::new();
            let mut fin = false;
            match ev {
                Some(Event::Token { text, logprob, .. }) => {
                    let lp = match (&logprob, top) {
                        (Some(l), Some(_)) => completion_logprobs(std::slice::from_ref(l), 0),
                        _ => Value::Null,
                    };
                    let text = format!("{prefix}{text}");
                    if !text.is_empty() || !lp.is_null() {
                        out.push(chunk(text, lp, None).to_string());
                    }
                }
                Some(Event::Done(Ok(d))) => {
                    let mut last = chunk(String::new(), Value::Null, Some(finish_str(d.finish)));
                    last["specswarm"] = d.stats_json();
                    out.push(last.to_string());
                    if include_usage {
                        let mut u = chunk(String::new(), Value::Null, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage_json(&d);
                        out.push(u.to_string());
                    }
                    out.push("[DONE]".into());
                    fin = true;
                }
                Some(Event::Done(Err(e))) => {
                    out.push(e.openai_body().to_string());
                    out.push("[DONE]".into());
                    fin = true;
                }
                None => {
                    out.push("[DONE]".into());
                    fin = true;
                }
            }
            let evs: Vec<Result<SseEvent, Infallible>> =
                out.into_iter().map(|d| Ok(SseEvent::default().data(d))).collect();
            Some((stream::iter(evs), (None, rx, fin, String::new())))
        }
    })
    .flatten();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

fn model_json(m: &crate::backend::ModelInfo) -> Value {
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by,
           "available": m.available, "n_layers": m.n_layers, "context_length": m.context_len})
}

/// `GET /v1/models`: every model with its availability.
pub async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = st.backend.models().iter().map(model_json).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match st.backend.models().iter().find(|m| m.id == id) {
        Some(m) => axum::Json(model_json(m)).into_response(),
        None => ApiError::NotFound { message: format!("the model {id:?} does not exist"), code: "model_not_found" }
            .into_response(),
    }
}
