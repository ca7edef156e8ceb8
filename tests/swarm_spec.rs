//! Speculative decoding across worker processes (tail-side verification, pipelined chains and
//! trees, concurrent streams, failover) is lossless: greedy output equals local plain greedy output and
//! sampled output equals local plain sampled output for the same seed, token for token; and the
//! tokens a remote tail samples have the target's distribution.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{Procs, XorShift, encode, model_path, spawn_worker};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::{Sampler, SamplerConfig};
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_net::ring::RingSpec;
use specswarm_net::swarm_spec::{RingPlan, SwarmSpecSettings, SwarmSpecStats, generate_swarm_speculative};
use specswarm_spec::drafter::model::ModelDrafter;
use specswarm_spec::drafter::suffix::SuffixDrafter;
use specswarm_spec::drafter::{DraftBudget, Drafter};
use specswarm_spec::policy::{Policy, PolicyMode};

include!("../fixtures/prompts/identity20.rs");

/// A 3-stage ring of worker processes.
struct Swarm {
    path: PathBuf,
    cuts: Vec<usize>,
    addrs: Vec<SocketAddr>,
    _workers: Procs,
}

fn swarm(name: &str, stages: usize) -> Swarm {
    let path = model_path(name);
    let n = specswarm_engine::config::ModelConfig::from_gguf(&specswarm_engine::gguf::GgufFile::open(&path).unwrap())
        .unwrap()
        .n_layers;
    let cuts: Vec<usize> = (0..=stages).map(|i| i * n / stages).collect();
    let mut workers = Procs(Vec::new());
    let mut addrs = Vec::new();
    for w in cuts.windows(2) {
        let (child, addr) = spawn_worker(&path, (w[0], w[1]), &[]);
        workers.0.push(child);
        addrs.push(addr);
    }
    Swarm { path, cuts, addrs, _workers: workers }
}

impl Swarm {
    fn plan(&self, session: u64) -> RingPlan {
        let ranges = self.cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
        RingPlan {
            addrs: self.addrs.clone(),
            spec: RingSpec { model_id: specswarm_net::model_id(&self.path).unwrap(), ranges },
            session,
            timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Chain,
    Tree,
    /// Pipelined chains.
    Pipelined,
    /// Pipelined trees: every round assumes its spine is accepted.
    PipelinedTree,
}

fn run(
    plan: &mut RingPlan,
    drafter: &mut dyn Drafter,
    mode: Mode,
    ids: &[u32],
    max_tokens: usize,
    sampler: &SamplerConfig,
) -> (Vec<u32>, SwarmSpecStats) {
    let (budget, depth) = match mode {
        Mode::Chain => (DraftBudget::chain(6), 1),
        Mode::Tree => (DraftBudget { max_nodes: 12, max_depth: 5, max_branch: 3 }, 1),
        Mode::Pipelined => (DraftBudget::chain(4), 3),
        Mode::PipelinedTree => (DraftBudget { max_nodes: 10, max_depth: 4, max_branch: 3 }, 3),
    };
    let mut policy = Policy::new(PolicyMode::Fixed(budget));
    let settings = SwarmSpecSettings { depth_max: depth, adaptive_depth: false, failovers_max: 0 };
    let (out, _, stats) = generate_swarm_speculative(
        plan,
        drafter,
        &mut policy,
        &settings,
        ids,
        max_tokens,
        sampler,
        &[],
        &mut |_| None,
        &mut |_| true,
    )
    .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    (out, stats)
}

fn check_modes(name: &str, self_k: usize, max_tokens: usize) {
    let sw = swarm(name, 3);
    let local = ModelSlice::load(&sw.path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let n_layers = local.config().n_layers;
    let tok = Tokenizer::from_gguf(&sw.path).unwrap();
    let mut self_draft = ModelDrafter::self_draft(&sw.path, self_k, n_layers, 1).unwrap();
    let mut suffix = SuffixDrafter::new(16, 1 << 16);
    let (mut accepted, mut drafted, mut stale, mut tree_stale, mut replayed) = (0, 0, 0, 0, 0);
    for (i, p) in PROMPTS.iter().enumerate() {
        let ids = encode(&sw.path, &tok, p);
        let greedy = SamplerConfig::greedy();
        let (want, _, _) =
            generate(&local, &ids, max_tokens, &mut Sampler::new(greedy.clone()).unwrap(), &[], &mut |_| true).unwrap();
        // Alternate drafters: the target's own early layers and the model-free suffix drafter;
        // pipelined trees run with both on every prompt.
        let runs = [Mode::Chain, Mode::Tree, Mode::Pipelined, Mode::PipelinedTree, Mode::PipelinedTree];
        for (m, mode) in runs.into_iter().enumerate() {
            let drafter: &mut dyn Drafter = if (i + m) % 2 == 0 { &mut self_draft } else { &mut suffix };
            let mut plan = sw.plan((i * runs.len() + m) as u64 + 1);
            let (got, stats) = run(&mut plan, drafter, mode, &ids, max_tokens, &greedy);
            assert_eq!(got, want, "{name} {mode:?} {}: {p:?}", drafter.name());
            accepted += stats.accepted_tokens;
            drafted += stats.drafted_nodes;
            stale += stats.stale_rounds;
            if matches!(mode, Mode::PipelinedTree) {
                tree_stale += stats.stale_rounds;
                replayed += stats.replayed_tokens;
            }
        }
    }
    eprintln!(
        "{name}: 20 prompts x chain/tree/pipelined/pipelined-tree identical; {accepted}/{drafted} drafts accepted, {stale} stale rounds ({tree_stale} of pipelined trees, \
         {replayed} accepted tokens off a spine replayed)"
    );
    assert!(accepted > 0, "speculation never accepted a draft: the test would not exercise it");
    assert!(
        tree_stale > 0 && replayed > 0,
        "pipelined trees never rolled back a branch: the test would not exercise it"
    );
}

#[test]
fn smollm2_speculative_modes_equal_local_greedy() {
    check_modes("smollm2-135m", 8, 24);
}

#[test]
fn gemma3_speculative_modes_equal_local_greedy() {
    check_modes("gemma3-270m", 6, 16);
}

/// Sampled output (temperature, top-p, penalties) through the ring equals local plain sampled
/// output with the same seed: the tail's randomness depends only on (seed, position).
#[test]
fn sampled_output_equals_local_sampled_output() {
    let sw = swarm("smollm2-135m", 3);
    let local = ModelSlice::load(&sw.path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&sw.path).unwrap();
    let mut self_draft = ModelDrafter::self_draft(&sw.path, 8, 30, 1).unwrap();
    let mut tree_stale = 0;
    for (i, p) in PROMPTS.iter().enumerate().step_by(4) {
        let ids = encode(&sw.path, &tok, p);
        let cfg = SamplerConfig {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 50,
            repetition_penalty: 1.1,
            seed: 1000 + i as u64,
            ..SamplerConfig::default()
        };
        let (want, _, _) =
            generate(&local, &ids, 24, &mut Sampler::positional(cfg.clone()).unwrap(), &[], &mut |_| true).unwrap();
        for mode in [Mode::Chain, Mode::Tree, Mode::Pipelined, Mode::PipelinedTree] {
            let mut plan = sw.plan(500 + i as u64);
            let (got, stats) = run(&mut plan, &mut self_draft, mode, &ids, 24, &cfg);
            assert_eq!(got, want, "{mode:?}: {p:?}");
            if matches!(mode, Mode::PipelinedTree) {
                tree_stale += stats.stale_rounds;
            }
        }
    }
    eprintln!("sampled: {tree_stale} stale rounds of pipelined trees");
    assert!(tree_stale > 0, "no pipelined tree round was rolled back: the test would not exercise it");
}

/// The tokens a remote tail samples while verifying a tree have the target's distribution:
/// 3,000 seeds, one round each with the 3 most likely tokens and a random one as siblings;
/// chi-square of the first emitted token against the exact distribution.
#[test]
fn remote_tail_sampling_has_the_target_distribution() {
    let sw = swarm("smollm2-135m", 2);
    let local = ModelSlice::load(&sw.path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&sw.path).unwrap();
    let ids = encode(&sw.path, &tok, "Name a fruit.");
    let cfg = SamplerConfig { temperature: 1.3, top_k: 8, ..SamplerConfig::default() };
    // Exact distribution of the first token.
    let mut kv = local.new_cache(ids.len());
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let logits = local
        .forward(
            &mut kv,
            &Batch { input: StepInput::Tokens(&ids), positions: &pos, tree_parents: None },
            Want::LastLogits,
        )
        .unwrap()
        .into_data();
    let dist = Sampler::new(cfg.clone()).unwrap().distribution(&logits, &ids);
    assert!(dist.len() >= 4, "the test needs a spread distribution");

    /// Proposes a fixed set of siblings after the prompt (nothing afterwards).
    struct Siblings(Vec<u32>, usize);
    impl Drafter for Siblings {
        fn name(&self) -> String {
            "siblings".into()
        }
        fn propose(
            &mut self,
            seq: &[u32],
            _: &DraftBudget,
        ) -> Result<specswarm_spec::tree::DraftTree, specswarm_spec::SpecError> {
            let mut t = specswarm_spec::tree::DraftTree::default();
            if seq.len() == self.1 {
                for &x in &self.0 {
                    t.push(x, -1, 1.0);
                }
            }
            Ok(t)
        }
    }
    let mut drafter = Siblings(vec![dist.tokens[0], dist.tokens[1], dist.tokens[3], 12345], ids.len());
    let runs = 1500;
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    let mut plan = sw.plan(9000);
    for seed in 0..runs {
        let c = SamplerConfig { seed, ..cfg.clone() };
        let mut policy = Policy::new(PolicyMode::Fixed(DraftBudget { max_nodes: 4, max_depth: 1, max_branch: 4 }));
        let settings = SwarmSpecSettings { depth_max: 1, adaptive_depth: false, failovers_max: 0 };
        plan.session = 9000 + seed;
        let (out, _, _) = generate_swarm_speculative(
            &mut plan,
            &mut drafter,
            &mut policy,
            &settings,
            &ids,
            1,
            &c,
            &[],
            &mut |_| None,
            &mut |_| true,
        )
        .unwrap();
        *counts.entry(out[0]).or_default() += 1;
    }
    // Chi-square over the distribution's tokens (bins with expected < 5 merged into one).
    let (mut chi2, mut bins, mut rest_exp, mut rest_obs) = (0.0, 0, 0.0, 0usize);
    for (&t, &p) in dist.tokens.iter().zip(&dist.probs) {
        let exp = f64::from(p) * runs as f64;
        let obs = counts.get(&t).copied().unwrap_or(0);
        if exp < 5.0 {
            rest_exp += exp;
            rest_obs += obs;
        } else {
            chi2 += (obs as f64 - exp).powi(2) / exp;
            bins += 1;
        }
    }
    if rest_exp > 0.0 {
        chi2 += (rest_obs as f64 - rest_exp).powi(2) / rest_exp;
        bins += 1;
    }
    let outside: usize = counts.iter().filter(|(t, _)| !dist.tokens.contains(t)).map(|(_, c)| c).sum();
    assert_eq!(outside, 0, "tokens outside the support were emitted");
    // Critical value of chi-square at p = 0.001 for `bins - 1` degrees of freedom (df <= 8).
    let critical = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12][bins - 2];
    eprintln!("remote tail: chi2 {chi2:.2} over {bins} bins (critical {critical} at p=0.001), {runs} runs");
    assert!(chi2 < critical, "chi2 {chi2} >= {critical}: the remote tail's samples are off the target distribution");
}

/// Four streams at once on the same workers, pipelined: each equals its solo output.
#[test]
fn concurrent_streams_equal_their_solo_output() {
    let sw = swarm("smollm2-135m", 3);
    let local = ModelSlice::load(&sw.path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&sw.path).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS[10..14].iter().map(|p| encode(&sw.path, &tok, p)).collect();
    let wants: Vec<Vec<u32>> = prompts
        .iter()
        .map(|ids| {
            generate(&local, ids, 32, &mut Sampler::new(SamplerConfig::greedy()).unwrap(), &[], &mut |_| true)
                .unwrap()
                .0
        })
        .collect();
    std::thread::scope(|s| {
        for (i, (ids, want)) in prompts.iter().zip(&wants).enumerate() {
            let sw = &sw;
            s.spawn(move || {
                let mut plan = sw.plan(700 + i as u64);
                let mut drafter = SuffixDrafter::new(16, 1 << 16);
                let (got, _) = run(&mut plan, &mut drafter, Mode::Pipelined, ids, 32, &SamplerConfig::greedy());
                assert_eq!(&got, want, "stream {i}");
            });
        }
    });
}

/// kill -9 a random worker at a random point during pipelined speculation (chains and trees in
/// turn), with a spare for its span: the request completes with identical tokens.
#[test]
fn failover_during_pipelined_speculation() {
    let path = model_path("smollm2-135m");
    let local = ModelSlice::load(&path, &LoadOptions { threads: 1, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let cuts = [0usize, 10, 20, 30];
    let ids = encode(&path, &tok, PROMPTS[12]);
    let max_tokens = 40;
    let (want, _, _) =
        generate(&local, &ids, max_tokens, &mut Sampler::new(SamplerConfig::greedy()).unwrap(), &[], &mut |_| true)
            .unwrap();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut workers = Procs(Vec::new());
    let trials = 6;
    for trial in 0..trials {
        let trees = trial % 2 == 1;
        // A fresh primary per stage plus one spare per stage.
        let mut primary = Vec::new();
        let mut spares: Vec<SocketAddr> = Vec::new();
        for w in cuts.windows(2) {
            let (child, addr) = spawn_worker(&path, (w[0], w[1]), &[]);
            workers.0.push(child);
            primary.push((workers.0.len() - 1, addr));
            let (child, addr) = spawn_worker(&path, (w[0], w[1]), &[]);
            workers.0.push(child);
            spares.push(addr);
        }
        let victim_stage = (rng.next() % 3) as usize;
        let kill_at = 1 + (rng.next() % (max_tokens as u64 - 8)) as usize;
        let ranges = cuts.windows(2).map(|w| (w[0] as u32, w[1] as u32)).collect();
        let mut plan = RingPlan {
            addrs: primary.iter().map(|p| p.1).collect(),
            spec: RingSpec { model_id: specswarm_net::model_id(&path).unwrap(), ranges },
            session: 40 + trial,
            timeout: Duration::from_secs(20),
        };
        let victim = primary[victim_stage].0;
        let mut drafter = SuffixDrafter::new(16, 1 << 16);
        let budget =
            if trees { DraftBudget { max_nodes: 10, max_depth: 4, max_branch: 3 } } else { DraftBudget::chain(4) };
        let mut policy = Policy::new(PolicyMode::Fixed(budget));
        let settings = SwarmSpecSettings { depth_max: 3, adaptive_depth: false, failovers_max: 2 };
        let mut produced = 0;
        let (got, _, stats) = {
            let victim_child = &mut workers.0[victim];
            generate_swarm_speculative(
                &mut plan,
                &mut drafter,
                &mut policy,
                &settings,
                &ids,
                max_tokens,
                &SamplerConfig::greedy(),
                &[],
                &mut |stage| Some(spares[stage]),
                &mut |_| {
                    produced += 1;
                    if produced == kill_at {
                        victim_child.kill().unwrap(); // SIGKILL
                        let _ = victim_child.wait();
                    }
                    true
                },
            )
            .unwrap_or_else(|e| panic!("trial {trial}: {e}"))
        };
        assert_eq!(got, want, "trial {trial} (trees: {trees}): stage {victim_stage} killed after {kill_at} tokens");
        assert_eq!(stats.failovers, 1, "trial {trial} (trees: {trees}): exactly one failover");
    }
}
