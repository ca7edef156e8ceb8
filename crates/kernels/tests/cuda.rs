//! GPU matmul (`--features cuda`) against the CPU kernels. Without a usable CUDA device every
//! test prints "no CUDA device, skipped" and passes, unless `SPECSWARM_REQUIRE_CUDA=1` is set
//! (for machines that are meant to have one).
#![cfg(feature = "cuda")]

use specswarm_kernels::cuda::{CudaDevice, CudaMatrix};
use specswarm_kernels::{GgmlType, QMatrix};

/// Tiny deterministic xorshift64* generator.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn unif(&mut self) -> f32 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unif() * scale).collect()
    }
}

/// The device, or `None` after printing why the test is skipped.
fn device() -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var_os("SPECSWARM_REQUIRE_CUDA").is_some_and(|v| v == "1") {
                panic!("SPECSWARM_REQUIRE_CUDA=1 but no CUDA device: {e}");
            }
            println!("no CUDA device, skipped ({e})");
            None
        }
    }
}

/// Relative L2 error and worst element error (relative to the largest |reference| value).
fn errors(got: &[f32], want: &[f64]) -> (f64, f64) {
    let (mut num, mut den, mut worst, mut scale) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w;
        num += d * d;
        den += w * w;
        worst = worst.max(d.abs());
        scale = scale.max(w.abs());
    }
    ((num / den.max(1e-30)).sqrt(), worst / scale.max(1e-30))
}

#[test]
fn device_probe_does_not_panic() {
    // Either a device opens or a typed error comes back; both are fine here.
    match CudaDevice::count() {
        Ok(n) => println!("CUDA devices: {n}"),
        Err(e) => println!("no CUDA device, skipped ({e})"),
    }
    let _ = CudaDevice::new(0);
}

#[test]
fn matmul_matches_cpu() {
    let Some(dev) = device() else { return };
    println!("device {}: {}", dev.ordinal(), dev.name().unwrap_or_default());
    let types = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K];
    let mut rng = Rng::new(7);
    for ty in types {
        for &(rows, cols) in &[(96usize, 512usize), (257, 768)] {
            let w = rng.vec(rows * cols, 0.5);
            let qm = QMatrix::from_f32(ty, rows, cols, &w).expect("quantize");
            let cm = CudaMatrix::from_qmatrix(&qm, &dev).expect("upload");
            // Exact reference on the dequantized weights.
            let mut wd = vec![0f32; rows * cols];
            for r in 0..rows {
                qm.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
            }
            for n_tokens in [1usize, 3, 17] {
                let x = rng.vec(n_tokens * cols, 1.0);
                let mut y_cpu = vec![0f32; n_tokens * rows];
                let mut y_gpu = vec![f32::NAN; n_tokens * rows];
                qm.matmul(&x, n_tokens, &mut y_cpu);
                cm.matmul(&x, n_tokens, &mut y_gpu).expect("gpu matmul");
                let exact: Vec<f64> = (0..n_tokens * rows)
                    .map(|i| {
                        let (t, r) = (i / rows, i % rows);
                        (0..cols).map(|c| wd[r * cols + c] as f64 * x[t * cols + c] as f64).sum()
                    })
                    .collect();
                let cpu_f64: Vec<f64> = y_cpu.iter().map(|&v| v as f64).collect();
                let (l2_cpu, max_cpu) = errors(&y_gpu, &cpu_f64);
                let (l2_ref, max_ref) = errors(&y_gpu, &exact);
                println!(
                    "{ty} {rows}x{cols} n={n_tokens}: vs cpu l2 {l2_cpu:.2e} max {max_cpu:.2e}; vs exact l2 {l2_ref:.2e} max {max_ref:.2e}"
                );
                assert!(l2_cpu < 1e-2 && max_cpu < 1e-2, "{ty} {rows}x{cols} n={n_tokens}: GPU vs CPU");
                assert!(l2_ref < 1e-2 && max_ref < 1e-2, "{ty} {rows}x{cols} n={n_tokens}: GPU vs exact");
            }
        }
    }
}

#[test]
fn matmul_edge_shapes() {
    let Some(dev) = device() else { return };
    // Zero tokens leaves y alone; the y buffer may be longer than needed.
    let qm = QMatrix::from_f32(GgmlType::Q8_0, 4, 32, &[0.25; 128]).unwrap();
    let cm = CudaMatrix::from_qmatrix(&qm, &dev).unwrap();
    let mut y = vec![9.0f32; 10];
    cm.matmul(&[], 0, &mut y).unwrap();
    assert!(y.iter().all(|&v| v == 9.0));
    cm.matmul(&[1.0; 32], 1, &mut y).unwrap();
    assert!(y[..4].iter().all(|&v| (v - 8.0).abs() < 1e-2), "{y:?}");
    assert!(y[4..].iter().all(|&v| v == 9.0));
    // Growing then shrinking the token count reuses the device scratch buffers.
    let x = vec![1.0f32; 32 * 40];
    let mut y = vec![0f32; 4 * 40];
    cm.matmul(&x, 40, &mut y).unwrap();
    cm.matmul(&x, 2, &mut y).unwrap();
    assert!(y.iter().all(|&v| (v - 8.0).abs() < 1e-2));
}
