//! AVX2 + FMA + F16C kernels (x86-64 only). Only reachable through [`dot_fn`], which is only
//! consulted after run-time feature detection succeeded.

#![allow(unsafe_op_in_unsafe_fn)]

use crate::blocks::{k4_scale_min, q3k_scales};
use crate::dot::{DotFn, check_row};
use crate::types::GgmlType;
use std::arch::x86_64::*;

/// AVX2 kernel for `ty`, if there is one. Callers must have checked `simd_available()`.
pub(crate) fn dot_fn(ty: GgmlType) -> Option<DotFn> {
    // Each safe wrapper validates the row lengths, then calls the target-feature body.
    macro_rules! wrap {
        ($t:expr, $body:ident) => {{
            fn f(n: usize, w: &[u8], x: &[u8]) -> f32 {
                let nb = check_row($t, n, w, x);
                // SAFETY: lengths checked above; this wrapper is only handed out after
                // run-time detection of avx2, fma and f16c.
                unsafe { $body(nb, w.as_ptr(), x.as_ptr()) }
            }
            f as DotFn
        }};
    }
    Some(match ty {
        GgmlType::F32 => wrap!(GgmlType::F32, f32_f32),
        GgmlType::F16 => wrap!(GgmlType::F16, f16_f32),
        GgmlType::BF16 => wrap!(GgmlType::BF16, bf16_f32),
        GgmlType::Q4_0 => wrap!(GgmlType::Q4_0, q4_0_q8_0),
        GgmlType::Q4_1 => wrap!(GgmlType::Q4_1, q4_1_q8_1),
        GgmlType::Q5_0 => wrap!(GgmlType::Q5_0, q5_0_q8_0),
        GgmlType::Q5_1 => wrap!(GgmlType::Q5_1, q5_1_q8_1),
        GgmlType::Q8_0 => wrap!(GgmlType::Q8_0, q8_0_q8_0),
        GgmlType::Q2K => wrap!(GgmlType::Q2K, q2k_q8k),
        GgmlType::Q3K => wrap!(GgmlType::Q3K, q3k_q8k),
        GgmlType::Q4K => wrap!(GgmlType::Q4K, q4k_q8k),
        GgmlType::Q5K => wrap!(GgmlType::Q5K, q5k_q8k),
        GgmlType::Q6K => wrap!(GgmlType::Q6K, q6k_q8k),
        _ => return None,
    })
}

#[inline(always)]
pub(crate) unsafe fn ld_f16(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline(always)]
pub(crate) unsafe fn ld256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[inline(always)]
pub(crate) unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of adjacent pairs of i16 into i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn sum_i16_pairs(v: __m256i) -> __m256i {
    _mm256_madd_epi16(v, _mm256_set1_epi16(1))
}

/// u8 x i8 products summed in groups of 4 into i32 lanes, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn mul_sum_u8_i8(u: __m256i, s: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(sum_i16_pairs(_mm256_maddubs_epi16(u, s)))
}

/// i8 x i8 products summed in groups of 4 into i32 lanes, as f32 (values must not be -128
/// in `b`; `a` may be -128).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mul_sum_i8_i8(a: __m256i, b: __m256i) -> __m256 {
    mul_sum_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
}

/// 16 packed nibble bytes -> 32 bytes: low nibbles (elements 0..16) then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack_nibbles16(p: *const u8) -> __m256i {
    let v = ld128(p);
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, m);
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    _mm256_set_m128i(hi, lo)
}

/// 32 bits -> 32 bytes, byte j = 0xFF if bit j is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let v = _mm256_shuffle_epi8(v, spread);
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel)
}

/// Four f16 values at `p + k*stride`, k = 0..4, as f32.
#[inline(always)]
pub(crate) unsafe fn ld_f16x4(p: *const u8, stride: usize) -> __m128 {
    let g = |k: usize| (p.add(k * stride) as *const u16).read_unaligned() as u64;
    let v = g(0) | (g(1) << 16) | (g(2) << 32) | (g(3) << 48);
    _mm_cvtph_ps(_mm_cvtsi64_si128(v as i64))
}

/// Four pairs of f16 values (4 bytes) at `p + k*stride`, k = 0..4, as 8 f32 `[a0,b0,a1,b1,..]`.
#[inline(always)]
pub(crate) unsafe fn ld_f16pairs_x4(p: *const u8, stride: usize) -> __m256 {
    let g = |k: usize| (p.add(k * stride) as *const i32).read_unaligned();
    _mm256_cvtph_ps(_mm_set_epi32(g(3), g(2), g(1), g(0)))
}

/// Shared loop of the 32-element block kernels: four blocks per iteration with their scales
/// converted together. `$blockdot` yields the block's integer dot as 8 f32 partial sums.
/// With `$has_m`, the weight has `(d, m)` and the activation `(d, s)` at the block start and
/// `m * s` is added per block (Q4_1 / Q5_1 x Q8_1).
macro_rules! legacy_dot {
    ($nb:expr, $w:expr, $x:expr, $wbs:expr, $xbs:expr, $has_m:expr, |$wb:ident, $xb:ident| $blockdot:expr) => {{
        let (nb, w, x): (usize, *const u8, *const u8) = ($nb, $w, $x);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut accm = _mm256_setzero_ps();
        let lane = |k: i32| _mm256_set1_epi32(if $has_m { 2 * k } else { k });
        let idx = [lane(0), lane(1), lane(2), lane(3)];
        let mut i = 0;
        while i + 4 <= nb {
            let (wp, xp) = (w.add(i * $wbs), x.add(i * $xbs));
            let sc = if $has_m {
                let p = _mm256_mul_ps(ld_f16pairs_x4(wp, $wbs), ld_f16pairs_x4(xp, $xbs));
                accm = _mm256_add_ps(accm, p);
                p
            } else {
                _mm256_castps128_ps256(_mm_mul_ps(ld_f16x4(wp, $wbs), ld_f16x4(xp, $xbs)))
            };
            for k in 0..4 {
                let ($wb, $xb) = (wp.add(k * $wbs), xp.add(k * $xbs));
                let p = $blockdot;
                let d = _mm256_permutevar8x32_ps(sc, idx[k]);
                acc[k & 1] = _mm256_fmadd_ps(d, p, acc[k & 1]);
            }
            i += 4;
        }
        let mut summ = 0.0f32;
        while i < nb {
            let ($wb, $xb) = (w.add(i * $wbs), x.add(i * $xbs));
            let p = $blockdot;
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(ld_f16($wb) * ld_f16($xb)), p, acc[0]);
            if $has_m {
                summ += ld_f16($wb.add(2)) * ld_f16($xb.add(2));
            }
            i += 1;
        }
        let mut r = hsum_ps(_mm256_add_ps(acc[0], acc[1]));
        if $has_m {
            // Odd lanes of accm hold the m * s products.
            r += hsum_ps(_mm256_blend_ps(_mm256_setzero_ps(), accm, 0b1010_1010)) + summ;
        }
        r
    }};
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0(nb: usize, w: *const u8, x: *const u8) -> f32 {
    legacy_dot!(nb, w, x, 34, 34, false, |wb, xb| mul_sum_i8_i8(ld256(wb.add(2)), ld256(xb.add(2))))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_q8_0(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let eight = _mm256_set1_epi8(8);
    legacy_dot!(nb, w, x, 18, 34, false, |wb, xb| {
        let q = _mm256_sub_epi8(unpack_nibbles16(wb.add(2)), eight);
        mul_sum_i8_i8(q, ld256(xb.add(2)))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1(nb: usize, w: *const u8, x: *const u8) -> f32 {
    legacy_dot!(nb, w, x, 20, 36, true, |wb, xb| mul_sum_u8_i8(unpack_nibbles16(wb.add(4)), ld256(xb.add(4))))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let f0 = _mm256_set1_epi8(0xF0u8 as i8);
    legacy_dot!(nb, w, x, 22, 34, false, |wb, xb| {
        let qh = (wb.add(2) as *const u32).read_unaligned();
        // (nibble | bit << 4) - 16 == nibble | 0xF0 when the bit is clear, nibble otherwise.
        let hi = _mm256_andnot_si256(bits_to_bytes(qh), f0);
        let q = _mm256_or_si256(unpack_nibbles16(wb.add(6)), hi);
        mul_sum_i8_i8(q, ld256(xb.add(2)))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_q8_1(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let b4 = _mm256_set1_epi8(0x10);
    legacy_dot!(nb, w, x, 24, 36, true, |wb, xb| {
        let qh = (wb.add(4) as *const u32).read_unaligned();
        let hi = _mm256_and_si256(bits_to_bytes(qh), b4);
        let q = _mm256_or_si256(unpack_nibbles16(wb.add(8)), hi);
        mul_sum_u8_i8(q, ld256(xb.add(4)))
    })
}

/// Bsums of a Q8_K block (16 x i16) as 8 i32 pair sums: pair j = bsums[2j] + bsums[2j+1].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8k_pair_sums(xb: *const u8) -> __m256i {
    sum_i16_pairs(ld256(xb.add(260)))
}

/// Lane totals of 8 vectors at once: lane k of the result is the sum of the lanes of `v[k]`
/// (exact integers, so the order is free).
#[inline(always)]
pub(crate) unsafe fn hsum8x8(v: &[__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    let h0123 = _mm256_hadd_epi32(h01, h23);
    let h4567 = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(h0123, h4567), _mm256_permute2x128_si256::<0x31>(h0123, h4567))
}

/// Q4_K mins products (lane g: `min_g * sum_g`) folded in pairs as ggml's AVX2 Q4_K kernel
/// does: its four lanes (pairs 0..4) land in lanes 0, 1, 4, 5, the others are zero.
#[inline(always)]
pub(crate) unsafe fn fold_mins(pm: __m256i) -> __m256i {
    _mm256_hadd_epi32(pm, _mm256_setzero_si256())
}

/// Horizontal sum of an accumulator of [`fold_mins`] lanes in ggml's order: (m0 + m2) + (m1 + m3).
#[inline(always)]
pub(crate) unsafe fn mins_sum(v: __m256) -> f32 {
    let mut a = [0f32; 8];
    _mm256_storeu_ps(a.as_mut_ptr(), v);
    (a[0] + a[4]) + (a[1] + a[5])
}

/// 8 Q4_K/Q5_K 6-bit (scales, mins) as two i32x8 vectors.
#[inline(always)]
pub(crate) unsafe fn k4_scales_mins(s: *const u8) -> ([i32; 8], __m256i) {
    let s = std::slice::from_raw_parts(s, 12);
    let mut sc = [0i32; 8];
    let mut mn = [0i32; 8];
    for j in 0..8 {
        let (a, b) = k4_scale_min(j, s);
        sc[j] = a as i32;
        mn[j] = b as i32;
    }
    (sc, _mm256_loadu_si256(mn.as_ptr() as *const __m256i))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_q8k(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0F);
    for i in 0..nb {
        let (wb, xb) = (w.add(i * 144), x.add(i * 292));
        let xd = (xb as *const f32).read_unaligned();
        let d = xd * ld_f16(wb);
        let dmin = xd * ld_f16(wb.add(2));
        let (sc, mins) = k4_scales_mins(wb.add(4));
        let pm = fold_mins(_mm256_mullo_epi32(mins, q8k_pair_sums(xb)));
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), accm);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q = ld256(wb.add(16 + 32 * c));
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            let xq = xb.add(4 + 64 * c);
            let pl = _mm256_maddubs_epi16(lo, ld256(xq));
            let ph = _mm256_maddubs_epi16(hi, ld256(xq.add(32)));
            let pl = _mm256_madd_epi16(pl, _mm256_set1_epi16(sc[2 * c] as i16));
            let ph = _mm256_madd_epi16(ph, _mm256_set1_epi16(sc[2 * c + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - mins_sum(accm)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k_q8k(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    for i in 0..nb {
        let (wb, xb) = (w.add(i * 176), x.add(i * 292));
        let xd = (xb as *const f32).read_unaligned();
        let d = xd * ld_f16(wb);
        let dmin = xd * ld_f16(wb.add(2));
        let (sc, mins) = k4_scales_mins(wb.add(4));
        let pm = _mm256_mullo_epi32(mins, q8k_pair_sums(xb));
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), accm);
        let mut qh = ld256(wb.add(16));
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q = ld256(wb.add(48 + 32 * c));
            let hl = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
            let hh = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
            qh = _mm256_srli_epi16(qh, 2);
            let lo = _mm256_or_si256(_mm256_and_si256(q, m4), hl);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), hh);
            let xq = xb.add(4 + 64 * c);
            let pl = _mm256_maddubs_epi16(lo, ld256(xq));
            let ph = _mm256_maddubs_epi16(hi, ld256(xq.add(32)));
            let pl = _mm256_madd_epi16(pl, _mm256_set1_epi16(sc[2 * c] as i16));
            let ph = _mm256_madd_epi16(ph, _mm256_set1_epi16(sc[2 * c + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - hsum_ps(accm)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_q8k(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    for i in 0..nb {
        let (wb, xb) = (w.add(i * 210), x.add(i * 292));
        let xd = (xb as *const f32).read_unaligned();
        let d = xd * ld_f16(wb.add(208));
        // The -32 offset: sum_g sc_g * (-32) * bsum_g, folded into the integer sum.
        let sc16 = _mm256_cvtepi8_epi16(ld128(wb.add(192)));
        let corr = _mm256_madd_epi16(sc16, ld256(xb.add(260)));
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
        for h in 0..2 {
            let ql0 = ld256(wb.add(64 * h));
            let ql1 = ld256(wb.add(64 * h + 32));
            let qh = ld256(wb.add(128 + 32 * h));
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4),
                ),
            ];
            let sc = wb.add(192 + 8 * h) as *const i8;
            for (k, qk) in q.iter().enumerate() {
                let p = _mm256_maddubs_epi16(*qk, ld256(xb.add(4 + 128 * h + 32 * k)));
                let s =
                    _mm256_set_m128i(_mm_set1_epi16(*sc.add(2 * k + 1) as i16), _mm_set1_epi16(*sc.add(2 * k) as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// Two i16 scale broadcasts: `lo` for the lower 128 bits (elements 0..16 of a 32-element
/// maddubs product), `hi` for the upper.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_pair(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2k_q8k(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    let m2 = _mm256_set1_epi8(3);
    for i in 0..nb {
        let (wb, xb) = (w.add(i * 84), x.add(i * 292));
        let xd = (xb as *const f32).read_unaligned();
        let d = xd * ld_f16(wb.add(80));
        let dmin = xd * ld_f16(wb.add(82));
        let scb = ld128(wb);
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(scb, 4), _mm_set1_epi8(0x0F)));
        let pm = _mm256_madd_epi16(mins, ld256(xb.add(260)));
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), accm);
        let sc = std::slice::from_raw_parts(wb, 16);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let mut qv = ld256(wb.add(16 + 32 * h));
            for p in 0..4 {
                let is = 8 * h + 2 * p;
                let low = _mm256_and_si256(qv, m2);
                qv = _mm256_srli_epi16(qv, 2);
                let prod = _mm256_maddubs_epi16(low, ld256(xb.add(4 + 128 * h + 32 * p)));
                let s = scale_pair((sc[is] & 0x0F) as i16, (sc[is + 1] & 0x0F) as i16);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - hsum_ps(accm)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k_q8k(nb: usize, w: *const u8, x: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m2 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    for i in 0..nb {
        let (wb, xb) = (w.add(i * 110), x.add(i * 292));
        let xd = (xb as *const f32).read_unaligned();
        let d = xd * ld_f16(wb.add(108));
        let sc = q3k_scales(std::slice::from_raw_parts(wb.add(96), 12));
        let hm = ld256(wb);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let mut qv = ld256(wb.add(32 + 32 * h));
            for p in 0..4 {
                let is = 8 * h + 2 * p;
                let low = _mm256_and_si256(qv, m2);
                qv = _mm256_srli_epi16(qv, 2);
                // 4 where the high bit is clear: value = low - 4.
                let bit = _mm256_set1_epi8((1u8 << (4 * h + p)) as i8);
                let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), _mm256_setzero_si256());
                let sub = _mm256_and_si256(clear, four);
                let xv = ld256(xb.add(4 + 128 * h + 32 * p));
                let prod = _mm256_sub_epi16(_mm256_maddubs_epi16(low, xv), _mm256_maddubs_epi16(sub, xv));
                let s = scale_pair(sc[is] as i16, sc[is + 1] as i16);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

// ---------------------------------------------------------------------------------------------
// Float kernels
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32_ptr(n: usize, a: *const f32, b: *const f32) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, ak) in acc.iter_mut().enumerate() {
            let o = i + 8 * k;
            *ak = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(o)), _mm256_loadu_ps(b.add(o)), *ak);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum_ps(v);
    while i < n {
        s += a.add(i).read_unaligned() * b.add(i).read_unaligned();
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f32_ptr(n: usize, alpha: f32, x: *const f32, y: *mut f32) {
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i)));
        _mm256_storeu_ps(y.add(i), r);
        i += 8;
    }
    while i < n {
        *y.add(i) += alpha * *x.add(i);
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32(n: usize, w: *const u8, x: *const u8) -> f32 {
    dot_f32_ptr(n, w as *const f32, x as *const f32)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f32(n: usize, w: *const u8, x: *const u8) -> f32 {
    let x = x as *const f32;
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let w0 = _mm256_cvtph_ps(ld128(w.add(2 * i)));
        let w1 = _mm256_cvtph_ps(ld128(w.add(2 * i + 16)));
        acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(i + 8)), acc1);
        i += 16;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += ld_f16(w.add(2 * i)) * x.add(i).read_unaligned();
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_f32(n: usize, w: *const u8, x: *const u8) -> f32 {
    let x = x as *const f32;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let wi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(ld128(w.add(2 * i))), 16);
        acc = _mm256_fmadd_ps(_mm256_castsi256_ps(wi), _mm256_loadu_ps(x.add(i)), acc);
        i += 8;
    }
    let mut s = hsum_ps(acc);
    while i < n {
        let bits = (w.add(2 * i) as *const u16).read_unaligned();
        s += f32::from_bits((bits as u32) << 16) * x.add(i).read_unaligned();
        i += 1;
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax_ps(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Round-to-nearest-even of 32 floats times `id`, stored as 32 i8 at `out` (clamped to
/// +-127); returns the four i32x8 vectors (elements 0..8, 8..16, 16..24, 24..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_store32(src: *const f32, id: f32, out: *mut u8) -> [__m256i; 4] {
    let vid = _mm256_set1_ps(id);
    let lim = _mm256_set1_epi32(127);
    let nlim = _mm256_set1_epi32(-127);
    let mut q = [_mm256_setzero_si256(); 4];
    for (k, qk) in q.iter_mut().enumerate() {
        let v = _mm256_mul_ps(_mm256_loadu_ps(src.add(8 * k)), vid);
        let r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        *qk = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(r), lim), nlim);
    }
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    let p = _mm256_packs_epi16(a, b);
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out as *mut __m256i, p);
    q
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn absmax32(src: *const f32) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for k in 0..4 {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(src.add(8 * k))));
    }
    hmax_ps(m)
}

#[inline(always)]
unsafe fn f16_bits(v: f32) -> u16 {
    _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT), 0) as u16
}

/// AVX2 twin of the scalar Q8_0 / Q8_1 / Q8_K quantizers (byte-identical output).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `src` and `dst` must be whole blocks of `ty`
/// (one of Q8_0, Q8_1, Q8_K) of matching length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let s = src.as_ptr();
    let o = dst.as_mut_ptr();
    match ty {
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let (bb, qo) = if ty == GgmlType::Q8_0 { (34, 2) } else { (36, 4) };
            for i in 0..src.len() / 32 {
                let (sb, ob) = (s.add(32 * i), o.add(bb * i));
                let amax = absmax32(sb);
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let q = q8_store32(sb, id, ob.add(qo));
                (ob as *mut u16).write_unaligned(f16_bits(d).to_le());
                if ty == GgmlType::Q8_1 {
                    let t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                    let sum = hsum_epi32(t) as f32;
                    (ob.add(2) as *mut u16).write_unaligned(f16_bits(d * sum).to_le());
                }
            }
        }
        GgmlType::Q8K => {
            for i in 0..src.len() / 256 {
                let (sb, ob) = (s.add(256 * i), o.add(292 * i));
                let mut amax = 0.0f32;
                for k in 0..8 {
                    amax = amax.max(absmax32(sb.add(32 * k)));
                }
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let d = if amax != 0.0 { 1.0 / id } else { 0.0 };
                (ob as *mut f32).write_unaligned(d);
                for k in 0..8 {
                    let q = q8_store32(sb.add(32 * k), id, ob.add(4 + 32 * k));
                    let g0 = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
                    let g1 = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
                    (ob.add(260 + 4 * k) as *mut i16).write_unaligned(g0.to_le());
                    (ob.add(262 + 4 * k) as *mut i16).write_unaligned(g1.to_le());
                }
            }
        }
        _ => unreachable!("quantize_q8 called for {ty}"),
    }
}
