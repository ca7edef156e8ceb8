//! Scalar reference dequantization and quantization for every block format.
//!
//! These follow the GGUF / ggml on-disk block layouts exactly (all little-endian; `d`, `m`,
//! `dmin` and Q8_1's `s` are IEEE half floats, Q8_K's `d` is an f32).

use crate::types::{GgmlType, KernelError, QK, QK_K};
use half::{bf16, f16};

#[inline(always)]
pub(crate) fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
fn wr_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

#[inline(always)]
pub(crate) fn rd_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub(crate) fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The 6-bit (scale, min) pair `j` (0..8) of a Q4_K / Q5_K `scales[12]` field.
#[inline(always)]
pub(crate) fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The 16 signed 6-bit scales (already minus 32) of a Q3_K `scales[12]` field.
///
/// Scale i has low 4 bits `s[i] & 15` (i < 8) or `s[i - 8] >> 4` (i >= 8) and high 2 bits
/// `(s[8 + i % 4] >> (2 * (i / 4))) & 3`; decoded eight at a time in u64 lanes.
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let a = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
    let b = u32::from_le_bytes([s[8], s[9], s[10], s[11]]) as u64;
    const M4: u64 = 0x0F0F_0F0F_0F0F_0F0F;
    const M2: u64 = 0x0303_0303;
    let hi0 = (b & M2) | (((b >> 2) & M2) << 32);
    let hi1 = ((b >> 4) & M2) | (((b >> 6) & M2) << 32);
    let r0 = (a & M4) | (hi0 << 4);
    let r1 = ((a >> 4) & M4) | (hi1 << 4);
    let mut out = [0i8; 16];
    for (o, v) in out.iter_mut().zip(r0.to_le_bytes().into_iter().chain(r1.to_le_bytes())) {
        *o = (v as i8).wrapping_sub(32);
    }
    out
}

fn check_lens(ty: GgmlType, n: usize, bytes: usize) -> Result<usize, KernelError> {
    let be = ty.block_elems();
    if !n.is_multiple_of(be) {
        return Err(KernelError::BadLength { expected: n.div_ceil(be) * be, got: n });
    }
    let rb = ty.row_bytes(n).ok_or(KernelError::BadLength { expected: usize::MAX, got: n })?;
    if rb != bytes {
        return Err(KernelError::BadLength { expected: rb, got: bytes });
    }
    Ok(n / be)
}

/// Reference dequantization of `n = dst.len()` elements (a multiple of `ty.block_elems()`);
/// `src.len()` must equal `ty.row_bytes(n)`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_lens(ty, dst.len(), src.len())?;
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    match ty {
        GgmlType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            return Ok(());
        }
        GgmlType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
            return Ok(());
        }
        GgmlType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
            return Ok(());
        }
        _ => {}
    }
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        match ty {
            GgmlType::Q4_0 => deq_q4_0(b, y),
            GgmlType::Q4_1 => deq_q4_1(b, y),
            GgmlType::Q5_0 => deq_q5_0(b, y),
            GgmlType::Q5_1 => deq_q5_1(b, y),
            GgmlType::Q8_0 => deq_q8_0(b, y),
            GgmlType::Q8_1 => deq_q8_1(b, y),
            GgmlType::Q2K => deq_q2k(b, y),
            GgmlType::Q3K => deq_q3k(b, y),
            GgmlType::Q4K => deq_q4k(b, y),
            GgmlType::Q5K => deq_q5k(b, y),
            GgmlType::Q6K => deq_q6k(b, y),
            GgmlType::Q8K => deq_q8k(b, y),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!(),
        }
    }
    Ok(())
}

fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    let m = rd_f16(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    let qh = rd_u32(b, 2);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = d * (((qs[j] & 0x0F) | h0) as i32 - 16) as f32;
        y[j + 16] = d * (((qs[j] >> 4) | h1) as i32 - 16) as f32;
    }
}

fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    let m = rd_f16(b, 2);
    let qh = rd_u32(b, 4);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = d * ((qs[j] & 0x0F) | h0) as f32 + m;
        y[j + 16] = d * ((qs[j] >> 4) | h1) as f32 + m;
    }
}

fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = d * (q as i8) as f32;
    }
}

fn deq_q8_1(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[4..36]) {
        *o = d * (q as i8) as f32;
    }
}

fn deq_q8k(b: &[u8], y: &mut [f32]) {
    let d = rd_f32(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *o = d * (q as i8) as f32;
    }
}

fn deq_q2k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = rd_f16(b, 80);
    let dmin = rd_f16(b, 82);
    // Two halves of 128 elements, each using 32 bytes of qs; four 2-bit planes per byte.
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for plane in 0..4 {
            let shift = 2 * plane;
            for sub in 0..2 {
                let is = half * 8 + plane * 2 + sub;
                let sc = scales[is];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let base = half * 128 + plane * 32 + sub * 16;
                for l in 0..16 {
                    y[base + l] = dl * ((q[sub * 16 + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

fn deq_q3k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = q3k_scales(&b[96..108]);
    let d = rd_f16(b, 108);
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for plane in 0..4 {
            let shift = 2 * plane;
            let hbit = 1u8 << (half * 4 + plane);
            for sub in 0..2 {
                let is = half * 8 + plane * 2 + sub;
                let dl = d * sc[is] as f32;
                let base = half * 128 + plane * 32 + sub * 16;
                for l in 0..16 {
                    let k = sub * 16 + l;
                    let lo = ((q[k] >> shift) & 3) as i32;
                    let h = if hmask[k] & hbit != 0 { 0 } else { 4 };
                    y[base + l] = dl * (lo - h) as f32;
                }
            }
        }
    }
}

fn deq_q4k(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    let dmin = rd_f16(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (s1, m1) = k4_scale_min(2 * chunk, scales);
        let (s2, m2) = k4_scale_min(2 * chunk + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn deq_q5k(b: &[u8], y: &mut [f32]) {
    let d = rd_f16(b, 0);
    let dmin = rd_f16(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let (s1, m1) = k4_scale_min(2 * chunk, scales);
        let (s2, m2) = k4_scale_min(2 * chunk + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * chunk)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            out[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

fn deq_q6k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = rd_f16(b, 208);
    for half in 0..2 {
        let ql = &ql[half * 64..half * 64 + 64];
        let qh = &qh[half * 32..half * 32 + 32];
        let sc = &sc[half * 8..half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

/// Quantize `src` (a multiple of `ty.block_elems()` elements) into `dst`
/// (`ty.row_bytes(src.len())` bytes). Supported: every type except Q2_K, Q3_K and Q5_K.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    if !ty.can_quantize() {
        return Err(KernelError::Unsupported { ty, op: "quantize_row" });
    }
    check_lens(ty, src.len(), dst.len())?;
    match ty {
        GgmlType::F32 => {
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&x.to_le_bytes());
            }
            return Ok(());
        }
        GgmlType::F16 => {
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
            }
            return Ok(());
        }
        GgmlType::BF16 => {
            for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
            }
            return Ok(());
        }
        _ => {}
    }
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    for (x, b) in src.chunks_exact(be).zip(dst.chunks_exact_mut(bb)) {
        match ty {
            GgmlType::Q4_0 => q_q4_0(x, b),
            GgmlType::Q4_1 => q_q4_1(x, b),
            GgmlType::Q5_0 => q_q5_0(x, b),
            GgmlType::Q5_1 => q_q5_1(x, b),
            GgmlType::Q8_0 => q_q8_0(x, b),
            GgmlType::Q8_1 => q_q8_1(x, b),
            GgmlType::Q8K => q_q8k(x, b),
            GgmlType::Q4K => q_q4k(x, b),
            GgmlType::Q6K => q_q6k(x, b),
            _ => unreachable!(),
        }
    }
    Ok(())
}

/// Quantize an activation row to `ty` (a `vec_dot_type`): AVX2 for Q8_0 / Q8_1 / Q8_K when
/// available, byte-identical to [`quantize_row`].
pub(crate) fn quantize_act(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8K) && crate::dot::simd_available() {
        check_lens(ty, src.len(), dst.len())?;
        // SAFETY: AVX2/FMA/F16C detected; lengths checked (whole blocks on both sides).
        unsafe { crate::avx2::quantize_q8(ty, src, dst) };
        return Ok(());
    }
    quantize_row(ty, src, dst)
}

/// The element of largest magnitude, keeping its sign.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = 0.0f32;
    for &v in x {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// Symmetric `bits`-bit quantization: q in 0..2^bits, value = d * (q - 2^(bits-1)).
/// The largest-magnitude element maps exactly to the most negative level.
fn sym_levels(x: &[f32], half_range: f32, out: &mut [u8; QK]) -> f32 {
    let max = signed_absmax(x);
    let d = max / -half_range;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let top = 2.0 * half_range - 1.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * id + half_range + 0.5).clamp(0.0, top) as u8;
    }
    d
}

/// Asymmetric `levels`-level quantization: value = d * q + min.
fn asym_levels(x: &[f32], top: f32, out: &mut [u8; QK]) -> (f32, f32) {
    let (lo, hi) = min_max(x);
    let d = (hi - lo) / top;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((v - lo) * id + 0.5).clamp(0.0, top) as u8;
    }
    (d, lo)
}

fn pack_nibbles(q: &[u8; QK], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
    }
}

fn high_bits(q: &[u8; QK]) -> u32 {
    q.iter().enumerate().fold(0u32, |acc, (j, &v)| acc | (((v as u32 >> 4) & 1) << j))
}

fn q_q4_0(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; QK];
    let d = sym_levels(x, 8.0, &mut q);
    wr_f16(b, 0, d);
    pack_nibbles(&q, &mut b[2..18]);
}

fn q_q4_1(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; QK];
    let (d, m) = asym_levels(x, 15.0, &mut q);
    wr_f16(b, 0, d);
    wr_f16(b, 2, m);
    pack_nibbles(&q, &mut b[4..20]);
}

fn q_q5_0(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; QK];
    let d = sym_levels(x, 16.0, &mut q);
    wr_f16(b, 0, d);
    b[2..6].copy_from_slice(&high_bits(&q).to_le_bytes());
    pack_nibbles(&q, &mut b[6..22]);
}

fn q_q5_1(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; QK];
    let (d, m) = asym_levels(x, 31.0, &mut q);
    wr_f16(b, 0, d);
    wr_f16(b, 2, m);
    b[4..8].copy_from_slice(&high_bits(&q).to_le_bytes());
    pack_nibbles(&q, &mut b[8..24]);
}

/// Q8 quantization of 32 values into `qs`; returns (d, sum of qs).
#[inline]
fn q8_block(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    // ggml multiplies by 127 / amax (not 1 / d): the two differ by an ulp for some amax.
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in qs.iter_mut().zip(x) {
        let q = (v * id).round_ties_even() as i32;
        sum += q;
        *o = q as i8 as u8;
    }
    (d, sum)
}

fn q_q8_0(x: &[f32], b: &mut [u8]) {
    let (d, _) = q8_block(x, &mut b[2..34]);
    wr_f16(b, 0, d);
}

fn q_q8_1(x: &[f32], b: &mut [u8]) {
    let (d, sum) = q8_block(x, &mut b[4..36]);
    wr_f16(b, 0, d);
    // s = d * sum with the unrounded d, as ggml computes it.
    wr_f16(b, 2, d * sum as f32);
}

fn q_q8k(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    // As ggml (up to a sign flip of d and every q, which leaves all products unchanged):
    // multiplier 127 / amax, d = 1 / multiplier.
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let d = if amax != 0.0 { 1.0 / id } else { 0.0 };
    b[0..4].copy_from_slice(&d.to_le_bytes());
    let mut sums = [0i32; 16];
    for (j, &v) in x.iter().enumerate() {
        let q = ((v * id).round_ties_even() as i32).clamp(-127, 127);
        sums[j / 16] += q;
        b[4 + j] = q as i8 as u8;
    }
    for (g, s) in sums.iter().enumerate() {
        b[260 + 2 * g..262 + 2 * g].copy_from_slice(&(*s as i16).to_le_bytes());
    }
}

/// Simple (not error-optimising) Q4_K quantizer: per 32-element sub-block an asymmetric
/// (scale, min) pair, both re-quantized to 6 bits against super-block `d` / `dmin`.
fn q_q4k(x: &[f32], b: &mut [u8]) {
    let mut sc = [0f32; 8];
    let mut mn = [0f32; 8];
    for j in 0..8 {
        let (lo, hi) = min_max(&x[j * 32..j * 32 + 32]);
        let lo = lo.min(0.0);
        sc[j] = (hi - lo) / 15.0;
        mn[j] = -lo;
    }
    let max_sc = sc.iter().fold(0.0f32, |a, &v| a.max(v));
    let max_mn = mn.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = f16::from_f32(max_sc / 63.0).to_f32();
    let dmin = f16::from_f32(max_mn / 63.0).to_f32();
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // Round the scale up so the sub-block's range still fits in 0..=15.
        ls[j] = if d > 0.0 { ((sc[j] / d).ceil() as i32).clamp(0, 63) as u8 } else { 0 };
        lm[j] = if dmin > 0.0 { ((mn[j] / dmin).round() as i32).clamp(0, 63) as u8 } else { 0 };
    }
    wr_f16(b, 0, d);
    wr_f16(b, 2, dmin);
    let s = &mut b[4..16];
    for j in 0..4 {
        s[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
        s[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
        s[j + 8] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4);
    }
    let qs = &mut b[16..144];
    for chunk in 0..4 {
        let mut q = [[0u8; 32]; 2];
        for (k, qk) in q.iter_mut().enumerate() {
            let j = 2 * chunk + k;
            let dl = d * ls[j] as f32;
            let ml = dmin * lm[j] as f32;
            let id = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            for l in 0..32 {
                qk[l] = ((x[j * 32 + l] + ml) * id).round().clamp(0.0, 15.0) as u8;
            }
        }
        for l in 0..32 {
            qs[chunk * 32 + l] = q[0][l] | (q[1][l] << 4);
        }
    }
}

/// Simple Q6_K quantizer: per 16-element group a symmetric scale, re-quantized to i8 against
/// the super-block `d`.
fn q_q6k(x: &[f32], b: &mut [u8]) {
    let mut gs = [0f32; 16];
    for g in 0..16 {
        gs[g] = signed_absmax(&x[g * 16..g * 16 + 16]) / -32.0;
    }
    let max_abs = gs.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = f16::from_f32(max_abs / 127.0).to_f32();
    let mut sc = [0i8; 16];
    for g in 0..16 {
        sc[g] = if d > 0.0 { (gs[g] / d).round().clamp(-127.0, 127.0) as i8 } else { 0 };
    }
    let mut q = [0u8; QK_K];
    for g in 0..16 {
        let dl = d * sc[g] as f32;
        let id = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        for l in 0..16 {
            let v = (x[g * 16 + l] * id).round().clamp(-32.0, 31.0) as i32;
            q[g * 16 + l] = (v + 32) as u8;
        }
    }
    let (ql, rest) = b.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for half in 0..2 {
        let q = &q[half * 128..half * 128 + 128];
        for l in 0..32 {
            ql[half * 64 + l] = (q[l] & 0x0F) | ((q[l + 64] & 0x0F) << 4);
            ql[half * 64 + l + 32] = (q[l + 32] & 0x0F) | ((q[l + 96] & 0x0F) << 4);
            qh[half * 32 + l] =
                (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
        }
    }
    for g in 0..16 {
        rest[g] = sc[g] as u8;
    }
    wr_f16(rest, 16, d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_activation_quantizers_match_reference() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8K] {
            for trial in 0..50 {
                let n = 1024;
                let scale = [1.0f32, 1e-3, 50.0, 0.0][trial % 4];
                let mut x: Vec<f32> = (0..n).map(|_| next() * scale).collect();
                if trial % 5 == 0 {
                    // Exact ties: multiples of d / 2.
                    x.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 255) as f32 * 0.5 - 63.5);
                }
                let rb = ty.row_bytes(n).unwrap();
                let (mut a, mut b) = (vec![0u8; rb], vec![0u8; rb]);
                quantize_row(ty, &x, &mut a).unwrap();
                quantize_act(ty, &x, &mut b).unwrap();
                assert_eq!(a, b, "{ty} trial {trial}");
            }
        }
    }
}
