//! Batching across sessions: `ModelSlice::forward_many` gives every step exactly (bit for bit)
//! what `ModelSlice::forward` gives it alone, for chains, trees and prefills of different
//! lengths side by side, and an invalid step harms no other.

mod common;

use std::ops::Range;
use std::path::Path;

use common::{TestRng, Tiny, real_model};
use specswarm_engine::kv::KvCache;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, Step, StepInput, Want};
use specswarm_proto::limits::FORWARD_BATCH_TOKENS_MAX;

/// One session, kept twice: once for the batched run, once for the solo reference.
struct Session {
    batched: KvCache,
    solo: KvCache,
}

/// What one step of a round holds.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// A causal batch of this many rows.
    Chain(usize),
    /// A random tree of this many nodes (all logits; one path is then accepted).
    Tree(usize),
    /// Positions that do not continue the cache: refused.
    WrongPosition,
}

/// The inputs of one step, owned.
struct Owned {
    tokens: Vec<u32>,
    hidden: Vec<f32>,
    positions: Vec<u32>,
    parents: Option<Vec<i32>>,
    want: Want,
}

impl Owned {
    fn batch(&self) -> Batch<'_> {
        let input =
            if self.tokens.is_empty() { StepInput::Hidden(&self.hidden) } else { StepInput::Tokens(&self.tokens) };
        Batch { input, positions: &self.positions, tree_parents: self.parents.as_deref() }
    }
}

fn depth(parents: &[i32], mut i: usize) -> usize {
    let mut d = 0;
    while parents[i] >= 0 {
        i = parents[i] as usize;
        d += 1;
    }
    d
}

fn make_step(model: &ModelSlice, rng: &mut TestRng, base: usize, shape: Shape) -> Owned {
    let cfg = model.config();
    let n = match shape {
        Shape::Chain(n) | Shape::Tree(n) => n,
        Shape::WrongPosition => 2,
    };
    let (parents, positions) = match shape {
        Shape::Chain(_) => (None, (base as u32..(base + n) as u32).collect()),
        Shape::WrongPosition => (None, (base as u32 + 1..(base + n) as u32 + 1).collect()),
        Shape::Tree(_) => {
            let mut parents = vec![-1i32];
            for i in 1..n {
                parents.push(if rng.below(4) == 0 { -1 } else { rng.below(i) as i32 });
            }
            let positions = (0..n).map(|i| (base + depth(&parents, i)) as u32).collect();
            (Some(parents), positions)
        }
    };
    let (tokens, hidden) = if model.is_head() {
        ((0..n).map(|_| rng.below(cfg.vocab_size) as u32).collect(), Vec::new())
    } else {
        (Vec::new(), (0..n * cfg.d_model).map(|_| rng.uniform()).collect())
    };
    let want = match (model.is_tail(), shape) {
        (false, _) => Want::Hidden,
        (true, Shape::Tree(_)) => Want::AllLogits,
        (true, _) if n % 2 == 0 => Want::AllLogits,
        (true, _) => Want::LastLogits,
    };
    Owned { tokens, hidden, positions, parents, want }
}

/// Rounds of `shapes[i]` for session i (rotated each round), one `forward_many` per round,
/// against one `forward` per step on a copy of each session.
fn check_against_solo(path: &Path, layers: Option<Range<usize>>, prefixes: &[usize], shapes: &[Shape], seed: u64) {
    let model = ModelSlice::load(path, &LoadOptions { layers, threads: 2, ..Default::default() }).unwrap();
    let mut rng = TestRng::new(seed);
    let mut sessions: Vec<Session> = Vec::new();
    for &len in prefixes {
        let mut kv = model.new_cache(1024);
        if len > 0 {
            let prefix = make_step(&model, &mut rng, 0, Shape::Chain(len));
            model.forward(&mut kv, &prefix.batch(), Want::Hidden).unwrap();
        }
        sessions.push(Session { batched: kv.clone(), solo: kv });
    }
    for round in 0..3 {
        let shapes: Vec<Shape> = (0..sessions.len()).map(|i| shapes[(i + round) % shapes.len()]).collect();
        let owned: Vec<Owned> =
            sessions.iter().zip(&shapes).map(|(s, &shape)| make_step(&model, &mut rng, s.solo.len(), shape)).collect();
        let mut steps: Vec<Step<'_>> = sessions
            .iter_mut()
            .zip(&owned)
            .map(|(s, o)| Step { kv: &mut s.batched, batch: o.batch(), want: o.want })
            .collect();
        let got = model.forward_many(&mut steps);
        drop(steps);
        assert_eq!(got.len(), sessions.len());
        for (i, ((s, o), got)) in sessions.iter_mut().zip(&owned).zip(got).enumerate() {
            let want = model.forward(&mut s.solo, &o.batch(), o.want);
            match (got, want) {
                (Ok(g), Ok(w)) => assert!(
                    g == w,
                    "{}: round {round}, session {i} ({:?}): batched output differs from solo",
                    path.display(),
                    shapes[i]
                ),
                (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string()),
                (g, w) => panic!("{}: session {i}: batched {g:?} vs solo {w:?}", path.display()),
            }
            assert_eq!(s.batched.len(), s.solo.len());
            if let Some(parents) = &o.parents {
                let leaf = (0..parents.len()).max_by_key(|&j| (depth(parents, j), j)).unwrap();
                let mut path_nodes = vec![leaf];
                while parents[*path_nodes.last().unwrap()] >= 0 {
                    path_nodes.push(parents[*path_nodes.last().unwrap()] as usize);
                }
                path_nodes.reverse();
                s.batched.accept_path(&path_nodes).unwrap();
                s.solo.accept_path(&path_nodes).unwrap();
            }
        }
    }
    // The caches end equal: one more decode step of every session, batched vs solo.
    let owned: Vec<Owned> =
        sessions.iter().map(|s| make_step(&model, &mut rng, s.solo.len(), Shape::Chain(1))).collect();
    let mut steps: Vec<Step<'_>> = sessions
        .iter_mut()
        .zip(&owned)
        .map(|(s, o)| Step { kv: &mut s.batched, batch: o.batch(), want: o.want })
        .collect();
    let got = model.forward_many(&mut steps);
    drop(steps);
    for ((s, o), got) in sessions.iter_mut().zip(&owned).zip(got) {
        assert!(got.unwrap() == model.forward(&mut s.solo, &o.batch(), o.want).unwrap());
    }
}

const SHAPES: [Shape; 6] =
    [Shape::Chain(1), Shape::Tree(7), Shape::Chain(5), Shape::WrongPosition, Shape::Chain(12), Shape::Tree(3)];

fn check_model(path: &Path) {
    let n_layers = ModelSlice::load(path, &LoadOptions { layers: Some(0..1), threads: 1, ..Default::default() })
        .unwrap()
        .config()
        .n_layers;
    // Prefix 0: a prompt prefill on an empty cache beside decode steps of long sessions.
    let prefixes = [9, 0, 33, 1, 17, 4, 60];
    check_against_solo(path, None, &prefixes, &SHAPES, 1);
    check_against_solo(path, Some(n_layers / 3..2 * n_layers / 3), &prefixes, &SHAPES, 2);
    check_against_solo(path, Some(2 * n_layers / 3..n_layers), &prefixes[..3], &SHAPES, 3);
}

#[test]
fn forward_many_equals_solo_forwards_smollm2() {
    check_model(&real_model("smollm2-135m"));
}

#[test]
fn forward_many_equals_solo_forwards_gemma3() {
    check_model(&real_model("gemma3-270m"));
}

#[test]
fn forward_many_equals_solo_forwards_tiny() {
    for (i, arch) in ["llama", "qwen2", "qwen3", "gemma3"].into_iter().enumerate() {
        check_model(&Tiny::new(arch).write(400 + i as u64));
    }
    // An MLP width that is no multiple of the SIMD width: each row keeps its own scalar tail.
    let mut t = Tiny::new("llama");
    t.weight_type = specswarm_kernels::GgmlType::F32;
    t.ffn = 120;
    check_model(&t.write(410));
}

/// More rows than one batch may hold: the steps run in several chunks, each still exact.
#[test]
fn forward_many_splits_at_the_row_limit() {
    let mut t = Tiny::new("qwen2");
    t.context = 1024;
    let path = t.write(420);
    let per_step = 200;
    let sessions = FORWARD_BATCH_TOKENS_MAX / per_step + 3;
    let prefixes = vec![0; sessions];
    check_against_solo(&path, None, &prefixes, &[Shape::Chain(per_step)], 4);
}
