//! The sampler: determinism, exact distributions (chi-square with a negative control), penalties.

use specswarm_engine::sampling::{Rng, Sampler, SamplerConfig, argmax};

const LOGITS: [f32; 8] = [2.0, 1.5, 1.2, 0.4, 0.0, -0.5, -1.0, -3.0];
const N: usize = 50_000;

fn cfg(f: impl FnOnce(&mut SamplerConfig)) -> SamplerConfig {
    let mut c = SamplerConfig { temperature: 1.0, seed: 1234, ..SamplerConfig::default() };
    f(&mut c);
    c
}

fn counts(c: SamplerConfig) -> [usize; 8] {
    let mut s = Sampler::new(c).unwrap();
    let mut n = [0usize; 8];
    for _ in 0..N {
        n[s.sample(&LOGITS, &[]) as usize] += 1;
    }
    n
}

/// Expected probabilities computed independently of the sampler: softmax(l / t) restricted to
/// `keep`, renormalised.
fn expected(t: f64, keep: &[usize]) -> [f64; 8] {
    let mut p = [0f64; 8];
    for &i in keep {
        p[i] = (f64::from(LOGITS[i]) / t).exp();
    }
    let z: f64 = p.iter().sum();
    p.map(|v| v / z)
}

/// Pearson chi-square over tokens with nonzero expectation; panics if an excluded token appears.
fn chi2(n: &[usize; 8], p: &[f64; 8]) -> (f64, usize) {
    let mut chi = 0.0;
    let mut df = 0;
    for i in 0..8 {
        if p[i] == 0.0 {
            assert_eq!(n[i], 0, "token {i} must never be sampled");
            continue;
        }
        let e = p[i] * N as f64;
        chi += (n[i] as f64 - e).powi(2) / e;
        df += 1;
    }
    (chi, df - 1)
}

/// Chi-square critical values at p = 0.999 for 1..=7 degrees of freedom.
const CRIT_999: [f64; 8] = [0.0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32];

fn assert_fits(name: &str, n: &[usize; 8], p: &[f64; 8]) {
    let (c, df) = chi2(n, p);
    assert!(c < CRIT_999[df], "{name}: chi2 {c:.2} with {df} dof exceeds {}", CRIT_999[df]);
    eprintln!("{name}: chi2 {c:.2} (dof {df}, critical {})", CRIT_999[df]);
}

#[test]
fn temperature_top_k_top_p_min_p_give_the_intended_distribution() {
    let all: Vec<usize> = (0..8).collect();
    assert_fits("T=0.7", &counts(cfg(|c| c.temperature = 0.7)), &expected(0.7, &all));
    assert_fits("top_k=3", &counts(cfg(|c| c.top_k = 3)), &expected(1.0, &[0, 1, 2]));
    // T=1 probabilities: .395 .240 .178 .080 .053 .032 .020 .003 -> nucleus 0.8 keeps 0..=2 (0.813).
    assert_fits("top_p=0.8", &counts(cfg(|c| c.top_p = 0.8)), &expected(1.0, &[0, 1, 2]));
    // min_p 0.1 of the max (.395) = .0395 keeps 0..=4.
    assert_fits("min_p=0.1", &counts(cfg(|c| c.min_p = 0.1)), &expected(1.0, &[0, 1, 2, 3, 4]));
    // T=0.5 then top_k=5 then top_p=0.9: tempered probs .57 .21 .12 .02... -> keeps 0..=2 (0.90+).
    let combo = cfg(|c| {
        c.temperature = 0.5;
        c.top_k = 5;
        c.top_p = 0.9;
    });
    let tempered = expected(0.5, &[0, 1, 2, 3, 4]);
    let mut acc = 0.0;
    let keep: Vec<usize> = (0..5)
        .take_while(|&i| {
            let before = acc;
            acc += tempered[i];
            before < 0.9
        })
        .collect();
    assert_fits("T=0.5,k=5,p=0.9", &counts(combo), &expected(0.5, &keep));
}

#[test]
fn chi_square_has_power_against_a_wrong_distribution() {
    // Negative control: T=1 samples tested against the T=0.7 expectation must fail.
    let all: Vec<usize> = (0..8).collect();
    let (c, df) = chi2(&counts(cfg(|c| c.temperature = 1.0)), &expected(0.7, &all));
    assert!(c > CRIT_999[df], "the test cannot tell T=1 from T=0.7 (chi2 {c:.2})");
}

#[test]
fn same_seed_same_stream() {
    let draw = |seed| {
        let mut s = Sampler::new(cfg(|c| c.seed = seed)).unwrap();
        (0..1000).map(|_| s.sample(&LOGITS, &[])).collect::<Vec<_>>()
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8));
}

#[test]
fn rng_stream_is_pinned() {
    // xoshiro256** seeded by splitmix64(42); cross-checked with an independent Python
    // implementation of both generators.
    let mut r = Rng::new(42);
    let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
    assert_eq!(got, PINNED);
}

const PINNED: [u64; 3] = [1546998764402558742, 6990951692964543102, 12544586762248559009];

#[test]
fn penalties_match_hand_computed_logits() {
    let logits = [2.0f32, -1.0, 0.5, 3.0];
    let history = [0u32, 0, 1, 3];
    // Repetition 2: 2.0 -> 1.0, -1.0 -> -2.0, 3.0 -> 1.5; token 2 untouched. Argmax is now token 3 (1.5)
    // vs token 0 (1.0) and token 2 (0.5).
    let rep = Sampler::new(SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::greedy() }).unwrap();
    let d = rep.distribution(&logits, &history);
    assert_eq!(d.tokens, vec![3]);
    // Frequency 0.6 (token 0 seen twice: 2.0 - 1.2 = 0.8; token 3 once: 2.4) + presence 2.0:
    // 0 -> -1.2, 1 -> -3.6, 2 -> 0.5, 3 -> 0.4 => argmax token 2.
    let fp = Sampler::new(SamplerConfig { frequency_penalty: 0.6, presence_penalty: 2.0, ..SamplerConfig::greedy() })
        .unwrap();
    assert_eq!(fp.distribution(&logits, &history).tokens, vec![2]);
    // Window of 1 only sees token 3: 3.0 - 0.6 - 2.0 = 0.4 < 2.0 => argmax token 0.
    let w = Sampler::new(SamplerConfig {
        frequency_penalty: 0.6,
        presence_penalty: 2.0,
        penalty_last_n: 1,
        ..SamplerConfig::greedy()
    })
    .unwrap();
    assert_eq!(w.distribution(&logits, &history).tokens, vec![0]);
}

#[test]
fn greedy_ties_nan_and_validation() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
    let mut s = Sampler::new(SamplerConfig { temperature: 0.8, ..SamplerConfig::default() }).unwrap();
    assert_eq!(s.sample(&[f32::NAN, f32::NEG_INFINITY, 0.5], &[]), 2);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
    for bad in [
        SamplerConfig { temperature: -1.0, ..SamplerConfig::default() },
        SamplerConfig { temperature: f32::NAN, ..SamplerConfig::default() },
        SamplerConfig { top_p: 0.0, ..SamplerConfig::default() },
        SamplerConfig { top_p: 1.5, ..SamplerConfig::default() },
        SamplerConfig { min_p: 2.0, ..SamplerConfig::default() },
        SamplerConfig { repetition_penalty: 0.0, ..SamplerConfig::default() },
    ] {
        let err = Sampler::new(bad.clone()).unwrap_err().to_string();
        assert!(err.contains("invalid"), "{bad:?}: {err}");
    }
}
