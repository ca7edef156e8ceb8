//! Debug aid: print our top-10 logits at the first generated position for every greedy prompt of a
//! reference fixture, next to llama.cpp's.
//! `cargo run --release -p specswarm-engine --example first_logits -- MODEL.gguf fixtures/reference/NAME.json`
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = ModelSlice::load(std::path::Path::new(&args[1]), &LoadOptions { layers: None, threads: 2 }).unwrap();
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    for case in fx["greedy"].as_array().unwrap() {
        let ids: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let pos: Vec<u32> = (0..ids.len() as u32).collect();
        let mut kv = model.new_cache(ids.len());
        let logits = model
            .forward(
                &mut kv,
                &Batch { input: StepInput::Tokens(&ids), positions: &pos, tree_parents: None },
                Want::LastLogits,
            )
            .unwrap()
            .into_data();
        let mut diff = 0f32;
        for pair in case["first_top10"].as_array().unwrap() {
            let (id, l) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            diff = diff.max((logits[id] - l).abs());
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let ours: Vec<String> = idx[..3].iter().map(|&i| format!("{i}:{:.3}", logits[i])).collect();
        println!(
            "{:<12} max |ours - llama.cpp| over its top-10 = {diff:.4}   ours top3 {}",
            case["name"].as_str().unwrap(),
            ours.join(" ")
        );
    }
}
