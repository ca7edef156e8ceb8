//! GGUF quantized block formats and the CPU kernels that multiply them.
//!
//! * [`GgmlType`]: the tensor element types of GGUF files, their block geometry and the
//!   activation format each weight type is multiplied with ([`GgmlType::vec_dot_type`]).
//! * [`dequantize_row`] / [`quantize_row`]: scalar reference conversions following the ggml
//!   block layouts bit for bit (Q2_K, Q3_K and Q5_K can be read but not produced).
//! * [`vec_dot`]: one weight row times one quantized activation row, with AVX2+FMA kernels
//!   picked at run time on x86-64 (scalar reference: [`vec_dot_scalar`]).
//! * [`QMatrix`]: a quantized weight matrix with a tiled, rayon-parallel matmul.
//! * [`dot_f32`] / [`axpy_f32`]: f32 helpers for attention.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_multi;
mod blocks;
mod dot;
mod matmul;
mod types;

pub use blocks::{dequantize_row, quantize_row};
pub use dot::{axpy_f32, dot_f32, dot_f32_scalar, simd_available, vec_dot, vec_dot_scalar};
pub use matmul::QMatrix;
pub use types::{GgmlType, KernelError, QK, QK_K};
