//! `specswarm bench swarm`: plain decoding, speculative chain, speculative tree, pipelined chains
//! and pipelined trees through a ring of worker processes under WAN emulation, in one run, plus
//! 1, 4 and 8 concurrent streams; each mode reports tokens/s, acceptance, tokens per round, measured
//! traversal time T and its ceiling 1/((1 − a)·T) (DESIGN §3).
//!
//! `bench ring` is the client half: it measures every mode against workers that are already
//! running (the netns emulator runs it inside the client's namespace).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use specswarm_engine::sampling::SamplerConfig;
use specswarm_net::ring::RingSpec;
use specswarm_net::swarm_spec::{RingPlan, SwarmSpecSettings, SwarmSpecStats, generate_swarm_speculative};
use specswarm_spec::drafter::recipe::Recipe;
use specswarm_spec::drafter::suffix::{SharedCorpus, SuffixCorpus};
use specswarm_spec::drafter::{DraftBudget, Drafter, NoDraft};
use specswarm_spec::policy::{Policy, PolicyMode};

use crate::cli::{BenchRingArgs, BenchSwarmArgs, SwarmRunArgs};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Plain,
    Chain,
    Tree,
    /// Pipelined chains.
    Pipelined,
    /// Pipelined trees (the tree mode's budget).
    PipelinedTree,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Chain => "chain",
            Mode::Tree => "tree",
            Mode::Pipelined => "pipelined",
            Mode::PipelinedTree => "pipelined-tree",
        }
    }

    fn all() -> [Mode; 5] {
        [Mode::Plain, Mode::Chain, Mode::Tree, Mode::Pipelined, Mode::PipelinedTree]
    }

    fn pipelined(self) -> bool {
        matches!(self, Mode::Pipelined | Mode::PipelinedTree)
    }
}

/// Totals over the prompts of one mode.
#[derive(Default)]
struct Totals {
    /// Tokens generated (all of them).
    generated: usize,
    /// Tokens after each request's first, over `seconds` (the decode rate).
    tokens: usize,
    seconds: f64,
    rounds: usize,
    misses: usize,
    traversal_s: f64,
    timed_rounds: usize,
    drafted: usize,
    accepted: usize,
    depth_sum: usize,
    rounds_sent: usize,
    draft_s: f64,
}

impl Totals {
    fn add(&mut self, s: &SwarmSpecStats) {
        // Decode rate: after the first token (whose verdict pays for the session and prompt).
        self.generated += s.generated_tokens;
        self.tokens += s.generated_tokens.saturating_sub(1);
        self.seconds += s.decode.saturating_sub(s.time_to_first_token).as_secs_f64();
        self.rounds += s.rounds;
        self.misses += s.misses;
        self.traversal_s += s.traversal_s_sum;
        self.timed_rounds += s.timed_rounds;
        self.drafted += s.drafted_nodes;
        self.accepted += s.accepted_tokens;
        self.depth_sum += s.depth_sum;
        self.rounds_sent += s.rounds_sent;
        self.draft_s += s.draft_s_sum;
    }
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
    fn acceptance(&self) -> f64 {
        1.0 - self.misses as f64 / self.generated.max(1) as f64
    }
    fn traversal_ms(&self) -> f64 {
        1000.0 * self.traversal_s / self.timed_rounds.max(1) as f64
    }
}

struct Client {
    plan: RingPlan,
    prompts: Vec<Vec<u32>>,
    run: SwarmRunArgs,
    /// The drafter of the speculative modes, loaded once (one instance per request).
    recipe: Recipe,
}

impl Client {
    fn drafter(&self, mode: Mode, corpus: Option<&SharedCorpus>) -> Box<dyn Drafter> {
        if mode == Mode::Plain { Box::new(NoDraft) } else { self.recipe.instantiate(corpus) }
    }

    /// The corpus a mode's requests share (`--corpus shared`), else none (each drafter its own).
    fn corpus(&self) -> Option<SharedCorpus> {
        (self.run.corpus == "shared").then(|| SuffixCorpus::shared(16, 1 << 20))
    }

    fn run_one(&self, mode: Mode, ids: &[u32], session: u64, corpus: Option<&SharedCorpus>) -> Result<SwarmSpecStats> {
        let budget = match mode {
            Mode::Tree | Mode::PipelinedTree => DraftBudget {
                max_nodes: self.run.tree_budget,
                max_depth: self.run.draft_len,
                max_branch: self.run.branch,
            },
            _ => DraftBudget::chain(self.run.draft_len),
        };
        let settings = SwarmSpecSettings {
            depth_max: if mode.pipelined() { self.run.depth } else { 1 },
            adaptive_depth: true,
            failovers_max: 0,
        };
        let mut plan = RingPlan { session, ..self.plan.clone() };
        // A drafter per request; with `--corpus fresh` it knows nothing of earlier requests.
        let mut drafter = self.drafter(mode, corpus);
        let mut policy = Policy::new(PolicyMode::Fixed(budget));
        let (_, _, stats) = generate_swarm_speculative(
            &mut plan,
            drafter.as_mut(),
            &mut policy,
            &settings,
            ids,
            self.run.max_tokens,
            &SamplerConfig::greedy(),
            &[],
            &mut |_| None,
            &mut |_| true,
        )?;
        Ok(stats)
    }

    fn mode(&self, mode: Mode, session0: u64) -> Result<Totals> {
        let mut t = Totals::default();
        let corpus = self.corpus();
        for (i, ids) in self.prompts.iter().enumerate() {
            t.add(&self.run_one(mode, ids, session0 + i as u64, corpus.as_ref())?);
        }
        Ok(t)
    }

    /// `k` streams at once, each running the prompts in turn; aggregate tokens/s.
    fn streams(&self, mode: Mode, k: usize, session0: u64) -> Result<(f64, Totals)> {
        let corpus = self.corpus();
        let corpus = corpus.as_ref();
        let t0 = Instant::now();
        let results: Vec<Result<Totals>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..k)
                .map(|j| {
                    s.spawn(move || -> Result<Totals> {
                        let mut t = Totals::default();
                        for i in 0..self.prompts.len() {
                            t.add(&self.run_one(
                                mode,
                                &self.prompts[(i + j) % self.prompts.len()],
                                session0 + (j * 100 + i) as u64,
                                corpus,
                            )?);
                        }
                        Ok(t)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("stream thread")).collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut all = Totals::default();
        for r in results {
            let r = r?;
            all.generated += r.generated;
            all.tokens += r.tokens;
            all.rounds += r.rounds;
            all.misses += r.misses;
            all.traversal_s += r.traversal_s;
            all.timed_rounds += r.timed_rounds;
        }
        // Aggregate: every token over the wall time (sessions opened and prompts included).
        Ok((all.generated as f64 / wall, all))
    }
}

/// Measure every mode against running workers; one JSON object.
pub fn ring_modes(args: &BenchRingArgs) -> Result<Value> {
    let path = crate::resolve_model(&args.model)?;
    let model_id = specswarm_net::model_id(&path)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
    let addrs: Vec<SocketAddr> = args
        .workers
        .split(',')
        .map(|a| a.trim().parse().with_context(|| format!("bad address {a:?}")))
        .collect::<Result<_>>()?;
    let n = addrs.len();
    let ranges = (0..n).map(|i| ((i * n_layers / n) as u32, ((i + 1) * n_layers / n) as u32)).collect();
    if args.delay_ms > 0.0 {
        specswarm_net::delay::set_send_delay(Duration::from_secs_f64(args.delay_ms / 1000.0));
    }
    let tok = specswarm_engine::tokenizer::Tokenizer::from_gguf(&path)?;
    let suite =
        crate::prompts::suite(&args.run.prompts).with_context(|| format!("unknown suite {:?}", args.run.prompts))?;
    let prompts = suite.iter().map(|p| crate::encode_prompt(&path, &tok, p, true)).collect::<Result<Vec<_>>>()?;
    let client = Client {
        plan: RingPlan { addrs, spec: RingSpec { model_id, ranges }, session: 1, timeout: Duration::from_secs(120) },
        prompts,
        run: args.run.clone(),
        recipe: crate::speculate::recipe(&args.run.draft, &path, args.run.draft_threads)?,
    };
    let names: Vec<&str> = args.run.modes.split(',').map(str::trim).filter(|x| !x.is_empty()).collect();
    if let Some(bad) = names.iter().find(|x| !Mode::all().iter().any(|m| m.name() == **x)) {
        bail!("unknown mode {bad:?} in --modes: use plain, chain, tree, pipelined, pipelined-tree");
    }
    // In the order given (alternate the order between runs to spread drift on a noisy machine).
    let mut modes: Vec<Mode> = Vec::new();
    for name in &names {
        let mode = Mode::all().into_iter().find(|m| m.name() == *name).expect("checked above");
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    if modes.is_empty() {
        bail!("--modes names none of plain, chain, tree, pipelined, pipelined-tree");
    }
    let mut rows = serde_json::Map::new();
    let mut totals = Vec::new();
    for (m, mode) in modes.iter().copied().enumerate() {
        let t = client.mode(mode, 1000 * (m as u64 + 1))?;
        eprintln!(
            "  {:<14} {:>7.1} tok/s  a {:.2}  {:.2} tok/round  T {:.1} ms",
            mode.name(),
            t.tokens_per_s(),
            t.acceptance(),
            t.generated as f64 / t.rounds.max(1) as f64,
            t.traversal_ms()
        );
        totals.push((mode, t));
    }
    let t_of = |mode: Mode| totals.iter().find(|(m, _)| *m == mode).map(|(_, t)| t.traversal_ms()).unwrap_or(0.0);
    for (mode, t) in &totals {
        // One traversal of this mode's batches: pipelined rounds wait in a queue, so their T is
        // that of the same rounds one at a time (the chain's, or the tree's).
        let alone = match mode {
            Mode::Pipelined => Some(Mode::Chain),
            Mode::PipelinedTree => Some(Mode::Tree),
            _ => None,
        };
        let traversal_ms = match alone {
            Some(m) if modes.contains(&m) => t_of(m),
            _ => t.traversal_ms(),
        };
        let a = t.acceptance();
        // With no miss at all (a = 1) the formula has no finite ceiling: reported as null.
        let ceiling = (a < 1.0).then(|| 1000.0 / ((1.0 - a) * traversal_ms.max(1e-9)));
        rows.insert(
            mode.name().into(),
            json!({
                "tokens_per_s": t.tokens_per_s(),
                "acceptance_rate": a,
                "draft_acceptance": t.accepted as f64 / t.drafted.max(1) as f64,
                "tokens_per_round": t.generated as f64 / t.rounds.max(1) as f64,
                "traversal_ms": traversal_ms,
                "ceiling_tokens_per_s": ceiling,
                "percent_of_ceiling": ceiling.map(|c| 100.0 * t.tokens_per_s() / c),
                "mean_pipeline_depth": t.depth_sum as f64 / t.rounds_sent.max(1) as f64,
                "draft_ms_per_round": 1000.0 * t.draft_s / t.rounds_sent.max(1) as f64,
                "tokens": t.tokens,
            }),
        );
    }
    // Concurrent streams of the faster speculative mode.
    let tps = |mode: Mode| totals.iter().find(|(m, _)| *m == mode).map_or(0.0, |(_, t)| t.tokens_per_s());
    let best = [Mode::Pipelined, Mode::PipelinedTree, Mode::Chain, Mode::Tree, Mode::Plain]
        .into_iter()
        .filter(|&m| modes.contains(&m))
        .max_by(|&a, &b| tps(a).total_cmp(&tps(b)))
        .expect("at least one mode");
    let mut streams = serde_json::Map::new();
    let mut one = 0.0;
    let counts: Vec<usize> = args
        .run
        .streams
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()?;
    for k in counts {
        let (agg, t) = client.streams(best, k, 100_000 * k as u64)?;
        if k == 1 {
            one = agg;
        }
        eprintln!("  {k} streams ({}) {agg:>7.1} tok/s aggregate", best.name());
        streams.insert(
            format!("{k}"),
            json!({
                "tokens_per_s": agg,
                "acceptance_rate": t.acceptance(),
                "tokens_per_round": t.generated as f64 / t.rounds.max(1) as f64,
                "traversal_ms": t.traversal_ms(),
                "speedup_vs_one_stream": if one > 0.0 { agg / one } else { 0.0 },
            }),
        );
    }
    let plain = modes.contains(&Mode::Plain).then(|| tps(Mode::Plain));
    let best_single = totals.iter().map(|(_, t)| t.tokens_per_s()).fold(0.0, f64::max);
    Ok(json!({
        "model": args.model,
        "stages": n,
        "prompts": args.run.prompts,
        "draft": args.run.draft,
        "draft_len": args.run.draft_len,
        "max_tokens": args.run.max_tokens,
        "modes": Value::Object(rows),
        "streams_mode": best.name(),
        "streams": Value::Object(streams),
        // Null when plain decoding was not measured.
        "speculative_speedup_vs_plain": plain.map(|p| best_single / p.max(1e-9)),
    }))
}

pub fn ring(args: &BenchRingArgs) -> Result<()> {
    let v = ring_modes(args)?;
    println!("{v}");
    Ok(())
}

/// Worker processes killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_listen_line(child: &mut Child) -> Result<SocketAddr> {
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("worker stdout")?).read_line(&mut line)?;
    line.split_whitespace().nth(1).with_context(|| format!("worker said {line:?}"))?.parse().context("worker address")
}

/// Start the workers (and, for netns, the router), run the client, print the table.
pub fn swarm(args: &BenchSwarmArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let path = crate::resolve_model(&args.model)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
    let n = args.stages;
    if n == 0 || n > n_layers {
        bail!("--stages must be in 1..={n_layers}");
    }
    let mut procs = Procs(Vec::new());
    let layers = |i: usize| format!("{}:{}", i * n_layers / n, (i + 1) * n_layers / n);
    let mut ring_args = BenchRingArgs {
        model: path.display().to_string(),
        workers: String::new(),
        run: args.run.clone(),
        delay_ms: 0.0,
    };
    let result = match args.emulator.as_str() {
        "inproc" => {
            let mut addrs = Vec::new();
            for i in 0..n {
                let mut c = Command::new(&exe)
                    .args(["worker", "--model"])
                    .arg(&path)
                    .args(["--layers", &layers(i), "--delay-ms", &args.latency_ms.to_string(), "--exit-on-stdin-eof"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()?;
                addrs.push(read_listen_line(&mut c)?.to_string());
                procs.0.push(c);
            }
            ring_args.workers = addrs.join(",");
            ring_args.delay_ms = args.latency_ms;
            ring_modes(&ring_args)?
        }
        "netns" => {
            let mut router = Command::new(&exe)
                .args(["wan", "router", "--hosts", &(n + 1).to_string(), "--delay-ms", &args.latency_ms.to_string()])
                .arg("--exit-on-stdin-eof")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting the WAN router (needs root)")?;
            let mut ready = String::new();
            BufReader::new(router.stdout.take().context("router stdout")?).read_line(&mut ready)?;
            procs.0.push(router);
            let mut addrs = Vec::new();
            for i in 0..n {
                let host = i + 1;
                let listen = format!("10.77.0.{host}:7000");
                let c = Command::new("ip")
                    .args(["netns", "exec", &format!("ssw{host}")])
                    .arg(&exe)
                    .args(["worker", "--model"])
                    .arg(&path)
                    .args(["--layers", &layers(i), "--listen", &listen, "--exit-on-stdin-eof"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                procs.0.push(c);
                addrs.push(listen);
            }
            std::thread::sleep(Duration::from_secs(2));
            let out = Command::new("ip")
                .args(["netns", "exec", &format!("ssw{}", n + 1)])
                .arg(&exe)
                .args(["bench", "ring", "--model"])
                .arg(&path)
                .args(["--workers", &addrs.join(",")])
                .args(args.run.to_flags())
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("the client in ssw{} failed", n + 1);
            }
            serde_json::from_slice(&out.stdout).context("client output")?
        }
        e => bail!("unknown emulator {e:?}: use inproc or netns"),
    };
    drop(procs);
    let mut result = result;
    result["latency_ms"] = json!(args.latency_ms);
    result["emulator"] = json!(args.emulator);
    if args.json {
        println!("{result}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} stages, {} ms one way per hop ({}), suite {}, drafter {} (γ {}), {} tokens per prompt",
        n, args.latency_ms, args.emulator, args.run.prompts, args.run.draft, args.run.draft_len, args.run.max_tokens
    )?;
    writeln!(
        out,
        "{:<14} {:>9} {:>6} {:>10} {:>8} {:>12} {:>6} {:>14}",
        "mode", "tok/s", "a", "tok/round", "T ms", "ceiling", "%", "draft ms/round"
    )?;
    for (name, m) in result["modes"].as_object().context("modes")? {
        writeln!(
            out,
            "{:<14} {:>9.1} {:>6.2} {:>10.2} {:>8.1} {:>12} {:>6} {:>14.1}",
            name,
            m["tokens_per_s"].as_f64().unwrap_or(0.0),
            m["acceptance_rate"].as_f64().unwrap_or(0.0),
            m["tokens_per_round"].as_f64().unwrap_or(0.0),
            m["traversal_ms"].as_f64().unwrap_or(0.0),
            m["ceiling_tokens_per_s"].as_f64().map_or("none".into(), |c| format!("{c:.1}")),
            m["percent_of_ceiling"].as_f64().map_or("-".into(), |p| format!("{p:.0}%")),
            m["draft_ms_per_round"].as_f64().unwrap_or(0.0),
        )?;
    }
    for (k, s) in result["streams"].as_object().context("streams")? {
        writeln!(
            out,
            "{k} streams ({}): {:.1} tok/s aggregate ({:.2}x one stream)",
            result["streams_mode"].as_str().unwrap_or(""),
            s["tokens_per_s"].as_f64().unwrap_or(0.0),
            s["speedup_vs_one_stream"].as_f64().unwrap_or(0.0)
        )?;
    }
    if let Some(x) = result["speculative_speedup_vs_plain"].as_f64() {
        writeln!(out, "best speculative mode / plain: {x:.2}x")?;
    }
    Ok(())
}
