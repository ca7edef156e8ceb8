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
//! * [`ggml_math`]: softmax, SwiGLU and f16 dot products in llama.cpp's exact operation order.
//!
//! SIMD: on x86-64 with AVX2+FMA+F16C (detected once at run time, see [`simd_available`];
//! the environment variable `SPECSWARM_KERNELS_NO_SIMD` forces scalar) every weight type has
//! an AVX2 row kernel, and the legacy quants plus Q4_K/Q5_K/Q6_K also have multi-token kernels
//! (one weight row against up to four activation rows) used by [`QMatrix::matmul`] when
//! `n_tokens > 1`. Activation quantization to Q8_0/Q8_1/Q8_K inside the matmul is AVX2 too
//! and byte-identical to [`quantize_row`].
//!
//! Activation quantization follows ggml's x86 code so that results match llama.cpp bit for bit:
//! Q8_0/Q8_1 multiply by `127 / amax` and round half to even, Q8_1's `s` is `d * sum(q)` with the
//! unrounded `d`, Q8_K's scale is `1 / (127 / amax)` (ggml's is the same up to a sign flip of the
//! scale and every quant, which leaves all products unchanged). The tile kernels reproduce the
//! float operation order of ggml's AVX2 dot products (Q4_K: of its repacked 8x8 gemv).
//!
//! # CUDA (optional, feature `cuda`)
//!
//! With `--features cuda` the `cuda` module adds a cuBLAS matmul (the feature is off by
//! default and no test or other crate needs it):
//!
//! * `CudaDevice::new(ordinal)` opens a GPU, or returns a `CudaError` (no panic) when the CUDA
//!   driver / cuBLAS libraries cannot be loaded or there is no such device; `CudaDevice::count()`
//!   probes without opening.
//! * `CudaMatrix::from_qmatrix(&qmatrix, &device)` dequantizes the weights on the host (with
//!   [`dequantize_row`]), rounds them to f16 and uploads them once.
//! * `CudaMatrix::matmul(&self, x, n_tokens, y) -> Result<(), CudaError>` computes
//!   `y[t*rows + r] = sum_c W[r,c] * x[t*cols + c]` like [`QMatrix::matmul`]: the activations
//!   are rounded to f16 and uploaded, one `cublasGemmEx` runs (f16 inputs, f32 accumulation and
//!   output), and `y` is copied back before it returns.
//!
//! Building needs no CUDA toolkit: the `cudarc` bindings are compiled against a fixed CUDA 12.0
//! API and open `libcuda.so` / `libcublas.so` with `dlopen` on first use, so
//! `cargo build -p specswarm-kernels --features cuda` works anywhere. Running needs an NVIDIA
//! driver and the cuBLAS 12 runtime library on the loader path (e.g. `LD_LIBRARY_PATH`
//! containing the toolkit's `lib64`). `cargo test -p specswarm-kernels --features cuda --test
//! cuda` compares the GPU matmul with the CPU one, and prints `no CUDA device, skipped` where
//! there is no GPU.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_multi;
mod blocks;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dot;
pub mod ggml_math;
mod matmul;
mod types;

pub use blocks::{dequantize_row, quantize_row};
pub use dot::{axpy_f32, dot_f32, dot_f32_scalar, simd_available, vec_dot, vec_dot_scalar};
pub use matmul::QMatrix;
pub use types::{GgmlType, KernelError, QK, QK_K};
