//! Per-session KV cache of one layer slice.
//!
//! Invariant: the committed rows `0..len` hold the keys and values of positions `0..len`, in
//! order. A forward batch appends its rows after `len` in batch order (a tree's nodes are not in
//! position order); the caller then either commits them all (a causal batch), keeps one path
//! ([`KvCache::accept_path`], which compacts the path's rows to contiguous positions), or drops
//! them ([`KvCache::truncate`]).

use crate::error::EngineError;

#[derive(Clone, Debug, Default)]
pub(crate) struct LayerKv {
    /// Row-major `[row][k_dim]`.
    pub k: Vec<f32>,
    /// Row-major `[row][v_dim]`.
    pub v: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) k_dim: usize,
    pub(crate) v_dim: usize,
    /// Committed rows.
    len: usize,
    budget_tokens: usize,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize, k_dim: usize, v_dim: usize, budget_tokens: usize) -> KvCache {
        KvCache { layers: vec![LayerKv::default(); n_layers], k_dim, v_dim, len: 0, budget_tokens }
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

    /// Reserve room for `n` more rows after the committed ones, or refuse if over budget.
    pub(crate) fn check_room(&self, n: usize) -> Result<(), EngineError> {
        let needed = self.len + n;
        if needed > self.budget_tokens {
            return Err(EngineError::KvBudgetExceeded { needed, budget: self.budget_tokens });
        }
        Ok(())
    }

    /// Make layer storage hold exactly `len + n` rows (the batch's rows are written by the forward).
    pub(crate) fn stage_rows(&mut self, n: usize) {
        let rows = self.len + n;
        for l in &mut self.layers {
            l.k.resize(rows * self.k_dim, 0.0);
            l.v.resize(rows * self.v_dim, 0.0);
        }
    }

    /// Commit the rows a batch staged (a causal batch keeps all of them).
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.layers.iter().all(|l| l.k.len() == self.len * self.k_dim));
    }

    /// Drop everything after `len` committed tokens (staged rows included).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        self.len = len;
        for l in &mut self.layers {
            l.k.truncate(len * self.k_dim);
            l.v.truncate(len * self.v_dim);
        }
    }

    /// Keep one root-to-leaf path of the last (staged, uncommitted) tree batch: `path` lists batch
    /// node indices in order; their rows move to positions `len..len + path.len()` and the rest is
    /// dropped.
    pub fn accept_path(&mut self, path: &[usize]) -> Result<(), EngineError> {
        let staged = self.layers.first().map_or(0, |l| l.k.len() / self.k_dim.max(1)) - self.len;
        if let Some(&bad) = path.iter().find(|&&i| i >= staged) {
            return Err(EngineError::BadBatch {
                reason: format!("path node {bad} is outside the staged {staged} rows"),
            });
        }
        if path.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EngineError::BadBatch { reason: format!("path {path:?} is not increasing") });
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
