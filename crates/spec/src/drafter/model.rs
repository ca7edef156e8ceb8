//! Drafting with a model: a small model of the same family, or the target's own first K layers
//! with its final norm and LM head (`self:K`).

use std::path::Path;
use std::sync::Arc;

use specswarm_engine::kv::KvCache;
use specswarm_engine::model::{Batch, LoadOptions, ModelSlice, StepInput, Want};

use super::lens::Lens;
use super::{DraftBudget, Drafter};
use crate::SpecError;
use crate::tree::DraftTree;

/// A draft model with its own KV cache, kept in step with the sequences it is shown. The
/// weights (and a lens) are shared: [`ModelDrafter::share`] makes another drafter over them with
/// a cache of its own, one per request.
pub struct ModelDrafter {
    name: String,
    model: Arc<ModelSlice>,
    kv: KvCache,
    /// Tokens whose keys and values `kv` holds.
    cached: Vec<u32>,
    /// Stop extending the spine once its cumulative draft probability falls below this.
    min_path_prob: f32,
    /// For `lens:K`: the map from the last layer's residual to the final residual, applied
    /// before the final norm and LM head.
    lens: Option<Arc<Lens>>,
}

impl ModelDrafter {
    /// A separate draft model; its vocabulary must be the target's.
    pub fn from_file(path: &Path, target_vocab: usize, threads: usize) -> Result<ModelDrafter, SpecError> {
        let model =
            ModelSlice::load(path, &LoadOptions { layers: None, threads, with_head: true, ..Default::default() })?;
        let vocab = model.config().vocab_size;
        if vocab != target_vocab {
            return Err(SpecError::VocabularyMismatch { draft: vocab, target: target_vocab });
        }
        Ok(Self::new(format!("model:{}", path.display()), model))
    }

    /// The target's first `k` layers plus its final norm and LM head.
    pub fn self_draft(
        target_path: &Path,
        k: usize,
        n_layers: usize,
        threads: usize,
    ) -> Result<ModelDrafter, SpecError> {
        if k == 0 || k >= n_layers {
            return Err(SpecError::InvalidSetting(format!(
                "self-draft needs 1 <= K < {n_layers} (the target's layer count), got K = {k}"
            )));
        }
        let model = ModelSlice::load(
            target_path,
            &LoadOptions { layers: Some(0..k), threads, with_head: true, ..Default::default() },
        )?;
        Ok(Self::new(format!("self:{k}"), model))
    }

    /// The whole target with the layers in `skip` left out (their residual passes through):
    /// a layer-skipping self-draft (Draft & Verify, SWIFT). Costs `1 - skip/n_layers` of the
    /// target per token and keeps its first and last layers, which matter most.
    pub fn skip_draft(target_path: &Path, skip: &[usize], threads: usize) -> Result<ModelDrafter, SpecError> {
        let model = ModelSlice::load(
            target_path,
            &LoadOptions { threads, with_head: true, skip_layers: skip.to_vec(), ..Default::default() },
        )?;
        Ok(Self::new(format!("skip:{}", format_layers(skip)), model))
    }

    /// The target's first `lens.k` layers, then `lens`, then its final norm and LM head.
    pub fn lens_draft(target_path: &Path, lens: Lens, threads: usize) -> Result<ModelDrafter, SpecError> {
        let file = specswarm_engine::gguf::GgufFile::open(target_path)?;
        let n_layers = specswarm_engine::config::ModelConfig::from_gguf(&file)?.n_layers;
        let mut drafter = Self::self_draft(target_path, lens.k, n_layers, threads)?;
        if lens.d != drafter.model.config().d_model {
            return Err(SpecError::InvalidSetting(format!(
                "lens width {} differs from the model's {}",
                lens.d,
                drafter.model.config().d_model
            )));
        }
        drafter.name = format!("lens:{}", lens.k);
        drafter.lens = Some(Arc::new(lens));
        Ok(drafter)
    }

    fn new(name: String, model: ModelSlice) -> ModelDrafter {
        let kv = model.new_cache(model.config().context_len);
        ModelDrafter { name, model: Arc::new(model), kv, cached: Vec::new(), min_path_prob: 0.05, lens: None }
    }

    /// Another drafter over the same weights (and lens), with an empty cache of its own: what
    /// a server hands each concurrent request. The forwards of several drafters may run at once
    /// (they queue on the model's thread pool).
    pub fn share(&self) -> ModelDrafter {
        ModelDrafter {
            name: self.name.clone(),
            model: Arc::clone(&self.model),
            kv: self.model.new_cache(self.model.config().context_len),
            cached: Vec::new(),
            min_path_prob: self.min_path_prob,
            lens: self.lens.clone(),
        }
    }

    /// Run `tokens` at the next positions and return the logits after the last one.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SpecError> {
        let start = self.cached.len() as u32;
        let pos: Vec<u32> = (start..start + tokens.len() as u32).collect();
        let batch = Batch { input: StepInput::Tokens(tokens), positions: &pos, tree_parents: None };
        let logits = self.logits(&batch, false)?;
        self.cached.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Run `batch` on the drafter's cache: a causal step (`grow == false`: the logits of its
    /// last row) or nodes grown under its staged tree (the logits of every row); through the
    /// lens when there is one.
    fn logits(&mut self, batch: &Batch<'_>, grow: bool) -> Result<Vec<f32>, SpecError> {
        let (model, kv) = (&self.model, &mut self.kv);
        let mut forward =
            |want| if grow { model.forward_grow(kv, batch, want) } else { model.forward(kv, batch, want) };
        Ok(match &self.lens {
            None => forward(if grow { Want::AllLogits } else { Want::LastLogits })?.into_data(),
            Some(lens) => {
                let hidden = forward(Want::Hidden)?.into_data();
                let rows = if grow { &hidden[..] } else { &hidden[hidden.len() - lens.d..] };
                let mapped: Vec<f32> = rows.chunks_exact(lens.d).flat_map(|h| lens.apply(h)).collect();
                model.head_logits(&mapped)?
            }
        })
    }

    /// Logits after `seq`, reusing the cached prefix.
    fn sync(&mut self, seq: &[u32]) -> Result<Vec<f32>, SpecError> {
        let common = self.cached.iter().zip(seq).take_while(|(a, b)| a == b).count().min(seq.len() - 1);
        self.kv.truncate(common);
        self.cached.truncate(common);
        self.step(&seq[common..])
    }
}

/// Layer lists as written on the command line: `4-7+12` is layers 4, 5, 6, 7 and 12.
pub fn parse_layers(text: &str) -> Result<Vec<usize>, SpecError> {
    let bad = || SpecError::InvalidSetting(format!("bad layer list {text:?}: use e.g. 4-7+12"));
    let mut out = Vec::new();
    for part in text.split('+') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if a > b || b - a > 4096 {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The inverse of [`parse_layers`]: runs of consecutive layers as ranges.
pub fn format_layers(layers: &[usize]) -> String {
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { sorted[i].to_string() } else { format!("{}-{}", sorted[i], sorted[j]) });
        i = j + 1;
    }
    parts.join("+")
}

/// Softmax probabilities of the `k` most likely tokens, best first (ties: lower id first). One
/// pass keeps the best `k` logits; the normaliser is a vectorised sum of exponentials (a tree
/// draft takes this for every expanded node, over the whole vocabulary).
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (best.len() == k && best.last().is_some_and(|&(m, _)| l <= m)) {
            continue;
        }
        let at = best.partition_point(|&(m, _)| m >= l);
        best.insert(at, (l, i as u32));
        best.truncate(k);
    }
    let max = best.first().map_or(0.0, |&(m, _)| m);
    let mut scratch = logits.to_vec();
    let z = specswarm_kernels::ggml_math::exp_sum(&mut scratch, max);
    best.into_iter().map(|(_, i)| (i, (f64::from(scratch[i as usize]) / z) as f32)).collect()
}

/// A node of a tree being drafted.
struct Candidate {
    token: u32,
    /// Candidate index of the parent (`None`: a child of the root).
    parent: Option<usize>,
    /// Draft probability given the parent, and along the path from the root.
    prob: f32,
    path_prob: f32,
    depth: usize,
    /// Its staged row in the drafter's cache once expanded.
    row: Option<usize>,
}

impl ModelDrafter {
    /// Logits of each of `tokens` grown as tree nodes under the drafter's staged tree
    /// (`parents` index staged rows, `-1` the committed sequence).
    fn grow(&mut self, tokens: &[u32], parents: &[i32], positions: &[u32]) -> Result<Vec<f32>, SpecError> {
        let batch = Batch { input: StepInput::Tokens(tokens), positions, tree_parents: Some(parents) };
        self.logits(&batch, true)
    }

    /// The chain of the draft's most likely tokens, one draft forward per token, stopping where
    /// the path's draft probability falls below `min_path_prob`.
    fn propose_chain(&mut self, seq: &[u32], gamma: usize) -> Result<DraftTree, SpecError> {
        let mut logits = self.sync(seq)?;
        let mut tree = DraftTree::default();
        let mut path_prob = 1.0f32;
        let limit = self.model.config().context_len;
        for depth in 0..gamma {
            let (tok, p) = top_k(&logits, 1)[0];
            tree.push(tok, depth as i32 - 1, p);
            path_prob *= p;
            if depth + 1 == gamma || path_prob < self.min_path_prob || self.cached.len() + 1 >= limit {
                break;
            }
            logits = self.step(&[tok])?;
        }
        Ok(tree)
    }

    /// A tree grown best-first by path probability (EAGLE-2, SpecExec): every candidate node
    /// carries the draft probability of its whole path; each draft forward expands, as one tree
    /// batch grown on the drafter's cache ([`ModelSlice::forward_grow`]), the `max_branch`
    /// most probable unexpanded candidates among the `max_nodes` most probable so far, each
    /// gaining its `max_branch` most likely children. A node is expanded only while its best
    /// child is expected (by the mean best-child probability seen so far) to displace the
    /// weakest of a full tree, and above `max_depth` — so the final tree's leaves are mostly
    /// never run, which halves the draft rows. The tree is the best `max_nodes`, which is
    /// closed under ancestors because a path's probability never grows along it. Node order
    /// puts parents first and a node's children in draft order, so the first child at every
    /// level is the draft's greedy path (the spine pipelining assumes).
    fn propose_tree(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError> {
        let logits = self.sync(seq)?;
        let base = self.cached.len();
        let limit = self.model.config().context_len;
        let max_depth = budget.max_depth.min(limit.saturating_sub(base + 1)).max(1);
        let k = budget.max_branch.min(self.model.config().vocab_size);
        let mut cands: Vec<Candidate> = top_k(&logits, k)
            .into_iter()
            .map(|(token, prob)| Candidate { token, parent: None, prob, path_prob: prob, depth: 1, row: None })
            .collect();
        let mut rows = 0usize;
        // Mean draft probability of an expanded node's best child: how much of its path
        // probability its best child is expected to keep.
        let (mut top_sum, mut top_n) = (0.5f32, 1usize);
        let result = loop {
            // The candidates in the tree if it stopped now, best first (ties: parents first).
            let mut order: Vec<usize> = (0..cands.len()).collect();
            order.sort_by(|&a, &b| cands[b].path_prob.total_cmp(&cands[a].path_prob).then(a.cmp(&b)));
            order.truncate(budget.max_nodes);
            // Expanding a node pays only if its best child is expected to displace the weakest
            // member of a full tree: leaves are not expanded for nothing.
            let weakest = if order.len() == budget.max_nodes { cands[order[order.len() - 1]].path_prob } else { 0.0 };
            let keeps = top_sum / top_n as f32;
            // Grown rows must fit the drafter's cache (a sequence near the context's end).
            let room = self.kv.budget_tokens().saturating_sub(self.kv.len() + self.kv.staged_len());
            let expand: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&c| {
                    cands[c].row.is_none() && cands[c].depth < max_depth && cands[c].path_prob * keeps > weakest
                })
                .take(k.min(room))
                .collect();
            if expand.is_empty() {
                break Ok(order);
            }
            let tokens: Vec<u32> = expand.iter().map(|&c| cands[c].token).collect();
            let parents: Vec<i32> = expand
                .iter()
                .map(|&c| cands[c].parent.map_or(-1, |p| cands[p].row.expect("parents are expanded first") as i32))
                .collect();
            let positions: Vec<u32> = expand.iter().map(|&c| (base - 1 + cands[c].depth) as u32).collect();
            let logits = match self.grow(&tokens, &parents, &positions) {
                Ok(l) => l,
                Err(e) => break Err(e),
            };
            let vocab = logits.len() / expand.len();
            for (j, &c) in expand.iter().enumerate() {
                cands[c].row = Some(rows + j);
                let (path_prob, depth) = (cands[c].path_prob, cands[c].depth);
                let children = top_k(&logits[j * vocab..(j + 1) * vocab], k);
                top_sum += children.first().map_or(0.0, |&(_, p)| p);
                top_n += 1;
                for (token, prob) in children {
                    cands.push(Candidate {
                        token,
                        parent: Some(c),
                        prob,
                        path_prob: path_prob * prob,
                        depth: depth + 1,
                        row: None,
                    });
                }
            }
            rows += expand.len();
        };
        // The grown rows are scratch: the cache keeps the committed sequence only.
        self.kv.discard_staged();
        let mut chosen = result?;
        chosen.sort_unstable();
        let mut index = vec![-1i32; cands.len()];
        let mut tree = DraftTree::default();
        for c in chosen {
            let parent = cands[c].parent.map_or(-1, |p| index[p]);
            debug_assert!(cands[c].parent.is_none() || parent >= 0, "the chosen set is closed under ancestors");
            index[c] = tree.push(cands[c].token, parent, cands[c].prob) as i32;
        }
        Ok(tree)
    }
}

impl Drafter for ModelDrafter {
    fn name(&self) -> String {
        self.name.clone()
    }

    /// A chain of the draft's most likely tokens (`max_branch == 1`), or a tree grown best-first
    /// by path probability ([`ModelDrafter::propose_tree`]).
    fn propose(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError> {
        budget.validate()?;
        if budget.max_branch == 1 || budget.max_nodes == 1 {
            self.propose_chain(seq, budget.max_depth.min(budget.max_nodes))
        } else {
            self.propose_tree(seq, budget)
        }
    }

    fn has_probabilities(&self) -> bool {
        true
    }
}
