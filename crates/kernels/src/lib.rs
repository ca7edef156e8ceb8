//! GGUF quantized block formats and the CPU kernels that multiply them.
//!
//! - [`GgmlType`]: the element types of the GGUF format, their block sizes and companion
//!   activation formats ([`GgmlType::vec_dot_type`]).
//! - [`dequantize_row`] / [`quantize_row`]: scalar reference conversions for every format.
//! - [`vec_dot`]: one weight row · one quantized activation row; AVX2 versions of the hot formats
//!   (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K) are picked at run time, scalar otherwise
//!   ([`vec_dot_scalar`] is the reference they are tested against).
//! - [`QMatrix`]: a quantized weight matrix and its multi-token, multi-thread `matmul`.
//!
//! Activations are quantized to 8 bits per weight block before integer dot products, as the
//! reference implementation does; this keeps our logits within rounding of llama.cpp's.

mod blocks;
mod dot;
mod matmul;
mod simd;
mod types;

pub use blocks::{dequantize_row, quantize_row};
pub use dot::{vec_dot, vec_dot_scalar};
pub use matmul::{QMatrix, matmul_many};
pub use types::{GgmlType, QK, QK_K};

/// Why a kernel call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelError {
    Unsupported { ty: GgmlType, op: &'static str },
    BadLength { expected: usize, got: usize },
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Unsupported { ty, op } => write!(f, "{op} is not supported for {ty}"),
            KernelError::BadLength { expected, got } => write!(f, "bad length: expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for KernelError {}

/// f32 dot product (AVX2 + FMA when available).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { simd::dot_f32_avx2(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += a * x` (AVX2 + FMA when available).
#[inline]
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { simd::axpy_f32_avx2(a, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}
