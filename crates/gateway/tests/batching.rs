//! Concurrent requests on the local backend with the real SmolLM2-135M: each request's answer
//! is token for token the answer it gets alone (greedy and seeded sampling, log-probabilities,
//! a prompt longer than one prefill chunk, requests joining while others decode), a stream
//! cancelled mid-way leaves the others untouched, and (`--ignored`) the aggregate throughput
//! of eight concurrent requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use specswarm_gateway::{AppState, GatewayConfig, app};
use tower::ServiceExt;

mod common;
use common::{MODEL, backend, model_path};

fn state(parallel: usize) -> Arc<AppState> {
    AppState::new(backend(), None, GatewayConfig { parallel, ..Default::default() })
}

fn post(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

async fn send_json(st: &Arc<AppState>, uri: &str, body: &Value) -> Value {
    let resp = app(st.clone()).oneshot(post(uri, body)).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"));
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// What must not change between a request alone and the same request among others.
fn answer(v: &Value) -> Value {
    let c = &v["choices"][0];
    json!({
        "text": c.get("message").map_or(&c["text"], |m| &m["content"]),
        "logprobs": c["logprobs"],
        "finish_reason": c["finish_reason"],
        "usage": v["usage"],
    })
}

async fn wait_sessions_zero(st: &Arc<AppState>) {
    let t0 = Instant::now();
    while st.active_sessions() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "{} sessions still active", st.active_sessions());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "Tell me a story about a dragon.",
    "What does a compiler do?",
    "Name a famous painter.",
    "How do birds fly?",
];

/// Eight different requests: greedy and seeded-sampled chats of different lengths, one with
/// log-probabilities, one with a stop string, and a raw completion whose prompt is longer than
/// one prefill chunk.
fn requests() -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    for (i, q) in QUESTIONS.iter().enumerate().take(6) {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": q}],
                              "max_tokens": 20 + 6 * i});
        if i % 2 == 0 {
            body["temperature"] = json!(0);
        } else {
            body["temperature"] = json!(0.9);
            body["top_p"] = json!(0.95);
            body["seed"] = json!(100 + i);
        }
        if i == 2 {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(3);
        }
        if i == 4 {
            body["stop"] = json!(["dragon"]);
        }
        out.push(("/v1/chat/completions", body));
    }
    let long = "The history of the river town is long and full of small events. ".repeat(60);
    out.push(("/v1/completions", json!({"model": MODEL, "prompt": long, "max_tokens": 24, "temperature": 0})));
    out.push((
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "seed": 7}),
    ));
    out
}

/// Every request sent together (staggered, so some join while others decode) gets exactly the
/// answer it gets alone; the long prompt's greedy answer is also the engine's own `generate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_equal_each_alone() {
    let st = state(8);
    let reqs = requests();
    let mut alone = Vec::new();
    for (uri, body) in &reqs {
        alone.push(answer(&send_json(&st, uri, body).await));
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = reqs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (uri, body))| {
            let st = st.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
                answer(&send_json(&st, uri, &body).await)
            })
        })
        .collect();
    for (i, (t, want)) in tasks.into_iter().zip(&alone).enumerate() {
        let got = t.await.unwrap();
        assert_eq!(&got, want, "request {i} differs when sent with the others");
    }
    eprintln!("8 requests together in {:.2} s", t0.elapsed().as_secs_f64());
    wait_sessions_zero(&st).await;
    let stats = backend().model(MODEL).unwrap().batch_stats();
    eprintln!("{stats:?}");
    assert!(stats.widest >= 4, "the requests were not batched: {stats:?}");

    // The long prompt is prefilled in chunks; the engine prefills it in one batch.
    let (_, long) = &reqs[6];
    let prompt = long["prompt"].as_str().unwrap().to_string();
    let expected = tokio::task::spawn_blocking(move || {
        use specswarm_engine::model::{LoadOptions, ModelSlice};
        use specswarm_engine::sampling::{Sampler, SamplerConfig};
        let path = model_path();
        let format = specswarm_gateway::prompt::PromptFormat::from_gguf(&path).unwrap();
        let ids = format.encode(&specswarm_gateway::backend::Prompt::Text(prompt)).unwrap();
        assert!(ids.len() > 600, "{} prompt tokens", ids.len());
        let model = ModelSlice::load(&path, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
        let mut sampler = Sampler::new(SamplerConfig::greedy()).unwrap();
        let tok = &format.tokenizer;
        let (out, _, _) =
            specswarm_engine::generate::generate(&model, &ids, 24, &mut sampler, tok.stop_ids(), &mut |_| true)
                .unwrap();
        tok.decode(&out, true)
    })
    .await
    .unwrap();
    assert_eq!(alone[6]["text"], expected);
}

/// A stream whose client goes away mid-way stops; the requests decoding beside it finish with
/// the answers they get alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_leaves_the_others_unchanged() {
    let st = state(8);
    let reqs: Vec<(&str, Value)> = requests().into_iter().take(4).collect();
    let mut alone = Vec::new();
    for (uri, body) in &reqs {
        alone.push(answer(&send_json(&st, uri, body).await));
    }
    let tokens_before = st.metrics.completion_tokens.load(Ordering::Relaxed);
    let tasks: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|(uri, body)| {
            let st = st.clone();
            tokio::spawn(async move { answer(&send_json(&st, uri, &body).await) })
        })
        .collect();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                      "max_tokens": 4000, "temperature": 0, "stream": true});
    let resp = app(st.clone()).oneshot(post("/v1/chat/completions", &body)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut b = resp.into_body();
    let mut got = 0;
    while got < 4 {
        let f = b.frame().await.unwrap().unwrap();
        if f.is_data() {
            got += 1;
        }
    }
    assert!(st.active_sessions() >= 2, "the others should still be decoding");
    drop(b);
    for (i, (t, want)) in tasks.into_iter().zip(&alone).enumerate() {
        assert_eq!(&t.await.unwrap(), want, "request {i} changed when a stream beside it was cancelled");
    }
    wait_sessions_zero(&st).await;
    assert!(st.metrics.cancelled.load(Ordering::Relaxed) >= 1);
    let others: u64 = alone.iter().map(|a| a["usage"]["completion_tokens"].as_u64().unwrap()).sum();
    let cancelled = st.metrics.completion_tokens.load(Ordering::Relaxed) - tokens_before - others;
    assert!(cancelled < 200, "the cancelled stream produced {cancelled} tokens");
}

/// A stream nobody reads fills its channels and parks its own sequence only: a request sent
/// meanwhile still finishes, and the parked stream, read afterwards, is complete and equal to
/// its non-streaming answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_stream_parks_only_itself() {
    let st = state(8);
    let story = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                       "max_tokens": 300, "temperature": 0});
    let whole = answer(&send_json(&st, "/v1/chat/completions", &story).await);
    assert_eq!(whole["usage"]["completion_tokens"], 300, "the story should run to max_tokens: {whole}");
    let (uri, other) = requests().swap_remove(1);
    let other_alone = answer(&send_json(&st, uri, &other).await);

    let mut streamed = story.clone();
    streamed["stream"] = json!(true);
    let resp = app(st.clone()).oneshot(post("/v1/chat/completions", &streamed)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // More tokens than the two channels between the scheduler and the client hold.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = tokio::time::timeout(Duration::from_secs(60), send_json(&st, uri, &other))
        .await
        .expect("a request beside a parked stream must finish");
    assert_eq!(answer(&got), other_alone);
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    let text: String = String::from_utf8(raw.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(text, whole["text"].as_str().unwrap());
    wait_sessions_zero(&st).await;
}

/// Aggregate tokens/s of eight concurrent requests (at most 64 tokens each; greedy at
/// `--parallel` 1, 2 and 8, seeded sampling at 1 and 8). Prints numbers, asserts nothing about them:
/// `cargo test --release -p specswarm-gateway --test batching -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_of_eight_concurrent_requests() {
    let body = |q: &str, sampled: bool| {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 64,
                           "temperature": 0});
        if sampled {
            b["temperature"] = json!(0.8);
            b["top_p"] = json!(0.95);
            b["seed"] = json!(q.len());
        }
        b
    };
    // Warm-up.
    send_json(&state(1), "/v1/chat/completions", &body("Hello", false)).await;
    for (parallel, sampled) in [(1, false), (2, false), (8, false), (1, true), (8, true)] {
        let st = state(parallel);
        let before = backend().model(MODEL).unwrap().batch_stats();
        let t0 = Instant::now();
        let tasks: Vec<_> = QUESTIONS
            .iter()
            .map(|q| {
                let st = st.clone();
                let b = body(q, sampled);
                tokio::spawn(async move { send_json(&st, "/v1/chat/completions", &b).await })
            })
            .collect();
        let mut tokens = 0;
        for t in tasks {
            tokens += t.await.unwrap()["usage"]["completion_tokens"].as_u64().unwrap();
        }
        let s = t0.elapsed().as_secs_f64();
        let after = backend().model(MODEL).unwrap().batch_stats();
        let steps = after.steps - before.steps;
        eprintln!(
            "parallel {parallel}, {}: 8 requests, {tokens} tokens in {s:.2} s = {:.1} tokens/s aggregate \
             ({steps} steps, {:.1} sequences and {:.1} rows per step)",
            if sampled { "sampled" } else { "greedy" },
            tokens as f64 / s,
            (after.sequences - before.sequences) as f64 / steps as f64,
            (after.rows - before.rows) as f64 / steps as f64,
        );
    }
}
