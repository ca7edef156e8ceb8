//! Worker processes on loopback: a 3-stage ring over TCP produces greedy output token-identical
//! to single-process generation, on both real models, for 10 prompts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{PROMPTS_10, Procs, encode, model_path, spawn_worker};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::ring::{RingClient, RingSpec, StageLink, generate_ring};
use specswarm_net::tcp::TcpLink;

fn check(name: &str) {
    let path = model_path(name);
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let n = local.config().n_layers;
    let cuts = [0, n / 3, 2 * n / 3, n];
    let mut workers = Procs(Vec::new());
    let mut links: Vec<Box<dyn StageLink>> = Vec::new();
    for w in cuts.windows(2) {
        let (child, addr) = spawn_worker(&path, (w[0], w[1]), &[]);
        workers.0.push(child);
        links.push(Box::new(TcpLink::connect(addr, Duration::from_secs(30), Duration::from_secs(60)).unwrap()));
    }
    let ranges = cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
    let mut ring = RingClient::new(links, RingSpec { model_id: specswarm_net::model_id(&path).unwrap(), ranges }, 7);
    let tok = Tokenizer::from_gguf(&path).unwrap();
    for p in PROMPTS_10 {
        let ids = encode(&path, &tok, p);
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

/// Spare workers by stage, handed out on failure.
struct Spares(Vec<Vec<SocketAddr>>);

impl specswarm_net::ring::Router for Spares {
    fn replacement(&mut self, stage: usize) -> Option<Box<dyn StageLink>> {
        let addr = self.0[stage].pop()?;
        Some(Box::new(TcpLink::connect(addr, Duration::from_secs(30), Duration::from_secs(60)).ok()?))
    }
}

/// kill -9 a random worker at a random point mid-generation, with a spare for that span: the
/// request completes with token-identical output. 20 of 20 trials.
#[test]
fn failover_after_kill_9_finishes_with_identical_tokens() {
    let path = model_path("smollm2-135m");
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let cuts = [0usize, 10, 20, 30];
    let ids = tok.encode("The history of the printing press begins", false, false).unwrap();
    let max_tokens = 24;
    let mut s = Sampler::new(Default::default()).unwrap();
    let (want, _, _) = generate(&local, &ids, max_tokens, &mut s, &[], &mut |_| true).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // A pool of workers per span, replenished as trials kill them.
    let mut workers = Procs(Vec::new());
    let mut pool: Vec<Vec<(usize, SocketAddr)>> = vec![Vec::new(); 3];
    let spawn_into = |pool: &mut Vec<Vec<(usize, SocketAddr)>>, workers: &mut Procs, stage: usize| {
        let (child, addr) = spawn_worker(&path, (cuts[stage], cuts[stage + 1]), &[]);
        workers.0.push(child);
        pool[stage].push((workers.0.len() - 1, addr));
    };
    for stage in 0..3 {
        for _ in 0..2 {
            spawn_into(&mut pool, &mut workers, stage);
        }
    }
    for trial in 0..20 {
        let victim_stage = (next() % 3) as usize;
        let kill_at = 1 + (next() % (max_tokens as u64 - 2)) as usize;
        let (victim, _) = *pool[victim_stage].last().unwrap();
        let mut links: Vec<Box<dyn StageLink>> = Vec::new();
        for stage in 0..3 {
            let addr = pool[stage].last().unwrap().1;
            links.push(Box::new(TcpLink::connect(addr, Duration::from_secs(30), Duration::from_secs(60)).unwrap()));
        }
        let spares = Spares((0..3).map(|st| vec![pool[st][pool[st].len() - 2].1]).collect());
        let mut router = spares;
        let ranges = cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
        let mut ring =
            RingClient::new(links, RingSpec { model_id: specswarm_net::model_id(&path).unwrap(), ranges }, 100 + trial);
        let mut s = Sampler::new(Default::default()).unwrap();
        let mut produced = 0;
        let victim_child = &mut workers.0[victim];
        let (got, _, failovers) = specswarm_net::ring::generate_ring_failover(
            &mut ring,
            &mut router,
            &ids,
            max_tokens,
            &mut s,
            &[],
            &mut |_| {
                produced += 1;
                if produced == kill_at {
                    victim_child.kill().unwrap(); // SIGKILL
                    let _ = victim_child.wait();
                }
                true
            },
        )
        .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        assert_eq!(got, want, "trial {trial}: stage {victim_stage} killed after {kill_at} tokens");
        assert_eq!(failovers, 1, "trial {trial}: exactly one failover");
        // The victim is gone: its spare is now the primary; start a new spare.
        pool[victim_stage].pop();
        spawn_into(&mut pool, &mut workers, victim_stage);
        let n = pool[victim_stage].len();
        pool[victim_stage].swap(n - 1, n - 2);
    }
}

/// A ring with direct return (workers forward to each other, the tail answers the client) gives
/// the same greedy tokens as one process.
#[test]
fn direct_return_ring_equals_local() {
    for name in ["smollm2-135m", "gemma3-270m"] {
        let path = model_path(name);
        let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
        let n = local.config().n_layers;
        let cuts = [0, n / 3, 2 * n / 3, n];
        let mut workers = Procs(Vec::new());
        let mut addrs = Vec::new();
        for w in cuts.windows(2) {
            let (child, addr) = spawn_worker(&path, (w[0], w[1]), &[]);
            workers.0.push(child);
            addrs.push(addr);
        }
        let ranges = cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
        let spec = RingSpec { model_id: specswarm_net::model_id(&path).unwrap(), ranges };
        let mut ring = specswarm_net::direct::DirectRing::connect(&addrs, spec, 9, Duration::from_secs(60)).unwrap();
        let tok = Tokenizer::from_gguf(&path).unwrap();
        for p in &PROMPTS_10[..4] {
            let ids = tok.encode(p, true, false).unwrap();
            let mut s = Sampler::new(Default::default()).unwrap();
            let (want, _, _) = generate(&local, &ids, 16, &mut s, &[], &mut |_| true).unwrap();
            ring.open(64).unwrap();
            let pos: Vec<u32> = (0..ids.len() as u32).collect();
            let mut logits = ring.forward(&ids, &pos, None).unwrap();
            let mut got = Vec::new();
            while got.len() < 16 {
                let t = specswarm_engine::sampling::argmax(&logits);
                got.push(t);
                let p = [ring.committed() as u32];
                logits = ring.forward(&[t], &p, None).unwrap();
            }
            ring.close().unwrap();
            assert_eq!(got, want, "{name}: {p:?}");
            // Greedy at the tail: only token ids come back, same tokens.
            ring.open_with(64, true).unwrap();
            let mut ids_back = vec![ring.forward_argmax(&ids, &pos, None).unwrap()[0]];
            while ids_back.len() < 16 {
                let p = [ring.committed() as u32];
                ids_back.push(ring.forward_argmax(&[*ids_back.last().unwrap()], &p, None).unwrap()[0]);
            }
            ring.close().unwrap();
            assert_eq!(ids_back, want, "{name}: {p:?} (tail argmax)");
        }
        drop(workers);
    }
}
