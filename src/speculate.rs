//! Wiring speculative decoding into the CLI: drafter names and budgets.

use std::path::Path;

use anyhow::{Result, bail};
use specswarm_spec::drafter::model::{ModelDrafter, parse_layers};
use specswarm_spec::drafter::ngram::NgramDrafter;
use specswarm_spec::drafter::suffix::SuffixDrafter;
use specswarm_spec::drafter::{DraftBudget, Drafter};
use specswarm_spec::policy::{Policy, PolicyMode};

use crate::cli::GenerateArgs;

/// Build the drafter named by `--draft` for a target of `n_layers` layers and `vocab` tokens.
/// Only what the drafter itself needs is loaded (the first K layers for `self:K`, the kept layers
/// for `skip:`, the draft model for `model:`), so a swarm client holds no copy of the target.
pub fn drafter(spec: &str, target_path: &Path, threads: usize) -> Result<Box<dyn Drafter>> {
    let file = specswarm_engine::gguf::GgufFile::open(target_path)?;
    let cfg = specswarm_engine::config::ModelConfig::from_gguf(&file)?;
    Ok(match spec.split_once(':') {
        Some(("self", k)) => {
            let k: usize = k.parse().map_err(|_| anyhow::anyhow!("self:K needs a layer count, got {k:?}"))?;
            Box::new(ModelDrafter::self_draft(target_path, k, cfg.n_layers, threads)?)
        }
        Some(("skip", layers)) => Box::new(ModelDrafter::skip_draft(target_path, &parse_layers(layers)?, threads)?),
        Some(("model", m)) => {
            let path = crate::resolve_model(m)?;
            Box::new(ModelDrafter::from_file(&path, cfg.vocab_size, threads)?)
        }
        None if spec == "ngram" => Box::new(NgramDrafter::new(4, 1)),
        None if spec == "suffix" => Box::new(SuffixDrafter::new(16, 1 << 20)),
        _ => bail!(
            "unknown drafter {spec:?}: use ngram, suffix, self:K, skip:LAYERS (e.g. skip:4-7+12) or model:PATH_OR_NAME"
        ),
    })
}

/// The policy from `--draft-len`, `--tree-budget`, `--branch` and `--adaptive`.
pub fn policy(args: &GenerateArgs) -> Result<Policy> {
    let depth = args.draft_len.unwrap_or(5);
    let nodes = args.tree_budget.unwrap_or(depth);
    let branch = args.branch.unwrap_or(if nodes > depth { 3 } else { 1 });
    let budget = DraftBudget { max_nodes: nodes, max_depth: depth, max_branch: branch };
    budget.validate()?;
    Ok(Policy::new(if args.adaptive {
        PolicyMode::Adaptive { max_nodes: nodes.max(depth), max_depth: depth }
    } else {
        PolicyMode::Fixed(budget)
    }))
}
