//! Per-ISA versions of the activation group quantizer; each reproduces
//! [`crate::qacts::quantize_group_scalar`] bit for bit: the same f32 amax (max is
//! exact in any order), the same scalar `d` and `1/d`, the same products, and
//! round-half-even independent of MXCSR, then a clamp to ±127.

use crate::Isa;
use crate::layout::G;
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::layout::G;

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
}
