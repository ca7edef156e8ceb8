//! Worker processes on loopback: a 3-stage ring over TCP produces greedy output token-identical
//! to single-process generation, on both real models, for 10 prompts.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::ring::{RingClient, RingSpec, StageLink, generate_ring};
use specswarm_net::tcp::TcpLink;

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(path: &std::path::Path, layers: (usize, usize)) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_specswarm"))
        .args(["worker", "--model"])
        .arg(path)
        .args(["--layers", &format!("{}:{}", layers.0, layers.1), "--exit-on-stdin-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("worker said {line:?}")).parse().unwrap();
    (child, addr)
}

const PROMPTS: [&str; 10] = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying focused.",
    "Explain what a hash map is.",
    "List the planets of the solar system.",
    "def quicksort(xs):",
    "The quick brown fox",
    "Translate to French: good night",
    "{\"tool\": \"search\", \"query\":",
    "Once upon a time",
];

fn check(name: &str) {
    let path = hub::ensure(hub::known(name).unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let n = local.config().n_layers;
    let cuts = [0, n / 3, 2 * n / 3, n];
    let mut workers = Workers(Vec::new());
    let mut links: Vec<Box<dyn StageLink>> = Vec::new();
    for w in cuts.windows(2) {
        let (child, addr) = spawn(&path, (w[0], w[1]));
        workers.0.push(child);
        links.push(Box::new(TcpLink::connect(addr, Duration::from_secs(30), Duration::from_secs(60)).unwrap()));
    }
    let ranges = cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
    let mut ring = RingClient::new(links, RingSpec { model_id: specswarm_net::model_id(&path).unwrap(), ranges }, 7);
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let template = ChatTemplate::from_gguf(&path).unwrap();
    for p in PROMPTS {
        let ids = match &template {
            Some(t) => tok
                .encode(
                    &t.render(&[ChatMessage { role: "user".into(), content: p.into() }], true).unwrap(),
                    false,
                    true,
                )
                .unwrap(),
            None => tok.encode(p, true, false).unwrap(),
        };
        let mut s = Sampler::new(Default::default()).unwrap();
        let (want, _, _) = generate(&local, &ids, 24, &mut s, &[], &mut |_| true).unwrap();
        let mut s = Sampler::new(Default::default()).unwrap();
        let (got, _) = generate_ring(&mut ring, &ids, 24, &mut s, &[], &mut |_| true).unwrap();
        assert_eq!(got, want, "{name}: {p:?}");
    }
    drop(workers);
}

#[test]
fn smollm2_three_worker_processes_equal_local() {
    check("smollm2-135m");
}

#[test]
fn gemma3_three_worker_processes_equal_local() {
    check("gemma3-270m");
}
