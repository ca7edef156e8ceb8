//! `specswarm bench engine`: prefill and decode speed of the local engine, llama-bench style
//! (random token ids, fresh context per run, median of several runs).

use std::time::Instant;

use anyhow::{Context, Result};
use specswarm_engine::model::{Batch, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::Rng;

use crate::cli::{BenchCommand, BenchEngineArgs, BenchSpecArgs};

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Engine(args) => engine(&args),
        BenchCommand::Spec(args) => spec(&args),
        BenchCommand::Swarm(args) => crate::bench_swarm::swarm(&args),
        BenchCommand::Ring(args) => crate::bench_swarm::ring(&args),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds to prefill `n` random tokens into a fresh cache.
fn prefill_once(model: &ModelSlice, rng: &mut Rng, n: usize) -> Result<f64> {
    let vocab = model.config().vocab_size as u64;
    let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let pos: Vec<u32> = (0..n as u32).collect();
    let mut kv = model.new_cache(n);
    let t = Instant::now();
    model.forward(
        &mut kv,
        &Batch { input: StepInput::Tokens(&ids), positions: &pos, tree_parents: None },
        Want::LastLogits,
    )?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to decode `n` tokens one at a time from an empty cache.
fn decode_once(model: &ModelSlice, rng: &mut Rng, n: usize) -> Result<f64> {
    let vocab = model.config().vocab_size as u64;
    let mut kv = model.new_cache(n);
    let t = Instant::now();
    for i in 0..n {
        let id = [(rng.next_u64() % vocab) as u32];
        let pos = [i as u32];
        model.forward(
            &mut kv,
            &Batch { input: StepInput::Tokens(&id), positions: &pos, tree_parents: None },
            Want::LastLogits,
        )?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn engine(args: &BenchEngineArgs) -> Result<()> {
    let path = crate::resolve_model(&args.model)?;
    let model = crate::load_model(&path, args.threads)?;
    let runs = args.runs.max(1);
    let mut rng = Rng::new(1234);
    // Warm-up: page in the weights and start the thread pool.
    decode_once(&model, &mut rng, 4)?;
    let mut rate = |f: &dyn Fn(&mut Rng) -> Result<f64>, n: usize| -> Result<f64> {
        let times = (0..runs).map(|_| f(&mut rng)).collect::<Result<Vec<_>>>()?;
        Ok(median(times.into_iter().map(|t| n as f64 / t).collect()))
    };
    let pp128 = rate(&|r| prefill_once(&model, r, 128), 128)?;
    let pp512 = rate(&|r| prefill_once(&model, r, 512), 512)?;
    let tg128 = rate(&|r| decode_once(&model, r, 128), 128)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model,
                "path": path,
                "threads": model.threads(),
                "runs": runs,
                "prefill_tokens_per_s": pp512,
                "prefill_128_tokens_per_s": pp128,
                "prefill_512_tokens_per_s": pp512,
                "decode_tokens_per_s": tg128,
            })
        );
    } else {
        println!("model {} ({}), {} threads, median of {runs}", args.model, path.display(), model.threads());
        println!("  pp128  {pp128:8.1} tok/s");
        println!("  pp512  {pp512:8.1} tok/s");
        println!("  tg128  {tg128:8.1} tok/s");
    }
    Ok(())
}

/// Totals of one (drafter, suite) cell.
#[derive(Default)]
struct Cell {
    plain_s: f64,
    spec_s: f64,
    generated: usize,
    rounds: usize,
    drafted: usize,
    accepted: usize,
    mismatches: usize,
}

fn spec(args: &BenchSpecArgs) -> Result<()> {
    use specswarm_engine::generate::generate;
    use specswarm_engine::sampling::Sampler;
    use specswarm_engine::tokenizer::Tokenizer;
    use specswarm_spec::decode::generate_speculative;
    use specswarm_spec::drafter::DraftBudget;
    use specswarm_spec::policy::{Policy, PolicyMode};

    let path = crate::resolve_model(&args.model)?;
    let model = crate::load_model(&path, args.threads)?;
    let tok = Tokenizer::from_gguf(&path)?;
    let chat = specswarm_engine::chat::ChatTemplate::from_gguf(&path)?.is_some();
    let budget = DraftBudget {
        max_nodes: args.tree_budget.unwrap_or(args.draft_len),
        max_depth: args.draft_len,
        max_branch: if args.tree_budget.is_some_and(|b| b > args.draft_len) { args.branch } else { 1 },
    };
    let mut rows = Vec::new();
    if !args.json {
        println!(
            "model {} ({}), budget {budget:?}, {} tokens per prompt, greedy",
            args.model,
            if chat { "chat template" } else { "raw text" },
            args.max_tokens
        );
        println!(
            "{:<10} {:<8} {:>10} {:>12} {:>9} {:>9} {:>9}",
            "drafter", "suite", "acceptance", "tokens/round", "plain t/s", "spec t/s", "speedup"
        );
    }
    for dname in args.drafters.split(',') {
        let mut drafter = crate::speculate::drafter(dname, &path, args.threads)?;
        for suite in args.prompts.split(',') {
            let prompts = crate::prompts::suite(suite)
                .with_context(|| format!("unknown suite {suite:?}; known: {}", crate::prompts::SUITES.join(", ")))?;
            let mut c = Cell::default();
            for p in prompts {
                let ids = crate::encode_prompt(&path, &tok, p, chat)?;
                let mut sampler = Sampler::new(Default::default())?;
                let t = Instant::now();
                let (plain, _, _) =
                    generate(&model, &ids, args.max_tokens, &mut sampler, tok.stop_ids(), &mut |_| true)?;
                c.plain_s += t.elapsed().as_secs_f64();
                let mut sampler = Sampler::new(Default::default())?;
                let mut policy = Policy::new(PolicyMode::Fixed(budget));
                let t = Instant::now();
                let (out, _, s) = generate_speculative(
                    &model,
                    drafter.as_mut(),
                    &mut policy,
                    &ids,
                    args.max_tokens,
                    &mut sampler,
                    tok.stop_ids(),
                    &mut |_| true,
                )?;
                c.spec_s += t.elapsed().as_secs_f64();
                c.mismatches += usize::from(out != plain);
                c.generated += s.generated_tokens;
                c.rounds += s.rounds;
                c.drafted += s.drafted_nodes;
                c.accepted += s.accepted_tokens;
            }
            let acceptance = c.accepted as f64 / c.drafted.max(1) as f64;
            let per_round = c.generated as f64 / c.rounds.max(1) as f64;
            let (plain_tps, spec_tps) = (c.generated as f64 / c.plain_s, c.generated as f64 / c.spec_s);
            if !args.json {
                println!(
                    "{dname:<10} {suite:<8} {acceptance:>10.2} {per_round:>12.2} {plain_tps:>9.1} {spec_tps:>9.1} {:>8.2}x{}",
                    spec_tps / plain_tps,
                    if c.mismatches > 0 { format!("  ({} outputs differ!)", c.mismatches) } else { String::new() }
                );
            }
            rows.push(serde_json::json!({
                "drafter": dname, "suite": suite, "acceptance_rate": acceptance, "tokens_per_round": per_round,
                "plain_tokens_per_s": plain_tps, "spec_tokens_per_s": spec_tps, "speedup": spec_tps / plain_tps,
                "generated_tokens": c.generated, "rounds": c.rounds, "outputs_differ": c.mismatches,
            }));
            if c.mismatches > 0 {
                anyhow::bail!("{dname}/{suite}: {} speculative outputs differ from plain greedy output", c.mismatches);
            }
        }
    }
    if args.json {
        println!("{}", serde_json::json!({ "model": args.model, "budget": format!("{budget:?}"), "rows": rows }));
    }
    Ok(())
}
