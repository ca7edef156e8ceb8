//! Past answers for suffix drafting, kept per model and per API key.
//!
//! A drafter made for one request starts from nothing; an agent's requests repeat each other
//! (the same tool-call scaffolding, the same JSON shapes, code it wrote a turn ago), so each
//! model keeps the finished outputs of earlier requests in a [`SuffixCorpus`] that the suffix
//! drafters of later requests read. Speculation is lossless, so a corpus changes speed, never
//! text — but acceptance speed is observable, so corpora are not shared between API keys (one
//! key must not be able to probe what another was answered). Bounded: at most
//! `GATEWAY_SUFFIX_CORPORA_MAX` corpora per model (least recently used dropped) of
//! `GATEWAY_SUFFIX_CORPUS_TOKENS_MAX` tokens each.

use std::collections::VecDeque;
use std::sync::Mutex;

use specswarm_proto::limits::{
    GATEWAY_SUFFIX_CORPORA_MAX, GATEWAY_SUFFIX_CORPUS_MATCH_TOKENS_MAX, GATEWAY_SUFFIX_CORPUS_TOKENS_MAX,
};
use specswarm_spec::drafter::suffix::{SharedCorpus, SuffixCorpus};

/// Who a request's drafts may learn from: the API key's id (`None` when the gateway runs
/// without keys: one scope for everyone).
pub type Tenant = Option<i64>;

/// One model's corpora, most recently used last.
#[derive(Default)]
pub struct Corpora {
    entries: Mutex<VecDeque<(Tenant, SharedCorpus)>>,
}

impl Corpora {
    /// The corpus of `tenant`, created on first use.
    pub fn get(&self, tenant: Tenant) -> SharedCorpus {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let corpus = match e.iter().position(|(t, _)| *t == tenant) {
            Some(i) => e.remove(i).expect("index from position").1,
            None => {
                if e.len() >= GATEWAY_SUFFIX_CORPORA_MAX {
                    e.pop_front();
                }
                SuffixCorpus::shared(GATEWAY_SUFFIX_CORPUS_MATCH_TOKENS_MAX, GATEWAY_SUFFIX_CORPUS_TOKENS_MAX)
            }
        };
        e.push_back((tenant, corpus.clone()));
        corpus
    }

    /// Corpora held (tests, status).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpora_are_per_tenant_and_bounded() {
        let c = Corpora::default();
        let a = c.get(Some(1));
        a.lock().unwrap().add_document(&[1, 2, 3, 4]);
        assert!(std::sync::Arc::ptr_eq(&a, &c.get(Some(1))), "the same key gets the same corpus");
        assert_eq!(c.get(Some(2)).lock().unwrap().tokens(), 0, "another key starts empty");
        for k in 3..3 + GATEWAY_SUFFIX_CORPORA_MAX as i64 {
            c.get(Some(k));
        }
        assert_eq!(c.len(), GATEWAY_SUFFIX_CORPORA_MAX);
        assert_eq!(c.get(Some(1)).lock().unwrap().tokens(), 0, "the least recently used corpus was dropped");
    }
}
