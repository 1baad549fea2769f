//! The Walsh-Hadamard rotation that spreads outliers before int8 rounding.
//! [`hadamard32`] multiplies every consecutive block of 32 values by the
//! unnormalised Hadamard matrix `H` (entries ±1, `H·H = 32·I`) and then by a
//! scale. A hidden state or a key with one huge channel becomes, in the
//! rotated basis, 32 values of similar size, so a per-group int8 scale wastes
//! far fewer levels; rotating back with scale `1/32` undoes it. Each stage is
//! one exact add or subtract per value, in the same pairing and order on every
//! ISA, so the scalar reference and the SIMD versions agree bit for bit.

use crate::Isa;

/// Values per rotated block.
pub const HADAMARD_BLOCK: usize = 32;

/// `x[b] = scale · H₃₂ · x[b]` for every complete block `b` of 32 values; a
/// tail shorter than 32 is left as it is. `H₃₂` is its own inverse up to a
/// factor of 32: `hadamard32(x, 1.0)` then `hadamard32(x, 1.0 / 32.0)`
/// returns `x` (up to rounding in the sums). With a power-of-two `scale` the
/// scaling is exact.
pub fn hadamard32(isa: Isa, x: &mut [f32], scale: f32) {
    match isa.checked() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 availability checked by `Isa::checked`.
        Isa::Avx512 => unsafe { avx512::hadamard32(x, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA availability checked by `Isa::checked`.
        Isa::Avx2 => unsafe { avx2::hadamard32(x, scale) },
        _ => scalar::hadamard32(x, scale),
    }
}

pub(crate) mod scalar {
    use super::HADAMARD_BLOCK;

    /// The reference: butterflies of width 1, 2, 4, 8 and 16, in that order.
    pub(crate) fn hadamard32(x: &mut [f32], scale: f32) {
        for b in x.chunks_exact_mut(HADAMARD_BLOCK) {
            let mut w = 1;
            while w < HADAMARD_BLOCK {
                for j in 0..HADAMARD_BLOCK {
                    if j & w == 0 {
                        let (lo, hi) = (b[j], b[j + w]);
                        b[j] = lo + hi;
                        b[j + w] = lo - hi;
                    }
                }
                w *= 2;
            }
            b.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::HADAMARD_BLOCK;

    /// One butterfly stage of width `w` < 16 inside a vector: lane `j` gets
    /// `x[j] + x[j^w]` where bit `w` of `j` is clear and `x[j^w] - x[j]` where
    /// it is set (`fma(x, ±1, partner)` is exact: one rounding of the sum).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn stage(v: __m512, w: i32) -> __m512 {
        let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(w)), v);
        let high = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(w));
        let sign = _mm512_mask_blend_ps(high, _mm512_set1_ps(1.0), _mm512_set1_ps(-1.0));
        _mm512_fmadd_ps(v, sign, partner)
    }

    /// # Safety
    /// The CPU supports AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn hadamard32(x: &mut [f32], scale: f32) {
        let s = _mm512_set1_ps(scale);
        for b in x.chunks_exact_mut(HADAMARD_BLOCK) {
            let p = b.as_mut_ptr();
            // SAFETY: the block holds 32 values: two vectors of 16.
            unsafe {
                let (mut lo, mut hi) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                for w in [1, 2, 4, 8] {
                    lo = stage(lo, w);
                    hi = stage(hi, w);
                }
                let (a, d) = (_mm512_add_ps(lo, hi), _mm512_sub_ps(lo, hi));
                _mm512_storeu_ps(p, _mm512_mul_ps(a, s));
                _mm512_storeu_ps(p.add(16), _mm512_mul_ps(d, s));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::HADAMARD_BLOCK;

    /// Butterflies of width 1, 2 and 4 inside one vector of 8 (see the
    /// AVX-512 `stage`: partner plus or minus self, exactly rounded).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn in_vector(v: __m256) -> __m256 {
        let v = _mm256_fmadd_ps(
            v,
            _mm256_setr_ps(1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0),
            _mm256_permute_ps::<0b10_11_00_01>(v),
        );
        let v = _mm256_fmadd_ps(
            v,
            _mm256_setr_ps(1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0),
            _mm256_permute_ps::<0b01_00_11_10>(v),
        );
        _mm256_fmadd_ps(
            v,
            _mm256_setr_ps(1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0),
            _mm256_permute2f128_ps::<0x01>(v, v),
        )
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hadamard32(x: &mut [f32], scale: f32) {
        let s = _mm256_set1_ps(scale);
        for b in x.chunks_exact_mut(HADAMARD_BLOCK) {
            let p = b.as_mut_ptr();
            // SAFETY: the block holds 32 values: four vectors of 8.
            unsafe {
                let v0 = in_vector(_mm256_loadu_ps(p));
                let v1 = in_vector(_mm256_loadu_ps(p.add(8)));
                let v2 = in_vector(_mm256_loadu_ps(p.add(16)));
                let v3 = in_vector(_mm256_loadu_ps(p.add(24)));
                // Width 8, then width 16.
                let (a0, a1) = (_mm256_add_ps(v0, v1), _mm256_sub_ps(v0, v1));
                let (a2, a3) = (_mm256_add_ps(v2, v3), _mm256_sub_ps(v2, v3));
                _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_add_ps(a0, a2), s));
                _mm256_storeu_ps(p.add(8), _mm256_mul_ps(_mm256_add_ps(a1, a3), s));
                _mm256_storeu_ps(p.add(16), _mm256_mul_ps(_mm256_sub_ps(a0, a2), s));
                _mm256_storeu_ps(p.add(24), _mm256_mul_ps(_mm256_sub_ps(a1, a3), s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_h32_are_orthogonal_sign_patterns() {
        // H·e_k is column k of H: ±1 everywhere, with H[0][k] = +1.
        for k in [0, 1, 5, 31] {
            let mut x = vec![0.0f32; 32];
            x[k] = 1.0;
            scalar::hadamard32(&mut x, 1.0);
            assert!(x.iter().all(|v| v.abs() == 1.0));
            assert_eq!(x[0], 1.0);
            assert_eq!(
                x.iter().filter(|v| **v > 0.0).count(),
                if k == 0 { 32 } else { 16 }
            );
        }
    }

    #[test]
    fn applying_twice_with_one_over_32_is_the_identity() {
        let x: Vec<f32> = (0..70)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.75)
            .collect();
        let mut y = x.clone();
        scalar::hadamard32(&mut y, 1.0);
        scalar::hadamard32(&mut y, 1.0 / 32.0);
        // Small integers times 0.75: every partial sum is exact.
        assert_eq!(x, y);
    }
}
