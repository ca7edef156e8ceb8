//! The invariant: greedy speculative output is token-for-token the target's plain greedy output,
//! for every drafter, chains and trees, on both real models.

use std::path::PathBuf;

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::hub;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::Sampler;
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_spec::decode::generate_speculative;
use specswarm_spec::drafter::lens::Lens;
use specswarm_spec::drafter::model::ModelDrafter;
use specswarm_spec::drafter::ngram::NgramDrafter;
use specswarm_spec::drafter::suffix::SuffixDrafter;
use specswarm_spec::drafter::{DraftBudget, Drafter, Fallback};
use specswarm_spec::policy::{Policy, PolicyMode};

/// Tokens per prompt: SmolLM2's, and Gemma 3's (its 262k-entry LM head makes every row ~6x
/// dearer on a CPU; 16 tokens still cross many draft rounds per prompt).
const MAX_TOKENS: usize = 32;
const MAX_TOKENS_GEMMA: usize = 16;

// 20 prompts: chat, code, and copy-heavy text.
include!("../../../fixtures/prompts/identity20.rs");

fn model_path(name: &str) -> PathBuf {
    hub::ensure(hub::known(name).unwrap(), &mut |m| eprintln!("{m}")).unwrap()
}

fn encode(path: &std::path::Path, tok: &Tokenizer, prompt: &str, arch: &str) -> Vec<u32> {
    match ChatTemplate::from_gguf(path).unwrap() {
        Some(t) => {
            let text = t.render(&[ChatMessage { role: "user".into(), content: prompt.into() }], true).unwrap();
            tok.encode(&text, false, true).unwrap()
        }
        None if arch == "gemma3" => tok.encode(prompt, true, false).unwrap(),
        None => tok.encode(prompt, true, false).unwrap(),
    }
}

/// A lens fitted between two streams of pseudo-random residuals.
fn noise_lens(k: usize, d: usize) -> Lens {
    let mut rng = specswarm_engine::rng::Rng::new(k as u64);
    let mut noise = |n: usize| (0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>();
    let rows = d + 32;
    Lens::fit(k, d, &noise(rows * d), &noise(rows * d)).unwrap()
}

fn check_model(name: &str, self_k: usize, max_tokens: usize) {
    let path = model_path(name);
    let target = ModelSlice::load(&path, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let arch = target.config().arch_name.clone();
    let n_layers = target.config().n_layers;
    let vocab = target.config().vocab_size;
    type Make = Box<dyn Fn() -> Box<dyn Drafter>>;
    let (p1, p2, p3, p4) = (path.clone(), path.clone(), path.clone(), path.clone());
    let d = target.config().d_model;
    let drafters: Vec<(&str, Make, Vec<DraftBudget>)> = vec![
        (
            "ngram",
            Box::new(|| Box::new(NgramDrafter::new(4, 1)) as Box<dyn Drafter>),
            vec![DraftBudget::chain(6), DraftBudget { max_nodes: 12, max_depth: 5, max_branch: 3 }],
        ),
        (
            "suffix",
            Box::new(|| Box::new(SuffixDrafter::new(16, 1 << 16)) as Box<dyn Drafter>),
            vec![DraftBudget { max_nodes: 12, max_depth: 6, max_branch: 3 }, DraftBudget::chain(8)],
        ),
        (
            "self",
            Box::new(move || Box::new(ModelDrafter::self_draft(&p1, self_k, n_layers, 1).unwrap()) as Box<dyn Drafter>),
            vec![DraftBudget::chain(3), DraftBudget { max_nodes: 8, max_depth: 3, max_branch: 3 }],
        ),
        (
            "skip",
            Box::new(move || {
                Box::new(ModelDrafter::skip_draft(&p3, &[self_k, self_k + 1], 1).unwrap()) as Box<dyn Drafter>
            }),
            vec![DraftBudget::chain(4), DraftBudget { max_nodes: 8, max_depth: 3, max_branch: 3 }],
        ),
        (
            // A lens fitted to noise (any drafter must leave the output unchanged), behind suffix.
            "suffix/lens",
            Box::new(move || {
                let lens = noise_lens(self_k, d);
                Box::new(Fallback::new(
                    Box::new(SuffixDrafter::new(16, 1 << 16)),
                    Box::new(ModelDrafter::lens_draft(&p4, lens, 1).unwrap()),
                )) as Box<dyn Drafter>
            }),
            vec![DraftBudget::chain(5), DraftBudget { max_nodes: 10, max_depth: 4, max_branch: 3 }],
        ),
        (
            "model",
            Box::new(move || Box::new(ModelDrafter::from_file(&p2, vocab, 1).unwrap()) as Box<dyn Drafter>),
            vec![DraftBudget::chain(6), DraftBudget { max_nodes: 10, max_depth: 4, max_branch: 2 }],
        ),
    ];
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = encode(&path, &tok, prompt, &arch);
        let mut sampler = Sampler::new(Default::default()).unwrap();
        let (plain, _, _) = generate(&target, &ids, max_tokens, &mut sampler, &[], &mut |_| true).unwrap();
        for (dname, make, budgets) in &drafters {
            // Alternate budgets across prompts so chains and trees both meet every prompt kind.
            let budget = budgets[i % budgets.len()];
            let mut drafter = make();
            let mut policy = Policy::new(PolicyMode::Fixed(budget));
            let mut sampler = Sampler::new(Default::default()).unwrap();
            let (spec, _, stats) = generate_speculative(
                &target,
                drafter.as_mut(),
                &mut policy,
                &ids,
                max_tokens,
                &mut sampler,
                &[],
                &mut |_| true,
            )
            .unwrap();
            assert_eq!(spec, plain, "{name} prompt {i} drafter {dname} budget {budget:?}");
            eprintln!(
                "{name} prompt {i:2} {dname:<6} {budget:?}: acceptance {:.2}, {:.2} tokens/round",
                stats.acceptance_rate(),
                stats.tokens_per_round()
            );
        }
    }
}

#[test]
fn smollm2_greedy_speculative_equals_plain() {
    check_model("smollm2-135m", 10, MAX_TOKENS);
}

#[test]
fn gemma3_greedy_speculative_equals_plain() {
    check_model("gemma3-270m", 6, MAX_TOKENS_GEMMA);
}
