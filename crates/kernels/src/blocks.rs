//! Reference (scalar) dequantization and quantization of every block format.
//!
//! Layouts are those of the GGUF file format; all multi-byte fields are little-endian and the
//! per-block scales `d`, `m`, `dmin` are IEEE half floats (except Q8_K's f32 `d`).

use half::{bf16, f16};

use crate::KernelError;
use crate::types::{GgmlType, QK, QK_K};

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline]
fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The 6-bit (scale, min) pair `j` of a Q4_K/Q5_K block's packed 12-byte scales.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn check(ty: GgmlType, n: usize, bytes: usize) -> Result<(), KernelError> {
    let expected = ty.row_bytes(n).ok_or(KernelError::BadLength { expected: ty.block_elems(), got: n })?;
    if expected != bytes {
        return Err(KernelError::BadLength { expected, got: bytes });
    }
    Ok(())
}

/// Dequantize `dst.len()` values of type `ty` from `src`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check(ty, dst.len(), src.len())?;
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let has_min = ty == GgmlType::Q4_1;
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let (m, qs) = if has_min { (f16_at(b, 2), &b[4..20]) } else { (-8.0 * d, &b[2..18]) };
                for j in 0..16 {
                    y[j] = f32::from(qs[j] & 0xF) * d + m;
                    y[j + 16] = f32::from(qs[j] >> 4) * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let has_min = ty == GgmlType::Q5_1;
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let o = if has_min { 4 } else { 2 };
                let m = if has_min { f16_at(b, 2) } else { -16.0 * d };
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                let qs = &b[o + 4..o + 20];
                for j in 0..16 {
                    let h0 = ((qh >> j) & 1) as u8;
                    let h1 = ((qh >> (j + 16)) & 1) as u8;
                    y[j] = f32::from((qs[j] & 0xF) | (h0 << 4)) * d + m;
                    y[j + 16] = f32::from((qs[j] >> 4) | (h1 << 4)) * d + m;
                }
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let o = if ty == GgmlType::Q8_1 { 4 } else { 2 };
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    y[j] = f32::from(b[o + j] as i8) * d;
                }
            }
        }
        GgmlType::Q8K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for j in 0..QK_K {
                    y[j] = f32::from(b[4 + j] as i8) * d;
                }
            }
        }
        GgmlType::Q2K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let mut is = 0;
                let mut out = 0;
                for n in 0..2 {
                    let q = &qs[n * 32..n * 32 + 32];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let sc = scales[is];
                            is += 1;
                            let (dl, ml) = (d * f32::from(sc & 0xF), dmin * f32::from(sc >> 4));
                            for l in 0..16 {
                                y[out] = dl * f32::from((q[half * 16 + l] >> shift) & 3) - ml;
                                out += 1;
                            }
                        }
                    }
                }
            }
        }
        GgmlType::Q3K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
                let (hmask, qs, sraw) = (&b[0..32], &b[32..96], &b[96..108]);
                let d_all = f16_at(b, 108);
                let scales = q3k_scales(sraw);
                let mut is = 0;
                let mut m = 1u8;
                let mut out = 0;
                for n in 0..2 {
                    let q = &qs[n * 32..n * 32 + 32];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let dl = d_all * f32::from(scales[is] - 32);
                            is += 1;
                            for l in 0..16 {
                                let k = half * 16 + l;
                                let lo = ((q[k] >> shift) & 3) as i8;
                                let hi = if hmask[k] & m != 0 { 0 } else { 4 };
                                y[out] = dl * f32::from(lo - hi);
                                out += 1;
                            }
                        }
                        m <<= 1;
                    }
                }
            }
        }
        GgmlType::Q4K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for j in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    let q = &qs[32 * j..32 * j + 32];
                    let yy = &mut y[64 * j..64 * j + 64];
                    for l in 0..32 {
                        yy[l] = d1 * f32::from(q[l] & 0xF) - m1;
                        yy[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
                    }
                }
            }
        }
        GgmlType::Q5K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
                for j in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    let q = &qs[32 * j..32 * j + 32];
                    let yy = &mut y[64 * j..64 * j + 64];
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        yy[l] = d1 * f32::from((q[l] & 0xF) + h1) - m1;
                        yy[l + 32] = d2 * f32::from((q[l] >> 4) + h2) - m2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(bb)) {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let yy = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        yy[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
                        yy[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
                        yy[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
                        yy[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Unpack Q3_K's 16 6-bit scales (stored biased by 32) from 12 bytes.
fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for i in 0..16 {
        let low = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        out[i] = (low | (high << 4)) as i8;
    }
    out
}

/// Quantize `src` into `dst` (`ty.row_bytes(src.len())` bytes).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    check(ty, src.len(), dst.len())?;
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&f16::from_f32(*s).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16::from_f32(*s).to_le_bytes());
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            for (b, x) in dst.chunks_exact_mut(bb).zip(src.chunks_exact(QK)) {
                quantize_q8_block(ty == GgmlType::Q8_1, x, b);
            }
        }
        GgmlType::Q8K => {
            for (b, x) in dst.chunks_exact_mut(bb).zip(src.chunks_exact(QK_K)) {
                quantize_q8k_block(x, b);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let (levels, bits5) = if ty == GgmlType::Q4_0 { (-8.0f32, false) } else { (-16.0, true) };
            for (b, x) in dst.chunks_exact_mut(bb).zip(src.chunks_exact(QK)) {
                let max = x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(b, 0, d);
                let cap = if bits5 { 31 } else { 15 };
                let q: Vec<u8> = x.iter().map(|v| ((v * id - levels + 0.5) as i32).clamp(0, cap) as u8).collect();
                pack_nibbles(b, 2, &q, bits5);
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let bits5 = ty == GgmlType::Q5_1;
            let cap: u8 = if bits5 { 31 } else { 15 };
            for (b, x) in dst.chunks_exact_mut(bb).zip(src.chunks_exact(QK)) {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / f32::from(cap);
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(b, 0, d);
                put_f16(b, 2, min);
                let q: Vec<u8> =
                    x.iter().map(|v| (((v - min) * id + 0.5) as i32).clamp(0, i32::from(cap)) as u8).collect();
                pack_nibbles(b, 4, &q, bits5);
            }
        }
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            return Err(KernelError::Unsupported { ty, op: "quantize" });
        }
    }
    Ok(())
}

/// Write 32 4- or 5-bit values: low nibbles of elements 0..16 and high nibbles of 16..32, with
/// the 5th bits (if any) in a little-endian u32 before them.
fn pack_nibbles(b: &mut [u8], at: usize, q: &[u8], bits5: bool) {
    let mut at = at;
    if bits5 {
        let qh = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (u32::from(v >> 4) << j));
        b[at..at + 4].copy_from_slice(&qh.to_le_bytes());
        at += 4;
    }
    for j in 0..16 {
        b[at + j] = (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4);
    }
}

/// Q8_0 / Q8_1 block: `d = amax / 127`, `q = round(x / d)`; Q8_1 adds `s = d * sum(q)`.
#[inline]
pub(crate) fn quantize_q8_block(with_sum: bool, x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    // As the reference's SIMD path: multiply by 127/amax and round half to even.
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    put_f16(b, 0, d);
    let o = if with_sum { 4 } else { 2 };
    let mut sum = 0i32;
    for (dst, &v) in b[o..o + QK].iter_mut().zip(x) {
        let q = (v * id).round_ties_even() as i32;
        sum += q;
        *dst = q as i8 as u8;
    }
    if with_sum {
        put_f16(b, 2, sum as f32 * d);
    }
}

/// Q8_K block: f32 `d`, 256 int8 values, and the 16 sums of each group of 16.
#[inline]
pub(crate) fn quantize_q8k_block(x: &[f32], b: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        b.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    let mut q = [0i8; QK_K];
    for (dst, &v) in q.iter_mut().zip(x) {
        *dst = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    for (dst, &v) in b[4..4 + QK_K].iter_mut().zip(&q) {
        *dst = v as u8;
    }
    for g in 0..16 {
        let s: i16 = q[g * 16..g * 16 + 16].iter().map(|&v| i16::from(v)).sum();
        b[260 + 2 * g..262 + 2 * g].copy_from_slice(&s.to_le_bytes());
    }
}
