//! Tests for the seeded RNG and the sampler chain.

use specswarm_engine::rng::Rng;
use specswarm_engine::sampling::{Distribution, Sampler, SamplerConfig, SamplingError};

// ---------------------------------------------------------------- RNG ----

#[test]
fn rng_pinned_seed_42() {
    // xoshiro256** seeded via splitmix64 (seed 42). These values were computed
    // from this implementation AND cross-checked against an independent Python
    // reference implementation of splitmix64 + xoshiro256** (arbitrary-precision
    // ints masked to 64 bits). They must never change: see the stability
    // guarantee in `rng.rs`.
    let mut r = Rng::new(42);
    let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
    assert_eq!(got, [1546998764402558742, 6990951692964543102, 12544586762248559009, 17057574109182124193]);
}

#[test]
fn rng_floats_are_fixed_functions_of_u64() {
    let mut a = Rng::new(7);
    let mut b = Rng::new(7);
    for _ in 0..1000 {
        let f = a.next_f64();
        let x = b.next_u64();
        assert_eq!(f, (x >> 11) as f64 / (1u64 << 53) as f64);
        assert!((0.0..1.0).contains(&f));
        let g = a.next_f32();
        let y = b.next_u64();
        assert_eq!(g, (y >> 40) as f32 / (1u32 << 24) as f32);
        assert!((0.0..1.0).contains(&g));
    }
}

#[test]
fn rng_seeds_differ_and_clone_continues_stream() {
    let mut a = Rng::new(0);
    let mut b = Rng::new(1);
    assert_ne!(a.next_u64(), b.next_u64());
    let mut c = a.clone();
    for _ in 0..10 {
        assert_eq!(a.next_u64(), c.next_u64());
    }
}

// ------------------------------------------------------------ helpers ----

/// Synthetic 8-token vocabulary (ids deliberately not in logit order).
const LOGITS: [f32; 8] = [0.5, 2.0, -1.0, 1.2, 0.0, 1.6, -2.0, 0.9];

fn cfg(temperature: f32) -> SamplerConfig {
    SamplerConfig { temperature, seed: 1234, ..SamplerConfig::default() }
}

/// Independent reference of the chain in f64 with a full sort; `logits` are
/// already penalized. Returns a dense probability vector.
fn reference(logits: &[f64], t: f64, top_k: usize, top_p: f64, min_p: f64) -> Vec<f64> {
    let n = logits.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let w: Vec<f64> = order.iter().map(|&i| (logits[i] / t).exp()).collect();
    let z: f64 = w.iter().sum();
    let p: Vec<f64> = w.iter().map(|x| x / z).collect();
    let mut cut = order.len();
    let mut cum = 0.0;
    for (j, x) in p.iter().enumerate() {
        cum += x;
        if cum >= top_p {
            cut = j + 1;
            break;
        }
    }
    let pmax = p[0];
    let kept: Vec<(usize, f64)> =
        order[..cut].iter().zip(&p[..cut]).filter(|&(_, &x)| x >= min_p * pmax).map(|(&i, &x)| (i, x)).collect();
    let z2: f64 = kept.iter().map(|x| x.1).sum();
    let mut dense = vec![0.0; n];
    for (i, x) in kept {
        dense[i] = x / z2;
    }
    dense
}

const N: usize = 50_000;

fn draw_counts(c: SamplerConfig, logits: &[f32], history: &[u32]) -> Vec<u64> {
    let mut s = Sampler::new(c).unwrap();
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..N {
        counts[s.sample(logits, history) as usize] += 1;
    }
    counts
}

/// 0.999 quantiles of the chi-square distribution, indexed by degrees of freedom.
const CHI2_999: [f64; 9] = [f64::NAN, 10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124];

/// Chi-square statistic over the support of `expected`; panics if a token
/// outside the support was drawn. Returns (chi2, degrees of freedom).
fn chi2(counts: &[u64], expected: &[f64]) -> (f64, usize) {
    let mut stat = 0.0;
    let mut support = 0;
    for (i, (&c, &p)) in counts.iter().zip(expected).enumerate() {
        if p == 0.0 {
            assert_eq!(c, 0, "token {i} must be excluded but was drawn {c} times");
            continue;
        }
        support += 1;
        let e = p * N as f64;
        assert!(e >= 5.0, "expected count too small for chi-square");
        stat += (c as f64 - e).powi(2) / e;
    }
    (stat, support - 1)
}

fn assert_fits(name: &str, counts: &[u64], expected: &[f64], support: usize) {
    assert_eq!(expected.iter().filter(|&&p| p > 0.0).count(), support, "{name}: reference support");
    let (stat, df) = chi2(counts, expected);
    println!("{name}: chi2 = {stat:.3}, df = {df}, critical(0.999) = {}", CHI2_999[df]);
    assert!(stat < CHI2_999[df], "{name}: chi2 {stat} >= {} (df {df})", CHI2_999[df]);
}

fn logits64(l: &[f32]) -> Vec<f64> {
    l.iter().map(|&x| f64::from(x)).collect()
}

// ------------------------------------------------------ determinism ----

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let run = |seed| {
        let mut s = Sampler::new(SamplerConfig { seed, ..cfg(1.0) }).unwrap();
        (0..1000).map(|_| s.sample(&LOGITS, &[])).collect::<Vec<u32>>()
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
    // Sanity: the sequence is not constant.
    assert!(a.iter().any(|&t| t != a[0]));
}

#[test]
fn sample_equals_sample_from_distribution_one_draw_each() {
    let c = SamplerConfig { top_k: 5, top_p: 0.95, seed: 99, ..cfg(0.9) };
    let mut a = Sampler::new(c.clone()).unwrap();
    let mut b = Sampler::new(c).unwrap();
    let mut r = Rng::new(99);
    for _ in 0..500 {
        let d = b.distribution(&LOGITS, &[]);
        let x = a.sample(&LOGITS, &[]);
        let y = b.sample_from(&d);
        assert_eq!(x, y);
        // Exactly one next_f64 per draw, inverse CDF over the sorted list.
        assert_eq!(d.inverse_cdf(r.next_f64()), x);
    }
    assert_eq!(a.rng_mut().next_u64(), r.next_u64());
}

// --------------------------------------------------------- chi-square ----

#[test]
fn chi2_temperature_0_7() {
    let exp = reference(&logits64(&LOGITS), 0.7, 0, 1.0, 0.0);
    let counts = draw_counts(cfg(0.7), &LOGITS, &[]);
    assert_fits("T=0.7", &counts, &exp, 8);
}

#[test]
fn chi2_top_k_3() {
    let exp = reference(&logits64(&LOGITS), 1.0, 3, 1.0, 0.0);
    let counts = draw_counts(SamplerConfig { top_k: 3, ..cfg(1.0) }, &LOGITS, &[]);
    assert_fits("top_k=3", &counts, &exp, 3);
}

#[test]
fn chi2_top_p_0_8() {
    let exp = reference(&logits64(&LOGITS), 1.0, 0, 0.8, 0.0);
    let counts = draw_counts(SamplerConfig { top_p: 0.8, ..cfg(1.0) }, &LOGITS, &[]);
    assert_fits("top_p=0.8", &counts, &exp, 4);
}

#[test]
fn chi2_min_p_0_1() {
    let exp = reference(&logits64(&LOGITS), 1.0, 0, 1.0, 0.1);
    let counts = draw_counts(SamplerConfig { min_p: 0.1, ..cfg(1.0) }, &LOGITS, &[]);
    assert_fits("min_p=0.1", &counts, &exp, 6);
}

#[test]
fn chi2_combination_with_penalties() {
    // History: token 5 twice, token 0 once, and an out-of-vocabulary id.
    let history = [5u32, 5, 0, 9];
    let (rep, freq, pres) = (1.3f64, 0.1f64, 0.2f64);
    let mut pen = logits64(&LOGITS);
    for (i, c) in [(5usize, 2.0f64), (0, 1.0)] {
        let l = pen[i];
        pen[i] = if l > 0.0 { l / rep } else { l * rep } - (c * freq + pres);
    }
    let exp = reference(&pen, 0.8, 6, 0.9, 0.24);
    let c = SamplerConfig {
        top_k: 6,
        top_p: 0.9,
        min_p: 0.24,
        repetition_penalty: rep as f32,
        frequency_penalty: freq as f32,
        presence_penalty: pres as f32,
        ..cfg(0.8)
    };
    let counts = draw_counts(c, &LOGITS, &history);
    assert_fits("combo", &counts, &exp, 3);
}

#[test]
fn chi2_negative_control_detects_wrong_distribution() {
    // T=1 samples tested against the T=0.7 expectation must be rejected.
    let exp = reference(&logits64(&LOGITS), 0.7, 0, 1.0, 0.0);
    let counts = draw_counts(cfg(1.0), &LOGITS, &[]);
    let (stat, df) = chi2(&counts, &exp);
    println!("negative control: chi2 = {stat:.3}, df = {df}, critical(0.999) = {}", CHI2_999[df]);
    assert!(stat > CHI2_999[df], "chi-square failed to detect a wrong distribution: {stat}");
}

// ---------------------------------------------- distribution vs reference ----

fn random_logits(v: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..v).map(|_| ((r.next_f64() * 2.0 - 1.0) * scale) as f32).collect()
}

fn check_against_reference(logits: &[f32], c: SamplerConfig) {
    let s = Sampler::new(c.clone()).unwrap();
    let d = s.distribution(logits, &[]);
    let exp = reference(&logits64(logits), f64::from(c.temperature), c.top_k, f64::from(c.top_p), f64::from(c.min_p));
    let support: Vec<usize> = (0..logits.len()).filter(|&i| exp[i] > 0.0).collect();
    assert_eq!(d.len(), support.len(), "support size for {c:?}");
    let total: f64 = d.probs.iter().map(|&p| f64::from(p)).sum();
    assert!((total - 1.0).abs() < 1e-4, "sum {total}");
    for w in d.probs.windows(2) {
        assert!(w[0] >= w[1], "not sorted");
    }
    for (i, (&t, &p)) in d.tokens.iter().zip(&d.probs).enumerate() {
        let e = exp[t as usize];
        assert!(e > 0.0, "token {t} not in reference support");
        assert!((f64::from(p) - e).abs() <= 1e-6 + 1e-4 * e, "token {t}: {p} vs {e}");
        if i > 0 && d.probs[i - 1] == p {
            assert!(d.tokens[i - 1] < t, "ties must be ordered by id");
        }
    }
}

#[test]
fn large_vocab_matches_reference() {
    let v = 50_000;
    let logits = random_logits(v, 5, 12.0);
    // top-p on a large vocabulary exercises the partial-selection path.
    check_against_reference(&logits, SamplerConfig { top_p: 0.9, ..cfg(1.0) });
    check_against_reference(&logits, SamplerConfig { top_p: 0.5, ..cfg(0.5) });
    check_against_reference(&logits, SamplerConfig { top_p: 0.999, ..cfg(2.0) });
    check_against_reference(&logits, SamplerConfig { top_k: 40, ..cfg(1.0) });
    check_against_reference(&logits, SamplerConfig { top_k: 1000, top_p: 0.7, ..cfg(1.3) });
    check_against_reference(&logits, SamplerConfig { min_p: 0.05, ..cfg(1.0) });
    check_against_reference(&logits, SamplerConfig { min_p: 0.01, top_p: 0.95, ..cfg(1.5) });
    check_against_reference(&logits, cfg(1.0));
}

#[test]
fn distribution_ties_sorted_by_id() {
    let logits = [1.0f32, 3.0, 1.0, 3.0, 1.0];
    let d = Sampler::new(cfg(1.0)).unwrap().distribution(&logits, &[]);
    assert_eq!(d.tokens, [1, 3, 0, 2, 4]);
    // top-k cuts ties at the boundary by lowest id.
    let d = Sampler::new(SamplerConfig { top_k: 3, ..cfg(1.0) }).unwrap().distribution(&logits, &[]);
    assert_eq!(d.tokens, [1, 3, 0]);
}

#[test]
fn top_p_keeps_at_least_one_token() {
    let d = Sampler::new(SamplerConfig { top_p: 1e-6, ..cfg(1.0) }).unwrap().distribution(&LOGITS, &[]);
    assert_eq!(d, Distribution { tokens: vec![1], probs: vec![1.0] });
}

// ----------------------------------------------------------- penalties ----

fn penalized(c: SamplerConfig, logits: &[f32], history: &[u32]) -> Vec<f32> {
    Sampler::new(c).unwrap().penalized_logits(logits, history)
}

#[test]
fn penalties_hand_computed() {
    let logits = [2.0f32, -1.0, 0.5, 3.0, -0.5, 1.0];
    // Token 0 seen twice, 1 and 3 once, 9 is outside the vocabulary (ignored).
    let history = [0u32, 9, 0, 1, 3];
    let base = cfg(1.0);

    let rep = SamplerConfig { repetition_penalty: 2.0, ..base.clone() };
    assert_eq!(penalized(rep, &logits, &history), [1.0, -2.0, 0.5, 1.5, -0.5, 1.0]);

    let freq = SamplerConfig { frequency_penalty: 0.5, ..base.clone() };
    assert_eq!(penalized(freq, &logits, &history), [1.0, -1.5, 0.5, 2.5, -0.5, 1.0]);

    let pres = SamplerConfig { presence_penalty: 0.25, ..base.clone() };
    assert_eq!(penalized(pres, &logits, &history), [1.75, -1.25, 0.5, 2.75, -0.5, 1.0]);

    // Repetition first, then frequency and presence.
    let all = SamplerConfig { repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..base.clone() };
    assert_eq!(penalized(all.clone(), &logits, &history), [-0.25, -2.75, 0.5, 0.75, -0.5, 1.0]);

    // Window: only the last 2 ids (1, 3) count.
    let win = SamplerConfig { penalty_last_n: 2, ..all.clone() };
    assert_eq!(penalized(win, &logits, &history), [2.0, -2.75, 0.5, 0.75, -0.5, 1.0]);

    // Window 0 disables penalties.
    let none = SamplerConfig { penalty_last_n: 0, ..all };
    assert_eq!(penalized(none, &logits, &history), logits);

    // Negative penalties (allowed: finite) boost.
    let neg = SamplerConfig { frequency_penalty: -1.0, ..base };
    assert_eq!(penalized(neg, &logits, &history), [4.0, 0.0, 0.5, 4.0, -0.5, 1.0]);
}

#[test]
fn penalties_affect_distribution_and_greedy() {
    let logits = [3.0f32, 2.9, 0.0];
    let c = SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::greedy() };
    let mut s = Sampler::new(c).unwrap();
    assert_eq!(s.sample(&logits, &[]), 0);
    assert_eq!(s.sample(&logits, &[0]), 1); // 3.0 / 2 = 1.5 < 2.9
    assert_eq!(s.distribution(&logits, &[0]), Distribution { tokens: vec![1], probs: vec![1.0] });

    // Non-greedy: distribution equals softmax of the penalized logits.
    let c = SamplerConfig { presence_penalty: 1.0, ..cfg(1.0) };
    let d = Sampler::new(c).unwrap().distribution(&logits, &[0, 0]);
    let exp = reference(&[2.0, 2.9, 0.0], 1.0, 0, 1.0, 0.0);
    for (&t, &p) in d.tokens.iter().zip(&d.probs) {
        assert!((f64::from(p) - exp[t as usize]).abs() < 1e-6);
    }
    assert_eq!(d.tokens, [1, 0, 2]);
}

// -------------------------------------------------------------- greedy ----

#[test]
fn greedy_argmax_ties_lowest_id_and_no_randomness() {
    let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
    let before = s.rng_mut().clone();
    assert_eq!(s.sample(&[0.1, 5.0, -2.0, 5.0, 5.0], &[]), 1);
    assert_eq!(s.sample(&[7.0, 7.0], &[]), 0);
    assert_eq!(s.sample(&[-1.0, -3.0, 2.0], &[]), 2);
    let d = Distribution { tokens: vec![4, 2], probs: vec![0.6, 0.4] };
    assert_eq!(s.sample_from(&d), 4);
    assert_eq!(*s.rng_mut(), before, "greedy must not consume randomness");
    assert!(SamplerConfig::greedy().is_greedy());
    assert_eq!(SamplerConfig::default(), SamplerConfig::greedy());
    assert!(!cfg(0.5).is_greedy());
}

#[test]
fn greedy_matches_naive_argmax_of_penalized_logits() {
    let mut r = Rng::new(3);
    for case in 0..200 {
        let v = 1 + (r.next_u64() % 300) as usize;
        // Coarse values => many ties; sprinkle NaN / inf.
        let logits: Vec<f32> = (0..v)
            .map(|_| match r.next_u64() % 20 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 if case % 7 == 0 => f32::INFINITY,
                k => (k % 5) as f32 - 2.0,
            })
            .collect();
        let history: Vec<u32> = (0..(r.next_u64() % 40)).map(|_| (r.next_u64() % (v as u64 + 5)) as u32).collect();
        let c = SamplerConfig {
            repetition_penalty: 1.5,
            presence_penalty: if case % 2 == 0 { 0.5 } else { -0.5 },
            penalty_last_n: 1 + case % 50,
            ..SamplerConfig::greedy()
        };
        let mut s = Sampler::new(c).unwrap();
        let pen = s.penalized_logits(&logits, &history);
        let mut best = 0;
        for (i, &l) in pen.iter().enumerate() {
            if l > pen[best] {
                best = i;
            }
        }
        assert_eq!(s.sample(&logits, &history), best as u32, "case {case}");
        assert_eq!(s.distribution(&logits, &history).tokens, [best as u32]);
    }
}

#[test]
fn nan_and_inf_logits() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let ninf = f32::NEG_INFINITY;
    let mut g = Sampler::new(SamplerConfig::greedy()).unwrap();
    assert_eq!(g.sample(&[nan, 1.0, nan, 1.0], &[]), 1);
    assert_eq!(g.sample(&[nan, nan, nan], &[]), 0);
    assert_eq!(g.sample(&[ninf, ninf], &[]), 0);
    assert_eq!(g.sample(&[], &[]), 0);
    assert_eq!(g.sample(&[1.0, inf, 3.0], &[]), 1);

    let mut s = Sampler::new(SamplerConfig { top_k: 2, top_p: 0.5, min_p: 0.2, ..cfg(1.0) }).unwrap();
    let one = |t| Distribution { tokens: vec![t], probs: vec![1.0] };
    assert_eq!(s.distribution(&[nan, nan, nan], &[]), one(0));
    assert_eq!(s.distribution(&[ninf, nan, ninf], &[]), one(0));
    assert_eq!(s.distribution(&[], &[]), one(0));
    assert_eq!(s.distribution(&[nan, -3.0, nan], &[]), one(1));
    assert_eq!(s.sample(&[nan, nan], &[]), 0);

    // NaN is never sampled.
    let mut t = Sampler::new(cfg(1.0)).unwrap();
    let d = t.distribution(&[nan, 0.0, nan, 0.0], &[]);
    assert_eq!(d, Distribution { tokens: vec![1, 3], probs: vec![0.5, 0.5] });
    for _ in 0..200 {
        let x = t.sample(&[nan, 0.0, nan, 0.0], &[]);
        assert!(x == 1 || x == 3);
    }
    // +inf tokens share the mass.
    let d = t.distribution(&[1.0, inf, 3.0, inf], &[]);
    assert_eq!(d, Distribution { tokens: vec![1, 3], probs: vec![0.5, 0.5] });
    // Tiny temperature: effectively greedy, never NaN.
    let tiny = Sampler::new(cfg(1e-30)).unwrap();
    assert_eq!(tiny.distribution(&[1.0, 2.0, 1.5], &[]), one(1));
}

// ---------------------------------------------------------- validation ----

fn invalid(c: SamplerConfig) -> &'static str {
    match Sampler::new(c) {
        Err(SamplingError::InvalidParameter { name, .. }) => name,
        Ok(_) => panic!("expected an error"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn validation_errors() {
    let g = SamplerConfig::greedy;
    for t in [-0.1, 100.5, f32::NAN, f32::INFINITY] {
        assert_eq!(invalid(SamplerConfig { temperature: t, ..g() }), "temperature");
    }
    for p in [0.0, -0.5, 1.01, f32::NAN] {
        assert_eq!(invalid(SamplerConfig { top_p: p, ..g() }), "top_p");
    }
    for m in [-0.01, 1.5, f32::NAN] {
        assert_eq!(invalid(SamplerConfig { min_p: m, ..g() }), "min_p");
    }
    for r in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_eq!(invalid(SamplerConfig { repetition_penalty: r, ..g() }), "repetition_penalty");
    }
    for f in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert_eq!(invalid(SamplerConfig { frequency_penalty: f, ..g() }), "frequency_penalty");
        assert_eq!(invalid(SamplerConfig { presence_penalty: f, ..g() }), "presence_penalty");
    }
    let msg = Sampler::new(SamplerConfig { top_p: 2.0, ..g() }).unwrap_err().to_string();
    assert!(msg.contains("top_p") && msg.contains('2'), "{msg}");

    // Boundary values are valid.
    for c in [
        SamplerConfig { temperature: 100.0, top_p: 1.0, min_p: 1.0, ..g() },
        SamplerConfig { temperature: 0.0, top_p: 1e-9, min_p: 0.0, top_k: 1, ..g() },
        SamplerConfig { repetition_penalty: 1e-3, frequency_penalty: -2.0, presence_penalty: 2.0, ..g() },
    ] {
        assert!(c.validate().is_ok(), "{c:?}");
    }
}

#[test]
fn config_serde_roundtrip_and_defaults() {
    let c = SamplerConfig { top_k: 40, top_p: 0.9, seed: 3, ..cfg(0.7) };
    let s = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<SamplerConfig>(&s).unwrap(), c);
    let partial: SamplerConfig = serde_json::from_str(r#"{"temperature": 0.5}"#).unwrap();
    assert_eq!(partial, SamplerConfig { temperature: 0.5, ..SamplerConfig::default() });
    assert_eq!(partial.penalty_last_n, 64);
}

/// Timing report on a Gemma-sized vocabulary: `cargo test --release --test sampling -- --ignored --nocapture`.
#[test]
#[ignore]
fn perf_vocab_262144() {
    let logits = random_logits(262_144, 11, 15.0);
    let history: Vec<u32> = (0..64).map(|i| i * 997).collect();
    let cases = [
        ("greedy", SamplerConfig::greedy()),
        ("greedy+penalties", SamplerConfig { repetition_penalty: 1.1, ..SamplerConfig::greedy() }),
        ("T=1 (full sort)", cfg(1.0)),
        ("top_k=40", SamplerConfig { top_k: 40, ..cfg(0.8) }),
        ("top_p=0.9", SamplerConfig { top_p: 0.9, ..cfg(0.8) }),
        ("min_p=0.05", SamplerConfig { min_p: 0.05, ..cfg(0.8) }),
        (
            "k40 p0.95 minp0.05 rep1.1",
            SamplerConfig { top_k: 40, top_p: 0.95, min_p: 0.05, repetition_penalty: 1.1, ..cfg(0.8) },
        ),
    ];
    for (name, c) in cases {
        let mut s = Sampler::new(c).unwrap();
        let mut acc = 0u64;
        let mut dt = std::time::Duration::MAX;
        for _ in 0..30 {
            let t0 = std::time::Instant::now();
            acc += u64::from(s.sample(&logits, &history));
            dt = dt.min(t0.elapsed());
        }
        println!("{name:>28}: {dt:?} min per sample (support {}) [{acc}]", s.distribution(&logits, &history).len());
    }
}
