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
        let logits = match &self.lens {
            None => self.model.forward(&mut self.kv, &batch, Want::LastLogits)?.into_data(),
            Some(lens) => {
                let hidden = self.model.forward(&mut self.kv, &batch, Want::Hidden)?.into_data();
                let last = &hidden[hidden.len() - lens.d..];
                self.model.head_logits(&lens.apply(last))?
            }
        };
        self.cached.extend_from_slice(tokens);
        Ok(logits)
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

/// Softmax probabilities of the `k` most likely tokens, best first.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, (f64::from(logits[i as usize] - max).exp() / z) as f32)).collect()
}

impl Drafter for ModelDrafter {
    fn name(&self) -> String {
        self.name.clone()
    }

    /// A spine of the draft's most likely tokens, one draft forward per depth, with the runners-up
    /// at each depth as leaf siblings, chosen best-first by cumulative draft probability.
    fn propose(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError> {
        budget.validate()?;
        let spine_len = budget.max_depth.min(budget.max_nodes);
        let mut logits = self.sync(seq)?;
        let mut spine: Vec<(u32, f32)> = Vec::new();
        // (cumulative probability, spine depth it hangs from, token, probability)
        let mut siblings: Vec<(f32, usize, u32, f32)> = Vec::new();
        let mut path_prob = 1.0f32;
        let limit = self.model.config().context_len;
        for depth in 0..spine_len {
            let cands = top_k(&logits, budget.max_branch.max(1));
            let (tok, p) = cands[0];
            for &(t, q) in &cands[1..] {
                siblings.push((path_prob * q, depth, t, q));
            }
            spine.push((tok, p));
            path_prob *= p;
            if depth + 1 == spine_len || path_prob < self.min_path_prob || self.cached.len() + 1 >= limit {
                break;
            }
            logits = self.step(&[tok])?;
        }
        let mut tree = DraftTree::default();
        for (i, &(t, p)) in spine.iter().enumerate() {
            tree.push(t, i as i32 - 1, p);
        }
        siblings.sort_by(|a, b| b.0.total_cmp(&a.0));
        for &(_, depth, t, q) in siblings.iter().take(budget.max_nodes.saturating_sub(tree.len())) {
            if depth < tree.len() {
                tree.push(t, depth as i32 - 1, q);
            }
        }
        Ok(tree)
    }

    fn has_probabilities(&self) -> bool {
        true
    }
}
