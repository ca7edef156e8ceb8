//! AVX2 tile kernels: up to [`TILE_ROWS`] weight rows against up to [`TILE_TOKENS`] activation
//! rows, so each weight block is loaded and unpacked once per group of tokens and each
//! activation block once per group of rows (speculative verification, prefill; single tokens
//! too, see [`crate::matmul`]). Only reachable after run-time detection (see
//! [`crate::dot::dot_tile_fn`]).
//!
//! Every kernel has a second build for CPUs with AVX512-VNNI and AVX512-VL: 256-bit vectors
//! still, but `vpdpbusd` / `vpdpwssd` for the integer sums and 32 vector registers for the
//! 4 x 4 accumulator tiles. All integer block sums are exact in either build and every float
//! operation is the same, so both builds (and every tile shape, and the direct few-token path)
//! give the same bits.

#![allow(unsafe_op_in_unsafe_fn)]

use crate::avx2::{
    bits_to_bytes, hsum_ps, hsum8x8, k4_scales_mins, ld_f16, ld_f16x4, ld128, ld256, q8k_pair_sums, unpack_nibbles16,
};
use crate::dot::{TILE_ROWS, TILE_TOKENS, TileKernel, check_row};
use crate::types::GgmlType;
use std::arch::x86_64::*;
use std::sync::OnceLock;

type Out = [f32; TILE_ROWS * TILE_TOKENS];
const RB: usize = TILE_ROWS;

/// Whether the VNNI builds are used: AVX512-VNNI and AVX512-VL detected (once);
/// `SPECSWARM_KERNELS_NO_VNNI` disables them.
fn vnni() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var_os("SPECSWARM_KERNELS_NO_VNNI").is_none()
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

/// Legacy working layout for `nb` blocks of `RB` rows: unpacked operands `A[(blk * RB + r) * 32]`,
/// auxiliary vectors `AUX` (same shape), f32 scales `D[r * nb + blk]`, f32 mins `M` (same).
fn legacy_buf_len(nb: usize) -> usize {
    nb * RB * (64 + 8)
}

/// Per-token tables of the legacy kernels: `d` of every block, then (with `has_m`) `s`.
fn legacy_xprep(nb: usize, x: &[u8], xs: usize, nt: usize, xbs: usize, has_m: bool, xsc: &mut Vec<f32>) {
    let per = nb * if has_m { 2 } else { 1 };
    assert!(nt == 0 || (xs >= nb * xbs && x.len() >= (nt - 1) * xs + nb * xbs), "xprep: activation rows too short");
    xsc.clear();
    xsc.resize(nt * per, 0.0);
    for t in 0..nt {
        let row = &x[t * xs..];
        let dst = &mut xsc[t * per..(t + 1) * per];
        for i in 0..nb {
            let b = &row[i * xbs..];
            dst[i] = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            if has_m {
                dst[nb + i] = half::f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f32();
            }
        }
    }
}

/// Integer modes of the legacy tile kernel.
/// `U`: unpacked weights are u8 (Q4_1, Q5_1), products u8 x i8 directly.
/// `Q8`: weights are i8 (Q8_0): sign trick (AVX2) or activations offset by 128 with the row
/// correction `128 * sum(w)` taken off (VNNI).
/// Any other value `o`: weights unpacked to `w + o >= 0` (Q4_0: 8, Q5_0: 16) and the token
/// correction `o * sum(x)` taken off.
const U: u8 = 0;
const Q8: u8 = 128;

/// Unpack `R` rows of a legacy type into the working layout (rows from `r0`).
macro_rules! legacy_prep {
    ($vnni:expr, $R:ident, $nb:expr, $w:expr, $ws:expr, $buf:expr, $wbs:expr, $has_m:expr, $mode:expr, |$wb:ident| $prep:expr) => {{
        let (nb, w, ws, buf): (usize, *const u8, usize, *mut u8) = ($nb, $w, $ws, $buf);
        let zero = _mm256_setzero_si256();
        let off = _mm256_set1_epi8($mode as i8);
        let aux = buf.add(nb * RB * 32);
        let dd = buf.add(nb * RB * 64) as *mut f32;
        let mm = dd.add(nb * RB);
        for blk in 0..nb {
            for r in 0..$R {
                let $wb = w.add(r * ws + blk * $wbs);
                let q: __m256i = $prep;
                let o = (blk * RB + r) * 32;
                if $mode == Q8 {
                    if $vnni {
                        _mm256_storeu_si256(buf.add(o) as *mut __m256i, q);
                        let c = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, off, q));
                        _mm256_storeu_si256(aux.add(o) as *mut __m256i, c);
                    } else {
                        _mm256_storeu_si256(buf.add(o) as *mut __m256i, _mm256_sign_epi8(q, q));
                        _mm256_storeu_si256(aux.add(o) as *mut __m256i, q);
                    }
                } else {
                    _mm256_storeu_si256(buf.add(o) as *mut __m256i, q);
                }
                *dd.add(r * nb + blk) = ld_f16($wb);
                if $has_m {
                    *mm.add(r * nb + blk) = ld_f16($wb.add(2));
                }
            }
        }
    }};
}

/// Legacy 32-element block types, `R` rows x `T` tokens. With `$direct`, `$src` is the raw
/// weight rows (`$ws` bytes apart), unpacked here block by block (few tokens); otherwise it is
/// the working layout of [`legacy_prep!`] (rows from `$r0`) and `$xsc` the token tables.
///
/// Per (row, token) the float work is that of ggml's AVX2 `vec_dot` for the type, whichever the
/// source: one FMA per block of `d_w * d_x` times the block's eight lane sums into one 8-lane
/// accumulator, in block order, then its horizontal sum; for `(d, m)` types the `m * s`
/// products are accumulated with one scalar FMA per block in block order and added last.
macro_rules! legacy_tile {
    ($vnni:expr, $direct:expr, $R:ident, $T:ident, $nb:expr, $src:expr, $ws:expr, $r0:expr, $x:expr, $xs:expr,
     $xsc:expr, $out:expr, $wbs:expr, $xbs:expr, $xqo:expr, $has_m:expr, $mode:expr, |$wb:ident| $prep:expr) => {{
        let (nb, src, ws, r0, x, xs, xsc, out): (
            usize,
            *const u8,
            usize,
            usize,
            *const u8,
            usize,
            *const f32,
            &mut [f32],
        ) = ($nb, $src, $ws, $r0, $x, $xs, $xsc, $out);
        let xss = if $has_m { 2 * nb } else { nb };
        let zero = _mm256_setzero_si256();
        let ones = _mm256_set1_epi16(1);
        let off = _mm256_set1_epi8($mode as i8);
        // Working-layout regions (only dereferenced without `$direct`).
        let auxp = src.wrapping_add(nb * RB * 32);
        let dd = src.wrapping_add(nb * RB * 64) as *const f32;
        let mm = dd.wrapping_add(nb * RB);
        let mut acc = [[_mm256_setzero_ps(); $T]; $R];
        // `m * s` sums of token t, one lane per row, each lane one FMA per block in block
        // order (ggml's scalar `summs += m * s`, contracted to an FMA).
        let mut summ = [_mm_setzero_ps(); $T];
        let mut scs = [[[0.0f32; 4]; $T]; $R];
        // Weight operands of block `blk`: (operand, aux) per row; aux is the VNNI row
        // correction or, for the AVX2 Q8 sign trick, the signed weights.
        macro_rules! wops {
            ($blk:expr) => {{
                let mut a = [zero; $R];
                let mut aux = [zero; $R];
                for r in 0..$R {
                    if $direct {
                        let $wb = src.add(r * ws + $blk * $wbs);
                        let q: __m256i = $prep;
                        if $mode == Q8 {
                            if $vnni {
                                a[r] = q;
                                aux[r] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, off, q));
                            } else {
                                a[r] = _mm256_sign_epi8(q, q);
                                aux[r] = q;
                            }
                        } else {
                            a[r] = q;
                        }
                    } else {
                        let o = ($blk * RB + r0 + r) * 32;
                        a[r] = ld256(src.add(o));
                        if $mode == Q8 {
                            aux[r] = ld256(auxp.add(o));
                        }
                    }
                }
                (a, aux)
            }};
        }
        // Activation block of token t, prepared for the mode: (operand, token correction).
        macro_rules! act {
            ($xp:expr) => {{
                let xv = ld256($xp.add($xqo));
                if $mode == Q8 {
                    (if $vnni { _mm256_xor_si256(xv, off) } else { xv }, zero)
                } else if $mode == U {
                    (xv, zero)
                } else if $vnni {
                    (xv, _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, off, xv)))
                } else {
                    (xv, _mm256_madd_epi16(_mm256_maddubs_epi16(off, xv), ones))
                }
            }};
        }
        // Exact i32 sums of four products per lane.
        macro_rules! isum {
            ($a:expr, $aux:expr, $xv:expr, $tc:expr) => {{
                if $mode == Q8 {
                    if $vnni {
                        _mm256_dpbusd_epi32($aux, $xv, $a)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16($a, _mm256_sign_epi8($xv, $aux)), ones)
                    }
                } else if $mode == U {
                    if $vnni {
                        _mm256_dpbusd_epi32(zero, $a, $xv)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16($a, $xv), ones)
                    }
                } else if $vnni {
                    _mm256_dpbusd_epi32($tc, $a, $xv)
                } else {
                    _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16($a, $xv), ones), $tc)
                }
            }};
        }
        // f32 scales: weight (d, m) of row r, activation (d, s) of token t, blocks i..i+4.
        macro_rules! wsc4 {
            ($r:expr, $i:expr) => {{
                if $direct {
                    let wp = src.add($r * ws + $i * $wbs);
                    (ld_f16x4(wp, $wbs), if $has_m { ld_f16x4(wp.add(2), $wbs) } else { _mm_setzero_ps() })
                } else {
                    let o = (r0 + $r) * nb + $i;
                    (_mm_loadu_ps(dd.add(o)), if $has_m { _mm_loadu_ps(mm.add(o)) } else { _mm_setzero_ps() })
                }
            }};
        }
        macro_rules! xsc4 {
            ($t:expr, $i:expr) => {{
                if $direct {
                    let xp = x.add($t * xs + $i * $xbs);
                    (ld_f16x4(xp, $xbs), if $has_m { ld_f16x4(xp.add(2), $xbs) } else { _mm_setzero_ps() })
                } else {
                    let o = $t * xss + $i;
                    (_mm_loadu_ps(xsc.add(o)), if $has_m { _mm_loadu_ps(xsc.add(o + nb)) } else { _mm_setzero_ps() })
                }
            }};
        }
        let mut i = 0;
        while i + 4 <= nb {
            if $direct && $T == 1 {
                // Streaming one token (decode): fetch the same stretch of the next row group.
                for r in 0..$R {
                    let p = src.wrapping_add(($R + r) * ws + i * $wbs) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(p);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * $wbs - 1));
                }
            }
            let mut wd = [(_mm_setzero_ps(), _mm_setzero_ps()); $R];
            for r in 0..$R {
                wd[r] = wsc4!(r, i);
            }
            // Weight mins of the four blocks as columns over the rows (a 4 x 4 transpose).
            let mcol = if $has_m {
                let mut m = [_mm_setzero_ps(); 4];
                for r in 0..$R {
                    m[r] = wd[r].1;
                }
                let (t0, t1) = (_mm_unpacklo_ps(m[0], m[1]), _mm_unpacklo_ps(m[2], m[3]));
                let (t2, t3) = (_mm_unpackhi_ps(m[0], m[1]), _mm_unpackhi_ps(m[2], m[3]));
                [_mm_movelh_ps(t0, t1), _mm_movehl_ps(t1, t0), _mm_movelh_ps(t2, t3), _mm_movehl_ps(t3, t2)]
            } else {
                [_mm_setzero_ps(); 4]
            };
            for t in 0..$T {
                let (xd, xm) = xsc4!(t, i);
                for r in 0..$R {
                    _mm_storeu_ps(scs[r][t].as_mut_ptr(), _mm_mul_ps(wd[r].0, xd));
                }
                if $has_m {
                    let mut sm = summ[t];
                    sm = _mm_fmadd_ps(mcol[0], _mm_shuffle_ps::<0x00>(xm, xm), sm);
                    sm = _mm_fmadd_ps(mcol[1], _mm_shuffle_ps::<0x55>(xm, xm), sm);
                    sm = _mm_fmadd_ps(mcol[2], _mm_shuffle_ps::<0xAA>(xm, xm), sm);
                    summ[t] = _mm_fmadd_ps(mcol[3], _mm_shuffle_ps::<0xFF>(xm, xm), sm);
                }
            }
            for k in 0..4 {
                let (a, aux) = wops!(i + k);
                for t in 0..$T {
                    let (xv, tc) = act!(x.add(t * xs + (i + k) * $xbs));
                    for r in 0..$R {
                        let p = _mm256_cvtepi32_ps(isum!(a[r], aux[r], xv, tc));
                        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scs[r][t][k]), p, acc[r][t]);
                    }
                }
            }
            i += 4;
        }
        while i < nb {
            let (a, aux) = wops!(i);
            for t in 0..$T {
                let xb = x.add(t * xs + i * $xbs);
                let (xv, tc) = act!(xb);
                let (dx, sx) = if $direct {
                    (ld_f16(xb), if $has_m { ld_f16(xb.add(2)) } else { 0.0 })
                } else {
                    (*xsc.add(t * xss + i), if $has_m { *xsc.add(t * xss + nb + i) } else { 0.0 })
                };
                let mut mw = [0.0f32; 4];
                for r in 0..$R {
                    let p = _mm256_cvtepi32_ps(isum!(a[r], aux[r], xv, tc));
                    let dw = if $direct {
                        let wb = src.add(r * ws + i * $wbs);
                        if $has_m {
                            mw[r] = ld_f16(wb.add(2));
                        }
                        ld_f16(wb)
                    } else {
                        let o = (r0 + r) * nb + i;
                        if $has_m {
                            mw[r] = *mm.add(o);
                        }
                        *dd.add(o)
                    };
                    acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), p, acc[r][t]);
                }
                if $has_m {
                    summ[t] = _mm_fmadd_ps(_mm_loadu_ps(mw.as_ptr()), _mm_set1_ps(sx), summ[t]);
                }
            }
            i += 1;
        }
        for t in 0..$T {
            let mut m = [0.0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), summ[t]);
            for r in 0..$R {
                // As ggml: horizontal sum of the accumulator, then the `m * s` sum.
                out[r * TILE_TOKENS + t] = hsum_ps(acc[r][t]) + m[r];
            }
        }
    }};
}

/// A legacy type's tile kernel in both builds (AVX2 and AVX-VNNI).
macro_rules! legacy_kernel {
    ($ty:expr, $wbs:expr, $xbs:expr, $xqo:expr, $has_m:expr, $mode:expr, |$wb:ident| $prep:expr) => {{
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep_t<const R: usize>(nb: usize, w: *const u8, ws: usize, buf: *mut u8) {
            legacy_prep!(false, R, nb, w, ws, buf, $wbs, $has_m, $mode, |$wb| $prep)
        }
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        unsafe fn prep_v<const R: usize>(nb: usize, w: *const u8, ws: usize, buf: *mut u8) {
            legacy_prep!(true, R, nb, w, ws, buf, $wbs, $has_m, $mode, |$wb| $prep)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_t<const D: bool, const R: usize, const T: usize>(
            nb: usize,
            src: *const u8,
            ws: usize,
            r0: usize,
            x: *const u8,
            xs: usize,
            xsc: *const f32,
            out: &mut [f32],
        ) {
            legacy_tile!(false, D, R, T, nb, src, ws, r0, x, xs, xsc, out, $wbs, $xbs, $xqo, $has_m, $mode, |$wb| $prep)
        }
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_v<const D: bool, const R: usize, const T: usize>(
            nb: usize,
            src: *const u8,
            ws: usize,
            r0: usize,
            x: *const u8,
            xs: usize,
            xsc: *const f32,
            out: &mut [f32],
        ) {
            legacy_tile!(true, D, R, T, nb, src, ws, r0, x, xs, xsc, out, $wbs, $xbs, $xqo, $has_m, $mode, |$wb| $prep)
        }
        /// Run the tile bodies over `nr` rows (`D`: raw rows `ws` apart, else the working layout).
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<const D: bool>(
            nb: usize,
            b: *const u8,
            ws: usize,
            nr: usize,
            x: *const u8,
            xs: usize,
            xsc: *const f32,
            nt: usize,
            out: &mut Out,
        ) {
            macro_rules! go {
                ($R:expr, $src:expr, $r0:expr, $o:expr) => {
                    match (nt, vnni()) {
                        (1, true) => tile_v::<D, $R, 1>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (2, true) => tile_v::<D, $R, 2>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (3, true) => tile_v::<D, $R, 3>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (_, true) => tile_v::<D, $R, 4>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (1, false) => tile_t::<D, $R, 1>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (2, false) => tile_t::<D, $R, 2>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (3, false) => tile_t::<D, $R, 3>(nb, $src, ws, $r0, x, xs, xsc, $o),
                        (_, false) => tile_t::<D, $R, 4>(nb, $src, ws, $r0, x, xs, xsc, $o),
                    }
                };
            }
            if nr == RB {
                go!(RB, b, 0, &mut out[..])
            } else {
                for r in 0..nr {
                    let src = if D { b.add(r * ws) } else { b };
                    go!(1, src, r, &mut out[r * TILE_TOKENS..])
                }
            }
        }
        fn prep(n: usize, w: &[u8], ws: usize, nr: usize, buf: &mut Vec<u8>) {
            assert!((1..=RB).contains(&nr), "tile prep: {nr} rows");
            assert!(n % 32 == 0, "tile prep: {n} elements");
            let nb = n / 32;
            let wrb = nb * $wbs;
            assert!(ws >= wrb && w.len() >= (nr - 1) * ws + wrb, "tile prep: weight rows too short");
            // Every byte the tile kernel reads for these rows is written below: no clearing.
            if buf.len() < legacy_buf_len(nb) {
                buf.resize(legacy_buf_len(nb), 0);
            }
            let (w, b) = (w.as_ptr(), buf.as_mut_ptr());
            // SAFETY: lengths checked above; avx2/fma/f16c (and avx512vl, avx512vnni) detected at run time.
            unsafe {
                match (nr == RB, vnni()) {
                    (true, true) => prep_v::<RB>(nb, w, ws, b),
                    (true, false) => prep_t::<RB>(nb, w, ws, b),
                    (false, v) => {
                        // The 1-row prep fills row 0 of the layout: last rows first, each moved
                        // to its place before row 0 is reused.
                        for r in (0..nr).rev() {
                            let wr = w.add(r * ws);
                            if v {
                                prep_v::<1>(nb, wr, ws, b)
                            } else {
                                prep_t::<1>(nb, wr, ws, b)
                            }
                            if r > 0 {
                                move_row(nb, b, r);
                            }
                        }
                    }
                }
            }
        }
        fn xprep(n: usize, x: &[u8], xs: usize, nt: usize, xsc: &mut Vec<f32>) {
            legacy_xprep(n / 32, x, xs, nt, $xbs, $has_m, xsc);
        }
        #[allow(clippy::too_many_arguments)]
        fn tile(n: usize, buf: &[u8], nr: usize, x: &[u8], xs: usize, xsc: &[f32], nt: usize, out: &mut Out) {
            assert!((1..=RB).contains(&nr) && (1..=TILE_TOKENS).contains(&nt), "tile kernel: {nr}x{nt}");
            assert!(n % 32 == 0, "tile kernel: {n} elements");
            let nb = n / 32;
            let xss = if $has_m { 2 * nb } else { nb };
            assert!(buf.len() >= legacy_buf_len(nb), "tile kernel: working buffer too short");
            assert!(xs >= nb * $xbs && x.len() >= (nt - 1) * xs + nb * $xbs, "tile kernel: activations too short");
            assert!(xsc.len() >= nt * xss, "tile kernel: activation scales too short");
            // SAFETY: lengths checked above; avx2/fma/f16c (and avx512vl, avx512vnni) detected at run time.
            unsafe { run::<false>(nb, buf.as_ptr(), 0, nr, x.as_ptr(), xs, xsc.as_ptr(), nt, out) }
        }
        #[allow(clippy::too_many_arguments)]
        fn direct(n: usize, w: &[u8], ws: usize, nr: usize, x: &[u8], xs: usize, nt: usize, out: &mut Out) {
            assert!((1..=RB).contains(&nr) && (1..=TILE_TOKENS).contains(&nt), "tile kernel: {nr}x{nt}");
            assert!(n % 32 == 0, "tile kernel: {n} elements");
            let nb = n / 32;
            assert!(ws >= nb * $wbs && w.len() >= (nr - 1) * ws + nb * $wbs, "tile kernel: weight rows too short");
            assert!(xs >= nb * $xbs && x.len() >= (nt - 1) * xs + nb * $xbs, "tile kernel: activations too short");
            // SAFETY: lengths checked above; avx2/fma/f16c (and avx512vl, avx512vnni) detected at run time.
            unsafe { run::<true>(nb, w.as_ptr(), ws, nr, x.as_ptr(), xs, std::ptr::null(), nt, out) }
        }
        TileKernel { prep, xprep, tile, direct }
    }};
}

/// Move row 0 of a legacy working layout to row `r` (partial row groups).
unsafe fn move_row(nb: usize, b: *mut u8, r: usize) {
    for blk in 0..nb {
        for region in 0..2 {
            let base = region * nb * RB * 32;
            std::ptr::copy_nonoverlapping(b.add(base + blk * RB * 32), b.add(base + (blk * RB + r) * 32), 32);
        }
    }
    for region in 0..2 {
        let f = (b.add(nb * RB * 64) as *mut f32).add(region * nb * RB);
        std::ptr::copy_nonoverlapping(f, f.add(r * nb), nb);
    }
}

/// Bytes per (block, row) slot of the K-quant working layout: 8 unpacked 32-byte operands, 8
/// i16 scale vectors, one extra vector (Q4_K: mins as i32, Q6_K: the 16 scales as i16), then
/// the f32 `d` and `dmin`.
const KS: usize = 576;

/// Q4_K block at `wb` unpacked: (operands, i16 scales, mins, d, dmin).
macro_rules! q4k_unpack {
    ($wb:expr) => {{
        let wb: *const u8 = $wb;
        let m4 = _mm256_set1_epi8(0x0F);
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
        (q, s, mins, ld_f16(wb), ld_f16(wb.add(2)))
    }};
}

/// Q6_K block at `wb` unpacked: (operands 0..63, i16 scale pairs, 16 scales as i16, d, 0).
macro_rules! q6k_unpack {
    ($wb:expr) => {{
        let wb: *const u8 = $wb;
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let ql0 = ld256(wb.add(64 * h));
            let ql1 = ld256(wb.add(64 * h + 32));
            let qh = ld256(wb.add(128 + 32 * h));
            let hb = |v: __m256i| _mm256_slli_epi16(_mm256_and_si256(v, m2), 4);
            q[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), hb(qh));
            q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), hb(_mm256_srli_epi16(qh, 2)));
            q[4 * h + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), hb(_mm256_srli_epi16(qh, 4)));
            q[4 * h + 3] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), hb(_mm256_srli_epi16(qh, 6)));
            let sc = wb.add(192 + 8 * h) as *const i8;
            for k in 0..4 {
                s[4 * h + k] =
                    _mm256_set_m128i(_mm_set1_epi16(*sc.add(2 * k + 1) as i16), _mm_set1_epi16(*sc.add(2 * k) as i16));
            }
        }
        (q, s, _mm256_cvtepi8_epi16(ld128(wb.add(192))), ld_f16(wb.add(208)), 0.0f32)
    }};
}

/// K-quant tiles (Q4_K, Q6_K): `R` rows of the working layout (from `r0`) x `T` tokens. Per
/// (row, token) the float work is that of ggml on AVX2: Q6_K as `ggml_vec_dot_q6_K_q8_K` (per
/// block one 8-lane FMA of `x_d * d` with the exact integer lane sums, lane = byte position / 4
/// within each 32-byte group), Q4_K as ggml's repacked 8x8 kernels (see `q4k_m`); the integer
/// sums may be formed in any order.
macro_rules! kq_tile {
    ($vnni:expr, $is_q4k:expr, $R:ident, $T:ident, $nb:expr, $buf:expr, $r0:expr, $x:expr, $xs:expr, $out:expr) => {{
        let (nb, buf, r0, x, xs, out): (usize, *const u8, usize, *const u8, usize, &mut [f32]) =
            ($nb, $buf, $r0, $x, $xs, $out);
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); $T]; $R];
        // Q4_K: scalar chains over the blocks' exact integer totals (see `q4k_m`).
        let mut accs = [[0.0f32; $T]; $R];
        let mut accms = [[0.0f32; $T]; $R];
        for blk in 0..nb {
            let slot = |r: usize| buf.add((blk * RB + r0 + r) * KS);
            let xblk = |t: usize| x.add(t * xs + blk * 292);
            let mut sumi = [[zero; $T]; $R];
            let mut pms = [zero; 16];
            let mut dmins = [0.0f32; $R];
            let mut xd = [0.0f32; $T];
            for t in 0..$T {
                xd[t] = (xblk(t) as *const f32).read_unaligned();
            }
            for r in 0..$R {
                let extra = ld256(slot(r).add(512));
                let dmin = (slot(r).add(548) as *const f32).read_unaligned();
                for t in 0..$T {
                    if $is_q4k {
                        pms[r * $T + t] = _mm256_mullo_epi32(extra, q8k_pair_sums(xblk(t)));
                        dmins[r] = dmin;
                    } else {
                        // The -32 offset: sum_g sc_g * (-32) * bsum_g.
                        let corr = _mm256_madd_epi16(extra, ld256(xblk(t).add(260)));
                        sumi[r][t] = _mm256_sub_epi32(zero, _mm256_slli_epi32(corr, 5));
                    }
                }
            }
            for j in 0..8 {
                let mut q = [zero; $R];
                let mut s = [zero; $R];
                for r in 0..$R {
                    q[r] = ld256(slot(r).add(32 * j));
                    s[r] = ld256(slot(r).add(256 + 32 * j));
                }
                for t in 0..$T {
                    let xv = ld256(xblk(t).add(4 + 32 * j));
                    for r in 0..$R {
                        let p = _mm256_maddubs_epi16(q[r], xv);
                        sumi[r][t] = if $vnni {
                            _mm256_dpwssd_epi32(sumi[r][t], p, s[r])
                        } else {
                            _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(p, s[r]))
                        };
                    }
                }
            }
            if $is_q4k {
                // Integer totals of every (row, token): products, then mins.
                let mut v = [zero; 16];
                for r in 0..$R {
                    for t in 0..$T {
                        v[r * $T + t] = sumi[r][t];
                    }
                }
                let mut tot = [0i32; 16];
                let mut totm = [0i32; 16];
                for h in 0..($R * $T).div_ceil(8) {
                    let a: &[__m256i; 8] = v[8 * h..8 * h + 8].try_into().expect("8 vectors");
                    let m: &[__m256i; 8] = pms[8 * h..8 * h + 8].try_into().expect("8 vectors");
                    _mm256_storeu_si256(tot.as_mut_ptr().add(8 * h) as *mut __m256i, hsum8x8(a));
                    _mm256_storeu_si256(totm.as_mut_ptr().add(8 * h) as *mut __m256i, hsum8x8(m));
                }
                for r in 0..$R {
                    let dw = (slot(r).add(544) as *const f32).read_unaligned();
                    for t in 0..$T {
                        let k = r * $T + t;
                        accs[r][t] = (tot[k] as f32).mul_add(xd[t] * dw, accs[r][t]);
                        accms[r][t] = (totm[k] as f32).mul_add(xd[t] * dmins[r], accms[r][t]);
                    }
                }
            } else {
                for r in 0..$R {
                    let dw = (slot(r).add(544) as *const f32).read_unaligned();
                    for t in 0..$T {
                        acc[r][t] =
                            _mm256_fmadd_ps(_mm256_set1_ps(xd[t] * dw), _mm256_cvtepi32_ps(sumi[r][t]), acc[r][t]);
                    }
                }
            }
        }
        for r in 0..$R {
            for t in 0..$T {
                out[r * TILE_TOKENS + t] = if $is_q4k { accs[r][t] - accms[r][t] } else { hsum_ps(acc[r][t]) };
            }
        }
    }};
}

/// Q4_K / Q6_K tile kernels (working layout of [`KS`]-byte slots; AVX2 and AVX-VNNI builds);
/// the direct path runs the one-row multi-token bodies.
macro_rules! kq_kernel {
    ($ty:expr, $wbs:expr, $is_q4k:expr, $unpack:ident, $body:ident) => {{
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep_r(nb: usize, w: *const u8, buf: *mut u8, r: usize) {
            for blk in 0..nb {
                let (q, s, extra, d, dmin) = $unpack!(w.add(blk * $wbs));
                let sl = buf.add((blk * RB + r) * KS);
                for j in 0..8 {
                    _mm256_storeu_si256(sl.add(32 * j) as *mut __m256i, q[j]);
                    _mm256_storeu_si256(sl.add(256 + 32 * j) as *mut __m256i, s[j]);
                }
                _mm256_storeu_si256(sl.add(512) as *mut __m256i, extra);
                (sl.add(544) as *mut f32).write_unaligned(d);
                (sl.add(548) as *mut f32).write_unaligned(dmin);
            }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn tile_t<const R: usize, const T: usize>(
            nb: usize,
            buf: *const u8,
            r0: usize,
            x: *const u8,
            xs: usize,
            out: &mut [f32],
        ) {
            kq_tile!(false, $is_q4k, R, T, nb, buf, r0, x, xs, out)
        }
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        unsafe fn tile_v<const R: usize, const T: usize>(
            nb: usize,
            buf: *const u8,
            r0: usize,
            x: *const u8,
            xs: usize,
            out: &mut [f32],
        ) {
            kq_tile!(true, $is_q4k, R, T, nb, buf, r0, x, xs, out)
        }
        fn prep(n: usize, w: &[u8], ws: usize, nr: usize, buf: &mut Vec<u8>) {
            assert!((1..=RB).contains(&nr), "tile prep: {nr} rows");
            assert!(n % 256 == 0, "tile prep: {n} elements");
            let nb = n / 256;
            let wrb = nb * $wbs;
            assert!(ws >= wrb && w.len() >= (nr - 1) * ws + wrb, "tile prep: weight rows too short");
            // Every byte the tile kernel reads for these rows is written below: no clearing.
            if buf.len() < nb * RB * KS {
                buf.resize(nb * RB * KS, 0);
            }
            for r in 0..nr {
                // SAFETY: lengths checked above; avx2/fma/f16c detected at run time.
                unsafe { prep_r(nb, w[r * ws..].as_ptr(), buf.as_mut_ptr(), r) };
            }
        }
        fn xprep(_: usize, _: &[u8], _: usize, _: usize, xsc: &mut Vec<f32>) {
            xsc.clear();
        }
        #[allow(clippy::too_many_arguments)]
        fn tile(n: usize, buf: &[u8], nr: usize, x: &[u8], xs: usize, _: &[f32], nt: usize, out: &mut Out) {
            assert!((1..=RB).contains(&nr) && (1..=TILE_TOKENS).contains(&nt), "tile kernel: {nr}x{nt}");
            assert!(n % 256 == 0, "tile kernel: {n} elements");
            let nb = n / 256;
            assert!(buf.len() >= nb * RB * KS, "tile kernel: working buffer too short");
            assert!(xs >= nb * 292 && x.len() >= (nt - 1) * xs + nb * 292, "tile kernel: activations too short");
            let (b, x) = (buf.as_ptr(), x.as_ptr());
            macro_rules! go {
                ($R:expr, $r0:expr, $o:expr) => {
                    match (nt, vnni()) {
                        (1, true) => tile_v::<$R, 1>(nb, b, $r0, x, xs, $o),
                        (2, true) => tile_v::<$R, 2>(nb, b, $r0, x, xs, $o),
                        (3, true) => tile_v::<$R, 3>(nb, b, $r0, x, xs, $o),
                        (_, true) => tile_v::<$R, 4>(nb, b, $r0, x, xs, $o),
                        (1, false) => tile_t::<$R, 1>(nb, b, $r0, x, xs, $o),
                        (2, false) => tile_t::<$R, 2>(nb, b, $r0, x, xs, $o),
                        (3, false) => tile_t::<$R, 3>(nb, b, $r0, x, xs, $o),
                        (_, false) => tile_t::<$R, 4>(nb, b, $r0, x, xs, $o),
                    }
                };
            }
            // SAFETY: lengths checked above; avx2/fma/f16c (and avx512vl, avx512vnni) detected at run time.
            unsafe {
                if nr == RB {
                    go!(RB, 0, &mut out[..])
                } else {
                    for r in 0..nr {
                        go!(1, r, &mut out[r * TILE_TOKENS..])
                    }
                }
            }
        }
        #[allow(clippy::too_many_arguments)]
        fn direct(n: usize, w: &[u8], ws: usize, nr: usize, x: &[u8], xs: usize, nt: usize, out: &mut Out) {
            assert!((1..=RB).contains(&nr) && (1..=TILE_TOKENS).contains(&nt), "tile kernel: {nr}x{nt}");
            let nb = check_row($ty, n, w, x);
            let wrb = nb * $wbs;
            assert!(ws >= wrb && w.len() >= (nr - 1) * ws + wrb, "tile kernel: weight rows too short");
            assert!(xs >= nb * 292 && x.len() >= (nt - 1) * xs + nb * 292, "tile kernel: activations too short");
            for r in 0..nr {
                let (wp, xp, o) = (w[r * ws..].as_ptr(), x.as_ptr(), &mut out[r * TILE_TOKENS..r * TILE_TOKENS + nt]);
                // SAFETY: lengths checked above; avx2/fma/f16c detected at run time.
                unsafe {
                    match nt {
                        1 => $body::<1>(nb, wp, xp, xs, o),
                        2 => $body::<2>(nb, wp, xp, xs, o),
                        3 => $body::<3>(nb, wp, xp, xs, o),
                        _ => $body::<4>(nb, wp, xp, xs, o),
                    }
                }
            }
        }
        TileKernel { prep, xprep, tile, direct }
    }};
}

/// K-quant tiles: the working layout is the raw rows (back to back); rows go one after another
/// through the one-row multi-token bodies.
macro_rules! k_kernel {
    ($ty:expr, $wbs:expr, $body:ident) => {{
        fn prep(n: usize, w: &[u8], ws: usize, nr: usize, buf: &mut Vec<u8>) {
            assert!((1..=RB).contains(&nr), "tile prep: {nr} rows");
            assert!(n % 256 == 0, "tile prep: {n} elements");
            let wrb = n / 256 * $wbs;
            buf.clear();
            for r in 0..nr {
                buf.extend_from_slice(&w[r * ws..r * ws + wrb]);
            }
        }
        fn xprep(_: usize, _: &[u8], _: usize, _: usize, xsc: &mut Vec<f32>) {
            xsc.clear();
        }
        #[allow(clippy::too_many_arguments)]
        fn tile(n: usize, buf: &[u8], nr: usize, x: &[u8], xs: usize, _: &[f32], nt: usize, out: &mut Out) {
            assert!((1..=RB).contains(&nr) && (1..=TILE_TOKENS).contains(&nt), "tile kernel: {nr}x{nt}");
            let nb = check_row($ty, n, buf, x);
            let wrb = nb * $wbs;
            assert!(buf.len() >= nr * wrb, "tile kernel: working buffer too short");
            assert!(xs >= nb * 292 && x.len() >= (nt - 1) * xs + nb * 292, "tile kernel: activations too short");
            for r in 0..nr {
                let (w, xp, o) = (buf[r * wrb..].as_ptr(), x.as_ptr(), &mut out[r * TILE_TOKENS..r * TILE_TOKENS + nt]);
                // SAFETY: lengths checked above; avx2/fma/f16c detected at run time.
                unsafe {
                    match nt {
                        1 => $body::<1>(nb, w, xp, xs, o),
                        2 => $body::<2>(nb, w, xp, xs, o),
                        3 => $body::<3>(nb, w, xp, xs, o),
                        _ => $body::<4>(nb, w, xp, xs, o),
                    }
                }
            }
        }
        #[allow(clippy::too_many_arguments)]
        fn direct(n: usize, w: &[u8], ws: usize, nr: usize, x: &[u8], xs: usize, nt: usize, out: &mut Out) {
            assert!((1..=RB).contains(&nr) && (1..=TILE_TOKENS).contains(&nt), "tile kernel: {nr}x{nt}");
            let nb = check_row($ty, n, w, x);
            let wrb = nb * $wbs;
            assert!(ws >= wrb && w.len() >= (nr - 1) * ws + wrb, "tile kernel: weight rows too short");
            assert!(xs >= nb * 292 && x.len() >= (nt - 1) * xs + nb * 292, "tile kernel: activations too short");
            for r in 0..nr {
                let (wp, xp, o) = (w[r * ws..].as_ptr(), x.as_ptr(), &mut out[r * TILE_TOKENS..r * TILE_TOKENS + nt]);
                // SAFETY: lengths checked above; avx2/fma/f16c detected at run time.
                unsafe {
                    match nt {
                        1 => $body::<1>(nb, wp, xp, xs, o),
                        2 => $body::<2>(nb, wp, xp, xs, o),
                        3 => $body::<3>(nb, wp, xp, xs, o),
                        _ => $body::<4>(nb, wp, xp, xs, o),
                    }
                }
            }
        }
        TileKernel { prep, xprep, tile, direct }
    }};
}

pub(crate) fn dot_tile_fn(ty: GgmlType) -> Option<TileKernel> {
    Some(match ty {
        GgmlType::Q8_0 => legacy_kernel!(GgmlType::Q8_0, 34, 34, 2, false, Q8, |wb| ld256(wb.add(2))),
        GgmlType::Q4_0 => legacy_kernel!(GgmlType::Q4_0, 18, 34, 2, false, 8, |wb| unpack_nibbles16(wb.add(2))),
        GgmlType::Q4_1 => legacy_kernel!(GgmlType::Q4_1, 20, 36, 4, true, U, |wb| unpack_nibbles16(wb.add(4))),
        GgmlType::Q5_0 => legacy_kernel!(GgmlType::Q5_0, 22, 34, 2, false, 16, |wb| {
            let qh = (wb.add(2) as *const u32).read_unaligned();
            _mm256_or_si256(unpack_nibbles16(wb.add(6)), _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)))
        }),
        GgmlType::Q5_1 => legacy_kernel!(GgmlType::Q5_1, 24, 36, 4, true, U, |wb| {
            let qh = (wb.add(4) as *const u32).read_unaligned();
            _mm256_or_si256(unpack_nibbles16(wb.add(8)), _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)))
        }),
        GgmlType::Q4K => kq_kernel!(GgmlType::Q4K, 144, true, q4k_unpack, q4k_m),
        GgmlType::Q5K => k_kernel!(GgmlType::Q5K, 176, q5k_m),
        GgmlType::Q6K => kq_kernel!(GgmlType::Q6K, 210, false, q6k_unpack, q6k_m),
        _ => return None,
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_m<const T: usize>(nb: usize, w: *const u8, x: *const u8, stride: usize, out: &mut [f32]) {
    // As ggml's repacked Q4_K kernels (gemv/gemm 8x8, used for Q4_K on AVX2): per block the
    // exact integer totals of the scaled products and of the mins, then one scalar FMA each
    // with `d_w * d_x` and `dmin_w * d_x`; the result is the difference of the two chains.
    let mut acc = [0.0f32; T];
    let mut accm = [0.0f32; T];
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
        // Lanes 0..T: product totals of each token, lanes 4..4+T: mins totals.
        let mut v = [_mm256_setzero_si256(); 8];
        let mut xd = [0.0f32; T];
        for t in 0..T {
            let xb = x.add(t * stride + i * 292);
            xd[t] = (xb as *const f32).read_unaligned();
            v[4 + t] = _mm256_mullo_epi32(mins, q8k_pair_sums(xb));
            let mut sumi = _mm256_setzero_si256();
            for j in 0..8 {
                let p = _mm256_maddubs_epi16(q[j], ld256(xb.add(4 + 32 * j)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s[j]));
            }
            v[t] = sumi;
        }
        let mut tot = [0i32; 8];
        _mm256_storeu_si256(tot.as_mut_ptr() as *mut __m256i, hsum8x8(&v));
        for t in 0..T {
            acc[t] = (tot[t] as f32).mul_add(xd[t] * dw, acc[t]);
            accm[t] = (tot[4 + t] as f32).mul_add(xd[t] * dminw, accm[t]);
        }
    }
    for t in 0..T {
        out[t] = acc[t] - accm[t];
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
