//! AVX2+FMA elementwise kernels and the 8-lane `exp` they share with the AVX2
//! attention code. Tails shorter than a vector fall back to the scalar code.

use std::arch::x86_64::*;

use super::scalar;

/// `e^x` for 8 lanes: Cody-Waite range reduction by ln 2 and a degree-6
/// polynomial on [-ln2/2, ln2/2] (relative error ~2 ulp); exactly 0 below
/// -87.33 (so `exp(-inf) = 0`) and +inf above 88.72, like `f32::exp`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn exp8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.336_55);
    let hi = _mm256_set1_ps(88.722_83);
    let xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.376_26));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    let y = _mm256_mul_ps(y, pow2);
    let y = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, lo), y);
    _mm256_blendv_ps(
        y,
        _mm256_set1_ps(f32::INFINITY),
        _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi),
    )
}

/// Horizontal sum of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Horizontal max of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

/// RMSNorm.
///
/// # Safety
/// CPU supports AVX2+FMA; all slices have equal length.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let body = n / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load/store is at an offset < body <= len of each slice.
    unsafe {
        while i + 32 <= body {
            for (k, a) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(x.as_ptr().add(i + 8 * k));
                *a = _mm256_fmadd_ps(v, v, *a);
            }
            i += 32;
        }
        while i < body {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
            i += 8;
        }
        let mut ss = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        for &v in &x[body..] {
            ss += v * v;
        }
        let inv = 1.0 / (ss / n as f32 + eps).sqrt();
        let iv = _mm256_set1_ps(inv);
        let mut i = 0;
        while i < body {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), iv);
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(v, _mm256_loadu_ps(weight.as_ptr().add(i))),
            );
            i += 8;
        }
        for k in body..n {
            out[k] = x[k] * inv * weight[k];
        }
    }
}

/// SwiGLU.
///
/// # Safety
/// CPU supports AVX2+FMA; all slices have equal length.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let body = gate.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    // SAFETY: offsets < body <= len of each slice.
    unsafe {
        while i < body {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let y = _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 8;
        }
    }
    scalar::swiglu(&gate[body..], &up[body..], &mut out[body..]);
}

/// Softmax in place (non-empty).
///
/// # Safety
/// CPU supports AVX2+FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let body = n / 8 * 8;
    let p = x.as_mut_ptr();
    // SAFETY: offsets < body <= n.
    unsafe {
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < body {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut max = hmax(mv);
        for &v in &x[body..] {
            max = max.max(v);
        }
        let m = _mm256_set1_ps(max);
        let mut sv = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            sv = _mm256_add_ps(sv, e);
            i += 8;
        }
        let mut sum = hsum(sv);
        for v in &mut x[body..] {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        let iv = _mm256_set1_ps(inv);
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < body {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), iv));
            i += 8;
        }
        for v in &mut x[body..] {
            *v *= inv;
        }
    }
}

/// `acc += s * x`.
///
/// # Safety
/// CPU supports AVX2+FMA; equal lengths.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn add_scaled(acc: &mut [f32], x: &[f32], s: f32) {
    let body = acc.len() / 8 * 8;
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    // SAFETY: offsets < body <= len of both slices.
    unsafe {
        while i < body {
            let a = acc.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                a,
                _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sv, _mm256_loadu_ps(a)),
            );
            i += 8;
        }
    }
    scalar::add_scaled(&mut acc[body..], &x[body..], s);
}
