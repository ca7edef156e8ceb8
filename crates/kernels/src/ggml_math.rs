//! Attention and activation arithmetic in the exact operation order of llama.cpp's CPU backend
//! (ggml, as built with `-march=native` on an AVX512 machine), so that our logits follow the
//! reference bit for bit where the inputs agree:
//!
//! * [`expf`]: ggml's AVX512 `ggml_v_expf` polynomial, lane by lane (one `scalef` emulated by
//!   two exact power-of-two products), used by [`silu_mul`] (`ggml_vec_swiglu_f32`) and
//!   [`exp_sum`] (`ggml_vec_soft_max_f32`).
//! * [`reduce16`]: `_mm512_reduce_add_ps` as GCC expands it.
//! * [`dot_f16`]: `ggml_vec_dot_f16` (4 accumulators of 16 lanes over steps of 64 elements).
//!
//! Every function is elementwise-exact IEEE arithmetic (no reassociation), so the AVX2 paths
//! (8 lanes, picked at run time) and the scalar ones give the same bits.

const R: f32 = f32::from_bits(0x4b40_0000); // 0x1.8p23
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
const C5: f32 = f32::from_bits(0x3c07_2010); // 0x1.0e4020p-7
const C4: f32 = f32::from_bits(0x3d2b_9f17); // 0x1.573e2ep-5
const C3: f32 = f32::from_bits(0x3e2a_af33); // 0x1.555e66p-3
const C2: f32 = f32::from_bits(0x3eff_fedb); // 0x1.fffdb6p-2
const C1: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1

#[inline]
fn pow2i(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// `exp(x)` as ggml's AVX512 `ggml_v_expf` computes each lane.
#[inline]
pub fn expf(x: f32) -> f32 {
    let z = x.mul_add(LOG2E, R);
    let n = z - R;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = C5.mul_add(b, C4).mul_add(u, C3.mul_add(b, C2)).mul_add(u, C1.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    if n.is_nan() {
        return f32::NAN;
    }
    // scalef(j, n) = j * 2^n: two exact-range power-of-two factors, one rounding.
    let ni = n as i32;
    let a = ni >> 1;
    (j * pow2i(a)) * pow2i(ni - a)
}

/// `_mm512_reduce_add_ps` of 16 lanes (GCC's expansion: halves, quarters, then pairs).
#[inline]
pub fn reduce16(v: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = v[8 + i] + v[i];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// `g[i] = silu(g[i]) * u[i]` as `ggml_vec_swiglu_f32`: blocks of 16 with [`expf`], the tail
/// with the C library's `expf`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul: lengths");
    let body = g.len() / 16 * 16;
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_available() {
        // SAFETY: AVX2/FMA detected; the pointers cover `body` elements.
        unsafe { avx2::silu_mul(&mut g[..body], &u[..body]) };
    } else {
        silu_mul_scalar(&mut g[..body], &u[..body]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    silu_mul_scalar(&mut g[..body], &u[..body]);
    for (a, &b) in g[body..].iter_mut().zip(&u[body..]) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

fn silu_mul_scalar(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + expf(0.0 - *a)) * b;
    }
}

/// `x[i] = exp(x[i] - max)` and the sum of the results as `ggml_vec_soft_max_f32`: per block
/// of 16 a [`reduce16`] added to an f64 sum, the tail with the C library's `expf`.
pub fn exp_sum(x: &mut [f32], max: f32) -> f64 {
    let mut sum = 0f64;
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        let c: &mut [f32; 16] = c.try_into().expect("16 lanes");
        #[cfg(target_arch = "x86_64")]
        if crate::dot::simd_available() {
            // SAFETY: AVX2/FMA detected; 16 elements.
            unsafe { avx2::exp_sub16(c, max) };
        } else {
            c.iter_mut().for_each(|v| *v = expf(*v - max));
        }
        #[cfg(not(target_arch = "x86_64"))]
        c.iter_mut().for_each(|v| *v = expf(*v - max));
        sum += f64::from(reduce16(c));
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    sum
}

/// `ggml_vec_dot_f16` for values that are already f16 (stored as f32): products are exact,
/// accumulated in 4 x 16 lanes per 64 elements, reduced as ggml does, the tail in f64.
pub fn dot_f16(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "dot_f16: lengths");
    let n = x.len();
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(64) && crate::dot::simd_available() {
        // SAFETY: AVX2/FMA detected; lengths checked.
        return unsafe { avx2::dot_f16_64(x, y) };
    }
    let np = n & !63;
    let mut acc = [0f32; 64];
    for (xc, yc) in x[..np].chunks_exact(64).zip(y[..np].chunks_exact(64)) {
        for ((a, &u), &v) in acc.iter_mut().zip(xc).zip(yc) {
            *a += u * v;
        }
    }
    let mut sumf = f64::from(reduce_slots(&acc));
    for k in np..n {
        sumf += f64::from(x[k] * y[k]);
    }
    sumf as f32
}

/// The f16 dot product of llama.cpp's batched path (llamafile's tinyBLAS with 16-lane AVX512
/// vectors, used when a matmul has at least two columns): one 16-lane accumulator over steps of
/// 16 elements, then [`reduce16`]. Lengths that are not a multiple of 16 fall back to
/// [`dot_f16`], as tinyBLAS declines them.
pub fn dot_f16_batched(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "dot_f16_batched: lengths");
    if !x.len().is_multiple_of(16) {
        return dot_f16(x, y);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_available() {
        // SAFETY: AVX2/FMA detected; lengths checked.
        return unsafe { avx2::dot_f16_16(x, y) };
    }
    let mut acc = [0f32; 16];
    for (xc, yc) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += xc[l] * yc[l];
        }
    }
    reduce16(&acc)
}

/// The final reduction of [`dot_f16`]'s 64 accumulator slots (slot `16 j + l` is lane `l` of
/// accumulator `j`): `(a0 + a2) + (a1 + a3)` lane-wise, then [`reduce16`].
#[inline]
pub fn reduce_slots(acc: &[f32; 64]) -> f32 {
    let mut x = [0f32; 16];
    for l in 0..16 {
        x[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
    }
    reduce16(&x)
}

/// Rotate one head by RoPE: pairs `(2i, 2i + 1)` (interleaved) or `(i, i + half)` (NeoX) by
/// `cs[i] = (cos, sin)`, `half = cs.len()`, as ggml's `rotate_pairs` compiles with GCC's FMA
/// contraction: `x0' = fma(x0, cos, -(x1 * sin))`, `x1' = fma(x0, sin, x1 * cos)`.
pub fn rope_rotate(head: &mut [f32], cs: &[(f32, f32)], neox: bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_available() {
        // SAFETY: FMA detected at run time.
        unsafe { rope_rotate_fma(head, cs, neox) };
        return;
    }
    rope_rotate_body(head, cs, neox);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn rope_rotate_fma(head: &mut [f32], cs: &[(f32, f32)], neox: bool) {
    rope_rotate_body(head, cs, neox);
}

#[inline(always)]
fn rope_rotate_body(head: &mut [f32], cs: &[(f32, f32)], neox: bool) {
    let half = cs.len();
    for (i, &(c, s)) in cs.iter().enumerate() {
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0.mul_add(c, -(x1 * s));
        head[b] = x0.mul_add(s, x1 * c);
    }
}

/// Many [`dot_f16`] / [`dot_f16_batched`] reductions at once: `acc` holds rows of `n`
/// accumulators (row `s` = slot `s` of each of the `n` dot products), `filled[s]` says whether
/// row `s` holds values (other slots, and those from `filled.len()` up to `width`, are zero);
/// `out[j]` receives the reduction of column `j`. `width` is 64 ([`reduce_slots`]) or 16
/// ([`reduce16`]). Same bits as the one-at-a-time reductions.
pub fn reduce_slot_rows(acc: &[f32], filled: &[bool], width: usize, n: usize, out: &mut [f32]) {
    static ZERO: [f32; 1024] = [0.0; 1024];
    let slots = filled.len();
    assert!(width == 16 || width == 64, "reduce_slot_rows: width {width}");
    assert!(n <= ZERO.len(), "reduce_slot_rows: {n} columns");
    assert!(slots <= width && acc.len() >= slots * n && out.len() >= n, "reduce_slot_rows: lengths");
    let row = |sl: usize| if sl < slots && filled[sl] { &acc[sl * n..(sl + 1) * n] } else { &ZERO[..n] };
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_available() {
        let mut rows = [&ZERO[..n]; 64];
        for (sl, r) in rows.iter_mut().enumerate().take(width) {
            *r = row(sl);
        }
        // SAFETY: AVX2 detected; every row holds n values.
        unsafe { avx2::reduce_rows(&rows, width, n, out) };
        return;
    }
    for j0 in (0..n).step_by(16) {
        let w = (n - j0).min(16);
        let mut x = [[0f32; 16]; 16];
        for (l, xl) in x.iter_mut().enumerate() {
            if width == 64 {
                let (a0, a1, a2, a3) = (&row(l)[j0..], &row(16 + l)[j0..], &row(32 + l)[j0..], &row(48 + l)[j0..]);
                for jj in 0..w {
                    xl[jj] = (a0[jj] + a2[jj]) + (a1[jj] + a3[jj]);
                }
            } else {
                xl[..w].copy_from_slice(&row(l)[j0..j0 + w]);
            }
        }
        let mut t3 = [[0f32; 16]; 8];
        for (i, t) in t3.iter_mut().enumerate() {
            for jj in 0..16 {
                t[jj] = x[8 + i][jj] + x[i][jj];
            }
        }
        for jj in 0..w {
            let t6 = [t3[4][jj] + t3[0][jj], t3[5][jj] + t3[1][jj], t3[6][jj] + t3[2][jj], t3[7][jj] + t3[3][jj]];
            out[j0 + jj] = (t6[0] + t6[2]) + (t6[1] + t6[3]);
        }
    }
}

/// [`dot_f16_batched`] of one key row `k` with each of `out.len()` query heads stored back to
/// back in `q` (head `h` is `q[h * k.len()..][..k.len()]`): the same arithmetic per head, with
/// the key loaded once for up to four heads (independent accumulator chains).
pub fn dot_f16_batched_heads(q: &[f32], k: &[f32], out: &mut [f32]) {
    let n = k.len();
    assert_eq!(q.len(), n * out.len(), "dot_f16_batched_heads: lengths");
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(16) && crate::dot::simd_available() {
        for (qc, oc) in q.chunks(4 * n).zip(out.chunks_mut(4)) {
            // SAFETY: AVX2/FMA detected; qc holds oc.len() heads of n (a multiple of 16) values.
            unsafe {
                match oc.len() {
                    1 => avx2::dots16::<1>(qc, k, oc),
                    2 => avx2::dots16::<2>(qc, k, oc),
                    3 => avx2::dots16::<3>(qc, k, oc),
                    _ => avx2::dots16::<4>(qc, k, oc),
                }
            }
        }
        return;
    }
    for (qh, o) in q.chunks_exact(n.max(1)).zip(out.iter_mut()) {
        *o = dot_f16_batched(qh, k);
    }
}

/// [`dot_f16`] of one key row `k` (a multiple of 64 long) with each of `out.len()` query heads
/// stored back to back in `q`: the same arithmetic per head, the key loaded once per group.
pub fn dot_f16_heads(q: &[f32], k: &[f32], out: &mut [f32]) {
    let n = k.len();
    assert_eq!(q.len(), n * out.len(), "dot_f16_heads: lengths");
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(64) && crate::dot::simd_available() {
        for (qc, oc) in q.chunks(4 * n).zip(out.chunks_mut(4)) {
            // SAFETY: AVX2/FMA detected; qc holds oc.len() heads of n (a multiple of 64) values.
            unsafe {
                match oc.len() {
                    1 => oc[0] = avx2::dot_f16_64(qc, k),
                    2 => avx2::dots64::<2, 4>(qc, k, oc),
                    3 => avx2::dots64::<3, 2>(qc, k, oc),
                    _ => avx2::dots64::<4, 2>(qc, k, oc),
                }
            }
        }
        return;
    }
    for (qh, o) in q.chunks_exact(n.max(1)).zip(out.iter_mut()) {
        *o = dot_f16(qh, k);
    }
}

/// The probability-weighted sum of value rows of llama.cpp's f16 matmul: the batched (tinyBLAS)
/// matmul (`width` 16) or of `ggml_vec_dot_f16` (`width` 64), for `heads = out.len() / hdv`
/// heads sharing the value rows: for head `h` and column `c`, slot `s` accumulates
/// `p[h * n + kp] * v[rows[kp] + c]` by FMA from +0 over the positions `kp ≡ s (mod width)` in
/// ascending order, and the slots are reduced as [`reduce_slot_rows`] does. `n` is a multiple
/// of `width` and every `rows[kp] + hdv <= v.len()`. A zero
/// probability still adds its (signed zero) product, which changes nothing when the value row
/// is finite.
pub fn slot_sum_heads(width: usize, p: &[f32], n: usize, v: &[f32], rows: &[usize], hdv: usize, out: &mut [f32]) {
    assert!(width == 16 || width == 64, "slot_sum_heads: width {width}");
    assert!(n.is_multiple_of(width) && rows.len() == n, "slot_sum_heads: positions");
    assert!(hdv > 0 && out.len().is_multiple_of(hdv), "slot_sum_heads: columns");
    let heads = out.len() / hdv;
    assert_eq!(p.len(), heads * n, "slot_sum_heads: probabilities");
    assert!(rows.iter().all(|&r| r + hdv <= v.len()), "slot_sum_heads: value rows");
    #[cfg(target_arch = "x86_64")]
    if hdv.is_multiple_of(16) && crate::dot::simd_available() {
        for (pc, oc) in p.chunks(4 * n).zip(out.chunks_mut(4 * hdv)) {
            // SAFETY: AVX2/FMA detected; lengths and row bounds checked above.
            unsafe {
                match (width, oc.len() / hdv) {
                    (16, 1) => avx2::slot_sum::<16, 1, 4>(pc, n, v, rows, hdv, oc),
                    (16, 2) => avx2::slot_sum::<16, 2, 2>(pc, n, v, rows, hdv, oc),
                    (16, 3) => avx2::slot_sum::<16, 3, 1>(pc, n, v, rows, hdv, oc),
                    (16, _) => avx2::slot_sum::<16, 4, 1>(pc, n, v, rows, hdv, oc),
                    (_, 1) => avx2::slot_sum::<64, 1, 4>(pc, n, v, rows, hdv, oc),
                    (_, 2) => avx2::slot_sum::<64, 2, 2>(pc, n, v, rows, hdv, oc),
                    (_, 3) => avx2::slot_sum::<64, 3, 1>(pc, n, v, rows, hdv, oc),
                    _ => avx2::slot_sum::<64, 4, 1>(pc, n, v, rows, hdv, oc),
                }
            }
        }
        return;
    }
    let mut acc = vec![0f32; width * hdv];
    let filled = vec![true; width];
    for (ph, o) in p.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(hdv)) {
        acc.fill(0.0);
        for (kp, &r) in rows.iter().enumerate() {
            let a = &mut acc[(kp % width) * hdv..][..hdv];
            for (y, &x) in a.iter_mut().zip(&v[r..r + hdv]) {
                *y = ph[kp].mul_add(x, *y);
            }
        }
        reduce_slot_rows(&acc, &filled, width, hdv, o);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expf8(x: __m256) -> __m256 {
        let r = _mm256_set1_ps(R);
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), r);
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(_mm256_set1_ps(C5), b, _mm256_set1_ps(C4)),
                u,
                _mm256_fmadd_ps(_mm256_set1_ps(C3), b, _mm256_set1_ps(C2)),
            ),
            u,
            _mm256_fmadd_ps(_mm256_set1_ps(C1), b, _mm256_set1_ps(1.0)),
        );
        let ni = _mm256_cvtps_epi32(n);
        let a = _mm256_srai_epi32::<1>(ni);
        let bias = _mm256_set1_epi32(127);
        let pa = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(a, bias)));
        let pb = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_sub_epi32(ni, a), bias)));
        let res = _mm256_mul_ps(_mm256_mul_ps(j, pa), pb);
        let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs, _mm256_set1_ps(192.0));
        let le0 = _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps());
        let alt = _mm256_blendv_ps(_mm256_set1_ps(f32::INFINITY), _mm256_setzero_ps(), le0);
        let res = _mm256_blendv_ps(res, alt, big);
        // NaN lanes: j is NaN, but the power-of-two factors are garbage; keep the NaN.
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(n, n);
        _mm256_blendv_ps(res, n, nan)
    }

    /// [`reduce16`] of the 16 lanes `lo ++ hi`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce16v(lo: __m256, hi: __m256) -> f32 {
        let t3 = _mm256_add_ps(hi, lo);
        let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
        let u = _mm_add_ps(_mm_movehl_ps(t6, t6), t6);
        _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)))
    }

    /// [`super::dot_f16`] for a length that is a multiple of 64 (ggml's FMAs; products of f16
    /// values are exact in f32, so this also equals the scalar multiply-then-add).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f16_64(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (xc, yc) in x.chunks_exact(64).zip(y.chunks_exact(64)) {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xc.as_ptr().add(8 * k)),
                    _mm256_loadu_ps(yc.as_ptr().add(8 * k)),
                    *a,
                );
            }
        }
        // Slot s = 8k + lane: lanes 0..8 of x are (a0 + a4) + (a2 + a6), lanes 8..16 (a1 + a5) + (a3 + a7).
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        reduce16v(lo, hi)
    }

    /// [`super::dot_f16_batched`] for a length that is a multiple of 16.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f16_16(x: &[f32], y: &[f32]) -> f32 {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (xc, yc) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
            let (xp, yp) = (xc.as_ptr(), yc.as_ptr());
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(xp), _mm256_loadu_ps(yp), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), _mm256_loadu_ps(yp.add(8)), hi);
        }
        reduce16v(lo, hi)
    }

    /// The column-wise slot reductions of `reduce_slot_rows`, 8 columns at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn reduce_rows(rows: &[&[f32]; 64], width: usize, n: usize, out: &mut [f32]) {
        let mut j = 0;
        while j < n {
            let w = (n - j).min(8);
            let ld = |sl: usize| -> __m256 {
                if w == 8 {
                    _mm256_loadu_ps(rows[sl].as_ptr().add(j))
                } else {
                    let mut t = [0f32; 8];
                    t[..w].copy_from_slice(&rows[sl][j..j + w]);
                    _mm256_loadu_ps(t.as_ptr())
                }
            };
            let mut x = [_mm256_setzero_ps(); 16];
            for (l, xl) in x.iter_mut().enumerate() {
                *xl = if width == 64 {
                    _mm256_add_ps(_mm256_add_ps(ld(l), ld(32 + l)), _mm256_add_ps(ld(16 + l), ld(48 + l)))
                } else {
                    ld(l)
                };
            }
            let mut t3 = [_mm256_setzero_ps(); 8];
            for i in 0..8 {
                t3[i] = _mm256_add_ps(x[8 + i], x[i]);
            }
            let t6 = [
                _mm256_add_ps(t3[4], t3[0]),
                _mm256_add_ps(t3[5], t3[1]),
                _mm256_add_ps(t3[6], t3[2]),
                _mm256_add_ps(t3[7], t3[3]),
            ];
            let r = _mm256_add_ps(_mm256_add_ps(t6[0], t6[2]), _mm256_add_ps(t6[1], t6[3]));
            let mut t = [0f32; 8];
            _mm256_storeu_ps(t.as_mut_ptr(), r);
            out[j..j + w].copy_from_slice(&t[..w]);
            j += w;
        }
    }

    /// `G` heads of [`super::dot_f16_batched`] against one key (`n = k.len()`, a multiple of 16).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots16<const G: usize>(q: &[f32], k: &[f32], out: &mut [f32]) {
        let n = k.len();
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut lo = [_mm256_setzero_ps(); G];
        let mut hi = [_mm256_setzero_ps(); G];
        let mut i = 0;
        while i < n {
            let k0 = _mm256_loadu_ps(kp.add(i));
            let k1 = _mm256_loadu_ps(kp.add(i + 8));
            for g in 0..G {
                let qg = qp.add(g * n + i);
                lo[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qg), k0, lo[g]);
                hi[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qg.add(8)), k1, hi[g]);
            }
            i += 16;
        }
        for g in 0..G {
            out[g] = reduce16v(lo[g], hi[g]);
        }
    }

    /// `G` heads of [`super::dot_f16`] against one key (`n = k.len()`, a multiple of 64): the
    /// eight accumulators of each head, `K` at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots64<const G: usize, const K: usize>(q: &[f32], k: &[f32], out: &mut [f32]) {
        let n = k.len();
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 8]; G];
        let mut k0 = 0;
        while k0 < 8 {
            let mut a = [[_mm256_setzero_ps(); K]; G];
            let mut c = 0;
            while c < n {
                for t in 0..K {
                    let kv = _mm256_loadu_ps(kp.add(c + 8 * (k0 + t)));
                    for g in 0..G {
                        a[g][t] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(g * n + c + 8 * (k0 + t))), kv, a[g][t]);
                    }
                }
                c += 64;
            }
            for g in 0..G {
                for t in 0..K {
                    acc[g][k0 + t] = a[g][t];
                }
            }
            k0 += K;
        }
        for g in 0..G {
            let a = &acc[g];
            let lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
            let hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
            out[g] = reduce16v(lo, hi);
        }
    }

    /// [`super::slot_sum_heads`] for `W` slots, `G` heads, `S` slots at a time, 16 columns at a
    /// time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn slot_sum<const W: usize, const G: usize, const S: usize>(
        p: &[f32],
        n: usize,
        v: &[f32],
        rows: &[usize],
        hdv: usize,
        out: &mut [f32],
    ) {
        let (pp, vp) = (p.as_ptr(), v.as_ptr());
        let mut tile = [[[_mm256_setzero_ps(); 2]; W]; G];
        let mut j = 0;
        while j < hdv {
            let mut s0 = 0;
            while s0 < W {
                let mut a = [[[_mm256_setzero_ps(); 2]; S]; G];
                let mut base = 0;
                while base < n {
                    for t in 0..S {
                        let kp = base + s0 + t;
                        let vr = vp.add(*rows.get_unchecked(kp) + j);
                        let v0 = _mm256_loadu_ps(vr);
                        let v1 = _mm256_loadu_ps(vr.add(8));
                        for g in 0..G {
                            let pb = _mm256_broadcast_ss(&*pp.add(g * n + kp));
                            a[g][t][0] = _mm256_fmadd_ps(pb, v0, a[g][t][0]);
                            a[g][t][1] = _mm256_fmadd_ps(pb, v1, a[g][t][1]);
                        }
                    }
                    base += W;
                }
                for g in 0..G {
                    for t in 0..S {
                        tile[g][s0 + t] = a[g][t];
                    }
                }
                s0 += S;
            }
            for g in 0..G {
                for c in 0..2 {
                    let t = |l: usize| tile[g][l][c];
                    let x = |l: usize| {
                        if W == 64 {
                            _mm256_add_ps(_mm256_add_ps(t(l), t(32 + l)), _mm256_add_ps(t(16 + l), t(48 + l)))
                        } else {
                            t(l)
                        }
                    };
                    let mut t3 = [_mm256_setzero_ps(); 8];
                    for (i, t) in t3.iter_mut().enumerate() {
                        *t = _mm256_add_ps(x(8 + i), x(i));
                    }
                    let t6 = [
                        _mm256_add_ps(t3[4], t3[0]),
                        _mm256_add_ps(t3[5], t3[1]),
                        _mm256_add_ps(t3[6], t3[2]),
                        _mm256_add_ps(t3[7], t3[3]),
                    ];
                    let r = _mm256_add_ps(_mm256_add_ps(t6[0], t6[2]), _mm256_add_ps(t6[1], t6[3]));
                    _mm256_storeu_ps(out.as_mut_ptr().add(g * hdv + j + 8 * c), r);
                }
            }
            j += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        for (gc, uc) in g.chunks_exact_mut(8).zip(u.chunks_exact(8)) {
            let x = _mm256_loadu_ps(gc.as_ptr());
            let e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gc.as_mut_ptr(), _mm256_mul_ps(s, _mm256_loadu_ps(uc.as_ptr())));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub16(c: &mut [f32; 16], max: f32) {
        let m = _mm256_set1_ps(max);
        for h in 0..2 {
            let p = c.as_mut_ptr().add(8 * h);
            _mm256_storeu_ps(p, expf8(_mm256_sub_ps(_mm256_loadu_ps(p), m)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_close_to_libm_and_simd_equals_scalar() {
        let mut xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.05).collect();
        xs.extend([-1e30, -200.0, -150.0, -104.0, -88.5, 88.0, 89.0, 100.0, f32::NEG_INFINITY, 0.0, -0.0]);
        for &x in &xs {
            let (a, b) = (expf(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b.abs() + 1e-37 || (a.is_infinite() && b > 1e38), "{x}: {a} vs {b}");
        }
        let n = xs.len() / 16 * 16;
        let mut v = xs[..n].to_vec();
        let _ = exp_sum(&mut v, 0.0);
        for (got, &x) in v.iter().zip(&xs) {
            assert_eq!(got.to_bits(), expf(x).to_bits(), "{x}");
        }
        let mut g = xs[..n].to_vec();
        let u = vec![1.5f32; n];
        silu_mul(&mut g, &u);
        for (got, &x) in g.iter().zip(&xs) {
            assert_eq!(got.to_bits(), (x / (1.0 + expf(0.0 - x)) * 1.5).to_bits(), "{x}");
        }
    }

    #[test]
    fn grouped_heads_equal_single_heads() {
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        let val = |i: usize, m: usize| f16(((i * m % 1999) as f32 - 999.0) * 0.0031);
        for heads in 1..=6 {
            let hd = 128;
            let q: Vec<f32> = (0..heads * hd).map(|i| val(i, 7919)).collect();
            let k: Vec<f32> = (0..hd).map(|i| val(i, 104_729)).collect();
            let mut got = vec![0f32; heads];
            dot_f16_heads(&q, &k, &mut got);
            for h in 0..heads {
                assert_eq!(got[h].to_bits(), dot_f16(&q[h * hd..][..hd], &k).to_bits());
            }
            dot_f16_batched_heads(&q, &k, &mut got);
            for h in 0..heads {
                assert_eq!(got[h].to_bits(), dot_f16_batched(&q[h * hd..][..hd], &k).to_bits());
            }
            for width in [16, 64] {
                let (hdv, n_rows, n) = (32, 150, 160usize.next_multiple_of(width));
                let v: Vec<f32> = (0..n_rows * hdv).map(|i| val(i, 31_337)).collect();
                let rows: Vec<usize> = (0..n).map(|kp| (kp * 37 % n_rows) * hdv).collect();
                // Some zero probabilities, the rest f16 values.
                let p: Vec<f32> = (0..heads * n)
                    .map(|i| if i % 5 == 0 || i % n >= 150 { 0.0 } else { f16((i % 97) as f32 * 1e-3) })
                    .collect();
                let mut out = vec![0f32; heads * hdv];
                slot_sum_heads(width, &p, n, &v, &rows, hdv, &mut out);
                for h in 0..heads {
                    // The one-head reference: skip zero probabilities, fill slots on first use.
                    let mut acc = vec![0f32; width * hdv];
                    let mut filled = vec![false; width];
                    for kp in 0..n {
                        let ph = p[h * n + kp];
                        if ph == 0.0 {
                            continue;
                        }
                        let sl = kp % width;
                        let a = &mut acc[sl * hdv..][..hdv];
                        if !filled[sl] {
                            a.fill(0.0);
                            filled[sl] = true;
                        }
                        crate::axpy_f32(ph, &v[rows[kp]..][..hdv], a);
                    }
                    let mut want = vec![0f32; hdv];
                    reduce_slot_rows(&acc, &filled, width, hdv, &mut want);
                    for c in 0..hdv {
                        assert_eq!(
                            out[h * hdv + c].to_bits(),
                            want[c].to_bits(),
                            "{heads} heads, width {width}, head {h}, column {c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn slot_rows_equal_single_reductions() {
        for (width, slots) in [(64, 64), (64, 23), (16, 16), (16, 5)] {
            let n = 13;
            let acc: Vec<f32> = (0..slots * n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.37).collect();
            let mut out = vec![0f32; n];
            reduce_slot_rows(&acc, &vec![true; slots], width, n, &mut out);
            for j in 0..n {
                let mut full = [0f32; 64];
                for s in 0..slots {
                    full[s] = acc[s * n + j];
                }
                let want = if width == 64 { reduce_slots(&full) } else { reduce16(full[..16].try_into().unwrap()) };
                assert_eq!(out[j].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn dot_f16_simd_equals_generic() {
        let v = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| half::f16::from_f32(((i as f32 + k) * 0.731).sin() * 3.0).to_f32()).collect()
        };
        for n in [64, 128, 256, 320] {
            let (x, y) = (v(n, 0.5), v(n, 7.0));
            let mut acc = [0f32; 64];
            for (xc, yc) in x.chunks_exact(64).zip(y.chunks_exact(64)) {
                for s in 0..64 {
                    acc[s] += xc[s] * yc[s];
                }
            }
            assert_eq!(dot_f16(&x, &y).to_bits(), reduce_slots(&acc).to_bits(), "{n}");
            let mut acc16 = [0f32; 16];
            for (xc, yc) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
                for l in 0..16 {
                    acc16[l] += xc[l] * yc[l];
                }
            }
            assert_eq!(dot_f16_batched(&x, &y).to_bits(), reduce16(&acc16).to_bits(), "{n}");
        }
    }

    #[test]
    fn dot_f16_matches_f64() {
        let x: Vec<f32> = (0..200).map(|i| half::f16::from_f32((i as f32 * 0.37).sin()).to_f32()).collect();
        let y: Vec<f32> = (0..200).map(|i| half::f16::from_f32((i as f32 * 0.11).cos()).to_f32()).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        assert!((f64::from(dot_f16(&x, &y)) - want).abs() < 1e-4);
    }
}
