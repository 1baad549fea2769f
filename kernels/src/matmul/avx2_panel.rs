//! AVX2 kernel for matrices in row panels (`crate::panel`), 4- or 8-bit, for
//! every batch size. A 256-bit register holds half of a 64-byte panel word:
//! 8 weight rows, 4 bytes each, one row per i32 lane. Each half-panel is
//! walked on its own, so one group's 8 operands stay in registers while the
//! tile's activation rows go past them: `vpmaddubsw` against an activation
//! word broadcast to every lane gives each row's pair sums in i16, and
//! `vpmaddwd` by ones widens them to the row's 4-product sums in its lane, so
//! there is no horizontal sum and no special case for a row's last groups.
//!
//! - 4-bit: the 8 operands of a group (low and high nibbles of 4 words) are
//!   summed in i16 before one widening: a pair sum is at most 2·15·128 = 3840,
//!   and 8 of them stay under 32767.
//! - 8-bit: `u` up to 255 would saturate `vpmaddubsw`, so the kernel works on
//!   `v = u - 128` with the sign trick, `maddubs(|v|, sign(q, v)) = v·q`
//!   (pair sums at most 2·128·127, activations being within ±127), and widens
//!   each word. `Σ v·q` is the same integer as the AVX-512 kernel's
//!   `Σ u·q - 128·Σq`, as every 8-bit matrix has a min of `-128·scale`.
//!
//! Every output is the same sequence of f32 operations as in the AVX-512
//! panel kernel, whatever the batch size or tile, so a row's logits do not
//! depend on the batch it is in.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::layout::{CG, CHUNK, G, RowShape};
use crate::matmul::{ActRow, Out};
use crate::panel::{PANEL_ROWS, record_bytes, words_bytes};
use crate::{QActs, QMatrix};

/// Rows of a panel in one register (a half-panel).
const HALF: usize = PANEL_ROWS / 2;

/// Activation rows per pass over a half-panel.
const MAX_TILE: usize = 4;

/// Panel kernel for weight rows `rows` of `w` (4- or 8-bit).
///
/// # Safety
/// Same contract as `crate::matmul::run`; the CPU supports AVX2, FMA, F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    let p = w.panels();
    let groups = p.groups();
    let acts: Vec<ActRow> = (0..a.m()).map(|i| ActRow::new(a, i)).collect();
    let first = rows.start / PANEL_ROWS;
    let last = rows.end.div_ceil(PANEL_ROWS).min(p.panels());
    for panel in first..last {
        let r0 = panel * PANEL_ROWS;
        let rec = p.panel(panel);
        for h in 0..2 {
            let c0 = r0 + h * HALF;
            // Lanes lo..hi of this half are rows of this call.
            let lo = rows.start.max(c0).min(c0 + HALF) - c0;
            let hi = rows.end.min(c0 + HALF).max(c0) - c0;
            if lo >= hi {
                continue;
            }
            let lanes: [i32; HALF] =
                std::array::from_fn(|k| if (lo..hi).contains(&k) { -1 } else { 0 });
            // SAFETY: `lanes` is 8 i32s.
            let mask = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
            let mut i0 = 0;
            while i0 < acts.len() {
                let n = (acts.len() - i0).min(MAX_TILE);
                let at = &acts[i0..i0 + n];
                let t = Target { out, i0, c0, mask };
                // SAFETY: `rec` is the whole panel (groups × record bytes),
                // every activation row has the matrix's columns (checked by
                // the caller), and the masked lanes are rows of this call in
                // `out` (caller contract).
                unsafe {
                    match (p.bits(), n) {
                        (8, 1) => tile::<1, 8>(rec, h, groups, at, t),
                        (8, 2) => tile::<2, 8>(rec, h, groups, at, t),
                        (8, 3) => tile::<3, 8>(rec, h, groups, at, t),
                        (8, _) => tile::<4, 8>(rec, h, groups, at, t),
                        (_, 1) => tile::<1, 4>(rec, h, groups, at, t),
                        (_, 2) => tile::<2, 4>(rec, h, groups, at, t),
                        (_, 3) => tile::<3, 4>(rec, h, groups, at, t),
                        (_, _) => tile::<4, 4>(rec, h, groups, at, t),
                    }
                }
                i0 += n;
            }
        }
    }
}

/// Where a tile writes: activation rows from `i0`, output columns `c0..c0 + 8`,
/// the lanes set in `mask`.
#[derive(Clone, Copy)]
struct Target {
    out: Out,
    i0: usize,
    c0: usize,
    mask: __m256i,
}

/// Activation word `t` of a group whose first word is at `q` and whose
/// words are `STRIDE` bytes apart (32 inside a chunk of the element layout,
/// 4 in its tail: see `crate::layout`), broadcast to every lane.
///
/// # Safety
/// `q + STRIDE * t` is readable for 4 bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn word<const STRIDE: usize>(q: *const i8, t: usize) -> __m256i {
    // SAFETY: per the contract.
    _mm256_set1_epi32(unsafe { q.add(STRIDE * t).cast::<i32>().read_unaligned() })
}

/// The f32 accumulators of a tile: scale terms and (4-bit) min terms.
struct Acc<const M: usize> {
    f: [__m256; M],
    m: [__m256; M],
}

/// Half `h` of group `g`'s record at `r` against `M` activation rows, whose
/// group words start at element `off` and lie `STRIDE` bytes apart.
///
/// # Safety
/// `r` is a whole record of `BITS`; group `g` exists in every activation row
/// of `act`, with its words at `off + STRIDE * t` for `t < 8`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group<const M: usize, const BITS: u8, const STRIDE: usize>(
    r: *const u8,
    h: usize,
    act: &[ActRow; M],
    g: usize,
    off: usize,
    acc: &mut Acc<M>,
) {
    let wb = words_bytes(BITS);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: half h of the record's words, scales and mins lies inside the
    // record; the activation reads are inside group g (contract).
    unsafe {
        let half = |w: usize| _mm256_loadu_si256(r.add(64 * w + 32 * h).cast());
        let s = _mm256_cvtph_ps(_mm_loadu_si128(r.add(wb + 2 * HALF * h).cast()));
        if BITS == 4 {
            let low = _mm256_set1_epi8(0x0F);
            let mn = _mm256_cvtph_ps(_mm_loadu_si128(r.add(wb + 32 + 2 * HALF * h).cast()));
            let raw: [__m256i; 4] = std::array::from_fn(half);
            let ops: [__m256i; 8] = std::array::from_fn(|k| {
                if k < 4 {
                    _mm256_and_si256(raw[k], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw[k - 4]), low)
                }
            });
            for i in 0..M {
                let q = act[i].q.add(off);
                let mut p = _mm256_maddubs_epi16(ops[0], word::<STRIDE>(q, 0));
                for (k, op) in ops.iter().enumerate().skip(1) {
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*op, word::<STRIDE>(q, k)));
                }
                let x = _mm256_madd_epi16(p, ones);
                let d = _mm256_set1_ps(*act[i].d.add(g));
                acc.f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), _mm256_mul_ps(s, d), acc.f[i]);
                let sd = _mm256_set1_ps(*act[i].sd.add(g));
                acc.m[i] = _mm256_fmadd_ps(mn, sd, acc.m[i]);
            }
        } else {
            let flip = _mm256_set1_epi8(-128);
            let v: [__m256i; 8] = std::array::from_fn(|k| _mm256_xor_si256(half(k), flip));
            let av: [__m256i; 8] = std::array::from_fn(|k| _mm256_abs_epi8(v[k]));
            for i in 0..M {
                let q = act[i].q.add(off);
                let mut x = _mm256_setzero_si256();
                for k in 0..8 {
                    let sq = _mm256_sign_epi8(word::<STRIDE>(q, k), v[k]);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(av[k], sq), ones);
                    x = _mm256_add_epi32(x, p);
                }
                let d = _mm256_set1_ps(*act[i].d.add(g));
                acc.f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), _mm256_mul_ps(s, d), acc.f[i]);
            }
        }
    }
}

/// Half `h` of one `BITS`-bit panel against `M` activation rows.
///
/// # Safety
/// `rec` holds `groups` records of `BITS`; each of `acts[..M]` has the
/// matrix's columns (`groups * 32`); the masked elements of `t.out` (rows
/// `t.i0..+M`, columns `t.c0..+8`) are in bounds and belong to the caller.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const M: usize, const BITS: u8>(
    rec: &[u8],
    h: usize,
    groups: usize,
    acts: &[ActRow],
    t: Target,
) {
    let record = record_bytes(BITS);
    let shape = RowShape::new(groups * G);
    let act: [ActRow; M] = std::array::from_fn(|i| acts[i]);
    debug_assert!(rec.len() >= groups * record);
    let mut acc = Acc {
        f: [_mm256_setzero_ps(); M],
        m: [_mm256_setzero_ps(); M],
    };
    let base = rec.as_ptr();
    // SAFETY: record g spans bytes g*record..(g+1)*record of `rec`; a chunk
    // group's words start at `elem_pos(g, 0)` and lie 32 bytes apart, a tail
    // group's at `32 g` and 4 bytes apart (`crate::layout`), inside every
    // activation row (contract).
    unsafe {
        for g in 0..shape.chunks * CG {
            let off = g / CG * CHUNK + 4 * (g % CG);
            group::<M, BITS, 32>(base.add(g * record), h, &act, g, off, &mut acc);
        }
        for g in shape.chunks * CG..groups {
            group::<M, BITS, 4>(base.add(g * record), h, &act, g, g * G, &mut acc);
        }
        for i in 0..M {
            let y = if BITS == 4 {
                _mm256_add_ps(acc.f[i], acc.m[i])
            } else {
                acc.f[i]
            };
            let at = (t.i0 + i) * t.out.stride + t.c0;
            _mm256_maskstore_ps(t.out.ptr.add(at), t.mask, y);
        }
    }
}
