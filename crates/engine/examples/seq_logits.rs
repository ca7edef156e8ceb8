//! Debug aid: last-position logits of several id sequences vs a llama.cpp dump.
//! `-- MODEL.gguf SEQS.json DUMP.f32` (SEQS: [[ids...], ...]; DUMP: [n_seqs][vocab] f32)
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = ModelSlice::load(std::path::Path::new(&a[1]), &LoadOptions { layers: None, threads: 2 }).unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
    let want: Vec<f32> =
        std::fs::read(&a[3]).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let vocab = model.config().vocab_size;
    for (i, ids) in seqs.iter().enumerate() {
        let pos: Vec<u32> = (0..ids.len() as u32).collect();
        let mut kv = model.new_cache(ids.len());
        let got = model
            .forward(
                &mut kv,
                &Batch { input: StepInput::Tokens(ids), positions: &pos, tree_parents: None },
                Want::LastLogits,
            )
            .unwrap()
            .into_data();
        let w = &want[i * vocab..(i + 1) * vocab];
        let d = got.iter().zip(w).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        println!("{ids:?} max|diff| {d:.5}");
    }
}
