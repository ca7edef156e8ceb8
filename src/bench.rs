//! `specswarm bench engine`: prefill and decode speed of the local engine, llama-bench style
//! (random token ids, fresh context per run, median of several runs).

use std::time::Instant;

use anyhow::Result;
use specswarm_engine::model::{Batch, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::Rng;

use crate::cli::{BenchCommand, BenchEngineArgs};

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Engine(args) => engine(&args),
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
