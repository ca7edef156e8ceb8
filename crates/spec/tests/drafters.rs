//! Drafters: expected proposals, budgets always respected, corpus bounds; a model drafter's
//! best-first tree.

use specswarm_spec::drafter::ngram::NgramDrafter;
use specswarm_spec::drafter::suffix::SuffixDrafter;
use specswarm_spec::drafter::{DraftBudget, Drafter};
use specswarm_spec::tree::DraftTree;

fn check_budget(t: &DraftTree, b: &DraftBudget) {
    assert!(t.len() <= b.max_nodes, "{} nodes > {b:?}", t.len());
    for i in 0..t.len() {
        assert!(t.parents[i] < i as i32, "parents precede children");
        assert!(t.depth(i) <= b.max_depth, "depth {} > {b:?}", t.depth(i));
    }
    for node in std::iter::once(None).chain((0..t.len()).map(Some)) {
        assert!(t.children(node).count() <= b.max_branch, "too many children under {node:?}");
    }
}

#[test]
fn ngram_proposes_the_continuation_of_a_repeat() {
    let mut d = NgramDrafter::new(4, 1);
    let seq = [10, 11, 12, 13, 14, 15, 16, 99, 10, 11, 12];
    let t = d.propose(&seq, &DraftBudget::chain(4)).unwrap();
    assert_eq!(t.tokens, vec![13, 14, 15, 16]);
    assert!(t.is_chain());
    // No repeat, no proposal.
    assert!(d.propose(&[1, 2, 3, 4, 5], &DraftBudget::chain(4)).unwrap().is_empty());
    // A changed sequence is re-indexed.
    let t = d.propose(&[7, 8, 9, 7, 8], &DraftBudget::chain(2)).unwrap();
    assert_eq!(t.tokens, vec![9, 7]);
}

#[test]
fn ngram_tree_offers_alternative_continuations() {
    let mut d = NgramDrafter::new(2, 1);
    // "5 6" was followed by 7 twice and by 8 once.
    let seq = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6, 7, 3, 5, 6];
    let b = DraftBudget { max_nodes: 6, max_depth: 2, max_branch: 2 };
    let t = d.propose(&seq, &b).unwrap();
    check_budget(&t, &b);
    let roots: Vec<u32> = t.children(None).map(|i| t.tokens[i]).collect();
    assert_eq!(roots, vec![7, 8], "the more frequent continuation ranks first");
}

#[test]
fn budgets_are_never_exceeded() {
    let mut x = 0x1234_5678u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ngram = NgramDrafter::new(4, 1);
    let mut suffix = SuffixDrafter::new(8, 4096);
    for _ in 0..300 {
        let len = 1 + (next() % 200) as usize;
        let vocab = 2 + next() % 12;
        let seq: Vec<u32> = (0..len).map(|_| (next() % vocab) as u32).collect();
        let b = DraftBudget {
            max_nodes: 1 + (next() % 16) as usize,
            max_depth: 1 + (next() % 8) as usize,
            max_branch: 1 + (next() % 4) as usize,
        };
        check_budget(&ngram.propose(&seq, &b).unwrap(), &b);
        check_budget(&suffix.propose(&seq, &b).unwrap(), &b);
        if next() % 4 == 0 {
            suffix.finish(&seq);
        }
    }
    assert!(suffix.corpus_tokens() <= 4096);
}

#[test]
fn suffix_reuses_previous_outputs() {
    let mut d = SuffixDrafter::new(16, 1 << 16);
    let doc: Vec<u32> = (100..140).collect();
    d.finish(&doc);
    // A new session that starts like the document gets the document's continuation.
    let t = d.propose(&[1, 2, 100, 101, 102, 103], &DraftBudget::chain(5)).unwrap();
    assert_eq!(t.tokens, vec![104, 105, 106, 107, 108]);
    // Continuations never run past the end of a document into the next one.
    let t = d.propose(&[138, 139], &DraftBudget::chain(5)).unwrap();
    assert!(t.is_empty(), "{t:?}");
}

#[test]
fn suffix_corpus_is_bounded() {
    let mut d = SuffixDrafter::new(8, 1000);
    for i in 0..100u32 {
        d.finish(&[i; 50]);
    }
    assert!(d.corpus_tokens() <= 1000);
    let t0 = std::time::Instant::now();
    let big: Vec<u32> = (0..200_000u32).map(|i| i % 5000).collect();
    let mut big_drafter = SuffixDrafter::new(16, 1 << 20);
    big_drafter.finish(&big);
    for i in 0..200 {
        let seq: Vec<u32> = (i..i + 40).collect();
        big_drafter.propose(&seq, &DraftBudget::chain(6)).unwrap();
    }
    assert!(t0.elapsed().as_secs_f64() < 20.0, "indexing and proposing stay fast");
}

/// A model drafter's tree: within budget, children in draft order, its spine the drafter's own
/// greedy chain, and the drafter's cache unharmed by the grown rows (its next chain equals a
/// fresh drafter's).
#[test]
fn model_drafter_grows_a_best_first_tree() {
    use specswarm_engine::hub;
    use specswarm_spec::drafter::model::ModelDrafter;
    let path = hub::ensure(hub::known("smollm2-135m").unwrap(), &mut |m| eprintln!("{m}")).unwrap();
    let make = || ModelDrafter::self_draft(&path, 6, 30, 2).unwrap();
    let seq: Vec<u32> = vec![1, 504, 3458, 282, 4194, 314, 253, 1835, 28, 4469, 314];
    let mut d = make();
    for b in [
        DraftBudget { max_nodes: 16, max_depth: 5, max_branch: 3 },
        DraftBudget { max_nodes: 40, max_depth: 8, max_branch: 6 },
        DraftBudget { max_nodes: 7, max_depth: 2, max_branch: 4 },
    ] {
        let t = d.propose(&seq, &b).unwrap();
        check_budget(&t, &b);
        assert_eq!(t.len(), b.max_nodes, "{b:?}: the budget is used");
        let path_prob = |i: usize| t.path_to(i).iter().map(|&j| f64::from(t.probs[j])).product::<f64>();
        for node in std::iter::once(None).chain((0..t.len()).map(Some)) {
            let kids: Vec<usize> = t.children(node).collect();
            assert!(kids.windows(2).all(|w| t.probs[w[0]] >= t.probs[w[1]]), "children in draft order");
        }
        // A path never gains probability, so the best `max_nodes` are closed under ancestors.
        for i in 0..t.len() {
            if t.parents[i] >= 0 {
                assert!(path_prob(i) <= path_prob(t.parents[i] as usize) + 1e-9);
            }
        }
        // The spine (first child at every level) is the drafter's greedy chain.
        let mut spine = Vec::new();
        let mut at = None;
        while let Some(c) = t.children(at).next() {
            spine.push(t.tokens[c]);
            at = Some(c);
        }
        let chain = make().propose(&seq, &DraftBudget::chain(spine.len())).unwrap();
        assert_eq!(chain.tokens, spine[..chain.len()], "{b:?}: the spine is the greedy chain");
        // The grown rows left the cache as it was.
        let again = d.propose(&seq, &DraftBudget::chain(4)).unwrap();
        assert_eq!(again, make().propose(&seq, &DraftBudget::chain(4)).unwrap());
    }
}
