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
        matmul_many(x, n_tokens, &mut [(self, y)]);
    }
}

/// Several matrices applied to the same input in one parallel region: `jobs[i].1 = jobs[i].0 · x`.
///
/// The input rows are quantized once per companion format; the weight rows of all matrices are
/// split into tasks over the current rayon pool, and each task multiplies its rows with every
/// token, so each weight row is read from memory once per call. With one thread no rayon call is
/// made at all.
pub fn matmul_many(x: &[f32], n_tokens: usize, jobs: &mut [(&QMatrix, &mut [f32])]) {
    let Some(cols) = jobs.first().map(|j| j.0.cols) else { return };
    assert_eq!(x.len(), n_tokens * cols, "matmul input length");
    // Quantize the input once for each distinct companion format.
    let mut quantized: Vec<(GgmlType, usize, Vec<u8>)> = Vec::with_capacity(2);
    for (m, y) in jobs.iter() {
        assert_eq!(m.cols, cols, "matmul_many needs matrices with the same input width");
        assert_eq!(y.len(), n_tokens * m.rows, "matmul output length");
        let act = m.ty.vec_dot_type();
        if quantized.iter().all(|q| q.0 != act) {
            let xb = act.row_bytes(cols).expect("activation row is whole blocks when the weight row is");
            let mut buf = vec![0u8; xb * n_tokens];
            for (dst, src) in buf.chunks_exact_mut(xb).zip(x.chunks_exact(cols)) {
                quantize_row(act, src, dst).expect("activation format is quantizable");
            }
            quantized.push((act, xb, buf));
        }
    }
    let threads = rayon::current_num_threads();
    let total_rows: usize = jobs.iter().map(|j| j.0.rows).sum();
    let per_task = (total_rows / (threads * 4)).max(ROWS_PER_TASK_MIN);
    // Tasks: (matrix, first row, output rows laid out [row][token]).
    let mut outputs: Vec<Vec<f32>> = Vec::new();
    let mut tasks: Vec<(&QMatrix, usize, &mut [f32])> = Vec::new();
    if n_tokens == 1 {
        for (m, y) in jobs.iter_mut() {
            for (c, chunk) in y.chunks_mut(per_task).enumerate() {
                tasks.push((*m, c * per_task, chunk));
            }
        }
    } else {
        outputs = jobs.iter().map(|j| vec![0f32; j.0.rows * n_tokens]).collect();
        for ((m, _), out) in jobs.iter().zip(outputs.iter_mut()) {
            for (c, chunk) in out.chunks_mut(per_task * n_tokens).enumerate() {
                tasks.push((*m, c * per_task, chunk));
            }
        }
    }
    let run = |(m, first, out): &mut (&QMatrix, usize, &mut [f32])| {
        let (_, xb, xq) = quantized.iter().find(|q| q.0 == m.ty.vec_dot_type()).expect("input quantized");
        for (i, o) in out.chunks_exact_mut(n_tokens).enumerate() {
            let w = m.row(*first + i);
            for (t, v) in o.iter_mut().enumerate() {
                *v = vec_dot(m.ty, m.cols, w, &xq[t * xb..(t + 1) * xb]);
            }
        }
    };
    if threads == 1 || tasks.len() == 1 {
        tasks.iter_mut().for_each(run);
    } else {
        tasks.par_iter_mut().for_each(run);
    }
    drop(tasks);
    // Several tokens: transpose [row][token] into [token][row].
    for ((m, y), out) in jobs.iter_mut().zip(&outputs) {
        for (r, row) in out.chunks_exact(n_tokens).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                y[t * m.rows + r] = v;
            }
        }
    }
}
