//! Wiring speculative decoding into the CLI: drafter names and budgets.

use std::path::Path;

use anyhow::{Result, bail};
use specswarm_spec::drafter::lens::{Lens, calibrate};
use specswarm_spec::drafter::model::{ModelDrafter, parse_layers};
use specswarm_spec::drafter::ngram::NgramDrafter;
use specswarm_spec::drafter::suffix::SuffixDrafter;
use specswarm_spec::drafter::{DraftBudget, Drafter, Fallback};
use specswarm_spec::policy::{Policy, PolicyMode};

use crate::cli::GenerateArgs;

/// Build the drafter named by `--draft` for a target of `n_layers` layers and `vocab` tokens.
/// Only what the drafter itself needs is loaded (the first K layers for `self:K`, the kept layers
/// for `skip:`, the draft model for `model:`), so a swarm client holds no copy of the target.
pub fn drafter(spec: &str, target_path: &Path, threads: usize) -> Result<Box<dyn Drafter>> {
    // A path after `model:` may hold slashes: a fallback pair names the model drafter last.
    if let Some((first, second)) = spec.split_once('/').filter(|_| !spec.starts_with("model:")) {
        return Ok(Box::new(Fallback::new(
            drafter(first, target_path, threads)?,
            drafter(second, target_path, threads)?,
        )));
    }
    let file = specswarm_engine::gguf::GgufFile::open(target_path)?;
    let cfg = specswarm_engine::config::ModelConfig::from_gguf(&file)?;
    Ok(match spec.split_once(':') {
        Some(("self", k)) => {
            let k: usize = k.parse().map_err(|_| anyhow::anyhow!("self:K needs a layer count, got {k:?}"))?;
            Box::new(ModelDrafter::self_draft(target_path, k, cfg.n_layers, threads)?)
        }
        Some(("lens", k)) => {
            let k: usize = k.parse().map_err(|_| anyhow::anyhow!("lens:K needs a layer count, got {k:?}"))?;
            Box::new(ModelDrafter::lens_draft(target_path, lens(target_path, k, cfg.d_model)?, threads)?)
        }
        Some(("skip", layers)) => Box::new(ModelDrafter::skip_draft(target_path, &parse_layers(layers)?, threads)?),
        Some(("model", m)) => {
            let path = crate::resolve_model(m)?;
            Box::new(ModelDrafter::from_file(&path, cfg.vocab_size, threads)?)
        }
        None if spec == "ngram" => Box::new(NgramDrafter::new(4, 1)),
        None if spec == "suffix" => Box::new(SuffixDrafter::new(16, 1 << 20)),
        _ => bail!(
            "unknown drafter {spec:?}: use ngram, suffix, self:K, lens:K, skip:LAYERS (e.g. skip:4-7+12), model:PATH_OR_NAME or FIRST/SECOND"
        ),
    })
}

/// The tuned lens for layer `k` of the target: from the cache, or calibrated now (about a
/// minute) and cached under `$SPECSWARM_HOME/lenses/`, keyed by the model file's sha256.
pub fn lens(target_path: &Path, k: usize, d_model: usize) -> Result<Lens> {
    let sha = specswarm_engine::hub::sha256_file(target_path)?;
    let dir = specswarm_engine::hub::home().join("lenses");
    let file = dir.join(format!("{}-k{k}.lens", &sha[..16]));
    if let Ok(bytes) = std::fs::read(&file) {
        match Lens::from_bytes(&bytes, k, d_model) {
            Ok(lens) => return Ok(lens),
            Err(e) => eprintln!("ignoring cached lens {}: {e}; calibrating again", file.display()),
        }
    }
    eprintln!("calibrating lens:{k} for {} (once; cached in {})", target_path.display(), dir.display());
    let t0 = std::time::Instant::now();
    let lens = calibrate(target_path, k, 0, &mut |done, total| {
        if done % 10 == 0 || done == total {
            eprintln!("  {done}/{total} calibration prompts");
        }
    })?;
    std::fs::create_dir_all(&dir)?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, lens.to_bytes())?;
    std::fs::rename(&tmp, &file)?;
    eprintln!("lens:{k} calibrated in {:.1} s -> {}", t0.elapsed().as_secs_f64(), file.display());
    Ok(lens)
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
