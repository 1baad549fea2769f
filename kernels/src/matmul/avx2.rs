//! AVX2 matmul kernel (for x86 CPUs without AVX-512 VNNI). `vpmaddubsw`
//! multiplies unsigned weight bytes by signed activation bytes into i16 pair
//! sums and `vpmaddwd` by ones widens them to i32, giving the same lane-per-group
//! sums as `vpdpbusd` under the chunk layout (see `crate::layout`).
//!
//! Saturation: for 4-bit weights a pair sum is at most 2*15*127 = 3810, so the
//! eight slices of a chunk are added in i16 (<= 30480) before one widening.
//!
//! The engine's matrices are in row panels (`QMatrix::repack`), and 8-bit
//! ones always get a panel copy: both run in `avx2_panel`. The row-storage
//! kernel here serves 4-bit matrices that were not repacked.

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::{ActRow, Out, WRow, tiles};
use crate::layout::{CG, CHUNK, G, RowShape};
use crate::storage::RB;
use crate::{QActs, QMatrix};

#[path = "avx2_panel.rs"]
mod panel;

/// Activation rows processed per pass over a weight row.
const MAX_TILE: usize = 4;

/// AVX2 kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `super::run`; the CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    if w.bits() == 8 || w.is_panelled() {
        // SAFETY: forwarded contract (8-bit matrices get their panels here).
        unsafe { panel::matmul_rows(w, a, rows, out) };
        return;
    }
    let shape = *w.shape();
    let acts: Vec<ActRow> = (0..a.m()).map(|i| ActRow::new(a, i)).collect();
    if a.m() == 1 {
        // Matrix-vector: up to 4 rows of one storage block at a time, chunk by
        // chunk, so the weights are read in storage order (one stream).
        let mut r = rows.start;
        while r < rows.end {
            let n = (rows.end - r).min(RB - r % RB);
            let wr: [WRow; RB] = std::array::from_fn(|k| WRow::new(w, r + k.min(n - 1)));
            let mut y = [[0.0f32; MAX_TILE]; RB];
            // SAFETY: `wr[..n]` and `acts[0]` point at complete rows of shape
            // `shape`; CPU features per this fn's contract.
            unsafe {
                match n {
                    1 => row4::<1, 1>(&wr, &shape, &acts, &mut y),
                    2 => row4::<2, 1>(&wr, &shape, &acts, &mut y),
                    3 => row4::<3, 1>(&wr, &shape, &acts, &mut y),
                    _ => row4::<4, 1>(&wr, &shape, &acts, &mut y),
                }
            }
            for k in 0..n {
                // SAFETY: r + k is in this call's rows and m == 1 (caller contract).
                unsafe { out.write(0, r + k, y[k][0]) };
            }
            r += n;
        }
        return;
    }
    tiles(w, rows, a.m(), MAX_TILE, |r, i0, n| {
        let wr = [WRow::new(w, r); RB];
        let at = &acts[i0..i0 + n];
        let mut y = [[0.0f32; MAX_TILE]; RB];
        // SAFETY: `wr[0]` and `at` point at full rows of `w` and `a` with shape
        // `shape` (checked by the caller); CPU features per this fn's contract.
        unsafe {
            match n {
                1 => row4::<1, 1>(&wr, &shape, at, &mut y),
                2 => row4::<1, 2>(&wr, &shape, at, &mut y),
                3 => row4::<1, 3>(&wr, &shape, at, &mut y),
                _ => row4::<1, 4>(&wr, &shape, at, &mut y),
            }
        }
        for (k, &v) in y[0][..n].iter().enumerate() {
            // SAFETY: i0 + k < m and r is in this call's rows (caller contract).
            unsafe { out.write(i0 + k, r, v) };
        }
    });
}

/// Horizontal sum of 8 f32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One f16 as `[x, 0, 0, 0]`.
///
/// # Safety
/// `p` is readable.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16x1(p: *const f16) -> __m128 {
    // SAFETY: caller guarantees 2 readable bytes.
    _mm_cvtph_ps(_mm_cvtsi32_si128(
        unsafe { p.cast::<u16>().read_unaligned() } as i32,
    ))
}

/// Tail group t (activation group g): `s*d` broadcast to 8 lanes and `[m*sd, 0, 0, 0]` widened to 256 bits.
///
/// # Safety
/// Group g exists in both rows.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn group_scales(w: WRow, t: usize, a: ActRow, g: usize) -> (__m256, __m256) {
    // SAFETY: t < tail groups of `w`, g < groups of `a` (caller contract).
    unsafe {
        let ds = _mm_mul_ps(f16x1(w.tail_sc(t)), _mm_load_ss(a.d.add(g)));
        let mt = _mm_mul_ps(f16x1(w.tail_mn(t)), _mm_load_ss(a.sd.add(g)));
        (_mm256_broadcastss_ps(ds), _mm256_zextps128_ps256(mt))
    }
}

/// i32 lane sums of `u8 x s8` products of 32 bytes, for 4-bit `u` (no saturation).
#[target_feature(enable = "avx2")]
#[inline]
fn dot4(u: __m256i, q: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1))
}

/// `R` 4-bit weight rows against `M` activation rows (one of them is 1);
/// `y[k][i]` = row k against activation i.
///
/// # Safety
/// `ws[..R]` and `acts[..M]` point at complete rows of shape `shape`; CPU has the features.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row4<const R: usize, const M: usize>(
    ws: &[WRow; RB],
    shape: &RowShape,
    acts: &[ActRow],
    y: &mut [[f32; MAX_TILE]; RB],
) {
    let act: [ActRow; M] = std::array::from_fn(|i| acts[i]);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut accs = [[_mm256_setzero_ps(); M]; R];
    // SAFETY: chunk c reads bytes c*128..c*128+128 of the packed row, elements
    // c*256..c*256+256 of each activation row and groups c*8..c*8+8; the tail
    // stays within `shape` the same way (see `crate::layout`).
    unsafe {
        for c in 0..shape.chunks {
            for (w, acc) in ws.iter().zip(accs.iter_mut()) {
                let (wp, wsc, wmn) = w.chunk(c);
                let wv: [__m256i; 4] =
                    std::array::from_fn(|s| _mm256_loadu_si256(wp.add(32 * s).cast()));
                let lo: [__m256i; 4] = std::array::from_fn(|s| _mm256_and_si256(wv[s], mask));
                let hi: [__m256i; 4] =
                    std::array::from_fn(|s| _mm256_and_si256(_mm256_srli_epi16::<4>(wv[s]), mask));
                let g = c * CG;
                let s = _mm256_cvtph_ps(_mm_loadu_si128(wsc.cast()));
                let mv = _mm256_cvtph_ps(_mm_loadu_si128(wmn.cast()));
                for i in 0..M {
                    let q = act[i].q.add(c * CHUNK);
                    let ld = |o: usize| _mm256_loadu_si256(q.add(32 * o).cast());
                    let p0 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[0], ld(0)),
                        _mm256_maddubs_epi16(hi[0], ld(4)),
                    );
                    let p1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[1], ld(1)),
                        _mm256_maddubs_epi16(hi[1], ld(5)),
                    );
                    let p2 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[2], ld(2)),
                        _mm256_maddubs_epi16(hi[2], ld(6)),
                    );
                    let p3 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[3], ld(3)),
                        _mm256_maddubs_epi16(hi[3], ld(7)),
                    );
                    let p = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
                    let isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                    let ds = _mm256_mul_ps(s, _mm256_loadu_ps(act[i].d.add(g)));
                    let t = _mm256_fmadd_ps(mv, _mm256_loadu_ps(act[i].sd.add(g)), acc[i]);
                    acc[i] = _mm256_fmadd_ps(isum, ds, t);
                }
            }
        }
        for (w, acc) in ws.iter().zip(accs.iter_mut()) {
            let w = *w;
            let gt = shape.chunks * CG;
            let mut t = 0;
            while t + 1 < shape.tail {
                let g = gt + t;
                let wb = _mm256_loadu_si256(w.tail_data(t).cast());
                let lo = _mm256_and_si256(wb, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wb), mask);
                for i in 0..M {
                    let q = act[i].q.add(g * G);
                    let va = dot4(lo, _mm256_loadu_si256(q.cast()));
                    let vb = dot4(hi, _mm256_loadu_si256(q.add(G).cast()));
                    let (dsa, mta) = group_scales(w, t, act[i], g);
                    let (dsb, mtb) = group_scales(w, t + 1, act[i], g + 1);
                    let f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(va), dsa, _mm256_add_ps(mta, mtb));
                    acc[i] = _mm256_add_ps(acc[i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(vb), dsb, f));
                }
                t += 2;
            }
            if t < shape.tail {
                let g = gt + t;
                let x = _mm_loadu_si128(w.tail_data(t).cast());
                let m128 = _mm_set1_epi8(0x0F);
                let u = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(x), m128),
                    _mm_and_si128(x, m128),
                );
                for i in 0..M {
                    let v = dot4(u, _mm256_loadu_si256(act[i].q.add(g * G).cast()));
                    let (ds, mt) = group_scales(w, t, act[i], g);
                    acc[i] = _mm256_add_ps(acc[i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), ds, mt));
                }
            }
        }
    }
    for k in 0..R {
        for i in 0..M {
            y[k][i] = hsum_ps(accs[k][i]);
        }
    }
}
