//! AVX2 + FMA versions of the hot dot products, selected at run time.
//!
//! Each function computes exactly what its scalar twin in `dot.rs` computes (up to float
//! summation order); `tests` compares them on random blocks.
#![cfg(target_arch = "x86_64")]
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::blocks::scale_min_k4;
use crate::types::{GgmlType, QK, QK_K};

/// Half float at byte offset `at`, converted with the F16C instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
    debug_assert!(at + 2 <= b.len());
    let h = u16::from_le_bytes([*b.get_unchecked(at), *b.get_unchecked(at + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

/// Whether this CPU has AVX2, FMA and F16C (checked once).
pub fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("SPECSWARM_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Sum of products of 32 signed bytes, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// Sum of products of 32 unsigned bytes (< 128) with 32 signed bytes, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// 16 packed bytes of nibbles → 32 bytes: low nibbles (elements 0..16), then high (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// 32 bits → 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    let idx = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), idx);
    let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask)
}

/// Dispatch; `None` means "no AVX2 version of this type, use the scalar one".
///
/// # Safety
/// The CPU must support AVX2 and FMA, and the slices must hold `n` elements of their formats.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_avx2(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> Option<f32> {
    debug_assert!(w.len() >= ty.row_bytes(n).unwrap_or(usize::MAX));
    debug_assert!(x.len() >= ty.vec_dot_type().row_bytes(n).unwrap_or(usize::MAX));
    Some(match ty {
        GgmlType::Q8_0 => legacy(n, w, x, 34, 34, |wb, xb| {
            dot_i8(_mm256_loadu_si256(wb.add(2) as *const __m256i), _mm256_loadu_si256(xb.add(2) as *const __m256i))
        }),
        GgmlType::Q4_0 => legacy(n, w, x, 18, 34, |wb, xb| {
            let q = _mm256_sub_epi8(unpack_nibbles(wb.add(2)), _mm256_set1_epi8(8));
            dot_i8(q, _mm256_loadu_si256(xb.add(2) as *const __m256i))
        }),
        GgmlType::Q5_0 => legacy(n, w, x, 22, 34, |wb, xb| {
            let qh = u32::from_le_bytes([*wb.add(2), *wb.add(3), *wb.add(4), *wb.add(5)]);
            // nibble | 0xF0 reads as nibble - 16 when the 5th bit is clear; nibble + 16 - 16 when set.
            let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
            let q = _mm256_or_si256(unpack_nibbles(wb.add(6)), hi);
            dot_i8(q, _mm256_loadu_si256(xb.add(2) as *const __m256i))
        }),
        GgmlType::Q4_1 => q4_1(n, w, x),
        GgmlType::Q4K => q4_k(n, w, x),
        GgmlType::Q6K => q6_k(n, w, x),
        _ => return None,
    })
}

/// Blocks of 32 with one f16 scale each on both sides: sum(d_w * d_x * int_dot).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy(
    n: usize,
    w: &[u8],
    x: &[u8],
    wbytes: usize,
    xbytes: usize,
    int_dot: impl Fn(*const u8, *const u8) -> __m256i,
) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    for i in 0..n / QK {
        let (wb, xb) = (wp.add(i * wbytes), xp.add(i * xbytes));
        let d = f16_at(w, i * wbytes) * f16_at(x, i * xbytes);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(int_dot(wb, xb)), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    for i in 0..n / QK {
        let (wo, xo) = (i * 20, i * 36);
        let d = f16_at(w, wo) * f16_at(x, xo);
        mins += f16_at(w, wo + 2) * f16_at(x, xo + 2);
        let q = unpack_nibbles(wp.add(wo + 4));
        let y = _mm256_loadu_si256(xp.add(xo + 4) as *const __m256i);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(dot_u8_i8(q, y)), acc);
    }
    hsum_ps(acc) + mins
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    let low = _mm256_set1_epi8(0x0F);
    for i in 0..n / QK_K {
        let wb = &w[i * 144..(i + 1) * 144];
        let xb = &x[i * 292..(i + 1) * 292];
        let dx = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
        let (d, dmin) = (dx * f16_at(wb, 0), dx * f16_at(wb, 2));
        let mut msum = 0i32;
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let (s1, m1) = scale_min_k4(2 * c, &wb[4..16]);
            let (s2, m2) = scale_min_k4(2 * c + 1, &wb[4..16]);
            let bsum = |g: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * g], xb[261 + 2 * g]]));
            msum +=
                i32::from(m1) * (bsum(4 * c) + bsum(4 * c + 1)) + i32::from(m2) * (bsum(4 * c + 2) + bsum(4 * c + 3));
            let q = _mm256_loadu_si256(wb.as_ptr().add(16 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
            let ylo = _mm256_loadu_si256(xb.as_ptr().add(4 + 64 * c) as *const __m256i);
            let yhi = _mm256_loadu_si256(xb.as_ptr().add(4 + 64 * c + 32) as *const __m256i);
            let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_set1_epi16(i16::from(s1)));
            let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), _mm256_set1_epi16(i16::from(s2)));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        mins += dmin * msum as f32;
    }
    hsum_ps(acc) - mins
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(n: usize, w: &[u8], x: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let m32 = _mm256_set1_epi8(32);
    for i in 0..n / QK_K {
        let wb = &w[i * 210..(i + 1) * 210];
        let xb = &x[i * 292..(i + 1) * 292];
        let d = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]) * f16_at(wb, 208);
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let ql = wb.as_ptr().add(64 * half);
            let qh = _mm256_loadu_si256(wb.as_ptr().add(128 + 32 * half) as *const __m256i);
            let sc = &wb[192 + 8 * half..200 + 8 * half];
            let l0 = _mm256_loadu_si256(ql as *const __m256i);
            let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let qs = [
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4),
                ),
            ];
            for (k, q) in qs.into_iter().enumerate() {
                let y = _mm256_loadu_si256(xb.as_ptr().add(4 + 128 * half + 32 * k) as *const __m256i);
                let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), _mm256_maddubs_epi16(m32, y));
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(sc[2 * k + 1] as i8)),
                    _mm_set1_epi16(i16::from(sc[2 * k] as i8)),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// f32 dot product.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i + 8)), _mm256_loadu_ps(b.as_ptr().add(i + 8)), acc1);
        i += 16;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// y += a * x.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f32_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let p = y.as_mut_ptr().add(i);
        _mm256_storeu_ps(p, _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)));
        i += 8;
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}
