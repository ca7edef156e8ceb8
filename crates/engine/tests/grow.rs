//! Growing a staged tree over several forwards (`ModelSlice::forward_grow`) equals computing
//! the whole tree in one batch, bit for bit; a path across the pieces is accepted like one of a
//! single batch, and bad growth is refused without touching the cache.

mod common;

use std::path::Path;

use common::{TestRng, Tiny, real_model};
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};

/// A random tree of `n` nodes (parents precede children), its tokens and depths.
fn random_tree(rng: &mut TestRng, vocab: usize, n: usize) -> (Vec<u32>, Vec<i32>, Vec<usize>) {
    let mut parents = Vec::new();
    let mut depth = Vec::new();
    for i in 0..n {
        let p = if i == 0 || rng.below(4) == 0 { -1 } else { rng.below(i) as i32 };
        depth.push(if p < 0 { 1 } else { depth[p as usize] + 1 });
        parents.push(p);
    }
    ((0..n).map(|_| rng.below(vocab) as u32).collect(), parents, depth)
}

fn check_growth(path: &Path, seed: u64) {
    let model = ModelSlice::load(path, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    let vocab = model.config().vocab_size;
    let mut rng = TestRng::new(seed);
    let prefix: Vec<u32> = (0..9).map(|_| rng.below(vocab) as u32).collect();
    let ppos: Vec<u32> = (0..9).collect();
    let (toks, parents, depth) = random_tree(&mut rng, vocab, 14);
    let pos: Vec<u32> = depth.iter().map(|&d| (9 + d - 1) as u32).collect();
    let prefill = |kv: &mut _| {
        let b = Batch { input: StepInput::Tokens(&prefix), positions: &ppos, tree_parents: None };
        model.forward(kv, &b, Want::LastLogits).unwrap();
    };

    // The whole tree in one batch.
    let mut one = model.new_cache(64);
    prefill(&mut one);
    let b = Batch { input: StepInput::Tokens(&toks), positions: &pos, tree_parents: Some(&parents) };
    let want = model.forward(&mut one, &b, Want::AllLogits).unwrap().into_data();

    // The same tree in three pieces (parents keep their global indices: staged rows first).
    let mut grown = model.new_cache(64);
    prefill(&mut grown);
    let mut got = Vec::new();
    for piece in [0..5, 5..6, 6..14] {
        let b = Batch {
            input: StepInput::Tokens(&toks[piece.clone()]),
            positions: &pos[piece.clone()],
            tree_parents: Some(&parents[piece.clone()]),
        };
        got.extend(model.forward_grow(&mut grown, &b, Want::AllLogits).unwrap().into_data());
        assert_eq!(grown.staged_len(), piece.end);
        assert_eq!(grown.len(), 9, "growth stays staged");
    }
    assert!(got == want, "{}: grown tree logits differ from the one-batch tree", path.display());

    // A plain forward refuses to run over the staged rows; so does growth with a bad parent or
    // position, and the cache is unchanged by the refusals.
    let next = [toks[0]];
    let b = Batch { input: StepInput::Tokens(&next), positions: &[9], tree_parents: None };
    assert!(model.forward(&mut grown, &b, Want::LastLogits).is_err());
    for (parent, position) in [(14, 9), (3, 9 + depth[3] as u32 + 1), (-1, 10)] {
        let b = Batch { input: StepInput::Tokens(&next), positions: &[position], tree_parents: Some(&[parent]) };
        assert!(model.forward_grow(&mut grown, &b, Want::AllLogits).is_err(), "parent {parent} position {position}");
    }
    assert_eq!(grown.staged_len(), 14);
    let bad_path = [0usize, 13];
    if parents[13] != 0 {
        assert!(grown.accept_path(&bad_path).is_err(), "a non-path is refused");
    }

    // Accept the deepest path (it may cross the pieces) in both caches: the next token's logits
    // are identical.
    let leaf = (0..14).max_by_key(|&i| (depth[i], i)).unwrap();
    let mut path_nodes = vec![leaf];
    while parents[*path_nodes.last().unwrap()] >= 0 {
        path_nodes.push(parents[*path_nodes.last().unwrap()] as usize);
    }
    path_nodes.reverse();
    one.accept_path(&path_nodes).unwrap();
    grown.accept_path(&path_nodes).unwrap();
    let p = [(9 + path_nodes.len()) as u32];
    let b = Batch { input: StepInput::Tokens(&next), positions: &p, tree_parents: None };
    let a = model.forward(&mut one, &b, Want::LastLogits).unwrap();
    let g = model.forward(&mut grown, &b, Want::LastLogits).unwrap();
    assert!(a == g, "{}: after accepting a grown path the logits differ", path.display());
}

#[test]
fn grown_trees_equal_one_batch_tiny() {
    for (i, arch) in ["llama", "gemma3"].into_iter().enumerate() {
        let path = Tiny::new(arch).write(300 + i as u64);
        for seed in 0..4 {
            check_growth(&path, seed);
        }
    }
}

#[test]
fn grown_trees_equal_one_batch_real_models() {
    check_growth(&real_model("smollm2-135m"), 7);
    check_growth(&real_model("gemma3-270m"), 8);
}
