//! Every format: quantize/dequantize round trips, and the dot products (scalar and SIMD) against
//! an f32 dot of the dequantized operands.

use specswarm_kernels::{GgmlType, QMatrix, dequantize_row, quantize_row, vec_dot, vec_dot_scalar};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }
}

const WEIGHT_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// A random row of `ty`: quantized from random floats where we can quantize, random bytes with
/// sane scales otherwise (K-quants).
fn random_row(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut row = vec![0u8; ty.row_bytes(n).unwrap()];
    let vals: Vec<f32> = (0..n).map(|_| rng.uniform() * 2.0).collect();
    if quantize_row(ty, &vals, &mut row).is_ok() {
        return row;
    }
    row.iter_mut().for_each(|b| *b = rng.byte());
    let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let bb = ty.block_bytes();
    for block in row.chunks_exact_mut(bb) {
        let (d, dmin) = (half(0.01 + 0.02 * rng.uniform().abs()), half(0.01 * rng.uniform().abs()));
        match ty {
            GgmlType::Q4K | GgmlType::Q5K => {
                block[0..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&dmin);
            }
            GgmlType::Q2K => {
                block[80..82].copy_from_slice(&d);
                block[82..84].copy_from_slice(&dmin);
            }
            GgmlType::Q3K => block[108..110].copy_from_slice(&d),
            GgmlType::Q6K => block[208..210].copy_from_slice(&d),
            _ => unreachable!(),
        }
    }
    row
}

fn dequant(ty: GgmlType, row: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, row, &mut out).unwrap();
    out
}

#[test]
fn round_trip_error_is_bounded() {
    let mut rng = Rng(7);
    let n = 512;
    for (ty, tol) in [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 1e-3),
        (GgmlType::BF16, 8e-3),
        (GgmlType::Q8_0, 1.0 / 127.0),
        (GgmlType::Q8_1, 1.0 / 127.0),
        (GgmlType::Q8K, 1.0 / 127.0),
        (GgmlType::Q5_0, 1.0 / 15.0),
        (GgmlType::Q5_1, 1.0 / 31.0),
        (GgmlType::Q4_0, 1.0 / 7.0),
        (GgmlType::Q4_1, 1.0 / 15.0),
    ] {
        let x: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        let mut q = vec![0u8; ty.row_bytes(n).unwrap()];
        quantize_row(ty, &x, &mut q).unwrap();
        let y = dequant(ty, &q, n);
        let err = x.iter().zip(&y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // Values are in [-1, 1): the step of each format bounds the error (half a step, plus slack).
        assert!(err <= tol * 1.01 + 1e-6, "{ty}: max round-trip error {err} > {tol}");
    }
}

#[test]
fn dot_products_match_dequantized_reference() {
    let mut rng = Rng(11);
    for ty in WEIGHT_TYPES {
        for n in [256, 1024] {
            for _ in 0..20 {
                let w = random_row(ty, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
                let act = ty.vec_dot_type();
                let mut xq = vec![0u8; act.row_bytes(n).unwrap()];
                quantize_row(act, &x, &mut xq).unwrap();
                // Reference: dequantize both operands, dot in f64.
                let (wf, xf) = (dequant(ty, &w, n), dequant(act, &xq, n));
                let want: f64 = wf.iter().zip(&xf).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                let scale: f64 =
                    wf.iter().zip(&xf).map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs()).sum::<f64>().max(1e-6);
                let scalar = f64::from(vec_dot_scalar(ty, n, &w, &xq));
                let fast = f64::from(vec_dot(ty, n, &w, &xq));
                // f16-rounded partial products (Q8_1's s) leave ~1e-3 relative slack.
                let tol = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) { 2e-3 } else { 1e-4 };
                assert!((scalar - want).abs() / scale < tol, "{ty} n={n}: scalar {scalar} vs reference {want}");
                assert!((fast - want).abs() / scale < tol, "{ty} n={n}: simd {fast} vs reference {want}");
            }
        }
    }
}

#[test]
fn matmul_matches_row_dots_for_many_tokens_and_threads() {
    let mut rng = Rng(3);
    let (rows, cols) = (100, 256);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::F32] {
        let data: Vec<u8> = (0..rows).flat_map(|_| random_row(ty, cols, &mut rng)).collect();
        let m = QMatrix::new(ty, rows, cols, data).unwrap();
        for n_tokens in [1, 3, 17] {
            let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.uniform()).collect();
            let mut want = vec![0f32; n_tokens * rows];
            for t in 0..n_tokens {
                let act = ty.vec_dot_type();
                let mut xq = vec![0u8; act.row_bytes(cols).unwrap()];
                quantize_row(act, &x[t * cols..(t + 1) * cols], &mut xq).unwrap();
                for r in 0..rows {
                    want[t * rows + r] = vec_dot(
                        ty,
                        cols,
                        &m.data()[r * ty.row_bytes(cols).unwrap()..][..ty.row_bytes(cols).unwrap()],
                        &xq,
                    );
                }
            }
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut y = vec![0f32; n_tokens * rows];
                pool.install(|| m.matmul(&x, n_tokens, &mut y));
                assert_eq!(y, want, "{ty} tokens={n_tokens} threads={threads}");
            }
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 32, vec![0; 35]).is_err());
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 33, vec![0; 36]).is_err());
    let mut out = vec![0f32; 31];
    assert!(dequantize_row(GgmlType::Q8_0, &[0; 34], &mut out).is_err());
    assert!(quantize_row(GgmlType::Q4K, &[0.0; 256], &mut [0u8; 144]).is_err());
}
