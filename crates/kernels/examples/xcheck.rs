//! One-off cross-check of `dequantize_row` against gguf-py dumps.
//!
//! Each input file: u32 GGUF type id, u32 element count n, raw row bytes, n f32 reference
//! values (written by a short gguf-py script). Usage: `cargo run --release --example xcheck -- FILES...`
use specswarm_kernels::{GgmlType, dequantize_row};

fn main() {
    let mut worst = 0.0f32;
    for path in std::env::args().skip(1) {
        let b = std::fs::read(&path).expect("read");
        let id = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let n = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        let ty = GgmlType::from_u32(id).expect("type");
        let rb = ty.row_bytes(n).unwrap();
        let raw = &b[8..8 + rb];
        let mut got = vec![0.0f32; n];
        dequantize_row(ty, raw, &mut got).unwrap();
        let mut maxd = 0.0f32;
        for (i, c) in b[8 + rb..].chunks_exact(4).enumerate() {
            let want = f32::from_le_bytes(c.try_into().unwrap());
            maxd = maxd.max((got[i] - want).abs());
        }
        worst = worst.max(maxd);
        println!("{ty:5} n={n:6} max|diff|={maxd:e}  {path}");
    }
    println!("worst max|diff| = {worst:e}");
}
