//! AVX-512 VNNI batched kernel for 4-bit matrices (m > 1): each 16-group
//! step of a weight row is loaded and nibble-expanded once, then multiplied
//! with a tile of up to `MAX_TILE` activation rows, so the weights are read
//! from memory once per call. (8-bit matrices use the row panels of
//! `avx512_panel` for every m.)

use std::arch::x86_64::*;
use std::ops::Range;

use super::{
    combine, fold_halves, nibbles, pair_nibbles, pair_scales, reduce, single_nibbles, single_scales,
};
use crate::layout::{CG, CHUNK, G, RowShape};
use crate::matmul::{ActRow, Out, WRow, tile_blocks};
use crate::{QActs, QMatrix};

/// Activation rows processed per pass over a weight row.
const MAX_TILE: usize = 4;

/// Batched kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `crate::matmul::run`; the CPU has the features enabled below.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    debug_assert_eq!(w.bits(), 4);
    let shape = *w.shape();
    let acts: Vec<ActRow> = (0..a.m()).map(|i| ActRow::new(a, i)).collect();
    tile_blocks(w, rows, a.m(), MAX_TILE, |block, i0, n| {
        let at = &acts[i0..i0 + n];
        // SAFETY: every row of `block` is a full row of `w` and `at` full rows
        // of `a`, whose shapes match `shape` (checked by the caller); the
        // rows are this call's (caller contract); the CPU features are
        // guaranteed by this function's contract.
        unsafe {
            match n {
                1 => rows_of::<1>(w, &shape, at, block, i0, out),
                2 => rows_of::<2>(w, &shape, at, block, i0, out),
                3 => rows_of::<3>(w, &shape, at, block, i0, out),
                _ => rows_of::<4>(w, &shape, at, block, i0, out),
            }
        }
    });
}

/// Weight rows `block` of a 4-bit matrix against the `M` activation rows
/// `acts` (rows `i0..i0 + M` of the output).
///
/// # Safety
/// As for [`matmul_rows`]; `acts.len() == M` and every row of `block` is one
/// of this call's rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_of<const M: usize>(
    w: &QMatrix,
    shape: &RowShape,
    acts: &[ActRow],
    block: Range<usize>,
    i0: usize,
    out: Out,
) {
    for r in block {
        let wr = WRow::new(w, r);
        let mut y = [0.0f32; MAX_TILE];
        // SAFETY: forwarded contract.
        unsafe {
            row4::<M>(wr, shape, acts, &mut y);
            for (k, &v) in y[..M].iter().enumerate() {
                out.write(i0 + k, r, v);
            }
        }
    }
}

/// Add the tail groups (after the chunks) of a 4-bit row to the accumulators.
///
/// # Safety
/// As for [`row4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn tail4<const M: usize>(
    w: WRow,
    shape: &RowShape,
    act: &[ActRow; M],
    facc: &mut [__m512; M],
    macc: &mut [__m512; M],
) {
    let gt = shape.chunks * CG;
    let mut t = 0;
    // SAFETY: tail groups gt..groups are inside both rows (caller contract).
    unsafe {
        while t + 1 < shape.tail {
            let g = gt + t;
            let wz = pair_nibbles(w.tail_data(t));
            for i in 0..M {
                let qv = _mm512_loadu_si512(act[i].q.add(g * G).cast());
                let v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wz, qv);
                let (ds, mt) = pair_scales(w, t, act[i], g);
                facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), ds, facc[i]);
                macc[i] = _mm512_add_ps(macc[i], _mm512_zextps128_ps512(mt));
            }
            t += 2;
        }
        if t < shape.tail {
            let g = gt + t;
            let wy = single_nibbles(w.tail_data(t));
            for i in 0..M {
                let qv = _mm256_loadu_si256(act[i].q.add(g * G).cast());
                let v = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wy, qv);
                let (ds, mt) = single_scales(w, g - gt, act[i], g);
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), ds);
                facc[i] = _mm512_add_ps(facc[i], _mm512_zextps256_ps512(f));
                macc[i] = _mm512_add_ps(macc[i], _mm512_zextps128_ps512(mt));
            }
        }
    }
}

/// One 4-bit weight row against `M` activation rows; results in `y[..M]`.
///
/// # Safety
/// `w` and every `acts[..M]` point at complete rows of shape `shape`; CPU has the features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn row4<const M: usize>(
    w: WRow,
    shape: &RowShape,
    acts: &[ActRow],
    y: &mut [f32; MAX_TILE],
) {
    let act: [ActRow; M] = std::array::from_fn(|i| acts[i]);
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); M];
    let mut macc = [_mm512_setzero_ps(); M];
    // SAFETY: every offset below stays inside the rows: pair p covers bytes
    // p*256..p*256+256 of the packed row and elements p*512..p*512+512 of the
    // activation rows, groups p*16..p*16+16; the odd chunk and the tail are
    // bounded by `shape` in the same way (layout in `crate::layout`).
    unsafe {
        for p in 0..shape.chunks / 2 {
            let wp = w.pair_data(p);
            let (l0, h0) = nibbles(_mm512_loadu_si512(wp.cast()));
            let (l1, h1) = nibbles(_mm512_loadu_si512(wp.add(64).cast()));
            let (l2, h2) = nibbles(_mm512_loadu_si512(wp.add(128).cast()));
            let (l3, h3) = nibbles(_mm512_loadu_si512(wp.add(192).cast()));
            let g = p * 2 * CG;
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(w.pair_sc(p).cast()));
            let mv = _mm512_cvtph_ps(_mm256_loadu_si256(w.pair_mn(p).cast()));
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
            let wp = w.odd;
            let (l0, h0) = nibbles(_mm512_loadu_si512(wp.cast()));
            let (l1, h1) = nibbles(_mm512_loadu_si512(wp.add(64).cast()));
            let g = c * CG;
            let s = _mm256_cvtph_ps(_mm_loadu_si128(w.odd_sc().cast()));
            let mv = _mm256_cvtph_ps(_mm_loadu_si128(w.odd_mn().cast()));
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
        tail4(w, shape, &act, &mut facc, &mut macc);
    }
    let acc: [__m512; M] = std::array::from_fn(|i| _mm512_add_ps(facc[i], macc[i]));
    reduce(&acc, y);
}
