//! The libp2p swarm on loopback: a bootstrap node and worker processes that publish themselves
//! in the DHT; the client (this process) discovers them, chooses a ring, and generates through it
//! as a ring with direct return.
//!
//! - 3 workers → greedy output token-identical to single-process generation, both real models,
//!   10 prompts.
//! - kill -9 (or SIGSTOP: a stall) of a random ring member at a random point with spares in the
//!   DHT → identical output, 20 of 20 trials.
//! - bytes that are not frames on a stage stream → an error reply, the stream closed, the worker
//!   still serving.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{PROMPTS_10 as PROMPTS, Procs, encode, model_path};
use libp2p::{Multiaddr, PeerId};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::sampling::SamplerConfig;
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::swarm_spec::{SwarmSpecSettings, generate_on_ring};
use specswarm_p2p::ring::{P2pRing, discover, discover_ring, generate_swarm};
use specswarm_p2p::swarm::{P2pConfig, P2pNode};
use specswarm_spec::drafter::DraftBudget;
use specswarm_spec::drafter::suffix::SuffixDrafter;
use specswarm_spec::policy::{Policy, PolicyMode};

fn home(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("specswarm-p2p-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Start `specswarm ARGS` with `$SPECSWARM_HOME` = `home`; the address on its first line.
fn start(home: &Path, args: &[&str]) -> (Child, Multiaddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_specswarm"));
    cmd.args(args).env("SPECSWARM_HOME", home);
    let (child, line) = common::start(cmd);
    (child, common::second_word(&line).parse().unwrap())
}

fn bootstrap(home: &Path) -> (Child, Multiaddr) {
    start(home, &["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"])
}

fn worker(home: &Path, model: &Path, layers: (usize, usize), bs: &Multiaddr) -> (Child, Multiaddr) {
    worker_on(home, model, layers, bs, "/ip4/127.0.0.1/tcp/0")
}

fn worker_on(home: &Path, model: &Path, layers: (usize, usize), bs: &Multiaddr, listen: &str) -> (Child, Multiaddr) {
    // A fresh identity per process (a restarted worker would otherwise reuse its peer id, which
    // the failover test's client has marked dead).
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let identity = home.join(format!("worker-{n}.key"));
    start(
        home,
        &[
            "worker",
            "--identity",
            identity.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--layers",
            &format!("{}:{}", layers.0, layers.1),
            "--listen",
            listen,
            "--bootstrap",
            &bs.to_string(),
        ],
    )
}

fn client(bs: &Multiaddr) -> P2pNode {
    let node = P2pNode::start(
        libp2p::identity::Keypair::generate_ed25519(),
        P2pConfig { bootstrap: vec![bs.clone()], ..Default::default() },
    )
    .unwrap();
    let want = specswarm_p2p::stage::peer_of(bs).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.peers().contains(&want) {
        assert!(Instant::now() < deadline, "no connection to the bootstrap node");
        std::thread::sleep(Duration::from_millis(20));
    }
    node
}

fn greedy(ring: &mut P2pRing, ids: &[u32], n: usize, on_token: &mut dyn FnMut(u32) -> bool) -> (Vec<u32>, usize) {
    let (out, stats) = generate_swarm(ring, ids, n, true, &mut |_, _| unreachable!("greedy"), &[], on_token)
        .unwrap_or_else(|e| panic!("{e}"));
    (out, stats.failovers)
}

/// Bytes that are not frames get an error reply and a closed stream; the worker keeps serving.
fn hostile_streams_get_errors(node: &P2pNode, worker: &Multiaddr) {
    use futures::AsyncReadExt;
    use specswarm_p2p::stage::{open_stage_stream, read_frame, start_writer};
    use specswarm_proto::wire::{ErrorCode, Frame, HEADER_BYTES, Message};
    let peer = specswarm_p2p::stage::peer_of(worker).unwrap();
    let rt = node.runtime().clone();
    let mut header = Frame { session: 1, epoch: 0, seq: 0, message: Message::Close }.encode();
    header[24..28].copy_from_slice(&u32::MAX.to_le_bytes()); // a 4 GiB payload, never allocated
    for bad in [b"not a frame at all, definitely not 32 bytes long".to_vec(), header[..HEADER_BYTES].to_vec()] {
        rt.block_on(async {
            let (stream, _) = open_stage_stream(node, peer, vec![worker.clone()]).await.unwrap();
            let (mut r, tx) = start_writer(node.runtime(), stream);
            tx.send(bad).await.unwrap();
            let reply = read_frame(&mut r).await.unwrap().unwrap();
            assert!(matches!(reply.message, Message::Error { code: ErrorCode::Malformed, .. }), "{reply:?}");
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await; // the worker closes the stream
            assert!(rest.is_empty());
        });
    }
}

fn check(name: &str, listen: &str) {
    let path = model_path(name);
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let n = local.config().n_layers;
    let home = home(name);
    let mut procs = Procs(Vec::new());
    let (bs_child, bs) = bootstrap(&home);
    procs.0.push(bs_child);
    let cuts = [0, n / 3, 2 * n / 3, n];
    let mut addrs = Vec::new();
    for w in cuts.windows(2) {
        let (child, addr) = worker_on(&home, &path, (w[0], w[1]), &bs, listen);
        procs.0.push(child);
        addrs.push(addr);
    }
    let node = client(&bs);
    hostile_streams_get_errors(&node, &addrs[1]);
    let model_id = specswarm_net::model_id(&path).unwrap();
    let t = Instant::now();
    let cands = discover_ring(&node, &model_id, n as u32, Duration::from_secs(30));
    eprintln!("{name}: discovered {} workers in {:.2}s", cands.len(), t.elapsed().as_secs_f64());
    let mut ring = P2pRing::new(node, model_id, n as u32, cands, 7, Duration::from_secs(60));
    let tok = Tokenizer::from_gguf(&path).unwrap();
    for p in PROMPTS {
        let ids = encode(&path, &tok, p);
        let mut s = Sampler::new(Default::default()).unwrap();
        let (want, _, _) = generate(&local, &ids, 24, &mut s, &[], &mut |_| true).unwrap();
        let (got, failovers) = greedy(&mut ring, &ids, 24, &mut |_| true);
        assert_eq!(got, want, "{name}: {p:?}");
        assert_eq!(failovers, 0);
    }
    assert_eq!(ring.describe().len(), 3, "the ring has the three workers");
    // Speculation over the same libp2p ring: the tail verifies; chains, trees, pipelined chains
    // and pipelined trees, greedy and sampled, equal one process.
    for (i, p) in PROMPTS.iter().enumerate().take(4) {
        let ids = encode(&path, &tok, p);
        let cfg = if i % 2 == 0 {
            SamplerConfig::greedy()
        } else {
            SamplerConfig { temperature: 0.9, top_p: 0.95, seed: 77 + i as u64, ..SamplerConfig::default() }
        };
        let (want, _, _) =
            generate(&local, &ids, 24, &mut Sampler::positional(cfg.clone()).unwrap(), &[], &mut |_| true).unwrap();
        for (budget, depth) in [
            (DraftBudget::chain(6), 1),
            (DraftBudget { max_nodes: 12, max_depth: 4, max_branch: 3 }, 1),
            (DraftBudget::chain(4), 3),
            (DraftBudget { max_nodes: 12, max_depth: 4, max_branch: 3 }, 3),
        ] {
            let mut drafter = SuffixDrafter::new(16, 1 << 16);
            let mut policy = Policy::new(PolicyMode::Fixed(budget));
            let settings = SwarmSpecSettings { depth_max: depth, adaptive_depth: false, failovers_max: 2 };
            let (got, _, stats) =
                generate_on_ring(&mut ring, &mut drafter, &mut policy, &settings, &ids, 24, &cfg, &[], &mut |_| true)
                    .unwrap();
            assert_eq!(got, want, "{name} speculative {budget:?} depth {depth}: {p:?}");
            assert_eq!(stats.failovers, 0);
        }
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn smollm2_three_libp2p_workers_equal_local() {
    check("smollm2-135m", "/ip4/127.0.0.1/tcp/0");
}

/// Over QUIC.
#[test]
fn gemma3_three_libp2p_workers_equal_local() {
    check("gemma3-270m", "/ip4/127.0.0.1/udp/0/quic-v1");
}

/// kill -9 a random worker of the ring at a random point mid-generation, with a spare for its
/// span in the DHT: the client finds the replacement, replays the committed tokens, and finishes
/// with token-identical output. 20 of 20 trials.
#[test]
fn libp2p_failover_after_kill_9_finishes_with_identical_tokens() {
    let path = model_path("smollm2-135m");
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let cuts = [0usize, 10, 20, 30];
    let ids = tok.encode("The history of the printing press begins", false, false).unwrap();
    let max_tokens = 16;
    let mut s = Sampler::new(Default::default()).unwrap();
    let (want, _, _) = generate(&local, &ids, max_tokens, &mut s, &[], &mut |_| true).unwrap();
    let mut rng = common::XorShift(0x2545_f491_4f6c_dd1d);
    let mut next = move || rng.next();
    let home = home("failover");
    let mut procs = Procs(Vec::new());
    let (bs_child, bs) = bootstrap(&home);
    procs.0.push(bs_child);
    // Workers by peer id (index into procs) and span.
    let mut by_peer: HashMap<PeerId, (usize, usize)> = HashMap::new();
    let spawn = |procs: &mut Procs, by_peer: &mut HashMap<PeerId, (usize, usize)>, stage: usize| {
        let (child, addr) = worker(&home, &path, (cuts[stage], cuts[stage + 1]), &bs);
        procs.0.push(child);
        by_peer.insert(specswarm_p2p::stage::peer_of(&addr).unwrap(), (procs.0.len() - 1, stage));
    };
    for stage in 0..3 {
        for _ in 0..2 {
            spawn(&mut procs, &mut by_peer, stage);
        }
    }
    let node = client(&bs);
    let model_id = specswarm_net::model_id(&path).unwrap();
    // Replies take milliseconds here; a stage silent for 3 s has stalled.
    let mut ring = P2pRing::new(node.clone(), model_id, 30, Vec::new(), 100, Duration::from_secs(3));
    let t0 = Instant::now();
    for trial in 0..20 {
        // Wait until every span has two live workers in the DHT (the new spare has published).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let cands = discover(&node, &model_id);
            let live = |st: usize| {
                cands
                    .iter()
                    .filter(|c| c.rtt.is_some() && !ring.dead.contains(&c.peer) && c.record.start as usize == cuts[st])
                    .count()
            };
            if (0..3).all(|st| live(st) >= 2) {
                ring.candidates = cands;
                break;
            }
            assert!(Instant::now() < deadline, "trial {trial}: spares did not appear in the DHT");
            std::thread::sleep(Duration::from_millis(100));
        }
        let victim_stage = (next() % 3) as usize;
        let kill_at = 1 + (next() % (max_tokens as u64 - 2)) as usize;
        ring.plan_connected((ids.len() + max_tokens + 1) as u64).unwrap();
        let victim_peer = ring.describe()[victim_stage].0;
        let (victim, _) = by_peer[&victim_peer];
        let mut produced = 0;
        // Every fifth trial the victim stalls (SIGSTOP) instead of dying: the ring's reply
        // timeout and the liveness probe find it.
        let stall = trial % 5 == 4;
        let victim_child = &mut procs.0[victim];
        let t = Instant::now();
        let (got, failovers) = greedy(&mut ring, &ids, max_tokens, &mut |_| {
            produced += 1;
            if produced == kill_at {
                if stall {
                    // SAFETY: signalling a child process we own.
                    assert_eq!(unsafe { libc::kill(victim_child.id() as libc::pid_t, libc::SIGSTOP) }, 0);
                } else {
                    victim_child.kill().unwrap(); // SIGKILL
                    let _ = victim_child.wait();
                }
            }
            true
        });
        eprintln!(
            "trial {trial}: stage {victim_stage} {} after {kill_at} tokens, {failovers} failover, {:.2}s",
            if stall { "stalled" } else { "killed" },
            t.elapsed().as_secs_f64()
        );
        assert_eq!(got, want, "trial {trial}: stage {victim_stage} killed after {kill_at} tokens");
        // One failover; a second would only mean a slow reply on this loaded machine looked
        // like a stall (the probe then finds every stage alive and the ring is rebuilt as is).
        assert!((1..=2).contains(&failovers), "trial {trial}: {failovers} failovers");
        assert!(ring.dead.contains(&victim_peer));
        if stall {
            // Detected; now the operator's restart: the frozen process goes away.
            let _ = procs.0[victim].kill();
            let _ = procs.0[victim].wait();
        }
        spawn(&mut procs, &mut by_peer, victim_stage);
    }
    eprintln!("20 trials in {:.1}s", t0.elapsed().as_secs_f64());
    drop(procs);
    let _ = std::fs::remove_dir_all(&home);
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

/// `specswarm gateway` with `extra` arguments; its address.
fn gateway(home: &Path, extra: &[&str]) -> (Child, std::net::SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_specswarm"));
    cmd.args(["gateway", "--listen", "127.0.0.1:0", "--no-auth"]).args(extra).env("SPECSWARM_HOME", home);
    let (child, line) = common::start(cmd);
    let addr = line.strip_prefix("gateway listening on http://").unwrap_or_else(|| panic!("{line:?}")).parse();
    (child, addr.unwrap())
}

/// The gateway serving from the swarm: the model is available once a ring exists, its answers
/// (plain and speculative, streamed or not) equal a gateway running the model locally, the
/// dashboard lists the workers, and a client that disconnects mid-stream leaves the swarm
/// serving.
#[test]
fn gateway_serves_from_the_swarm() {
    let path = model_path("smollm2-135m");
    let home = home("gateway");
    let mut procs = Procs(Vec::new());
    let (bs_child, bs) = bootstrap(&home);
    procs.0.push(bs_child);
    for w in [0usize, 10, 20, 30].windows(2) {
        let (child, _) = worker(&home, &path, (w[0], w[1]), &bs);
        procs.0.push(child);
    }
    let bs_addr = bs.clone();
    let bs = bs.to_string();
    let (c, swarm) = gateway(&home, &["--swarm", "--bootstrap", &bs, "--model", "smollm2-135m"]);
    procs.0.push(c);
    let (c, swarm_spec) = gateway(
        &home,
        &["--swarm", "--bootstrap", &bs, "--model", "smollm2-135m", "--draft", "suffix", "--pipeline", "3"],
    );
    procs.0.push(c);
    let (c, local) = gateway(&home, &["--model", "smollm2-135m", "--threads", "1"]);
    procs.0.push(c);
    // Available once discovery has seen a whole ring.
    let deadline = Instant::now() + Duration::from_secs(60);
    for g in [swarm, swarm_spec] {
        loop {
            let (s, b) = http(g, "GET", "/v1/models", "");
            assert_eq!(s, 200, "{b}");
            let v: serde_json::Value = serde_json::from_str(&b).unwrap();
            if v["data"][0]["available"].as_bool() == Some(true) {
                break;
            }
            assert!(Instant::now() < deadline, "the swarm gateway never saw a whole ring: {b}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (s, b) = http(swarm, "GET", "/v1/swarm", "");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(3), "{b}");
    for p in ["Write a haiku about the sea.", "List the days of the week.", "Repeat: one two three one two three"] {
        let body = serde_json::json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": p}],
            "max_tokens": 24,
            "temperature": 0,
        })
        .to_string();
        let (s, want) = http(local, "POST", "/v1/chat/completions", &body);
        assert_eq!(s, 200, "{want}");
        let want: serde_json::Value = serde_json::from_str(&want).unwrap();
        let want = want["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        for g in [swarm, swarm_spec] {
            let (s, got) = http(g, "POST", "/v1/chat/completions", &body);
            assert_eq!(s, 200, "{got}");
            let got: serde_json::Value = serde_json::from_str(&got).unwrap();
            assert_eq!(got["choices"][0]["message"]["content"].as_str().unwrap(), want, "{p:?}");
        }
        // Streamed through the swarm: the deltas concatenate to the same text.
        let stream = serde_json::json!({
            "model": "smollm2-135m", "messages": [{"role": "user", "content": p}],
            "max_tokens": 24, "temperature": 0, "stream": true,
        })
        .to_string();
        let (s, sse) = http(swarm_spec, "POST", "/v1/chat/completions", &stream);
        assert_eq!(s, 200);
        let text: String = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(String::from))
            .collect();
        assert_eq!(text, want, "streamed {p:?}");
        assert!(sse.contains("[DONE]"));
    }
    // A client that goes away mid-stream: the generation stops and the swarm keeps serving.
    {
        use std::io::Write;
        let body = serde_json::json!({
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "stream": true,
        })
        .to_string();
        let mut s = std::net::TcpStream::connect(swarm).unwrap();
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut first = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut first).unwrap();
        drop(s);
    }
    let body = serde_json::json!({
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
    })
    .to_string();
    let (s, b) = http(swarm, "POST", "/v1/chat/completions", &body);
    assert_eq!(s, 200, "{b}");
    // Logprobs need logits, which never leave the tail: a clear 400.
    let body = serde_json::json!({
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": true,
    })
    .to_string();
    let (s, b) = http(swarm, "POST", "/v1/chat/completions", &body);
    assert_eq!(s, 400, "{b}");
    // No session is left on any stage (the disconnected stream's included): every worker's
    // published free KV returns to its total (records refresh every 20 s; a leaked session
    // would hold its KV until the 300 s idle eviction).
    let node = client(&bs_addr);
    let model_id = specswarm_net::model_id(&path).unwrap();
    let total = specswarm_net::stage::StageLimits::default().kv_tokens_total_max as u64;
    let after_ms = specswarm_p2p::record::unix_ms();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        // Only records published after the requests ended count.
        let free: Vec<u64> = discover(&node, &model_id)
            .iter()
            .filter(|c| c.record.published_unix_ms >= after_ms)
            .map(|c| c.record.free_kv_tokens)
            .collect();
        if free.len() == 3 && free.iter().all(|&f| f == total) {
            break;
        }
        assert!(Instant::now() < deadline, "stage sessions still hold KV: free {free:?} of {total}");
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&home);
}
