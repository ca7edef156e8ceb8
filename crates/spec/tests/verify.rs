//! Verification rules against a synthetic target whose distribution is known exactly.
//!
//! The "model" is a deterministic function of the last two context tokens to logits over a
//! vocabulary of 6 (a seeded xorshift), so the target's joint distribution of the next two tokens
//! p(t1)·p(t2 | t1) is computed exactly by enumeration through the real sampler chain.
//!
//! Distribution tests take the first two emitted tokens of each verification. When a verification
//! emits only one token, the second is drawn from the target directly (plain decoding's next step,
//! with the same sampler): the joint of (t1, t2) is then exactly p(t1)·p(t2 | t1) iff the verifier
//! is exact for the tokens it emits. Each test compares the empirical joint of 20,000 runs (each
//! with its own RNG stream) with the exact one by chi-square (cells with expected count < 5 are
//! pooled; critical value at p = 0.999 by Wilson–Hilferty) and by total variation. All seeds are
//! fixed, so the tests are deterministic. Negative controls (wrong rules) must fail the same test.

use specswarm_engine::sampling::{Distribution, Rng, Sampler, SamplerConfig, argmax};
use specswarm_spec::tree::DraftTree;
use specswarm_spec::verify::{Verdict, verify_chain_stochastic, verify_tree};

const V: usize = 6;
const RUNS: u64 = 20_000;
const TV_MAX: f64 = 0.03;

// ---------------------------------------------------------------------------------------------
// Synthetic model

#[derive(Clone, Copy)]
struct Model {
    seed: u64,
    scale: f32,
    vocab: usize,
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Model {
    const fn new(seed: u64) -> Model {
        Model { seed, scale: 2.5, vocab: V }
    }

    /// Logits for the next token after `ctx`, a function of its last two tokens only.
    fn logits(&self, ctx: &[u32]) -> Vec<f32> {
        let last = |k: usize| ctx.len().checked_sub(k).map_or(self.vocab as u64, |i| u64::from(ctx[i]));
        let mut x = mix(self.seed ^ mix(last(1) + 1) ^ mix((last(2) + 1) << 20)) | 1;
        (0..self.vocab)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * self.scale
            })
            .collect()
    }

    /// Target logits for `tree` in batch layout: row 0 after `history`, row i + 1 after
    /// `history` + the path to node i.
    fn batch_logits(&self, tree: &DraftTree, history: &[u32]) -> Vec<f32> {
        let mut out = self.logits(history);
        for i in 0..tree.len() {
            let mut ctx = history.to_vec();
            ctx.extend(tree.path_to(i).iter().map(|&n| tree.tokens[n]));
            out.extend(self.logits(&ctx));
        }
        out
    }
}

const TARGET: Model = Model::new(0x5eed_0001);
const DRAFTER: Model = Model::new(0xd4af_7002);
const HISTORY: [u32; 5] = [3, 1, 4, 1, 5];

fn cfg(temperature: f32, top_k: usize) -> SamplerConfig {
    SamplerConfig { temperature, top_k, ..SamplerConfig::default() }
}

fn with_penalties(mut c: SamplerConfig) -> SamplerConfig {
    c.repetition_penalty = 1.5;
    c.presence_penalty = 0.7;
    c.frequency_penalty = 0.3;
    c
}

fn sampler(c: &SamplerConfig, seed: u64) -> Sampler {
    Sampler::new(SamplerConfig { seed, ..c.clone() }).unwrap()
}

fn target_configs() -> Vec<(&'static str, SamplerConfig)> {
    vec![("T0.8 top_k4", cfg(0.8, 4)), ("T1", cfg(1.0, 0)), ("T1 + penalties", with_penalties(cfg(1.0, 0)))]
}

fn appended(h: &[u32], t: u32) -> Vec<u32> {
    let mut v = h.to_vec();
    v.push(t);
    v
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Exact p(t1)·p(t2 | t1) of the target after `history`, as a V×V table.
fn exact_joint(model: &Model, c: &SamplerConfig, history: &[u32]) -> Vec<f64> {
    let s = sampler(c, 0);
    let mut joint = vec![0.0; V * V];
    let d1 = s.distribution(&model.logits(history), history);
    for (&t1, &p1) in d1.tokens.iter().zip(&d1.probs) {
        let h = appended(history, t1);
        let d2 = s.distribution(&model.logits(&h), &h);
        for (&t2, &p2) in d2.tokens.iter().zip(&d2.probs) {
            joint[t1 as usize * V + t2 as usize] += f64::from(p1) * f64::from(p2);
        }
    }
    joint
}

/// Critical value of chi-square with `df` degrees of freedom at p = 0.999 (Wilson–Hilferty).
fn chi2_critical_999(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232_306; // standard normal 0.999 quantile
    let a = 2.0 / (9.0 * k);
    k * (1.0 - a + z * a.sqrt()).powi(3)
}

#[derive(Debug)]
struct Fit {
    chi2: f64,
    df: usize,
    critical: f64,
    tv: f64,
}

fn fit(counts: &[u64], exact: &[f64]) -> Fit {
    let n: u64 = counts.iter().sum();
    let nf = n as f64;
    let (mut chi2, mut bins) = (0.0, 0usize);
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    let mut tv = 0.0;
    for (&c, &p) in counts.iter().zip(exact) {
        tv += (c as f64 / nf - p).abs();
        let e = p * nf;
        if p <= 0.0 {
            if c > 0 {
                chi2 = f64::INFINITY; // an impossible pair was emitted
            }
        } else if e < 5.0 {
            pooled_obs += c as f64;
            pooled_exp += e;
        } else {
            chi2 += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_exp > 0.0 {
        chi2 += (pooled_obs - pooled_exp).powi(2) / pooled_exp;
        bins += 1;
    }
    let df = bins.saturating_sub(1).max(1);
    Fit { chi2, df, critical: chi2_critical_999(df), tv: tv / 2.0 }
}

/// Counts of (t1, t2) over `RUNS` runs, run `r` getting RNG seed `seed_base + r`.
fn empirical(seed_base: u64, mut run: impl FnMut(u64) -> (u32, u32)) -> Vec<u64> {
    let mut counts = vec![0u64; V * V];
    for r in 0..RUNS {
        let (a, b) = run(seed_base + r);
        counts[a as usize * V + b as usize] += 1;
    }
    counts
}

fn assert_exact(name: &str, counts: &[u64], exact: &[f64]) {
    let f = fit(counts, exact);
    eprintln!("PASS? {name:<60} chi2 = {:8.2} (df {:2}, crit {:6.2})  TV = {:.4}", f.chi2, f.df, f.critical, f.tv);
    assert!(f.chi2 < f.critical, "{name}: chi2 {} ≥ critical {} (df {})", f.chi2, f.critical, f.df);
    assert!(f.tv < TV_MAX, "{name}: TV {} ≥ {TV_MAX}", f.tv);
}

fn assert_inexact(name: &str, counts: &[u64], exact: &[f64]) {
    let f = fit(counts, exact);
    eprintln!("FAIL? {name:<60} chi2 = {:8.2} (df {:2}, crit {:6.2})  TV = {:.4}", f.chi2, f.df, f.critical, f.tv);
    assert!(f.chi2 > f.critical, "negative control {name} passed: chi2 {} ≤ critical {}", f.chi2, f.critical);
}

/// The first two tokens of `emitted`; with only one, the second is drawn from the target after it
/// (plain decoding's next step, same sampler).
fn first_two(emitted: &[u32], history: &[u32], s: &mut Sampler) -> (u32, u32) {
    if emitted.len() >= 2 {
        return (emitted[0], emitted[1]);
    }
    let h = appended(history, emitted[0]);
    (emitted[0], s.sample(&TARGET.logits(&h), &h))
}

// ---------------------------------------------------------------------------------------------
// Fixed trees for the distribution tests

/// Chooses a node's children from (its logits, its context, levels left).
type Pick<'a> = dyn Fn(&[f32], &[u32], usize) -> Vec<u32> + 'a;

/// Grow `depth` levels under `parent`, the children of each node chosen by `pick` from the logits
/// (and context) at that node.
fn grow(tree: &mut DraftTree, parent: i32, ctx: &[u32], depth: usize, pick: &Pick<'_>) {
    if depth == 0 {
        return;
    }
    for t in pick(&TARGET.logits(ctx), ctx, depth) {
        let node = tree.push(t, parent, 1.0) as i32;
        grow(tree, node, &appended(ctx, t), depth - 1, pick);
    }
}

/// Token ids sorted by descending target logit (ties by id).
fn by_logit(l: &[f32]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..l.len() as u32).collect();
    ids.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
    ids
}

fn fixed_trees(c: &SamplerConfig) -> Vec<(&'static str, DraftTree)> {
    let s = sampler(c, 0);
    let mut chain = DraftTree::default();
    // The target's most likely token at each step (after penalties): a high-acceptance chain.
    grow(&mut chain, -1, &HISTORY, 4, &|l, ctx, _| vec![s.distribution(l, ctx).tokens[0]]);
    assert!(chain.is_chain() && chain.len() == 4);
    let mut bushy = DraftTree::default();
    // 3 likely tokens + a duplicate of the first at the root, 2 under each, then 1.
    grow(&mut bushy, -1, &HISTORY, 3, &|l, ctx, depth| {
        let d = s.distribution(l, ctx);
        let mut v: Vec<u32> = d.tokens.iter().copied().take([0, 1, 2, 3][depth]).collect();
        if depth == 3 {
            v.push(v[0]);
        }
        v
    });
    let mut unlikely = DraftTree::default();
    // The two lowest-logit tokens at each node: cut by top-k 4, rare at T = 1.
    grow(&mut unlikely, -1, &HISTORY, 3, &|l, _, _| by_logit(l)[V - 2..].to_vec());
    vec![("chain", chain), ("bushy tree", bushy), ("tree of unlikely tokens", unlikely)]
}

// ---------------------------------------------------------------------------------------------
// 1. Greedy: the emitted tokens are the plain greedy continuation

fn greedy_continuation(c: &SamplerConfig, history: &[u32], n: usize) -> Vec<u32> {
    let mut s = sampler(c, 0);
    let mut h = history.to_vec();
    for _ in 0..n {
        let t = s.sample(&TARGET.logits(&h), &h);
        h.push(t);
    }
    h[history.len()..].to_vec()
}

/// The longest root path of `tree` spelling a prefix of `seq` (first child on duplicates).
fn longest_prefix_path(tree: &DraftTree, seq: &[u32]) -> Vec<usize> {
    let mut path = Vec::new();
    let mut node = -1i32;
    for &t in seq {
        match (0..tree.len()).find(|&c| tree.parents[c] == node && tree.tokens[c] == t) {
            Some(c) => {
                path.push(c);
                node = c as i32;
            }
            None => break,
        }
    }
    path
}

fn random_history(rng: &mut Rng, vocab: usize) -> Vec<u32> {
    let len = 1 + (rng.next_u64() % 6) as usize;
    (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

#[test]
fn greedy_tree_equals_plain_greedy_decoding() {
    let mut rng = Rng::new(11);
    for c in [SamplerConfig::greedy(), with_penalties(SamplerConfig::greedy())] {
        let (mut accepted_total, mut trials) = (0usize, 0usize);
        for trial in 0..2000u64 {
            let history = random_history(&mut rng, V);
            let greedy = greedy_continuation(&c, &history, 20);
            // Random tree, each node the greedy token with probability 0.6, else a random one.
            let mut tree = DraftTree::default();
            for i in 0..(rng.next_u64() % 16) as usize {
                let parent = (rng.next_u64() % (i as u64 + 1)) as i32 - 1;
                let depth = if parent < 0 { 0 } else { tree.depth(parent as usize) };
                let on_greedy = parent < 0
                    || tree
                        .path_to(parent as usize)
                        .iter()
                        .map(|&n| tree.tokens[n])
                        .eq(greedy[..depth].iter().copied());
                let t =
                    if on_greedy && rng.next_f64() < 0.6 { greedy[depth] } else { (rng.next_u64() % V as u64) as u32 };
                tree.push(t, parent, 1.0);
            }
            let logits = TARGET.batch_logits(&tree, &history);
            let mut s = sampler(&c, trial);
            let v = verify_tree(&tree, &logits, V, &history, &mut s);
            let emitted = v.emitted(&tree);
            assert_eq!(emitted, greedy[..emitted.len()], "trial {trial}: {tree:?}");
            assert_eq!(v.accepted, longest_prefix_path(&tree, &greedy), "trial {trial}: not maximal");
            assert_eq!(s.rng_mut().next_u64(), Rng::new(trial).next_u64(), "greedy consumed randomness");
            accepted_total += v.accepted.len();
            trials += 1;
        }
        eprintln!("greedy tree ({c:?}): mean accepted {:.2}", accepted_total as f64 / trials as f64);
        assert!(accepted_total > trials, "the test must exercise acceptance");
    }
}

#[test]
fn greedy_chain_stochastic_equals_plain_greedy_decoding() {
    let mut rng = Rng::new(12);
    for c in [SamplerConfig::greedy(), with_penalties(SamplerConfig::greedy())] {
        let mut accepted_total = 0usize;
        for trial in 0..2000u64 {
            let history = random_history(&mut rng, V);
            let greedy = greedy_continuation(&c, &history, 20);
            let n = (rng.next_u64() % 6) as usize;
            let tokens: Vec<u32> = (0..n)
                .map(|i| if rng.next_f64() < 0.8 { greedy[i] } else { (rng.next_u64() % V as u64) as u32 })
                .collect();
            // Arbitrary draft distributions, sometimes missing the drafted token.
            let dists: Vec<Distribution> = (0..n)
                .map(|_| {
                    let k = 1 + (rng.next_u64() % V as u64) as usize;
                    let w: Vec<f64> = (0..k).map(|_| rng.next_f64() + 0.01).collect();
                    let sum: f64 = w.iter().sum();
                    let mut probs: Vec<f32> = w.iter().map(|x| (x / sum) as f32).collect();
                    probs.sort_by(|a, b| b.total_cmp(a));
                    Distribution { tokens: (0..k as u32).collect(), probs }
                })
                .collect();
            let mut tree = DraftTree::chain(&tokens);
            tree.probs = tokens.iter().zip(&dists).map(|(&t, d)| d.prob(t)).collect();
            let logits = TARGET.batch_logits(&tree, &history);
            let mut s = sampler(&c, trial);
            let v = verify_chain_stochastic(&tree, &dists, &logits, V, &history, &mut s);
            let emitted = v.emitted(&tree);
            assert_eq!(emitted, greedy[..emitted.len()], "trial {trial}: {tokens:?}");
            assert_eq!(v.accepted, longest_prefix_path(&tree, &greedy), "trial {trial}: not maximal");
            assert_eq!(s.rng_mut().next_u64(), Rng::new(trial).next_u64(), "greedy consumed randomness");
            accepted_total += v.accepted.len();
        }
        assert!(accepted_total > 2000, "the test must exercise acceptance");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. SpecExec is distribution-exact

#[test]
fn spec_exec_tree_is_distribution_exact() {
    for (cname, c) in target_configs() {
        let exact = exact_joint(&TARGET, &c, &HISTORY);
        for (k, (tname, tree)) in fixed_trees(&c).into_iter().enumerate() {
            let logits = TARGET.batch_logits(&tree, &HISTORY);
            let mut accepted = 0usize;
            // Fresh streams per shape: with a shared stream every shape would emit the same tokens
            // (see `spec_exec_emits_the_plain_sampled_stream`) and give identical statistics.
            let counts = empirical(1_000_000 * (k as u64 + 1), |seed| {
                let mut s = sampler(&c, seed);
                let v = verify_tree(&tree, &logits, V, &HISTORY, &mut s);
                accepted += v.accepted.len();
                first_two(&v.emitted(&tree), &HISTORY, &mut s)
            });
            let name = format!("verify_tree [{cname}] {tname} (mean accepted {:.2})", accepted as f64 / RUNS as f64);
            assert_exact(&name, &counts, &exact);
        }
    }
}

/// A stronger, pointwise property behind the statistics above: with the same seed, SpecExec emits
/// exactly the tokens plain sampled decoding would (each target draw takes one uniform number from
/// the same stream, in the same order, from the same distribution), whatever the tree, even one
/// built from that very future.
#[test]
fn spec_exec_emits_the_plain_sampled_stream() {
    let mut rng = Rng::new(13);
    for (cname, c) in target_configs() {
        let mut accepted_total = 0usize;
        for trial in 0..2000u64 {
            let history = random_history(&mut rng, V);
            let mut plain = sampler(&c, trial);
            let mut h = history.clone();
            for _ in 0..20 {
                let t = plain.sample(&TARGET.logits(&h), &h);
                h.push(t);
            }
            let future = &h[history.len()..];
            let mut tree = DraftTree::default();
            for i in 0..(rng.next_u64() % 16) as usize {
                let parent = (rng.next_u64() % (i as u64 + 1)) as i32 - 1;
                let depth = if parent < 0 { 0 } else { tree.depth(parent as usize) };
                let t = if rng.next_f64() < 0.6 { future[depth] } else { (rng.next_u64() % V as u64) as u32 };
                tree.push(t, parent, 1.0);
            }
            let logits = TARGET.batch_logits(&tree, &history);
            let mut s = sampler(&c, trial);
            let v = verify_tree(&tree, &logits, V, &history, &mut s);
            let emitted = v.emitted(&tree);
            assert_eq!(emitted, future[..emitted.len()], "[{cname}] trial {trial}: {tree:?}");
            assert_eq!(v.accepted, longest_prefix_path(&tree, future), "[{cname}] trial {trial}");
            accepted_total += v.accepted.len();
        }
        eprintln!("plain-stream coupling [{cname}]: mean accepted {:.2}", accepted_total as f64 / 2000.0);
        assert!(accepted_total > 1000, "the test must exercise acceptance");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The classic rule is distribution-exact for chains sampled from q ≠ p

/// How the drafter proposes a chain.
#[derive(Clone)]
struct Draft {
    name: &'static str,
    /// The drafter's sampler (greedy: q is a point mass on its argmax).
    cfg: SamplerConfig,
    gamma: usize,
    /// Propose the target's second most likely token while reporting a q that excludes it (a
    /// drafter whose token is not drawn from its q), exercising the point-mass fallback.
    off_support: bool,
}

fn drafts() -> Vec<Draft> {
    let d = |name, cfg, gamma, off_support| Draft { name, cfg, gamma, off_support };
    vec![
        d("q T1, γ=3", cfg(1.0, 0), 3, false),
        d("q T0.7 top_k3, γ=3", cfg(0.7, 3), 3, false),
        d("q T1, γ=1 (bonus is t2)", cfg(1.0, 0), 1, false),
        d("q point mass, γ=3", SamplerConfig::greedy(), 3, false),
        d("x outside q, γ=2", SamplerConfig::greedy(), 2, true),
    ]
}

/// A chain drafted as `draft` says, and the drafter's distributions.
fn draft_chain(draft: &Draft, seed: u64) -> (DraftTree, Vec<Distribution>) {
    let mut s = sampler(&draft.cfg, seed);
    let mut ctx = HISTORY.to_vec();
    let mut tree = DraftTree::default();
    let mut dists = Vec::new();
    for i in 0..draft.gamma {
        let d = s.distribution(&DRAFTER.logits(&ctx), &ctx);
        let (x, d) = if draft.off_support {
            let x = by_logit(&TARGET.logits(&ctx))[1];
            (x, Distribution { tokens: vec![(x + 1) % V as u32], probs: vec![1.0] })
        } else if draft.cfg.is_greedy() {
            (d.tokens[0], d)
        } else {
            (s.sample_from(&d), d)
        };
        tree.push(x, i as i32 - 1, d.prob(x));
        ctx.push(x);
        dists.push(d);
    }
    (tree, dists)
}

#[test]
fn classic_chain_rule_is_distribution_exact() {
    for (cname, c) in target_configs() {
        let exact = exact_joint(&TARGET, &c, &HISTORY);
        for draft in drafts() {
            let qname = draft.name;
            let mut accepted = 0usize;
            let counts = empirical(2_000_000, |seed| {
                let (tree, dists) = draft_chain(&draft, seed ^ 0xabcd_0000_0000);
                let logits = TARGET.batch_logits(&tree, &HISTORY);
                let mut s = sampler(&c, seed);
                let v = verify_chain_stochastic(&tree, &dists, &logits, V, &HISTORY, &mut s);
                accepted += v.accepted.len();
                first_two(&v.emitted(&tree), &HISTORY, &mut s)
            });
            let name =
                format!("verify_chain_stochastic [{cname}] {qname} (mean acc {:.2})", accepted as f64 / RUNS as f64);
            assert_exact(&name, &counts, &exact);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Negative controls: wrong rules fail the same test

/// Wrong: accept every drafted token (down the first child), then sample the target's next token.
fn accept_all(tree: &DraftTree, logits: &[f32], history: &[u32], s: &mut Sampler) -> Vec<u32> {
    let mut ctx = history.to_vec();
    let mut node = -1i32;
    while let Some(c) = (0..tree.len()).find(|&c| tree.parents[c] == node) {
        ctx.push(tree.tokens[c]);
        node = c as i32;
    }
    let row = (node + 1) as usize;
    let next = s.sample(&logits[row * V..(row + 1) * V], &ctx);
    ctx.push(next);
    ctx[history.len()..].to_vec()
}

/// Wrong: the classic min(1, p/q) test, but the correction drawn from p instead of
/// norm(max(0, p − q)).
fn classic_without_residual(
    tree: &DraftTree,
    dists: &[Distribution],
    logits: &[f32],
    history: &[u32],
    s: &mut Sampler,
) -> Vec<u32> {
    let mut ctx = history.to_vec();
    for (i, q) in dists.iter().enumerate() {
        let p = s.distribution(&logits[i * V..(i + 1) * V], &ctx);
        let x = tree.tokens[i];
        if s.rng_mut().next_f64() >= f64::from(p.prob(x)) / f64::from(q.prob(x)) {
            ctx.push(s.sample_from(&p));
            return ctx[history.len()..].to_vec();
        }
        ctx.push(x);
    }
    let p = s.distribution(&logits[tree.len() * V..], &ctx);
    ctx.push(s.sample_from(&p));
    ctx[history.len()..].to_vec()
}

#[test]
fn negative_controls_fail() {
    for (cname, c) in target_configs() {
        let exact = exact_joint(&TARGET, &c, &HISTORY);
        let bushy = fixed_trees(&c).remove(1).1;
        let logits = TARGET.batch_logits(&bushy, &HISTORY);
        let counts = empirical(3_000_000, |seed| {
            let mut s = sampler(&c, seed);
            first_two(&accept_all(&bushy, &logits, &HISTORY, &mut s), &HISTORY, &mut s)
        });
        assert_inexact(&format!("accept-all [{cname}] bushy tree"), &counts, &exact);
        for draft in drafts().into_iter().take(2) {
            let qname = draft.name;
            let counts = empirical(4_000_000, |seed| {
                let (tree, _) = draft_chain(&draft, seed ^ 0xabcd_0000_0000);
                let logits = TARGET.batch_logits(&tree, &HISTORY);
                let mut s = sampler(&c, seed);
                first_two(&accept_all(&tree, &logits, &HISTORY, &mut s), &HISTORY, &mut s)
            });
            assert_inexact(&format!("accept-all [{cname}] sampled chain {qname}"), &counts, &exact);
            let counts = empirical(5_000_000, |seed| {
                let (tree, dists) = draft_chain(&draft, seed ^ 0xabcd_0000_0000);
                let logits = TARGET.batch_logits(&tree, &HISTORY);
                let mut s = sampler(&c, seed);
                first_two(&classic_without_residual(&tree, &dists, &logits, &HISTORY, &mut s), &HISTORY, &mut s)
            });
            assert_inexact(&format!("min(1,p/q) without residual [{cname}] {qname}"), &counts, &exact);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. verify_tree against an independent recursive walker of the SpecExec rule

/// Brute force: draw the target's token with `Sampler::sample` at `node`'s row, scan every node
/// for the first child of `node` with that token, recurse into it or stop.
fn brute_force(
    tree: &DraftTree,
    logits: &[f32],
    vocab: usize,
    history: &[u32],
    s: &mut Sampler,
    node: i32,
    path: Vec<usize>,
) -> Verdict {
    let row = (node + 1) as usize;
    let mut ctx = history.to_vec();
    ctx.extend(path.iter().map(|&n| tree.tokens[n]));
    let y = s.sample(&logits[row * vocab..(row + 1) * vocab], &ctx);
    for c in 0..tree.len() {
        if tree.parents[c] == node && tree.tokens[c] == y {
            let mut path = path;
            path.push(c);
            return brute_force(tree, logits, vocab, history, s, c as i32, path);
        }
    }
    Verdict { accepted: path, next: y }
}

#[test]
fn verify_tree_matches_brute_force_walker() {
    let configs = [
        SamplerConfig::greedy(),
        cfg(1.0, 0),
        cfg(0.8, 4),
        SamplerConfig { temperature: 0.7, top_p: 0.9, min_p: 0.05, ..SamplerConfig::default() },
        with_penalties(cfg(1.0, 0)),
        with_penalties(SamplerConfig::greedy()),
    ];
    let mut rng = Rng::new(5);
    let (mut accepted_total, mut dup_trees, mut dup_taken) = (0usize, 0usize, 0usize);
    for trial in 0..1000u64 {
        let vocab = 3 + (rng.next_u64() % 4) as usize;
        let c = &configs[trial as usize % configs.len()];
        let history = random_history(&mut rng, vocab);
        // Random logits, one row per node as it is created; peaked rows (scale up to 6) and tokens
        // often the parent row's argmax, so that deep paths occur.
        let scale = 1.0 + 5.0 * rng.next_f64() as f32;
        let random_row =
            |rng: &mut Rng| -> Vec<f32> { (0..vocab).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect() };
        let mut logits = random_row(&mut rng);
        let mut tree = DraftTree::default();
        for i in 0..(rng.next_u64() % 16) as usize {
            if i > 0 && rng.next_f64() < 0.25 {
                // An explicit duplicate: a sibling of an earlier node with the same token.
                let j = (rng.next_u64() % i as u64) as usize;
                tree.push(tree.tokens[j], tree.parents[j], 1.0);
            } else {
                let parent = (rng.next_u64() % (i as u64 + 1)) as i32 - 1;
                let row = (parent + 1) as usize;
                let t = if rng.next_f64() < 0.5 {
                    argmax(&logits[row * vocab..(row + 1) * vocab])
                } else {
                    (rng.next_u64() % vocab as u64) as u32
                };
                tree.push(t, parent, 1.0);
            }
            logits.extend(random_row(&mut rng));
        }
        let has_dup = (0..tree.len())
            .any(|a| (0..a).any(|b| tree.parents[a] == tree.parents[b] && tree.tokens[a] == tree.tokens[b]));
        dup_trees += usize::from(has_dup);
        let mut a = sampler(c, trial);
        let mut b = sampler(c, trial);
        let got = verify_tree(&tree, &logits, vocab, &history, &mut a);
        let want = brute_force(&tree, &logits, vocab, &history, &mut b, -1, Vec::new());
        assert_eq!(got, want, "trial {trial}: {tree:?} {c:?}");
        assert_eq!(a.rng_mut().next_u64(), b.rng_mut().next_u64(), "trial {trial}: RNG streams diverged");
        accepted_total += got.accepted.len();
        // A taken node with an earlier same-token sibling would be a bug; count the cases where
        // a later duplicate exists beside a taken node (the rule must have picked the first).
        for &n in &got.accepted {
            dup_taken += usize::from(
                (n + 1..tree.len()).any(|m| tree.parents[m] == tree.parents[n] && tree.tokens[m] == tree.tokens[n]),
            );
        }
    }
    eprintln!(
        "brute force: 1000 trees, {dup_trees} with duplicate siblings, {accepted_total} accepted nodes, \
         {dup_taken} taken nodes with a later duplicate sibling"
    );
    assert!(accepted_total > 700 && dup_taken > 100, "the random trees must exercise descent and duplicates");
}

/// Shape errors panic rather than read out of bounds.
#[test]
#[should_panic(expected = "batch layout")]
fn wrong_logits_shape_panics() {
    let tree = DraftTree::chain(&[1, 2]);
    let mut s = sampler(&cfg(1.0, 0), 0);
    verify_tree(&tree, &[0.0; 2 * V], V, &HISTORY, &mut s);
}
