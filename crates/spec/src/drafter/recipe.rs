//! Drafters by name (`--draft`), loaded once and instantiated per request.
//!
//! `ngram`, `suffix`, `self:K` (the target's first K layers), `lens:K` (the same through a tuned
//! lens, calibrated once and cached), `skip:LAYERS` (the target without some layers),
//! `model:PATH_OR_NAME` (a separate draft model with the target's vocabulary) and `FIRST/SECOND`
//! (the first's proposal where it has one, else the second's). A [`Recipe`] holds what is
//! expensive — a model drafter's weights and lens — and [`Recipe::instantiate`] makes a drafter
//! with its own state for one request, so a server loads each draft model once however many
//! requests it serves at a time. Only what the drafter needs is loaded (the first K layers for
//! `self:K`, the kept layers for `skip:`), so a swarm client holds no copy of the target.

use std::path::{Path, PathBuf};

use super::lens::{Lens, calibrate};
use super::model::{ModelDrafter, parse_layers};
use super::ngram::NgramDrafter;
use super::suffix::{SharedCorpus, SuffixDrafter};
use super::{Drafter, Fallback};
use crate::SpecError;

/// Longest context tail a suffix drafter matches, tokens.
const SUFFIX_MATCH_TOKENS_MAX: usize = 16;
/// A request-private suffix corpus (when no shared one is given), tokens.
const SUFFIX_PRIVATE_CORPUS_TOKENS_MAX: usize = 1 << 20;

/// A drafter named on a command line, ready to instantiate.
pub enum Recipe {
    Ngram,
    Suffix,
    /// A model drafter whose weights every instance shares.
    Model(ModelDrafter),
    Fallback(Box<Recipe>, Box<Recipe>),
}

impl Recipe {
    /// Parse and load `spec` for the target at `target_path`. `resolve` turns a `model:` name
    /// into a file (a path, or a known model fetched into the store); `log` hears about slow
    /// steps (a lens calibration).
    pub fn load(
        spec: &str,
        target_path: &Path,
        threads: usize,
        resolve: &mut dyn FnMut(&str) -> Result<PathBuf, SpecError>,
        log: &mut dyn FnMut(&str),
    ) -> Result<Recipe, SpecError> {
        // A path after `model:` may hold slashes: a fallback pair names the model drafter last.
        if let Some((first, second)) = spec.split_once('/').filter(|_| !spec.starts_with("model:")) {
            return Ok(Recipe::Fallback(
                Box::new(Recipe::load(first, target_path, threads, resolve, log)?),
                Box::new(Recipe::load(second, target_path, threads, resolve, log)?),
            ));
        }
        let file = specswarm_engine::gguf::GgufFile::open(target_path)?;
        let cfg = specswarm_engine::config::ModelConfig::from_gguf(&file)?;
        let count = |what: &str, k: &str| {
            k.parse::<usize>()
                .map_err(|_| SpecError::InvalidSetting(format!("{what}:K needs a layer count, got {k:?}")))
        };
        Ok(match spec.split_once(':') {
            Some(("self", k)) => {
                Recipe::Model(ModelDrafter::self_draft(target_path, count("self", k)?, cfg.n_layers, threads)?)
            }
            Some(("lens", k)) => {
                let lens = load_or_calibrate(target_path, count("lens", k)?, cfg.d_model, log)?;
                Recipe::Model(ModelDrafter::lens_draft(target_path, lens, threads)?)
            }
            Some(("skip", layers)) => {
                Recipe::Model(ModelDrafter::skip_draft(target_path, &parse_layers(layers)?, threads)?)
            }
            Some(("model", m)) => Recipe::Model(ModelDrafter::from_file(&resolve(m)?, cfg.vocab_size, threads)?),
            None if spec == "ngram" => Recipe::Ngram,
            None if spec == "suffix" => Recipe::Suffix,
            _ => {
                return Err(SpecError::InvalidSetting(format!(
                    "unknown drafter {spec:?}: use ngram, suffix, self:K, lens:K, skip:LAYERS (e.g. skip:4-7+12), model:PATH_OR_NAME or FIRST/SECOND"
                )));
            }
        })
    }

    /// A drafter for one request. A suffix drafter reads and extends `corpus` when one is given
    /// (earlier answers, see [`SharedCorpus`]), else a corpus of its own.
    pub fn instantiate(&self, corpus: Option<&SharedCorpus>) -> Box<dyn Drafter> {
        match self {
            Recipe::Ngram => Box::new(NgramDrafter::new(4, 1)),
            Recipe::Suffix => Box::new(match corpus {
                Some(c) => SuffixDrafter::with_corpus(SUFFIX_MATCH_TOKENS_MAX, c.clone()),
                None => SuffixDrafter::new(SUFFIX_MATCH_TOKENS_MAX, SUFFIX_PRIVATE_CORPUS_TOKENS_MAX),
            }),
            Recipe::Model(m) => Box::new(m.share()),
            Recipe::Fallback(a, b) => Box::new(Fallback::new(a.instantiate(corpus), b.instantiate(corpus))),
        }
    }

    /// Whether any part of it runs a model (drafting then costs compute on this machine).
    pub fn runs_a_model(&self) -> bool {
        match self {
            Recipe::Ngram | Recipe::Suffix => false,
            Recipe::Model(_) => true,
            Recipe::Fallback(a, b) => a.runs_a_model() || b.runs_a_model(),
        }
    }
}

/// The tuned lens for layer `k` of the target: from the cache, or calibrated now (about a
/// minute) and cached under `$SPECSWARM_HOME/lenses/`, keyed by the model file's sha256. A
/// cached file that does not parse is calibrated again.
pub fn load_or_calibrate(
    target_path: &Path,
    k: usize,
    d_model: usize,
    log: &mut dyn FnMut(&str),
) -> Result<Lens, SpecError> {
    let io = |what: &str, e: std::io::Error| SpecError::InvalidSetting(format!("lens cache: {what}: {e}"));
    let sha = specswarm_engine::hub::sha256_file(target_path).map_err(|e| io("hashing the target", e))?;
    let dir = specswarm_engine::hub::home().join("lenses");
    let file = dir.join(format!("{}-k{k}.lens", &sha[..16]));
    if let Ok(bytes) = std::fs::read(&file) {
        match Lens::from_bytes(&bytes, k, d_model) {
            Ok(lens) => return Ok(lens),
            Err(e) => log(&format!("ignoring cached lens {}: {e}; calibrating again", file.display())),
        }
    }
    log(&format!("calibrating lens:{k} for {} (once; cached in {})", target_path.display(), dir.display()));
    let t0 = std::time::Instant::now();
    let lens = calibrate(target_path, k, 0, &mut |done, total| {
        if done % 10 == 0 || done == total {
            log(&format!("  {done}/{total} calibration prompts"));
        }
    })?;
    std::fs::create_dir_all(&dir).map_err(|e| io("creating the folder", e))?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, lens.to_bytes()).map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, &file).map_err(|e| io("renaming", e))?;
    log(&format!("lens:{k} calibrated in {:.1} s -> {}", t0.elapsed().as_secs_f64(), file.display()));
    Ok(lens)
}
