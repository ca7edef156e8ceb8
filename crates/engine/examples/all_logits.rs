//! Debug aid: compare our logits at every prompt position with a dump from llama.cpp
//! (`[n][vocab]` f32). `-- MODEL.gguf FIXTURE.json CASE DUMP.f32`
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = ModelSlice::load(std::path::Path::new(&a[1]), &LoadOptions { layers: None, threads: 2 }).unwrap();
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
    let case = fx["greedy"].as_array().unwrap().iter().find(|c| c["name"] == a[3].as_str()).unwrap();
    let ids: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let want: Vec<f32> =
        std::fs::read(&a[4]).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let vocab = model.config().vocab_size;
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let mut kv = model.new_cache(ids.len());
    let batch_mode = a.get(5).is_some_and(|s| s == "batch");
    let got: Vec<f32> = if batch_mode {
        model
            .forward(
                &mut kv,
                &Batch { input: StepInput::Tokens(&ids), positions: &pos, tree_parents: None },
                Want::AllLogits,
            )
            .unwrap()
            .into_data()
    } else {
        ids.iter()
            .enumerate()
            .flat_map(|(i, id)| {
                model
                    .forward(
                        &mut kv,
                        &Batch { input: StepInput::Tokens(&[*id]), positions: &[i as u32], tree_parents: None },
                        Want::AllLogits,
                    )
                    .unwrap()
                    .into_data()
            })
            .collect()
    };
    for p in 0..ids.len() {
        let (g, w) = (&got[p * vocab..(p + 1) * vocab], &want[p * vocab..(p + 1) * vocab]);
        let d = g.iter().zip(w).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        println!("pos {p:3} token {:6} max|diff| {d:.5}", ids[p]);
    }
}
