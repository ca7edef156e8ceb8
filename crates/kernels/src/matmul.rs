//! [`QMatrix`]: a row-major quantized weight matrix and its (parallel) matrix multiply.

use crate::blocks::{dequantize_row, quantize_act, quantize_row};
use crate::dot::{TILE_ROWS, TILE_TOKENS, dot_fn, dot_tile_fn};
use crate::types::{GgmlType, KernelError};
use std::cell::RefCell;

/// A row-major quantized matrix: `rows` rows of `cols` elements, each row
/// `ty.row_bytes(cols)` bytes.
#[derive(Clone, Debug)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Work (multiply-accumulates) below which a matmul never goes to the thread pool.
const MIN_PARALLEL_WORK: usize = 1 << 16;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A raw output pointer shared by the row-chunk workers; each writes disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: workers write disjoint indices only (see `QMatrix::rows_into`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl QMatrix {
    /// Wrap raw row-major data; `data.len()` must be `rows * ty.row_bytes(cols)`.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix, KernelError> {
        let be = ty.block_elems();
        let rb = ty.row_bytes(cols).ok_or(KernelError::BadLength { expected: cols.div_ceil(be) * be, got: cols })?;
        let expected = rb.checked_mul(rows).ok_or(KernelError::BadLength { expected: usize::MAX, got: data.len() })?;
        if data.len() != expected {
            return Err(KernelError::BadLength { expected, got: data.len() });
        }
        Ok(QMatrix { ty, rows, cols, data })
    }

    /// Quantize `rows * cols` row-major values into a new matrix of type `ty`.
    pub fn from_f32(ty: GgmlType, rows: usize, cols: usize, values: &[f32]) -> Result<QMatrix, KernelError> {
        let n = rows.checked_mul(cols).ok_or(KernelError::BadLength { expected: usize::MAX, got: values.len() })?;
        if values.len() != n {
            return Err(KernelError::BadLength { expected: n, got: values.len() });
        }
        if !ty.can_quantize() {
            return Err(KernelError::Unsupported { ty, op: "quantize_row" });
        }
        let be = ty.block_elems();
        let rb = ty.row_bytes(cols).ok_or(KernelError::BadLength { expected: cols.div_ceil(be) * be, got: cols })?;
        let mut data = vec![0u8; rb * rows];
        if rb > 0 {
            for (src, dst) in values.chunks_exact(cols).zip(data.chunks_exact_mut(rb)) {
                quantize_row(ty, src, dst)?;
            }
        }
        Ok(QMatrix { ty, rows, cols, data })
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
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.data.len().checked_div(self.rows).unwrap_or(0)
    }
    /// The raw bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantize row `r` into `dst` (`dst.len() == cols`); for embedding lookups.
    ///
    /// # Panics
    /// If `r >= rows` or `dst.len() != cols`.
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        assert_eq!(dst.len(), self.cols, "dequantize_row: dst length");
        dequantize_row(self.ty, self.row(r), dst).expect("lengths checked at construction");
    }

    /// `y[t*rows + r] = sum_c W[r,c] * x[t*cols + c]` for `t in 0..n_tokens`.
    ///
    /// Uses a per-thread scratch buffer for the quantized activations, so repeated calls do not
    /// allocate. See [`QMatrix::matmul_with_scratch`].
    pub fn matmul(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) {
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => self.matmul_with_scratch(x, n_tokens, y, &mut s),
            // Re-entrant use on this thread (should not happen): fall back to a fresh buffer.
            Err(_) => self.matmul_with_scratch(x, n_tokens, y, &mut Vec::new()),
        })
    }

    /// Like [`QMatrix::matmul`], with a caller-provided scratch for the quantized activations.
    ///
    /// `x` holds `n_tokens` rows of `cols` values, `y` receives `n_tokens` rows of `rows`
    /// values. Activations are quantized once to `ty.vec_dot_type()`; weight rows are split
    /// into about `4 x threads` chunks over the *current* rayon pool (inline when that pool
    /// has one thread or the product is small). Within a chunk, rows are processed in tiles
    /// against tiles of tokens, so each weight row is streamed from memory once.
    ///
    /// # Panics
    /// If `x.len() < n_tokens * cols` or `y.len() < n_tokens * rows`.
    pub fn matmul_with_scratch(&self, x: &[f32], n_tokens: usize, y: &mut [f32], scratch: &mut Vec<u8>) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= n_tokens * cols, "matmul: x has {} values, need {}", x.len(), n_tokens * cols);
        assert!(y.len() >= n_tokens * rows, "matmul: y has {} values, need {}", y.len(), n_tokens * rows);
        if n_tokens == 0 || rows == 0 {
            return;
        }
        if cols == 0 {
            y[..n_tokens * rows].fill(0.0);
            return;
        }
        let vt = self.ty.vec_dot_type();
        let xrb = vt.row_bytes(cols).expect("cols is a whole number of blocks");
        scratch.clear();
        scratch.resize(n_tokens * xrb, 0);
        for (src, dst) in x[..n_tokens * cols].chunks_exact(cols).zip(scratch.chunks_exact_mut(xrb)) {
            quantize_act(vt, src, dst).expect("activation quantization");
        }
        let xq: &[u8] = scratch;
        let out = OutPtr(y.as_mut_ptr());
        let work = rows.saturating_mul(cols).saturating_mul(n_tokens);
        let threads = if work < MIN_PARALLEL_WORK || rows < 2 { 1 } else { rayon::current_num_threads() };
        if threads <= 1 {
            // SAFETY: y holds n_tokens*rows values (asserted above); single writer.
            unsafe { self.rows_into(0, rows, xq, xrb, n_tokens, out) };
            return;
        }
        let n_chunks = (4 * threads).min(rows);
        let chunk = rows.div_ceil(n_chunks);
        let n_chunks = rows.div_ceil(chunk);
        use rayon::prelude::*;
        (0..n_chunks).into_par_iter().with_max_len(1).for_each(|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            // SAFETY: chunks cover disjoint row ranges, so writes never overlap; `y` outlives
            // the parallel loop.
            unsafe { self.rows_into(r0, r1, xq, xrb, n_tokens, out) };
        });
    }

    /// Compute `y[t*rows + r]` for `r in r0..r1`, all tokens.
    ///
    /// # Safety
    /// `out` must point to at least `n_tokens * rows` f32s that no one else reads or writes at
    /// the indices touched here while this runs.
    unsafe fn rows_into(&self, r0: usize, r1: usize, xq: &[u8], xrb: usize, n_tokens: usize, out: OutPtr) {
        let dot = dot_fn(self.ty);
        let (rows, cols) = (self.rows, self.cols);
        let wrb = self.row_bytes();
        let tile = dot_tile_fn(self.ty);
        // Batch invariance: a row's result must not depend on how many tokens share the call
        // (speculative verification of k tokens must reproduce plain decoding bit for bit), so
        // when a tile kernel exists it also serves single tokens: its per-(row, token)
        // arithmetic is the same for every tile shape.
        if tile.is_none() {
            for t in 0..n_tokens {
                let x = &xq[t * xrb..(t + 1) * xrb];
                for r in r0..r1 {
                    let v = dot(cols, &self.data[r * wrb..(r + 1) * wrb], x);
                    // SAFETY: t < n_tokens, r < rows; caller guarantees exclusive access.
                    unsafe { *out.0.add(t * rows + r) = v };
                }
            }
            return;
        }
        let k = tile.expect("checked above");
        let mut wbuf = Vec::new();
        let mut xsc = Vec::new();
        // Tiles: a group of token rows small enough to stay in L1 (~16 KiB, a multiple of the
        // 4-token kernel width) against a block of weight rows that stays in L2 (~256 KiB):
        // weights stream from memory once, then from L2 once per token group.
        let tok_tile = ((48 * 1024 / xrb.max(1)) & !3).clamp(8, 64);
        let row_tile = (256 * 1024 / wrb.max(1)).clamp(1, 1024);
        let mut rt = r0;
        while rt < r1 {
            let rt_end = (rt + row_tile).min(r1);
            let mut tt = 0;
            while tt < n_tokens {
                let tt_end = (tt + tok_tile).min(n_tokens);
                let xt = &xq[tt * xrb..tt_end * xrb];
                if tt_end - tt <= TILE_TOKENS {
                    // Few tokens: straight from the raw rows (same bits as the unpacked path).
                    let nt = tt_end - tt;
                    let mut r = rt;
                    while r < rt_end {
                        let nr = (rt_end - r).min(TILE_ROWS);
                        let mut tmp = [0.0f32; TILE_ROWS * TILE_TOKENS];
                        (k.direct)(cols, &self.data[r * wrb..(r + nr) * wrb], wrb, nr, xt, xrb, nt, &mut tmp);
                        for j in 0..nr {
                            for kk in 0..nt {
                                // SAFETY: tt + kk < n_tokens, r + j < rows; exclusive per caller
                                // contract.
                                unsafe { *out.0.add((tt + kk) * rows + r + j) = tmp[j * TILE_TOKENS + kk] };
                            }
                        }
                        r += nr;
                    }
                    tt = tt_end;
                    continue;
                }
                (k.xprep)(cols, xt, xrb, tt_end - tt, &mut xsc);
                let xss = xsc.len() / (tt_end - tt);
                let mut r = rt;
                while r < rt_end {
                    let nr = (rt_end - r).min(TILE_ROWS);
                    (k.prep)(cols, &self.data[r * wrb..(r + nr) * wrb], wrb, nr, &mut wbuf);
                    let mut t = tt;
                    while t < tt_end {
                        let nt = (tt_end - t).min(TILE_TOKENS);
                        let mut tmp = [0.0f32; TILE_ROWS * TILE_TOKENS];
                        let (xo, so) = ((t - tt) * xrb, (t - tt) * xss);
                        (k.tile)(cols, &wbuf, nr, &xt[xo..], xrb, &xsc[so..], nt, &mut tmp);
                        for j in 0..nr {
                            for kk in 0..nt {
                                // SAFETY: t + kk < n_tokens, r + j < rows; exclusive per caller
                                // contract.
                                unsafe { *out.0.add((t + kk) * rows + r + j) = tmp[j * TILE_TOKENS + kk] };
                            }
                        }
                        t += nt;
                    }
                    r += nr;
                }
                tt = tt_end;
            }
            rt = rt_end;
        }
    }
}
