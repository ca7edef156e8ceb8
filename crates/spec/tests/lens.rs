//! The tuned lens earns its keep: on prompts it was not calibrated on, the target's first K
//! layers read through the fitted lens predict the target's greedy token far more often than the
//! same layers read straight through the LM head (early exit, `self:K`).

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::hub;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::{Sampler, argmax};
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_spec::drafter::lens::calibrate;

const HELD_OUT: &[&str] = &[
    "What is the capital of France, and what is it famous for?",
    "Give me three tips for staying focused while working from home.",
    "Explain photosynthesis to a ten-year-old.",
    "What are the pros and cons of electric cars?",
];

#[test]
fn smollm2_lens_predicts_the_target_better_than_early_exit() {
    let path = hub::ensure(hub::known("smollm2-135m").unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let k = 20;
    let lens = calibrate(&path, k, 2, &mut |_, _| {}).unwrap();
    let target = ModelSlice::load(&path, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let early =
        ModelSlice::load(&path, &LoadOptions { layers: Some(0..k), threads: 2, with_head: true, ..Default::default() })
            .unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let template = ChatTemplate::from_gguf(&path).unwrap().unwrap();
    let d = target.config().d_model;
    let (mut lens_hits, mut exit_hits, mut total) = (0, 0, 0);
    for prompt in HELD_OUT {
        let text = template.render(&[ChatMessage { role: "user".into(), content: (*prompt).into() }], true).unwrap();
        let ids = tok.encode(&text, false, true).unwrap();
        let mut sampler = Sampler::new(Default::default()).unwrap();
        let (out, _, _) = generate(&target, &ids, 48, &mut sampler, tok.stop_ids(), &mut |_| true).unwrap();
        // Teacher-forced: the residual after layer K at every position that predicts an output token.
        let mut seq = ids.clone();
        seq.extend(&out[..out.len() - 1]);
        let pos: Vec<u32> = (0..seq.len() as u32).collect();
        let hidden = early
            .forward(
                &mut early.new_cache(seq.len()),
                &Batch { input: StepInput::Tokens(&seq), positions: &pos, tree_parents: None },
                Want::Hidden,
            )
            .unwrap()
            .into_data();
        for (i, &want) in out.iter().enumerate() {
            let row = &hidden[(ids.len() - 1 + i) * d..(ids.len() + i) * d];
            lens_hits += usize::from(argmax(&early.head_logits(&lens.apply(row)).unwrap()) == want);
            exit_hits += usize::from(argmax(&early.head_logits(row).unwrap()) == want);
            total += 1;
        }
    }
    let (lens_rate, exit_rate) = (lens_hits as f64 / total as f64, exit_hits as f64 / total as f64);
    eprintln!("K = {k}: lens agrees {lens_rate:.3}, early exit {exit_rate:.3} over {total} held-out tokens");
    assert!(total >= 100, "too few tokens to judge: {total}");
    assert!(
        lens_rate >= exit_rate + 0.05 && lens_rate >= 1.3 * exit_rate,
        "lens {lens_rate:.3} vs early exit {exit_rate:.3}"
    );
}
