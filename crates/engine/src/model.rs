//! Layer slices: one shared transformer block, parameterised by [`ModelConfig`].
//!
//! A [`ModelSlice`] holds layers `[start, end)` of a model, plus the embedding table when
//! `start == 0` and the final norm and LM head when `end == n_layers`. Its [`ModelSlice::forward`]
//! takes token ids (head) or hidden states (any other stage), explicit positions, and either a
//! causal batch or a token tree, and returns hidden states or logits. The weights are immutable
//! and shared by every session; per-session state lives in a [`KvCache`].

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use specswarm_kernels::{QMatrix, axpy_f32, ggml_math};
use specswarm_proto::limits;

use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::kv::{KvCache, StagedRow};

/// What a batch feeds into the slice.
#[derive(Clone, Copy, Debug)]
pub enum StepInput<'a> {
    /// Token ids: only for the head slice (`start == 0`).
    Tokens(&'a [u32]),
    /// Hidden states, row-major `[n][d_model]`: for every other slice.
    Hidden(&'a [f32]),
}

/// One forward batch.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub input: StepInput<'a>,
    /// Position of each row. A causal batch must continue the cache (`kv.len() + i`); a tree node's
    /// position is `kv.len() + depth`.
    pub positions: &'a [u32],
    /// `None`: a causal chain whose rows are committed to the cache. `Some(parents)`: a token
    /// tree, `parents[i]` is the batch index of node `i`'s parent (`-1` for children of the
    /// committed prefix) and must be `< i`. A tree's rows stay staged until
    /// [`KvCache::accept_path`] or [`KvCache::discard_staged`].
    pub tree_parents: Option<&'a [i32]>,
}

impl Batch<'_> {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// One session's part of [`ModelSlice::forward_many`]: its cache, its batch, the output it wants.
#[derive(Debug)]
pub struct Step<'a> {
    pub kv: &'a mut KvCache,
    pub batch: Batch<'a>,
    pub want: Want,
}

/// A step that passed [`ModelSlice::forward`]'s checks, with its input rows.
struct Admitted<'a, 'b> {
    index: usize,
    step: &'a mut Step<'b>,
    x: Vec<f32>,
    vis: Visibility,
}

/// A step inside a running chunk: where its rows sit among the chunk's rows and what its
/// attention sees.
struct Seq<'a> {
    /// Index of the step in the caller's list.
    index: usize,
    kv: &'a mut KvCache,
    positions: &'a [u32],
    /// The step's rows among the chunk's rows.
    rows: Range<usize>,
    vis: Visibility,
    /// Committed rows of the cache (staged rows follow them, then the step's rows).
    base: usize,
    /// Rows staged before this step (a tree it grows).
    prior: usize,
    /// Attention in llama.cpp's batched prefill order ([`LoadOptions::llama_cpp_prefill`]).
    batched: bool,
    want: Want,
}

/// Which output the caller wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// The residual stream after the slice's last layer (before the final norm).
    Hidden,
    /// Logits of the last row only (prefill).
    LastLogits,
    /// Logits of every row (tree verification).
    AllLogits,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    /// Row-major `[rows][d_model]`.
    Hidden { data: Vec<f32>, rows: usize },
    /// Row-major `[rows][vocab]`.
    Logits { data: Vec<f32>, rows: usize },
}

impl StepOutput {
    pub fn data(&self) -> &[f32] {
        match self {
            StepOutput::Hidden { data, .. } | StepOutput::Logits { data, .. } => data,
        }
    }

    pub fn into_data(self) -> Vec<f32> {
        match self {
            StepOutput::Hidden { data, .. } | StepOutput::Logits { data, .. } => data,
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V projections (fused into one matrix when their formats agree).
    qkv: Projections,
    wo: QMatrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// Gate and up projections (fused when their formats agree).
    gate_up: Projections,
    w_down: QMatrix,
    post_ffn_norm: Option<Vec<f32>>,
}

/// Options for loading a slice.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Layers to load; `None` loads the whole model.
    pub layers: Option<Range<usize>>,
    /// Worker threads for this slice's compute (0: one per core).
    pub threads: usize,
    /// Also load the final norm and LM head when the slice does not end at the last layer: the
    /// target's own first K layers then form a self-draft model.
    pub with_head: bool,
    /// Compute the attention of a prompt prefill (a causal batch of 2+ rows on an empty cache)
    /// in the summation order of llama.cpp's batched f16 GEMM, as llama.cpp does, instead of
    /// the one-token order. Off by default: with it, the logits of a prefill no longer equal
    /// those of the same tokens decoded one by one (batch invariance holds from position 1 on
    /// only); speculative verification is unaffected (it never starts at position 0).
    pub llama_cpp_prefill: bool,
    /// Layers of the range not to load (a layer-skipping self-draft: the target with some middle
    /// layers left out, their residual passed through unchanged). Needs `with_head` or a range
    /// ending at the last layer; must leave at least one layer.
    pub skip_layers: Vec<usize>,
}

pub struct ModelSlice {
    cfg: Arc<ModelConfig>,
    range: Range<usize>,
    embed: Option<QMatrix>,
    layers: Vec<Layer>,
    /// The model layer index of each entry of `layers` (the range minus skipped layers).
    layer_ids: Vec<usize>,
    output_norm: Option<Vec<f32>>,
    lm_head: Option<QMatrix>,
    rope_factors: Option<Vec<f32>>,
    llama_cpp_prefill: bool,
    pool: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for ModelSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlice").field("arch", &self.cfg.arch_name).field("layers", &self.range).finish()
    }
}

impl ModelSlice {
    /// Load a slice from a GGUF file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<ModelSlice, EngineError> {
        Self::load_with_progress(path, opts, &mut |_, _| {})
    }

    /// Load, calling `progress(done, total)` after each tensor.
    pub fn load_with_progress(
        path: &Path,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ModelSlice, EngineError> {
        let file = GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(&file)?;
        let range = opts.layers.clone().unwrap_or(0..cfg.n_layers);
        if range.start >= range.end || range.end > cfg.n_layers {
            return Err(EngineError::BadLayerRange { start: range.start, end: range.end, n_layers: cfg.n_layers });
        }
        if let Some(&bad) = opts.skip_layers.iter().find(|l| !range.contains(l)) {
            return Err(EngineError::InvalidConfig {
                reason: format!("cannot skip layer {bad}: the slice holds layers {}..{}", range.start, range.end),
            });
        }
        let layer_ids: Vec<usize> = range.clone().filter(|l| !opts.skip_layers.contains(l)).collect();
        if layer_ids.is_empty() {
            return Err(EngineError::InvalidConfig { reason: "every layer of the slice is skipped".into() });
        }
        let (d, total) = (cfg.d_model, layer_ids.len() + 2);
        let mut done = 0;
        let mut tick = |progress: &mut dyn FnMut(usize, usize)| {
            done += 1;
            progress(done, total);
        };
        let is_head = range.start == 0;
        let is_tail = range.end == cfg.n_layers || opts.with_head;
        let embed = if is_head { Some(file.load_matrix("token_embd.weight", cfg.vocab_size, d)?) } else { None };
        tick(progress);
        let mut layers = Vec::with_capacity(layer_ids.len());
        for &l in &layer_ids {
            layers.push(load_layer(&file, &cfg, l)?);
            tick(progress);
        }
        let (output_norm, lm_head) = if is_tail {
            let norm = file.load_vector("output_norm.weight", d)?;
            let head = if file.tensor_info("output.weight").is_some() {
                file.load_matrix("output.weight", cfg.vocab_size, d)?
            } else if let Some(e) = &embed {
                e.clone()
            } else {
                file.load_matrix("token_embd.weight", cfg.vocab_size, d)?
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        tick(progress);
        let rope_factors = match file.tensor_info("rope_freqs.weight") {
            Some(_) => Some(file.load_vector("rope_freqs.weight", cfg.rope_dims / 2)?),
            None => None,
        };
        let threads =
            if opts.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { opts.threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("specswarm-compute-{i}"))
            .build()
            .map_err(|e| EngineError::InvalidConfig {
                reason: format!("cannot start {threads} compute threads: {e}"),
            })?;
        Ok(ModelSlice {
            cfg: Arc::new(cfg),
            range,
            embed,
            layers,
            layer_ids,
            output_norm,
            lm_head,
            rope_factors,
            llama_cpp_prefill: opts.llama_cpp_prefill,
            pool: Arc::new(pool),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn layers(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn is_head(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_tail(&self) -> bool {
        self.lm_head.is_some()
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// A fresh KV cache for this slice, holding at most `budget_tokens` tokens.
    pub fn new_cache(&self, budget_tokens: usize) -> KvCache {
        let budget = budget_tokens.min(limits::KV_TOKENS_PER_SESSION_MAX);
        KvCache::new(self.layers.len(), self.cfg.k_dim(), self.cfg.v_dim(), budget)
    }

    /// Run the batch through this slice's layers. See [`Batch`] for the position and tree rules.
    /// The one-step case of [`ModelSlice::forward_many`].
    pub fn forward(&self, kv: &mut KvCache, batch: &Batch<'_>, want: Want) -> Result<StepOutput, EngineError> {
        let mut steps = [Step { kv, batch: *batch, want }];
        self.run_steps(&mut steps, false).pop().expect("one result per step")
    }

    /// Grow the staged tree of `kv` by the tree batch `batch` (a [`ModelSlice::forward`] when
    /// nothing is staged). Its `tree_parents` index the staged rows first (`0..kv.staged_len()`)
    /// and then its own rows (`kv.staged_len() + i` is its node `i`), so nodes may hang under any
    /// node staged before; positions follow depth as in one tree batch, and each row's output is
    /// bit-identical to the same node computed in one tree batch with its ancestors (attention
    /// sees the same keys at the same positions). [`KvCache::accept_path`] then takes staged row
    /// indices. A drafter expands a tree level by level this way, one forward per level.
    pub fn forward_grow(&self, kv: &mut KvCache, batch: &Batch<'_>, want: Want) -> Result<StepOutput, EngineError> {
        if batch.tree_parents.is_none() {
            return Err(EngineError::BadBatch { reason: "only a tree batch can grow a staged tree".into() });
        }
        let mut steps = [Step { kv, batch: *batch, want }];
        self.run_steps(&mut steps, true).pop().expect("one result per step")
    }

    /// Run several sessions' batches through this slice's layers together: the weight matmuls
    /// (Q/K/V, O, gate/up, down, LM head) run once over the rows of every step, attention runs
    /// per step against its own cache with its own positions and tree. Each step is validated
    /// like a [`ModelSlice::forward`] of its own and gets its own result: an invalid step does
    /// not touch its cache or harm the others. Because every kernel is batch-invariant, each
    /// step's output is bit-identical to running it alone. Steps run in chunks of at most
    /// [`limits::FORWARD_BATCH_TOKENS_MAX`] rows.
    pub fn forward_many(&self, steps: &mut [Step<'_>]) -> Vec<Result<StepOutput, EngineError>> {
        self.run_steps(steps, false)
    }

    /// [`ModelSlice::forward_many`]; with `grow`, tree batches may grow a staged tree.
    fn run_steps(&self, steps: &mut [Step<'_>], grow: bool) -> Vec<Result<StepOutput, EngineError>> {
        let mut results: Vec<Option<Result<StepOutput, EngineError>>> = (0..steps.len()).map(|_| None).collect();
        let mut chunk = Vec::new();
        let mut chunk_rows = 0;
        for (index, step) in steps.iter_mut().enumerate() {
            let (x, vis) = match self.admit(step, grow) {
                Ok(admitted) => admitted,
                Err(e) => {
                    results[index] = Some(Err(e));
                    continue;
                }
            };
            let n = step.batch.len();
            if chunk_rows + n > limits::FORWARD_BATCH_TOKENS_MAX {
                for (index, out) in self.forward_chunk(std::mem::take(&mut chunk)) {
                    results[index] = Some(Ok(out));
                }
                chunk_rows = 0;
            }
            chunk_rows += n;
            chunk.push(Admitted { index, step, x, vis });
        }
        for (index, out) in self.forward_chunk(chunk) {
            results[index] = Some(Ok(out));
        }
        results.into_iter().map(|r| r.expect("every step is answered")).collect()
    }

    /// Check a step as [`ModelSlice::forward`] defines it; its input rows and attention pattern.
    fn admit(&self, step: &Step<'_>, grow: bool) -> Result<(Vec<f32>, Visibility), EngineError> {
        let (kv, batch) = (&*step.kv, &step.batch);
        let n = batch.len();
        let d = self.cfg.d_model;
        if n == 0 || n > limits::FORWARD_BATCH_TOKENS_MAX {
            return Err(EngineError::BadBatch {
                reason: format!("batch of {n} rows (must be 1..={})", limits::FORWARD_BATCH_TOKENS_MAX),
            });
        }
        if step.want != Want::Hidden && !self.is_tail() {
            return Err(EngineError::WrongSliceRole { what: "hold the LM head (it is not the tail)" });
        }
        let staged = kv.staged_len();
        if staged != 0 && !(grow && batch.tree_parents.is_some()) {
            return Err(EngineError::BadBatch {
                reason: format!("{staged} tree rows are still staged: accept a path or discard them first"),
            });
        }
        let vis = Visibility::build(kv.len(), kv.staged(), batch)?;
        let max_pos = batch.positions.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= self.cfg.context_len {
            return Err(EngineError::ContextExceeded { needed: max_pos + 1, context: self.cfg.context_len });
        }
        kv.check_room(n)?;
        let x = match batch.input {
            StepInput::Tokens(ids) => {
                let embed = self
                    .embed
                    .as_ref()
                    .ok_or(EngineError::WrongSliceRole { what: "take token ids (it is not the head)" })?;
                if ids.len() != n {
                    return Err(EngineError::BadBatch { reason: format!("{} tokens for {n} positions", ids.len()) });
                }
                let mut x = vec![0f32; n * d];
                for (row, &id) in x.chunks_exact_mut(d).zip(ids) {
                    if id as usize >= self.cfg.vocab_size {
                        return Err(EngineError::TokenOutOfRange { id, vocab: self.cfg.vocab_size });
                    }
                    embed.dequantize_row(id as usize, row);
                }
                if let Some(s) = self.cfg.embed_scale {
                    x.iter_mut().for_each(|v| *v *= s);
                }
                x
            }
            StepInput::Hidden(h) => {
                if self.is_head() {
                    return Err(EngineError::WrongSliceRole { what: "take hidden states (it is the head)" });
                }
                if h.len() != n * d {
                    return Err(EngineError::BadBatch {
                        reason: format!("hidden input of {} values, expected {n}×{d}", h.len()),
                    });
                }
                if let Some(bad) = h.iter().position(|v| !v.is_finite()) {
                    return Err(EngineError::BadBatch { reason: format!("hidden input value {bad} is not finite") });
                }
                h.to_vec()
            }
        };
        Ok((x, vis))
    }

    /// Run admitted steps (at most `FORWARD_BATCH_TOKENS_MAX` rows together) as one batch; each
    /// step's output with its index.
    fn forward_chunk(&self, chunk: Vec<Admitted<'_, '_>>) -> Vec<(usize, StepOutput)> {
        if chunk.is_empty() {
            return Vec::new();
        }
        let d = self.cfg.d_model;
        let mut x = Vec::with_capacity(chunk.iter().map(|a| a.x.len()).sum());
        let mut positions = Vec::with_capacity(x.capacity() / d);
        let mut seqs = Vec::with_capacity(chunk.len());
        for Admitted { index, step, x: rows, vis } in chunk {
            let start = positions.len();
            x.extend_from_slice(&rows);
            positions.extend_from_slice(step.batch.positions);
            let n = step.batch.len();
            let prior = step.kv.staged_len();
            step.kv.stage_rows(n);
            let base = step.kv.len();
            let batched = self.llama_cpp_prefill && matches!(vis, Visibility::Causal) && base == 0 && n >= 2;
            seqs.push(Seq {
                index,
                kv: &mut *step.kv,
                positions: step.batch.positions,
                rows: start..start + n,
                vis,
                base,
                prior,
                batched,
                want: step.want,
            });
        }
        self.pool.install(|| {
            let rope = RopeTables::new(&self.cfg, self.rope_factors.as_deref(), &positions);
            for (slot, layer) in self.layers.iter().enumerate() {
                self.layer_forward(slot, layer, &mut seqs, &rope, &mut x);
            }
        });
        // Rows whose logits are wanted, in step order, through one LM head matmul.
        let mut head_rows = Vec::new();
        for s in &seqs {
            let rows = match s.want {
                Want::Hidden => s.rows.end..s.rows.end,
                Want::LastLogits => s.rows.end - 1..s.rows.end,
                Want::AllLogits => s.rows.clone(),
            };
            head_rows.extend_from_slice(&x[rows.start * d..rows.end * d]);
        }
        let logits = if head_rows.is_empty() { Vec::new() } else { self.logits(&head_rows) };
        let vocab = self.cfg.vocab_size;
        let mut at = 0;
        let mut outs = Vec::with_capacity(seqs.len());
        for s in seqs {
            let n = s.rows.len();
            if let Visibility::Tree(lists) = &s.vis {
                s.kv.stage(lists.iter().map(|l| {
                    let &(_, position) = l.last().expect("a node sees itself");
                    let parent = if l.len() >= 2 { l[l.len() - 2].0 as i32 } else { -1 };
                    StagedRow { parent, position }
                }));
            } else {
                s.kv.commit(n);
            }
            let out = match s.want {
                Want::Hidden => StepOutput::Hidden { data: x[s.rows.start * d..s.rows.end * d].to_vec(), rows: n },
                Want::LastLogits | Want::AllLogits => {
                    let rows = if s.want == Want::LastLogits { 1 } else { n };
                    at += rows;
                    StepOutput::Logits { data: logits[(at - rows) * vocab..at * vocab].to_vec(), rows }
                }
            };
            outs.push((s.index, out));
        }
        outs
    }

    /// The final norm and LM head applied to `hidden` (rows of `d_model` residual values): the
    /// logits the tail computes. Only a slice that holds the head can do this.
    pub fn head_logits(&self, hidden: &[f32]) -> Result<Vec<f32>, EngineError> {
        if !self.is_tail() {
            return Err(EngineError::WrongSliceRole { what: "hold the LM head (it is not the tail)" });
        }
        if hidden.is_empty() || !hidden.len().is_multiple_of(self.cfg.d_model) {
            return Err(EngineError::BadBatch {
                reason: format!("{} hidden values are not whole rows of {}", hidden.len(), self.cfg.d_model),
            });
        }
        Ok(self.logits(hidden))
    }

    fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let (d, vocab) = (self.cfg.d_model, self.cfg.vocab_size);
        let rows = hidden.len() / d;
        let norm = self.output_norm.as_ref().expect("tail slice has a final norm");
        let head = self.lm_head.as_ref().expect("tail slice has an LM head");
        let mut h = hidden.to_vec();
        for row in h.chunks_exact_mut(d) {
            rms_norm(row, norm, self.cfg.rms_eps);
        }
        let mut out = vec![0f32; rows * vocab];
        self.pool.install(|| head.matmul(&h, rows, &mut out));
        if let Some(c) = self.cfg.final_softcap {
            out.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
        }
        out
    }

    /// One transformer block over the rows of every step: norm → attention (per step, against its
    /// own cache) → residual → norm → MLP → residual.
    fn layer_forward(&self, slot: usize, w: &Layer, seqs: &mut [Seq<'_>], rope: &RopeTables, x: &mut [f32]) {
        let cfg = &*self.cfg;
        let d = cfg.d_model;
        let n = x.len() / d;
        let layer = self.layer_ids[slot];

        let mut h = x.to_vec();
        h.chunks_exact_mut(d).for_each(|r| rms_norm(r, &w.attn_norm, cfg.rms_eps));
        let (k_dim, v_dim) = (cfg.k_dim(), cfg.v_dim());
        let mut q = vec![0f32; n * cfg.q_dim()];
        let mut k = vec![0f32; n * k_dim];
        let mut v = vec![0f32; n * v_dim];
        w.qkv.apply(&h, n, &mut [&mut q, &mut k, &mut v]);
        add_bias(&mut q, w.bq.as_deref());
        add_bias(&mut k, w.bk.as_deref());
        add_bias(&mut v, w.bv.as_deref());
        let hd = cfg.head_dim;
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            q.chunks_exact_mut(hd).for_each(|r| rms_norm(r, qn, cfg.rms_eps));
            k.chunks_exact_mut(hd).for_each(|r| rms_norm(r, kn, cfg.rms_eps));
        }
        let sliding = cfg.is_sliding(layer);
        let table = if sliding { &rope.local } else { &rope.global };
        rope.apply(table, &mut q, cfg.n_heads, hd);
        rope.apply(table, &mut k, cfg.n_kv_heads, hd);
        round_f16(&mut k);
        round_f16(&mut v);
        if cfg.scale_query {
            q.iter_mut().for_each(|v| *v *= cfg.attn_scale);
        }
        round_f16(&mut q);
        for s in seqs.iter_mut() {
            let lkv = &mut s.kv.layers[slot];
            let at = s.base + s.prior;
            lkv.k[at * k_dim..].copy_from_slice(&k[s.rows.start * k_dim..s.rows.end * k_dim]);
            lkv.v[at * v_dim..].copy_from_slice(&v[s.rows.start * v_dim..s.rows.end * v_dim]);
        }

        let attn_dim = cfg.n_heads * cfg.head_dim_v;
        let mut attn = vec![0f32; n * attn_dim];
        let window = if sliding { cfg.sliding_window } else { None };
        let q_dim = cfg.q_dim();
        let mut outs = Vec::with_capacity(seqs.len());
        let mut rest = attn.as_mut_slice();
        for s in seqs.iter() {
            let (out, tail) = rest.split_at_mut(s.rows.len() * attn_dim);
            outs.push((s, out));
            rest = tail;
        }
        let run = |(s, out): (&Seq<'_>, &mut [f32])| {
            let q = &q[s.rows.start * q_dim..s.rows.end * q_dim];
            attention(cfg, q, &s.kv.layers[slot], s.base, s.positions, &s.vis, window, s.batched, out);
        };
        if outs.len() == 1 {
            outs.into_iter().for_each(run);
        } else {
            outs.into_par_iter().for_each(run);
        }

        let mut o = vec![0f32; n * d];
        w.wo.matmul(&attn, n, &mut o);
        if let Some(pn) = &w.post_attn_norm {
            o.chunks_exact_mut(d).for_each(|r| rms_norm(r, pn, cfg.rms_eps));
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

        h.copy_from_slice(x);
        h.chunks_exact_mut(d).for_each(|r| rms_norm(r, &w.ffn_norm, cfg.rms_eps));
        let f = cfg.ffn_dim;
        let mut g = vec![0f32; n * f];
        let mut u = vec![0f32; n * f];
        w.gate_up.apply(&h, n, &mut [&mut g, &mut u]);
        // Per row, so that a row's arithmetic (SIMD body, scalar tail) never depends on its
        // neighbours.
        for (g, u) in g.chunks_exact_mut(f).zip(u.chunks_exact(f)) {
            match cfg.activation {
                Activation::Silu => ggml_math::silu_mul(g, u),
                Activation::GeluTanh => g.iter_mut().zip(u).for_each(|(a, b)| *a = gelu_tanh(*a) * b),
            }
        }
        w.w_down.matmul(&g, n, &mut o);
        if let Some(pn) = &w.post_ffn_norm {
            o.chunks_exact_mut(d).for_each(|r| rms_norm(r, pn, cfg.rms_eps));
        }
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
}

fn load_layer(file: &GgufFile, cfg: &ModelConfig, l: usize) -> Result<Layer, EngineError> {
    let t = |s: &str| format!("blk.{l}.{s}");
    let d = cfg.d_model;
    let vec_opt = |name: &str, len: usize| -> Result<Option<Vec<f32>>, EngineError> {
        match file.tensor_info(&t(name)) {
            Some(_) => file.load_vector(&t(name), len).map(Some),
            None => Ok(None),
        }
    };
    let (q_norm, k_norm) = if cfg.qk_norm {
        (
            Some(file.load_vector(&t("attn_q_norm.weight"), cfg.head_dim)?),
            Some(file.load_vector(&t("attn_k_norm.weight"), cfg.head_dim)?),
        )
    } else {
        (None, None)
    };
    let (post_attn_norm, post_ffn_norm) = if cfg.post_norms {
        (
            Some(file.load_vector(&t("post_attention_norm.weight"), d)?),
            Some(file.load_vector(&t("post_ffw_norm.weight"), d)?),
        )
    } else {
        (None, None)
    };
    Ok(Layer {
        attn_norm: file.load_vector(&t("attn_norm.weight"), d)?,
        qkv: Projections::new(vec![
            file.load_matrix(&t("attn_q.weight"), cfg.q_dim(), d)?,
            file.load_matrix(&t("attn_k.weight"), cfg.k_dim(), d)?,
            file.load_matrix(&t("attn_v.weight"), cfg.v_dim(), d)?,
        ]),
        wo: file.load_matrix(&t("attn_output.weight"), d, cfg.n_heads * cfg.head_dim_v)?,
        bq: vec_opt("attn_q.bias", cfg.q_dim())?,
        bk: vec_opt("attn_k.bias", cfg.k_dim())?,
        bv: vec_opt("attn_v.bias", cfg.v_dim())?,
        q_norm,
        k_norm,
        post_attn_norm,
        ffn_norm: file.load_vector(&t("ffn_norm.weight"), d)?,
        gate_up: Projections::new(vec![
            file.load_matrix(&t("ffn_gate.weight"), cfg.ffn_dim, d)?,
            file.load_matrix(&t("ffn_up.weight"), cfg.ffn_dim, d)?,
        ]),
        w_down: file.load_matrix(&t("ffn_down.weight"), d, cfg.ffn_dim)?,
        post_ffn_norm,
    })
}

/// Several projections of the same input. When all share a format their rows are stacked into
/// one matrix, so the input is quantized once and one parallel region computes all of them.
enum Projections {
    Fused { m: QMatrix, rows: Vec<usize> },
    Separate(Vec<QMatrix>),
}

impl Projections {
    fn new(ms: Vec<QMatrix>) -> Projections {
        let ty = ms[0].ty();
        if ms.iter().any(|m| m.ty() != ty) {
            return Projections::Separate(ms);
        }
        let rows: Vec<usize> = ms.iter().map(QMatrix::rows).collect();
        let data: Vec<u8> = ms.iter().flat_map(|m| m.data().iter().copied()).collect();
        let m = QMatrix::new(ty, rows.iter().sum(), ms[0].cols(), data).expect("stacked rows have the parts' layout");
        Projections::Fused { m, rows }
    }

    /// `outs[i] = W_i · x` for `n` rows of `x`, each `outs[i]` laid out `[n][rows_i]`.
    fn apply(&self, x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        match self {
            Projections::Separate(ms) => {
                for (m, out) in ms.iter().zip(outs.iter_mut()) {
                    m.matmul(x, n, out);
                }
            }
            Projections::Fused { m, rows } => {
                let total = m.rows();
                let mut tmp = vec![0f32; n * total];
                m.matmul(x, n, &mut tmp);
                for (t, row) in tmp.chunks_exact(total).enumerate() {
                    let mut at = 0;
                    for (out, &r) in outs.iter_mut().zip(rows) {
                        out[t * r..(t + 1) * r].copy_from_slice(&row[at..at + r]);
                        at += r;
                    }
                }
            }
        }
    }
}

/// Which rows each batch row attends to (besides the committed prefix).
enum Visibility {
    /// Row `i` sees rows `0..=i`.
    Causal,
    /// Row `i` sees its ancestors and itself: `(staged row, position)` from the root down, where
    /// staged row `r` is cache row `base + r` (rows staged before the batch, then the batch's).
    Tree(Vec<Vec<(u32, u32)>>),
}

impl Visibility {
    fn build(base: usize, staged: &[StagedRow], batch: &Batch<'_>) -> Result<Visibility, EngineError> {
        let n = batch.len();
        match batch.tree_parents {
            None => {
                for (i, &p) in batch.positions.iter().enumerate() {
                    if p as usize != base + i {
                        return Err(EngineError::PositionMismatch {
                            index: i,
                            expected: (base + i) as u64,
                            got: p.into(),
                        });
                    }
                }
                Ok(Visibility::Causal)
            }
            Some(parents) => {
                if parents.len() != n {
                    return Err(EngineError::BadBatch {
                        reason: format!("{} tree parents for {n} nodes", parents.len()),
                    });
                }
                let prior = staged.len();
                // The ancestry of a staged row, root first.
                let staged_path = |mut r: usize| {
                    let mut path = vec![(r as u32, staged[r].position)];
                    while staged[r].parent >= 0 {
                        r = staged[r].parent as usize;
                        path.push((r as u32, staged[r].position));
                    }
                    path.reverse();
                    path
                };
                let mut lists: Vec<Vec<(u32, u32)>> = Vec::with_capacity(n);
                for (i, &p) in parents.iter().enumerate() {
                    let mut list = if p < 0 {
                        Vec::new()
                    } else if (p as usize) < prior {
                        staged_path(p as usize)
                    } else if (p as usize) < prior + i {
                        lists[p as usize - prior].clone()
                    } else {
                        return Err(EngineError::BadBatch {
                            reason: format!(
                                "node {i} has parent {p}, parents must precede their children ({prior} rows staged before)"
                            ),
                        });
                    };
                    let expected = (base + list.len()) as u64;
                    if u64::from(batch.positions[i]) != expected {
                        return Err(EngineError::PositionMismatch {
                            index: i,
                            expected,
                            got: batch.positions[i].into(),
                        });
                    }
                    list.push(((prior + i) as u32, batch.positions[i]));
                    lists.push(list);
                }
                Ok(Visibility::Tree(lists))
            }
        }
    }
}

type AttnScratch = (Vec<f32>, Vec<f32>, Vec<bool>);
type GroupScratch = (Vec<(usize, usize)>, Vec<f32>, Vec<f32>, Vec<usize>);

thread_local! {
    /// Per-thread attention buffers: masked scores, slot accumulators, filled slots.
    static SCRATCH: std::cell::Cell<AttnScratch> = const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// Per-thread buffers of the grouped attention: keys, masked scores and probabilities per
    /// head, value row per position.
    static GSCRATCH: std::cell::Cell<GroupScratch> =
        const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// Attention of every (row, head) as llama.cpp's CPU backend computes it (f16 K/V cache, no
/// flash attention). Scores are f16 dot products of the f16-rounded query and keys; the softmax
/// runs over cache slots `0..hi` with masked slots at -inf, ggml's SIMD `exp`, and a sum per 16
/// slots into an f64; probabilities are rounded to f16 and each output element is again an f16
/// dot product over the slots (V transposed). The f16 dot products follow `ggml_vec_dot_f16`
/// (one-token order) or, with `batched`, llamafile's tinyBLAS (see
/// [`LoadOptions::llama_cpp_prefill`]).
#[allow(clippy::too_many_arguments)]
fn attention(
    cfg: &ModelConfig,
    q: &[f32],
    lkv: &crate::kv::LayerKv,
    base: usize,
    positions: &[u32],
    vis: &Visibility,
    window: Option<usize>,
    batched: bool,
    out: &mut [f32],
) {
    let (nh, hd, hdv) = (cfg.n_heads, cfg.head_dim, cfg.head_dim_v);
    let group = nh / cfg.n_kv_heads;
    let (k_dim, v_dim) = (cfg.k_dim(), cfg.v_dim());
    let work = |idx: usize, o: &mut [f32]| {
        let (i, h) = (idx / nh, idx % nh);
        let kvh = h / group;
        let qv = &q[(i * nh + h) * hd..][..hd];
        let p = positions[i] as usize;
        let visible = |kp: usize| window.is_none_or(|w| p - kp < w);
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w)).min(base);
        // (cache row, position) of every visible key, in ascending position. Softmax slots and
        // dot-product lanes follow the key's position (llama.cpp's cache cell of a single
        // sequence), so a tree node sees exactly the arithmetic of its path decoded plainly.
        let mut keys: Vec<(usize, usize)> = (lo..base).map(|r| (r, r)).collect();
        match vis {
            Visibility::Causal => keys
                .extend((0..=i).filter(|&j| visible(positions[j] as usize)).map(|j| (base + j, positions[j] as usize))),
            Visibility::Tree(lists) => keys.extend(
                lists[i].iter().map(|&(r, kp)| (base + r as usize, kp as usize)).filter(|&(_, kp)| visible(kp)),
            ),
        }
        let hi = keys.last().map_or(0, |&(_, kp)| kp + 1);
        let mut guard = SCRATCH.with(|s| s.take());
        let (wp, acc, filled) = &mut guard;
        wp.clear();
        wp.resize(hi.next_multiple_of(16), f32::NEG_INFINITY);
        let dot = if batched { ggml_math::dot_f16_batched } else { ggml_math::dot_f16 };
        for &(r, kp) in &keys {
            let s = dot(qv, &lkv.k[r * k_dim + kvh * hd..][..hd]);
            let s = if cfg.scale_query { s } else { s * cfg.attn_scale };
            wp[kp] = match cfg.attn_softcap {
                Some(c) => (s / c).tanh() * c,
                None => s,
            };
        }
        let max = wp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = ggml_math::exp_sum(wp, max);
        let inv = (1.0 / sum) as f32;
        // Slot accumulators of the f16 dot products over key positions, per output element:
        // ggml_vec_dot_f16 (slot = position % 64) or, batched, tinyBLAS (position % 16).
        let width = if batched { 16 } else { 64 };
        // Slots are cleared when first used (at most `keys` of them).
        let slots = hi.min(width);
        if acc.len() < slots * hdv {
            acc.resize(slots * hdv, 0.0);
        }
        filled.clear();
        filled.resize(slots, false);
        for &(r, kp) in &keys {
            let p = half::f16::from_f32(wp[kp] * inv).to_f32();
            if p == 0.0 {
                continue; // adds +-0 to every slot: no change
            }
            let sl = kp % width;
            let a = &mut acc[sl * hdv..][..hdv];
            let v = &lkv.v[r * v_dim + kvh * hdv..][..hdv];
            if !filled[sl] {
                a.fill(0.0);
                filled[sl] = true;
            }
            // An FMA equals ggml's add of the (exact) f16 x f16 product.
            axpy_f32(p, v, a);
        }
        ggml_math::reduce_slot_rows(acc, filled, width, hdv, o);
        SCRATCH.with(|s| s.set(guard));
    };
    let n_rows = positions.len() * nh;
    // Every cache row written so far (committed, staged before, this batch's).
    let keys = lkv.v.len() / v_dim.max(1);
    let parallel = n_rows * keys * hd >= 1 << 15;
    // The query heads of one KV head together: each key and value row is loaded once for the
    // group, every (row, head) keeps its exact operation sequence. Zero probabilities then add
    // their +-0 products, which leaves the slots unchanged only for finite values, so the grouped
    // path requires a finite V cache.
    let width = if batched { 16 } else { 64 };
    if hd.is_multiple_of(if batched { 16 } else { 64 })
        && hdv.is_multiple_of(16)
        && group <= 64
        && specswarm_kernels::simd_available()
        && lkv.v[..keys * v_dim].iter().all(|v| v.is_finite())
    {
        let gwork = |idx: usize, o: &mut [f32]| {
            let (i, kvh) = (idx / cfg.n_kv_heads, idx % cfg.n_kv_heads);
            let qg = &q[(i * nh + kvh * group) * hd..][..group * hd];
            let p = positions[i] as usize;
            let visible = |kp: usize| window.is_none_or(|w| p - kp < w);
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w)).min(base);
            let mut guard = GSCRATCH.with(|s| s.take());
            let (keys, wp, pr, rows) = &mut guard;
            keys.clear();
            keys.extend((lo..base).map(|r| (r, r)));
            match vis {
                Visibility::Causal => keys.extend(
                    (0..=i).filter(|&j| visible(positions[j] as usize)).map(|j| (base + j, positions[j] as usize)),
                ),
                Visibility::Tree(lists) => keys.extend(
                    lists[i].iter().map(|&(r, kp)| (base + r as usize, kp as usize)).filter(|&(_, kp)| visible(kp)),
                ),
            }
            let hi = keys.last().map_or(0, |&(_, kp)| kp + 1);
            let (n16, nw) = (hi.next_multiple_of(16), hi.next_multiple_of(width));
            wp.clear();
            wp.resize(group * n16, f32::NEG_INFINITY);
            pr.clear();
            pr.resize(group * nw, 0.0);
            rows.clear();
            // Positions without a key get probability 0 and any (finite) value row.
            let any_row = keys.first().map_or(0, |&(r, _)| r * v_dim + kvh * hdv);
            rows.resize(nw, any_row);
            let mut s = [0f32; 64];
            let dots = if batched { ggml_math::dot_f16_batched_heads } else { ggml_math::dot_f16_heads };
            for &(r, kp) in keys.iter() {
                dots(qg, &lkv.k[r * k_dim + kvh * hd..][..hd], &mut s[..group]);
                for (g, &s) in s[..group].iter().enumerate() {
                    let s = if cfg.scale_query { s } else { s * cfg.attn_scale };
                    wp[g * n16 + kp] = match cfg.attn_softcap {
                        Some(c) => (s / c).tanh() * c,
                        None => s,
                    };
                }
                rows[kp] = r * v_dim + kvh * hdv;
            }
            for g in 0..group {
                let w = &mut wp[g * n16..][..n16];
                let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = ggml_math::exp_sum(w, max);
                let inv = (1.0 / sum) as f32;
                let pg = &mut pr[g * nw..][..nw];
                for &(_, kp) in keys.iter() {
                    pg[kp] = half::f16::from_f32(w[kp] * inv).to_f32();
                }
            }
            ggml_math::slot_sum_heads(width, pr, nw, &lkv.v, rows, hdv, o);
            GSCRATCH.with(|s| s.set(guard));
        };
        if parallel {
            out.par_chunks_exact_mut(group * hdv).enumerate().for_each(|(idx, o)| gwork(idx, o));
        } else {
            out.chunks_exact_mut(group * hdv).enumerate().for_each(|(idx, o)| gwork(idx, o));
        }
        return;
    }
    if !parallel {
        out.chunks_exact_mut(hdv).enumerate().for_each(|(idx, o)| work(idx, o));
    } else {
        out.par_chunks_exact_mut(hdv).enumerate().for_each(|(idx, o)| work(idx, o));
    }
}

/// cos/sin per (row, frequency) for the two RoPE bases a model may use.
struct RopeTables {
    style: RopeStyle,
    dims: usize,
    global: Vec<(f32, f32)>,
    local: Vec<(f32, f32)>,
}

impl RopeTables {
    fn new(cfg: &ModelConfig, factors: Option<&[f32]>, positions: &[u32]) -> RopeTables {
        let table = |base: f32, scale: f32| {
            let half = cfg.rope_dims / 2;
            let theta_scale = base.powf(-2.0 / cfg.rope_dims as f32);
            let mut t = Vec::with_capacity(positions.len() * half);
            for &p in positions {
                // Same recurrence as the reference implementation: theta_i = p * theta_scale^i.
                let mut theta = p as f32 / scale;
                for i in 0..half {
                    let th = factors.map_or(theta, |f| theta / f[i]);
                    t.push((th.cos(), th.sin()));
                    theta *= theta_scale;
                }
            }
            t
        };
        let global = table(cfg.rope_base, cfg.rope_scale);
        let local = if cfg.rope_base_local != cfg.rope_base || cfg.rope_scale != 1.0 {
            table(cfg.rope_base_local, 1.0)
        } else {
            global.clone()
        };
        RopeTables { style: cfg.rope_style, dims: cfg.rope_dims, global, local }
    }

    /// Rotate every head of every row of `x` (`[rows][heads][hd]`).
    fn apply(&self, table: &[(f32, f32)], x: &mut [f32], heads: usize, hd: usize) {
        let half = self.dims / 2;
        for (row, cs_row) in x.chunks_exact_mut(heads * hd).zip(table.chunks_exact(half)) {
            for head in row.chunks_exact_mut(hd) {
                ggml_math::rope_rotate(head, cs_row, self.style == RopeStyle::Neox);
            }
        }
    }
}

fn round_f16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        x.chunks_exact_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
}

/// RMS norm with the sum of squares in f64 (as the reference implementation does).
pub(crate) fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (ss / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    x.iter_mut().zip(w).for_each(|(v, w)| *v = *v * scale * w);
}

fn gelu_tanh_exact(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// GELU (tanh form) through a table indexed by the input rounded to f16, with the result
/// rounded to f16, as the reference implementation evaluates it: ~20× cheaper than `tanh`, and
/// numerically closer to llama.cpp.
fn gelu_tanh(x: f32) -> f32 {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::f16::from_f32(gelu_tanh_exact(half::f16::from_bits(bits).to_f32())).to_f32())
            .collect()
    });
    table[half::f16::from_f32(x).to_bits() as usize]
}
