//! Grouped-query attention over one block of the int8 KV cache: the `g` query
//! heads that share a KV head are attended together, so each cached key and
//! value is widened from int8 to f32 once for the group instead of once per
//! head, in registers: keys one dimension of a 16-token tile at a time for up
//! to four heads' scores, values one token at a time for up to four heads'
//! accumulators (on AVX2, 16 dimensions of them at a time). The AVX-512 and
//! AVX2 paths perform, per head, exactly the f32 operations of
//! [`crate::attend`] on that ISA in the same order, so results are
//! bit-identical to calling it head by head; other ISAs (and head sizes the
//! fast path does not cover) simply do that.

#[cfg(target_arch = "x86_64")]
use std::cell::RefCell;

use crate::attention::AttnState;
#[cfg(target_arch = "x86_64")]
use crate::attention::{check_block, online_update};
use crate::{Isa, attend};

/// Most query heads per KV head on the fast path (others go head by head).
#[cfg(target_arch = "x86_64")]
const MAX_GROUP: usize = 64;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Scores, then weights, of the current block: `g * n` f32, head-major.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
    if matches!(isa, Isa::Avx512 | Isa::Avx2)
        && (2..=MAX_GROUP).contains(&g)
        && matches!(hd, 32 | 64 | 128 | 256)
    {
        let n = check_block("attend_group", hd, k, k_scales, v, v_scales);
        if n == 0 {
            return;
        }
        SCORES.with(|b| {
            let mut buf = b.borrow_mut();
            buf.resize(g * n, 0.0);
            crate::attention_simd::scores(isa, qs, hd, k, k_scales, scale, &mut buf);
            let mut heads = [(0usize, 0.0f32); MAX_GROUP];
            let mut live = 0;
            for (j, st) in sts.iter_mut().enumerate() {
                let w = &mut buf[j * n..(j + 1) * n];
                if let Some(corr) = online_update(isa, st, w, v_scales) {
                    heads[live] = (j, corr);
                    live += 1;
                }
            }
            // SAFETY: the ISA was checked above (`checked`); v holds n rows
            // of hd, buf g rows of n; every head index is below g.
            unsafe {
                if isa == Isa::Avx512 {
                    x86::accumulate(hd, sts, &heads[..live], &buf, v);
                } else {
                    x86::accumulate_avx2(hd, sts, &heads[..live], &buf, v);
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

    use crate::attention::AttnState;

    /// Token row `p` (`16 * NV` int8) widened to f32 registers.
    ///
    /// # Safety
    /// AVX-512F; `p` readable for `16 * NV` bytes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn widen<const NV: usize>(p: *const i8) -> [__m512; NV] {
        // SAFETY: j < NV, inside the row (caller contract).
        std::array::from_fn(|j| unsafe {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16 * j).cast())))
        })
    }

    /// For each `(j, corr)` of `heads`: `acc_j = acc_j * corr + Σ_t w_j[t] *
    /// v[t]`, with `w_j = weights[j*n..(j+1)*n]`, in the order of
    /// `attention_simd`'s AVX-512 accumulate; each value row is widened once
    /// per chunk of up to four heads.
    ///
    /// # Safety
    /// AVX-512F; `hd` is 32, 64, 128 or 256 and every state's head_dim; `v`
    /// holds n rows of hd and `weights` g*n values (n = v.len() / hd); every
    /// j < sts.len() = g.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate(
        hd: usize,
        sts: &mut [AttnState],
        heads: &[(usize, f32)],
        weights: &[f32],
        v: &[i8],
    ) {
        // SAFETY: forwarded contract; NV * 16 == hd.
        unsafe {
            match hd {
                32 => acc_chunks::<2>(sts, heads, weights, v),
                64 => acc_chunks::<4>(sts, heads, weights, v),
                128 => acc_chunks::<8>(sts, heads, weights, v),
                _ => acc_chunks::<16>(sts, heads, weights, v),
            }
        }
    }

    /// Splits `heads` into chunks whose accumulators fit in registers.
    ///
    /// # Safety
    /// As for [`accumulate`], with `hd = 16 * NV`.
    #[target_feature(enable = "avx512f")]
    unsafe fn acc_chunks<const NV: usize>(
        sts: &mut [AttnState],
        heads: &[(usize, f32)],
        weights: &[f32],
        v: &[i8],
    ) {
        let per = (16 / NV).clamp(1, 4);
        for chunk in heads.chunks(per) {
            // SAFETY: forwarded contract; chunk.len() <= per <= 4.
            unsafe {
                match chunk.len() {
                    1 => acc_heads::<NV, 1>(sts, chunk, weights, v),
                    2 => acc_heads::<NV, 2>(sts, chunk, weights, v),
                    3 => acc_heads::<NV, 3>(sts, chunk, weights, v),
                    _ => acc_heads::<NV, 4>(sts, chunk, weights, v),
                }
            }
        }
    }

    /// [`accumulate`] for exactly `H` heads.
    ///
    /// # Safety
    /// As for [`accumulate`], with `hd = 16 * NV` and `heads.len() == H`.
    #[target_feature(enable = "avx512f")]
    unsafe fn acc_heads<const NV: usize, const H: usize>(
        sts: &mut [AttnState],
        heads: &[(usize, f32)],
        weights: &[f32],
        v: &[i8],
    ) {
        let hd = 16 * NV;
        let n = v.len() / hd;
        // SAFETY: each state's acc has hd = 16*NV values; row t of v is inside
        // v for t < n; weights of head j are weights[j*n..(j+1)*n].
        unsafe {
            let mut a: [[__m512; NV]; H] = std::array::from_fn(|u| {
                let (j, corr) = heads[u];
                let c = _mm512_set1_ps(corr);
                let p = sts[j].acc.as_ptr();
                std::array::from_fn(|x| _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * x)), c))
            });
            let w: [*const f32; H] = std::array::from_fn(|u| weights.as_ptr().add(heads[u].0 * n));
            for t in 0..n {
                let vr = widen::<NV>(v.as_ptr().add(t * hd));
                for u in 0..H {
                    let pv = _mm512_set1_ps(*w[u].add(t));
                    for x in 0..NV {
                        a[u][x] = _mm512_fmadd_ps(vr[x], pv, a[u][x]);
                    }
                }
            }
            for u in 0..H {
                let p = sts[heads[u].0].acc.as_mut_ptr();
                for x in 0..NV {
                    _mm512_storeu_ps(p.add(16 * x), a[u][x]);
                }
            }
        }
    }

    /// [`accumulate`] on AVX2, in the order of `attention_simd`'s AVX2
    /// accumulate: each head's accumulator times its correction, then one
    /// FMA per token; up to four heads and 16 dimensions at a time, so each
    /// 16 bytes of a value row are widened once for the heads of a chunk.
    ///
    /// # Safety
    /// AVX2+FMA; `hd` is a multiple of 16 and every state's head_dim; `v`
    /// holds n rows of hd and `weights` g*n values (n = v.len() / hd); every
    /// j < sts.len() = g.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate_avx2(
        hd: usize,
        sts: &mut [AttnState],
        heads: &[(usize, f32)],
        weights: &[f32],
        v: &[i8],
    ) {
        for chunk in heads.chunks(4) {
            // SAFETY: forwarded contract; chunk.len() <= 4.
            unsafe {
                match chunk.len() {
                    1 => acc_heads_avx2::<1>(hd, sts, chunk, weights, v),
                    2 => acc_heads_avx2::<2>(hd, sts, chunk, weights, v),
                    3 => acc_heads_avx2::<3>(hd, sts, chunk, weights, v),
                    _ => acc_heads_avx2::<4>(hd, sts, chunk, weights, v),
                }
            }
        }
    }

    /// [`accumulate_avx2`] for exactly `H` heads.
    ///
    /// # Safety
    /// As for [`accumulate_avx2`], with `heads.len() == H`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn acc_heads_avx2<const H: usize>(
        hd: usize,
        sts: &mut [AttnState],
        heads: &[(usize, f32)],
        weights: &[f32],
        v: &[i8],
    ) {
        let n = v.len() / hd;
        // SAFETY: each state's acc has hd values and base + 16 <= hd; row t
        // of v is inside v for t < n; weights of head j are
        // weights[j*n..(j+1)*n].
        unsafe {
            let w: [*const f32; H] = std::array::from_fn(|u| weights.as_ptr().add(heads[u].0 * n));
            let mut base = 0;
            while base < hd {
                let mut a: [[__m256; 2]; H] = std::array::from_fn(|u| {
                    let (j, corr) = heads[u];
                    let c = _mm256_set1_ps(corr);
                    let p = sts[j].acc.as_ptr().add(base);
                    std::array::from_fn(|x| _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * x)), c))
                });
                for t in 0..n {
                    let vp = v.as_ptr().add(t * hd + base);
                    let x: [__m256; 2] = std::array::from_fn(|h| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            vp.add(8 * h).cast(),
                        )))
                    });
                    for u in 0..H {
                        let pv = _mm256_set1_ps(*w[u].add(t));
                        for (acc, xv) in a[u].iter_mut().zip(x) {
                            *acc = _mm256_fmadd_ps(xv, pv, *acc);
                        }
                    }
                }
                for u in 0..H {
                    let p = sts[heads[u].0].acc.as_mut_ptr().add(base);
                    for (x, acc) in a[u].iter().enumerate() {
                        _mm256_storeu_ps(p.add(8 * x), *acc);
                    }
                }
                base += 16;
            }
        }
    }
}
