//! Lossless speculative decoding, split by role.
//!
//! - [`tree`]: [`tree::DraftTree`], a chain or tree of proposed tokens, and its batch layout.
//! - [`drafter`]: the [`drafter::Drafter`] trait and its implementations (draft model, self-draft,
//!   prompt lookup, suffix tree).
//! - [`verify`]: the verification rules (SpecExec for any tree, and the classic min(1, p/q) rule for
//!   stochastic chains) that decide which drafted tokens the target accepts.
//! - [`policy`]: chain vs tree and draft size per round, from running statistics.
//! - [`decode`]: the speculative generation loop and its KV bookkeeping.
//!
//! The invariant, tested in `tests/`: greedy speculative output is token-for-token the plain
//! greedy output of the target, and sampled output has exactly the target's distribution.

pub mod drafter;
pub mod tree;
pub mod verify;

/// Why speculation was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid speculative setting: {0}")]
    InvalidSetting(String),
    #[error("draft model vocabulary ({draft} tokens) differs from the target's ({target})")]
    VocabularyMismatch { draft: usize, target: usize },
    #[error(transparent)]
    Engine(#[from] specswarm_engine::EngineError),
}
