//! GGUF quantized block formats and the CPU kernels that multiply them.
//!
//! (Skeleton: filled in by the kernels work.)
