//! The inner loops of [`crate::attend`] per ISA: int8-key scores and the
//! rescale-and-accumulate of int8 values.

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
    let _ = isa;
    scores_scalar(q, k, k_scales, scale, scores)
}

/// `acc = acc * corr + Σ_t w[t] * v[t*hd..]`.
pub(crate) fn accumulate(isa: Isa, acc: &mut [f32], corr: f32, w: &[f32], v: &[i8]) {
    let _ = isa;
    accumulate_scalar(acc, corr, w, v)
}

pub(crate) fn scores_scalar(q: &[f32], k: &[i8], k_scales: &[f32], scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    for (t, s) in scores.iter_mut().enumerate() {
        let kt = &k[t * hd..(t + 1) * hd];
        let dot: f32 = q.iter().zip(kt).map(|(&a, &b)| a * b as f32).sum();
        *s = scale * k_scales[t] * dot;
    }
}

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
