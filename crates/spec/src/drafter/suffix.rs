//! SuffixDecoding-style drafting over the session and previously generated outputs.
//!
//! Finished outputs go into a bounded corpus (oldest documents dropped first) with its own
//! persistent index; the session has another. Each round the drafter matches the longest tail
//! of the session (up to `max_match` tokens, at least 2) in both, and proposes the continuations
//! of all occurrences — the session's most recent first, then the corpus's — as a tree ranked by
//! how often each continuation occurred. Agentic traffic (repeated tool-call scaffolding, JSON,
//! code edits) repeats itself across requests, which is where this wins.
//!
//! Costs: indexing is O(max_match) hash inserts per token, once; a proposal is O(max_match)
//! look-ups plus the continuations it reads. Memory is bounded by `corpus_tokens_max`.

use super::ngram::{NgramIndex, tree_from_continuations};
use super::{DraftBudget, Drafter};
use crate::SpecError;
use crate::tree::DraftTree;

/// Separates documents in the corpus stream; never a real token id, never proposed.
const SEPARATOR: u32 = u32::MAX;

pub struct SuffixDrafter {
    corpus: NgramIndex,
    session: NgramIndex,
    corpus_tokens_max: usize,
    max_match: usize,
}

impl SuffixDrafter {
    /// Match tails of up to `max_match` tokens; keep at most `corpus_tokens_max` tokens of past outputs.
    pub fn new(max_match: usize, corpus_tokens_max: usize) -> SuffixDrafter {
        let max_match = max_match.max(2);
        SuffixDrafter {
            corpus: NgramIndex::new(2, max_match),
            session: NgramIndex::new(2, max_match),
            corpus_tokens_max,
            max_match,
        }
    }

    /// Add a finished output (or any reference text) to the corpus.
    pub fn add_document(&mut self, doc: &[u32]) {
        let doc = &doc[doc.len().saturating_sub(self.corpus_tokens_max.saturating_sub(1))..];
        if self.corpus.stream().len() + doc.len() + 1 > self.corpus_tokens_max {
            // Drop whole documents from the front, then re-index what is left.
            let keep_from = self.corpus.stream().len() + doc.len() + 1 - self.corpus_tokens_max;
            let stream = self.corpus.stream();
            let cut = stream[keep_from.min(stream.len())..]
                .iter()
                .position(|&t| t == SEPARATOR)
                .map_or(stream.len(), |p| keep_from + p + 1);
            let rest = stream[cut..].to_vec();
            self.corpus.clear();
            self.corpus.append(&rest);
        }
        self.corpus.append(doc);
        self.corpus.append(&[SEPARATOR]);
    }

    pub fn corpus_tokens(&self) -> usize {
        self.corpus.stream().len()
    }
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
            conts.extend(
                self.corpus
                    .occurrences(key)
                    .into_iter()
                    .map(|s| self.corpus.continuation(s, budget.max_depth, Some(SEPARATOR))),
            );
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
