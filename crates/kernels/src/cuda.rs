//! Optional CUDA backend (feature `cuda`): quantized weights dequantized once on the host,
//! kept on the GPU as f16, multiplied with cuBLAS.
//!
//! * [`CudaDevice`]: a CUDA context, its stream and a cuBLAS handle. [`CudaDevice::new`] returns
//!   [`CudaError`] (never panics) when the driver or cuBLAS library cannot be loaded or no GPU
//!   is present, so callers can fall back to the CPU kernels.
//! * [`CudaMatrix`]: a [`QMatrix`] uploaded to one device, with
//!   [`CudaMatrix::matmul`] taking and returning host f32 slices in the same layout as
//!   [`QMatrix::matmul`].
//!
//! Numerics: weights are dequantized with [`dequantize_row`](crate::dequantize_row) and
//! rounded to f16; activations are rounded to f16 on the host before the upload; the product
//! runs as `cublasGemmEx` with f16 inputs, f32 output and `CUBLAS_COMPUTE_32F` (f32
//! accumulation). Values beyond the f16 range (|v| > 65504) become infinite. Results differ
//! from [`QMatrix::matmul`] by rounding only (the CPU path quantizes activations to 8 bits,
//! coarser than f16); `tests/cuda.rs` holds them to 1e-2 relative.
//!
//! Libraries are opened with `dlopen` on first use. A library that is missing gives
//! [`CudaError::Library`]; a library lacking a needed symbol makes cudarc panic, which
//! [`CudaDevice::new`] catches and reports as [`CudaError::Library`] too (the panic message
//! may still be printed by the panic hook).

use crate::matmul::QMatrix;
use crate::types::KernelError;
use cudarc::cublas::{CudaBlas, result::CublasError, sys as cublas_sys};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

/// Errors of the CUDA backend.
#[derive(Debug)]
#[non_exhaustive]
pub enum CudaError {
    /// A CUDA library (`"libcuda"`, the driver, or `"libcublas"`) could not be loaded, or lacks
    /// a symbol this crate needs (e.g. a driver older than CUDA 12.0).
    Library { name: &'static str, detail: String },
    /// The driver loaded but reports no device with this ordinal.
    NoDevice { ordinal: usize, count: usize },
    /// A CUDA driver call failed.
    Driver(DriverError),
    /// A cuBLAS call failed.
    Cublas(CublasError),
    /// Dequantizing the weights failed.
    Kernel(KernelError),
    /// A dimension does not fit cuBLAS's 32-bit sizes.
    TooLarge { what: &'static str, value: usize },
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Library { name, detail } => write!(f, "cannot load {name}: {detail}"),
            CudaError::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device {ordinal} ({count} device(s) present)")
            }
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaError::Cublas(e) => write!(f, "cuBLAS error: {e}"),
            CudaError::Kernel(e) => write!(f, "dequantization failed: {e}"),
            CudaError::TooLarge { what, value } => write!(f, "{what} = {value} exceeds cuBLAS's i32 limit"),
        }
    }
}

impl std::error::Error for CudaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CudaError::Driver(e) => Some(e),
            CudaError::Cublas(e) => Some(e),
            CudaError::Kernel(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e)
    }
}
impl From<CublasError> for CudaError {
    fn from(e: CublasError) -> Self {
        CudaError::Cublas(e)
    }
}
impl From<KernelError> for CudaError {
    fn from(e: KernelError) -> Self {
        CudaError::Kernel(e)
    }
}

const NOT_FOUND: &str = "not found on the dynamic loader path";

/// Text of a caught panic (cudarc panics when a dynamically loaded symbol is missing).
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic while loading".into())
}

/// One GPU: its (primary) context, the stream all work goes to, and a cuBLAS handle bound to
/// that stream. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Arc<CudaBlas>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice").field("ordinal", &self.ctx.ordinal()).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Number of CUDA devices; `Err` when the driver library is missing or fails to initialise
    /// (a machine without a GPU usually gives `Library` or `Driver(CUDA_ERROR_NO_DEVICE)`).
    pub fn count() -> Result<usize, CudaError> {
        load_driver()?;
        Ok(CudaContext::device_count()?.max(0) as usize)
    }

    /// Open device `ordinal` (0 = first GPU): loads libcuda and libcublas at run time, creates
    /// the context, stream and cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<CudaDevice, CudaError> {
        let count = CudaDevice::count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::Library { name: "libcublas", detail: NOT_FOUND.into() });
        }
        catch_unwind(AssertUnwindSafe(|| -> Result<CudaDevice, CudaError> {
            let ctx = CudaContext::new(ordinal)?;
            let stream = ctx.default_stream();
            let blas = Arc::new(CudaBlas::new(stream.clone())?);
            Ok(CudaDevice { ctx, stream, blas })
        }))
        .unwrap_or_else(|p| Err(CudaError::Library { name: "libcublas", detail: panic_text(p) }))
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device name as the driver reports it.
    pub fn name(&self) -> Result<String, CudaError> {
        Ok(self.ctx.name()?)
    }
}

/// Load libcuda (if not yet) without panicking.
fn load_driver() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::Library { name: "libcuda", detail: NOT_FOUND.into() });
    }
    catch_unwind(cudarc::driver::result::init)
        .map_err(|p| CudaError::Library { name: "libcuda", detail: panic_text(p) })?
        .map_err(CudaError::Driver)
}

/// Device buffers reused across [`CudaMatrix::matmul`] calls (grown on demand).
struct Scratch {
    x_host: Vec<f16>,
    x_dev: Option<CudaSlice<u16>>,
    y_dev: Option<CudaSlice<f32>>,
}

/// A weight matrix resident on a GPU as row-major f16 (`rows x cols`), built from a
/// [`QMatrix`] by dequantizing on the host and uploading once.
pub struct CudaMatrix {
    dev: CudaDevice,
    rows: usize,
    cols: usize,
    /// f16 bit patterns (`half::f16` is `repr(transparent)` over `u16`), so cudarc needs no
    /// `f16` feature.
    w: CudaSlice<u16>,
    scratch: Mutex<Scratch>,
}

impl fmt::Debug for CudaMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaMatrix")
            .field("device", &self.dev)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

fn to_i32(what: &'static str, value: usize) -> Result<i32, CudaError> {
    i32::try_from(value).map_err(|_| CudaError::TooLarge { what, value })
}

impl CudaMatrix {
    /// Dequantize `m` (any type [`dequantize_row`](crate::dequantize_row) reads) to f16 on the
    /// host, rows in parallel, and upload it to `dev`.
    pub fn from_qmatrix(m: &QMatrix, dev: &CudaDevice) -> Result<CudaMatrix, CudaError> {
        let (rows, cols) = (m.rows(), m.cols());
        to_i32("rows", rows)?;
        to_i32("cols", cols)?;
        let mut host = vec![f16::ZERO; rows * cols];
        if cols > 0 {
            use rayon::prelude::*;
            host.par_chunks_mut(cols).enumerate().try_for_each_init(
                || vec![0f32; cols],
                |tmp, (r, dst)| -> Result<(), KernelError> {
                    crate::blocks::dequantize_row(m.ty(), m.row(r), tmp)?;
                    dst.convert_from_f32_slice(tmp);
                    Ok(())
                },
            )?;
        }
        // A zero-length allocation is not allowed; keep one element for empty matrices.
        if host.is_empty() {
            host.push(f16::ZERO);
        }
        let w = dev.stream.clone_htod(host.reinterpret_cast())?;
        dev.stream.synchronize()?;
        Ok(CudaMatrix {
            dev: dev.clone(),
            rows,
            cols,
            w,
            scratch: Mutex::new(Scratch { x_host: Vec::new(), x_dev: None, y_dev: None }),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The device the weights live on.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// `y[t*rows + r] = sum_c W[r,c] * x[t*cols + c]` for `t in 0..n_tokens`, as
    /// [`QMatrix::matmul`]: `x` is copied (as f16) to the device, one `cublasGemmEx` runs, and
    /// `y` is copied back; returns after the result is in `y`. Calls on one matrix are
    /// serialised (shared device scratch buffers).
    ///
    /// # Panics
    /// If `x.len() < n_tokens * cols` or `y.len() < n_tokens * rows`.
    pub fn matmul(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<(), CudaError> {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= n_tokens * cols, "matmul: x has {} values, need {}", x.len(), n_tokens * cols);
        assert!(y.len() >= n_tokens * rows, "matmul: y has {} values, need {}", y.len(), n_tokens * rows);
        if n_tokens == 0 || rows == 0 {
            return Ok(());
        }
        if cols == 0 {
            y[..n_tokens * rows].fill(0.0);
            return Ok(());
        }
        let (m, k, n) = (to_i32("rows", rows)?, to_i32("cols", cols)?, to_i32("n_tokens", n_tokens)?);
        to_i32("n_tokens * cols", n_tokens * cols)?;
        to_i32("n_tokens * rows", n_tokens * rows)?;
        let stream = &self.dev.stream;
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;

        s.x_host.resize(n_tokens * cols, f16::ZERO);
        s.x_host.convert_from_f32_slice(&x[..n_tokens * cols]);
        if s.x_dev.as_ref().is_none_or(|b| b.len() < n_tokens * cols) {
            // SAFETY: fully overwritten by the copy below before any read.
            s.x_dev = Some(unsafe { stream.alloc::<u16>(n_tokens * cols) }?);
        }
        if s.y_dev.as_ref().is_none_or(|b| b.len() < n_tokens * rows) {
            // SAFETY: fully written by the gemm (beta = 0) before it is read back.
            s.y_dev = Some(unsafe { stream.alloc::<f32>(n_tokens * rows) }?);
        }
        let (x_dev, y_dev) = (s.x_dev.as_mut().expect("allocated"), s.y_dev.as_mut().expect("allocated"));
        stream.memcpy_htod(s.x_host.reinterpret_cast(), x_dev)?;

        // cuBLAS is column-major. Row-major W (rows x cols) is column-major W^T with ld = cols;
        // row-major x (n_tokens x cols) is column-major X (cols x n_tokens), ld = cols; row-major
        // y (n_tokens x rows) is column-major Y (rows x n_tokens), ld = rows. So
        // Y = op(A) * B with A = W^T-as-stored, op = transpose: m = rows, n = n_tokens, k = cols.
        self.dev.ctx.bind_to_thread()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (a, _ra) = self.w.device_ptr(stream);
            let (b, _rb) = x_dev.device_ptr(stream);
            let (c, _rc) = y_dev.device_ptr_mut(stream);
            // SAFETY: a holds rows*cols f16, b at least n_tokens*cols f16, c at least
            // n_tokens*rows f32 (checked above); leading dimensions match those extents; the
            // handle is bound to `stream`, on which the pointers were synchronised.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *self.dev.blas.handle(),
                    cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    (&alpha) as *const f32 as *const _,
                    a as *const _,
                    cublas_sys::cudaDataType_t::CUDA_R_16F,
                    k,
                    b as *const _,
                    cublas_sys::cudaDataType_t::CUDA_R_16F,
                    k,
                    (&beta) as *const f32 as *const _,
                    c as *mut _,
                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                    m,
                    cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
            }
        }
        stream.memcpy_dtoh(&y_dev.slice(..n_tokens * rows), &mut y[..n_tokens * rows])?;
        stream.synchronize()?;
        Ok(())
    }
}
