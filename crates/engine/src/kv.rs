//! Per-session KV cache of one layer slice.
//!
//! Invariant: the committed rows `0..len` hold the keys and values of positions `0..len`, in
//! order. A forward batch appends its rows after `len` in batch order (a tree's nodes are not in
//! position order); the caller then either commits them all (a causal batch), keeps one path
//! ([`KvCache::accept_path`], which compacts the path's rows to contiguous positions), or drops
//! them ([`KvCache::truncate`]). A tree's rows stay *staged* until then: each staged row knows
//! its parent (another staged row, or the committed prefix) and its position, so a later tree
//! batch can grow the same tree (see `ModelSlice::forward_grow`).

use crate::error::EngineError;

#[derive(Clone, Debug, Default)]
pub(crate) struct LayerKv {
    /// Row-major `[row][k_dim]`.
    pub k: Vec<f32>,
    /// Row-major `[row][v_dim]`.
    pub v: Vec<f32>,
}

/// A staged tree row: its parent (a staged row index, `-1` for the committed prefix) and position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StagedRow {
    pub parent: i32,
    pub position: u32,
}

#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) k_dim: usize,
    pub(crate) v_dim: usize,
    /// Committed rows.
    len: usize,
    /// Staged tree rows after the committed ones, in storage order.
    staged: Vec<StagedRow>,
    budget_tokens: usize,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize, k_dim: usize, v_dim: usize, budget_tokens: usize) -> KvCache {
        KvCache { layers: vec![LayerKv::default(); n_layers], k_dim, v_dim, len: 0, staged: Vec::new(), budget_tokens }
    }

    /// Number of committed tokens (= the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn budget_tokens(&self) -> usize {
        self.budget_tokens
    }

    /// Staged (uncommitted) tree rows.
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    pub(crate) fn staged(&self) -> &[StagedRow] {
        &self.staged
    }

    /// Reserve room for `n` more rows after the committed and staged ones, or refuse if over budget.
    pub(crate) fn check_room(&self, n: usize) -> Result<(), EngineError> {
        let needed = self.len + self.staged.len() + n;
        if needed > self.budget_tokens {
            return Err(EngineError::KvBudgetExceeded { needed, budget: self.budget_tokens });
        }
        Ok(())
    }

    /// Make layer storage hold exactly `len + staged + n` rows (the batch's rows are written by
    /// the forward).
    pub(crate) fn stage_rows(&mut self, n: usize) {
        let rows = self.len + self.staged.len() + n;
        for l in &mut self.layers {
            l.k.resize(rows * self.k_dim, 0.0);
            l.v.resize(rows * self.v_dim, 0.0);
        }
    }

    /// Commit the rows a causal batch wrote (nothing is staged then).
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.staged.is_empty());
        self.len += n;
        debug_assert!(self.layers.iter().all(|l| l.k.len() == self.len * self.k_dim));
    }

    /// Record the rows a tree batch wrote as staged.
    pub(crate) fn stage(&mut self, rows: impl IntoIterator<Item = StagedRow>) {
        self.staged.extend(rows);
        debug_assert!(self.layers.iter().all(|l| l.k.len() == (self.len + self.staged.len()) * self.k_dim));
    }

    /// Drop everything after `len` committed tokens (staged rows included).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        self.len = len;
        self.staged.clear();
        for l in &mut self.layers {
            l.k.truncate(len * self.k_dim);
            l.v.truncate(len * self.v_dim);
        }
    }

    /// Keep one path of the staged tree from the committed prefix down: `path` lists staged row
    /// indices (a tree batch's node indices, continued by any batch that grew the tree), each the
    /// parent of the next, the first a child of the prefix; their rows move to positions
    /// `len..len + path.len()` and the rest is dropped.
    pub fn accept_path(&mut self, path: &[usize]) -> Result<(), EngineError> {
        let staged = self.staged.len();
        if let Some(&bad) = path.iter().find(|&&i| i >= staged) {
            return Err(EngineError::BadBatch {
                reason: format!("path node {bad} is outside the staged {staged} rows"),
            });
        }
        if path.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EngineError::BadBatch { reason: format!("path {path:?} is not increasing") });
        }
        let linked = path.iter().enumerate().all(|(j, &i)| {
            let parent = self.staged[i].parent;
            if j == 0 { parent < 0 } else { parent == path[j - 1] as i32 }
        });
        if !linked {
            return Err(EngineError::BadBatch { reason: format!("path {path:?} is not a path of the staged tree") });
        }
        let base = self.len;
        for l in &mut self.layers {
            for (dst, &src) in path.iter().enumerate() {
                if dst != src {
                    let (d, s) = (base + dst, base + src);
                    l.k.copy_within(s * self.k_dim..(s + 1) * self.k_dim, d * self.k_dim);
                    l.v.copy_within(s * self.v_dim..(s + 1) * self.v_dim, d * self.v_dim);
                }
            }
            l.k.truncate((base + path.len()) * self.k_dim);
            l.v.truncate((base + path.len()) * self.v_dim);
        }
        self.len = base + path.len();
        self.staged.clear();
        Ok(())
    }

    /// Drop staged rows of an uncommitted batch.
    pub fn discard_staged(&mut self) {
        self.truncate(self.len);
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.capacity() + l.v.capacity()) * 4).sum()
    }
}
