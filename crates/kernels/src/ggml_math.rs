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
    let np = n & !63;
    let mut acc = [0f32; 64];
    let mut i = 0;
    while i < np {
        for (s, a) in acc.iter_mut().enumerate() {
            *a += x[i + s] * y[i + s];
        }
        i += 64;
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
    fn dot_f16_matches_f64() {
        let x: Vec<f32> = (0..200).map(|i| half::f16::from_f32((i as f32 * 0.37).sin()).to_f32()).collect();
        let y: Vec<f32> = (0..200).map(|i| half::f16::from_f32((i as f32 * 0.11).cos()).to_f32()).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        assert!((f64::from(dot_f16(&x, &y)) - want).abs() < 1e-4);
    }
}
