//! aarch64 NEON matmul kernel. Baseline Advanced SIMD only (no dotprod needed):
//! `smull`/`smull2` multiply 8 byte pairs into i16 and `sadalp` adds adjacent
//! pairs into i32 lanes, so lane pairs map to groups under the chunk layout
//! (see `crate::layout`); a final `addp` gives one i32 per group. 4-bit values
//! (<= 15) are used directly as signed bytes; 8-bit values use v = u - 128 with
//! the exact 128*Σq correction, as in the AVX2 kernel. Products fit i16
//! (|v*q| <= 128*127) and every sum fits i32.

use std::arch::aarch64::*;
use std::ops::Range;

use half::f16;

use super::{ActRow, Out, WRow};
use crate::layout::{CG, CHUNK, G, RowShape};
use crate::storage::RB;
use crate::{QActs, QMatrix};

/// NEON kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `super::run`; the CPU supports NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    let shape = *w.shape();
    for i in 0..a.m() {
        let act = ActRow::new(a, i);
        // Up to 4 rows of one storage block at a time, chunk by chunk, so the
        // weights are read in storage order (one sequential stream).
        let mut r = rows.start;
        while r < rows.end {
            let n = (rows.end - r).min(RB - r % RB);
            let wr: [WRow; RB] = std::array::from_fn(|k| WRow::new(w, r + k.min(n - 1)));
            // SAFETY: `wr[..n]` and `act` point at complete rows of shape `shape`.
            let y = unsafe {
                match (w.bits(), n) {
                    (4, 1) => row4::<1>(&wr, &shape, act),
                    (4, 2) => row4::<2>(&wr, &shape, act),
                    (4, 3) => row4::<3>(&wr, &shape, act),
                    (4, _) => row4::<4>(&wr, &shape, act),
                    (_, 1) => row8::<1>(&wr, &shape, act),
                    (_, 2) => row8::<2>(&wr, &shape, act),
                    (_, 3) => row8::<3>(&wr, &shape, act),
                    (_, _) => row8::<4>(&wr, &shape, act),
                }
            };
            for k in 0..n {
                // SAFETY: (i, r + k) is in bounds and owned by this call (caller contract).
                unsafe { out.write(i, r + k, y[k]) };
            }
            r += n;
        }
    }
}

/// `acc += pairwise(w[0..8] * q[0..8])`: lanes [b0+b1, b2+b3, b4+b5, b6+b7].
#[target_feature(enable = "neon")]
#[inline]
fn dot_lo(acc: int32x4_t, w: int8x16_t, q: int8x16_t) -> int32x4_t {
    vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(q)))
}

/// `acc += pairwise(w[8..16] * q[8..16])`.
#[target_feature(enable = "neon")]
#[inline]
fn dot_hi(acc: int32x4_t, w: int8x16_t, q: int8x16_t) -> int32x4_t {
    vpadalq_s16(acc, vmull_high_s8(w, q))
}

/// `Σ w*q` over 16 byte pairs added to `acc` (lanes mixed; for whole-group sums).
#[target_feature(enable = "neon")]
#[inline]
fn dot16(acc: int32x4_t, w: int8x16_t, q: int8x16_t) -> int32x4_t {
    dot_hi(dot_lo(acc, w, q), w, q)
}

/// Per-chunk scaling: `Σ_j s_j*(d_j*isum_j) + m_j*sd_j` over 8 groups.
///
/// # Safety
/// `sc`/`mn` point at the chunk's 8 scales and mins; groups g..g+8 exist in `a`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn scale8(
    sc: *const f16,
    mn: *const f16,
    a: ActRow,
    g: usize,
    lo: int32x4_t,
    hi: int32x4_t,
    acc: float32x4_t,
) -> float32x4_t {
    // SAFETY: 8 scales/mins readable; g + 8 <= groups of `a` (caller contract).
    unsafe {
        let s: [f32; 8] = std::array::from_fn(|j| sc.add(j).read_unaligned().to_f32());
        let m: [f32; 8] = std::array::from_fn(|j| mn.add(j).read_unaligned().to_f32());
        let mut acc = acc;
        for (h, v) in [(0, lo), (4, hi)] {
            let ds = vmulq_f32(vld1q_f32(s.as_ptr().add(h)), vld1q_f32(a.d.add(g + h)));
            acc = vfmaq_f32(acc, vcvtq_f32_s32(v), ds);
            acc = vfmaq_f32(
                acc,
                vld1q_f32(m.as_ptr().add(h)),
                vld1q_f32(a.sd.add(g + h)),
            );
        }
        acc
    }
}

/// Contribution of tail group `t` (activation group `g`) with integer sum `isum`.
///
/// # Safety
/// Both groups exist.
unsafe fn tail_term(w: WRow, t: usize, a: ActRow, g: usize, isum: i32) -> f32 {
    // SAFETY: t < tail groups of `w` and g < groups of `a` (caller contract).
    unsafe {
        let s = w.tail_sc(t).read_unaligned().to_f32();
        let m = w.tail_mn(t).read_unaligned().to_f32();
        s * (*a.d.add(g) * isum as f32) + m * *a.sd.add(g)
    }
}

/// `R` 4-bit weight rows against one activation row, chunk-major across the rows.
///
/// # Safety
/// `ws[..R]` and `a` point at complete rows of shape `shape`; CPU supports NEON.
#[target_feature(enable = "neon")]
unsafe fn row4<const R: usize>(ws: &[WRow; RB], shape: &RowShape, a: ActRow) -> [f32; RB] {
    let mask = vdupq_n_u8(0x0F);
    let mut accs = [vdupq_n_f32(0.0); R];
    let mut tails = [0.0f32; R];
    // SAFETY: chunk c reads bytes c*128..c*128+128 of the packed row, elements
    // c*256..c*256+256 of the activations and groups c*8..c*8+8; the tail
    // stays within `shape` (see `crate::layout`).
    unsafe {
        for c in 0..shape.chunks {
            for (w, acc) in ws.iter().zip(accs.iter_mut()) {
                let (wp, wsc, wmn) = w.chunk(c);
                let q = a.q.add(c * CHUNK);
                let z = vdupq_n_s32(0);
                let (mut a01, mut a23, mut a45, mut a67) = (z, z, z, z);
                for s in 0..4 {
                    for half in 0..2 {
                        let wb = vld1q_u8(wp.add(32 * s + 16 * half));
                        let lo = vreinterpretq_s8_u8(vandq_u8(wb, mask));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(wb));
                        let ql = vld1q_s8(q.add(32 * s + 16 * half));
                        let qh = vld1q_s8(q.add(32 * (s + 4) + 16 * half));
                        if half == 0 {
                            a01 = dot_lo(dot_lo(a01, lo, ql), hi, qh);
                            a23 = dot_hi(dot_hi(a23, lo, ql), hi, qh);
                        } else {
                            a45 = dot_lo(dot_lo(a45, lo, ql), hi, qh);
                            a67 = dot_hi(dot_hi(a67, lo, ql), hi, qh);
                        }
                    }
                }
                *acc = scale8(
                    wsc,
                    wmn,
                    a,
                    c * CG,
                    vpaddq_s32(a01, a23),
                    vpaddq_s32(a45, a67),
                    *acc,
                );
            }
        }
        for (w, tail) in ws.iter().zip(tails.iter_mut()) {
            let w = *w;
            let gt = shape.chunks * CG;
            let mut t = 0;
            while t + 1 < shape.tail {
                let g = gt + t;
                let wp = w.tail_data(t);
                let q = a.q.add(g * G);
                let (mut sa, mut sb) = (vdupq_n_s32(0), vdupq_n_s32(0));
                for h in 0..2 {
                    let wb = vld1q_u8(wp.add(16 * h));
                    let lo = vreinterpretq_s8_u8(vandq_u8(wb, mask));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(wb));
                    sa = dot16(sa, lo, vld1q_s8(q.add(16 * h)));
                    sb = dot16(sb, hi, vld1q_s8(q.add(G + 16 * h)));
                }
                *tail += tail_term(w, t, a, g, vaddvq_s32(sa))
                    + tail_term(w, t + 1, a, g + 1, vaddvq_s32(sb));
                t += 2;
            }
            if t < shape.tail {
                let g = gt + t;
                let wb = vld1q_u8(w.tail_data(t));
                let q = a.q.add(g * G);
                let lo = vreinterpretq_s8_u8(vandq_u8(wb, mask));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(wb));
                let s = dot16(
                    dot16(vdupq_n_s32(0), lo, vld1q_s8(q)),
                    hi,
                    vld1q_s8(q.add(16)),
                );
                *tail += tail_term(w, t, a, g, vaddvq_s32(s));
            }
        }
    }
    std::array::from_fn(|k| {
        if k < R {
            vaddvq_f32(accs[k]) + tails[k]
        } else {
            0.0
        }
    })
}

/// `R` 8-bit weight rows against one activation row, chunk-major across the rows.
///
/// # Safety
/// As for [`row4`].
#[target_feature(enable = "neon")]
unsafe fn row8<const R: usize>(ws: &[WRow; RB], shape: &RowShape, a: ActRow) -> [f32; RB] {
    let flip = vdupq_n_u8(0x80);
    let mut accs = [vdupq_n_f32(0.0); R];
    let mut tails = [0.0f32; R];
    // SAFETY: chunk c reads bytes (= elements) c*256..c*256+256 of both rows and
    // groups c*8..c*8+8; tail groups stay within `shape`.
    unsafe {
        for c in 0..shape.chunks {
            for (w, acc) in ws.iter().zip(accs.iter_mut()) {
                let (wp, wsc, wmn) = w.chunk(c);
                let q = a.q.add(c * CHUNK);
                let z = vdupq_n_s32(0);
                let (mut a01, mut a23, mut a45, mut a67) = (z, z, z, z);
                for s in 0..8 {
                    let w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wp.add(32 * s)), flip));
                    let w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wp.add(32 * s + 16)), flip));
                    let q0 = vld1q_s8(q.add(32 * s));
                    let q1 = vld1q_s8(q.add(32 * s + 16));
                    a01 = dot_lo(a01, w0, q0);
                    a23 = dot_hi(a23, w0, q0);
                    a45 = dot_lo(a45, w1, q1);
                    a67 = dot_hi(a67, w1, q1);
                }
                let g = c * CG;
                let corr = |h: usize| vshlq_n_s32::<7>(vld1q_s32(a.sumq.add(g + h)));
                let lo = vaddq_s32(vpaddq_s32(a01, a23), corr(0));
                let hi = vaddq_s32(vpaddq_s32(a45, a67), corr(4));
                *acc = scale8(wsc, wmn, a, g, lo, hi, *acc);
            }
        }
        for (w, tail) in ws.iter().zip(tails.iter_mut()) {
            let w = *w;
            for t in 0..shape.tail {
                let g = shape.chunks * CG + t;
                let wp = w.tail_data(t);
                let q = a.q.add(g * G);
                let w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wp), flip));
                let w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wp.add(16)), flip));
                let s = dot16(
                    dot16(vdupq_n_s32(0), w0, vld1q_s8(q)),
                    w1,
                    vld1q_s8(q.add(16)),
                );
                *tail += tail_term(w, t, a, g, vaddvq_s32(s) + (*a.sumq.add(g) << 7));
            }
        }
    }
    std::array::from_fn(|k| {
        if k < R {
            vaddvq_f32(accs[k]) + tails[k]
        } else {
            0.0
        }
    })
}
