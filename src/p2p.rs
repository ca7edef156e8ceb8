//! The libp2p commands: `specswarm worker --listen MULTIADDR`, `specswarm bootstrap`,
//! `specswarm swarm status`, `specswarm generate --swarm`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use specswarm_engine::hub;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::{StreamDecoder, Tokenizer};
use specswarm_net::stage::{StageLimits, StageServer};
use specswarm_p2p::record::{WorkerRecord, hex, model_key, worker_key};
use specswarm_p2p::ring::{P2pRing, discover, discover_ring, generate_swarm};
use specswarm_p2p::route::{Candidate, choose_ring, coverage_gaps};
use specswarm_p2p::swarm::{P2pConfig, P2pNode};
use specswarm_proto::limits::WORKER_RECORD_REFRESH_SECS;

use crate::cli::{BootstrapArgs, GenerateArgs, SwarmCommand, WorkerArgs};

fn multiaddrs(v: &[String], what: &str) -> Result<Vec<Multiaddr>> {
    v.iter().map(|a| a.parse::<Multiaddr>().with_context(|| format!("{what} {a:?} is not a multiaddr"))).collect()
}

fn is_relayed(a: &Multiaddr) -> bool {
    a.iter().any(|p| p == Protocol::P2pCircuit)
}

fn exit_on_stdin_eof() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

/// Decode speed of `slice`: one token through all its layers, tokens per second (median of a
/// few steps after a warm-up).
fn measure_tps(slice: &ModelSlice) -> Result<f64> {
    let mut kv = slice.new_cache(16);
    let hidden = vec![0.01f32; slice.config().d_model];
    let want = if slice.is_tail() { Want::LastLogits } else { Want::Hidden };
    let mut secs = Vec::new();
    for pos in 0..6u32 {
        let (tok, p) = ([1u32], [pos]);
        let input = if slice.is_head() { StepInput::Tokens(&tok) } else { StepInput::Hidden(&hidden) };
        let t = Instant::now();
        slice.forward(&mut kv, &Batch { input, positions: &p, tree_parents: None }, want)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let mut s = secs[1..].to_vec();
    s.sort_by(f64::total_cmp);
    Ok(1.0 / s[s.len() / 2].max(1e-6))
}

fn identity(path: &Option<std::path::PathBuf>, role: &str) -> Result<libp2p::identity::Keypair> {
    let path = match path {
        Some(p) => p.clone(),
        None => specswarm_p2p::identity::default_path(&hub::home(), role)?,
    };
    let key = specswarm_p2p::identity::load_or_create(&path)?;
    eprintln!("identity {} (peer id {})", path.display(), key.public().to_peer_id());
    Ok(key)
}

/// Wait until connected to at least one of `bootstrap` (or `wait` passes).
fn wait_bootstrap(node: &P2pNode, bootstrap: &[Multiaddr], wait: Duration) -> bool {
    let peers: Vec<_> = bootstrap.iter().filter_map(specswarm_p2p::stage::peer_of).collect();
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let connected = node.peers();
        if peers.iter().any(|p| connected.contains(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn worker(args: &WorkerArgs) -> Result<()> {
    let path = crate::resolve_model(&args.model)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
    let layers = match &args.layers {
        Some(s) => crate::swarm::parse_layers(s, n_layers)?,
        None => 0..n_layers,
    };
    let listen = multiaddrs(&args.listen, "--listen")?;
    let bootstrap = multiaddrs(&args.bootstrap, "--bootstrap")?;
    let relay_via = multiaddrs(&args.relay, "--relay")?;
    let key = identity(&args.identity, "worker")?;
    let node = P2pNode::start(
        key.clone(),
        P2pConfig {
            listen: listen.clone(),
            bootstrap: bootstrap.clone(),
            relay_server: !args.no_relay_server && relay_via.is_empty(),
            relay_via: relay_via.clone(),
            dht_server: relay_via.is_empty(),
        },
    )?;
    let t = Instant::now();
    let slice = ModelSlice::load_with_progress(
        &path,
        &LoadOptions { layers: Some(layers.clone()), threads: args.threads, ..Default::default() },
        &mut |done, total| eprint!("\rloading layers {}..{}: {done}/{total}", layers.start, layers.end),
    )?;
    eprintln!(" ({:.2}s)", t.elapsed().as_secs_f64());
    let tps = measure_tps(&slice)?;
    eprintln!("measured {tps:.1} tokens/s through layers {}..{}", layers.start, layers.end);
    let model_id = specswarm_net::model_id(&path)?;
    let limits = StageLimits { sessions_max: args.sessions_max, ..StageLimits::default() };
    let kv_total = limits.kv_tokens_total_max;
    let slice = Arc::new(slice);
    let server = StageServer::new(Arc::clone(&slice), model_id, limits);
    let stage = specswarm_p2p::stage::serve(&node, server).map_err(anyhow::Error::msg)?;
    // Direct listeners, plus one relayed address per relay (a reservation takes a round trip).
    let mut addrs = node.listen_addrs(listen.len(), Duration::from_secs(10));
    if !relay_via.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addrs.iter().any(is_relayed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            addrs = node.listen_addrs(0, Duration::ZERO);
        }
        addrs.retain(is_relayed); // behind NAT: the direct addresses are not reachable
    }
    addrs.retain(|a| !a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())));
    let first = addrs.first().context("no listen address came up")?;
    println!("listening {first} layers {}:{} peer {}", layers.start, layers.end, node.peer_id);
    std::io::stdout().flush()?;
    for a in &addrs {
        eprintln!("address {a}");
    }
    if args.exit_on_stdin_eof {
        exit_on_stdin_eof();
    }
    if !bootstrap.is_empty() && !wait_bootstrap(&node, &bootstrap, Duration::from_secs(10)) {
        eprintln!("warning: no bootstrap peer reachable yet; publishing anyway");
    }
    let base = WorkerRecord {
        model_id: hex(&model_id),
        start: layers.start as u32,
        end: layers.end as u32,
        n_layers: n_layers as u32,
        free_kv_tokens: 0,
        throughput_tps: tps,
        addrs: addrs.iter().map(ToString::to_string).collect(),
        published_unix_ms: 0,
        expires_unix_ms: 0,
    };
    // Publish at once, a few more times while the DHT forms, then every refresh interval.
    let mut round = 0u64;
    let mut tps = tps;
    loop {
        let reserved = stage.with_server(|s| s.reserved_tokens());
        if round > 0 && reserved == 0 {
            // Measure again while idle: the start-up figure is often taken while neighbours
            // load, and the machine's load changes.
            tps = measure_tps(&slice).unwrap_or(tps);
        }
        let free = kv_total.saturating_sub(reserved) as u64;
        let rec = WorkerRecord { free_kv_tokens: free, throughput_tps: tps, ..base.clone() }.stamp();
        node.publish(model_key(&model_id), worker_key(&node.peer_id), rec.sign(&key)?);
        round += 1;
        let pause = if round < 4 { 1 } else { WORKER_RECORD_REFRESH_SECS };
        std::thread::sleep(Duration::from_secs(pause));
    }
}

pub fn bootstrap(args: &BootstrapArgs) -> Result<()> {
    let key = identity(&args.identity, "bootstrap")?;
    let listen = multiaddrs(&args.listen, "--listen")?;
    let node = P2pNode::start(
        key,
        P2pConfig {
            listen: listen.clone(),
            bootstrap: multiaddrs(&args.bootstrap, "--bootstrap")?,
            relay_server: true,
            relay_via: Vec::new(),
            dht_server: true,
        },
    )?;
    let mut addrs = node.listen_addrs(listen.len(), Duration::from_secs(10));
    addrs.retain(|a| !a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())));
    let first = addrs.first().context("no listen address came up")?;
    println!("listening {first} peer {}", node.peer_id);
    std::io::stdout().flush()?;
    for a in &addrs {
        eprintln!("address {a}");
    }
    if args.exit_on_stdin_eof {
        exit_on_stdin_eof();
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A client node (fresh identity, DHT client mode) joined through `bootstrap`.
pub(crate) fn client(bootstrap: &[String]) -> Result<P2pNode> {
    let bootstrap = multiaddrs(bootstrap, "--bootstrap")?;
    let node = P2pNode::start(
        libp2p::identity::Keypair::generate_ed25519(),
        P2pConfig { bootstrap: bootstrap.clone(), ..Default::default() },
    )?;
    if !wait_bootstrap(&node, &bootstrap, Duration::from_secs(10)) {
        bail!("no bootstrap peer reachable");
    }
    Ok(node)
}

/// Model id of a known name (from its published sha256, no download) or of a GGUF path.
fn model_id_of(spec: &str) -> Result<[u8; 32]> {
    let hex = match hub::known(spec) {
        Some(k) => k.sha256.to_string(),
        None => hub::sha256_file(std::path::Path::new(spec)).with_context(|| format!("reading {spec}"))?,
    };
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).context("sha256")?, 16)?;
    }
    Ok(id)
}

pub fn swarm(cmd: &SwarmCommand) -> Result<()> {
    let SwarmCommand::Status { bootstrap, model, json } = cmd;
    let node = client(bootstrap)?;
    let models: Vec<(String, [u8; 32])> = match model {
        Some(m) => vec![(m.clone(), model_id_of(m)?)],
        None => {
            hub::KNOWN_MODELS.iter().map(|k| Ok((k.name.to_string(), model_id_of(k.name)?))).collect::<Result<_>>()?
        }
    };
    let mut out = Vec::new();
    for (name, id) in models {
        let cands = discover(&node, &id);
        if cands.is_empty() && model.is_none() {
            continue;
        }
        out.push(status_of(&name, &id, &cands, *json));
    }
    if *json {
        println!("{}", serde_json::Value::Array(out));
    } else if out.is_empty() {
        println!("no workers found for the known models");
    }
    Ok(())
}

fn status_of(name: &str, id: &[u8; 32], cands: &[Candidate], json: bool) -> serde_json::Value {
    let n_layers = cands.iter().map(|c| c.record.n_layers).max().unwrap_or(0);
    let gaps = coverage_gaps(cands, n_layers);
    let none = Default::default();
    let plan = choose_ring(cands, n_layers, 1, &none, &none);
    let mut sorted: Vec<&Candidate> = cands.iter().collect();
    sorted.sort_by_key(|c| (c.record.start, c.record.end));
    if !json {
        println!("model {name} ({}…): {} workers, {n_layers} layers", &hex(id)[..12], cands.len());
        println!("  {:<54} {:>7} {:>9} {:>9} {:>8}  address", "peer", "layers", "rtt ms", "free KV", "tok/s");
        for c in &sorted {
            println!(
                "  {:<54} {:>7} {:>9} {:>9} {:>8.1}  {}",
                c.peer.to_string(),
                format!("{}:{}", c.record.start, c.record.end),
                c.rtt.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0)),
                c.record.free_kv_tokens,
                c.record.throughput_tps,
                c.record.addrs.first().map_or("", String::as_str)
            );
        }
        println!("  coverage gaps: {}", if gaps.is_empty() { "none".into() } else { format!("{gaps:?}") });
        match &plan {
            Some(p) => println!(
                "  best ring: {} (predicted {:.1} ms per token)",
                p.stages
                    .iter()
                    .map(|&i| format!("{}:{}@{}", cands[i].record.start, cands[i].record.end, short(&cands[i])))
                    .collect::<Vec<_>>()
                    .join(" -> "),
                p.predicted_ms
            ),
            None => println!("  no complete ring"),
        }
    }
    serde_json::json!({
        "model": name,
        "model_id": hex(id),
        "n_layers": n_layers,
        "workers": sorted.iter().map(|c| serde_json::json!({
            "peer": c.peer.to_string(),
            "start": c.record.start,
            "end": c.record.end,
            "rtt_ms": c.rtt.map(|d| d.as_secs_f64() * 1000.0),
            "free_kv_tokens": c.record.free_kv_tokens,
            "throughput_tps": c.record.throughput_tps,
            "addrs": c.record.addrs,
        })).collect::<Vec<_>>(),
        "gaps": gaps,
        "ring": plan.as_ref().map(|p| p.stages.iter().map(|&i| cands[i].peer.to_string()).collect::<Vec<_>>()),
        "predicted_ms": plan.map(|p| p.predicted_ms),
    })
}

fn short(c: &Candidate) -> String {
    let s = c.peer.to_string();
    s[s.len().saturating_sub(6)..].to_string()
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    let path = crate::resolve_model(&args.model)?;
    let tok = Tokenizer::from_gguf(&path)?;
    let file = specswarm_engine::gguf::GgufFile::open(&path)?;
    let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers as u32;
    let model_id = specswarm_net::model_id(&path)?;
    let prompt = crate::encode_prompt(&path, &tok, &args.prompt, args.chat)?;
    let node = client(&args.bootstrap)?;
    let cands = discover_ring(&node, &model_id, n_layers, Duration::from_secs(15));
    let session = u64::from_le_bytes(node.peer_id.to_bytes()[6..14].try_into().expect("8 bytes"));
    let mut ring = P2pRing::new(node, model_id, n_layers, cands, session, Duration::from_secs(30));
    let cfg = args.sampler_config();
    let greedy = cfg.temperature == 0.0
        && cfg.repetition_penalty == 1.0
        && cfg.frequency_penalty == 0.0
        && cfg.presence_penalty == 0.0;
    let mut sampler = Sampler::new(cfg).context("invalid sampler settings")?;
    let mut decoder = StreamDecoder::new(&tok, true);
    let mut stdout = std::io::stdout().lock();
    let stream = !args.json;
    let mut emit = |id: u32| {
        if stream {
            let _ = stdout.write_all(decoder.push(id).as_bytes());
            let _ = stdout.flush();
        }
        true
    };
    if let Some(draft) = &args.draft {
        // Speculative: the tail verifies, only token ids come back (net::swarm_spec).
        let mut drafter = crate::speculate::drafter(draft, &path, args.threads)?;
        let mut policy = crate::speculate::policy(args)?;
        let settings = specswarm_net::swarm_spec::SwarmSpecSettings {
            depth_max: args.pipeline.max(1),
            adaptive_depth: true,
            failovers_max: specswarm_net::ring::FAILOVERS_PER_REQUEST_MAX,
        };
        let plan = ring
            .plan_connected((prompt.len() + args.max_tokens + 64) as u64)
            .context("choosing a ring from the discovered workers")?;
        let (ids, _, stats) = specswarm_net::swarm_spec::generate_on_ring(
            &mut ring,
            drafter.as_mut(),
            &mut policy,
            &settings,
            &prompt,
            args.max_tokens,
            &args.sampler_config(),
            tok.stop_ids(),
            &mut emit,
        )?;
        let stages: Vec<String> =
            ring.describe().iter().map(|(peer, (a, b), addr)| format!("{a}:{b} {peer} at {addr}")).collect();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "model": args.model,
                    "text": tok.decode(&ids, true),
                    "token_ids": ids,
                    "prompt_tokens": prompt.len(),
                    "generated_tokens": ids.len(),
                    "ring": stages,
                    "predicted_step_ms": plan.predicted_ms,
                    "failovers": stats.failovers,
                    "decode_tokens_per_s": stats.decode_tokens_per_s(),
                    "acceptance_rate": stats.acceptance_rate(),
                    "draft_acceptance": stats.draft_acceptance(),
                    "tokens_per_round": stats.tokens_per_round(),
                    "rounds": stats.rounds,
                    "traversal_ms": 1000.0 * stats.traversal_s(),
                })
            );
        } else {
            let _ = writeln!(stdout, "{}", decoder.finish());
            for s in &stages {
                eprintln!("[stage {s}]");
            }
            eprintln!(
                "[{} prompt tokens | {} generated at {:.1} tok/s through {} workers | a {:.2}, {:.2} tokens/round, T {:.1} ms | failovers {}]",
                prompt.len(),
                ids.len(),
                stats.decode_tokens_per_s(),
                stages.len(),
                stats.acceptance_rate(),
                stats.tokens_per_round(),
                1000.0 * stats.traversal_s(),
                stats.failovers
            );
        }
        return Ok(());
    }
    let (ids, stats) = generate_swarm(
        &mut ring,
        &prompt,
        args.max_tokens,
        greedy,
        &mut |logits, history| sampler.sample(logits, history),
        tok.stop_ids(),
        &mut emit,
    )?;
    let stages: Vec<String> =
        ring.describe().iter().map(|(peer, (a, b), addr)| format!("{a}:{b} {peer} at {addr}")).collect();
    let decode_tps = ids.len().saturating_sub(1) as f64 / stats.decode.as_secs_f64().max(1e-9);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model,
                "text": tok.decode(&ids, true),
                "token_ids": ids,
                "prompt_tokens": prompt.len(),
                "generated_tokens": ids.len(),
                "ring": stages,
                "predicted_step_ms": stats.predicted_step_ms,
                "failovers": stats.failovers,
                "prefill_s": stats.prefill.as_secs_f64(),
                "decode_tokens_per_s": decode_tps,
            })
        );
    } else {
        let _ = writeln!(stdout, "{}", decoder.finish());
        for s in &stages {
            eprintln!("[stage {s}]");
        }
        eprintln!(
            "[{} prompt tokens | {} generated, decode {decode_tps:.1} tok/s through {} workers | predicted {:.1} ms/token | failovers {}]",
            prompt.len(),
            ids.len(),
            stages.len(),
            stats.predicted_step_ms,
            stats.failovers
        );
    }
    Ok(())
}

/// The gateway's view of one model in the libp2p swarm: a background thread keeps the
/// discovered workers fresh (handlers never wait on the DHT); each request gets its own ring.
pub(crate) struct P2pRingFactory {
    node: P2pNode,
    model_id: [u8; 32],
    model: String,
    n_layers: u32,
    cands: std::sync::Arc<std::sync::Mutex<Vec<Candidate>>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl P2pRingFactory {
    pub(crate) fn start(node: P2pNode, model_id: [u8; 32], model: &str, n_layers: u32) -> P2pRingFactory {
        let cands = std::sync::Arc::new(std::sync::Mutex::new(discover(&node, &model_id)));
        let (n, c) = (node.clone(), std::sync::Arc::clone(&cands));
        std::thread::Builder::new()
            .name("swarm-discovery".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    let fresh = discover(&n, &model_id);
                    *c.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                }
            })
            .expect("spawn the discovery thread");
        let seed = u64::from_le_bytes(node.peer_id.to_bytes()[6..14].try_into().expect("8 bytes"));
        P2pRingFactory {
            node,
            model_id,
            model: model.to_string(),
            n_layers,
            cands,
            next_session: std::sync::atomic::AtomicU64::new(seed),
        }
    }

    fn snapshot(&self) -> Vec<Candidate> {
        self.cands.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl specswarm_gateway::swarm::RingFactory for P2pRingFactory {
    fn ring(&self, kv_tokens: usize) -> Result<Box<dyn specswarm_net::swarm_spec::SpecRing>, String> {
        let session = self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut ring = P2pRing::new(
            self.node.clone(),
            self.model_id,
            self.n_layers,
            self.snapshot(),
            session,
            Duration::from_secs(30),
        );
        ring.plan_connected(kv_tokens as u64).map_err(|e| e.to_string())?;
        Ok(Box::new(ring))
    }

    fn available(&self) -> bool {
        let c = self.snapshot();
        let live: Vec<Candidate> = c.into_iter().filter(|c| c.rtt.is_some()).collect();
        !live.is_empty() && specswarm_p2p::route::coverage_gaps(&live, self.n_layers).is_empty()
    }

    fn workers(&self) -> Vec<specswarm_gateway::backend::WorkerStatus> {
        self.snapshot()
            .iter()
            .map(|c| specswarm_gateway::backend::WorkerStatus {
                id: c.peer.to_string(),
                address: c.record.addrs.first().cloned().unwrap_or_default(),
                model: self.model.clone(),
                layers: [c.record.start as usize, c.record.end as usize],
                healthy: c.rtt.is_some(),
                rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                tokens_per_s: c.record.throughput_tps,
                active_sessions: 0,
            })
            .collect()
    }
}
