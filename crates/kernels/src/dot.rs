//! Row dot products between a weight row and an activation row in the weight type's
//! [`vec_dot_type`](GgmlType::vec_dot_type), plus small f32 helpers.
//!
//! Every kernel has a portable scalar version (the reference) and, on x86-64, an AVX2+FMA+F16C
//! version chosen at run time. The choice is cached in a once-initialised static.

use crate::blocks::{k4_scale_min, q3k_scales, rd_f16, rd_f32};
use crate::types::{GgmlType, QK_K};
use half::{bf16, f16};
use std::sync::OnceLock;

/// A row kernel: `(n elements, weight row bytes, activation row bytes) -> dot`.
/// Kernels check that both slices are long enough before touching memory.
pub(crate) type DotFn = fn(usize, &[u8], &[u8]) -> f32;

/// Most weight rows one tile kernel call handles.
pub(crate) const TILE_ROWS: usize = 4;
/// Most activation rows (tokens) one tile kernel call handles.
pub(crate) const TILE_TOKENS: usize = 4;

/// A tile kernel for one weight type, in three steps:
/// * `prep(n, w, wstride, nr, buf)`: `nr <= TILE_ROWS` weight rows (`wstride` bytes apart)
///   into `buf` in the kernel's working layout (unpacked once, reused for every token group);
/// * `xprep(n, x, xstride, nt, xsc)`: per-token f32 tables (activation block scales) of `nt`
///   activation rows;
/// * `tile(n, buf, nr, x, xstride, xsc, nt, out)`: `out[r * TILE_TOKENS + t] = dot(row r,
///   token t)` for `r < nr`, `t < nt <= TILE_TOKENS`, where `x` and `xsc` start at token 0 of
///   the group.
///
/// Batch invariance: the floating-point operations producing one `(r, t)` result are the same
/// for every `nr` and `nt` (only integer work, which is exact, and loads are shared), so a row
/// computed in any tile, or alone, gives the same bits.
#[derive(Clone, Copy)]
pub(crate) struct TileKernel {
    pub prep: fn(usize, &[u8], usize, usize, &mut Vec<u8>),
    pub xprep: fn(usize, &[u8], usize, usize, &mut Vec<f32>),
    #[allow(clippy::type_complexity)]
    pub tile: fn(usize, &[u8], usize, &[u8], usize, &[f32], usize, &mut [f32; TILE_ROWS * TILE_TOKENS]),
    /// `tile` straight from the raw weight rows: `(n, w, wstride, nr, x, xstride, nt, out)`
    /// (few tokens, where unpacking into the working layout does not pay); same bits.
    #[allow(clippy::type_complexity)]
    pub direct: fn(usize, &[u8], usize, usize, &[u8], usize, usize, &mut [f32; TILE_ROWS * TILE_TOKENS]),
}

static SIMD: OnceLock<bool> = OnceLock::new();

/// Whether the AVX2 (+FMA, F16C) kernels are used on this machine. Decided once per process;
/// setting the environment variable `SPECSWARM_KERNELS_NO_SIMD` (to anything) forces the
/// portable scalar kernels everywhere.
pub fn simd_available() -> bool {
    *SIMD.get_or_init(|| {
        if std::env::var_os("SPECSWARM_KERNELS_NO_SIMD").is_some() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The fastest available kernel for weight type `ty`.
pub(crate) fn dot_fn(ty: GgmlType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if simd_available()
        && let Some(f) = crate::avx2::dot_fn(ty)
    {
        return f;
    }
    scalar_dot_fn(ty)
}

/// A multi-token kernel for `ty`, if one beats repeated single-row calls.
pub(crate) fn dot_tile_fn(ty: GgmlType) -> Option<TileKernel> {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        return crate::avx2_multi::dot_tile_fn(ty);
    }
    let _ = ty;
    None
}

pub(crate) fn scalar_dot_fn(ty: GgmlType) -> DotFn {
    match ty {
        GgmlType::F32 => dot_f32_f32,
        GgmlType::F16 => dot_f16_f32,
        GgmlType::BF16 => dot_bf16_f32,
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q8_0 => dot_q8_0,
        GgmlType::Q8_1 => dot_q8_1,
        GgmlType::Q2K => dot_q2k,
        GgmlType::Q3K => dot_q3k,
        GgmlType::Q4K => dot_q4k,
        GgmlType::Q5K => dot_q5k,
        GgmlType::Q6K => dot_q6k,
        GgmlType::Q8K => dot_q8k,
    }
}

/// Panics unless `n` is a whole number of blocks and both rows are long enough.
#[inline]
pub(crate) fn check_row(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> usize {
    let be = ty.block_elems();
    assert!(n.is_multiple_of(be), "vec_dot: {n} elements is not a multiple of {be} for {ty}");
    let wb = n / be * ty.block_bytes();
    let xt = ty.vec_dot_type();
    let xb = n / xt.block_elems() * xt.block_bytes();
    assert!(w.len() >= wb && x.len() >= xb, "vec_dot: row too short for {n} elements of {ty}");
    n / be
}

/// Dot product of one weight row (type `ty`, `n` elements) with one activation row already
/// quantized to `ty.vec_dot_type()`. Uses SIMD when available.
///
/// # Panics
/// If `n` is not a multiple of `ty.block_elems()` or either row is shorter than `n` elements.
pub fn vec_dot(ty: GgmlType, n: usize, w_row: &[u8], x_row: &[u8]) -> f32 {
    dot_fn(ty)(n, w_row, x_row)
}

/// [`vec_dot`] forced onto the portable scalar reference kernels.
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w_row: &[u8], x_row: &[u8]) -> f32 {
    scalar_dot_fn(ty)(n, w_row, x_row)
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels
// ---------------------------------------------------------------------------------------------

fn f32s(x: &[u8], n: usize) -> impl Iterator<Item = f32> + '_ {
    x[..n * 4].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn dot_f32_f32(n: usize, w: &[u8], x: &[u8]) -> f32 {
    check_row(GgmlType::F32, n, w, x);
    f32s(w, n).zip(f32s(x, n)).map(|(a, b)| a * b).sum()
}

fn dot_f16_f32(n: usize, w: &[u8], x: &[u8]) -> f32 {
    check_row(GgmlType::F16, n, w, x);
    w[..2 * n]
        .chunks_exact(2)
        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .zip(f32s(x, n))
        .map(|(a, b)| a * b)
        .sum()
}

fn dot_bf16_f32(n: usize, w: &[u8], x: &[u8]) -> f32 {
    check_row(GgmlType::BF16, n, w, x);
    w[..2 * n]
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .zip(f32s(x, n))
        .map(|(a, b)| a * b)
        .sum()
}

#[inline(always)]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| v as i8 as i32)
}

fn dot_q4_0(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q4_0, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 18..i * 18 + 18], &x[i * 34..i * 34 + 34]);
        let qx = &xb[2..34];
        let mut s = 0i32;
        for j in 0..16 {
            s += ((wb[2 + j] & 0x0F) as i32 - 8) * qx[j] as i8 as i32;
            s += ((wb[2 + j] >> 4) as i32 - 8) * qx[j + 16] as i8 as i32;
        }
        acc += rd_f16(wb, 0) * rd_f16(xb, 0) * s as f32;
    }
    acc
}

fn dot_q4_1(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q4_1, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 20..i * 20 + 20], &x[i * 36..i * 36 + 36]);
        let qx = &xb[4..36];
        let mut s = 0i32;
        for j in 0..16 {
            s += (wb[4 + j] & 0x0F) as i32 * qx[j] as i8 as i32;
            s += (wb[4 + j] >> 4) as i32 * qx[j + 16] as i8 as i32;
        }
        acc += rd_f16(wb, 0) * rd_f16(xb, 0) * s as f32 + rd_f16(wb, 2) * rd_f16(xb, 2);
    }
    acc
}

fn dot_q5_0(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q5_0, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 22..i * 22 + 22], &x[i * 34..i * 34 + 34]);
        let qh = crate::blocks::rd_u32(wb, 2);
        let qx = &xb[2..34];
        let mut s = 0i32;
        for j in 0..16 {
            let h0 = (((qh >> j) & 1) << 4) as i32;
            let h1 = (((qh >> (j + 16)) & 1) << 4) as i32;
            s += (((wb[6 + j] & 0x0F) as i32 | h0) - 16) * qx[j] as i8 as i32;
            s += (((wb[6 + j] >> 4) as i32 | h1) - 16) * qx[j + 16] as i8 as i32;
        }
        acc += rd_f16(wb, 0) * rd_f16(xb, 0) * s as f32;
    }
    acc
}

fn dot_q5_1(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q5_1, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 24..i * 24 + 24], &x[i * 36..i * 36 + 36]);
        let qh = crate::blocks::rd_u32(wb, 4);
        let qx = &xb[4..36];
        let mut s = 0i32;
        for j in 0..16 {
            let h0 = (((qh >> j) & 1) << 4) as i32;
            let h1 = (((qh >> (j + 16)) & 1) << 4) as i32;
            s += ((wb[8 + j] & 0x0F) as i32 | h0) * qx[j] as i8 as i32;
            s += ((wb[8 + j] >> 4) as i32 | h1) * qx[j + 16] as i8 as i32;
        }
        acc += rd_f16(wb, 0) * rd_f16(xb, 0) * s as f32 + rd_f16(wb, 2) * rd_f16(xb, 2);
    }
    acc
}

fn dot_q8_0(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q8_0, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 34..i * 34 + 34], &x[i * 34..i * 34 + 34]);
        let s: i32 = i8s(&wb[2..34]).zip(i8s(&xb[2..34])).map(|(a, b)| a * b).sum();
        acc += rd_f16(wb, 0) * rd_f16(xb, 0) * s as f32;
    }
    acc
}

fn dot_q8_1(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q8_1, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 36..i * 36 + 36], &x[i * 36..i * 36 + 36]);
        let s: i32 = i8s(&wb[4..36]).zip(i8s(&xb[4..36])).map(|(a, b)| a * b).sum();
        acc += rd_f16(wb, 0) * rd_f16(xb, 0) * s as f32;
    }
    acc
}

/// Q8_K block pieces: (d, qs, bsums).
#[inline(always)]
pub(crate) fn q8k_parts(xb: &[u8]) -> (f32, &[u8], [i32; 16]) {
    let mut bs = [0i32; 16];
    for (g, b) in bs.iter_mut().enumerate() {
        *b = i16::from_le_bytes([xb[260 + 2 * g], xb[261 + 2 * g]]) as i32;
    }
    (rd_f32(xb, 0), &xb[4..4 + QK_K], bs)
}

fn dot_q8k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q8K, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 292..i * 292 + 292], &x[i * 292..i * 292 + 292]);
        let s: i32 = i8s(&wb[4..260]).zip(i8s(&xb[4..260])).map(|(a, b)| a * b).sum();
        acc += rd_f32(wb, 0) * rd_f32(xb, 0) * s as f32;
    }
    acc
}

fn dot_q2k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q2K, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 84..i * 84 + 84], &x[i * 292..i * 292 + 292]);
        let (xd, qx, bsums) = q8k_parts(xb);
        let scales = &wb[0..16];
        let qs = &wb[16..80];
        let mut summ = 0i32;
        for g in 0..16 {
            summ += (scales[g] >> 4) as i32 * bsums[g];
        }
        let mut isum = 0i32;
        for half in 0..2 {
            let q = &qs[half * 32..half * 32 + 32];
            for plane in 0..4 {
                for sub in 0..2 {
                    let is = half * 8 + plane * 2 + sub;
                    let base = half * 128 + plane * 32 + sub * 16;
                    let mut s = 0i32;
                    for l in 0..16 {
                        s += ((q[sub * 16 + l] >> (2 * plane)) & 3) as i32 * qx[base + l] as i8 as i32;
                    }
                    isum += (scales[is] & 0x0F) as i32 * s;
                }
            }
        }
        acc += xd * rd_f16(wb, 80) * isum as f32 - xd * rd_f16(wb, 82) * summ as f32;
    }
    acc
}

fn dot_q3k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q3K, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 110..i * 110 + 110], &x[i * 292..i * 292 + 292]);
        let (xd, qx, _) = q8k_parts(xb);
        let hmask = &wb[0..32];
        let qs = &wb[32..96];
        let sc = q3k_scales(&wb[96..108]);
        let mut isum = 0i32;
        for half in 0..2 {
            let q = &qs[half * 32..half * 32 + 32];
            for plane in 0..4 {
                let hbit = 1u8 << (half * 4 + plane);
                for sub in 0..2 {
                    let is = half * 8 + plane * 2 + sub;
                    let base = half * 128 + plane * 32 + sub * 16;
                    let mut s = 0i32;
                    for l in 0..16 {
                        let k = sub * 16 + l;
                        let v = ((q[k] >> (2 * plane)) & 3) as i32 - if hmask[k] & hbit != 0 { 0 } else { 4 };
                        s += v * qx[base + l] as i8 as i32;
                    }
                    isum += sc[is] as i32 * s;
                }
            }
        }
        acc += xd * rd_f16(wb, 108) * isum as f32;
    }
    acc
}

fn dot_q4k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q4K, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 144..i * 144 + 144], &x[i * 292..i * 292 + 292]);
        let (xd, qx, bsums) = q8k_parts(xb);
        let scales = &wb[4..16];
        let qs = &wb[16..144];
        let (mut isum, mut summ) = (0i32, 0i32);
        for chunk in 0..4 {
            let (s1, m1) = k4_scale_min(2 * chunk, scales);
            let (s2, m2) = k4_scale_min(2 * chunk + 1, scales);
            let q = &qs[chunk * 32..chunk * 32 + 32];
            let xq = &qx[chunk * 64..chunk * 64 + 64];
            let (mut a, mut b) = (0i32, 0i32);
            for l in 0..32 {
                a += (q[l] & 0x0F) as i32 * xq[l] as i8 as i32;
                b += (q[l] >> 4) as i32 * xq[l + 32] as i8 as i32;
            }
            isum += s1 as i32 * a + s2 as i32 * b;
            summ += m1 as i32 * (bsums[4 * chunk] + bsums[4 * chunk + 1])
                + m2 as i32 * (bsums[4 * chunk + 2] + bsums[4 * chunk + 3]);
        }
        acc += xd * rd_f16(wb, 0) * isum as f32 - xd * rd_f16(wb, 2) * summ as f32;
    }
    acc
}

fn dot_q5k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q5K, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 176..i * 176 + 176], &x[i * 292..i * 292 + 292]);
        let (xd, qx, bsums) = q8k_parts(xb);
        let scales = &wb[4..16];
        let qh = &wb[16..48];
        let qs = &wb[48..176];
        let (mut isum, mut summ) = (0i32, 0i32);
        for chunk in 0..4 {
            let (s1, m1) = k4_scale_min(2 * chunk, scales);
            let (s2, m2) = k4_scale_min(2 * chunk + 1, scales);
            let q = &qs[chunk * 32..chunk * 32 + 32];
            let xq = &qx[chunk * 64..chunk * 64 + 64];
            let (mut a, mut b) = (0i32, 0i32);
            for l in 0..32 {
                let h1 = (((qh[l] >> (2 * chunk)) & 1) << 4) as i32;
                let h2 = (((qh[l] >> (2 * chunk + 1)) & 1) << 4) as i32;
                a += ((q[l] & 0x0F) as i32 | h1) * xq[l] as i8 as i32;
                b += ((q[l] >> 4) as i32 | h2) * xq[l + 32] as i8 as i32;
            }
            isum += s1 as i32 * a + s2 as i32 * b;
            summ += m1 as i32 * (bsums[4 * chunk] + bsums[4 * chunk + 1])
                + m2 as i32 * (bsums[4 * chunk + 2] + bsums[4 * chunk + 3]);
        }
        acc += xd * rd_f16(wb, 0) * isum as f32 - xd * rd_f16(wb, 2) * summ as f32;
    }
    acc
}

fn dot_q6k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let nb = check_row(GgmlType::Q6K, n, w, x);
    let mut acc = 0.0f32;
    for i in 0..nb {
        let (wb, xb) = (&w[i * 210..i * 210 + 210], &x[i * 292..i * 292 + 292]);
        let (xd, qx, _) = q8k_parts(xb);
        let mut isum = 0i32;
        for half in 0..2 {
            let ql = &wb[half * 64..half * 64 + 64];
            let qh = &wb[128 + half * 32..128 + half * 32 + 32];
            let sc = &wb[192 + half * 8..192 + half * 8 + 8];
            let xq = &qx[half * 128..half * 128 + 128];
            let mut s = [0i32; 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                s[is] += q1 * xq[l] as i8 as i32;
                s[is + 2] += q2 * xq[l + 32] as i8 as i32;
                s[is + 4] += q3 * xq[l + 64] as i8 as i32;
                s[is + 6] += q4 * xq[l + 96] as i8 as i32;
            }
            for k in 0..8 {
                isum += sc[k] as i8 as i32 * s[k];
            }
        }
        acc += xd * rd_f16(wb, 208) * isum as f32;
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// f32 helpers
// ---------------------------------------------------------------------------------------------

/// `sum(a[i] * b[i])` over the common length (AVX2+FMA when available).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2/FMA detected; both slices hold at least n elements.
        return unsafe { crate::avx2::dot_f32_ptr(n, a.as_ptr(), b.as_ptr()) };
    }
    dot_f32_scalar(&a[..n], &b[..n])
}

/// Scalar reference for [`dot_f32`] (4 partial sums).
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0.0f32; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            s[k] += x[k] * y[k];
        }
    }
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

/// `y[i] += a * x[i]` over the common length (AVX2+FMA when available).
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2/FMA detected; both slices hold at least n elements.
        unsafe { crate::avx2::axpy_f32_ptr(n, a, x.as_ptr(), y.as_mut_ptr()) };
        return;
    }
    for (yi, xi) in y[..n].iter_mut().zip(&x[..n]) {
        *yi += a * xi;
    }
}
