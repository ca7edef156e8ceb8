//! Verification: which drafted tokens the target accepts, losslessly.

use specswarm_engine::sampling::Sampler;

use crate::tree::DraftTree;

/// Outcome of verifying one tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Accepted node indices, the root's child first (a root-to-node path).
    pub accepted: Vec<usize>,
    /// The target's own next token after the accepted path (a correction, or the bonus token).
    pub next: u32,
}

/// SpecExec rule, lossless for any tree and any sampler settings: at the root draw `y` from the
/// target's full sampler chain; if a child carries `y`, descend into it and repeat; otherwise
/// emit `y` and stop. Greedy is the case `y = argmax`. Each emitted token is a draw from exactly
/// the distribution plain decoding would have used, so the output distribution is the target's.
///
/// `logits` is `[tree.len() + 1][vocab]` in batch layout (row 0: the root); `history` is the
/// committed sequence including the root token.
pub fn verify_tree(tree: &DraftTree, logits: &[f32], vocab: usize, history: &[u32], sampler: &mut Sampler) -> Verdict {
    assert_eq!(logits.len(), (tree.len() + 1) * vocab, "one logits row per batch row");
    let mut ctx = history.to_vec();
    let mut node: Option<usize> = None;
    let mut accepted = Vec::new();
    loop {
        let row = node.map_or(0, |n| n + 1);
        let y = sampler.sample(&logits[row * vocab..(row + 1) * vocab], &ctx);
        match tree.children(node).find(|&c| tree.tokens[c] == y) {
            Some(c) => {
                accepted.push(c);
                ctx.push(y);
                node = Some(c);
            }
            None => return Verdict { accepted, next: y },
        }
    }
}
