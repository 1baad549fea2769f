//! Attention over an int8 (C8) KV cache: per-head symmetric quantization of
//! keys/values, the key-tile layout keys are stored in, and a flash-attention
//! style online-softmax accumulator that consumes the cache in blocks of
//! tokens, with ISA dispatch.

use crate::Isa;

/// Tokens per key tile. Keys are stored *dimension-major within tiles of
/// [`KEY_TILE`] tokens*: the keys of `n` tokens of `head_dim` take
/// [`key_len`]`(n, head_dim)` bytes, tile `i` holding tokens `16i..16i+16`,
/// and byte `d * 16 + u` of a tile is element `d` of its token `u`. A score
/// kernel then loads one dimension of 16 tokens as one vector and
/// accumulates 16 scores in the lanes of a register, with no horizontal sum;
/// each score is still the sum over `d` in order, so every ISA gives the
/// scalar reference's bits. Values stay token-major (`n * head_dim`), the
/// order their accumulation wants. A block of keys passed to [`attend`]
/// starts on a tile boundary; slots of a partial last tile are ignored.
pub const KEY_TILE: usize = 16;

/// Where element 0 of token `t`'s key lies in the tile layout; element `d`
/// is [`KEY_TILE`]` * d` bytes further on.
pub fn key_offset(t: usize, head_dim: usize) -> usize {
    t / KEY_TILE * KEY_TILE * head_dim + t % KEY_TILE
}

/// Bytes of keys for `n` tokens of `head_dim` in the tile layout (whole tiles).
pub fn key_len(n: usize, head_dim: usize) -> usize {
    n.div_ceil(KEY_TILE) * KEY_TILE * head_dim
}

/// Quantizes one key (as [`quantize_kv_with`]) into token slot `t` of
/// `tiles`, keys in the tile layout ([`KEY_TILE`]); returns its scale.
pub fn store_key(isa: Isa, x: &[f32], tiles: &mut [i8], t: usize) -> f32 {
    let hd = x.len();
    let base = key_offset(t, hd);
    assert!(
        tiles.len() >= key_len(t + 1, hd),
        "store_key: token {t} of head_dim {hd} needs {} key bytes, got {}",
        key_len(t + 1, hd),
        tiles.len()
    );
    let mut small = [0i8; 256];
    let mut large = Vec::new();
    let q: &mut [i8] = if hd <= small.len() {
        &mut small[..hd]
    } else {
        large.resize(hd, 0);
        &mut large
    };
    let d = quantize_kv_with(isa, x, q);
    for (i, &v) in q.iter().enumerate() {
        tiles[base + i * KEY_TILE] = v;
    }
    d
}

/// Token-major keys (`n * head_dim`, as [`quantize_kv`] writes them) laid
/// out in tiles ([`KEY_TILE`]); unused slots of the last tile are zero.
pub fn tile_keys(keys: &[i8], head_dim: usize) -> Vec<i8> {
    assert!(
        head_dim > 0 && keys.len().is_multiple_of(head_dim),
        "tile_keys: {} key bytes are not whole rows of head_dim {head_dim}",
        keys.len()
    );
    let mut out = vec![0i8; key_len(keys.len() / head_dim, head_dim)];
    for (t, row) in keys.chunks_exact(head_dim).enumerate() {
        let base = key_offset(t, head_dim);
        for (i, &v) in row.iter().enumerate() {
            out[base + i * KEY_TILE] = v;
        }
    }
    out
}

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
/// (`k`: [`key_len`]`(n, head_dim)` int8 in the key-tile layout, starting on
/// a tile; `v`: `n*head_dim` int8, token-major); score = `(q·k) * scale * ks`.
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
    crate::attention_simd::scores(isa, q, hd, k, k_scales, scale, &mut scores);
    if let Some(corr) = online_update(isa, st, &mut scores, v_scales) {
        crate::attention_simd::accumulate(isa, &mut st.acc, corr, &scores, v);
    }
    st.scores = scores;
}

/// Checks that a cache block of `n = k_scales.len()` tokens holds
/// `key_len(n, head_dim)` keys, `n * head_dim` values and `n` value scales;
/// returns n.
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
        k.len() == key_len(n, hd) && v.len() == n * hd && v_scales.len() == n,
        "{what}: head_dim {hd}, n {n}: k {} (want {}), v {} (want {}), v_scales {} (want {n})",
        k.len(),
        key_len(n, hd),
        v.len(),
        n * hd,
        v_scales.len()
    );
    n
}

/// The online-softmax step for one block of `scores` (turned into value
/// weights in place): updates the running max and sum of `st` and returns the
/// factor the accumulated values must be rescaled by, or `None` when every
/// score so far is -inf (nothing to accumulate).
pub(crate) fn online_update(
    isa: Isa,
    st: &mut AttnState,
    scores: &mut [f32],
    v_scales: &[f32],
) -> Option<f32> {
    let bmax = crate::attention_simd::max(isa, scores);
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
