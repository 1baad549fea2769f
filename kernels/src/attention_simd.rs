//! The inner loops of [`crate::attend`] per ISA: int8-key scores over the
//! key-tile layout, and the rescale-and-accumulate of int8 values. Scores are
//! bit-identical to the scalar reference on every ISA (each is one chain of
//! fused multiply-adds over the head dimension, in order); value sums are in
//! a different order than the scalar reference, so those agree to f32
//! rounding, not bit for bit.

use crate::Isa;
use crate::attention::KEY_TILE;

/// `out[j*n + t] = (Σ_d q_j[d] * k_t[d]) * scale * k_scales[t]` for each of
/// the `qs.len() / hd` query heads `q_j` (head-major) and the `n =
/// k_scales.len()` keys `k_t` (tile layout, [`KEY_TILE`]); the sum is a
/// chain of fused multiply-adds in the order of `d`.
pub(crate) fn scores(
    isa: Isa,
    qs: &[f32],
    hd: usize,
    k: &[i8],
    k_scales: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let n = k_scales.len();
    assert!(
        hd > 0
            && qs.len().is_multiple_of(hd)
            && out.len() == qs.len() / hd * n
            && k.len() >= crate::attention::key_len(n, hd),
        "scores: head_dim {hd}, {} query values, {n} tokens, {} key bytes, {} outputs",
        qs.len(),
        k.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 checked by the caller; lengths checked above.
        Isa::Avx512 => unsafe { x86::scores_avx512(qs, hd, k, k_scales, scale, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2+FMA checked by the caller; lengths checked above.
        Isa::Avx2 => unsafe { x86::scores_avx2(qs, hd, k, k_scales, scale, out) },
        _ => scores_scalar(qs, hd, k, k_scales, scale, out),
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

/// The largest of `scores`, NaNs ignored (`f32::NEG_INFINITY` when empty or
/// all NaN), the same value on every ISA: a maximum does not depend on the
/// order it is taken in.
pub(crate) fn max(isa: Isa, scores: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 checked by the caller.
        Isa::Avx512 => unsafe { x86::max_avx512(scores) },
        _ => max_scalar(scores),
    }
}

/// Scalar [`max`].
pub(crate) fn max_scalar(scores: &[f32]) -> f32 {
    scores.iter().copied().fold(f32::NEG_INFINITY, f32::max)
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

/// Scalar [`scores`]: the reference every ISA reproduces bit for bit.
pub(crate) fn scores_scalar(
    qs: &[f32],
    hd: usize,
    k: &[i8],
    ks: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let n = ks.len();
    for (q, o) in qs.chunks_exact(hd).zip(out.chunks_exact_mut(n)) {
        for (t, s) in o.iter_mut().enumerate() {
            let base = crate::attention::key_offset(t, hd);
            let mut dot = 0.0f32;
            for (d, &qd) in q.iter().enumerate() {
                dot = qd.mul_add(k[base + d * KEY_TILE] as f32, dot);
            }
            *s = dot * scale * ks[t];
        }
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

    use crate::attention::KEY_TILE;

    /// Most query heads whose scores share one widening of the keys.
    const MAX_HEADS: usize = 4;

    /// [`super::scores`] on AVX-512: up to [`MAX_HEADS`] heads at a time,
    /// each dimension of a tile widened once for all of them.
    ///
    /// # Safety
    /// AVX-512F; lengths as checked by [`super::scores`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores_avx512(
        qs: &[f32],
        hd: usize,
        k: &[i8],
        ks: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let g = qs.len() / hd;
        let mut j = 0;
        while j < g {
            let h = (g - j).min(MAX_HEADS);
            // SAFETY: heads j..j+h exist in qs and out (forwarded contract).
            unsafe {
                let (q, o) = (qs.as_ptr().add(j * hd), out.as_mut_ptr().add(j * ks.len()));
                // With one head, four tiles keep four FMA chains in flight.
                match h {
                    1 => heads_avx512::<1, 4>(q, hd, k, ks, scale, o),
                    2 => heads_avx512::<2, 2>(q, hd, k, ks, scale, o),
                    3 => heads_avx512::<3, 2>(q, hd, k, ks, scale, o),
                    _ => heads_avx512::<4, 2>(q, hd, k, ks, scale, o),
                }
            }
            j += h;
        }
    }

    /// The scores of `H` heads (`q`: H rows of hd; `out`: H rows of n),
    /// `T` tiles at a time, then single tiles.
    ///
    /// # Safety
    /// AVX-512F; `q`, `out` and the key tiles as above.
    #[target_feature(enable = "avx512f")]
    unsafe fn heads_avx512<const H: usize, const T: usize>(
        q: *const f32,
        hd: usize,
        k: &[i8],
        ks: &[f32],
        scale: f32,
        out: *mut f32,
    ) {
        let tiles = ks.len().div_ceil(KEY_TILE);
        let mut i = 0;
        // SAFETY: tiles i..i+T exist (i + T <= tiles); forwarded contract.
        unsafe {
            while i + T <= tiles {
                tiles_avx512::<H, T>(q, hd, k, ks, scale, out, i);
                i += T;
            }
            while i < tiles {
                tiles_avx512::<H, 1>(q, hd, k, ks, scale, out, i);
                i += 1;
            }
        }
    }

    /// Tiles `i..i+T` for `H` heads: one `vpmovsxbd` + `vcvtdq2ps` per
    /// dimension and tile, one FMA per dimension, tile and head, each lane a
    /// token's chain. Lanes past the last token are computed and not stored.
    ///
    /// # Safety
    /// AVX-512F; tiles `i..i+T` lie inside `k`; `q` holds H rows of hd and
    /// `out` H rows of `ks.len()`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tiles_avx512<const H: usize, const T: usize>(
        q: *const f32,
        hd: usize,
        k: &[i8],
        ks: &[f32],
        scale: f32,
        out: *mut f32,
        i: usize,
    ) {
        let n = ks.len();
        let mut acc = [[_mm512_setzero_ps(); T]; H];
        // SAFETY: byte d*16 of tile i+u is inside k (whole tiles, d < hd);
        // q rows hold hd values; stores are masked to the tokens below n.
        unsafe {
            let kt = k.as_ptr().add(i * KEY_TILE * hd);
            for d in 0..hd {
                let kv: [__m512; T] = std::array::from_fn(|u| {
                    let p = kt.add(u * KEY_TILE * hd + d * KEY_TILE);
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
                });
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    let qd = _mm512_set1_ps(*q.add(h * hd + d));
                    for u in 0..T {
                        acc_h[u] = _mm512_fmadd_ps(qd, kv[u], acc_h[u]);
                    }
                }
            }
            let sc = _mm512_set1_ps(scale);
            for u in 0..T {
                let t0 = (i + u) * KEY_TILE;
                let m = if n - t0 >= 16 {
                    0xffff
                } else {
                    ((1u32 << (n - t0)) - 1) as __mmask16
                };
                let kscale = _mm512_maskz_loadu_ps(m, ks.as_ptr().add(t0));
                for (h, acc_h) in acc.iter().enumerate() {
                    let r = _mm512_mul_ps(_mm512_mul_ps(acc_h[u], sc), kscale);
                    _mm512_mask_storeu_ps(out.add(h * n + t0), m, r);
                }
            }
        }
    }

    /// [`super::scores`] on AVX2: one head alone two tiles (four FMA chains
    /// of 8 lanes) at a time; up to [`MAX_HEADS`] heads a tile at a time,
    /// each dimension of the tile widened once for all of them. Either way a
    /// score is the same chain of FMAs over the dimensions in order.
    ///
    /// # Safety
    /// AVX2+FMA; lengths as checked by [`super::scores`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_avx2(
        qs: &[f32],
        hd: usize,
        k: &[i8],
        ks: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let n = ks.len();
        let tiles = n.div_ceil(KEY_TILE);
        let g = qs.len() / hd;
        let mut j = 0;
        while j < g {
            let h = (g - j).min(MAX_HEADS);
            let (q, o) = (&qs[j * hd..(j + h) * hd], &mut out[j * n..(j + h) * n]);
            // SAFETY: tiles i..i+T exist; forwarded contract.
            unsafe {
                match h {
                    1 => {
                        let mut i = 0;
                        while i + 2 <= tiles {
                            tiles_avx2::<2>(q, k, ks, scale, o, i);
                            i += 2;
                        }
                        if i < tiles {
                            tiles_avx2::<1>(q, k, ks, scale, o, i);
                        }
                    }
                    2 => heads_avx2::<2>(q, k, ks, scale, o),
                    3 => heads_avx2::<3>(q, k, ks, scale, o),
                    _ => heads_avx2::<4>(q, k, ks, scale, o),
                }
            }
            j += h;
        }
    }

    /// Every tile for `H` heads on AVX2 (`q`: H rows of hd, `o`: H rows of
    /// `ks.len()`), a tile at a time: per dimension, the tile's 16 keys
    /// widened once and one FMA per head and 8-lane half, in the order of
    /// [`tiles_avx2`].
    ///
    /// # Safety
    /// AVX2+FMA; `k` holds the key tiles of `ks.len()` tokens; `q` holds H
    /// rows and `o` H rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn heads_avx2<const H: usize>(
        q: &[f32],
        k: &[i8],
        ks: &[f32],
        scale: f32,
        o: &mut [f32],
    ) {
        let (hd, n) = (q.len() / H, ks.len());
        for i in 0..n.div_ceil(KEY_TILE) {
            let mut acc = [[_mm256_setzero_ps(); 2]; H];
            // SAFETY: the 16 bytes at d*16 of tile i are inside k (whole
            // tiles); u*hd + d < q.len().
            unsafe {
                let kt = k.as_ptr().add(i * KEY_TILE * hd);
                for d in 0..hd {
                    let p = kt.add(d * KEY_TILE);
                    let kv: [__m256; 2] = std::array::from_fn(|half| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            p.add(8 * half).cast(),
                        )))
                    });
                    for (u, acc_u) in acc.iter_mut().enumerate() {
                        let qd = _mm256_set1_ps(*q.get_unchecked(u * hd + d));
                        for (a, kh) in acc_u.iter_mut().zip(kv) {
                            *a = _mm256_fmadd_ps(qd, kh, *a);
                        }
                    }
                }
            }
            for (u, acc_u) in acc.iter().enumerate() {
                // SAFETY: AVX2 (this fn's contract).
                unsafe { store_tile(acc_u, ks, scale, &mut o[u * n..(u + 1) * n], i) };
            }
        }
    }

    /// Writes tile `i`'s scores, `dot * scale * ks[t]`, from its two 8-lane
    /// halves of dot products into `o` (`ks.len()` values); lanes past the
    /// last token are dropped.
    ///
    /// # Safety
    /// AVX (any AVX2 caller).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store_tile(acc: &[__m256; 2], ks: &[f32], scale: f32, o: &mut [f32], i: usize) {
        let t0 = i * KEY_TILE;
        if ks.len() - t0 >= KEY_TILE && o.len() >= t0 + KEY_TILE {
            // A whole tile: the same `dot * scale * k_scale`, 8 lanes at once.
            let sc = _mm256_set1_ps(scale);
            for (half, a) in acc.iter().enumerate() {
                let at = t0 + 8 * half;
                // SAFETY: `at + 8 <= t0 + KEY_TILE` values of `ks` and `o`
                // exist (checked above).
                unsafe {
                    let k = _mm256_loadu_ps(ks.as_ptr().add(at));
                    let v = _mm256_mul_ps(_mm256_mul_ps(*a, sc), k);
                    _mm256_storeu_ps(o.as_mut_ptr().add(at), v);
                }
            }
            return;
        }
        let mut dots = [0.0f32; 16];
        // SAFETY: dots holds 16 values.
        unsafe {
            _mm256_storeu_ps(dots.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(dots.as_mut_ptr().add(8), acc[1]);
        }
        for (x, &dot) in dots.iter().enumerate().take(ks.len() - t0) {
            o[t0 + x] = dot * scale * ks[t0 + x];
        }
    }

    /// Tiles `i..i+T` of one head on AVX2 (two 8-lane halves per tile).
    ///
    /// # Safety
    /// AVX2+FMA; tiles `i..i+T` lie inside `k`; `o` holds `ks.len()` values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tiles_avx2<const T: usize>(
        q: &[f32],
        k: &[i8],
        ks: &[f32],
        scale: f32,
        o: &mut [f32],
        i: usize,
    ) {
        let hd = q.len();
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        // SAFETY: the 16 bytes at d*16 of tile i+u are inside k (whole tiles).
        unsafe {
            let kt = k.as_ptr().add(i * KEY_TILE * hd);
            for (d, &qv) in q.iter().enumerate() {
                let qd = _mm256_set1_ps(qv);
                for (u, acc_u) in acc.iter_mut().enumerate() {
                    let p = kt.add(u * KEY_TILE * hd + d * KEY_TILE);
                    for (half, a) in acc_u.iter_mut().enumerate() {
                        let kv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            p.add(8 * half).cast(),
                        )));
                        *a = _mm256_fmadd_ps(qd, kv, *a);
                    }
                }
            }
        }
        for (u, acc_u) in acc.iter().enumerate() {
            // SAFETY: AVX2 (this fn's contract).
            unsafe { store_tile(acc_u, ks, scale, o, i + u) };
        }
    }

    /// [`super::max`] on AVX-512: `vmaxps` with the running maximum as the
    /// second operand, which it returns when the score is NaN.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max_avx512(scores: &[f32]) -> f32 {
        let n = scores.len();
        let body = n / 16 * 16;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        // SAFETY: full vectors at offsets < body; the tail is masked to n -
        // body lanes, the others keep -inf.
        unsafe {
            let p = scores.as_ptr();
            let mut i = 0;
            while i < body {
                m = _mm512_max_ps(_mm512_loadu_ps(p.add(i)), m);
                i += 16;
            }
            let k = ((1u32 << (n - body)) - 1) as __mmask16;
            let x = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, p.add(body));
            m = _mm512_max_ps(x, m);
        }
        _mm512_reduce_max_ps(m)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tile_keys;

    /// Every ISA's scores carry the scalar reference's bits, for head sizes
    /// on and off the vector widths, one to six heads (register chunks of
    /// heads and the one-head path), and token counts that end on, before
    /// and after a tile boundary.
    #[test]
    fn scores_equal_scalar_bits_on_every_isa() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for hd in [8, 12, 64, 80, 128] {
            for g in 1..=6 {
                for n in [1, 15, 16, 17, 31, 32, 33, 48, 63, 64, 100] {
                    let qs: Vec<f32> = (0..g * hd)
                        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let raw: Vec<i8> = (0..n * hd).map(|_| next() as i8).collect();
                    let k = tile_keys(&raw, hd);
                    let ks: Vec<f32> = (0..n).map(|_| (next() % 100 + 1) as f32 / 3000.0).collect();
                    let mut want = vec![0.0; g * n];
                    scores_scalar(&qs, hd, &k, &ks, 0.125, &mut want);
                    for isa in Isa::all_available() {
                        let mut got = vec![f32::NAN; g * n];
                        scores(isa, &qs, hd, &k, &ks, 0.125, &mut got);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{isa} hd {hd} g {g} n {n}");
                    }
                }
            }
        }
    }

    /// Every ISA's block maximum is the scalar fold's, for lengths on, before
    /// and after the vector width, with -inf (masked positions) and NaN
    /// scores among them, and for an empty block.
    #[test]
    fn max_equals_scalar_on_every_isa() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for n in [0, 1, 5, 15, 16, 17, 31, 32, 33, 63, 64, 100] {
            for case in 0..4 {
                let v: Vec<f32> = (0..n)
                    .map(|i| match (case, next() % 5) {
                        (1, 0) => f32::NEG_INFINITY,
                        (2, 0) if i % 2 == 0 => f32::NAN,
                        (3, _) => f32::NEG_INFINITY,
                        _ => (next() % 20001) as f32 / 100.0 - 100.0,
                    })
                    .collect();
                let want = max_scalar(&v);
                for isa in Isa::all_available() {
                    let got = max(isa, &v);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{isa} n {n} case {case}: {v:?}"
                    );
                }
            }
        }
    }
}
