//! Shared test fixtures: the real models (pulled into the model store on first use) and tiny
//! random-weight models written as GGUF files.
#![allow(dead_code)]

use std::path::PathBuf;

use specswarm_engine::gguf::{GgufWriter, MetaValue};
use specswarm_engine::hub;
use specswarm_kernels::GgmlType;

/// Path of a real model, pulling it into the store if needed (the first run downloads it).
pub fn real_model(name: &str) -> PathBuf {
    let k = hub::known(name).unwrap_or_else(|| panic!("unknown model {name}"));
    hub::ensure(k, &mut |m| eprintln!("{m}")).unwrap_or_else(|e| panic!("cannot get model {name}: {e}"))
}

/// Workspace root (for fixtures).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A small deterministic PRNG for test data (independent of the engine's sampler RNG).
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Shape of a tiny model.
#[derive(Clone, Debug)]
pub struct Tiny {
    pub arch: &'static str,
    pub n_layers: usize,
    pub d: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub weight_type: GgmlType,
    /// Written after the standard keys, so they override them (for broken-model tests).
    pub extra_meta: Vec<(String, MetaValue)>,
}

impl Tiny {
    pub fn new(arch: &'static str) -> Tiny {
        Tiny {
            arch,
            n_layers: 5,
            d: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: if arch == "gemma3" { 32 } else { 16 },
            ffn: 128,
            vocab: 320,
            context: 256,
            weight_type: GgmlType::Q8_0,
            extra_meta: Vec::new(),
        }
    }

    /// Write the model as a GGUF file under a fresh temp dir and return its path.
    pub fn write(&self, seed: u64) -> PathBuf {
        let mut rng = TestRng::new(seed);
        let mut w = GgufWriter::new();
        let a = self.arch;
        w.meta("general.architecture", MetaValue::String(a.into()));
        w.meta(&format!("{a}.block_count"), MetaValue::U32(self.n_layers as u32));
        w.meta(&format!("{a}.embedding_length"), MetaValue::U32(self.d as u32));
        w.meta(&format!("{a}.feed_forward_length"), MetaValue::U32(self.ffn as u32));
        w.meta(&format!("{a}.attention.head_count"), MetaValue::U32(self.heads as u32));
        w.meta(&format!("{a}.attention.head_count_kv"), MetaValue::U32(self.kv_heads as u32));
        w.meta(&format!("{a}.attention.key_length"), MetaValue::U32(self.head_dim as u32));
        w.meta(&format!("{a}.attention.value_length"), MetaValue::U32(self.head_dim as u32));
        w.meta(&format!("{a}.attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-6));
        w.meta(&format!("{a}.context_length"), MetaValue::U32(self.context as u32));
        w.meta(&format!("{a}.rope.freq_base"), MetaValue::F32(10_000.0));
        if a == "gemma3" {
            w.meta(&format!("{a}.attention.sliding_window"), MetaValue::U32(8));
        }
        for (k, v) in &self.extra_meta {
            w.meta(k, v.clone());
        }
        let mut matrix = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
            let scale = 1.0 / (cols as f32).sqrt();
            let vals: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * scale * 1.7).collect();
            let mut bytes = vec![0u8; ty.row_bytes(cols).unwrap() * rows];
            let rb = ty.row_bytes(cols).unwrap();
            for (r, chunk) in bytes.chunks_exact_mut(rb).enumerate() {
                specswarm_kernels::quantize_row(ty, &vals[r * cols..(r + 1) * cols], chunk).unwrap();
            }
            w.tensor(name, &[cols as u64, rows as u64], ty, bytes);
        };
        let norm = |w: &mut GgufWriter, name: &str, len: usize, seed: u64| {
            let mut r = TestRng::new(seed);
            let vals: Vec<f32> = (0..len).map(|_| 1.0 + 0.2 * r.uniform()).collect();
            w.tensor(name, &[len as u64], GgmlType::F32, vals.iter().flat_map(|v| v.to_le_bytes()).collect());
        };
        let (d, hd, ty) = (self.d, self.head_dim, self.weight_type);
        matrix(&mut w, "token_embd.weight", self.vocab, d, GgmlType::Q8_0);
        for l in 0..self.n_layers {
            let t = |s: &str| format!("blk.{l}.{s}");
            let s = seed * 1000 + l as u64 * 10;
            norm(&mut w, &t("attn_norm.weight"), d, s);
            matrix(&mut w, &t("attn_q.weight"), self.heads * hd, d, ty);
            matrix(&mut w, &t("attn_k.weight"), self.kv_heads * hd, d, ty);
            matrix(&mut w, &t("attn_v.weight"), self.kv_heads * hd, d, ty);
            matrix(&mut w, &t("attn_output.weight"), d, self.heads * hd, ty);
            if a == "qwen2" {
                norm(&mut w, &t("attn_q.bias"), self.heads * hd, s + 1);
                norm(&mut w, &t("attn_k.bias"), self.kv_heads * hd, s + 2);
                norm(&mut w, &t("attn_v.bias"), self.kv_heads * hd, s + 3);
            }
            if a == "qwen3" || a == "gemma3" {
                norm(&mut w, &t("attn_q_norm.weight"), hd, s + 4);
                norm(&mut w, &t("attn_k_norm.weight"), hd, s + 5);
            }
            if a == "gemma3" {
                norm(&mut w, &t("post_attention_norm.weight"), d, s + 6);
                norm(&mut w, &t("post_ffw_norm.weight"), d, s + 7);
            }
            norm(&mut w, &t("ffn_norm.weight"), d, s + 8);
            matrix(&mut w, &t("ffn_gate.weight"), self.ffn, d, ty);
            matrix(&mut w, &t("ffn_up.weight"), self.ffn, d, ty);
            matrix(&mut w, &t("ffn_down.weight"), d, self.ffn, ty);
        }
        norm(&mut w, "output_norm.weight", d, seed + 99);
        if a == "qwen2" {
            matrix(&mut w, "output.weight", self.vocab, d, GgmlType::Q8_0);
        }
        let dir = std::env::temp_dir().join(format!("specswarm-test-{}-{}", std::process::id(), seed));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("tiny-{a}-{seed}.gguf"));
        w.write_file(&path).unwrap();
        path
    }
}

/// Max over elements of |a-b| / max(1, |b|)... relative to the largest magnitude in `b`.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
