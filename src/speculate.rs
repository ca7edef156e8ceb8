//! Wiring speculative decoding into the CLI: drafter names and budgets.

use std::path::Path;

use anyhow::Result;
use specswarm_spec::drafter::recipe::Recipe;
use specswarm_spec::drafter::{DraftBudget, Drafter};
use specswarm_spec::policy::{Policy, PolicyMode};

use crate::cli::GenerateArgs;

/// Load the drafter named by `--draft` for the target at `target_path` (see
/// [`Recipe`]: ngram, suffix, self:K, lens:K, skip:LAYERS, model:PATH_OR_NAME, FIRST/SECOND).
pub fn recipe(spec: &str, target_path: &Path, threads: usize) -> Result<Recipe> {
    let mut resolve = |m: &str| {
        crate::resolve_model(m).map_err(|e| specswarm_spec::SpecError::InvalidSetting(format!("model:{m}: {e:#}")))
    };
    Ok(Recipe::load(spec, target_path, threads, &mut resolve, &mut |m| eprintln!("{m}"))?)
}

/// One drafter named by `--draft` (a one-off run: its own state, nothing shared).
pub fn drafter(spec: &str, target_path: &Path, threads: usize) -> Result<Box<dyn Drafter>> {
    Ok(recipe(spec, target_path, threads)?.instantiate(None))
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
