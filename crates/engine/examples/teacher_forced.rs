//! Debug aid: run llama.cpp's greedy trajectories teacher-forced and report where our argmax
//! disagrees and by how much. `-- MODEL.gguf FIXTURE.json`
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model =
        ModelSlice::load(std::path::Path::new(&a[1]), &LoadOptions { layers: None, threads: 2, ..Default::default() })
            .unwrap();
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
    let vocab = model.config().vocab_size;
    for case in fx["greedy"].as_array().unwrap() {
        let p: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let g: Vec<u32> =
            case["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut seq = p.clone();
        seq.extend_from_slice(&g[..g.len() - 1]);
        let pos: Vec<u32> = (0..seq.len() as u32).collect();
        let mut kv = model.new_cache(seq.len());
        let out = model
            .forward(
                &mut kv,
                &Batch { input: StepInput::Tokens(&seq), positions: &pos, tree_parents: None },
                Want::AllLogits,
            )
            .unwrap()
            .into_data();
        let mut report = Vec::new();
        for (i, &r) in g.iter().enumerate() {
            let l = &out[(p.len() - 1 + i) * vocab..(p.len() + i) * vocab];
            let am = specswarm_engine::sampling::argmax(l) as usize;
            if am != r as usize {
                report.push(format!(
                    "step {i}: ours {am} ({:.3}) ref {r} ({:.3}) gap {:.3}",
                    l[am],
                    l[r as usize],
                    l[am] - l[r as usize]
                ));
            }
        }
        println!("{:<12} disagreements {}: {}", case["name"].as_str().unwrap(), report.len(), report.join("; "));
    }
}
