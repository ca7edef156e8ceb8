//! `specswarm worker` and the multi-process `specswarm demo`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use specswarm_engine::generate::generate;
use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::direct::DirectRing;
use specswarm_net::ring::RingSpec;
use specswarm_net::stage::{StageLimits, StageServer};
use specswarm_net::tcp::serve;
use specswarm_p2p::swarm::{P2pConfig, P2pNode};

use crate::cli::WorkerArgs;

pub(crate) fn parse_layers(s: &str, n_layers: usize) -> Result<std::ops::Range<usize>> {
    let (a, b) = s.split_once(':').context("--layers takes A:B")?;
    let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
    if a >= b || b > n_layers {
        bail!("--layers {a}:{b} is not a range inside 0:{n_layers}");
    }
    Ok(a..b)
}

pub fn worker(args: &WorkerArgs) -> Result<()> {
    let path = crate::resolve_model(&args.model)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
    let layers = match &args.layers {
        Some(s) => parse_layers(s, n_layers)?,
        None => 0..n_layers,
    };
    if args.delay_ms > 0.0 {
        specswarm_net::delay::set_send_delay(std::time::Duration::from_secs_f64(args.delay_ms / 1000.0));
    }
    let t = Instant::now();
    let slice = ModelSlice::load_with_progress(
        &path,
        &LoadOptions { layers: Some(layers.clone()), threads: args.threads, ..Default::default() },
        &mut |done, total| eprint!("\rloading layers {}..{}: {done}/{total}", layers.start, layers.end),
    )?;
    eprintln!(" ({:.2}s)", t.elapsed().as_secs_f64());
    let model_id = specswarm_net::model_id(&path)?;
    let limits = StageLimits { sessions_max: args.sessions_max, ..StageLimits::default() };
    let server = StageServer::new(Arc::new(slice), model_id, limits);
    let listen = args.listen.first().context("--listen")?;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    println!("listening {addr} layers {}:{}", layers.start, layers.end);
    std::io::stdout().flush()?;
    if args.exit_on_stdin_eof {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    serve(listener, server)?;
    Ok(())
}

/// Worker processes that are killed when dropped.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `specswarm ARGS --exit-on-stdin-eof`; the second word of its first stdout line (the
/// address it listens on).
fn spawn_listening(exe: &std::path::Path, args: &[String]) -> Result<(Child, String)> {
    spawn_reading(exe, args, &|line| line.split_whitespace().nth(1).map(str::to_string))
}

/// Start `specswarm ARGS --exit-on-stdin-eof` and read its stdout until `find` picks something
/// out of a line (the address it listens on).
fn spawn_reading(
    exe: &std::path::Path,
    args: &[String],
    find: &dyn Fn(&str) -> Option<String>,
) -> Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(args)
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a process")?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            let _ = child.kill();
            bail!("{args:?} exited before saying where it listens");
        }
        if let Some(found) = find(&line) {
            // Keep its stdout drained (a full pipe would block it).
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            return Ok((child, found));
        }
    }
}

/// The demo on libp2p: a bootstrap node, `n_workers` worker processes that publish themselves in
/// the DHT, and this process as the client that discovers them, chooses the ring by the cost
/// model, and generates through it with direct return.
pub fn demo(max_tokens: usize, n_workers: usize, tcp: bool) -> Result<()> {
    if tcp {
        return demo_tcp(max_tokens, n_workers);
    }
    use specswarm_p2p::ring::{P2pRing, discover_ring, generate_swarm};
    let name = hub::DEFAULT_MODEL;
    println!("== specswarm demo: {name} on a local libp2p swarm of {n_workers} worker processes");
    let path = crate::resolve_model(name)?;
    let tok = Tokenizer::from_gguf(&path)?;
    let model_id = specswarm_net::model_id(&path)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
    if n_workers == 0 || n_workers > n_layers {
        bail!("--workers must be between 1 and {n_layers}");
    }
    let cuts: Vec<usize> = (0..=n_workers).map(|i| i * n_layers / n_workers).collect();
    let exe = std::env::current_exe()?;
    let ids_dir = std::env::temp_dir().join(format!("specswarm-demo-{}", std::process::id()));
    let mut workers = Workers(Vec::new());
    let (child, bs) = spawn_listening(
        &exe,
        &["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--identity"]
            .map(String::from)
            .into_iter()
            .chain([ids_dir.join("bootstrap.key").display().to_string()])
            .collect::<Vec<_>>(),
    )?;
    println!("bootstrap + relay node (pid {}): {bs}", child.id());
    workers.0.push(child);
    for (i, w) in cuts.windows(2).enumerate() {
        let args: Vec<String> = vec![
            "worker".into(),
            "--model".into(),
            path.display().to_string(),
            "--layers".into(),
            format!("{}:{}", w[0], w[1]),
            "--threads".into(),
            "1".into(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--bootstrap".into(),
            bs.clone(),
            "--identity".into(),
            ids_dir.join(format!("worker-{i}.key")).display().to_string(),
        ];
        let (child, addr) = spawn_listening(&exe, &args)?;
        println!("worker {} (pid {}): layers {:>2}..{:<2} at {addr}", i + 1, child.id(), w[0], w[1]);
        workers.0.push(child);
    }
    let node = P2pNode::start(
        libp2p::identity::Keypair::generate_ed25519(),
        P2pConfig { bootstrap: vec![bs.parse()?], ..Default::default() },
    )?;
    let t = Instant::now();
    let cands = discover_ring(&node, &model_id, n_layers as u32, Duration::from_secs(30));
    println!("discovered {} workers in the DHT in {:.2}s:", cands.len(), t.elapsed().as_secs_f64());
    for c in &cands {
        println!(
            "  layers {:>2}..{:<2} peer …{} rtt {} ms, {:.0} tok/s, {} free KV tokens",
            c.record.start,
            c.record.end,
            c.peer.to_string().chars().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect::<String>(),
            c.rtt.map_or("?".into(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0)),
            c.record.throughput_tps,
            c.record.free_kv_tokens
        );
    }
    let mut ring = P2pRing::new(node, model_id, n_layers as u32, cands, 1, Duration::from_secs(60));
    let plan = ring.plan_connected(1)?;
    println!(
        "ring: client -> {} -> client (each worker forwards to the next over a libp2p stream; the tail returns token ids; predicted {:.1} ms/token)",
        ring.describe().iter().map(|(_, (a, b), _)| format!("{a}..{b}")).collect::<Vec<_>>().join(" -> "),
        plan.predicted_ms
    );
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() })?;
    for p in DEMO_PROMPTS {
        let ids = crate::encode_prompt(&path, &tok, p, true)?;
        let (out, stats) =
            generate_swarm(&mut ring, &ids, max_tokens, true, &mut |_, _| 0, tok.stop_ids(), &mut |_| true)?;
        let mut sampler = Sampler::new(Default::default())?;
        let (reference, _, _) = generate(&local, &ids, max_tokens, &mut sampler, tok.stop_ids(), &mut |_| true)?;
        println!("\n> {p}\n{}", tok.decode(&out, true).trim());
        println!(
            "[swarm: {} prompt tokens, {} generated at {:.1} tok/s through {n_workers} libp2p workers | identical to one process: {}]",
            ids.len(),
            out.len(),
            out.len().saturating_sub(1) as f64 / stats.decode.as_secs_f64().max(1e-9),
            if out == reference { "yes" } else { "NO" }
        );
        if out != reference {
            bail!("the swarm's output differs from single-process output");
        }
    }
    drop(ring);
    demo_gateway(&exe, &bs, name, max_tokens, &mut workers)?;
    drop(workers);
    let _ = std::fs::remove_dir_all(&ids_dir);
    println!("\nworkers and gateway stopped.");
    Ok(())
}

/// The demo's second half: `specswarm gateway --swarm` in front of the same workers, asked over
/// its OpenAI-compatible HTTP API like any client would, with lossless suffix speculation whose
/// corpus of earlier answers (per API key) makes a repeated request draft its answer.
fn demo_gateway(exe: &std::path::Path, bs: &str, model: &str, max_tokens: usize, procs: &mut Workers) -> Result<()> {
    let args: Vec<String> = ["gateway", "--swarm", "--bootstrap", bs, "--model", model, "--no-auth"]
        .into_iter()
        .chain(["--listen", "127.0.0.1:0", "--draft", "suffix", "--draft-len", "8"])
        .map(String::from)
        .collect();
    let (child, url) = spawn_reading(exe, &args, &|line| {
        line.split_whitespace().find(|w| w.starts_with("http://")).map(|w| w["http://".len()..].to_string())
    })?;
    println!(
        "\n== gateway (pid {}): http://{url} — OpenAI /v1/chat/completions, Anthropic /v1/messages, chat at /, dashboard at /swarm",
        child.id()
    );
    procs.0.push(child);
    // The gateway finds the workers in the DHT on its own.
    let t = Instant::now();
    loop {
        let (status, body) = http(&url, "GET", "/v1/models", None)?;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && v["data"][0]["available"] == true {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the gateway did not find the swarm's workers within 60 s: {body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("gateway found a complete ring in the DHT after {:.1}s", t.elapsed().as_secs_f64());
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": DEMO_AGENT_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string();
    println!("\n> POST /v1/chat/completions (twice, greedy): {DEMO_AGENT_PROMPT:?}");
    let mut first_text = None;
    for attempt in ["first", "again"] {
        let (status, resp) = http(&url, "POST", "/v1/chat/completions", Some(&body))?;
        let v: serde_json::Value = serde_json::from_str(&resp).with_context(|| format!("gateway said {resp}"))?;
        if status != 200 {
            bail!("the gateway answered {status}: {resp}");
        }
        let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
        match &first_text {
            None => println!("{}", text.trim()),
            Some(t) if *t != text => bail!("the repeated greedy request answered differently"),
            Some(_) => {}
        }
        first_text.get_or_insert(text);
        let st = &v["specswarm"];
        println!(
            "[{attempt}: {} tokens at {:.1} tok/s | suffix drafts accepted: {} of {} drafted]",
            v["usage"]["completion_tokens"],
            st["tokens_per_s"].as_f64().unwrap_or(0.0),
            st["accepted_tokens"],
            st["drafted_tokens"]
        );
    }
    println!("(the second request drafted from the first answer; speculation is lossless: the same text, checked)");
    Ok(())
}

/// A question whose answer repeats structure (what agents send).
const DEMO_AGENT_PROMPT: &str =
    "Write a JSON array with three objects, each with the fields name, city and age, for three friends.";

/// One HTTP/1.1 exchange with `addr` (`ip:port`); the status and the body.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").with_context(|| format!("not an HTTP response: {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(rest) } else { rest.to_string() }))
}

/// The payload of a chunked HTTP body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

const DEMO_PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying focused.",
];

/// The demo over plain TCP (`specswarm demo --tcp`).
fn demo_tcp(max_tokens: usize, n_workers: usize) -> Result<()> {
    let name = hub::DEFAULT_MODEL;
    println!("== specswarm demo: {name} on a local swarm of {n_workers} worker processes (TCP)");
    let path = crate::resolve_model(name)?;
    let tok = Tokenizer::from_gguf(&path)?;
    let model_id = specswarm_net::model_id(&path)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
    if n_workers == 0 || n_workers > n_layers {
        bail!("--workers must be between 1 and {n_layers}");
    }
    let cuts: Vec<usize> = (0..=n_workers).map(|i| i * n_layers / n_workers).collect();
    let exe = std::env::current_exe()?;
    let mut workers = Workers(Vec::new());
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for w in cuts.windows(2) {
        let mut child = Command::new(&exe)
            .args(["worker", "--model"])
            .arg(&path)
            .args(["--layers", &format!("{}:{}", w[0], w[1]), "--threads", "1", "--exit-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a worker process")?;
        let stdout = child.stdout.take().expect("piped");
        workers.0.push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("worker did not report its address: {line:?}"))?;
        println!(
            "worker {} (pid {}): layers {:>2}..{:<2} at {addr}",
            addrs.len() + 1,
            workers.0.last().map_or(0, Child::id),
            w[0],
            w[1]
        );
        addrs.push(addr);
    }
    let ranges = cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
    let mut ring = DirectRing::connect(&addrs, RingSpec { model_id, ranges }, 1, Duration::from_secs(60))?;
    println!(
        "ring: client -> worker 1 -> ... -> worker {n_workers} -> client (each worker forwards to the next; the tail returns token ids)"
    );
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() })?;
    for p in DEMO_PROMPTS {
        let ids = crate::encode_prompt(&path, &tok, p, true)?;
        let (out, secs) = ring_greedy(&mut ring, &ids, max_tokens, tok.stop_ids())?;
        let mut sampler = Sampler::new(Default::default())?;
        let (reference, _, _) = generate(&local, &ids, max_tokens, &mut sampler, tok.stop_ids(), &mut |_| true)?;
        println!("\n> {p}\n{}", tok.decode(&out, true).trim());
        println!(
            "[swarm: {} prompt tokens, {} generated at {:.1} tok/s through {n_workers} processes | identical to one process: {}]",
            ids.len(),
            out.len(),
            out.len().saturating_sub(1) as f64 / secs.max(1e-9),
            if out == reference { "yes" } else { "NO" }
        );
        if out != reference {
            bail!("the swarm's output differs from single-process output");
        }
    }
    drop(workers);
    println!("\nworkers stopped.");
    Ok(())
}

/// Greedy decoding through a direct-return ring whose tail picks the tokens; returns the tokens
/// and the seconds spent after the first one.
fn ring_greedy(ring: &mut DirectRing, prompt: &[u32], max_tokens: usize, stop: &[u32]) -> Result<(Vec<u32>, f64)> {
    ring.open_with((prompt.len() + max_tokens + 1) as u32, true)?;
    let pos: Vec<u32> = (0..prompt.len() as u32).collect();
    let mut out = vec![ring.forward_argmax(prompt, &pos, None)?[0]];
    let t = Instant::now();
    while out.len() < max_tokens && !stop.contains(out.last().expect("non-empty")) {
        let p = [ring.committed() as u32];
        let next = ring.forward_argmax(&[*out.last().expect("non-empty")], &p, None)?[0];
        out.push(next);
    }
    let secs = t.elapsed().as_secs_f64();
    ring.close()?;
    Ok((out, secs))
}

/// `specswarm wan …`
pub fn wan(cmd: &crate::cli::WanCommand) -> Result<()> {
    use crate::cli::WanCommand;
    use specswarm_net::wan;
    match cmd {
        WanCommand::Router { hosts, delay_ms, jitter_ms, loss, rate_kbps, exit_on_stdin_eof } => {
            let spec = wan::LinkSpec {
                one_way: Duration::from_secs_f64(delay_ms / 1000.0),
                jitter: Duration::from_secs_f64(jitter_ms / 1000.0),
                loss: *loss,
                rate_bps: rate_kbps * 1000,
            };
            let router = wan::WanRouter::start(*hosts, spec, 42).context("starting the WAN router (root is needed)")?;
            println!(
                "ready {} hosts: {}",
                router.hosts(),
                (1..=*hosts)
                    .map(|i| format!("{}={}", wan::netns_name(i), wan::host_addr(i)))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            std::io::stdout().flush()?;
            static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            extern "C" fn on_signal(_: libc::c_int) {
                STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            }
            if *exit_on_stdin_eof {
                std::thread::spawn(|| {
                    let mut sink = [0u8; 64];
                    let mut stdin = std::io::stdin();
                    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
                    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
                });
            }
            while !STOP.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(router);
            Ok(())
        }
        WanCommand::Echo { listen } => Ok(wan::udp_echo(listen)?),
        WanCommand::Ping { to, count } => {
            let rtts = wan::udp_ping(to, *count, Duration::from_secs(2))?;
            let mut ms: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            let median = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
            println!(
                "{}",
                serde_json::json!({ "to": to, "sent": count, "received": ms.len(), "median_ms": median, "rtts_ms": ms })
            );
            Ok(())
        }
    }
}
