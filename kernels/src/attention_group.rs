//! Grouped-query attention over one block of the int8 KV cache: the `g` query
//! heads that share a KV head are attended together, so each cached key and
//! value is widened from int8 to f32 once for the group instead of once per
//! head. The AVX-512 path performs, per head, exactly the f32 operations of
//! [`crate::attend`] in the same order, so results are bit-identical to
//! calling it head by head; other ISAs (and head sizes the fast path does not
//! cover) simply do that.

use std::cell::RefCell;

use crate::attention::{AttnState, online_update};
use crate::{Isa, attend};

/// Most query heads per KV head on the fast path (others go head by head).
const MAX_GROUP: usize = 64;

thread_local! {
    /// Widened keys or values of the current block (`n * head_dim` f32).
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attend the `sts.len()` query heads in `qs` (head-major, `head_dim` each)
/// that share one KV head over `n = k_scales.len()` contiguous cached tokens;
/// the same as calling [`attend`] for each head with its own state.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    isa: Isa,
    qs: &[f32],
    k: &[i8],
    k_scales: &[f32],
    v: &[i8],
    v_scales: &[f32],
    scale: f32,
    sts: &mut [AttnState],
) {
    let g = sts.len();
    let Some(hd) = sts.first().map(|s| s.head_dim) else {
        return;
    };
    assert!(
        qs.len() == g * hd && sts.iter().all(|s| s.head_dim == hd),
        "attend_group: {g} heads of {hd} need {} query values, got {}",
        g * hd,
        qs.len()
    );
    let isa = isa.checked();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && (2..=MAX_GROUP).contains(&g) && hd.is_multiple_of(16) && hd <= 256 {
        let n = k_scales.len();
        assert!(
            k.len() == n * hd && v.len() == n * hd && v_scales.len() == n,
            "attend_group: head_dim {hd}, n {n}: k {} and v {} (want {}), v_scales {} (want {n})",
            k.len(),
            v.len(),
            n * hd,
            v_scales.len()
        );
        if n == 0 {
            return;
        }
        WIDE.with(|w| {
            let mut wide = w.borrow_mut();
            wide.resize(n * hd, 0.0);
            // SAFETY: AVX-512 was checked above; `wide` has n*hd values like `k`.
            unsafe { x86::widen(k, &mut wide) };
            let mut corrs = [None; MAX_GROUP];
            for (j, st) in sts.iter_mut().enumerate() {
                let mut scores = std::mem::take(&mut st.scores);
                scores.resize(n, 0.0);
                let q = &qs[j * hd..(j + 1) * hd];
                // SAFETY: AVX-512; q has hd (a multiple of 16, <= 256) values
                // and `wide` n rows of hd.
                unsafe { x86::scores(q, &wide, k_scales, scale, &mut scores) };
                corrs[j] = online_update(isa, st, &mut scores, v_scales);
                st.scores = scores;
            }
            // SAFETY: as above, for `v`.
            unsafe { x86::widen(v, &mut wide) };
            for (st, corr) in sts.iter_mut().zip(corrs) {
                if let Some(corr) = corr {
                    // SAFETY: AVX-512; acc has hd values and `wide` n rows of hd;
                    // st.scores holds the n weights.
                    unsafe { x86::accumulate(&mut st.acc, corr, &st.scores, &wide) };
                }
            }
        });
        return;
    }
    for (j, st) in sts.iter_mut().enumerate() {
        attend(
            isa,
            &qs[j * hd..(j + 1) * hd],
            k,
            k_scales,
            v,
            v_scales,
            scale,
            st,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `dst[i] = src[i] as f32`.
    ///
    /// # Safety
    /// AVX-512F; `dst.len() == src.len()`, a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(src: &[i8], dst: &mut [f32]) {
        debug_assert_eq!(src.len(), dst.len());
        // SAFETY: 16 values at a time, all below len (a multiple of 16).
        unsafe {
            for i in (0..src.len()).step_by(16) {
                let x = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(
                    dst.as_mut_ptr().add(i),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)),
                );
            }
        }
    }

    /// q·k of one token from widened keys, as `attention_simd`'s `dot_token`
    /// forms it (even vectors into one sum, odd into another).
    ///
    /// # Safety
    /// `q` and `kp` readable for `16 * nv` f32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot(q: *const f32, kp: *const f32, nv: usize) -> __m512 {
        // SAFETY: j < nv, so every load is inside both rows.
        unsafe {
            let ld = |p: *const f32, j: usize| _mm512_loadu_ps(p.add(16 * j));
            let mut a0 = _mm512_setzero_ps();
            let mut a1 = _mm512_setzero_ps();
            let mut j = 0;
            while j + 1 < nv {
                a0 = _mm512_fmadd_ps(ld(q, j), ld(kp, j), a0);
                a1 = _mm512_fmadd_ps(ld(q, j + 1), ld(kp, j + 1), a1);
                j += 2;
            }
            if j < nv {
                a0 = _mm512_fmadd_ps(ld(q, j), ld(kp, j), a0);
            }
            _mm512_add_ps(a0, a1)
        }
    }

    /// `scores[t] = scale * ks[t] * q·k[t]` with the same reductions as
    /// `attention_simd`'s AVX-512 scores (4 tokens transposed, then singles).
    ///
    /// # Safety
    /// AVX-512F/DQ; `q.len() % 16 == 0`; `k` holds `scores.len()` rows of `q.len()`.
    #[target_feature(enable = "avx512f,avx512dq,avx2")]
    pub(super) unsafe fn scores(q: &[f32], k: &[f32], ks: &[f32], scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let nv = hd / 16;
        let n = scores.len();
        let sc = _mm_set1_ps(scale);
        // SAFETY: token t reads k[t*hd..(t+1)*hd]; four tokens t..t+4 <= n per step.
        unsafe {
            let qp = q.as_ptr();
            let mut t = 0;
            while t + 4 <= n {
                let a: [__m512; 4] =
                    std::array::from_fn(|u| dot(qp, k.as_ptr().add((t + u) * hd), nv));
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
                let d = _mm512_reduce_add_ps(dot(qp, k.as_ptr().add(t * hd), nv));
                scores[t] = scale * ks[t] * d;
                t += 1;
            }
        }
    }

    /// `acc = acc * corr + Σ_t w[t] * v[t]` from widened values, in the order
    /// of `attention_simd`'s AVX-512 accumulate.
    ///
    /// # Safety
    /// AVX-512F; `acc.len() % 16 == 0`; `v` holds `w.len()` rows of `acc.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate(acc: &mut [f32], corr: f32, w: &[f32], v: &[f32]) {
        let hd = acc.len();
        let c = _mm512_set1_ps(corr);
        // SAFETY: blocks of up to 8 vectors of acc and the matching values of
        // each token row of v.
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
                        a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(16 * j)), pv, a[j]);
                    }
                }
                for j in 0..nv {
                    _mm512_storeu_ps(ap.add(16 * j), a[j]);
                }
                base += 16 * nv;
            }
        }
    }
}
