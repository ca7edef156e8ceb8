//! SuffixDecoding-style drafting over the session and previously generated outputs.
//!
//! Finished outputs go into a bounded corpus (oldest documents dropped first) with its own
//! persistent index, which several drafters may share ([`SharedCorpus`]); the session has
//! another. Each round the drafter matches the longest tail
//! of the session (up to `max_match` tokens, at least 2) in both, and proposes the continuations
//! of all occurrences — the session's most recent first, then the corpus's — as a tree ranked by
//! how often each continuation occurred. Agentic traffic (repeated tool-call scaffolding, JSON,
//! code edits) repeats itself across requests, which is where this wins.
//!
//! Costs: indexing is O(max_match) hash inserts per token, once; a proposal is O(max_match)
//! look-ups plus the continuations it reads. Memory is bounded by `corpus_tokens_max`.

use std::sync::{Arc, Mutex, MutexGuard};

use super::ngram::{NgramIndex, tree_from_continuations};
use super::{DraftBudget, Drafter};
use crate::SpecError;
use crate::tree::DraftTree;

/// Separates documents in the corpus stream; never a real token id, never proposed.
const SEPARATOR: u32 = u32::MAX;

/// Finished outputs, indexed for suffix matching: bounded, whole documents dropped oldest first.
/// One corpus can serve the drafters of many requests ([`SharedCorpus`]): a gateway keeps one per
/// model and API key, so an agent's later requests draft from its earlier answers.
pub struct SuffixCorpus {
    index: NgramIndex,
    tokens_max: usize,
}

/// A corpus shared by concurrent drafters (locked for a proposal's look-ups and to add a
/// finished output).
pub type SharedCorpus = Arc<Mutex<SuffixCorpus>>;

impl SuffixCorpus {
    /// Index tails of up to `max_match` tokens; keep at most `tokens_max` tokens.
    pub fn new(max_match: usize, tokens_max: usize) -> SuffixCorpus {
        SuffixCorpus { index: NgramIndex::new(2, max_match.max(2)), tokens_max }
    }

    pub fn shared(max_match: usize, tokens_max: usize) -> SharedCorpus {
        Arc::new(Mutex::new(SuffixCorpus::new(max_match, tokens_max)))
    }

    /// Add a finished output (or any reference text).
    pub fn add_document(&mut self, doc: &[u32]) {
        let doc = &doc[doc.len().saturating_sub(self.tokens_max.saturating_sub(1))..];
        if self.index.stream().len() + doc.len() + 1 > self.tokens_max {
            // Drop whole documents from the front, then re-index what is left.
            let keep_from = self.index.stream().len() + doc.len() + 1 - self.tokens_max;
            let stream = self.index.stream();
            let cut = stream[keep_from.min(stream.len())..]
                .iter()
                .position(|&t| t == SEPARATOR)
                .map_or(stream.len(), |p| keep_from + p + 1);
            let rest = stream[cut..].to_vec();
            self.index.clear();
            self.index.append(&rest);
        }
        self.index.append(doc);
        self.index.append(&[SEPARATOR]);
    }

    pub fn tokens(&self) -> usize {
        self.index.stream().len()
    }

    /// Continuations (up to `len` tokens, within one document) of every occurrence of `key`.
    fn continuations(&self, key: &[u32], len: usize) -> Vec<Vec<u32>> {
        self.index.occurrences(key).into_iter().map(|s| self.index.continuation(s, len, Some(SEPARATOR))).collect()
    }
}

pub struct SuffixDrafter {
    corpus: SharedCorpus,
    session: NgramIndex,
    max_match: usize,
}

impl SuffixDrafter {
    /// Match tails of up to `max_match` tokens; keep at most `corpus_tokens_max` tokens of past
    /// outputs in a corpus of its own.
    pub fn new(max_match: usize, corpus_tokens_max: usize) -> SuffixDrafter {
        SuffixDrafter::with_corpus(max_match, SuffixCorpus::shared(max_match, corpus_tokens_max))
    }

    /// A drafter for one request that reads (and, when the request finishes, extends) `corpus`.
    pub fn with_corpus(max_match: usize, corpus: SharedCorpus) -> SuffixDrafter {
        let max_match = max_match.max(2);
        SuffixDrafter { corpus, session: NgramIndex::new(2, max_match), max_match }
    }

    /// Add a finished output (or any reference text) to the corpus.
    pub fn add_document(&mut self, doc: &[u32]) {
        lock(&self.corpus).add_document(doc);
    }

    pub fn corpus_tokens(&self) -> usize {
        lock(&self.corpus).tokens()
    }
}

fn lock(c: &SharedCorpus) -> MutexGuard<'_, SuffixCorpus> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drafter for SuffixDrafter {
    fn name(&self) -> String {
        "suffix".into()
    }

    fn propose(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError> {
        budget.validate()?;
        self.session.sync(seq);
        for n in (2..=self.max_match.min(seq.len())).rev() {
            let key = &seq[seq.len() - n..];
            let mut conts: Vec<Vec<u32>> = self
                .session
                .occurrences(key)
                .into_iter()
                .map(|s| self.session.continuation(s, budget.max_depth, None))
                .collect();
            conts.extend(lock(&self.corpus).continuations(key, budget.max_depth));
            conts.retain(|c| !c.is_empty());
            if !conts.is_empty() {
                return Ok(tree_from_continuations(&conts, budget));
            }
        }
        Ok(DraftTree::default())
    }

    fn finish(&mut self, output: &[u32]) {
        self.add_document(output);
    }
}
