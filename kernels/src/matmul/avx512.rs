//! AVX-512 VNNI matmul kernel. `vpdpbusd` multiplies unsigned weight bytes by
//! signed activation bytes and sums each 4 into an i32 lane; thanks to the
//! chunk layout (see `crate::layout`) lane `j` of a chunk only ever sees group
//! `j`, so two chunks (16 groups) reduce to one vector of 16 group sums with a
//! single lane shuffle, which is then scaled in f32 against 16 f16 scales.
//! Weight bytes are expanded once per 16 groups and reused for a tile of up to
//! `MAX_TILE` activation rows.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{ActRow, Out, WRow, tiles};
use crate::layout::{CG, CHUNK, G, RowShape};
use crate::{QActs, QMatrix};

/// Activation rows processed per pass over a weight row.
const MAX_TILE: usize = 4;

/// AVX-512 kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `super::run`; the CPU supports AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    let shape = *w.shape();
    let acts: Vec<ActRow> = (0..a.m()).map(|i| ActRow::new(a, i)).collect();
    for r in rows {
        let wr = WRow::new(w, r);
        tiles(a.m(), MAX_TILE, |i0, n| {
            let at = &acts[i0..i0 + n];
            let mut y = [0.0f32; MAX_TILE];
            // SAFETY: `wr` and `at` point at full rows of `w` and `a`, whose
            // shapes match `shape` (checked by the caller); the CPU features are
            // guaranteed by this function's contract.
            unsafe {
                match (w.bits(), n) {
                    (4, 1) => row4::<1>(wr, &shape, at, &mut y),
                    (4, 2) => row4::<2>(wr, &shape, at, &mut y),
                    (4, 3) => row4::<3>(wr, &shape, at, &mut y),
                    (4, _) => row4::<4>(wr, &shape, at, &mut y),
                    (_, 1) => row8::<1>(wr, &shape, at, &mut y),
                    (_, 2) => row8::<2>(wr, &shape, at, &mut y),
                    (_, 3) => row8::<3>(wr, &shape, at, &mut y),
                    (_, _) => row8::<4>(wr, &shape, at, &mut y),
                }
            }
            for (k, &v) in y[..n].iter().enumerate() {
                // SAFETY: i0 + k < m and r is in this call's rows (caller contract).
                unsafe { out.write(i0 + k, r, v) };
            }
        });
    }
}

/// Horizontal sum of 8 i32 lanes.
#[target_feature(enable = "avx512f,avx512vl,avx2")]
#[inline]
fn hsum_epi32_256(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Sum of lanes j and j+8 of a chunk accumulator: the 8 group sums.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn fold_halves(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Two chunk accumulators (lanes j, j+8 = group j) to 16 group sums (A's 8, then B's 8).
#[target_feature(enable = "avx512f")]
#[inline]
fn combine(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(
        _mm512_shuffle_i64x2::<0x44>(a, b),
        _mm512_shuffle_i64x2::<0xEE>(a, b),
    )
}

/// Scalar tail-group contribution: `s*(d*isum) + m*sd`.
#[inline(always)]
unsafe fn tail_term(w: WRow, a: ActRow, g: usize, isum: i32) -> f32 {
    // SAFETY: g < groups; the caller guarantees the row pointers cover all groups.
    unsafe {
        (*w.sc.add(g)).to_f32() * (*a.d.add(g) * isum as f32)
            + (*w.mn.add(g)).to_f32() * *a.sd.add(g)
    }
}

/// One 4-bit weight row against `M` activation rows; results in `y[..M]`.
///
/// # Safety
/// `w` and every `acts[..M]` point at complete rows of shape `shape`; CPU has the features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn row4<const M: usize>(
    w: WRow,
    shape: &RowShape,
    acts: &[ActRow],
    y: &mut [f32; MAX_TILE],
) {
    let act: [ActRow; M] = std::array::from_fn(|i| acts[i]);
    let mask = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); M];
    let mut macc = [_mm512_setzero_ps(); M];
    let mut tacc = [0.0f32; M];
    // SAFETY: every offset below stays inside the row: pair p covers bytes
    // p*256..p*256+256 of the packed row and elements p*512..p*512+512 of the
    // activation row, groups p*16..p*16+16; the odd chunk and the tail are
    // bounded by `shape` in the same way (layout in `crate::layout`).
    unsafe {
        for p in 0..shape.chunks / 2 {
            let wp = w.data.add(p * 2 * CHUNK / 2);
            let w0 = _mm512_loadu_si512(wp.cast());
            let w1 = _mm512_loadu_si512(wp.add(64).cast());
            let w2 = _mm512_loadu_si512(wp.add(128).cast());
            let w3 = _mm512_loadu_si512(wp.add(192).cast());
            let (l0, h0) = (
                _mm512_and_si512(w0, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(w0), mask),
            );
            let (l1, h1) = (
                _mm512_and_si512(w1, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(w1), mask),
            );
            let (l2, h2) = (
                _mm512_and_si512(w2, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(w2), mask),
            );
            let (l3, h3) = (
                _mm512_and_si512(w3, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(w3), mask),
            );
            let g = p * 2 * CG;
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(w.sc.add(g).cast()));
            let mv = _mm512_cvtph_ps(_mm256_loadu_si256(w.mn.add(g).cast()));
            for i in 0..M {
                let q = act[i].q.add(p * 2 * CHUNK);
                let ld = |o: usize| _mm512_loadu_si512(q.add(o).cast());
                let x = _mm512_dpbusd_epi32(zero, l0, ld(0));
                let x = _mm512_dpbusd_epi32(x, h0, ld(128));
                let x = _mm512_dpbusd_epi32(x, l1, ld(64));
                let x = _mm512_dpbusd_epi32(x, h1, ld(192));
                let z = _mm512_dpbusd_epi32(zero, l2, ld(256));
                let z = _mm512_dpbusd_epi32(z, h2, ld(384));
                let z = _mm512_dpbusd_epi32(z, l3, ld(320));
                let z = _mm512_dpbusd_epi32(z, h3, ld(448));
                let isum = _mm512_cvtepi32_ps(combine(x, z));
                let ds = _mm512_mul_ps(s, _mm512_loadu_ps(act[i].d.add(g)));
                facc[i] = _mm512_fmadd_ps(isum, ds, facc[i]);
                macc[i] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(act[i].sd.add(g)), macc[i]);
            }
        }
        if shape.chunks % 2 == 1 {
            let c = shape.chunks - 1;
            let wp = w.data.add(c * CHUNK / 2);
            let w0 = _mm512_loadu_si512(wp.cast());
            let w1 = _mm512_loadu_si512(wp.add(64).cast());
            let (l0, h0) = (
                _mm512_and_si512(w0, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(w0), mask),
            );
            let (l1, h1) = (
                _mm512_and_si512(w1, mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(w1), mask),
            );
            let g = c * CG;
            let s = _mm256_cvtph_ps(_mm_loadu_si128(w.sc.add(g).cast()));
            let mv = _mm256_cvtph_ps(_mm_loadu_si128(w.mn.add(g).cast()));
            for i in 0..M {
                let q = act[i].q.add(c * CHUNK);
                let ld = |o: usize| _mm512_loadu_si512(q.add(o).cast());
                let x = _mm512_dpbusd_epi32(zero, l0, ld(0));
                let x = _mm512_dpbusd_epi32(x, h0, ld(128));
                let x = _mm512_dpbusd_epi32(x, l1, ld(64));
                let x = _mm512_dpbusd_epi32(x, h1, ld(192));
                let isum = _mm256_cvtepi32_ps(fold_halves(x));
                let ds = _mm256_mul_ps(s, _mm256_loadu_ps(act[i].d.add(g)));
                let f = _mm256_fmadd_ps(
                    isum,
                    ds,
                    _mm256_mul_ps(mv, _mm256_loadu_ps(act[i].sd.add(g))),
                );
                facc[i] = _mm512_add_ps(facc[i], _mm512_zextps256_ps512(f));
            }
        }
        let gt = shape.chunks * CG;
        let tb = w.data.add(shape.chunks * CHUNK / 2);
        let m256 = _mm256_set1_epi8(0x0F);
        let mut t = 0;
        while t + 1 < shape.tail {
            let wb = _mm256_loadu_si256(tb.add(t * G / 2).cast());
            let lo = _mm256_and_si256(wb, m256);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wb), m256);
            let wz = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            for i in 0..M {
                let q = act[i].q.add((gt + t) * G);
                let v = _mm512_dpbusd_epi32(zero, wz, _mm512_loadu_si512(q.cast()));
                let ia = _mm512_mask_reduce_add_epi32(0x00FF, v);
                let ib = _mm512_mask_reduce_add_epi32(0xFF00, v);
                tacc[i] += tail_term(w, act[i], gt + t, ia) + tail_term(w, act[i], gt + t + 1, ib);
            }
            t += 2;
        }
        if t < shape.tail {
            let x = _mm_loadu_si128(tb.add(t * G / 2).cast());
            let m128 = _mm_set1_epi8(0x0F);
            let wy = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16::<4>(x), m128),
                _mm_and_si128(x, m128),
            );
            for i in 0..M {
                let q = act[i].q.add((gt + t) * G);
                let v =
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), wy, _mm256_loadu_si256(q.cast()));
                tacc[i] += tail_term(w, act[i], gt + t, hsum_epi32_256(v));
            }
        }
    }
    for i in 0..M {
        y[i] = _mm512_reduce_add_ps(_mm512_add_ps(facc[i], macc[i])) + tacc[i];
    }
}

/// One 8-bit weight row against `M` activation rows; results in `y[..M]`.
///
/// # Safety
/// As for [`row4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn row8<const M: usize>(
    w: WRow,
    shape: &RowShape,
    acts: &[ActRow],
    y: &mut [f32; MAX_TILE],
) {
    let act: [ActRow; M] = std::array::from_fn(|i| acts[i]);
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); M];
    let mut macc = [_mm512_setzero_ps(); M];
    let mut tacc = [0.0f32; M];
    // SAFETY: pair p covers bytes (= elements) p*512..p*512+512 of both the
    // weight and activation rows and groups p*16..p*16+16; the odd chunk and the
    // tail groups are bounded by `shape` likewise.
    unsafe {
        for p in 0..shape.chunks / 2 {
            let wp = w.data.add(p * 2 * CHUNK);
            let wv: [__m512i; 8] =
                std::array::from_fn(|k| _mm512_loadu_si512(wp.add(64 * k).cast()));
            let g = p * 2 * CG;
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(w.sc.add(g).cast()));
            let mv = _mm512_cvtph_ps(_mm256_loadu_si256(w.mn.add(g).cast()));
            for i in 0..M {
                let q = act[i].q.add(p * 2 * CHUNK);
                let ld = |o: usize| _mm512_loadu_si512(q.add(o).cast());
                let x = _mm512_dpbusd_epi32(zero, wv[0], ld(0));
                let x = _mm512_dpbusd_epi32(x, wv[1], ld(64));
                let x = _mm512_dpbusd_epi32(x, wv[2], ld(128));
                let x = _mm512_dpbusd_epi32(x, wv[3], ld(192));
                let z = _mm512_dpbusd_epi32(zero, wv[4], ld(256));
                let z = _mm512_dpbusd_epi32(z, wv[5], ld(320));
                let z = _mm512_dpbusd_epi32(z, wv[6], ld(384));
                let z = _mm512_dpbusd_epi32(z, wv[7], ld(448));
                let isum = _mm512_cvtepi32_ps(combine(x, z));
                let ds = _mm512_mul_ps(s, _mm512_loadu_ps(act[i].d.add(g)));
                facc[i] = _mm512_fmadd_ps(isum, ds, facc[i]);
                macc[i] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(act[i].sd.add(g)), macc[i]);
            }
        }
        if shape.chunks % 2 == 1 {
            let c = shape.chunks - 1;
            let wp = w.data.add(c * CHUNK);
            let wv: [__m512i; 4] =
                std::array::from_fn(|k| _mm512_loadu_si512(wp.add(64 * k).cast()));
            let g = c * CG;
            let s = _mm256_cvtph_ps(_mm_loadu_si128(w.sc.add(g).cast()));
            let mv = _mm256_cvtph_ps(_mm_loadu_si128(w.mn.add(g).cast()));
            for i in 0..M {
                let q = act[i].q.add(c * CHUNK);
                let ld = |o: usize| _mm512_loadu_si512(q.add(o).cast());
                let x = _mm512_dpbusd_epi32(zero, wv[0], ld(0));
                let x = _mm512_dpbusd_epi32(x, wv[1], ld(64));
                let x = _mm512_dpbusd_epi32(x, wv[2], ld(128));
                let x = _mm512_dpbusd_epi32(x, wv[3], ld(192));
                let isum = _mm256_cvtepi32_ps(fold_halves(x));
                let ds = _mm256_mul_ps(s, _mm256_loadu_ps(act[i].d.add(g)));
                let f = _mm256_fmadd_ps(
                    isum,
                    ds,
                    _mm256_mul_ps(mv, _mm256_loadu_ps(act[i].sd.add(g))),
                );
                facc[i] = _mm512_add_ps(facc[i], _mm512_zextps256_ps512(f));
            }
        }
        let gt = shape.chunks * CG;
        for t in 0..shape.tail {
            let g = gt + t;
            let wb = _mm256_loadu_si256(w.data.add(g * G).cast());
            for i in 0..M {
                let qv = _mm256_loadu_si256(act[i].q.add(g * G).cast());
                let v = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wb, qv);
                tacc[i] += tail_term(w, act[i], g, hsum_epi32_256(v));
            }
        }
    }
    for i in 0..M {
        y[i] = _mm512_reduce_add_ps(_mm512_add_ps(facc[i], macc[i])) + tacc[i];
    }
}
