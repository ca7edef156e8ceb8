//! Layer slices, KV rollback and tree attention against the single-process sequential model.

mod common;

use std::path::Path;

use common::{TestRng, Tiny, max_rel_diff, real_model};
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, StepOutput, Want};

fn load(path: &Path, layers: Option<std::ops::Range<usize>>) -> ModelSlice {
    ModelSlice::load(path, &LoadOptions { layers, threads: 2, ..Default::default() }).unwrap()
}

fn causal<'a>(input: StepInput<'a>, positions: &'a [u32]) -> Batch<'a> {
    Batch { input, positions, tree_parents: None }
}

fn prompt(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut r = TestRng::new(seed);
    (0..n).map(|_| r.below(vocab) as u32).collect()
}

/// Full model vs the same model cut into 3 slices: prefill then 3 decode steps, all logits.
fn check_split_invariance(path: &Path) {
    let full = load(path, None);
    let n_layers = full.config().n_layers;
    let cuts = [0, n_layers / 3, 2 * n_layers / 3, n_layers];
    let slices: Vec<ModelSlice> = cuts.windows(2).map(|w| load(path, Some(w[0]..w[1]))).collect();
    assert!(slices[0].is_head() && !slices[0].is_tail() && slices[2].is_tail() && !slices[1].is_head());
    let ids = prompt(full.config().vocab_size, 23, 7);
    let mut kv_full = full.new_cache(64);
    let mut kvs: Vec<_> = slices.iter().map(|s| s.new_cache(64)).collect();
    let mut start = 0usize;
    for chunk in [&ids[..20], &ids[20..21], &ids[21..22], &ids[22..23]] {
        let pos: Vec<u32> = (start as u32..(start + chunk.len()) as u32).collect();
        let want = full.forward(&mut kv_full, &causal(StepInput::Tokens(chunk), &pos), Want::AllLogits).unwrap();
        let mut h = slices[0].forward(&mut kvs[0], &causal(StepInput::Tokens(chunk), &pos), Want::Hidden).unwrap();
        h = slices[1].forward(&mut kvs[1], &causal(StepInput::Hidden(h.data()), &pos), Want::Hidden).unwrap();
        let got = slices[2].forward(&mut kvs[2], &causal(StepInput::Hidden(h.data()), &pos), Want::AllLogits).unwrap();
        let d = max_rel_diff(got.data(), want.data());
        assert!(d <= 1e-4, "{}: split logits differ by {d} (relative) at position {start}", path.display());
        start += chunk.len();
    }
}

/// Decode n tokens, truncate to m, decode again: logits equal a fresh run on the same prefix.
fn check_truncate(path: &Path) {
    let model = load(path, None);
    let vocab = model.config().vocab_size;
    let a = prompt(vocab, 12, 11);
    let b = prompt(vocab, 4, 12);
    let pos = |s: usize, n: usize| (s as u32..(s + n) as u32).collect::<Vec<_>>();
    let mut kv = model.new_cache(64);
    model.forward(&mut kv, &causal(StepInput::Tokens(&a), &pos(0, 12)), Want::LastLogits).unwrap();
    for (i, &t) in b.iter().enumerate() {
        let p = [(12 + i) as u32];
        model.forward(&mut kv, &causal(StepInput::Tokens(&[t]), &p), Want::LastLogits).unwrap();
    }
    assert_eq!(kv.len(), 16);
    kv.truncate(9);
    assert_eq!(kv.len(), 9);
    let tail = [b[1], b[3], b[0]];
    let after = model.forward(&mut kv, &causal(StepInput::Tokens(&tail), &pos(9, 3)), Want::AllLogits).unwrap();

    let mut fresh_kv = model.new_cache(64);
    let mut seq = a[..9].to_vec();
    seq.extend_from_slice(&tail);
    let fresh = model.forward(&mut fresh_kv, &causal(StepInput::Tokens(&seq), &pos(0, 12)), Want::AllLogits).unwrap();
    let rows = |o: &StepOutput, from: usize| o.data()[from * vocab..].to_vec();
    let d = max_rel_diff(&rows(&after, 0), &rows(&fresh, 9));
    assert!(d <= 1e-5, "{}: logits after truncate differ by {d}", path.display());
}

/// A random tree: every node's logits equal those of its root-to-node path run as a sequence,
/// and accepting a path leaves the cache as if that path had been decoded plainly.
fn check_tree(path: &Path, seed: u64) {
    let model = load(path, None);
    let vocab = model.config().vocab_size;
    let mut rng = TestRng::new(seed);
    let pre = prompt(vocab, 10, seed);
    let pos: Vec<u32> = (0..10).collect();
    let mut kv = model.new_cache(64);
    model.forward(&mut kv, &causal(StepInput::Tokens(&pre), &pos), Want::LastLogits).unwrap();

    let n = 12;
    let mut parents = vec![-1i32];
    for i in 1..n {
        parents.push(if rng.below(4) == 0 { -1 } else { rng.below(i) as i32 });
    }
    let toks: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let depth = |mut i: usize| {
        let mut d = 0;
        while parents[i] >= 0 {
            i = parents[i] as usize;
            d += 1;
        }
        d
    };
    let tpos: Vec<u32> = (0..n).map(|i| (10 + depth(i)) as u32).collect();
    let batch = Batch { input: StepInput::Tokens(&toks), positions: &tpos, tree_parents: Some(&parents) };
    let out = model.forward(&mut kv, &batch, Want::AllLogits).unwrap();
    assert_eq!(kv.len(), 10, "a tree batch stays staged");

    let path_of = |mut i: usize| {
        let mut p = vec![i];
        while parents[i] >= 0 {
            i = parents[i] as usize;
            p.push(i);
        }
        p.reverse();
        p
    };
    for node in 0..n {
        let nodes = path_of(node);
        let mut seq = pre.clone();
        seq.extend(nodes.iter().map(|&j| toks[j]));
        let spos: Vec<u32> = (0..seq.len() as u32).collect();
        let mut fresh = model.new_cache(64);
        let want = model.forward(&mut fresh, &causal(StepInput::Tokens(&seq), &spos), Want::LastLogits).unwrap();
        let got = &out.data()[node * vocab..(node + 1) * vocab];
        let d = max_rel_diff(got, want.data());
        assert!(d <= 1e-4, "{}: tree node {node} (path {nodes:?}) differs by {d}", path.display());
    }

    // Accept the deepest path, then decode one more token: equals a plain run.
    let leaf = (0..n).max_by_key(|&i| (depth(i), i)).unwrap();
    let accepted = path_of(leaf);
    kv.accept_path(&accepted).unwrap();
    assert_eq!(kv.len(), 10 + accepted.len());
    let next = [toks[0]];
    let p = [kv.len() as u32];
    let got = model.forward(&mut kv, &causal(StepInput::Tokens(&next), &p), Want::LastLogits).unwrap();
    let mut seq = pre.clone();
    seq.extend(accepted.iter().map(|&j| toks[j]));
    seq.push(toks[0]);
    let spos: Vec<u32> = (0..seq.len() as u32).collect();
    let mut fresh = model.new_cache(64);
    let want = model.forward(&mut fresh, &causal(StepInput::Tokens(&seq), &spos), Want::LastLogits).unwrap();
    let d = max_rel_diff(got.data(), want.data());
    assert!(d <= 1e-4, "{}: after accept_path logits differ by {d}", path.display());
}

#[test]
fn tiny_models_split_truncate_tree() {
    for (i, arch) in ["llama", "qwen2", "qwen3", "gemma3"].into_iter().enumerate() {
        let path = Tiny::new(arch).write(100 + i as u64);
        check_split_invariance(&path);
        check_truncate(&path);
        for seed in 0..4 {
            check_tree(&path, seed);
        }
    }
}

#[test]
fn tiny_model_quant_types() {
    for ty in [
        specswarm_kernels::GgmlType::Q4_0,
        specswarm_kernels::GgmlType::Q4_1,
        specswarm_kernels::GgmlType::Q5_0,
        specswarm_kernels::GgmlType::F32,
    ] {
        let mut t = Tiny::new("llama");
        t.weight_type = ty;
        let path = t.write(200);
        check_split_invariance(&path);
        check_tree(&path, 1);
    }
}

#[test]
fn smollm2_split_truncate_tree() {
    let path = real_model("smollm2-135m");
    check_split_invariance(&path);
    check_truncate(&path);
    check_tree(&path, 3);
}

#[test]
fn gemma3_split_truncate_tree() {
    let path = real_model("gemma3-270m");
    check_split_invariance(&path);
    check_truncate(&path);
    check_tree(&path, 5);
}

/// Batch invariance: the logits of a row do not depend on how many rows share the forward (or
/// on the thread count), bit for bit. Speculative verification of k tokens relies on this to
/// reproduce plain decoding exactly.
fn check_batch_invariance(path: &Path) {
    let one = ModelSlice::load(path, &LoadOptions { layers: None, threads: 1, ..Default::default() }).unwrap();
    let two = load(path, None);
    let vocab = one.config().vocab_size;
    let ids = prompt(vocab, 19, 21);
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let mut kv = two.new_cache(64);
    let batched = two.forward(&mut kv, &causal(StepInput::Tokens(&ids), &pos), Want::AllLogits).unwrap().into_data();
    let mut kv = one.new_cache(64);
    for (i, &t) in ids.iter().enumerate() {
        let row = one.forward(&mut kv, &causal(StepInput::Tokens(&[t]), &pos[i..=i]), Want::LastLogits).unwrap();
        assert!(
            row.data() == &batched[i * vocab..(i + 1) * vocab],
            "{}: row {i} differs between batch and single-token runs",
            path.display()
        );
    }
}

#[test]
fn batch_invariance_real_and_tiny() {
    check_batch_invariance(&real_model("smollm2-135m"));
    check_batch_invariance(&real_model("gemma3-270m"));
    for (i, arch) in ["llama", "qwen2", "qwen3", "gemma3"].into_iter().enumerate() {
        check_batch_invariance(&Tiny::new(arch).write(300 + i as u64));
    }
}
