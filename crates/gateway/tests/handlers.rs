//! The HTTP surface without sockets: `tower::ServiceExt::oneshot` on `app(state)` with the real
//! SmolLM2-135M behind the local backend. Status codes and error shapes for bad input, auth,
//! limits and overload; streaming formats; cancellation on disconnect; 100 concurrent streams;
//! sessions always return to zero.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use specswarm_engine::hub;
use specswarm_gateway::auth::KeyStore;
use specswarm_gateway::backend::{
    Backend, BackendError, CancelToken, GenerateOutcome, GenerateRequest, ModelInfo, SwarmStatus, TokenPiece,
};
use specswarm_gateway::local::{LocalBackend, LocalModel};
use specswarm_gateway::{AppState, GatewayConfig, app};
use specswarm_spec::drafter::recipe::Recipe;
use tower::ServiceExt;

mod common;
use common::{MODEL, backend, model_path};

fn state(config: GatewayConfig) -> Arc<AppState> {
    AppState::new(backend(), None, config)
}

fn temp_db(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("specswarm-gw-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.join("keys.sqlite3")
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri).header("content-type", "application/json").body(body.into()).unwrap()
}

async fn send(st: &Arc<AppState>, req: Request<Body>) -> (StatusCode, String) {
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn send_json(st: &Arc<AppState>, req: Request<Body>) -> (StatusCode, Value) {
    let (s, b) = send(st, req).await;
    (s, serde_json::from_str(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {b}")))
}

fn chat(max_tokens: u32, stream: bool) -> String {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
           "max_tokens": max_tokens, "temperature": 0, "stream": stream})
    .to_string()
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

async fn wait_sessions_zero(st: &Arc<AppState>) {
    let t0 = Instant::now();
    while st.active_sessions() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "{} sessions still active", st.active_sessions());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_openai_error(v: &Value, ty: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], ty, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[tokio::test]
async fn malformed_unknown_and_mistyped_bodies_are_400() {
    let st = state(GatewayConfig::default());
    let cases = [
        ("{\"model\": ", "malformed JSON"),
        ("not json at all", "malformed JSON"),
        (
            r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}"#,
            "unknown field `bogus`",
        ),
        (
            r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi", "extra": 2}]}"#,
            "unknown field `extra`",
        ),
        (r#"{"model": "smollm2-135m", "messages": "hi"}"#, "invalid type"),
        (
            r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#,
            "invalid type",
        ),
        (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, "missing field `model`"),
        (
            r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}"#,
            "temperature",
        ),
        (r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "n": 3}"#, "n = 1"),
        (
            r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#,
            "max_tokens",
        ),
        (r#"{"model": "smollm2-135m", "messages": []}"#, "messages"),
        (r#"{"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "hi"}]}"#, "unknown role"),
    ];
    for (body, needle) in cases {
        let (s, v) = send_json(&st, post("/v1/chat/completions", body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_openai_error(&v, "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    for uri in ["/v1/completions", "/v1/messages"] {
        let (s, v) = send_json(&st, post(uri, "{oops")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
    }
    // Anthropic errors have Anthropic's shape.
    let (_, v) = send_json(&st, post("/v1/messages", r#"{"model": "smollm2-135m", "messages": []}"#)).await;
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_tokens"), "{v}");
    // A prompt plus max_tokens over the context is refused before any compute.
    let long =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8190, "stream": true});
    let (s, v) = send_json(&st, post("/v1/chat/completions", long.to_string())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = send_json(&st, post("/v1/chat/completions", chat(4, false).replace(MODEL, "gpt-9"))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (s, _) = send(&st, Request::get("/v1/nothing-here").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    wait_sessions_zero(&st).await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let st = state(GatewayConfig { body_bytes_max: 4096, ..Default::default() });
    let big = json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(10_000)}]}).to_string();
    for uri in ["/v1/chat/completions", "/v1/completions"] {
        let (s, v) = send_json(&st, post(uri, big.clone())).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        assert_eq!(v["error"]["code"], "request_too_large");
    }
    let (s, v) = send_json(&st, post("/v1/messages", big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["type"], "request_too_large", "{v}");
    // Just under the limit is served.
    let (s, _) = send_json(&st, post("/v1/chat/completions", chat(2, false))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn api_keys_and_rate_limits() {
    let db = temp_db("auth");
    let store = KeyStore::open(&db).unwrap();
    let (key, _) = store.create("test", 3).unwrap();
    let st = AppState::new(backend(), Some(store), GatewayConfig::default());
    let models = |auth: Option<(&str, String)>| {
        let mut r = Request::get("/v1/models");
        if let Some((h, v)) = auth {
            r = r.header(h, v);
        }
        r.body(Body::empty()).unwrap()
    };
    let (s, v) = send_json(&st, models(None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_openai_error(&v, "authentication_error");
    let (s, _) = send_json(&st, models(Some(("authorization", "Bearer sk-0000".into())))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = send_json(&st, post("/v1/messages", "{}")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    // A good key: 3 requests per minute, then 429 with Retry-After.
    let (s, v) = send_json(&st, models(Some(("authorization", format!("Bearer {key}"))))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["available"], true);
    let (s, _) = send_json(&st, models(Some(("x-api-key", key.clone())))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = send_json(&st, models(Some(("authorization", format!("Bearer {key}"))))).await;
    assert_eq!(s, StatusCode::OK);
    let resp = app(st.clone()).oneshot(models(Some(("authorization", format!("Bearer {key}"))))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_openai_error(&v, "rate_limit_error");
    // Public endpoints need no key.
    for uri in ["/health", "/ready", "/metrics", "/v1/swarm", "/", "/swarm"] {
        let (s, _) = send(&st, Request::get(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
    }
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

#[tokio::test]
async fn chat_streaming_matches_non_streaming() {
    let st = state(GatewayConfig::default());
    let (s, v) = send_json(&st, post("/v1/chat/completions", chat(12, false))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (s, raw) = send(&st, post("/v1/chat/completions", body.to_string())).await;
    assert_eq!(s, StatusCode::OK);
    let data = sse_data(&raw);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, text);
    let finish: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)?.get("finish_reason")).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));

    // The same greedy text through /v1/completions with the rendered prompt is the engine's.
    let (s, v) = send_json(
        &st,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    wait_sessions_zero(&st).await;
}

#[tokio::test]
async fn anthropic_stream_events_in_order() {
    let st = state(GatewayConfig::default());
    let body = json!({"model": MODEL, "max_tokens": 10, "temperature": 0, "stream": true, "system": "Be brief.",
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]});
    let (s, raw) = send(&st, post("/v1/messages", body.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{raw}");
    let events: Vec<&str> = raw.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events.first(), Some(&"message_start"));
    assert_eq!(events[1], "content_block_start");
    assert!(events[2..events.len() - 3].iter().all(|e| *e == "content_block_delta"), "{events:?}");
    assert_eq!(&events[events.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    let datas: Vec<Value> = sse_data(&raw).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: String = datas.iter().filter_map(|d| d["delta"]["text"].as_str()).collect();
    let delta = datas.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 10);
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");

    let mut nb = body.clone();
    nb["stream"] = json!(false);
    let (s, v) = send_json(&st, post("/v1/messages", nb.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["content"][0]["text"].as_str().unwrap(), streamed);
    assert_eq!(v["stop_reason"], "max_tokens");
    let input = v["usage"]["input_tokens"].as_u64().unwrap();
    assert!(input > 10, "{v}");
    let start = datas.iter().find(|d| d["type"] == "message_start").unwrap();
    assert_eq!(start["message"]["usage"]["input_tokens"], input, "{start}");
    assert_eq!(delta["usage"]["input_tokens"], input);
    wait_sessions_zero(&st).await;
}

/// A client that reads a little of a stream and goes away: the generation stops at its next
/// token and the session is freed.
#[tokio::test]
async fn disconnect_mid_stream_cancels_and_frees_the_session() {
    let st = state(GatewayConfig::default());
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                      "max_tokens": 4000, "temperature": 0, "stream": true});
    let resp = app(st.clone()).oneshot(post("/v1/chat/completions", body.to_string())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut b = resp.into_body();
    let mut got = 0;
    while got < 3 {
        let f = b.frame().await.unwrap().unwrap();
        if f.is_data() {
            got += 1;
        }
    }
    assert_eq!(st.active_sessions(), 1);
    let before = st.metrics.completion_tokens.load(std::sync::atomic::Ordering::Relaxed);
    drop(b);
    let t0 = Instant::now();
    wait_sessions_zero(&st).await;
    // Far sooner than 4000 tokens would take, and counted as cancelled.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(st.metrics.cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let after = st.metrics.completion_tokens.load(std::sync::atomic::Ordering::Relaxed);
    assert!(after - before < 200, "{} tokens generated after the disconnect", after - before);

    // A non-streaming request whose client gives up (its future is dropped).
    let st2 = st.clone();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                      "max_tokens": 4000, "temperature": 0});
    let h = tokio::spawn(async move { app(st2).oneshot(post("/v1/chat/completions", body.to_string())).await });
    let t0 = Instant::now();
    while st.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.abort();
    wait_sessions_zero(&st).await;
    let metrics = send(&st, Request::get("/metrics").body(Body::empty()).unwrap()).await.1;
    assert!(metrics.contains("specswarm_active_sessions 0"), "{metrics}");
}

/// 100 concurrent streams with small max_tokens: all served in full through the bounded queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams() {
    let st = state(GatewayConfig { parallel: 2, ..Default::default() });
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let st = st.clone();
            tokio::spawn(async move {
                let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Count to {i}.")}],
                                  "max_tokens": 4, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
                send(&st, post("/v1/chat/completions", body.to_string())).await
            })
        })
        .collect();
    let mut peak_seen = 0;
    for t in tasks {
        let (s, raw) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{raw}");
        let data = sse_data(&raw);
        assert_eq!(data.last().unwrap(), "[DONE]", "{raw}");
        let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 4, "{raw}");
        peak_seen = peak_seen.max(st.active_sessions());
    }
    eprintln!("100 streams in {:.1} s", t0.elapsed().as_secs_f64());
    wait_sessions_zero(&st).await;
    assert_eq!(st.running.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Past the session bound, requests are refused with 503 at once; the others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_queue_bound_is_503() {
    let st = state(GatewayConfig { parallel: 1, sessions_max: 8, ..Default::default() });
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let st = st.clone();
            tokio::spawn(async move { send(&st, post("/v1/chat/completions", chat(3, true))).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (s, raw) = t.await.unwrap();
        match s {
            StatusCode::OK => {
                assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
                ok += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                let v: Value = serde_json::from_str(&raw).unwrap();
                assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
                refused += 1;
            }
            s => panic!("unexpected {s}: {raw}"),
        }
    }
    assert!(ok >= 8 && refused >= 1, "ok {ok}, refused {refused}");
    wait_sessions_zero(&st).await;
}

/// A backend whose model has no available ring: requests get 503, `/ready` says not ready.
struct NoRing(Arc<LocalBackend>);

impl Backend for NoRing {
    fn models(&self) -> Vec<ModelInfo> {
        self.0.models().into_iter().map(|m| ModelInfo { available: false, ..m }).collect()
    }
    fn swarm_status(&self) -> SwarmStatus {
        SwarmStatus { backend: "swarm".into(), workers: Vec::new() }
    }
    fn generate(
        &self,
        _: &GenerateRequest,
        _: &CancelToken,
        _: &mut dyn FnMut(TokenPiece) -> bool,
    ) -> Result<GenerateOutcome, BackendError> {
        Err(BackendError::Unavailable(MODEL.into()))
    }
}

#[tokio::test]
async fn unavailable_model_is_503() {
    let st = AppState::new(Arc::new(NoRing(backend())), None, GatewayConfig::default());
    let (s, v) = send_json(&st, post("/v1/chat/completions", chat(4, false))).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "model_unavailable");
    let (s, v) = send_json(&st, Request::get("/ready").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["ready"], false);
    let (_, v) = send_json(&st, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(v["data"][0]["available"], false);
}

#[tokio::test]
async fn dashboard_state_and_metrics() {
    let st = state(GatewayConfig::default());
    let (_, v) = send_json(&st, post("/v1/chat/completions", chat(5, false))).await;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let (s, sw) = send_json(&st, Request::get("/v1/swarm").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sw["backend"], "local");
    assert_eq!(sw["workers"][0]["layers"], json!([0, 30]));
    assert_eq!(sw["workers"][0]["model"], MODEL);
    assert_eq!(sw["active_sessions"], 0);
    assert!(sw["recent_tokens_per_s"].as_f64().unwrap() > 0.0, "{sw}");
    let (_, m) = send(&st, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    for needle in [
        "specswarm_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
        "specswarm_completion_tokens_total 5",
        "specswarm_request_duration_seconds_count",
        "specswarm_first_token_seconds_bucket{le=\"+Inf\"} 1",
        "specswarm_generation_duration_seconds_count 1",
        "specswarm_model_available{model=\"smollm2-135m\"} 1",
        "specswarm_workers_healthy 1",
    ] {
        assert!(m.contains(needle), "{needle} missing from\n{m}");
    }
    let (_, page) = send(&st, Request::get("/").body(Body::empty()).unwrap()).await;
    assert!(page.contains("/v1/chat/completions") && !page.contains("https://"), "the chat page is self-contained");
    let (_, page) = send(&st, Request::get("/swarm").body(Body::empty()).unwrap()).await;
    assert!(page.contains("/v1/swarm") && !page.contains("https://"));
}

/// Speculative decoding behind the gateway is lossless: the same greedy text, with acceptance
/// reported.
#[tokio::test]
async fn speculative_backend_gives_the_same_text() {
    let spec =
        Arc::new(LocalBackend::new(vec![LocalModel::load(MODEL, &model_path(), 2, Some((Recipe::Ngram, 4))).unwrap()]));
    let st_spec = AppState::new(spec, None, GatewayConfig::default());
    let st = state(GatewayConfig::default());
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Repeat exactly: one two three one two three one two three"}],
                      "max_tokens": 32, "temperature": 0})
    .to_string();
    let (_, plain) = send_json(&st, post("/v1/chat/completions", body.clone())).await;
    let (_, fast) = send_json(&st_spec, post("/v1/chat/completions", body)).await;
    assert_eq!(plain["choices"][0]["message"]["content"], fast["choices"][0]["message"]["content"]);
    assert!(plain["specswarm"]["acceptance"].is_null());
    let acc = fast["specswarm"]["acceptance"].as_f64().unwrap();
    assert!(fast["specswarm"]["drafted_tokens"].as_u64().unwrap() > 0 && (0.0..=1.0).contains(&acc), "{fast}");
}

/// Several models behind one gateway: each request runs on the model it names, through that
/// model's own chat template — the answer equals the engine's plain greedy generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_models_each_with_its_own_template() {
    use specswarm_engine::chat::{ChatMessage, ChatTemplate};
    use specswarm_engine::model::{LoadOptions, ModelSlice};
    use specswarm_engine::sampling::{Sampler, SamplerConfig};
    use specswarm_engine::tokenizer::Tokenizer;

    let gemma = hub::ensure(hub::known("gemma3-270m").unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let both = LocalBackend::new(vec![
        LocalModel::load(MODEL, &model_path(), 2, None).unwrap(),
        LocalModel::load("gemma3-270m", &gemma, 2, None).unwrap(),
    ]);
    let st = AppState::new(Arc::new(both), None, GatewayConfig::default());
    let (_, v) = send_json(&st, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MODEL, "gemma3-270m"]);
    let question = "What is the capital of France?";
    for (id, path) in [(MODEL, model_path()), ("gemma3-270m", gemma.clone())] {
        let body = json!({"model": id, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0});
        let (s, v) = send_json(&st, post("/v1/chat/completions", body.to_string())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        // The reference: the engine alone, the way `specswarm generate --chat` runs it.
        let expected = tokio::task::spawn_blocking(move || {
            let tok = Tokenizer::from_gguf(&path).unwrap();
            let arch = specswarm_engine::gguf::GgufFile::open(&path)
                .unwrap()
                .get_str("general.architecture")
                .unwrap()
                .to_string();
            let tmpl =
                ChatTemplate::from_gguf(&path).unwrap().unwrap_or_else(|| ChatTemplate::fallback_for(&arch).unwrap());
            let text = tmpl.render(&[ChatMessage { role: "user".into(), content: question.into() }], true).unwrap();
            let mut ids = tok.encode(&text, false, true).unwrap();
            if let Some(bos) = tok.bos_id().filter(|&b| tok.add_bos() && ids.first() != Some(&b)) {
                ids.insert(0, bos);
            }
            let model = ModelSlice::load(&path, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
            let mut sampler = Sampler::new(SamplerConfig::greedy()).unwrap();
            let (out, _, _) =
                specswarm_engine::generate::generate(&model, &ids, 16, &mut sampler, tok.stop_ids(), &mut |_| true)
                    .unwrap();
            (tok.decode(&out, true), ids.len())
        })
        .await
        .unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], expected.0, "{id}");
        assert_eq!(v["usage"]["prompt_tokens"], expected.1, "{id}");
    }
}

/// The suffix drafter learns from a key's earlier answers: the same request again drafts its
/// answer from the corpus (many more accepted tokens) with the same text; another key starts
/// from nothing (corpora are per key: acceptance speed must not reveal another key's answers).
#[tokio::test]
async fn suffix_drafts_reuse_the_same_keys_earlier_answers_only() {
    let db = temp_db("corpus");
    let store = KeyStore::open(&db).unwrap();
    let (alice, _) = store.create("alice", 100).unwrap();
    let (bob, _) = store.create("bob", 100).unwrap();
    let spec = Arc::new(LocalBackend::new(vec![
        LocalModel::load(MODEL, &model_path(), 2, Some((Recipe::Suffix, 8))).unwrap(),
    ]));
    let st = AppState::new(spec, Some(store), GatewayConfig::default());
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content":
        "Write a JSON object describing a cat with the fields name, age and color."}],
        "max_tokens": 48, "temperature": 0})
    .to_string();
    let ask = |key: &str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body.clone()))
            .unwrap()
    };
    let (s, first) = send_json(&st, ask(&alice)).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    let (_, again) = send_json(&st, ask(&alice)).await;
    let (_, other) = send_json(&st, ask(&bob)).await;
    let text = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(text(&first), text(&again));
    assert_eq!(text(&first), text(&other));
    let accepted = |v: &Value| v["specswarm"]["accepted_tokens"].as_u64().unwrap();
    let tokens = first["usage"]["completion_tokens"].as_u64().unwrap();
    eprintln!(
        "accepted draft tokens of {tokens}: first {}, again {}, another key {}; tokens/s {} then {}",
        accepted(&first),
        accepted(&again),
        accepted(&other),
        first["specswarm"]["tokens_per_s"],
        again["specswarm"]["tokens_per_s"]
    );
    assert!(tokens >= 16, "a long enough answer to learn from: {first}");
    assert!(
        accepted(&again) >= accepted(&first) + tokens / 2,
        "the second request drafts from the first answer: accepted {} then {} of {tokens}",
        accepted(&first),
        accepted(&again)
    );
    assert_eq!(accepted(&other), accepted(&first), "another key's drafter knows nothing of alice's answers");
}

/// A model drafter behind the gateway (`--draft suffix/skip:15`: suffix matches where the
/// context has them, else the target without layer 15): loaded once, one instance per request,
/// several requests at once — every answer is the plain greedy answer, and drafts were accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_model_drafter_serves_concurrent_requests_losslessly() {
    let recipe =
        Recipe::load("suffix/skip:15", &model_path(), 1, &mut |m| panic!("no model to resolve: {m}"), &mut |_| {})
            .unwrap();
    assert!(recipe.runs_a_model());
    let spec = Arc::new(LocalBackend::new(vec![LocalModel::load(MODEL, &model_path(), 2, Some((recipe, 4))).unwrap()]));
    let st_spec = AppState::new(spec, None, GatewayConfig::default());
    let st = state(GatewayConfig::default());
    let questions = ["Explain photosynthesis briefly.", "List three colors.", "What is 2 + 2?"];
    let body = |q: &str| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0})
            .to_string()
    };
    let mut tasks = Vec::new();
    for q in questions {
        let (st_spec, b) = (st_spec.clone(), body(q));
        tasks.push(tokio::spawn(async move { send_json(&st_spec, post("/v1/chat/completions", b)).await }));
    }
    for (q, t) in questions.iter().zip(tasks) {
        let (s, fast) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{fast}");
        let (_, plain) = send_json(&st, post("/v1/chat/completions", body(q))).await;
        assert_eq!(plain["choices"][0]["message"]["content"], fast["choices"][0]["message"]["content"], "{q}");
        assert!(fast["specswarm"]["accepted_tokens"].as_u64().unwrap() > 0, "{fast}");
    }
}
