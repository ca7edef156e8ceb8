//! Research tool: how often the target's greedy token is among a drafter's top k, along the
//! target's own greedy output (teacher-forced: the drafter always sees the right prefix). This
//! bounds the acceptance `a` any tree drafted from that drafter can reach at one position, and
//! the calibration columns say whether the drafter's probabilities can steer a best-first tree.
//!
//! `cargo run --release -p specswarm-spec --example coverage -- MODEL DRAFTER SUITES TOKENS`
//! (e.g. `… smollm2.gguf lens:27 chat,agentic,copy 64`).
use std::path::Path;

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{LoadOptions, ModelSlice};
use specswarm_engine::sampling::{Sampler, SamplerConfig};
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_spec::drafter::DraftBudget;
use specswarm_spec::drafter::recipe::Recipe;

const KS: [usize; 7] = [1, 2, 3, 4, 6, 8, 16];

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (model, spec, suites, tokens) = (Path::new(&a[1]), &a[2], &a[3], a[4].parse::<usize>().unwrap());
    let target = ModelSlice::load(model, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let tok = Tokenizer::from_gguf(model).unwrap();
    let template = ChatTemplate::from_gguf(model).unwrap().unwrap();
    let recipe = Recipe::load(spec, model, 2, &mut |_| panic!("model: drafters are not resolved here"), &mut |m| {
        eprintln!("{m}")
    })
    .unwrap();
    let budget = DraftBudget { max_nodes: 16, max_depth: 1, max_branch: 16 };
    for suite in suites.split(',') {
        let prompts = match suite {
            "chat" => SUITE_CHAT,
            "code" => SUITE_CODE,
            "agentic" => SUITE_AGENTIC,
            "copy" => SUITE_COPY,
            s => panic!("unknown suite {s}"),
        };
        let mut hits = [0usize; KS.len()];
        let mut n = 0usize;
        // Calibration: sum of the drafter's top-1 probability, and of it where top-1 was right.
        let (mut p1_sum, mut right) = (0f64, 0usize);
        // Buckets of top-1 probability: [count, right].
        let mut buckets = [[0usize; 2]; 5];
        for prompt in prompts {
            let text =
                template.render(&[ChatMessage { role: "user".into(), content: prompt.to_string() }], true).unwrap();
            let ids = tok.encode(&text, false, true).unwrap();
            let mut sampler = Sampler::new(SamplerConfig::default()).unwrap();
            let (out, _, _) = generate(&target, &ids, tokens, &mut sampler, tok.stop_ids(), &mut |_| true).unwrap();
            let mut drafter = recipe.instantiate(None);
            let mut seq = ids.clone();
            for &t in &out {
                let tree = drafter.propose(&seq, &budget).unwrap();
                let top: Vec<(u32, f32)> = tree.children(None).map(|i| (tree.tokens[i], tree.probs[i])).collect();
                if let Ok(path) = std::env::var("COVERAGE_DUMP") {
                    use std::io::Write;
                    let rank = top.iter().position(|&(x, _)| x == t).map_or(-1, |r| r as i64);
                    let probs: Vec<String> = top.iter().map(|&(_, p)| format!("{p:.5}")).collect();
                    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
                    writeln!(f, "{suite} {} {rank} {}", seq.len() - ids.len(), probs.join(" ")).unwrap();
                }
                if let Some(rank) = top.iter().position(|&(x, _)| x == t) {
                    for (h, &k) in hits.iter_mut().zip(&KS) {
                        if rank < k {
                            *h += 1;
                        }
                    }
                }
                if let Some(&(x, p)) = top.first() {
                    p1_sum += f64::from(p);
                    let b = ((p * 5.0) as usize).min(4);
                    buckets[b][0] += 1;
                    if x == t {
                        right += 1;
                        buckets[b][1] += 1;
                    }
                }
                n += 1;
                seq.push(t);
                drafter.observe(&seq);
            }
        }
        let cov: Vec<String> =
            KS.iter().zip(&hits).map(|(k, &h)| format!("top{k} {:.3}", h as f64 / n as f64)).collect();
        println!("{spec} {suite}: {n} positions; {}", cov.join(" "));
        let cal: Vec<String> = buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| b[0] > 0)
            .map(|(i, b)| format!("p1∈[{:.1},{:.1}): {}/{}", i as f64 / 5.0, (i + 1) as f64 / 5.0, b[1], b[0]))
            .collect();
        println!(
            "  mean top-1 prob {:.3} vs top-1 right {:.3}; {}",
            p1_sum / n as f64,
            right as f64 / n as f64,
            cal.join(", ")
        );
    }
}

include!("../../../fixtures/prompts/suites.rs");
