//! Per-ISA versions of the activation group quantizer; each reproduces
//! [`crate::qacts::quantize_group_scalar`] bit for bit: the same f32 amax (max is
//! exact in any order), the same scalar `d` and `1/d`, the same products, and
//! round-half-even independent of MXCSR, then a clamp to ±127.

use crate::Isa;
use crate::layout::{CG, CHUNK, G};
use crate::qacts::quantize_group_scalar;

/// Quantize one group of 32 with `isa` (already checked available).
#[inline]
pub(crate) fn quantize_group(isa: Isa, x: &[f32], q: &mut [i8; G]) -> (f32, i32) {
    assert_eq!(x.len(), G);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked AVX2 availability; `x` has 32 values.
        Isa::Avx2 => unsafe { x86::group_avx2(x, q) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked AVX-512 availability; `x` has 32 values.
        Isa::Avx512 => unsafe { x86::group_avx512(x, q) },
        _ => quantize_group_scalar(x, q),
    }
}

/// Quantize one whole chunk (8 groups, `crate::layout`) of `x` into `q` in
/// the element layout, with the groups' `d`, `d*Σq` and `Σq`, if `isa` has a
/// chunk quantizer (AVX-512); returns false (nothing written) otherwise.
/// Bit-identical to quantizing the 8 groups one by one.
#[inline]
pub(crate) fn quantize_chunk(
    isa: Isa,
    x: &[f32; CHUNK],
    q: &mut [i8; CHUNK],
    d: &mut [f32; CG],
    sd: &mut [f32; CG],
    sumq: &mut [i32; CG],
) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: the caller checked AVX-512 availability; fixed sizes.
            unsafe { x86::chunk_avx512(x, q, d, sd, sumq) };
            true
        }
        _ => {
            let _ = (x, q, d, sd, sumq);
            false
        }
    }
}

/// Symmetric int8 quantization of a whole vector with one scale (the C8
/// cache's `quantize_kv`: `d = amax/127`, half-even rounding, ±127), if
/// `isa` has a version for `x.len()` (AVX-512, multiples of 16); `None`
/// (nothing written) otherwise. Bit-identical to the scalar code.
#[inline]
pub(crate) fn quantize_sym(isa: Isa, x: &[f32], q: &mut [i8]) -> Option<f32> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if x.len().is_multiple_of(16) && q.len() == x.len() => {
            // SAFETY: the caller checked AVX-512 availability; equal
            // lengths, a multiple of 16.
            Some(unsafe { x86::sym_avx512(x, q) })
        }
        _ => {
            let _ = (x, q);
            None
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::layout::{CG, CHUNK, G};

    /// `(d, 1/d or 0)` from the group's amax, exactly as the scalar code.
    #[inline(always)]
    fn scales(amax: f32) -> (f32, f32) {
        let d = amax / 127.0;
        (d, if d > 0.0 { 1.0 / d } else { 0.0 })
    }

    /// AVX2 group quantizer.
    ///
    /// # Safety
    /// CPU supports AVX2; `x.len() == 32`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group_avx2(x: &[f32], q: &mut [i8; G]) -> (f32, i32) {
        // SAFETY: x has 32 f32 (four 8-lane loads); q has 32 bytes (one store).
        unsafe {
            let p = x.as_ptr();
            let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)));
            let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
            let m01 = _mm256_max_ps(_mm256_and_ps(v[0], absm), _mm256_and_ps(v[1], absm));
            let m23 = _mm256_max_ps(_mm256_and_ps(v[2], absm), _mm256_and_ps(v[3], absm));
            let m = _mm256_max_ps(m01, m23);
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let (d, id) = scales(_mm_cvtss_f32(m));
            let idv = _mm256_set1_ps(id);
            let lim = _mm256_set1_epi32(127);
            let nlim = _mm256_set1_epi32(-127);
            let iv: [__m256i; 4] = std::array::from_fn(|k| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v[k], idv),
                );
                _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(r), lim), nlim)
            });
            let s = _mm256_add_epi32(
                _mm256_add_epi32(iv[0], iv[1]),
                _mm256_add_epi32(iv[2], iv[3]),
            );
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let b = _mm256_packs_epi16(
                _mm256_packs_epi32(iv[0], iv[1]),
                _mm256_packs_epi32(iv[2], iv[3]),
            );
            let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().cast(), b);
            (d, _mm_cvtsi128_si32(s))
        }
    }

    /// AVX-512 group quantizer.
    ///
    /// # Safety
    /// CPU supports AVX-512 F/BW/VL; `x.len() == 32`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn group_avx512(x: &[f32], q: &mut [i8; G]) -> (f32, i32) {
        // SAFETY: x has 32 f32 (two 16-lane loads); q has 32 bytes (two 16-byte stores).
        unsafe {
            let p = x.as_ptr();
            let v0 = _mm512_loadu_ps(p);
            let v1 = _mm512_loadu_ps(p.add(16));
            let (d, id) = scales(_mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_abs_ps(v0),
                _mm512_abs_ps(v1),
            )));
            let idv = _mm512_set1_ps(id);
            let lim = _mm512_set1_epi32(127);
            let nlim = _mm512_set1_epi32(-127);
            let cv = |v: __m512| {
                let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(v, idv),
                );
                _mm512_max_epi32(_mm512_min_epi32(r, lim), nlim)
            };
            let i0 = cv(v0);
            let i1 = cv(v1);
            _mm_storeu_si128(q.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(i0));
            _mm_storeu_si128(q.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(i1));
            (d, _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)))
        }
    }

    /// Reduces 8 vectors of 16 lanes to their 8 lane totals under `op`
    /// (any order: used for max and integer sums, both exact), as the 8
    /// lanes of the result.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[inline]
    unsafe fn reduce8(v: [__m512i; 8], op: impl Fn(__m512i, __m512i) -> __m512i) -> __m256i {
        // Pairs: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
        let p =
            |a: __m512i, b: __m512i| op(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let (r01, r23, r45, r67) = (p(v[0], v[1]), p(v[2], v[3]), p(v[4], v[5]), p(v[6], v[7]));
        // Quads: per 128-bit lane the 4 groups' partials [g0, g1, g2, g3].
        let q =
            |a: __m512i, b: __m512i| op(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
        let (s0, s1) = (q(r01, r23), q(r45, r67));
        // Across the four 128-bit lanes.
        let t = _mm512_shuffle_i32x4::<0b10_00_10_00>(s0, s1);
        let u = _mm512_shuffle_i32x4::<0b11_01_11_01>(s0, s1);
        let w = op(t, u);
        let x = _mm512_shuffle_i32x4::<0b00_00_10_00>(w, w);
        let y = _mm512_shuffle_i32x4::<0b00_00_11_01>(w, w);
        _mm512_castsi512_si256(op(x, y))
    }

    /// The chunk quantizer: [`super::quantize_chunk`] on AVX-512, the same
    /// f32 operations as [`group_avx512`] for each group (max is exact in
    /// any order, `d` and `1/d` are IEEE divisions either way), the 8
    /// groups' words then transposed into the element layout in registers.
    ///
    /// # Safety
    /// CPU supports AVX-512 F/BW/VL/DQ.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn chunk_avx512(
        x: &[f32; CHUNK],
        q: &mut [i8; CHUNK],
        d: &mut [f32; CG],
        sd: &mut [f32; CG],
        sumq: &mut [i32; CG],
    ) {
        // SAFETY: 16 loads of 16 f32 inside x (256 values); 4 stores of 64
        // bytes inside q (256 bytes); d, sd, sumq are 8 values each.
        unsafe {
            let p = x.as_ptr();
            let v: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(p.add(16 * k)));
            let m: [__m512i; 8] = std::array::from_fn(|j| {
                _mm512_castps_si512(_mm512_max_ps(
                    _mm512_abs_ps(v[2 * j]),
                    _mm512_abs_ps(v[2 * j + 1]),
                ))
            });
            // |x| as bits orders like the values (non-negative floats).
            let amax = _mm256_castsi256_ps(reduce8(m, |a, b| _mm512_max_epu32(a, b)));
            let dv = _mm256_div_ps(amax, _mm256_set1_ps(127.0));
            let pos = _mm256_cmp_ps_mask::<_CMP_GT_OQ>(dv, _mm256_setzero_ps());
            let idv = _mm256_maskz_div_ps(pos, _mm256_set1_ps(1.0), dv);
            let mut ids = [0.0f32; CG];
            _mm256_storeu_ps(ids.as_mut_ptr(), idv);
            let lim = _mm512_set1_epi32(127);
            let nlim = _mm512_set1_epi32(-127);
            let mut sums = [_mm512_setzero_si512(); 8];
            let mut packed = [_mm_setzero_si128(); 16];
            for j in 0..CG {
                let id = _mm512_set1_ps(ids[j]);
                let cv = |v: __m512| {
                    let r = _mm512_cvt_roundps_epi32::<
                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                    >(_mm512_mul_ps(v, id));
                    _mm512_max_epi32(_mm512_min_epi32(r, lim), nlim)
                };
                let (i0, i1) = (cv(v[2 * j]), cv(v[2 * j + 1]));
                sums[j] = _mm512_add_epi32(i0, i1);
                packed[2 * j] = _mm512_cvtsepi32_epi8(i0);
                packed[2 * j + 1] = _mm512_cvtsepi32_epi8(i1);
            }
            // z[p]: groups 2p and 2p+1, 8 words (dwords) each.
            let z: [__m512i; 4] = std::array::from_fn(|p| {
                let a = _mm512_castsi128_si512(packed[4 * p]);
                let a = _mm512_inserti32x4::<1>(a, packed[4 * p + 1]);
                let a = _mm512_inserti32x4::<2>(a, packed[4 * p + 2]);
                _mm512_inserti32x4::<3>(a, packed[4 * p + 3])
            });
            // Stage 1: words 0..4 (lo) and 4..8 (hi) of groups 0..4 from
            // (z0, z1), of groups 4..8 from (z2, z3), word-major.
            let lo = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
            let hi = _mm512_setr_epi32(4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31);
            let a_lo = _mm512_permutex2var_epi32(z[0], lo, z[1]);
            let a_hi = _mm512_permutex2var_epi32(z[0], hi, z[1]);
            let b_lo = _mm512_permutex2var_epi32(z[2], lo, z[3]);
            let b_hi = _mm512_permutex2var_epi32(z[2], hi, z[3]);
            // Stage 2: words (t, t+1) of all 8 groups, group-minor.
            let even = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
            let odd =
                _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
            let out = q.as_mut_ptr();
            _mm512_storeu_si512(out.cast(), _mm512_permutex2var_epi32(a_lo, even, b_lo));
            _mm512_storeu_si512(
                out.add(64).cast(),
                _mm512_permutex2var_epi32(a_lo, odd, b_lo),
            );
            _mm512_storeu_si512(
                out.add(128).cast(),
                _mm512_permutex2var_epi32(a_hi, even, b_hi),
            );
            _mm512_storeu_si512(
                out.add(192).cast(),
                _mm512_permutex2var_epi32(a_hi, odd, b_hi),
            );
            let s = reduce8(sums, |a, b| _mm512_add_epi32(a, b));
            _mm256_storeu_ps(d.as_mut_ptr(), dv);
            _mm256_storeu_ps(sd.as_mut_ptr(), _mm256_mul_ps(dv, _mm256_cvtepi32_ps(s)));
            _mm256_storeu_si256(sumq.as_mut_ptr().cast(), s);
        }
    }

    /// [`super::quantize_sym`] on AVX-512.
    ///
    /// # Safety
    /// CPU supports AVX-512 F/BW/VL; `x.len() == q.len()`, a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn sym_avx512(x: &[f32], q: &mut [i8]) -> f32 {
        let n = x.len();
        // SAFETY: every access is a whole 16-lane vector below n (a
        // multiple of 16) in x, or 16 bytes below n in q.
        unsafe {
            let p = x.as_ptr();
            let mut m = _mm512_setzero_ps();
            for i in (0..n).step_by(16) {
                m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(p.add(i))));
            }
            let (d, id) = scales(_mm512_reduce_max_ps(m));
            let idv = _mm512_set1_ps(id);
            let lim = _mm512_set1_epi32(127);
            let nlim = _mm512_set1_epi32(-127);
            for i in (0..n).step_by(16) {
                let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), idv),
                );
                let r = _mm512_max_epi32(_mm512_min_epi32(r, lim), nlim);
                _mm_storeu_si128(q.as_mut_ptr().add(i).cast(), _mm512_cvtsepi32_epi8(r));
            }
            d
        }
    }
}
