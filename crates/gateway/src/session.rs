//! One generation from the HTTP side: admission (bounded sessions), a place in the queue for a
//! compute slot, the blocking backend call, stop strings, and a bounded channel of events to
//! the handler. Dropping the receiver (the client went away) cancels the generation at its next
//! token; the session count returns to where it was when the generation ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::AppState;
use crate::backend::{CancelToken, Finish, GenerateOutcome, GenerateRequest, TokenLogprob};
use crate::error::ApiError;

/// What a handler receives.
#[derive(Debug)]
pub enum Event {
    /// Generated text (possibly empty: a special token, or text held back by a stop string)
    /// with the log-probability of the token that produced it.
    Token { text: String, logprob: Option<TokenLogprob>, prompt_tokens: usize },
    /// The end: counts, and which stop string ended it, if one did.
    Done(Result<Done, ApiError>),
}

#[derive(Debug, Clone)]
pub struct Done {
    pub outcome: GenerateOutcome,
    pub finish: Finish,
    pub stop_sequence: Option<String>,
    pub elapsed_s: f64,
}

impl Done {
    /// Generated tokens per second over the whole request (queueing excluded).
    pub fn tokens_per_s(&self) -> f64 {
        let s = self.outcome.prefill_s + self.outcome.decode_s;
        if s > 0.0 { self.outcome.completion_tokens as f64 / s } else { 0.0 }
    }

    pub fn acceptance(&self) -> Option<f64> {
        let o = &self.outcome;
        (o.drafted_tokens > 0).then(|| o.accepted_tokens as f64 / o.drafted_tokens as f64)
    }

    /// The `specswarm` extension object added to final responses and chunks.
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokens_per_s": self.tokens_per_s(),
            "acceptance": self.acceptance(),
            "drafted_tokens": self.outcome.drafted_tokens,
            "accepted_tokens": self.outcome.accepted_tokens,
            "prefill_s": self.outcome.prefill_s,
            "decode_s": self.outcome.decode_s,
        })
    }
}

/// Holds back generated text that could still become a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    /// Add `piece`; returns the text safe to emit and, if a stop string completed, which one
    /// (the text from the stop string on is dropped).
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        self.pending.push_str(piece);
        let hit =
            self.stops.iter().filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s))).min_by_key(|(i, _)| *i);
        if let Some((i, s)) = hit {
            let out = self.pending[..i].to_string();
            let s = s.clone();
            self.pending.clear();
            return (out, Some(s));
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep_from = (0..=self.pending.len())
            .filter(|&i| self.pending.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.pending[i..];
                tail.is_empty() || self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        (out, None)
    }

    /// Whatever is held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Decrements the session count when a generation is over, however it ended.
struct SessionGuard(Arc<AppState>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Admit and start a generation. Errors that need no compute (unknown or unavailable model,
/// full queue) come back at once; the rest arrive as `Event::Done(Err(..))`.
pub fn start(
    state: &Arc<AppState>,
    req: GenerateRequest,
    stops: Vec<String>,
) -> Result<mpsc::Receiver<Event>, ApiError> {
    match state.backend.models().into_iter().find(|m| m.id == req.model) {
        None => {
            return Err(ApiError::NotFound {
                message: format!("the model {:?} does not exist", req.model),
                code: "model_not_found",
            });
        }
        Some(m) if !m.available => {
            return Err(ApiError::Unavailable(format!("model {:?} has no available backend", req.model)));
        }
        Some(_) => {}
    }
    if state.sessions.fetch_add(1, Ordering::SeqCst) >= state.config.sessions_max {
        state.sessions.fetch_sub(1, Ordering::SeqCst);
        state.metrics.rejected_overload.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::Overloaded(format!(
            "the gateway is at its limit of {} concurrent requests; retry later",
            state.config.sessions_max
        )));
    }
    let guard = SessionGuard(state.clone());
    let (tx, rx) = mpsc::channel(specswarm_proto::limits::GATEWAY_STREAM_EVENTS_BUFFERED_MAX);
    let state = state.clone();
    tokio::spawn(async move {
        let t0 = Instant::now();
        let permit = tokio::select! {
            p = state.slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
            () = tx.closed() => {
                state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                drop(guard);
                return;
            }
        };
        let st = state.clone();
        let run = tokio::task::spawn_blocking(move || {
            st.running.fetch_add(1, Ordering::SeqCst);
            let result = run_blocking(&st, &req, stops, &tx, t0);
            st.running.fetch_sub(1, Ordering::SeqCst);
            // Free the slot and the session before the client can see the end, so that a client
            // that got its answer never observes its own session as still active.
            drop(permit);
            drop(guard);
            // The receiver may be gone; nothing to do then.
            let _ = tx.blocking_send(Event::Done(result));
        });
        if let Err(e) = run.await {
            eprintln!("gateway: generation task failed: {e}");
        }
    });
    Ok(rx)
}

fn run_blocking(
    st: &Arc<AppState>,
    req: &GenerateRequest,
    stops: Vec<String>,
    tx: &mpsc::Sender<Event>,
    t0: Instant,
) -> Result<Done, ApiError> {
    let cancel = CancelToken::default();
    let mut matcher = StopMatcher::new(stops);
    let mut stop_hit = None;
    let mut first = true;
    let mut client_gone = false;
    let mut prompt_tokens = 0;
    let mut on_token = |piece: crate::backend::TokenPiece| -> bool {
        if first {
            st.metrics.first_token_latency.observe(t0.elapsed());
            first = false;
        }
        st.metrics.throughput.add(1);
        prompt_tokens = piece.prompt_tokens;
        let (text, hit) = matcher.push(&piece.text);
        if tx.blocking_send(Event::Token { text, logprob: piece.logprob, prompt_tokens: piece.prompt_tokens }).is_err()
        {
            client_gone = true;
            cancel.cancel();
            return false;
        }
        if hit.is_some() {
            stop_hit = hit;
            return false;
        }
        true
    };
    let outcome = st.backend.generate(req, &cancel.clone(), &mut on_token);
    let outcome = outcome.map_err(ApiError::from)?;
    let m = &st.metrics;
    m.prompt_tokens.fetch_add(outcome.prompt_tokens as u64, Ordering::Relaxed);
    m.completion_tokens.fetch_add(outcome.completion_tokens as u64, Ordering::Relaxed);
    m.drafted_tokens.fetch_add(outcome.drafted_tokens as u64, Ordering::Relaxed);
    m.accepted_tokens.fetch_add(outcome.accepted_tokens as u64, Ordering::Relaxed);
    m.generation_latency.observe(t0.elapsed());
    if client_gone {
        m.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    let tail = matcher.finish();
    if stop_hit.is_none() && !tail.is_empty() {
        let _ = tx.blocking_send(Event::Token { text: tail, logprob: None, prompt_tokens });
    }
    let finish = if stop_hit.is_some() { Finish::Stop } else { outcome.finish.unwrap_or(Finish::Stop) };
    Ok(Done { outcome, finish, stop_sequence: stop_hit, elapsed_s: t0.elapsed().as_secs_f64() })
}

/// Collect a whole generation (non-streaming requests).
pub async fn collect(mut rx: mpsc::Receiver<Event>) -> Result<(String, Vec<TokenLogprob>, Done), ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text: t, logprob, .. } => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Event::Done(d) => return d.map(|d| (text, lps, d)),
        }
    }
    Err(ApiError::Internal("the generation ended without a result".into()))
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_across_pieces() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(m.push("Hello E"), ("Hello ".into(), None));
        assert_eq!(m.push("N"), (String::new(), None));
        assert_eq!(m.push("Dx"), (String::new(), Some("END".into())));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("EN"), (String::new(), None));
        assert_eq!(m.push("ough"), ("ENough".into(), None));
        assert_eq!(m.push("E"), (String::new(), None));
        assert_eq!(m.finish(), "E");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("é"), ("é".into(), None));
    }
}
