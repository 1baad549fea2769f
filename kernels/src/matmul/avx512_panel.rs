//! AVX-512 VNNI kernel for matrices in row panels (`crate::panel`), 4- or
//! 8-bit, for every batch size: each output lane is one weight row, so a
//! group of 32 columns is 8 `vpdpbusd` of a panel word (for 4 bits, a nibble
//! half of one) against a broadcast 4-byte activation word, then the group's
//! scale (and, for 4 bits, min) term for 16 rows at once. An 8-bit weight is
//! `q + 128` with a min of `-128 * scale`, so its offset is taken out in
//! integers instead. Activation rows go in tiles of up to [`MAX_TILE`] over
//! each panel, whose records (18 × 320 bytes for 576 4-bit columns) stay in
//! L1 between tiles; a 4-bit word is expanded once per tile.
//!
//! Every output is the same sequence of f32 operations whatever the batch
//! size or tile, so a row's logits do not depend on the batch it is in.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::layout::G;
use crate::matmul::{ActRow, Out};
use crate::panel::{PANEL_ROWS, record_bytes, words_bytes};
use crate::{QActs, QMatrix};

/// Activation rows per pass over a panel. 4-bit: its 4 words expand to 8
/// registers once per tile, so a longer tile expands less often (8 against
/// 4: one SmolLM2 m = 16 token of matmuls 17.0 -> 16.1 ms on 1 thread).
/// 8-bit: with no min accumulators, 8 words, 8 sums and 8 accumulators fit
/// the 32 registers (the Q8 head ran the same with tiles of 4).
const MAX_TILE: usize = 8;

/// Records requested ahead of the one in use, in the first tile over each
/// panel, when the batch fills at least one tile. The kernel then spends so
/// long on each record that the hardware prefetcher falls behind it and each
/// panel starts with memory stalls; the records are contiguous, so 8 records
/// ahead is the same panel's later groups or the next panel's first
/// (`probe avx512 16 smollm2`: 16.2-17.8 -> 14.6-14.9 ms on 1 thread; m = 8:
/// 8.1-8.3 -> 7.5-7.6 ms). With fewer rows the kernel streams near the read
/// bandwidth and the hints only cost issue slots (m = 1: 3.15 -> 3.8 ms on 1
/// thread), so they are off there.
const PREFETCH_AHEAD: usize = 8;

/// Panel kernel for weight rows `rows` of `w` (4- or 8-bit).
///
/// # Safety
/// Same contract as `crate::matmul::run`; the CPU has the features enabled
/// below.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    // Two instances, so the loop for small batches is compiled exactly as
    // if prefetching did not exist (sharing one body slowed m = 1 by ~10%).
    // SAFETY: forwarded contract.
    unsafe {
        if a.m() >= MAX_TILE {
            over_panels::<true>(w, a, rows, out);
        } else {
            over_panels::<false>(w, a, rows, out);
        }
    }
}

/// [`matmul_rows`]; with `PREFETCH`, the first tile over each panel
/// prefetches ([`PREFETCH_AHEAD`]).
///
/// # Safety
/// As for [`matmul_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
unsafe fn over_panels<const PREFETCH: bool>(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    let p = w.panels();
    let words = p.words();
    let acts: Vec<ActRow> = (0..a.m()).map(|i| ActRow::new(a, i)).collect();
    let first = rows.start / PANEL_ROWS;
    let last = rows.end.div_ceil(PANEL_ROWS).min(p.panels());
    for panel in first..last {
        let r0 = panel * PANEL_ROWS;
        let lo = rows.start.max(r0) - r0;
        let hi = rows.end.min(r0 + PANEL_ROWS) - r0;
        // Lanes lo..hi are this call's rows.
        let mask: __mmask16 = ((1u32 << hi) - (1u32 << lo)) as u16;
        let rec = p.panel(panel);
        let mut i0 = 0;
        while i0 < acts.len() {
            let n = (acts.len() - i0).min(MAX_TILE);
            let at = &acts[i0..i0 + n];
            let first = PREFETCH && i0 == 0;
            // SAFETY: `rec` is the whole panel (groups × RECORD bytes),
            // `words` addresses inside every activation row (cols = the
            // matrix's, checked by the caller), and the masked lanes are
            // rows of this call in `out` (caller contract).
            unsafe {
                match (p.bits(), n) {
                    (8, 1) => tile::<1, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, 2) => tile::<2, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, 3) => tile::<3, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, 4) => tile::<4, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, 5) => tile::<5, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, 6) => tile::<6, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, 7) => tile::<7, 8, false>(rec, words, at, out, i0, r0, mask),
                    (8, _) if first => tile::<8, 8, true>(rec, words, at, out, i0, r0, mask),
                    (8, _) => tile::<8, 8, false>(rec, words, at, out, i0, r0, mask),
                    (_, 1) => tile::<1, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, 2) => tile::<2, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, 3) => tile::<3, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, 4) => tile::<4, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, 5) => tile::<5, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, 6) => tile::<6, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, 7) => tile::<7, 4, false>(rec, words, at, out, i0, r0, mask),
                    (_, _) if first => tile::<8, 4, true>(rec, words, at, out, i0, r0, mask),
                    (_, _) => tile::<8, 4, false>(rec, words, at, out, i0, r0, mask),
                }
            }
            i0 += n;
        }
    }
}

/// The eight `vpdpbusd` operands of one group's record at `r`: operand `t`
/// pairs with activation word `t`. 8-bit: the record's 8 words; 4-bit: the
/// low nibbles of its 4 words, then their high nibbles.
///
/// # Safety
/// `r` is readable for the record's words (`words_bytes(BITS)` bytes).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn operands<const BITS: u8>(r: *const u8) -> [__m512i; 8] {
    // SAFETY: every load is one of the record's 64-byte words (contract).
    unsafe {
        if BITS == 8 {
            std::array::from_fn(|t| _mm512_loadu_si512(r.add(64 * t).cast()))
        } else {
            let low = _mm512_set1_epi8(0x0F);
            let raw: [__m512i; 4] =
                std::array::from_fn(|t| _mm512_loadu_si512(r.add(64 * t).cast()));
            std::array::from_fn(|t| {
                if t < 4 {
                    _mm512_and_si512(raw[t], low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw[t - 4]), low)
                }
            })
        }
    }
}

/// `init` plus one group's 8 `vpdpbusd` of the operands `wv` against the
/// activation row `q`'s words at the offsets `wd` (broadcast to every lane).
///
/// # Safety
/// `q + wd[t]` is readable for 4 bytes for every `t < 8`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn group_dot(init: __m512i, wv: &[__m512i; 8], q: *const i8, wd: &[usize]) -> __m512i {
    // SAFETY: each word is 4 bytes at an offset inside the row (contract).
    let word = |t: usize| unsafe { _mm512_set1_epi32(q.add(wd[t]).cast::<i32>().read_unaligned()) };
    let mut x = init;
    for (t, w) in wv.iter().enumerate() {
        x = _mm512_dpbusd_epi32(x, *w, word(t));
    }
    x
}

/// One `BITS`-bit panel against `M` activation rows (rows `i0..i0 + M` of
/// the output); writes the lanes of `mask` at output columns `r0..r0 + 16`.
/// A group's operands are formed once for the tile ([`operands`]).
///
/// # Safety
/// `rec` holds `words.len() / 8` records of `BITS`; each of `acts[..M]` has
/// the matrix's columns; the masked (i, r) elements of `out` are in bounds
/// and belong to the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn tile<const M: usize, const BITS: u8, const PREFETCH: bool>(
    rec: &[u8],
    words: &[usize],
    acts: &[ActRow],
    out: Out,
    i0: usize,
    r0: usize,
    mask: __mmask16,
) {
    let record = record_bytes(BITS);
    let wb = words_bytes(BITS);
    let act: [ActRow; M] = std::array::from_fn(|i| acts[i]);
    let groups = words.len() / (G / 4);
    debug_assert!(rec.len() >= groups * record);
    let base = rec.as_ptr();
    let mut facc = [_mm512_setzero_ps(); M];
    let mut macc = [_mm512_setzero_ps(); M];
    // SAFETY: record g spans bytes g*record..(g+1)*record of `rec`; word
    // offsets are element positions of the activation rows (+4 bytes inside
    // the same group); group g < groups exists in every activation row, and
    // so do its `d`, `d*Σq` and `Σq`.
    unsafe {
        for g in 0..groups {
            let r = base.add(g * record);
            if PREFETCH {
                // A prefetch never faults, and the address is only formed
                // (wrapping), not dereferenced, when it is past the panels.
                let ahead = r.wrapping_add(PREFETCH_AHEAD * record);
                let mut off = 0;
                while off < record {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                    off += 64;
                }
            }
            let wv = operands::<BITS>(r);
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(wb).cast()));
            let mn = if BITS == 4 {
                _mm512_cvtph_ps(_mm256_loadu_si256(r.add(wb + 32).cast()))
            } else {
                _mm512_setzero_ps()
            };
            let wd = &words[g * (G / 4)..(g + 1) * (G / 4)];
            for i in 0..M {
                // 8-bit: u = q + 128 with min = -128*scale (asserted when the
                // panels are built), so the offset comes out in integers and
                // there is no f32 min term (the compiler drops `macc`).
                let init = if BITS == 8 {
                    _mm512_set1_epi32(-128 * *act[i].sumq.add(g))
                } else {
                    _mm512_setzero_si512()
                };
                let x = group_dot(init, &wv, act[i].q, wd);
                let d = _mm512_set1_ps(*act[i].d.add(g));
                facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(x), _mm512_mul_ps(s, d), facc[i]);
                if BITS == 4 {
                    let sd = _mm512_set1_ps(*act[i].sd.add(g));
                    macc[i] = _mm512_fmadd_ps(mn, sd, macc[i]);
                }
            }
        }
        for i in 0..M {
            let y = if BITS == 4 {
                _mm512_add_ps(facc[i], macc[i])
            } else {
                facc[i]
            };
            let at = (i0 + i) * out.stride + r0;
            _mm512_mask_storeu_ps(out.ptr.add(at), mask, y);
        }
    }
}
