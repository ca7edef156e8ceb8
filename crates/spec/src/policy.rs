//! Per-round choice of the draft shape (chain or tree) and size, from running statistics.
//!
//! The model: with per-token acceptance α a chain of γ yields E(γ) = (1 − α^(γ+1)) / (1 − α)
//! tokens per round (DESIGN §3), and a round costs drafting (∝ γ for a model drafter, ~0 for
//! model-free ones) plus one verification of γ + 1 rows (a + b·rows). The adaptive policy picks the
//! γ that maximises E(γ) / cost(γ) with α and the costs measured as exponential moving averages.
//! When acceptance is low and the drafter ranks alternatives, it spends the leftover node budget
//! on siblings (a tree), which raises the chance that the target's token is among those sent.

use crate::drafter::DraftBudget;

#[derive(Clone, Debug, PartialEq)]
pub enum PolicyMode {
    /// The same budget every round (benchmarks).
    Fixed(DraftBudget),
    /// Choose per round within these limits.
    Adaptive { max_nodes: usize, max_depth: usize },
}

/// Running statistics and the resulting choice.
#[derive(Clone, Debug)]
pub struct Policy {
    mode: PolicyMode,
    /// EMA of per-token acceptance along the accepted path.
    alpha: f64,
    /// EMA of seconds per drafted spine token.
    draft_s_per_token: f64,
    /// EMA of verification seconds: fixed part and per-row part.
    verify_fixed_s: f64,
    verify_s_per_row: f64,
    rounds: usize,
}

/// EMA weight of a new observation.
const EMA_NEW: f64 = 0.2;

impl Policy {
    pub fn new(mode: PolicyMode) -> Policy {
        Policy { mode, alpha: 0.6, draft_s_per_token: 0.0, verify_fixed_s: 1e-3, verify_s_per_row: 1e-4, rounds: 0 }
    }

    pub fn mode(&self) -> &PolicyMode {
        &self.mode
    }

    /// The acceptance estimate.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Budget for the next round.
    pub fn next_budget(&self) -> DraftBudget {
        match self.mode {
            PolicyMode::Fixed(b) => b,
            PolicyMode::Adaptive { max_nodes, max_depth } => {
                let a = self.alpha.clamp(0.01, 0.99);
                let best = (1..=max_depth.min(max_nodes))
                    .map(|g| {
                        let tokens = (1.0 - a.powi(g as i32 + 1)) / (1.0 - a);
                        let cost = self.draft_s_per_token * g as f64
                            + self.verify_fixed_s
                            + self.verify_s_per_row * (g + 1) as f64;
                        (g, tokens / cost.max(1e-9))
                    })
                    .max_by(|x, y| x.1.total_cmp(&y.1))
                    .map_or(1, |b| b.0);
                let branch = if a < 0.6 {
                    3
                } else if a < 0.8 {
                    2
                } else {
                    1
                };
                let nodes = if branch == 1 { best } else { (best * branch).min(max_nodes) };
                DraftBudget { max_nodes: nodes.max(best), max_depth: best, max_branch: branch }
            }
        }
    }

    /// Record a round: the spine depth drafted, tokens accepted, and the time spent.
    pub fn record(&mut self, depth_drafted: usize, accepted: usize, draft_s: f64, rows: usize, verify_s: f64) {
        self.rounds += 1;
        if depth_drafted > 0 {
            // Per-token acceptance estimate from the accepted length of a depth-γ proposal: the
            // fraction of proposed depth that survived (censored at γ).
            let obs = accepted as f64 / depth_drafted as f64;
            self.alpha += EMA_NEW * (obs - self.alpha);
            let per_tok = draft_s / depth_drafted as f64;
            self.draft_s_per_token += EMA_NEW * (per_tok - self.draft_s_per_token);
        }
        if rows > 0 {
            // Attribute verification time to rows with the current fixed-cost estimate.
            let per_row = ((verify_s - self.verify_fixed_s).max(0.0) / rows as f64).max(1e-7);
            self.verify_s_per_row += EMA_NEW * (per_row - self.verify_s_per_row);
            let fixed = (verify_s - self.verify_s_per_row * rows as f64).max(0.0);
            self.verify_fixed_s += EMA_NEW * (fixed - self.verify_fixed_s);
        }
    }
}
