//! Research tool: dump the target's final residuals (before the final norm) along its own
//! generations, as data for a trained draft head (`scripts/research/eagle_head.py`; results in
//! docs/BENCHMARKS.md, "A trained draft head").
//!
//! `cargo run --release -p specswarm-spec --example dump_features -- MODEL OUT_DIR N_PROMPTS TOKENS [eval]`
//! writes `tokens.u32`, `hidden.f32` and `index.txt` (prompt length, sequence length per line);
//! without `eval` also the dequantised LM head, embeddings and final norm, and the prompts are
//! generated from topics × forms (every third one sampled at T = 0.7); with `eval` the prompts
//! are the benchmark suites (greedy).
use std::io::Write;
use std::path::Path;

use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::{Sampler, SamplerConfig};
use specswarm_engine::tokenizer::Tokenizer;
use specswarm_spec::drafter::lens::{CALIBRATION_FORMS, CALIBRATION_TOPICS};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (model, out, n, tokens) =
        (Path::new(&a[1]), Path::new(&a[2]), a[3].parse::<usize>().unwrap(), a[4].parse::<usize>().unwrap());
    let eval = a.get(5).is_some();
    std::fs::create_dir_all(out).unwrap();
    let full = ModelSlice::load(model, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let d = full.config().d_model;
    let vocab = full.config().vocab_size;
    let file = specswarm_engine::gguf::GgufFile::open(model).unwrap();
    if !eval {
        let name = if file.tensor_info("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
        let head = file.load_matrix(name, vocab, d).unwrap();
        let emb = file.load_matrix("token_embd.weight", vocab, d).unwrap();
        let mut row = vec![0f32; d];
        for (m, f) in [(&head, "head.f32"), (&emb, "embed.f32")] {
            let mut w = std::io::BufWriter::new(std::fs::File::create(out.join(f)).unwrap());
            for r in 0..vocab {
                m.dequantize_row(r, &mut row);
                row.iter().for_each(|v| w.write_all(&v.to_le_bytes()).unwrap());
            }
        }
        let norm = file.load_vector("output_norm.weight", d).unwrap();
        let mut w = std::fs::File::create(out.join("norm.f32")).unwrap();
        norm.iter().for_each(|v| w.write_all(&v.to_le_bytes()).unwrap());
    }
    let tok = Tokenizer::from_gguf(model).unwrap();
    let template = ChatTemplate::from_gguf(model).unwrap().unwrap();
    let prompts: Vec<String> = if eval {
        let mut p = Vec::new();
        for s in [SUITE_CHAT, SUITE_CODE, SUITE_AGENTIC, SUITE_COPY] {
            p.extend(s.iter().map(|s| s.to_string()));
        }
        p
    } else {
        prompts(n)
    };
    let mut toks = std::io::BufWriter::new(std::fs::File::create(out.join("tokens.u32")).unwrap());
    let mut hid = std::io::BufWriter::new(std::fs::File::create(out.join("hidden.f32")).unwrap());
    let mut idx = std::fs::File::create(out.join("index.txt")).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let text = template.render(&[ChatMessage { role: "user".into(), content: prompt.clone() }], true).unwrap();
        let ids = tok.encode(&text, false, true).unwrap();
        let temperature = if eval || i % 3 != 2 { 0.0 } else { 0.7 };
        let mut sampler = Sampler::new(SamplerConfig { temperature, seed: i as u64, ..Default::default() }).unwrap();
        let (out_ids, _, _) = generate(&full, &ids, tokens, &mut sampler, tok.stop_ids(), &mut |_| true).unwrap();
        let mut seq = ids.clone();
        seq.extend(&out_ids);
        let pos: Vec<u32> = (0..seq.len() as u32).collect();
        let batch = Batch { input: StepInput::Tokens(&seq), positions: &pos, tree_parents: None };
        let h = full.forward(&mut full.new_cache(seq.len()), &batch, Want::Hidden).unwrap();
        seq.iter().for_each(|t| toks.write_all(&t.to_le_bytes()).unwrap());
        h.data().iter().for_each(|v| hid.write_all(&v.to_le_bytes()).unwrap());
        writeln!(idx, "{} {}", ids.len(), seq.len()).unwrap();
        eprintln!("{}/{} {} tokens", i + 1, prompts.len(), seq.len());
    }
}

include!("../../../fixtures/prompts/suites.rs");

/// `n` prompts: the lens calibration topics and forms plus more of each (a different set from
/// the lens's own 60).
fn prompts(n: usize) -> Vec<String> {
    const MORE_TOPICS: &[&str] = &[
        "the moon landing",
        "climate change",
        "gardening",
        "the human heart",
        "renewable energy",
        "ancient Egypt",
        "the internet",
        "dinosaurs",
        "personal budgeting",
        "photography",
        "the French revolution",
        "earthquakes",
        "hash tables",
        "time management",
        "rainforests",
        "electric guitars",
        "the immune system",
        "job interviews",
        "cloud computing",
        "origami",
    ];
    const MORE_FORMS: &[&str] = &[
        "Give me a list of five tips about {}.",
        "Write a JSON object describing {} with a name, a summary and three keywords.",
        "What are the pros and cons of {}?",
        "Summarize the history of {} in a few sentences.",
    ];
    let topics: Vec<&str> = CALIBRATION_TOPICS.iter().chain(MORE_TOPICS).copied().collect();
    let forms: Vec<&str> = CALIBRATION_FORMS.iter().chain(MORE_FORMS).copied().collect();
    (0..n).map(|i| forms[(i * 7 + i / topics.len()) % forms.len()].replace("{}", topics[i % topics.len()])).collect()
}
