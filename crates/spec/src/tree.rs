//! Draft trees.
//!
//! A [`DraftTree`] continues a committed sequence whose last token `r` (the *root*) is not yet in
//! the target's KV cache. Node `i` proposes `tokens[i]`; `parents[i]` is its parent node index, or
//! `-1` when it follows the root directly. Parents precede children (`parents[i] < i`). A chain of
//! γ tokens is the tree with `parents = [-1, 0, 1, …, γ-2]`.
//!
//! For verification the target runs one tree batch: row 0 is the root, row `i + 1` is node `i`
//! (see [`DraftTree::batch_parents`]), so row `i + 1`'s logits score the children of node `i` and
//! row 0's score the root's children.

/// A tree of proposed tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DraftTree {
    pub tokens: Vec<u32>,
    pub parents: Vec<i32>,
    /// Draft probability of each node's token given its parent (1.0 where the drafter has none).
    pub probs: Vec<f32>,
}

impl DraftTree {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// A chain of tokens.
    pub fn chain(tokens: &[u32]) -> DraftTree {
        DraftTree {
            tokens: tokens.to_vec(),
            parents: (0..tokens.len() as i32).map(|i| i - 1).collect(),
            probs: vec![1.0; tokens.len()],
        }
    }

    /// Append a node; returns its index.
    pub fn push(&mut self, token: u32, parent: i32, prob: f32) -> usize {
        debug_assert!(parent < self.tokens.len() as i32);
        self.tokens.push(token);
        self.parents.push(parent);
        self.probs.push(prob);
        self.tokens.len() - 1
    }

    /// Children of `node` (`None`: children of the root), in index order.
    pub fn children(&self, node: Option<usize>) -> impl Iterator<Item = usize> + '_ {
        let p = node.map_or(-1, |n| n as i32);
        self.parents.iter().enumerate().filter(move |&(_, &q)| q == p).map(|(i, _)| i)
    }

    /// Depth of node `i` (1 for the root's children).
    pub fn depth(&self, mut i: usize) -> usize {
        let mut d = 1;
        while self.parents[i] >= 0 {
            i = self.parents[i] as usize;
            d += 1;
        }
        d
    }

    /// The node indices from the root's child down to `i`.
    pub fn path_to(&self, mut i: usize) -> Vec<usize> {
        let mut p = vec![i];
        while self.parents[i] >= 0 {
            i = self.parents[i] as usize;
            p.push(i);
        }
        p.reverse();
        p
    }

    /// Whether it is a single chain.
    pub fn is_chain(&self) -> bool {
        self.parents.iter().enumerate().all(|(i, &p)| p == i as i32 - 1)
    }

    /// Batch layout for the target: `[root, node 0, node 1, …]` with parents shifted by one.
    pub fn batch_parents(&self) -> Vec<i32> {
        std::iter::once(-1).chain(self.parents.iter().map(|&p| p + 1)).collect()
    }

    /// Batch tokens: `[root, node tokens…]`.
    pub fn batch_tokens(&self, root: u32) -> Vec<u32> {
        std::iter::once(root).chain(self.tokens.iter().copied()).collect()
    }

    /// The subtree made of the nodes in `keep` (indices in increasing order); a node whose
    /// parent is not kept is dropped.
    pub fn prune(&self, keep: &[usize]) -> DraftTree {
        let mut map = vec![-1i32; self.len()];
        let mut out = DraftTree::default();
        for &i in keep {
            let p = self.parents[i];
            if p >= 0 && map[p as usize] < 0 {
                continue;
            }
            let np = if p < 0 { -1 } else { map[p as usize] };
            map[i] = out.push(self.tokens[i], np, self.probs[i]) as i32;
        }
        out
    }

    /// Batch positions when the target's cache holds `committed` tokens.
    pub fn batch_positions(&self, committed: usize) -> Vec<u32> {
        std::iter::once(committed as u32).chain((0..self.len()).map(|i| (committed + self.depth(i)) as u32)).collect()
    }
}
