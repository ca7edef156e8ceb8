//! Verification: which drafted tokens the target accepts, and the target's own next token.
//!
//! Two lossless rules (see DESIGN.md §3):
//!
//! - [`verify_tree`], the SpecExec rule: walk the tree from the root, drawing the target's token
//!   at each step with the full sampler chain; descend while the drawn token is a child, emit it
//!   and stop otherwise. Exact for any tree and any drafter, needs no draft probabilities. Greedy
//!   is the case "draw = argmax".
//! - [`verify_chain_stochastic`], the classic rule for a chain whose tokens were *sampled* from
//!   known draft distributions q: accept `x_i` with probability `min(1, p(x_i)/q(x_i))`, on the
//!   first rejection draw from `norm(max(0, p − q))`, and draw a bonus token from p when every
//!   draft is accepted.
//!
//! In both, p at a step is [`Sampler::distribution`] of that step's logits row after `history`
//! plus the tokens accepted so far, exactly what plain decoding would see, so penalties match.
//!
//! Randomness: a sampled (temperature > 0) target consumes, per verified tree, one `next_f64` per
//! target draw in [`verify_tree`], and in [`verify_chain_stochastic`] one per acceptance decision
//! plus one for the correction or bonus token. A greedy target consumes none, like plain greedy
//! decoding.

use specswarm_engine::sampling::{Distribution, Sampler};

use crate::tree::DraftTree;

/// Outcome of verifying one tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Accepted node indices, root's child first (a root-to-node path in the tree).
    pub accepted: Vec<usize>,
    /// The target's own next token after the accepted path (the correction, or the bonus token
    /// when the path ends at a leaf / all drafts were accepted).
    pub next: u32,
}

impl Verdict {
    /// The committed tokens: the accepted drafts followed by `next`.
    pub fn emitted(&self, tree: &DraftTree) -> Vec<u32> {
        self.accepted.iter().map(|&i| tree.tokens[i]).chain(std::iter::once(self.next)).collect()
    }
}

/// Logits row `row` of a `[rows][vocab]` row-major batch.
fn row(logits: &[f32], vocab: usize, row: usize) -> &[f32] {
    &logits[row * vocab..(row + 1) * vocab]
}

fn check_shapes(tree: &DraftTree, logits: &[f32], vocab: usize) {
    assert!(vocab > 0, "vocabulary size must be positive");
    assert_eq!(
        logits.len(),
        (tree.len() + 1) * vocab,
        "logits must be [tree.len() + 1][vocab] in batch layout ({} nodes, vocab {vocab})",
        tree.len()
    );
    assert_eq!(tree.parents.len(), tree.len(), "tree.parents must have one entry per node");
}

/// The target's token for one logits row: argmax (no randomness) when greedy, otherwise one draw
/// from the post-chain distribution.
fn target_draw(sampler: &mut Sampler, logits: &[f32], history: &[u32]) -> u32 {
    let dist = sampler.distribution(logits, history);
    if sampler.config().is_greedy() { dist.tokens[0] } else { sampler.sample_at(&dist, history.len()) }
}

/// SpecExec rule (lossless for ANY tree, needs no draft probabilities): at the root, draw y from
/// the target's full sampler chain (`sampler.distribution(row logits, history + path so far)`,
/// then `sampler.sample_from`); if some child of the current node has token y, descend into it and
/// repeat; otherwise emit y and stop. Greedy: y = argmax (no randomness). Children with duplicate
/// tokens: descend into the first (lowest index).
///
/// `logits` is row-major `[tree.len() + 1][vocab]` in batch layout (row 0 = root, row i + 1 =
/// node i); `history` is the committed sequence INCLUDING the root token.
///
/// # Panics
/// If `logits` does not have `(tree.len() + 1) * vocab` entries.
pub fn verify_tree(tree: &DraftTree, logits: &[f32], vocab: usize, history: &[u32], sampler: &mut Sampler) -> Verdict {
    check_shapes(tree, logits, vocab);
    // children[0] = root's children, children[i + 1] = node i's children, in index order.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); tree.len() + 1];
    for (i, &p) in tree.parents.iter().enumerate() {
        assert!(p >= -1 && (p as i64) < i as i64, "node {i}: parent {p} must be -1 or an earlier node");
        children[(p + 1) as usize].push(i);
    }
    let mut context = history.to_vec();
    let mut accepted = Vec::new();
    let mut current_row = 0usize;
    loop {
        let y = target_draw(sampler, row(logits, vocab, current_row), &context);
        match children[current_row].iter().copied().find(|&c| tree.tokens[c] == y) {
            Some(c) => {
                accepted.push(c);
                context.push(y);
                current_row = c + 1;
            }
            None => return Verdict { accepted, next: y },
        }
    }
}

/// Classic speculative sampling for a CHAIN whose token `x_i` was drawn from `draft_dists[i]`,
/// the drafter's full distribution at step i (`tree.probs[i]` should equal
/// `draft_dists[i].prob(x_i)`; the full distribution is what is used, so the residual is
/// consistent with the acceptance ratio).
///
/// Accept `x_i` with probability `min(1, p(x_i)/q(x_i))` (one `rng.next_f64()` per decision, even
/// when the ratio is ≥ 1, so the stream position depends only on the decisions taken); on the first
/// rejection draw from `norm(max(0, p − q))` with `sampler.sample_from`; if all are accepted draw
/// the bonus token from p. p = the target's post-chain distribution (`sampler.distribution`) after
/// `history` + the accepted drafts.
///
/// Greedy target (degenerate case, exact): p is a point mass on the argmax, so a draft is accepted
/// iff it is the argmax and the correction is the argmax; no randomness is consumed.
///
/// A draft token that its own distribution gives probability 0 cannot have been drawn from it; it
/// is then treated as proposed deterministically (q = point mass on `x_i`), which keeps the output
/// exact: accept with probability p(x_i), otherwise draw from p without `x_i`.
///
/// # Panics
/// If the tree is not a chain, `draft_dists.len() != tree.len()`, or the logits have the wrong
/// shape.
pub fn verify_chain_stochastic(
    tree: &DraftTree,
    draft_dists: &[Distribution],
    logits: &[f32],
    vocab: usize,
    history: &[u32],
    sampler: &mut Sampler,
) -> Verdict {
    check_shapes(tree, logits, vocab);
    assert!(tree.is_chain(), "verify_chain_stochastic needs a chain");
    assert_eq!(draft_dists.len(), tree.len(), "one draft distribution per drafted token");
    let greedy = sampler.config().is_greedy();
    let mut context = history.to_vec();
    let mut accepted = Vec::new();
    for (i, q) in draft_dists.iter().enumerate() {
        let x = tree.tokens[i];
        let p = sampler.distribution(row(logits, vocab, i), &context);
        if greedy {
            let a = p.tokens[0];
            if x != a {
                return Verdict { accepted, next: a };
            }
        } else {
            let px = f64::from(p.prob(x));
            let mut qx = f64::from(q.prob(x));
            let point_mass = qx <= 0.0;
            if point_mass {
                qx = 1.0;
            }
            let u = sampler.rng_mut().next_f64();
            if u >= px / qx {
                let residual = if point_mass { residual_point(&p, x) } else { residual(&p, q) };
                let next = sampler.sample_from(&residual.unwrap_or(p));
                return Verdict { accepted, next };
            }
        }
        accepted.push(i);
        context.push(x);
    }
    let next = target_draw(sampler, row(logits, vocab, tree.len()), &context);
    Verdict { accepted, next }
}

/// `norm(max(0, p − q))` as a [`Distribution`] (descending probability, ties by id), or `None`
/// when it is all zero (p ≤ q everywhere, i.e. p = q up to rounding; a rejection then has
/// probability ~0 and the caller falls back to p).
fn residual(p: &Distribution, q: &Distribution) -> Option<Distribution> {
    let mut q_of: Vec<(u32, f64)> = q.tokens.iter().zip(&q.probs).map(|(&t, &v)| (t, f64::from(v))).collect();
    q_of.sort_unstable_by_key(|e| e.0);
    let q_at = |t: u32| q_of.binary_search_by_key(&t, |e| e.0).map_or(0.0, |k| q_of[k].1);
    let mass: Vec<(u32, f64)> =
        p.tokens.iter().zip(&p.probs).map(|(&t, &v)| (t, (f64::from(v) - q_at(t)).max(0.0))).collect();
    normalized(mass)
}

/// p without `x`, renormalised (the residual of a point-mass draft on `x`).
fn residual_point(p: &Distribution, x: u32) -> Option<Distribution> {
    normalized(p.tokens.iter().zip(&p.probs).filter(|e| *e.0 != x).map(|(&t, &v)| (t, f64::from(v))).collect())
}

fn normalized(mut mass: Vec<(u32, f64)>) -> Option<Distribution> {
    mass.retain(|e| e.1 > 0.0);
    let total: f64 = mass.iter().map(|e| e.1).sum();
    if mass.is_empty() || total <= 0.0 || !total.is_finite() {
        return None;
    }
    mass.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Some(Distribution {
        tokens: mass.iter().map(|e| e.0).collect(),
        probs: mass.iter().map(|e| (e.1 / total) as f32).collect(),
    })
}
