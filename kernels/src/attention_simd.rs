//! The inner loops of [`crate::attend`] per ISA: int8-key scores and the
//! rescale-and-accumulate of int8 values. The SIMD versions handle head sizes
//! that are a multiple of their vector width (8 or 16; every real model) and
//! fall back to scalar otherwise. Sums are in a different order than the scalar
//! reference, so results agree to f32 rounding, not bit for bit.

use crate::Isa;

/// `scores[t] = scale * k_scales[t] * Σ_i q[i] * k[t*hd + i]`.
pub(crate) fn scores(
    isa: Isa,
    q: &[f32],
    k: &[i8],
    k_scales: &[f32],
    scale: f32,
    scores: &mut [f32],
) {
    let hd = q.len();
    debug_assert!(k.len() >= scores.len() * hd && k_scales.len() >= scores.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 checked by the caller; lengths checked by `attend`.
        Isa::Avx512 if hd.is_multiple_of(16) && hd <= 16 * x86::MAX_VECS => unsafe {
            x86::scores_avx512(q, k, k_scales, scale, scores)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 (or better) checked by the caller; lengths checked by `attend`.
        Isa::Avx2 | Isa::Avx512 if hd.is_multiple_of(8) => unsafe {
            x86::scores_avx2(q, k, k_scales, scale, scores)
        },
        _ => scores_scalar(q, k, k_scales, scale, scores),
    }
}

/// `acc = acc * corr + Σ_t w[t] * v[t*hd..]` with `hd = acc.len()`.
pub(crate) fn accumulate(isa: Isa, acc: &mut [f32], corr: f32, w: &[f32], v: &[i8]) {
    let hd = acc.len();
    debug_assert!(v.len() >= w.len() * hd);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 checked by the caller; lengths checked by `attend`.
        Isa::Avx512 if hd.is_multiple_of(16) => unsafe { x86::accumulate_avx512(acc, corr, w, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 (or better) checked by the caller; lengths checked by `attend`.
        Isa::Avx2 | Isa::Avx512 if hd.is_multiple_of(8) => unsafe {
            x86::accumulate_avx2(acc, corr, w, v)
        },
        _ => accumulate_scalar(acc, corr, w, v),
    }
}

/// Turn scores into value weights: `p = exp(s - max)`, `s := p * v_scales[t]`;
/// returns `Σ p` (the softmax denominator contribution).
pub(crate) fn weights(isa: Isa, scores: &mut [f32], max: f32, v_scales: &[f32]) -> f32 {
    debug_assert_eq!(scores.len(), v_scales.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 checked by the caller; equal lengths checked by `attend`.
        Isa::Avx512 => unsafe { x86::weights_avx512(scores, max, v_scales) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 checked by the caller; equal lengths checked by `attend`.
        Isa::Avx2 => unsafe { x86::weights_avx2(scores, max, v_scales) },
        _ => weights_scalar(scores, max, v_scales),
    }
}

/// Scalar [`weights`].
pub(crate) fn weights_scalar(scores: &mut [f32], max: f32, v_scales: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (s, &vs) in scores.iter_mut().zip(v_scales) {
        let p = (*s - max).exp();
        sum += p;
        *s = p * vs;
    }
    sum
}

/// Scalar scores.
pub(crate) fn scores_scalar(q: &[f32], k: &[i8], k_scales: &[f32], scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    for (t, s) in scores.iter_mut().enumerate() {
        let kt = &k[t * hd..(t + 1) * hd];
        let dot: f32 = q.iter().zip(kt).map(|(&a, &b)| a * b as f32).sum();
        *s = scale * k_scales[t] * dot;
    }
}

/// Scalar accumulate.
pub(crate) fn accumulate_scalar(acc: &mut [f32], corr: f32, w: &[f32], v: &[i8]) {
    let hd = acc.len();
    for a in acc.iter_mut() {
        *a *= corr;
    }
    for (t, &p) in w.iter().enumerate() {
        let vt = &v[t * hd..(t + 1) * hd];
        for (a, &x) in acc.iter_mut().zip(vt) {
            *a += p * x as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Most query vectors kept in registers (head_dim <= 256 at 16 lanes).
    pub(super) const MAX_VECS: usize = 16;

    /// q·k for one token as a 16-lane partial-sum vector.
    ///
    /// # Safety
    /// `kp` is readable for `16 * nv` bytes; `nv <= MAX_VECS`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn dot_token(qv: &[__m512; MAX_VECS], nv: usize, kp: *const i8) -> __m512 {
        let mut a0 = _mm512_setzero_ps();
        let mut a1 = _mm512_setzero_ps();
        let kv = |j: usize| {
            // SAFETY: j < nv, so the 16 bytes at kp + 16j are readable.
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(unsafe {
                _mm_loadu_si128(kp.add(16 * j).cast())
            }))
        };
        let mut j = 0;
        while j + 1 < nv {
            a0 = _mm512_fmadd_ps(qv[j], kv(j), a0);
            a1 = _mm512_fmadd_ps(qv[j + 1], kv(j + 1), a1);
            j += 2;
        }
        if j < nv {
            a0 = _mm512_fmadd_ps(qv[j], kv(j), a0);
        }
        _mm512_add_ps(a0, a1)
    }

    /// # Safety
    /// AVX-512F/BW/VL; `q.len() % 16 == 0`, `<= 256`; `k` holds `scores.len()` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn scores_avx512(
        q: &[f32],
        k: &[i8],
        ks: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let hd = q.len();
        let nv = hd / 16;
        let n = scores.len();
        // SAFETY: q has nv*16 floats; token t reads k[t*hd..(t+1)*hd]; four
        // tokens t..t+4 < n are handled per step, then single tokens.
        unsafe {
            let qv: [__m512; MAX_VECS] = std::array::from_fn(|j| {
                if j < nv {
                    _mm512_loadu_ps(q.as_ptr().add(16 * j))
                } else {
                    _mm512_setzero_ps()
                }
            });
            let sc = _mm_set1_ps(scale);
            let mut t = 0;
            while t + 4 <= n {
                let a: [__m512; 4] =
                    std::array::from_fn(|u| dot_token(&qv, nv, k.as_ptr().add((t + u) * hd)));
                // Transposed reduction: lane u of `r` is the sum of a[u].
                let h = |v: __m512| {
                    _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v))
                };
                let h01 = _mm256_hadd_ps(h(a[0]), h(a[1]));
                let h23 = _mm256_hadd_ps(h(a[2]), h(a[3]));
                let hh = _mm256_hadd_ps(h01, h23);
                let r = _mm_add_ps(_mm256_castps256_ps128(hh), _mm256_extractf128_ps::<1>(hh));
                let r = _mm_mul_ps(_mm_mul_ps(r, sc), _mm_loadu_ps(ks.as_ptr().add(t)));
                _mm_storeu_ps(scores.as_mut_ptr().add(t), r);
                t += 4;
            }
            while t < n {
                let d = _mm512_reduce_add_ps(dot_token(&qv, nv, k.as_ptr().add(t * hd)));
                scores[t] = scale * ks[t] * d;
                t += 1;
            }
        }
    }

    /// # Safety
    /// AVX2+FMA; `q.len() % 8 == 0`; `k` holds `scores.len()` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_avx2(
        q: &[f32],
        k: &[i8],
        ks: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let hd = q.len();
        let nv = hd / 8;
        // SAFETY: q has nv*8 floats; token t reads k[t*hd..(t+1)*hd].
        unsafe {
            for (t, s) in scores.iter_mut().enumerate() {
                let kp = k.as_ptr().add(t * hd);
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut j = 0;
                while j + 1 < nv {
                    let k0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        kp.add(8 * j).cast(),
                    )));
                    let k1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        kp.add(8 * j + 8).cast(),
                    )));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(8 * j)), k0, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(8 * j + 8)), k1, a1);
                    j += 2;
                }
                if j < nv {
                    let k0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        kp.add(8 * j).cast(),
                    )));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(8 * j)), k0, a0);
                }
                *s = scale * ks[t] * crate::elementwise::avx2::hsum(_mm256_add_ps(a0, a1));
            }
        }
    }

    /// # Safety
    /// AVX-512F; `v_scales.len() >= scores.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weights_avx512(scores: &mut [f32], max: f32, vs: &[f32]) -> f32 {
        let n = scores.len();
        let body = n / 16 * 16;
        let m = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        // SAFETY: full vectors at offsets < body; the tail is masked to n - body lanes.
        unsafe {
            let p = scores.as_mut_ptr();
            let mut i = 0;
            while i < body {
                let e =
                    crate::elementwise::avx512::exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
                sum = _mm512_add_ps(sum, e);
                _mm512_storeu_ps(
                    p.add(i),
                    _mm512_mul_ps(e, _mm512_loadu_ps(vs.as_ptr().add(i))),
                );
                i += 16;
            }
            let k = ((1u32 << (n - body)) - 1) as __mmask16;
            let x = _mm512_mask_loadu_ps(m, k, p.add(body));
            let e = _mm512_maskz_mov_ps(k, crate::elementwise::avx512::exp16(_mm512_sub_ps(x, m)));
            sum = _mm512_add_ps(sum, e);
            let w = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(k, vs.as_ptr().add(body)));
            _mm512_mask_storeu_ps(p.add(body), k, w);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// # Safety
    /// AVX2+FMA; `v_scales.len() >= scores.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weights_avx2(scores: &mut [f32], max: f32, vs: &[f32]) -> f32 {
        let n = scores.len();
        let body = n / 8 * 8;
        let m = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        // SAFETY: full vectors at offsets < body; the tail is scalar.
        unsafe {
            let p = scores.as_mut_ptr();
            let mut i = 0;
            while i < body {
                let e = crate::elementwise::avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
                sum = _mm256_add_ps(sum, e);
                _mm256_storeu_ps(
                    p.add(i),
                    _mm256_mul_ps(e, _mm256_loadu_ps(vs.as_ptr().add(i))),
                );
                i += 8;
            }
        }
        crate::elementwise::avx2::hsum(sum)
            + super::weights_scalar(&mut scores[body..], max, &vs[body..])
    }

    /// # Safety
    /// AVX-512F; `acc.len() % 16 == 0`; `v` holds `w.len()` rows of `acc.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate_avx512(acc: &mut [f32], corr: f32, w: &[f32], v: &[i8]) {
        let hd = acc.len();
        let c = _mm512_set1_ps(corr);
        // SAFETY: blocks of up to 8 vectors of acc (offset + 16*j < hd) and
        // matching bytes of each token row of v.
        unsafe {
            let mut base = 0;
            while base < hd {
                let nv = ((hd - base) / 16).min(8);
                let ap = acc.as_mut_ptr().add(base);
                let mut a: [__m512; 8] = std::array::from_fn(|j| {
                    if j < nv {
                        _mm512_mul_ps(_mm512_loadu_ps(ap.add(16 * j)), c)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (t, &p) in w.iter().enumerate() {
                    let vp = v.as_ptr().add(t * hd + base);
                    let pv = _mm512_set1_ps(p);
                    for j in 0..nv {
                        let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            vp.add(16 * j).cast(),
                        )));
                        a[j] = _mm512_fmadd_ps(x, pv, a[j]);
                    }
                }
                for j in 0..nv {
                    _mm512_storeu_ps(ap.add(16 * j), a[j]);
                }
                base += 16 * nv;
            }
        }
    }

    /// # Safety
    /// AVX2+FMA; `acc.len() % 8 == 0`; `v` holds `w.len()` rows of `acc.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate_avx2(acc: &mut [f32], corr: f32, w: &[f32], v: &[i8]) {
        let hd = acc.len();
        let c = _mm256_set1_ps(corr);
        // SAFETY: blocks of up to 8 vectors of acc (offset + 8*j < hd) and the
        // matching bytes of each token row of v.
        unsafe {
            let mut base = 0;
            while base < hd {
                let nv = ((hd - base) / 8).min(8);
                let ap = acc.as_mut_ptr().add(base);
                let mut a: [__m256; 8] = std::array::from_fn(|j| {
                    if j < nv {
                        _mm256_mul_ps(_mm256_loadu_ps(ap.add(8 * j)), c)
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                for (t, &p) in w.iter().enumerate() {
                    let vp = v.as_ptr().add(t * hd + base);
                    let pv = _mm256_set1_ps(p);
                    for j in 0..nv {
                        let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            vp.add(8 * j).cast(),
                        )));
                        a[j] = _mm256_fmadd_ps(x, pv, a[j]);
                    }
                }
                for j in 0..nv {
                    _mm256_storeu_ps(ap.add(8 * j), a[j]);
                }
                base += 8 * nv;
            }
        }
    }
}
