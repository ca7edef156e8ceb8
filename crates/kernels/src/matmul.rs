//! Quantized matrices and their multiplication with f32 activations.

use rayon::prelude::*;

use crate::KernelError;
use crate::blocks::{dequantize_row, quantize_row};
use crate::dot::vec_dot;
use crate::types::GgmlType;

/// A row-major quantized matrix: `rows` rows of `cols` values, each row `ty.row_bytes(cols)` bytes
/// in the GGUF block layout.
#[derive(Clone, Debug)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

/// Weight rows per parallel task: big enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK_MIN: usize = 16;

impl QMatrix {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix, KernelError> {
        if matches!(ty, GgmlType::Q8_1 | GgmlType::Q8K) {
            return Err(KernelError::Unsupported { ty, op: "weight matrix" });
        }
        let row_bytes = ty.row_bytes(cols).ok_or(KernelError::BadLength { expected: ty.block_elems(), got: cols })?;
        let expected =
            row_bytes.checked_mul(rows).ok_or(KernelError::BadLength { expected: usize::MAX, got: data.len() })?;
        if data.len() != expected {
            return Err(KernelError::BadLength { expected, got: data.len() });
        }
        Ok(QMatrix { ty, rows, cols, row_bytes, data })
    }

    /// Quantize a row-major f32 matrix.
    pub fn from_f32(ty: GgmlType, rows: usize, cols: usize, values: &[f32]) -> Result<QMatrix, KernelError> {
        if values.len() != rows * cols {
            return Err(KernelError::BadLength { expected: rows * cols, got: values.len() });
        }
        let row_bytes = ty.row_bytes(cols).ok_or(KernelError::BadLength { expected: ty.block_elems(), got: cols })?;
        let mut data = vec![0u8; row_bytes * rows];
        for (dst, src) in data.chunks_exact_mut(row_bytes).zip(values.chunks_exact(cols)) {
            quantize_row(ty, src, dst)?;
        }
        QMatrix::new(ty, rows, cols, data)
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantize row `r` into `dst` (`cols` values): embedding lookups.
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        dequantize_row(self.ty, self.row(r), dst).expect("row length is checked at construction");
    }

    /// `y[t*rows + r] = Σ_c W[r,c] · x[t*cols + c]` for `t < n_tokens`.
    pub fn matmul(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) {
        let mut scratch = Vec::new();
        self.matmul_with_scratch(x, n_tokens, y, &mut scratch);
    }

    /// [`QMatrix::matmul`] reusing `scratch` for the quantized activations.
    ///
    /// The activation rows are quantized once to the weight type's companion format; the weight
    /// rows are then split over the current rayon pool, and each task multiplies its rows with all
    /// tokens, so every weight row is read from memory once per call.
    pub fn matmul_with_scratch(&self, x: &[f32], n_tokens: usize, y: &mut [f32], scratch: &mut Vec<u8>) {
        assert_eq!(x.len(), n_tokens * self.cols, "matmul input length");
        assert_eq!(y.len(), n_tokens * self.rows, "matmul output length");
        let act = self.ty.vec_dot_type();
        let xb = act.row_bytes(self.cols).expect("activation row is whole blocks when the weight row is");
        scratch.resize(xb * n_tokens, 0);
        for (dst, src) in scratch.chunks_exact_mut(xb).zip(x.chunks_exact(self.cols)) {
            quantize_row(act, src, dst).expect("activation format is quantizable");
        }
        let xq: &[u8] = scratch;
        let threads = rayon::current_num_threads();
        let per_task = (self.rows / (threads * 4)).max(ROWS_PER_TASK_MIN);
        let (ty, cols) = (self.ty, self.cols);
        if n_tokens == 1 {
            let run = |(chunk, out): (usize, &mut [f32])| {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = vec_dot(ty, cols, self.row(chunk * per_task + i), xq);
                }
            };
            if threads == 1 || self.rows <= per_task {
                y.chunks_mut(per_task).enumerate().for_each(run);
            } else {
                y.par_chunks_mut(per_task).enumerate().for_each(run);
            }
            return;
        }
        // Several tokens: compute [row][token] tiles, then transpose into [token][row].
        let mut tmp = vec![0f32; self.rows * n_tokens];
        let run = |(chunk, out): (usize, &mut [f32])| {
            for (i, o) in out.chunks_exact_mut(n_tokens).enumerate() {
                let w = self.row(chunk * per_task + i);
                for (t, v) in o.iter_mut().enumerate() {
                    *v = vec_dot(ty, cols, w, &xq[t * xb..(t + 1) * xb]);
                }
            }
        };
        if threads == 1 {
            tmp.chunks_mut(per_task * n_tokens).enumerate().for_each(run);
        } else {
            tmp.par_chunks_mut(per_task * n_tokens).enumerate().for_each(run);
        }
        for (r, row) in tmp.chunks_exact(n_tokens).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                y[t * self.rows + r] = v;
            }
        }
    }
}
