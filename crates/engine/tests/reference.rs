//! Independent reference: llama.cpp's token ids (tokenization and 32 greedy tokens) and Hugging
//! Face-style template renderings, recorded in `fixtures/reference/*.json` by
//! `scripts/reference/gen_fixtures.py`.

mod common;

use common::{real_model, workspace_root};
use serde_json::Value;
use specswarm_engine::chat::{ChatMessage, ChatTemplate};
use specswarm_engine::generate::generate;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};
use specswarm_engine::sampling::{Sampler, argmax};
use specswarm_engine::tokenizer::Tokenizer;

fn fixture(name: &str) -> Value {
    let p = workspace_root().join("fixtures/reference").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_tokenizer(model: &str) {
    let path = real_model(model);
    let fx = fixture(model);
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let mut failures = Vec::new();
    let cases = fx["tokenize"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let (add, parse) = (case["add_special"].as_bool().unwrap(), case["parse_special"].as_bool().unwrap());
        let want = ids(&case["ids"]);
        let got = tok.encode(text, add, parse).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?} (add_special={add}, parse_special={parse}):\n  llama.cpp {want:?}\n  ours      {got:?}"
            ));
        }
        // Decoding llama.cpp's ids gives the text back (for text without special-token markup).
        if !parse && !add && !text.contains('<') {
            let back = tok.decode(&want, false);
            if back != text {
                failures.push(format!("decode({want:?}) = {back:?}, expected {text:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{model}: {} of {} tokenization cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Largest logit gap at which we accept that our argmax differs from llama.cpp's token. Our
/// one-token arithmetic is llama.cpp's, but llama.cpp computes a prompt batch in another
/// summation order (which we do not follow, to stay batch-invariant), and these Q4 models amplify
/// the resulting 1-ulp differences to a few tenths of a logit. See docs/BENCHMARKS.md.
const NEAR_TIE_LOGITS: f32 = 0.75;

/// Greedy decoding vs llama.cpp, two ways:
/// - free-running: our own greedy tokens vs llama.cpp's 32, reported per prompt;
/// - teacher-forced along llama.cpp's tokens: at every step our argmax must be llama.cpp's token,
///   or the two must be a near-tie in our logits. At most 5% of steps may be such near-ties.
fn check_greedy(model: &str) {
    check_greedy_with(model, false);
}

fn check_greedy_with(model: &str, llama_cpp_prefill: bool) -> usize {
    let path = real_model(model);
    let fx = fixture(model);
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let opts = LoadOptions { layers: None, threads: 2, llama_cpp_prefill, ..Default::default() };
    let slice = ModelSlice::load(&path, &opts).unwrap();
    let mode = if llama_cpp_prefill { " (llama_cpp_prefill)" } else { "" };
    let vocab = slice.config().vocab_size;
    let cases = fx["greedy"].as_array().unwrap();
    assert!(cases.len() >= 5, "at least 5 prompts per model");
    let (mut steps, mut ties, mut exact_prompts) = (0, 0, 0);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt_ids = ids(&case["prompt_ids"]);
        let got_prompt = tok
            .encode(
                case["prompt"].as_str().unwrap(),
                case["add_bos"].as_bool().unwrap(),
                case["parse_special"].as_bool().unwrap(),
            )
            .unwrap();
        assert_eq!(got_prompt, prompt_ids, "{model}/{name}: prompt tokenization differs");
        let want = ids(&case["generated_ids"]);

        let mut sampler = Sampler::new(Default::default()).unwrap();
        let (got, _, _) = generate(&slice, &prompt_ids, want.len(), &mut sampler, &[], &mut |_| true).unwrap();
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        exact_prompts += usize::from(same == want.len());
        eprintln!("{model}/{name}{mode}: free-running greedy equals llama.cpp for {same}/{} tokens", want.len());

        let mut seq = prompt_ids.clone();
        seq.extend_from_slice(&want[..want.len() - 1]);
        let pos: Vec<u32> = (0..seq.len() as u32).collect();
        let mut kv = slice.new_cache(seq.len());
        let batch = Batch { input: StepInput::Tokens(&seq), positions: &pos, tree_parents: None };
        let logits = slice.forward(&mut kv, &batch, Want::AllLogits).unwrap().into_data();
        for (i, &r) in want.iter().enumerate() {
            let l = &logits[(prompt_ids.len() - 1 + i) * vocab..(prompt_ids.len() + i) * vocab];
            let ours = argmax(l);
            steps += 1;
            if ours != r {
                let gap = l[ours as usize] - l[r as usize];
                assert!(
                    gap <= NEAR_TIE_LOGITS,
                    "{model}/{name} step {i}: ours {ours}, llama.cpp {r}, gap {gap} logits"
                );
                ties += 1;
            }
        }
    }
    eprintln!(
        "{model}{mode}: {exact_prompts}/{} prompts identical for all 32 tokens; teacher-forced near-ties {ties}/{steps} steps",
        cases.len()
    );
    assert!(ties * 20 <= steps, "{model}: {ties} of {steps} steps disagree (more than 5%)");
    exact_prompts
}

#[test]
fn smollm2_tokenization_matches_llama_cpp() {
    check_tokenizer("smollm2-135m");
}

#[test]
fn gemma3_tokenization_matches_llama_cpp() {
    check_tokenizer("gemma3-270m");
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    check_greedy("smollm2-135m");
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    check_greedy("gemma3-270m");
}

/// With the prompt prefill's attention in llama.cpp's batched order, SmolLM2 follows llama.cpp
/// bit for bit (every op of its forward pass is reproduced exactly): all prompts match.
#[test]
fn smollm2_greedy_with_llama_cpp_prefill_order() {
    let exact = check_greedy_with("smollm2-135m", true);
    assert_eq!(exact, 12, "every SmolLM2 prompt matches llama.cpp for all 32 tokens");
}

#[test]
fn smollm2_chat_template_matches_jinja2() {
    let path = real_model("smollm2-135m");
    let fx = fixture("smollm2-135m");
    let t = ChatTemplate::from_gguf(&path).unwrap().expect("SmolLM2 ships a template");
    let cases = fx["chat_template"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let msgs: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let got = t.render(&msgs, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap());
    }
}

#[test]
fn gemma3_has_no_template_and_falls_back_to_turns() {
    let path = real_model("gemma3-270m");
    assert!(ChatTemplate::from_gguf(&path).unwrap().is_none());
    let t = ChatTemplate::fallback_for("gemma3").unwrap();
    let s = t.render(&[ChatMessage { role: "user".into(), content: "Hi".into() }], true).unwrap();
    assert_eq!(s, "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
}

#[test]
fn template_errors_are_typed() {
    let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
    let err = t.render(&[], true).unwrap_err().to_string();
    assert!(err.contains("no system role"), "{err}");
    assert!(ChatTemplate::new("{% for %}", "", "").is_err());
}

#[test]
fn stream_decoder_never_splits_characters() {
    let path = real_model("smollm2-135m");
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let text = "naïve café 🦀 👩‍💻 日本語 emoji 🇫🇷 end";
    let ids = tok.encode(text, false, false).unwrap();
    let mut d = specswarm_engine::tokenizer::StreamDecoder::new(&tok, false);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(d.push(id));
    }
    pieces.push(d.finish());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
    assert!(ids.len() > text.chars().count() / 3, "multi-byte characters span several tokens");
}

#[test]
fn oversized_text_is_refused() {
    let path = real_model("smollm2-135m");
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let huge = "a".repeat(specswarm_proto::limits::PROMPT_BYTES_MAX + 1);
    assert!(tok.encode(&huge, false, false).is_err());
}
