//! Drafters: cheap proposers of continuations, behind one trait.

pub mod lens;
pub mod model;
pub mod ngram;
pub mod recipe;
pub mod suffix;

use crate::SpecError;
use crate::tree::DraftTree;

/// How much a drafter may propose this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DraftBudget {
    /// Most nodes in the tree (B). A chain uses `max_nodes == max_depth`.
    pub max_nodes: usize,
    /// Deepest node (γ for a chain).
    pub max_depth: usize,
    /// Most children per node (1: a chain).
    pub max_branch: usize,
}

impl DraftBudget {
    pub fn chain(gamma: usize) -> DraftBudget {
        DraftBudget { max_nodes: gamma, max_depth: gamma, max_branch: 1 }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.max_nodes == 0 || self.max_depth == 0 || self.max_branch == 0 {
            return Err(SpecError::InvalidSetting(format!(
                "draft budget must be positive (tree budget B={}, depth={}, branching={})",
                self.max_nodes, self.max_depth, self.max_branch
            )));
        }
        Ok(())
    }
}

/// A proposer of draft tokens for one session.
///
/// Each round the decoder calls [`Drafter::propose`] with the whole sequence so far (prompt and
/// accepted tokens; its last token is the root the tree continues), then [`Drafter::observe`]
/// with the sequence after verification. A drafter with state (a draft model's KV cache) keeps
/// it consistent with the sequences it is shown: it may assume each new sequence extends a prefix
/// of the previous one.
pub trait Drafter: Send {
    /// Short name for reports ("ngram", "suffix", "self:8", "model:…").
    fn name(&self) -> String;

    /// Propose a tree continuing `seq` (non-empty) within `budget`. An empty tree means "no
    /// proposal this round" (the decoder then verifies the root alone).
    fn propose(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError>;

    /// The sequence after a round (accepted tokens and the target's own next token appended).
    fn observe(&mut self, _seq: &[u32]) {}

    /// A request finished with `output`: drafters that learn from past outputs index it.
    fn finish(&mut self, _output: &[u32]) {}

    /// Whether [`DraftTree::probs`] are the drafter's sampling probabilities (so the classic
    /// min(1, p/q) rule can be used for stochastic chains).
    fn has_probabilities(&self) -> bool {
        false
    }
}

/// A drafter that never proposes: every round verifies the root alone, which is plain decoding
/// with the token chosen where verification runs (the tail of a ring).
pub struct NoDraft;

impl Drafter for NoDraft {
    fn name(&self) -> String {
        "none".into()
    }

    fn propose(&mut self, _: &[u32], _: &DraftBudget) -> Result<DraftTree, SpecError> {
        Ok(DraftTree::default())
    }
}

/// Two drafters in order of preference: the first's proposal when it has one, else the
/// second's. `suffix/lens:8` drafts copied spans from the context where they exist (free, and
/// right when the output repeats its input) and falls back to a draft model elsewhere.
pub struct Fallback {
    first: Box<dyn Drafter>,
    second: Box<dyn Drafter>,
}

impl Fallback {
    pub fn new(first: Box<dyn Drafter>, second: Box<dyn Drafter>) -> Fallback {
        Fallback { first, second }
    }
}

impl Drafter for Fallback {
    fn name(&self) -> String {
        format!("{}/{}", self.first.name(), self.second.name())
    }

    fn propose(&mut self, seq: &[u32], budget: &DraftBudget) -> Result<DraftTree, SpecError> {
        let tree = self.first.propose(seq, budget)?;
        if !tree.is_empty() {
            return Ok(tree);
        }
        self.second.propose(seq, budget)
    }

    fn observe(&mut self, seq: &[u32]) {
        self.first.observe(seq);
        self.second.observe(seq);
    }

    fn finish(&mut self, output: &[u32]) {
        self.first.finish(output);
        self.second.finish(output);
    }
}
