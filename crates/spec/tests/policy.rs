//! The adaptive policy reacts to measured acceptance and costs.

use specswarm_spec::drafter::DraftBudget;
use specswarm_spec::policy::{Policy, PolicyMode};

fn run(accept_fraction: f64, draft_s_per_token: f64) -> DraftBudget {
    let mut p = Policy::new(PolicyMode::Adaptive { max_nodes: 16, max_depth: 8 });
    for _ in 0..50 {
        let depth = p.next_budget().max_depth;
        let accepted = (depth as f64 * accept_fraction).round() as usize;
        // Verification: 2 ms fixed + 0.5 ms per row.
        p.record(depth, accepted, draft_s_per_token * depth as f64, depth + 1, 2e-3 + 5e-4 * (depth + 1) as f64);
    }
    p.next_budget()
}

#[test]
fn high_acceptance_drafts_deep_chains() {
    let b = run(1.0, 0.0);
    assert_eq!(b.max_branch, 1, "{b:?}");
    assert!(b.max_depth >= 6, "{b:?}");
}

#[test]
fn low_acceptance_drafts_short_and_wide() {
    let b = run(0.2, 0.0);
    assert!(b.max_branch > 1, "{b:?}");
    assert!(b.max_depth <= 3, "{b:?}");
    assert!(b.max_nodes > b.max_depth && b.max_nodes <= 16, "{b:?}");
}

#[test]
fn expensive_drafting_shortens_the_draft() {
    let cheap = run(0.7, 0.0);
    let costly = run(0.7, 5e-3);
    assert!(costly.max_depth < cheap.max_depth, "cheap {cheap:?} vs costly {costly:?}");
}

#[test]
fn fixed_mode_never_changes() {
    let b = DraftBudget { max_nodes: 7, max_depth: 3, max_branch: 2 };
    let mut p = Policy::new(PolicyMode::Fixed(b));
    p.record(3, 0, 1.0, 8, 1.0);
    assert_eq!(p.next_budget(), b);
}
