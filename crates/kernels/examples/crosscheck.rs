//! One-off cross-check of our dequantizers against dumps made with gguf-py (not part of CI):
//! `cargo run --release -p specswarm-kernels --example crosscheck -- DIR TYPE...` where DIR holds
//! `<TYPE>.bin` (raw rows), `<TYPE>.f32` (gguf-py's dequantized values) and `<TYPE>.meta` ("cols rows").
use specswarm_kernels::{GgmlType, dequantize_row};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&args[1]);
    for name in &args[2..] {
        let ty = (0..64).filter_map(GgmlType::from_u32).find(|t| t.name() == name).expect("type name");
        let meta = std::fs::read_to_string(dir.join(format!("{name}.meta"))).unwrap();
        let v: Vec<usize> = meta.split_whitespace().map(|s| s.parse().unwrap()).collect();
        let (cols, rows) = (v[0], v[1]);
        let raw = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut got = vec![0f32; cols * rows];
        dequantize_row(ty, &raw, &mut got).unwrap();
        let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{name}: {} values, max abs diff {diff:e}", got.len());
    }
}
