//! AVX-512 elementwise kernels and the 16-lane `exp` they share with the
//! AVX-512 attention code. Tails use masked loads and stores.

use std::arch::x86_64::*;

/// `e^x` for 16 lanes; same method and special cases as `avx2::exp8`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn exp16(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(-87.336_55);
    let hi = _mm512_set1_ps(88.722_83);
    let xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.376_26));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let y = _mm512_fmadd_ps(
        _mm512_mul_ps(p, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    let y = _mm512_scalef_ps(y, n);
    let y = _mm512_maskz_mov_ps(!_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo), y);
    _mm512_mask_mov_ps(
        y,
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi),
        _mm512_set1_ps(f32::INFINITY),
    )
}

/// Mask of the first `n` (< 16) lanes.
#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// RMSNorm.
///
/// # Safety
/// CPU supports AVX-512F; all slices have equal length.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let body = n / 16 * 16;
    let k = tail_mask(n - body);
    // SAFETY: full loads/stores at offsets < body; the tail is masked to the
    // n - body valid lanes (masked-off lanes are not accessed).
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        while i + 32 <= body {
            let a = _mm512_loadu_ps(x.as_ptr().add(i));
            let b = _mm512_loadu_ps(x.as_ptr().add(i + 16));
            acc[0] = _mm512_fmadd_ps(a, a, acc[0]);
            acc[1] = _mm512_fmadd_ps(b, b, acc[1]);
            i += 32;
        }
        if i < body {
            let a = _mm512_loadu_ps(x.as_ptr().add(i));
            acc[0] = _mm512_fmadd_ps(a, a, acc[0]);
        }
        let t = _mm512_maskz_loadu_ps(k, x.as_ptr().add(body));
        acc[1] = _mm512_fmadd_ps(t, t, acc[1]);
        let ss = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        let inv = 1.0 / (ss / n as f32 + eps).sqrt();
        let iv = _mm512_set1_ps(inv);
        let mut i = 0;
        while i < body {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), iv);
            _mm512_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm512_mul_ps(v, _mm512_loadu_ps(weight.as_ptr().add(i))),
            );
            i += 16;
        }
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(body)), iv);
        let w = _mm512_maskz_loadu_ps(k, weight.as_ptr().add(body));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(body), k, _mm512_mul_ps(v, w));
    }
}

/// `silu(g) * u` on 16 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
fn silu_mul(g: __m512, u: __m512) -> __m512 {
    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(_mm512_set1_ps(1.0), e))
}

/// SwiGLU.
///
/// # Safety
/// CPU supports AVX-512F; all slices have equal length.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len();
    let body = n / 16 * 16;
    let k = tail_mask(n - body);
    // SAFETY: offsets < body, tail masked to valid lanes.
    unsafe {
        let mut i = 0;
        while i < body {
            let y = silu_mul(
                _mm512_loadu_ps(gate.as_ptr().add(i)),
                _mm512_loadu_ps(up.as_ptr().add(i)),
            );
            _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 16;
        }
        let g = _mm512_maskz_loadu_ps(k, gate.as_ptr().add(body));
        let u = _mm512_maskz_loadu_ps(k, up.as_ptr().add(body));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(body), k, silu_mul(g, u));
    }
}

/// Softmax in place (non-empty).
///
/// # Safety
/// CPU supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let body = n / 16 * 16;
    let k = tail_mask(n - body);
    let p = x.as_mut_ptr();
    // SAFETY: offsets < body, tail masked to valid lanes.
    unsafe {
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut mv = _mm512_mask_loadu_ps(ninf, k, p.add(body));
        let mut i = 0;
        while i < body {
            mv = _mm512_max_ps(mv, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        let m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        let mut sv = _mm512_setzero_ps();
        let mut i = 0;
        while i < body {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
            _mm512_storeu_ps(p.add(i), e);
            sv = _mm512_add_ps(sv, e);
            i += 16;
        }
        let e = _mm512_maskz_mov_ps(
            k,
            exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(body)), m)),
        );
        _mm512_mask_storeu_ps(p.add(body), k, e);
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(sv, e));
        let iv = _mm512_set1_ps(1.0 / sum);
        let mut i = 0;
        while i < body {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), iv));
            i += 16;
        }
        _mm512_mask_storeu_ps(
            p.add(body),
            k,
            _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(body)), iv),
        );
    }
}

/// `acc += s * x`.
///
/// # Safety
/// CPU supports AVX-512F; equal lengths.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn add_scaled(acc: &mut [f32], x: &[f32], s: f32) {
    let n = acc.len();
    let body = n / 16 * 16;
    let k = tail_mask(n - body);
    let sv = _mm512_set1_ps(s);
    // SAFETY: offsets < body, tail masked to valid lanes.
    unsafe {
        let mut i = 0;
        while i < body {
            let a = acc.as_mut_ptr().add(i);
            _mm512_storeu_ps(
                a,
                _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr().add(i)), sv, _mm512_loadu_ps(a)),
            );
            i += 16;
        }
        let a = acc.as_mut_ptr().add(body);
        let v = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(k, x.as_ptr().add(body)),
            sv,
            _mm512_maskz_loadu_ps(k, a),
        );
        _mm512_mask_storeu_ps(a, k, v);
    }
}
