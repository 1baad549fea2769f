//! Attention over an int8 (C8) KV cache: per-head symmetric quantization of
//! keys/values, and a flash-attention style online-softmax accumulator that
//! consumes the cache in blocks of tokens, with ISA dispatch.

use crate::Isa;

/// Quantize one head vector to symmetric int8 (`q = round(x/d)`, `d = amax/127`)
/// into `out`; returns `d`.
pub fn quantize_kv(x: &[f32], out: &mut [i8]) -> f32 {
    assert_eq!(
        x.len(),
        out.len(),
        "quantize_kv: x has {} values, out {}; they must match",
        x.len(),
        out.len()
    );
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = round_half_even(v * id).clamp(-127.0, 127.0) as i8;
    }
    d
}

/// [`quantize_kv`] with `isa`'s quantizer: the same bits (the same amax,
/// `d`, `1/d`, products and half-even rounding), on AVX-512 for head sizes
/// that are a multiple of 16.
pub fn quantize_kv_with(isa: Isa, x: &[f32], out: &mut [i8]) -> f32 {
    // A length mismatch falls through to `quantize_kv`, which reports it.
    crate::qacts_simd::quantize_sym(isa.checked(), x, out).unwrap_or_else(|| quantize_kv(x, out))
}

/// `x.round_ties_even()` for |x| < 2^22, without a libm call: adding and
/// subtracting 1.5 * 2^23 leaves no fraction bits, and f32 addition rounds
/// to nearest-even. Baseline x86-64 (no SSE4.1 `roundps`) otherwise calls
/// `rintf` per value; this form vectorizes. Larger |x| (only NaN/inf or
/// values clamped right after) may differ, which the clamp then hides.
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Online-softmax state for one query head: running max, running sum of
/// exponentials and the weighted sum of values.
#[derive(Clone, Debug)]
pub struct AttnState {
    pub(crate) head_dim: usize,
    max: f32,
    sum: f32,
    pub(crate) acc: Vec<f32>,
    pub(crate) scores: Vec<f32>,
}

impl AttnState {
    /// A fresh state for heads of `head_dim`.
    pub fn new(head_dim: usize) -> Self {
        AttnState {
            head_dim,
            max: f32::NEG_INFINITY,
            sum: 0.0,
            acc: vec![0.0; head_dim],
            scores: Vec::new(),
        }
    }

    /// Forget all tokens seen.
    pub fn reset(&mut self) {
        self.max = f32::NEG_INFINITY;
        self.sum = 0.0;
        self.acc.fill(0.0);
    }

    /// Head size.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// Attend one query head over `n = k_scales.len()` contiguous cached tokens
/// (`k`, `v`: `n*head_dim` int8, token-major); score = `scale * q·(k*ks)`.
/// Call repeatedly over blocks of the cache in token order, then [`attend_finish`].
pub fn attend(
    isa: Isa,
    q: &[f32],
    k: &[i8],
    k_scales: &[f32],
    v: &[i8],
    v_scales: &[f32],
    scale: f32,
    st: &mut AttnState,
) {
    let hd = st.head_dim;
    assert!(
        q.len() == hd,
        "attend: head_dim {hd}: q has {} values",
        q.len()
    );
    let n = check_block("attend", hd, k, k_scales, v, v_scales);
    if n == 0 {
        return;
    }
    let isa = isa.checked();
    let mut scores = std::mem::take(&mut st.scores);
    scores.resize(n, 0.0);
    crate::attention_simd::scores(isa, q, k, k_scales, scale, &mut scores);
    if let Some(corr) = online_update(isa, st, &mut scores, v_scales) {
        crate::attention_simd::accumulate(isa, &mut st.acc, corr, &scores, v);
    }
    st.scores = scores;
}

/// The online-softmax step for one block of `scores` (turned into value
/// weights in place): updates the running max and sum of `st` and returns the
/// factor the accumulated values must be rescaled by, or `None` when every
/// score so far is -inf (nothing to accumulate).
/// Checks that a cache block of `n = k_scales.len()` tokens holds `n *
/// head_dim` keys and values and `n` value scales; returns n.
pub(crate) fn check_block(
    what: &str,
    hd: usize,
    k: &[i8],
    k_scales: &[f32],
    v: &[i8],
    v_scales: &[f32],
) -> usize {
    let n = k_scales.len();
    assert!(
        k.len() == n * hd && v.len() == n * hd && v_scales.len() == n,
        "{what}: head_dim {hd}, n {n}: k {} and v {} (want {}), v_scales {} (want {n})",
        k.len(),
        v.len(),
        n * hd,
        v_scales.len()
    );
    n
}

pub(crate) fn online_update(
    isa: Isa,
    st: &mut AttnState,
    scores: &mut [f32],
    v_scales: &[f32],
) -> Option<f32> {
    let bmax = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = st.max.max(bmax);
    if new_max == f32::NEG_INFINITY {
        return None;
    }
    let corr = (st.max - new_max).exp();
    st.sum *= corr;
    st.sum += crate::attention_simd::weights(isa, scores, new_max, v_scales);
    st.max = new_max;
    Some(corr)
}

/// Write the attention output (`acc / sum`) of `st` into `out[..head_dim]`;
/// zeros if no token was attended.
pub fn attend_finish(st: &AttnState, out: &mut [f32]) {
    let out = &mut out[..st.head_dim];
    if st.sum > 0.0 {
        let inv = 1.0 / st.sum;
        for (o, &a) in out.iter_mut().zip(&st.acc) {
            *o = a * inv;
        }
    } else {
        out.fill(0.0);
    }
}
