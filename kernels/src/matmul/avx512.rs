//! AVX-512 VNNI matmul kernels: dispatch, shared helpers, and the matrix-vector
//! (m = 1) kernels. `vpdpbusd` multiplies unsigned weight bytes by signed
//! activation bytes and sums each 4 into an i32 lane; with the chunk layout (see
//! `crate::layout`) lane `j` of a chunk only ever sees group `j`, so two chunks
//! (16 groups) become one vector of 16 group sums after a single lane shuffle,
//! scaled in f32 against 16 f16 scales. The m = 1 kernels work on `R` weight
//! rows at once so each activation vector is loaded once per `R` rows (the
//! activations are twice the bytes of 4-bit weights); the batched kernels (in
//! `avx512_batch`) expand a weight row once for a tile of activation rows.

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::{ActRow, Out, WRow};
use crate::layout::{CG, CHUNK, G, RowShape};
use crate::{QActs, QMatrix};

#[path = "avx512_batch.rs"]
mod batch;
#[path = "avx512_panel.rs"]
mod panel;

/// Weight rows per m = 1 block.
const R_MAX: usize = crate::storage::RB;

/// AVX-512 kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `super::run`; the CPU supports AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    if w.bits() == 8 || w.is_panelled() {
        // SAFETY: forwarded contract (8-bit matrices get their panels here).
        unsafe { panel::matmul_rows(w, a, rows, out) };
        return;
    }
    if a.m() != 1 {
        // SAFETY: forwarded contract.
        unsafe { batch::matmul_rows(w, a, rows, out) };
        return;
    }
    let shape = *w.shape();
    let act = ActRow::new(a, 0);
    let mut r = rows.start;
    while r < rows.end {
        // Stay inside one storage block so the 4 rows are one sequential stream.
        let n = (rows.end - r).min(R_MAX - r % R_MAX);
        let wr: [WRow; R_MAX] = std::array::from_fn(|k| WRow::new(w, r + k.min(n - 1)));
        let mut y = [0.0f32; R_MAX];
        // SAFETY: `wr[..n]` and `act` point at complete rows whose shape is
        // `shape` (checked by the caller); CPU features per this fn's contract.
        unsafe {
            match (w.bits(), n) {
                (4, 1) => vec4::<1>(&wr, &shape, act, &mut y),
                (4, 2) => vec4::<2>(&wr, &shape, act, &mut y),
                (4, 3) => vec4::<3>(&wr, &shape, act, &mut y),
                (4, _) => vec4::<4>(&wr, &shape, act, &mut y),
                (_, 1) => vec8::<1>(&wr, &shape, act, &mut y),
                (_, 2) => vec8::<2>(&wr, &shape, act, &mut y),
                (_, 3) => vec8::<3>(&wr, &shape, act, &mut y),
                (_, _) => vec8::<4>(&wr, &shape, act, &mut y),
            }
        }
        for (k, &v) in y[..n].iter().enumerate() {
            // SAFETY: r + k is in this call's rows and m == 1 (caller contract).
            unsafe { out.write(0, r + k, v) };
        }
        r += n;
    }
}

/// Sum of lanes j and j+8 of a one-chunk accumulator: its 8 group sums.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
pub(super) fn fold_halves(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// Two chunk accumulators (lanes j, j+8 = group j) to 16 group sums (A's 8, then B's 8).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn combine(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(
        _mm512_shuffle_i64x2::<0x44>(a, b),
        _mm512_shuffle_i64x2::<0xEE>(a, b),
    )
}

/// Low and high nibbles of 64 packed bytes.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) fn nibbles(v: __m512i) -> (__m512i, __m512i) {
    let mask = _mm512_set1_epi8(0x0F);
    (
        _mm512_and_si512(v, mask),
        _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
    )
}

/// Nibbles of one 32-byte tail pair: group a in the low 256 bits, b in the high.
///
/// # Safety
/// `p` is readable for 32 bytes.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
pub(super) unsafe fn pair_nibbles(p: *const u8) -> __m512i {
    // SAFETY: caller guarantees 32 readable bytes.
    let wb = unsafe { _mm256_loadu_si256(p.cast()) };
    let m = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(wb, m);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wb), m);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Nibbles of a 16-byte odd tail group as 32 bytes in element order.
///
/// # Safety
/// `p` is readable for 16 bytes.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
pub(super) unsafe fn single_nibbles(p: *const u8) -> __m256i {
    // SAFETY: caller guarantees 16 readable bytes.
    let x = unsafe { _mm_loadu_si128(p.cast()) };
    let m = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(x), m),
        _mm_and_si128(x, m),
    )
}

/// `[x0, x1, 0, 0]` from two f16 at `p`.
///
/// # Safety
/// `p` is readable for 2 f16.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn f16x2(p: *const f16) -> __m128 {
    // SAFETY: caller guarantees 4 readable bytes.
    _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
        p.cast::<i32>().read_unaligned()
    }))
}

/// `[x, 0, 0, 0]` from one f16 at `p`.
///
/// # Safety
/// `p` is readable for 1 f16.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn f16x1(p: *const f16) -> __m128 {
    // SAFETY: caller guarantees 2 readable bytes.
    _mm_cvtph_ps(_mm_cvtsi32_si128(
        unsafe { p.cast::<u16>().read_unaligned() } as i32,
    ))
}

/// For tail groups g, g+1: the per-lane scale `s*d` (lanes 0-7 group g, 8-15
/// group g+1) and the min term `[m_g*sd_g, m_g1*sd_g1, 0, 0]`.
///
/// # Safety
/// Groups g and g+1 exist in both rows.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
pub(super) unsafe fn pair_scales(w: WRow, t: usize, a: ActRow, g: usize) -> (__m512, __m128) {
    // SAFETY: g + 1 < groups for both rows (caller contract).
    unsafe {
        let d2 = _mm_castsi128_ps(_mm_loadl_epi64(a.d.add(g).cast()));
        let sd2 = _mm_castsi128_ps(_mm_loadl_epi64(a.sd.add(g).cast()));
        let ds = _mm_mul_ps(f16x2(w.tail_sc(t)), d2);
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let ds16 = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(ds));
        (ds16, _mm_mul_ps(f16x2(w.tail_mn(t)), sd2))
    }
}

/// For one tail group g: `s*d` in all 8 lanes and `[m*sd, 0, 0, 0]`.
///
/// # Safety
/// Group g exists in both rows.
#[target_feature(enable = "avx512f,avx2,f16c")]
#[inline]
pub(super) unsafe fn single_scales(w: WRow, t: usize, a: ActRow, g: usize) -> (__m256, __m128) {
    // SAFETY: g < groups for both rows (caller contract).
    unsafe {
        let d1 = _mm_load_ss(a.d.add(g));
        let sd1 = _mm_load_ss(a.sd.add(g));
        let ds = _mm256_broadcastss_ps(_mm_mul_ps(f16x1(w.tail_sc(t)), d1));
        (ds, _mm_mul_ps(f16x1(w.tail_mn(t)), sd1))
    }
}

/// Sum all lanes of each accumulator: `y[k] = Σ acc[k]` for k < R. Every row
/// is reduced by the same sequence of additions whatever `R` (missing rows are
/// zero vectors), so a row's result does not depend on how rows are grouped.
#[target_feature(enable = "avx512f,avx512dq,avx2")]
#[inline]
pub(super) fn reduce<const R: usize>(acc: &[__m512; R], y: &mut [f32]) {
    let z = _mm512_setzero_ps();
    let v = |k: usize| if k < R { acc[k] } else { z };
    let h = |v: __m512| _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
    let h01 = _mm256_hadd_ps(h(v(0)), h(v(1)));
    let h23 = _mm256_hadd_ps(h(v(2)), h(v(3)));
    let h = _mm256_hadd_ps(h01, h23);
    let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let mut t = [0.0f32; 4];
    // SAFETY: `t` has room for 4 f32.
    unsafe { _mm_storeu_ps(t.as_mut_ptr(), s) };
    y[..R].copy_from_slice(&t[..R]);
}

/// `R` 4-bit weight rows against one activation row.
///
/// # Safety
/// `w[..R]` and `a` point at complete rows of shape `shape`; CPU has the features.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn vec4<const R: usize>(
    w: &[WRow; R_MAX],
    shape: &RowShape,
    a: ActRow,
    y: &mut [f32; R_MAX],
) {
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm512_setzero_ps(); R];
    // SAFETY: pair p reads bytes p*256..p*256+256 of each packed row, elements
    // p*512..p*512+512 of the activation row and groups p*16..p*16+16; the odd
    // chunk and the tail stay within `shape` the same way (see `crate::layout`).
    unsafe {
        for p in 0..shape.chunks / 2 {
            let q = a.q.add(p * 2 * CHUNK);
            let av: [__m512i; 8] =
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k).cast()));
            let g = p * 2 * CG;
            let dx = _mm512_loadu_ps(a.d.add(g));
            let sd = _mm512_loadu_ps(a.sd.add(g));
            for k in 0..R {
                let wp = w[k].pair_data(p);
                let (l0, h0) = nibbles(_mm512_loadu_si512(wp.cast()));
                let (l1, h1) = nibbles(_mm512_loadu_si512(wp.add(64).cast()));
                let (l2, h2) = nibbles(_mm512_loadu_si512(wp.add(128).cast()));
                let (l3, h3) = nibbles(_mm512_loadu_si512(wp.add(192).cast()));
                let x = _mm512_dpbusd_epi32(zero, l0, av[0]);
                let x = _mm512_dpbusd_epi32(x, h0, av[2]);
                let x = _mm512_dpbusd_epi32(x, l1, av[1]);
                let x = _mm512_dpbusd_epi32(x, h1, av[3]);
                let z = _mm512_dpbusd_epi32(zero, l2, av[4]);
                let z = _mm512_dpbusd_epi32(z, h2, av[6]);
                let z = _mm512_dpbusd_epi32(z, l3, av[5]);
                let z = _mm512_dpbusd_epi32(z, h3, av[7]);
                let s = _mm512_cvtph_ps(_mm256_loadu_si256(w[k].pair_sc(p).cast()));
                let mv = _mm512_cvtph_ps(_mm256_loadu_si256(w[k].pair_mn(p).cast()));
                facc[k] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(combine(x, z)),
                    _mm512_mul_ps(s, dx),
                    facc[k],
                );
                macc[k] = _mm512_fmadd_ps(mv, sd, macc[k]);
            }
        }
        if shape.chunks % 2 == 1 {
            let c = shape.chunks - 1;
            let q = a.q.add(c * CHUNK);
            let av: [__m512i; 4] =
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k).cast()));
            let g = c * CG;
            let dx = _mm256_loadu_ps(a.d.add(g));
            let sd = _mm256_loadu_ps(a.sd.add(g));
            for k in 0..R {
                let wp = w[k].odd;
                let (l0, h0) = nibbles(_mm512_loadu_si512(wp.cast()));
                let (l1, h1) = nibbles(_mm512_loadu_si512(wp.add(64).cast()));
                let x = _mm512_dpbusd_epi32(zero, l0, av[0]);
                let x = _mm512_dpbusd_epi32(x, h0, av[2]);
                let x = _mm512_dpbusd_epi32(x, l1, av[1]);
                let x = _mm512_dpbusd_epi32(x, h1, av[3]);
                let s = _mm256_cvtph_ps(_mm_loadu_si128(w[k].odd_sc().cast()));
                let mv = _mm256_cvtph_ps(_mm_loadu_si128(w[k].odd_mn().cast()));
                let isum = _mm256_cvtepi32_ps(fold_halves(x));
                let f = _mm256_fmadd_ps(isum, _mm256_mul_ps(s, dx), _mm256_mul_ps(mv, sd));
                facc[k] = _mm512_add_ps(facc[k], _mm512_zextps256_ps512(f));
            }
        }
        let gt = shape.chunks * CG;
        let mut t = 0;
        while t + 1 < shape.tail {
            let g = gt + t;
            let qv = _mm512_loadu_si512(a.q.add(g * G).cast());
            for k in 0..R {
                let wz = pair_nibbles(w[k].tail_data(t));
                let v = _mm512_dpbusd_epi32(zero, wz, qv);
                let (ds, mt) = pair_scales(w[k], t, a, g);
                facc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), ds, facc[k]);
                macc[k] = _mm512_add_ps(macc[k], _mm512_zextps128_ps512(mt));
            }
            t += 2;
        }
        if t < shape.tail {
            let g = gt + t;
            let qv = _mm256_loadu_si256(a.q.add(g * G).cast());
            for k in 0..R {
                let wy = single_nibbles(w[k].tail_data(t));
                let v = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wy, qv);
                let (ds, mt) = single_scales(w[k], g - gt, a, g);
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), ds);
                facc[k] = _mm512_add_ps(facc[k], _mm512_zextps256_ps512(f));
                macc[k] = _mm512_add_ps(macc[k], _mm512_zextps128_ps512(mt));
            }
        }
    }
    let acc: [__m512; R] = std::array::from_fn(|k| _mm512_add_ps(facc[k], macc[k]));
    reduce(&acc, y);
}

/// `R` 8-bit weight rows against one activation row.
///
/// # Safety
/// As for [`vec4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn vec8<const R: usize>(
    w: &[WRow; R_MAX],
    shape: &RowShape,
    a: ActRow,
    y: &mut [f32; R_MAX],
) {
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm512_setzero_ps(); R];
    // SAFETY: pair p reads bytes (= elements) p*512..p*512+512 of every weight
    // row and of the activation row, and groups p*16..p*16+16; the odd chunk
    // and the tail groups stay within `shape` likewise.
    unsafe {
        for p in 0..shape.chunks / 2 {
            let q = a.q.add(p * 2 * CHUNK);
            let av: [__m512i; 8] =
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k).cast()));
            let g = p * 2 * CG;
            let dx = _mm512_loadu_ps(a.d.add(g));
            let sd = _mm512_loadu_ps(a.sd.add(g));
            for k in 0..R {
                let wp = w[k].pair_data(p);
                let ld = |o: usize| _mm512_loadu_si512(wp.add(64 * o).cast());
                let x = _mm512_dpbusd_epi32(zero, ld(0), av[0]);
                let x = _mm512_dpbusd_epi32(x, ld(1), av[1]);
                let x = _mm512_dpbusd_epi32(x, ld(2), av[2]);
                let x = _mm512_dpbusd_epi32(x, ld(3), av[3]);
                let z = _mm512_dpbusd_epi32(zero, ld(4), av[4]);
                let z = _mm512_dpbusd_epi32(z, ld(5), av[5]);
                let z = _mm512_dpbusd_epi32(z, ld(6), av[6]);
                let z = _mm512_dpbusd_epi32(z, ld(7), av[7]);
                let s = _mm512_cvtph_ps(_mm256_loadu_si256(w[k].pair_sc(p).cast()));
                let mv = _mm512_cvtph_ps(_mm256_loadu_si256(w[k].pair_mn(p).cast()));
                facc[k] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(combine(x, z)),
                    _mm512_mul_ps(s, dx),
                    facc[k],
                );
                macc[k] = _mm512_fmadd_ps(mv, sd, macc[k]);
            }
        }
        if shape.chunks % 2 == 1 {
            let c = shape.chunks - 1;
            let q = a.q.add(c * CHUNK);
            let av: [__m512i; 4] =
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k).cast()));
            let g = c * CG;
            let dx = _mm256_loadu_ps(a.d.add(g));
            let sd = _mm256_loadu_ps(a.sd.add(g));
            for k in 0..R {
                let wp = w[k].odd;
                let ld = |o: usize| _mm512_loadu_si512(wp.add(64 * o).cast());
                let x = _mm512_dpbusd_epi32(zero, ld(0), av[0]);
                let x = _mm512_dpbusd_epi32(x, ld(1), av[1]);
                let x = _mm512_dpbusd_epi32(x, ld(2), av[2]);
                let x = _mm512_dpbusd_epi32(x, ld(3), av[3]);
                let s = _mm256_cvtph_ps(_mm_loadu_si128(w[k].odd_sc().cast()));
                let mv = _mm256_cvtph_ps(_mm_loadu_si128(w[k].odd_mn().cast()));
                let isum = _mm256_cvtepi32_ps(fold_halves(x));
                let f = _mm256_fmadd_ps(isum, _mm256_mul_ps(s, dx), _mm256_mul_ps(mv, sd));
                facc[k] = _mm512_add_ps(facc[k], _mm512_zextps256_ps512(f));
            }
        }
        let gt = shape.chunks * CG;
        let mut t = 0;
        while t + 1 < shape.tail {
            let g = gt + t;
            let qv = _mm512_loadu_si512(a.q.add(g * G).cast());
            for k in 0..R {
                let wz = _mm512_loadu_si512(w[k].tail_data(t).cast());
                let v = _mm512_dpbusd_epi32(zero, wz, qv);
                let (ds, mt) = pair_scales(w[k], t, a, g);
                facc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), ds, facc[k]);
                macc[k] = _mm512_add_ps(macc[k], _mm512_zextps128_ps512(mt));
            }
            t += 2;
        }
        for g in gt + t..shape.groups {
            let qv = _mm256_loadu_si256(a.q.add(g * G).cast());
            for k in 0..R {
                let wb = _mm256_loadu_si256(w[k].tail_data(g - gt).cast());
                let v = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wb, qv);
                let (ds, mt) = single_scales(w[k], g - gt, a, g);
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), ds);
                facc[k] = _mm512_add_ps(facc[k], _mm512_zextps256_ps512(f));
                macc[k] = _mm512_add_ps(macc[k], _mm512_zextps128_ps512(mt));
            }
        }
    }
    let acc: [__m512; R] = std::array::from_fn(|k| _mm512_add_ps(facc[k], macc[k]));
    reduce(&acc, y);
}
