//! Dot products of one weight row with one quantized activation row: scalar reference versions,
//! dispatched to the AVX2 versions in `simd.rs` when the CPU has them.

use half::{bf16, f16};

use crate::blocks::{f16_at, scale_min_k4};
use crate::types::{GgmlType, QK, QK_K};

/// Dot product of a row of `n` weights of type `ty` with an activation row already quantized to
/// `ty.vec_dot_type()`.
#[inline]
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        if let Some(v) = unsafe { crate::simd::vec_dot_avx2(ty, n, w, x) } {
            return v;
        }
    }
    vec_dot_scalar(ty, n, w, x)
}

/// The portable reference version of [`vec_dot`].
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    let bb = ty.block_bytes();
    let xb = ty.vec_dot_type().block_bytes();
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let xs = x.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            match ty {
                GgmlType::F32 => w
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .zip(xs)
                    .map(|(a, b)| a * b)
                    .sum(),
                GgmlType::F16 => w
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .zip(xs)
                    .map(|(a, b)| a * b)
                    .sum(),
                _ => w
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .zip(xs)
                    .map(|(a, b)| a * b)
                    .sum(),
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            let mut sum = 0f32;
            for (wb, xb) in w.chunks_exact(bb).zip(x.chunks_exact(xb)).take(n / QK) {
                let dx = f16_at(xb, 0);
                let xq = |j: usize| i32::from(xb[if ty.vec_dot_type() == GgmlType::Q8_1 { 4 } else { 2 } + j] as i8);
                let dw = f16_at(wb, 0);
                let mut isum = 0i32;
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q4_1 => {
                        let qs = if ty == GgmlType::Q4_1 { &wb[4..20] } else { &wb[2..18] };
                        let off = if ty == GgmlType::Q4_0 { 8 } else { 0 };
                        for j in 0..16 {
                            isum += (i32::from(qs[j] & 0xF) - off) * xq(j) + (i32::from(qs[j] >> 4) - off) * xq(j + 16);
                        }
                    }
                    GgmlType::Q5_0 | GgmlType::Q5_1 => {
                        let o = if ty == GgmlType::Q5_1 { 4 } else { 2 };
                        let off = if ty == GgmlType::Q5_0 { 16 } else { 0 };
                        let qh = u32::from_le_bytes([wb[o], wb[o + 1], wb[o + 2], wb[o + 3]]);
                        let qs = &wb[o + 4..o + 20];
                        for j in 0..16 {
                            let lo = i32::from(qs[j] & 0xF) | (((qh >> j) & 1) as i32) << 4;
                            let hi = i32::from(qs[j] >> 4) | (((qh >> (j + 16)) & 1) as i32) << 4;
                            isum += (lo - off) * xq(j) + (hi - off) * xq(j + 16);
                        }
                    }
                    _ => {
                        for j in 0..QK {
                            isum += i32::from(wb[2 + j] as i8) * xq(j);
                        }
                    }
                }
                sum += dw * dx * isum as f32;
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    sum += f16_at(wb, 2) * f16_at(xb, 2);
                }
            }
            sum
        }
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let mut sum = 0f32;
            let mut deq = [0f32; QK_K];
            for (wb, xb) in w.chunks_exact(bb).zip(x.chunks_exact(xb)).take(n / QK_K) {
                let dx = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
                let xq = &xb[4..4 + QK_K];
                match ty {
                    GgmlType::Q4K | GgmlType::Q5K => {
                        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
                        let scales = &wb[4..16];
                        let bsums = |g: usize| i32::from(i16::from_le_bytes([xb[260 + 2 * g], xb[261 + 2 * g]]));
                        let mut isum = 0i32;
                        let mut msum = 0i32;
                        for j in 0..8 {
                            let (sc, m) = scale_min_k4(j, scales);
                            let chunk = j / 2;
                            let mut s = 0i32;
                            for l in 0..32 {
                                let q = if ty == GgmlType::Q4K {
                                    let b = wb[16 + 32 * chunk + l];
                                    if j % 2 == 0 { b & 0xF } else { b >> 4 }
                                } else {
                                    let b = wb[48 + 32 * chunk + l];
                                    let lo = if j % 2 == 0 { b & 0xF } else { b >> 4 };
                                    let h = (wb[16 + l] >> j) & 1;
                                    lo | (h << 4)
                                };
                                s += i32::from(q) * i32::from(xq[32 * j + l] as i8);
                            }
                            isum += i32::from(sc) * s;
                            msum += i32::from(m) * (bsums(2 * j) + bsums(2 * j + 1));
                        }
                        sum += dx * (d * isum as f32 - dmin * msum as f32);
                    }
                    GgmlType::Q6K => {
                        let (ql, qh, sc) = (&wb[0..128], &wb[128..192], &wb[192..208]);
                        let d = f16_at(wb, 208);
                        let mut isum = 0i32;
                        for n in 0..2 {
                            let (ql, qh, sc, xq) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &xq[128 * n..]);
                            let mut part = [0i32; 8];
                            for l in 0..32 {
                                let is = l / 16;
                                let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                                let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                                part[is] += q1 * i32::from(xq[l] as i8);
                                part[is + 2] += q2 * i32::from(xq[l + 32] as i8);
                                part[is + 4] += q3 * i32::from(xq[l + 64] as i8);
                                part[is + 6] += q4 * i32::from(xq[l + 96] as i8);
                            }
                            for (g, p) in part.iter().enumerate() {
                                isum += i32::from(sc[g] as i8) * p;
                            }
                        }
                        sum += d * dx * isum as f32;
                    }
                    _ => {
                        // Q2_K / Q3_K: rare in practice; dequantize the block and dot in f32.
                        crate::blocks::dequantize_row(ty, wb, &mut deq).expect("block length checked by caller");
                        let isum: f32 = deq.iter().zip(xq).map(|(a, &b)| a * f32::from(b as i8)).sum();
                        sum += dx * isum;
                    }
                }
            }
            sum
        }
        GgmlType::Q8_1 | GgmlType::Q8K => unreachable!("{ty} is an activation format, not a weight format"),
    }
}
