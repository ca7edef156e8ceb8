//! Counters, histograms and the Prometheus text exposition at `/metrics` (hand-written: a few
//! dozen lines instead of a metrics framework).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use specswarm_proto::limits::GATEWAY_THROUGHPUT_WINDOW_S;

/// Tokens per second over the last `GATEWAY_THROUGHPUT_WINDOW_S` seconds (one bucket per second).
#[derive(Debug)]
pub struct Throughput {
    start: Instant,
    buckets: Mutex<Vec<(u64, u64)>>,
}

impl Default for Throughput {
    fn default() -> Self {
        Throughput {
            start: Instant::now(),
            buckets: Mutex::new(vec![(u64::MAX, 0); GATEWAY_THROUGHPUT_WINDOW_S as usize]),
        }
    }
}

impl Throughput {
    pub fn add(&self, n: u64) {
        let sec = self.start.elapsed().as_secs();
        let mut b = self.buckets.lock().expect("throughput lock");
        let slot = &mut b[(sec % GATEWAY_THROUGHPUT_WINDOW_S) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += n;
    }

    pub fn recent_per_s(&self) -> f64 {
        let now = self.start.elapsed().as_secs();
        let b = self.buckets.lock().expect("throughput lock");
        let total: u64 =
            b.iter().filter(|(s, _)| *s != u64::MAX && now - s < GATEWAY_THROUGHPUT_WINDOW_S).map(|(_, n)| n).sum();
        // The current second is partial: divide by the time the window really covers.
        let covered = (GATEWAY_THROUGHPUT_WINDOW_S - 1) as f64 + self.start.elapsed().as_secs_f64().fract();
        let covered = covered.min(self.start.elapsed().as_secs_f64()).max(1e-3);
        total as f64 / covered
    }
}

/// A cumulative histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BOUNDS_S: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    /// (endpoint, status) → count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub drafted_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected_overload: AtomicU64,
    pub request_latency: Histogram,
    pub first_token_latency: Histogram,
    pub generation_latency: Histogram,
    pub throughput: Throughput,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            drafted_tokens: AtomicU64::new(0),
            accepted_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected_overload: AtomicU64::new(0),
            request_latency: Histogram::new(LATENCY_BOUNDS_S),
            first_token_latency: Histogram::new(LATENCY_BOUNDS_S),
            generation_latency: Histogram::new(LATENCY_BOUNDS_S),
            throughput: Throughput::default(),
        }
    }
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub active_sessions: usize,
    pub running_sessions: usize,
    pub models: Vec<(String, bool)>,
    pub workers_healthy: usize,
    pub workers_total: usize,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        *self.requests.lock().expect("metrics lock").entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP specswarm_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE specswarm_requests_total counter\n");
        for ((ep, st), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "specswarm_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}");
        }
        let counters = [
            ("specswarm_prompt_tokens_total", "Prompt tokens processed.", load(&self.prompt_tokens)),
            ("specswarm_completion_tokens_total", "Tokens generated.", load(&self.completion_tokens)),
            ("specswarm_draft_tokens_total", "Draft tokens sent for verification.", load(&self.drafted_tokens)),
            ("specswarm_draft_accepted_tokens_total", "Draft tokens accepted.", load(&self.accepted_tokens)),
            ("specswarm_cancelled_total", "Generations cancelled (client gone).", load(&self.cancelled)),
            (
                "specswarm_rejected_overload_total",
                "Requests refused because the queue was full.",
                load(&self.rejected_overload),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let (d, a) = (load(&self.drafted_tokens), load(&self.accepted_tokens));
        let acceptance = if d == 0 { 0.0 } else { a as f64 / d as f64 };
        let gauges = [
            ("specswarm_draft_acceptance_ratio", "Accepted over drafted tokens since start.", acceptance),
            ("specswarm_active_sessions", "Generations running or queued.", g.active_sessions as f64),
            ("specswarm_running_sessions", "Generations running.", g.running_sessions as f64),
            (
                "specswarm_tokens_per_second",
                "Generated tokens/s over the recent window.",
                self.throughput.recent_per_s(),
            ),
            ("specswarm_workers_healthy", "Healthy workers.", g.workers_healthy as f64),
            ("specswarm_workers_total", "Known workers.", g.workers_total as f64),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out.push_str("# HELP specswarm_model_available Whether a model has an available ring (1) or not (0).\n");
        out.push_str("# TYPE specswarm_model_available gauge\n");
        for (m, ok) in &g.models {
            let _ = writeln!(out, "specswarm_model_available{{model=\"{m}\"}} {}", u8::from(*ok));
        }
        self.request_latency.write(
            &mut out,
            "specswarm_request_duration_seconds",
            "Time to the response head (streams start after their first token).",
        );
        self.first_token_latency.write(
            &mut out,
            "specswarm_first_token_seconds",
            "Admission to the first generated token.",
        );
        self.generation_latency.write(
            &mut out,
            "specswarm_generation_duration_seconds",
            "Admission to the end of a generation, queueing included.",
        );
        out
    }
}
