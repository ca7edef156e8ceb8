//! AVX2 multi-token row kernels: one weight row against up to four activation rows, so each
//! weight block is loaded and unpacked once per group of tokens (speculative verification,
//! prefill). Only reachable after run-time detection (see [`crate::dot::dot_multi_fn`]).

#![allow(unsafe_op_in_unsafe_fn)]

use crate::avx2::{
    bits_to_bytes, hsum_ps, k4_scales_mins, ld_f16, ld_f16pairs_x4, ld_f16x4, ld128, ld256, mul_sum_u8_i8,
    mul_sum_u8_i8_vnni, q8k_pair_sums, unpack_nibbles16, vnni_available,
};
use crate::dot::{DotMultiFn, check_row};
use crate::types::GgmlType;
use std::arch::x86_64::*;

/// Most activation rows one multi-token kernel call handles.
pub(crate) const MAX_TOKENS: usize = 4;

pub(crate) fn dot_multi_fn(ty: GgmlType) -> Option<DotMultiFn> {
    macro_rules! wrap {
        ($t:expr, $body:ident) => {{
            fn f(n: usize, w: &[u8], x: &[u8], stride: usize, out: &mut [f32]) {
                let nt = out.len();
                assert!((1..=MAX_TOKENS).contains(&nt), "multi-token kernel: {nt} tokens");
                let nb = check_row($t, n, w, x);
                let xrb = $t.vec_dot_type().row_bytes(n).unwrap_or(usize::MAX);
                assert!(
                    stride >= xrb && x.len() >= (nt - 1) * stride + xrb,
                    "multi-token kernel: activation rows too short"
                );
                let (w, x) = (w.as_ptr(), x.as_ptr());
                // SAFETY: lengths checked above; handed out only after run-time detection of
                // avx2, fma and f16c.
                unsafe {
                    match nt {
                        1 => $body::<1>(nb, w, x, stride, out),
                        2 => $body::<2>(nb, w, x, stride, out),
                        3 => $body::<3>(nb, w, x, stride, out),
                        _ => $body::<4>(nb, w, x, stride, out),
                    }
                }
            }
            f as DotMultiFn
        }};
    }
    let vnni = vnni_available();
    Some(match ty {
        GgmlType::Q4_0 if vnni => wrap!(GgmlType::Q4_0, q4_0_m_vnni),
        GgmlType::Q4_1 if vnni => wrap!(GgmlType::Q4_1, q4_1_m_vnni),
        GgmlType::Q5_0 if vnni => wrap!(GgmlType::Q5_0, q5_0_m_vnni),
        GgmlType::Q5_1 if vnni => wrap!(GgmlType::Q5_1, q5_1_m_vnni),
        GgmlType::Q8_0 if vnni => wrap!(GgmlType::Q8_0, q8_0_m_vnni),
        GgmlType::Q4_0 => wrap!(GgmlType::Q4_0, q4_0_m),
        GgmlType::Q4_1 => wrap!(GgmlType::Q4_1, q4_1_m),
        GgmlType::Q5_0 => wrap!(GgmlType::Q5_0, q5_0_m),
        GgmlType::Q5_1 => wrap!(GgmlType::Q5_1, q5_1_m),
        GgmlType::Q8_0 => wrap!(GgmlType::Q8_0, q8_0_m),
        GgmlType::Q4K => wrap!(GgmlType::Q4K, q4k_m),
        GgmlType::Q5K => wrap!(GgmlType::Q5K, q5k_m),
        GgmlType::Q6K => wrap!(GgmlType::Q6K, q6k_m),
        _ => return None,
    })
}

/// One weight block unpacked to 32 bytes (`$prep`), multiplied with `T` activation blocks.
/// `$signed`: the unpacked weights are i8 (sign trick), otherwise u8. `$has_m`: weight has
/// `(d, m)`, activation `(d, s)` at the block start and `m * s` is added per block.
/// Blocks go four at a time with their scales converted together (as in the 1-token kernels).
macro_rules! legacy_multi {
    ($T:ident, $mul:ident, $nb:expr, $w:expr, $x:expr, $stride:expr, $out:expr, $wbs:expr, $xbs:expr, $xqo:expr,
     $has_m:expr, $signed:expr, |$wb:ident| $prep:expr) => {{
        let (nb, w, x, stride, out): (usize, *const u8, *const u8, usize, &mut [f32]) = ($nb, $w, $x, $stride, $out);
        let mut acc = [_mm256_setzero_ps(); $T];
        let mut accm = [_mm256_setzero_ps(); $T];
        let mut summ = [0.0f32; $T];
        let lane = |k: i32| _mm256_set1_epi32(if $has_m { 2 * k } else { k });
        let idx = [lane(0), lane(1), lane(2), lane(3)];
        let mut i = 0;
        while i + 4 <= nb {
            let wp = w.add(i * $wbs);
            let mut q = [_mm256_setzero_si256(); 4];
            let mut qa = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                let $wb = wp.add(k * $wbs);
                q[k] = $prep;
                qa[k] = if $signed { _mm256_sign_epi8(q[k], q[k]) } else { q[k] };
            }
            let (wsc2, wsc1) = if $has_m {
                (ld_f16pairs_x4(wp, $wbs), _mm_setzero_ps())
            } else {
                (_mm256_setzero_ps(), ld_f16x4(wp, $wbs))
            };
            for t in 0..$T {
                let xp = x.add(t * stride + i * $xbs);
                let sc = if $has_m {
                    let p = _mm256_mul_ps(wsc2, ld_f16pairs_x4(xp, $xbs));
                    accm[t] = _mm256_add_ps(accm[t], p);
                    p
                } else {
                    _mm256_castps128_ps256(_mm_mul_ps(wsc1, ld_f16x4(xp, $xbs)))
                };
                for k in 0..4 {
                    let xv = ld256(xp.add(k * $xbs + $xqo));
                    let xv = if $signed { _mm256_sign_epi8(xv, q[k]) } else { xv };
                    let p = $mul(qa[k], xv);
                    acc[t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sc, idx[k]), p, acc[t]);
                }
            }
            i += 4;
        }
        while i < nb {
            let $wb = w.add(i * $wbs);
            let q: __m256i = $prep;
            let qa = if $signed { _mm256_sign_epi8(q, q) } else { q };
            let dw = ld_f16($wb);
            for t in 0..$T {
                let xb = x.add(t * stride + i * $xbs);
                let xv = ld256(xb.add($xqo));
                let xv = if $signed { _mm256_sign_epi8(xv, q) } else { xv };
                let p = $mul(qa, xv);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ld_f16(xb)), p, acc[t]);
                if $has_m {
                    summ[t] += ld_f16($wb.add(2)) * ld_f16(xb.add(2));
                }
            }
            i += 1;
        }
        for t in 0..$T {
            out[t] = hsum_ps(acc[t]) + summ[t];
            if $has_m {
                out[t] += hsum_ps(_mm256_blend_ps(_mm256_setzero_ps(), accm[t], 0b1010_1010));
            }
        }
    }};
}

/// Each legacy format's kernel twice: plain AVX2, and with AVX-VNNI for the integer dot products.
macro_rules! legacy_kernel {
    ($name:ident, $vnni:ident, $wbs:expr, $xbs:expr, $xqo:expr, $has_m:expr, $signed:expr,
     [$($setup:stmt;)*] |$wb:ident| $prep:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const T: usize>(nb: usize, w: *const u8, x: *const u8, stride: usize, out: &mut [f32]) {
            $($setup)*
            legacy_multi!(T, mul_sum_u8_i8, nb, w, x, stride, out, $wbs, $xbs, $xqo, $has_m, $signed, |$wb| $prep)
        }

        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        unsafe fn $vnni<const T: usize>(nb: usize, w: *const u8, x: *const u8, stride: usize, out: &mut [f32]) {
            $($setup)*
            legacy_multi!(T, mul_sum_u8_i8_vnni, nb, w, x, stride, out, $wbs, $xbs, $xqo, $has_m, $signed, |$wb| $prep)
        }
    };
}

legacy_kernel!(q8_0_m, q8_0_m_vnni, 34, 34, 2, false, true, [] | wb | ld256(wb.add(2)));
legacy_kernel!(q4_0_m, q4_0_m_vnni, 18, 34, 2, false, true, [let eight = _mm256_set1_epi8(8);] |wb| {
    _mm256_sub_epi8(unpack_nibbles16(wb.add(2)), eight)
});
legacy_kernel!(q4_1_m, q4_1_m_vnni, 20, 36, 4, true, false, [] | wb | unpack_nibbles16(wb.add(4)));
legacy_kernel!(q5_0_m, q5_0_m_vnni, 22, 34, 2, false, true, [let f0 = _mm256_set1_epi8(0xF0u8 as i8);] |wb| {
    let qh = (wb.add(2) as *const u32).read_unaligned();
    _mm256_or_si256(unpack_nibbles16(wb.add(6)), _mm256_andnot_si256(bits_to_bytes(qh), f0))
});
legacy_kernel!(q5_1_m, q5_1_m_vnni, 24, 36, 4, true, false, [let b4 = _mm256_set1_epi8(0x10);] |wb| {
    let qh = (wb.add(4) as *const u32).read_unaligned();
    _mm256_or_si256(unpack_nibbles16(wb.add(8)), _mm256_and_si256(bits_to_bytes(qh), b4))
});

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_m<const T: usize>(nb: usize, w: *const u8, x: *const u8, stride: usize, out: &mut [f32]) {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut accm = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0F);
    for i in 0..nb {
        let wb = w.add(i * 144);
        let (dw, dminw) = (ld_f16(wb), ld_f16(wb.add(2)));
        let (sc, mins) = k4_scales_mins(wb.add(4));
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            let v = ld256(wb.add(16 + 32 * c));
            q[2 * c] = _mm256_and_si256(v, m4);
            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            s[2 * c] = _mm256_set1_epi16(sc[2 * c] as i16);
            s[2 * c + 1] = _mm256_set1_epi16(sc[2 * c + 1] as i16);
        }
        for t in 0..T {
            let xb = x.add(t * stride + i * 292);
            let xd = (xb as *const f32).read_unaligned();
            let pm = _mm256_mullo_epi32(mins, q8k_pair_sums(xb));
            accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(xd * dminw), _mm256_cvtepi32_ps(pm), accm[t]);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..8 {
                let p = _mm256_maddubs_epi16(q[j], ld256(xb.add(4 + 32 * j)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s[j]));
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xd * dw), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    for t in 0..T {
        out[t] = hsum_ps(acc[t]) - hsum_ps(accm[t]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k_m<const T: usize>(nb: usize, w: *const u8, x: *const u8, stride: usize, out: &mut [f32]) {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut accm = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0F);
    for i in 0..nb {
        let wb = w.add(i * 176);
        let (dw, dminw) = (ld_f16(wb), ld_f16(wb.add(2)));
        let (sc, mins) = k4_scales_mins(wb.add(4));
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        let one = _mm256_set1_epi8(1);
        let mut qh = ld256(wb.add(16));
        for c in 0..4 {
            let v = ld256(wb.add(48 + 32 * c));
            let hl = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
            let hh = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
            qh = _mm256_srli_epi16(qh, 2);
            q[2 * c] = _mm256_or_si256(_mm256_and_si256(v, m4), hl);
            q[2 * c + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), hh);
            s[2 * c] = _mm256_set1_epi16(sc[2 * c] as i16);
            s[2 * c + 1] = _mm256_set1_epi16(sc[2 * c + 1] as i16);
        }
        for t in 0..T {
            let xb = x.add(t * stride + i * 292);
            let xd = (xb as *const f32).read_unaligned();
            let pm = _mm256_mullo_epi32(mins, q8k_pair_sums(xb));
            accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(xd * dminw), _mm256_cvtepi32_ps(pm), accm[t]);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..8 {
                let p = _mm256_maddubs_epi16(q[j], ld256(xb.add(4 + 32 * j)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s[j]));
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xd * dw), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    for t in 0..T {
        out[t] = hsum_ps(acc[t]) - hsum_ps(accm[t]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_m<const T: usize>(nb: usize, w: *const u8, x: *const u8, stride: usize, out: &mut [f32]) {
    let mut acc = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    for i in 0..nb {
        let wb = w.add(i * 210);
        let dw = ld_f16(wb.add(208));
        let sc16 = _mm256_cvtepi8_epi16(ld128(wb.add(192)));
        // q[4h + k] covers elements 128h + 32k .. +32 with scales sc[8h + 2k], sc[8h + 2k + 1].
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let ql0 = ld256(wb.add(64 * h));
            let ql1 = ld256(wb.add(64 * h + 32));
            let qh = ld256(wb.add(128 + 32 * h));
            let hb = |sh: i32| {
                let v = match sh {
                    0 => qh,
                    2 => _mm256_srli_epi16(qh, 2),
                    4 => _mm256_srli_epi16(qh, 4),
                    _ => _mm256_srli_epi16(qh, 6),
                };
                _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
            };
            q[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), hb(0));
            q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), hb(2));
            q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), hb(4));
            q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), hb(6));
            let sc = wb.add(192 + 8 * h) as *const i8;
            for k in 0..4 {
                s[4 * h + k] =
                    _mm256_set_m128i(_mm_set1_epi16(*sc.add(2 * k + 1) as i16), _mm_set1_epi16(*sc.add(2 * k) as i16));
            }
        }
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let xb = x.add(t * stride + i * 292);
            let xd = (xb as *const f32).read_unaligned();
            let corr = _mm256_madd_epi16(sc16, ld256(xb.add(260)));
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
            for j in 0..8 {
                let p = _mm256_maddubs_epi16(q[j], ld256(xb.add(4 + 32 * j)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s[j]));
            }
            *acc_t = _mm256_fmadd_ps(_mm256_set1_ps(xd * dw), _mm256_cvtepi32_ps(sumi), *acc_t);
        }
    }
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VNNI kernels must be bit-identical to the AVX2 ones (batch invariance and
    /// reproducibility across CPUs depend on it).
    #[test]
    fn vnni_kernels_are_bit_identical() {
        if !(crate::dot::simd_available() && vnni_available()) {
            eprintln!("no AVX-VNNI here: skipped");
            return;
        }
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        type K = unsafe fn(usize, *const u8, *const u8, usize, &mut [f32]);
        let pairs: [(GgmlType, K, K); 5] = [
            (GgmlType::Q8_0, q8_0_m::<4>, q8_0_m_vnni::<4>),
            (GgmlType::Q4_0, q4_0_m::<4>, q4_0_m_vnni::<4>),
            (GgmlType::Q4_1, q4_1_m::<4>, q4_1_m_vnni::<4>),
            (GgmlType::Q5_0, q5_0_m::<4>, q5_0_m_vnni::<4>),
            (GgmlType::Q5_1, q5_1_m::<4>, q5_1_m_vnni::<4>),
        ];
        for (ty, plain, vnni) in pairs {
            let n = 32 * 11;
            let vals = |next: &mut dyn FnMut() -> u64, k: usize| -> Vec<f32> {
                (0..k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect()
            };
            let w_vals = vals(&mut next, n);
            let mut w = vec![0u8; ty.row_bytes(n).unwrap()];
            crate::quantize_row(ty, &w_vals, &mut w).unwrap();
            let act = ty.vec_dot_type();
            let xrb = act.row_bytes(n).unwrap();
            let mut xs = vec![0u8; 4 * xrb];
            for t in 0..4 {
                crate::quantize_row(act, &vals(&mut next, n), &mut xs[t * xrb..(t + 1) * xrb]).unwrap();
            }
            let (mut a, mut b) = ([0f32; 4], [0f32; 4]);
            // SAFETY: this CPU has the features (checked above) and the rows are complete.
            unsafe {
                plain(n / 32, w.as_ptr(), xs.as_ptr(), xrb, &mut a);
                vnni(n / 32, w.as_ptr(), xs.as_ptr(), xrb, &mut b);
            }
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{ty}");
        }
    }
}
