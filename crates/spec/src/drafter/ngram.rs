//! Prompt lookup: propose what followed the last time the sequence's tail n-gram occurred.
//!
//! [`NgramIndex`] maps (n, hash of n tokens) to the positions right after each occurrence, for
//! every n in `min..=max`, and is extended incrementally as its stream grows (rebuilt when a new
//! stream does not extend the indexed one). A proposal takes the longest tail n-gram with an
//! earlier occurrence; a chain follows its most recent occurrence, a tree is the trie of the
//! continuations of all occurrences, children ranked by how many occurrences share them.

use std::collections::HashMap;

use super::{DraftBudget, Drafter};
use crate::SpecError;
use crate::tree::DraftTree;

/// Most occurrences of one n-gram remembered (the most recent ones).
const OCCURRENCES_PER_NGRAM_MAX: usize = 64;

fn hash(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3))
}

/// An incremental n-gram index over one token stream.
#[derive(Default)]
pub struct NgramIndex {
    min: usize,
    max: usize,
    stream: Vec<u32>,
    /// (n, hash of the n tokens ending at e) → e + 1, the start of a continuation.
    index: HashMap<(usize, u64), Vec<usize>>,
}

impl NgramIndex {
    pub fn new(min: usize, max: usize) -> NgramIndex {
        let min = min.max(1);
        NgramIndex { min, max: max.max(min), ..Default::default() }
    }

    pub fn stream(&self) -> &[u32] {
        &self.stream
    }

    pub fn clear(&mut self) {
        self.stream.clear();
        self.index.clear();
    }

    /// Make the indexed stream equal `seq`, reusing the work for a common prefix when `seq`
    /// extends the indexed stream.
    pub fn sync(&mut self, seq: &[u32]) {
        if !seq.starts_with(&self.stream) {
            self.clear();
        }
        let old = self.stream.len();
        self.append(&seq[old..]);
    }

    /// Append tokens to the stream and index the n-grams that now have a continuation.
    pub fn append(&mut self, tokens: &[u32]) {
        let old = self.stream.len();
        self.stream.extend_from_slice(tokens);
        // An n-gram ending at e is an entry once the token after it exists.
        for e in old.saturating_sub(1)..self.stream.len().saturating_sub(1) {
            for n in self.min..=self.max {
                if e + 1 < n {
                    break;
                }
                let v = self.index.entry((n, hash(&self.stream[e + 1 - n..=e]))).or_default();
                if v.last() != Some(&(e + 1)) {
                    v.push(e + 1);
                    if v.len() > OCCURRENCES_PER_NGRAM_MAX {
                        v.remove(0);
                    }
                }
            }
        }
    }

    /// Continuation starts of earlier occurrences of `key` (n tokens), most recent first.
    pub fn occurrences(&self, key: &[u32]) -> Vec<usize> {
        let n = key.len();
        let Some(starts) = self.index.get(&(n, hash(key))) else { return Vec::new() };
        starts.iter().rev().copied().filter(|&st| st >= n && self.stream[st - n..st] == *key).collect()
    }

    /// Up to `len` tokens from `start`, stopping before `stop`.
    pub fn continuation(&self, start: usize, len: usize, stop: Option<u32>) -> Vec<u32> {
        self.stream[start..(start + len).min(self.stream.len())]
            .iter()
            .copied()
            .take_while(|&t| Some(t) != stop)
            .collect()
    }
}

/// Build a draft tree from continuations (most relevant first): a chain from the first when
/// `max_branch == 1`, otherwise the trie of all of them, children ranked by how many
/// continuations share them (ties: earlier continuation first), best branches first.
pub fn tree_from_continuations(conts: &[Vec<u32>], budget: &DraftBudget) -> DraftTree {
    let mut tree = DraftTree::default();
    if budget.max_branch == 1 {
        if let Some(c) = conts.iter().find(|c| !c.is_empty()) {
            for (i, &t) in c.iter().take(budget.max_depth.min(budget.max_nodes)).enumerate() {
                tree.push(t, i as i32 - 1, 1.0);
            }
        }
        return tree;
    }
    let members: Vec<usize> = (0..conts.len()).collect();
    grow(&mut tree, conts, &members, 0, -1, budget);
    tree
}

fn grow(tree: &mut DraftTree, conts: &[Vec<u32>], members: &[usize], depth: usize, parent: i32, budget: &DraftBudget) {
    if depth >= budget.max_depth {
        return;
    }
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    for &m in members {
        let Some(&t) = conts[m].get(depth) else { continue };
        match groups.iter_mut().find(|g| g.0 == t) {
            Some(g) => g.1.push(m),
            None => groups.push((t, vec![m])),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
    let total: usize = groups.iter().map(|g| g.1.len()).sum();
    for (t, group) in groups.into_iter().take(budget.max_branch) {
        if tree.len() >= budget.max_nodes {
            return;
        }
        let node = tree.push(t, parent, group.len() as f32 / total as f32) as i32;
        grow(tree, conts, &group, depth + 1, node, budget);
    }
}

/// Prompt lookup over the session.
pub struct NgramDrafter {
    index: NgramIndex,
}

impl NgramDrafter {
    /// Match tail n-grams of `min_ngram..=max_ngram` tokens (longest first).
    pub fn new(max_ngram: usize, min_ngram: usize) -> NgramDrafter {
        NgramDrafter { index: NgramIndex::new(min_ngram, max_ngram) }
    }
}

impl Drafter for NgramDrafter {
    fn name(&self) -> String {
        "ngram".into()
    }

    fn propose(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError> {
        budget.validate()?;
        self.index.sync(seq);
        let (min, max) = (self.index.min, self.index.max);
        for n in (min..=max).rev().filter(|&n| n <= seq.len()) {
            let starts = self.index.occurrences(&seq[seq.len() - n..]);
            if !starts.is_empty() {
                let conts: Vec<Vec<u32>> =
                    starts.iter().map(|&s| self.index.continuation(s, budget.max_depth, None)).collect();
                return Ok(tree_from_continuations(&conts, budget));
            }
        }
        Ok(DraftTree::default())
    }
}
