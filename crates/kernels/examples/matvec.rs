//! Matrix x vector (decode) throughput: scalar reference vs AVX2, 1 and 2 threads.
//!
//! `cargo run --release -p specswarm-kernels --example matvec [-- quick] [prefill]`
use specswarm_kernels::{GgmlType, QMatrix, quantize_row, simd_available, vec_dot_scalar};
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random bits with sane f16 scale fields at the given block offsets.
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, scale_offs: &[usize]) -> QMatrix {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let n = ty.row_bytes(cols).unwrap() * rows;
    let mut data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    let d = half::f16::from_f32(0.01).to_bits().to_le_bytes();
    for blk in data.chunks_exact_mut(ty.block_bytes()) {
        for &o in scale_offs {
            blk[o..o + 2].copy_from_slice(&d);
        }
    }
    QMatrix::new(ty, rows, cols, data).unwrap()
}

/// Best (minimum) time per call over repeated runs for about `min_secs`: robust against
/// other processes sharing the cores.
fn time<F: FnMut()>(min_secs: f64, mut f: F) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    while start.elapsed().as_secs_f64() < min_secs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Prefill / verification shapes of Gemma 3 270M and SmolLM2: GMAC/s at several token counts.
fn prefill(min_secs: f64) {
    // (type, in (cols), out (rows), f16 scale offsets)
    let cases: &[(GgmlType, usize, usize, &[usize])] = &[
        (GgmlType::Q5_0, 640, 1024, &[0]),
        (GgmlType::Q5_0, 640, 256, &[0]),
        (GgmlType::Q5_0, 640, 2048, &[0]),
        (GgmlType::Q8_0, 640, 1024, &[0]),
        (GgmlType::Q8_0, 640, 256, &[0]),
        (GgmlType::Q8_0, 640, 2048, &[0]),
        (GgmlType::Q4K, 1024, 640, &[0, 2]),
        (GgmlType::Q4K, 2048, 640, &[0, 2]),
        (GgmlType::Q6K, 2048, 640, &[208]),
        (GgmlType::Q4_1, 576, 1536, &[0, 2]),
        (GgmlType::Q4_1, 1536, 576, &[0, 2]),
    ];
    let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    println!("prefill GMAC/s (in x out; best of {min_secs} s)");
    println!(
        "{:5} {:>10} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}",
        "type", "in x out", "1t n=1", "n=4", "n=64", "n=512", "2t n=1", "n=4", "n=64", "n=512"
    );
    for &(ty, cols, rows, offs) in cases {
        let m = random_matrix(ty, rows, cols, offs);
        let mut line = format!("{:5} {:>10} |", ty.name(), format!("{cols}x{rows}"));
        for pool in [&pool1, &pool2] {
            for nt in [1usize, 4, 64, 512] {
                let x: Vec<f32> = (0..cols * nt).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
                let mut y = vec![0.0f32; rows * nt];
                let mut scratch = Vec::new();
                let t = time(min_secs, || pool.install(|| m.matmul_with_scratch(&x, nt, &mut y, &mut scratch)));
                line += &format!(" {:7.1}", (rows * cols * nt) as f64 / t / 1e9);
            }
            line += " |";
        }
        println!("{line}");
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    if std::env::args().any(|a| a == "prefill") {
        prefill(if quick { 0.15 } else { 0.5 });
        return;
    }
    let min_secs = if quick { 0.2 } else { 1.0 };
    println!("simd (avx2+fma+f16c): {}", simd_available());
    let cases: &[(GgmlType, usize, usize, &[usize])] = &[
        (GgmlType::Q4_1, 576, 1536, &[0, 2]),
        (GgmlType::Q4_1, 8192, 4096, &[0, 2]),
        (GgmlType::Q8_0, 1024, 1024, &[0]),
        (GgmlType::Q8_0, 262144, 640, &[0]),
        (GgmlType::Q5_0, 2048, 640, &[0]),
        (GgmlType::Q4K, 2048, 2048, &[0, 2]),
        (GgmlType::Q6K, 2048, 2048, &[208]),
        (GgmlType::Q5K, 2048, 2048, &[0, 2]),
        (GgmlType::Q3K, 2048, 2048, &[108]),
        (GgmlType::Q2K, 2048, 2048, &[80, 82]),
    ];
    let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // `only=TYPE`: just that weight type.
    let only = std::env::args().find_map(|a| a.strip_prefix("only=").map(str::to_owned));
    for &(ty, rows, cols, offs) in cases.iter().filter(|c| only.as_ref().is_none_or(|o| o == c.0.name())) {
        let m = random_matrix(ty, rows, cols, offs);
        let bytes = m.data().len() as f64;
        let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut y = vec![0.0f32; rows];
        let mut scratch = Vec::new();
        let xt = ty.vec_dot_type();
        let mut xq = vec![0u8; xt.row_bytes(cols).unwrap()];
        quantize_row(xt, &x, &mut xq).unwrap();
        let t_scalar = time(min_secs, || {
            for (r, yr) in y.iter_mut().enumerate() {
                *yr = vec_dot_scalar(ty, cols, m.row(r), &xq);
            }
        });
        let t1 = time(min_secs, || pool1.install(|| m.matmul_with_scratch(&x, 1, &mut y, &mut scratch)));
        let t2 = time(min_secs, || pool2.install(|| m.matmul_with_scratch(&x, 1, &mut y, &mut scratch)));
        let gbs = |t: f64| bytes / t / 1e9;
        println!(
            "{:5} {rows:>6}x{cols:<5} ({:6.1} MB): scalar 1t {:8.3} ms {:6.2} GB/s | simd 1t {:8.3} ms {:6.2} GB/s | simd 2t {:8.3} ms {:6.2} GB/s",
            ty.name(),
            bytes / 1e6,
            t_scalar * 1e3,
            gbs(t_scalar),
            t1 * 1e3,
            gbs(t1),
            t2 * 1e3,
            gbs(t2)
        );
    }
    // Multi-token (speculative verification / prefill): per-token cost vs n_tokens = 1.
    for &(ty, rows, cols, offs) in cases.iter().filter(|c| c.1 <= 2048) {
        let m = random_matrix(ty, rows, cols, offs);
        for nt in [1usize, 4, 64] {
            let x: Vec<f32> = (0..cols * nt).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let mut y = vec![0.0f32; rows * nt];
            let mut scratch = Vec::new();
            let t1 = time(min_secs, || pool1.install(|| m.matmul_with_scratch(&x, nt, &mut y, &mut scratch)));
            println!(
                "{:5} {rows}x{cols} n_tokens={nt:3}: 1t {:8.3} ms, {:7.2} us/token, {:6.1} GMAC/s",
                ty.name(),
                t1 * 1e3,
                t1 * 1e6 / nt as f64,
                (rows * cols * nt) as f64 / t1 / 1e9
            );
        }
    }
}
