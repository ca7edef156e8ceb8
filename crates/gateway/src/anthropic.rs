//! Anthropic-compatible `POST /v1/messages`, streaming included (`message_start`,
//! `content_block_start/delta/stop`, `message_delta`, `message_stop`). Tools become OpenAI-style
//! function definitions for the chat template; generated tool calls become `tool_use` blocks.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use specswarm_proto::limits::{GATEWAY_MESSAGES_MAX, GATEWAY_TOOLS_MAX};

use crate::backend::{Finish, GenerateRequest, Prompt};
use crate::corpus::Tenant;
use crate::error::{AnthropicError, ApiError};
use crate::openai::{SamplingIn, ToolMode, check_stops, max_tokens, new_id};
use crate::prompt::{may_be_tool_call, parse_tool_calls};
use crate::session::{self, Done, Event};
use crate::{ApiKeyId, AppState, JsonBody};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentIn {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Block {
    Text {
        text: String,
        #[serde(default)]
        cache_control: Option<Value>,
        #[serde(default)]
        citations: Option<Value>,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
        #[serde(default)]
        cache_control: Option<Value>,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<ContentIn>,
        #[serde(default)]
        is_error: Option<bool>,
        #[serde(default)]
        cache_control: Option<Value>,
    },
    Image {
        source: Value,
        #[serde(default)]
        cache_control: Option<Value>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageIn {
    pub role: String,
    pub content: ContentIn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolIn {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub input_schema: Value,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub cache_control: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    pub max_tokens: u32,
    #[serde(default)]
    pub system: Option<ContentIn>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<ToolIn>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub service_tier: Option<String>,
    #[serde(default)]
    pub thinking: Option<Value>,
    // Newer SDK parameters with no meaning for a local model; accepted and ignored.
    #[serde(default)]
    pub cache_control: Option<Value>,
    #[serde(default)]
    pub container: Option<Value>,
    #[serde(default)]
    pub diagnostics: Option<Value>,
    #[serde(default)]
    pub inference_geo: Option<Value>,
    #[serde(default)]
    pub output_config: Option<Value>,
    #[serde(default)]
    pub speed: Option<Value>,
    #[serde(default)]
    pub user_profile_id: Option<Value>,
    #[serde(default)]
    pub workspace_id: Option<Value>,
}

fn text_of(c: ContentIn, param: &str) -> Result<String, ApiError> {
    match c {
        ContentIn::Text(s) => Ok(s),
        ContentIn::Blocks(blocks) => {
            let mut out = String::new();
            for b in blocks {
                match b {
                    Block::Text { text, .. } => out.push_str(&text),
                    _ => return Err(ApiError::invalid("only text blocks are allowed here", Some(param))),
                }
            }
            Ok(out)
        }
    }
}

/// Anthropic messages → the OpenAI-shaped messages the prompt renderer takes.
fn convert_messages(system: Option<ContentIn>, messages: Vec<MessageIn>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(s) = system {
        out.push(json!({"role": "system", "content": text_of(s, "system")?}));
    }
    for (i, m) in messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(format!("role must be user or assistant, not {:?}", m.role), Some(&param)));
        }
        let blocks = match m.content {
            ContentIn::Text(s) => {
                out.push(json!({"role": m.role, "content": s}));
                continue;
            }
            ContentIn::Blocks(b) => b,
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for b in blocks {
            match b {
                Block::Text { text: t, .. } => text.push_str(&t),
                Block::ToolUse { id, name, input, .. } => {
                    calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}));
                }
                Block::ToolResult { tool_use_id, content, .. } => {
                    let c = content.map(|c| text_of(c, &param)).transpose()?.unwrap_or_default();
                    out.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": c}));
                }
                Block::Image { .. } => return Err(ApiError::invalid("image blocks are not supported", Some(&param))),
            }
        }
        if !calls.is_empty() {
            out.push(json!({"role": m.role, "content": text, "tool_calls": calls}));
        } else if !text.is_empty() {
            out.push(json!({"role": m.role, "content": text}));
        }
    }
    Ok(out)
}

struct Plan {
    req: GenerateRequest,
    stops: Vec<String>,
    user_stops: Vec<String>,
    tools: ToolMode,
    stream: bool,
}

fn plan(r: MessagesRequest) -> Result<Plan, ApiError> {
    if r.messages.is_empty() || r.messages.len() > GATEWAY_MESSAGES_MAX {
        return Err(ApiError::invalid(
            format!("messages must hold 1 to {GATEWAY_MESSAGES_MAX} messages"),
            Some("messages"),
        ));
    }
    let max = max_tokens(Some(r.max_tokens), 0, "max_tokens")?;
    let user_stops = r.stop_sequences.unwrap_or_default();
    check_stops(&user_stops, "stop_sequences")?;
    let tools_in = r.tools.unwrap_or_default();
    if tools_in.len() > GATEWAY_TOOLS_MAX {
        return Err(ApiError::invalid(format!("at most {GATEWAY_TOOLS_MAX} tools"), Some("tools")));
    }
    let names: Vec<String> = tools_in.iter().map(|t| t.name.clone()).collect();
    let (choice, named) = match r.tool_choice {
        None => ("auto", None),
        Some(c) => match c.kind.as_str() {
            "auto" => ("auto", None),
            "none" => ("none", None),
            "any" => ("required", None),
            "tool" => {
                let n = c
                    .name
                    .ok_or_else(|| ApiError::invalid("tool_choice type tool needs a name", Some("tool_choice")))?;
                if !names.contains(&n) {
                    return Err(ApiError::invalid(
                        format!("tool_choice names {n:?}, which is not in tools"),
                        Some("tool_choice"),
                    ));
                }
                ("function", Some(n))
            }
            k => return Err(ApiError::invalid(format!("unknown tool_choice type {k:?}"), Some("tool_choice"))),
        },
    };
    if names.is_empty() && (choice == "required" || named.is_some()) {
        return Err(ApiError::invalid("tool_choice requires tools", Some("tool_choice")));
    }
    let tools = ToolMode::new(names, choice, named.as_deref());
    let tools_json = (!tools_in.is_empty()).then(|| {
        Value::Array(
            tools_in
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
                .collect(),
        )
    });
    let sampling = SamplingIn {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        min_p: None,
        seed: None,
        frequency_penalty: None,
        presence_penalty: None,
        repetition_penalty: None,
    }
    .build(1.0)?;
    if !(0.0..=1.0).contains(&sampling.temperature) {
        return Err(ApiError::invalid("temperature must be between 0 and 1", Some("temperature")));
    }
    let messages = convert_messages(r.system, r.messages)?;
    let mut stops = user_stops.clone();
    stops.extend(tools.stops());
    Ok(Plan {
        req: GenerateRequest {
            model: r.model,
            prompt: Prompt::Chat { messages, tools: tools_json, assistant_prefix: tools.prefix.clone() },
            max_tokens: max,
            sampling,
            top_logprobs: None,
            tenant: None,
        },
        stops,
        user_stops,
        tools,
        stream: r.stream.unwrap_or(false),
    })
}

fn stop_reason(d: &Done, user_stops: &[String], tool_use: bool) -> (&'static str, Option<String>) {
    if tool_use {
        return ("tool_use", None);
    }
    match (&d.stop_sequence, d.finish) {
        (Some(s), _) if user_stops.contains(s) => ("stop_sequence", Some(s.clone())),
        (_, Finish::Length) => ("max_tokens", None),
        _ => ("end_turn", None),
    }
}

fn tool_use_blocks(calls: &[crate::prompt::ParsedToolCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| json!({"type": "tool_use", "id": new_id("toolu_"), "name": c.name, "input": c.arguments}))
        .collect()
}

/// `POST /v1/messages`.
pub async fn messages(
    State(st): State<Arc<AppState>>,
    key: Option<Extension<ApiKeyId>>,
    body: Result<JsonBody<MessagesRequest>, ApiError>,
) -> Response {
    let r = match body {
        Ok(JsonBody(r)) => r,
        Err(e) => return AnthropicError(e).into_response(),
    };
    match messages_inner(st, r, key.map(|k| k.0.0)).await {
        Ok(r) => r,
        Err(e) => AnthropicError(e).into_response(),
    }
}

async fn messages_inner(st: Arc<AppState>, r: MessagesRequest, tenant: Tenant) -> Result<Response, ApiError> {
    let mut p = plan(r)?;
    p.req.tenant = tenant;
    let model = p.req.model.clone();
    let mut rx = session::start(&st, p.req.clone(), p.stops.clone())?;
    let id = new_id("msg_");
    if !p.stream {
        let (text, _, done) = session::collect(rx).await?;
        let full = format!("{}{text}", p.tools.prefix);
        let parsed = if p.tools.active() { parse_tool_calls(&full, &p.tools.names) } else { None };
        let (content, tool_use) = match parsed {
            Some((before, calls)) => {
                let mut blocks = Vec::new();
                if !before.is_empty() {
                    blocks.push(json!({"type": "text", "text": before}));
                }
                blocks.extend(tool_use_blocks(&calls));
                (blocks, true)
            }
            None => (vec![json!({"type": "text", "text": full})], false),
        };
        let (reason, seq) = stop_reason(&done, &p.user_stops, tool_use);
        return Ok(axum::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": seq,
            "usage": {"input_tokens": done.outcome.prompt_tokens, "output_tokens": done.outcome.completion_tokens},
            "specswarm": done.stats_json(),
        }))
        .into_response());
    }
    let first = rx.recv().await.ok_or_else(|| ApiError::Internal("generation ended early".into()))?;
    if let Event::Done(Err(e)) = first {
        return Err(e);
    }
    let input_tokens = match &first {
        Event::Token { prompt_tokens, .. } => *prompt_tokens,
        Event::Done(Ok(d)) => d.outcome.prompt_tokens,
        Event::Done(Err(_)) => 0,
    };
    let ev = |name: &str, data: Value| Ok::<_, Infallible>(SseEvent::default().event(name).data(data.to_string()));
    let start = ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}}),
    );
    struct S {
        rx: tokio::sync::mpsc::Receiver<Event>,
        first: Option<Event>,
        held: Option<String>,
        text_open: bool,
        index: usize,
        tools: ToolMode,
        user_stops: Vec<String>,
        done: bool,
    }
    let held = p.tools.active().then(|| p.tools.prefix.clone());
    let s = S {
        rx,
        first: Some(first),
        held,
        text_open: false,
        index: 0,
        tools: p.tools,
        user_stops: p.user_stops,
        done: false,
    };
    let body = stream::unfold(s, move |mut s| async move {
        if s.done {
            return None;
        }
        let e = match s.first.take() {
            Some(e) => Some(e),
            None => s.rx.recv().await,
        };
        let mut out = Vec::new();
        let text_delta = |s: &mut S, out: &mut Vec<_>, text: String| {
            if text.is_empty() {
                return;
            }
            if !s.text_open {
                out.push(ev("content_block_start", json!({"type": "content_block_start", "index": s.index, "content_block": {"type": "text", "text": ""}})));
                s.text_open = true;
            }
            out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": s.index, "delta": {"type": "text_delta", "text": text}})));
        };
        match e {
            Some(Event::Token { text, .. }) => match &mut s.held {
                Some(h) => {
                    h.push_str(&text);
                    if !may_be_tool_call(h) {
                        let t = s.held.take().unwrap_or_default();
                        text_delta(&mut s, &mut out, t);
                    }
                }
                None => text_delta(&mut s, &mut out, text),
            },
            Some(Event::Done(Ok(d))) => {
                s.done = true;
                let mut tool_use = false;
                if let Some(h) = s.held.take() {
                    match parse_tool_calls(&h, &s.tools.names) {
                        Some((before, calls)) => {
                            text_delta(&mut s, &mut out, before);
                            for block in tool_use_blocks(&calls) {
                                if s.text_open {
                                    out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": s.index})));
                                    s.text_open = false;
                                    s.index += 1;
                                }
                                let input = block["input"].to_string();
                                let mut start = block.clone();
                                start["input"] = json!({});
                                out.push(ev("content_block_start", json!({"type": "content_block_start", "index": s.index, "content_block": start})));
                                out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": s.index, "delta": {"type": "input_json_delta", "partial_json": input}})));
                                out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": s.index})));
                                s.index += 1;
                            }
                            tool_use = true;
                        }
                        None => text_delta(&mut s, &mut out, h),
                    }
                }
                if !s.text_open && s.index == 0 {
                    // An empty answer still has one (empty) text block.
                    out.push(ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
                    s.text_open = true;
                }
                if s.text_open {
                    out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": s.index})));
                }
                let (reason, seq) = stop_reason(&d, &s.user_stops, tool_use);
                out.push(ev(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                           "usage": {"input_tokens": d.outcome.prompt_tokens, "output_tokens": d.outcome.completion_tokens},
                           "specswarm": d.stats_json()}),
                ));
                out.push(ev("message_stop", json!({"type": "message_stop"})));
            }
            Some(Event::Done(Err(err))) => {
                s.done = true;
                out.push(ev("error", err.anthropic_body()));
            }
            None => s.done = true,
        }
        Some((stream::iter(out), s))
    })
    .flatten();
    Ok(Sse::new(stream::iter([start]).chain(body)).keep_alive(KeepAlive::default()).into_response())
}
