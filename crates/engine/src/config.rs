//! Architecture configuration: what makes llama, qwen2, qwen3 and gemma3 differ, as data.
//!
//! One transformer block (see `model.rs`) reads these switches; there are no per-model copies of the
//! attention or KV code.

use crate::error::EngineError;
use crate::gguf::{GgufFile, MetaValue};

/// The architectures this engine runs (GGUF `general.architecture` values).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma3"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

/// How RoPE pairs up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama-family GGUFs (whose Q/K weights the converter permuted).
    Interleaved,
    /// Halves (i, i + d/2): GPT-NeoX style (qwen, gemma).
    Neox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub arch_name: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_len: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    pub rope_dims: usize,
    /// RoPE base of global-attention layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (gemma3 uses 10 000 there).
    pub rope_base_local: f32,
    /// Linear RoPE scaling factor of global layers (positions are divided by it).
    pub rope_scale: f32,
    /// Sliding-window size and which layers use it.
    pub sliding_window: Option<usize>,
    /// Every `sliding_period`-th layer (1-based) is global; the others slide. 0: all layers global.
    pub sliding_period: usize,
    pub qk_norm: bool,
    pub post_norms: bool,
    pub qkv_bias: bool,
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    /// Multiplier applied to attention scores (1/sqrt(head_dim) unless the architecture says otherwise).
    pub attn_scale: f32,
    /// Apply `attn_scale` to the query (after RoPE, before it is rounded to f16) rather than to
    /// the scores, as llama.cpp's gemma3 graph does (it differs where f16 rounding is inexact).
    pub scale_query: bool,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, EngineError> {
        let arch_name = file
            .get_str("general.architecture")
            .ok_or_else(|| EngineError::MissingMetadata { key: "general.architecture".into() })?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            _ => {
                return Err(EngineError::UnsupportedArchitecture {
                    arch: arch_name,
                    supported: SUPPORTED_ARCHITECTURES,
                });
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| file.require_u64(&key(k)).map(|v| v as usize);
        let u_or = |k: &str, d: usize| file.get(&key(k)).and_then(MetaValue::as_u64).map_or(d, |v| v as usize);
        let f_or = |k: &str, d: f64| file.get(&key(k)).and_then(MetaValue::as_f64).unwrap_or(d) as f32;

        let n_layers = u("block_count")?;
        let d_model = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let ffn_dim = u("feed_forward_length")?;
        if n_heads == 0 || d_model == 0 || n_layers == 0 || ffn_dim == 0 {
            return Err(EngineError::InvalidConfig { reason: "zero-sized dimension in metadata".into() });
        }
        let n_kv_heads = u_or("attention.head_count_kv", n_heads);
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(EngineError::InvalidConfig {
                reason: format!("{n_heads} heads is not a multiple of {n_kv_heads} KV heads"),
            });
        }
        let head_dim = u_or("attention.key_length", d_model / n_heads);
        let head_dim_v = u_or("attention.value_length", head_dim);
        let rope_dims = u_or("rope.dimension_count", head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(EngineError::InvalidConfig { reason: format!("rope dims {rope_dims} vs head dim {head_dim}") });
        }
        let vocab_size = match file.get(&key("vocab_size")).and_then(MetaValue::as_u64) {
            Some(v) => v as usize,
            None => file
                .tensor_info("token_embd.weight")
                .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                .or_else(|| file.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(<[_]>::len))
                .ok_or_else(|| EngineError::MissingMetadata { key: key("vocab_size") })?,
        };
        let scaling_type = file.get_str(&key("rope.scaling.type")).unwrap_or("none");
        let rope_scale = match scaling_type {
            "linear" => f_or("rope.scaling.factor", 1.0),
            _ => 1.0,
        };
        let gemma = arch == Arch::Gemma3;
        let rope_base = f_or("rope.freq_base", 10_000.0);
        let cfg = ModelConfig {
            arch,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            head_dim_v,
            ffn_dim,
            vocab_size,
            context_len: u_or("context_length", 4096),
            rms_eps: f_or("attention.layer_norm_rms_epsilon", 1e-5),
            rope_style: if arch == Arch::Llama { RopeStyle::Interleaved } else { RopeStyle::Neox },
            rope_dims,
            rope_base,
            rope_base_local: if gemma { 10_000.0 } else { rope_base },
            rope_scale,
            sliding_window: file.get(&key("attention.sliding_window")).and_then(MetaValue::as_u64).map(|v| v as usize),
            sliding_period: if gemma { 6 } else { 0 },
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: gemma,
            qkv_bias: arch == Arch::Qwen2,
            embed_scale: gemma.then(|| (d_model as f32).sqrt()),
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            scale_query: gemma,
            attn_softcap: file.get(&key("attn_logit_softcapping")).and_then(MetaValue::as_f64).map(|v| v as f32),
            final_softcap: file.get(&key("final_logit_softcapping")).and_then(MetaValue::as_f64).map(|v| v as f32),
            arch_name,
        };
        Ok(cfg)
    }

    /// Whether `layer` uses sliding-window attention.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && (self.sliding_period == 0 || !(layer + 1).is_multiple_of(self.sliding_period))
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn k_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn v_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim_v
    }
}
