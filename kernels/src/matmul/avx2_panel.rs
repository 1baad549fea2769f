//! AVX2 kernel for matrices in row panels (`crate::panel`), 4- or 8-bit, for
//! every batch size. A 256-bit register holds half of a 64-byte panel word:
//! 8 weight rows, 4 bytes each, one row per i32 lane. Each half-panel is
//! walked on its own, a group at a time and in the group a word at a time:
//! each operand goes past the tile's activation rows while their partial
//! sums stay in registers. `vpmaddubsw` against an activation
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
//! The call's activation rows are first regrouped by tile (`TileActs`): for
//! each group, the 8 words of the tile's rows side by side, and their scales
//! likewise, so the kernel walks one activation pointer and one scale pointer
//! per tile instead of two per row (which x86's 16 general registers could
//! not hold next to the loop's own). A single row is read where it lies, and
//! walks 4 panels side by side (`streams`): it is bound by memory, and
//! reading 4 places at once draws more bandwidth than one stream.
//!
//! Every output is the same sequence of f32 operations as in the AVX-512
//! panel kernel, whatever the batch size or tile, so a row's logits do not
//! depend on the batch it is in.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::layout::{CG, G, RowShape, elem_pos};
use crate::matmul::Out;
use crate::panel::{PANEL_ROWS, Panels, record_bytes, words_bytes};
use crate::{QActs, QMatrix};

/// Rows of a panel in one register (a half-panel).
const HALF: usize = PANEL_ROWS / 2;

/// Panels a single activation row walks side by side (`streams`).
const STREAMS: usize = 4;

/// Activation rows per pass over a half-panel.
const MAX_TILE: usize = 4;

/// The activation rows of one call, regrouped by tile of `MAX_TILE` rows (the
/// last tile may have fewer, `n`). The tile starting at row `i0` begins at
/// word `8 * groups * i0` and scale `groups * i0`; in it, word `k` of group
/// `g` of its row `i` is `words[(8 * g + k) * n + i]`, and that group's scale
/// and `d·Σq` are `d[g * n + i]` and `sd[g * n + i]`.
struct TileActs {
    words: Vec<i32>,
    d: Vec<f32>,
    sd: Vec<f32>,
}

impl TileActs {
    fn new(a: &QActs, groups: usize) -> TileActs {
        let m = a.m();
        let shape = RowShape::new(groups * G);
        let mut t = TileActs {
            words: vec![0; 8 * groups * m],
            d: vec![0.0; groups * m],
            sd: vec![0.0; groups * m],
        };
        for i in 0..m {
            let i0 = i / MAX_TILE * MAX_TILE;
            let n = (m - i0).min(MAX_TILE);
            let li = i - i0;
            let q = a.row_q(i);
            let word = |at: usize| {
                i32::from_le_bytes([q[at], q[at + 1], q[at + 2], q[at + 3]].map(|v| v as u8))
            };
            let words = &mut t.words[8 * groups * i0..8 * groups * (i0 + n)];
            for g in 0..groups {
                for k in 0..8 {
                    words[(8 * g + k) * n + li] = word(elem_pos(&shape, g, 4 * k));
                }
            }
            let (d, sd) = (a.row_scales(i), a.row_sd(i));
            for g in 0..groups {
                t.d[groups * i0 + g * n + li] = d[g];
                t.sd[groups * i0 + g * n + li] = sd[g];
            }
        }
        t
    }
}

/// Panel kernel for weight rows `rows` of `w` (4- or 8-bit).
///
/// # Safety
/// Same contract as `crate::matmul::run`; the CPU supports AVX2, FMA, F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    let p = w.panels();
    let groups = p.groups();
    let m = a.m();
    let first = rows.start / PANEL_ROWS;
    let last = rows.end.div_ceil(PANEL_ROWS).min(p.panels());
    if m == 1 {
        // One row is read where it lies (`TileRef::direct`): regrouping it
        // would cost more than it saves. The panels wholly inside `rows` go
        // side by side (`stream_row`), the partial ones at the ends alone.
        let lo = rows.start.div_ceil(PANEL_ROWS);
        let hi = (rows.end / PANEL_ROWS).min(p.panels()).max(lo);
        // SAFETY: the caller's contract; panels lo..hi are wholly inside
        // `rows`, the others only for their rows of it.
        unsafe {
            stream_row(p, lo..hi, a, out);
            for panel in (first..lo).chain(hi..last) {
                one_panel(p, panel, &rows, groups, a, &None, out);
            }
        }
        return;
    }
    let acts = Some(TileActs::new(a, groups));
    for panel in first..last {
        // SAFETY: the caller's contract, for this panel's rows.
        unsafe { one_panel(p, panel, &rows, groups, a, &acts, out) };
    }
}

/// The single activation row of `a` against the whole panels `panels` of
/// `p`: in `STREAMS` runs of consecutive panels walked side by side
/// (`streams`), run `k` holding `per` panels and one more for `k < extra`,
/// those last ones side by side as well.
///
/// # Safety
/// The 16 rows of every panel in `panels` belong to this call in `out`; the
/// CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream_row(p: &Panels, panels: Range<usize>, a: &QActs, out: Out) {
    let groups = p.groups();
    let at = TileRef {
        words: a.row_q(0).as_ptr().cast(),
        d: a.row_scales(0).as_ptr(),
        sd: a.row_sd(0).as_ptr(),
        direct: true,
    };
    let (per, extra) = (panels.len() / STREAMS, panels.len() % STREAMS);
    let start = |k: usize| panels.start + k * per + k.min(extra);
    let last_of = |k: usize| start(k) + per;
    // SAFETY: each panel's 16 outputs are this call's (contract); `at` is
    // the single row.
    unsafe {
        for j in 0..per {
            let ps: [usize; STREAMS] = std::array::from_fn(|k| start(k) + j);
            match p.bits() {
                8 => streams::<8, STREAMS>(p, ps, groups, at, out),
                _ => streams::<4, STREAMS>(p, ps, groups, at, out),
            }
        }
        match (p.bits(), extra) {
            (_, 0) => {}
            (8, 1) => streams::<8, 1>(p, [0].map(last_of), groups, at, out),
            (8, 2) => streams::<8, 2>(p, [0, 1].map(last_of), groups, at, out),
            (8, _) => streams::<8, 3>(p, [0, 1, 2].map(last_of), groups, at, out),
            (_, 1) => streams::<4, 1>(p, [0].map(last_of), groups, at, out),
            (_, 2) => streams::<4, 2>(p, [0, 1].map(last_of), groups, at, out),
            (_, _) => streams::<4, 3>(p, [0, 1, 2].map(last_of), groups, at, out),
        }
    }
}

/// Panel `panel` of `p` against every activation row of `a` (regrouped in
/// `acts` when there are several), for the weight rows in `rows` only.
///
/// # Safety
/// As for [`matmul_rows`]; `p` is `w`'s panels and `acts` regroups `a`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_panel(
    p: &Panels,
    panel: usize,
    rows: &Range<usize>,
    groups: usize,
    a: &QActs,
    acts: &Option<TileActs>,
    out: Out,
) {
    let m = a.m();
    let r0 = panel * PANEL_ROWS;
    let rec = p.panel(panel);
    // Per half: its first output column, the mask of lanes that are
    // rows of this call, and whether that is all 8; None if none is.
    let halves: [Option<(usize, __m256i, bool)>; 2] = std::array::from_fn(|h| {
        let c0 = r0 + h * HALF;
        let lo = rows.start.max(c0).min(c0 + HALF) - c0;
        let hi = rows.end.min(c0 + HALF).max(c0) - c0;
        (lo < hi).then(|| {
            let lanes: [i32; HALF] =
                std::array::from_fn(|k| if (lo..hi).contains(&k) { -1 } else { 0 });
            // SAFETY: `lanes` is 8 i32s.
            let mask = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
            (c0, mask, lo == 0 && hi == HALF)
        })
    });
    let mut i0 = 0;
    while i0 < m {
        let n = (m - i0).min(MAX_TILE);
        let at = match acts {
            Some(acts) => TileRef {
                words: acts.words[8 * groups * i0..].as_ptr(),
                d: acts.d[groups * i0..].as_ptr(),
                sd: acts.sd[groups * i0..].as_ptr(),
                direct: false,
            },
            None => TileRef {
                words: a.row_q(0).as_ptr().cast(),
                d: a.row_scales(0).as_ptr(),
                sd: a.row_sd(0).as_ptr(),
                direct: true,
            },
        };
        let targets = halves.map(|half| {
            half.map(|(c0, mask, full)| Target {
                out,
                i0,
                c0,
                mask,
                full,
            })
        });
        for (h, t) in targets.iter().enumerate() {
            let Some(t) = *t else { continue };
            // SAFETY: `rec` is the whole panel (groups × record bytes),
            // the tile at `i0` holds `n` rows of `groups` groups in
            // `acts`, and the masked lanes are rows of this call in `out`
            // (caller contract).
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
        }
        // SAFETY: as above; `tile` has stored these outputs' scale terms.
        unsafe {
            match (p.bits(), n) {
                (8, _) | (_, 1) => {}
                (_, 2) => add_mins::<2>(rec, groups, at, targets),
                (_, 3) => add_mins::<3>(rec, groups, at, targets),
                (_, _) => add_mins::<4>(rec, groups, at, targets),
            }
        }
        i0 += n;
    }
}

/// A single activation row against `S` (up to `STREAMS`) whole panels of
/// `p`, a group of each in turn: the row's weights are read from `S` places
/// at once, where a loop over one panel at a time reads one stream. On the
/// Zen 3 VM of PERFORMANCE.md that draws ~30% more bandwidth from memory
/// (the `bandwidth` example's interleaved mode), and one row is bound by it.
/// Each output is still its own scale sum plus min sum over the groups in
/// order, as in [`tile`], so the results are the same bits.
///
/// # Safety
/// `panels` are panels of `p` whose 16 rows all belong to this call in
/// `out`; `a` is a direct single row of `p.groups()` groups.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn streams<const BITS: u8, const S: usize>(
    p: &Panels,
    panels: [usize; S],
    groups: usize,
    a: TileRef,
    out: Out,
) {
    debug_assert!(a.direct);
    let record = record_bytes(BITS);
    let recs = panels.map(|k| p.panel(k).as_ptr());
    let shape = RowShape::new(groups * G);
    for h in 0..2 {
        let mut acc = [[_mm256_setzero_ps(); 1]; S];
        let mut mins = [[_mm256_setzero_ps(); 1]; S];
        // SAFETY: record g of each panel spans bytes g*record..(g+1)*record
        // of it; the row's words and scales of group g are where `tile`'s
        // direct path finds them (contract).
        unsafe {
            for g in 0..groups {
                let (d, sd) = (a.d.add(g), a.sd.add(g));
                let wq = a.words.add(elem_pos(&shape, g, 0) / 4);
                for s in 0..S {
                    let r = recs[s].add(g * record);
                    if g < shape.chunks * CG {
                        group::<1, BITS, 8>(r, h, wq, d, sd, &mut acc[s], &mut mins[s]);
                    } else {
                        group::<1, BITS, 1>(r, h, wq, d, sd, &mut acc[s], &mut mins[s]);
                    }
                }
            }
        }
        for s in 0..S {
            let y = if BITS == 4 {
                _mm256_add_ps(acc[s][0], mins[s][0])
            } else {
                acc[s][0]
            };
            // SAFETY: the panel's rows are this call's (contract).
            unsafe { _mm256_storeu_ps(out.ptr.add(panels[s] * PANEL_ROWS + h * HALF), y) };
        }
    }
}

/// Where a tile writes: activation rows from `i0`, output columns `c0..c0 + 8`,
/// the lanes set in `mask`; `full` when that is all 8 (a plain store then:
/// `vmaskmovps` to memory is slow on AMD, 5% of a Zen 3 prefill profile).
#[derive(Clone, Copy)]
struct Target {
    out: Out,
    i0: usize,
    c0: usize,
    mask: __m256i,
    full: bool,
}

impl Target {
    /// Where activation row `i0 + i`'s 8 outputs start.
    fn at(&self, i: usize) -> *mut f32 {
        self.out
            .ptr
            .wrapping_add((self.i0 + i) * self.out.stride + self.c0)
    }

    /// Stores `y` into the lanes of activation row `i0 + i`.
    ///
    /// # Safety
    /// Those lanes are in bounds and belong to the caller; AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store(&self, i: usize, y: __m256) {
        // SAFETY: the caller's contract.
        unsafe {
            if self.full {
                _mm256_storeu_ps(self.at(i), y);
            } else {
                _mm256_maskstore_ps(self.at(i), self.mask, y);
            }
        }
    }

    /// The lanes of activation row `i0 + i` (zeros elsewhere).
    ///
    /// # Safety
    /// As for [`Target::store`].
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load(&self, i: usize) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            if self.full {
                _mm256_loadu_ps(self.at(i))
            } else {
                _mm256_maskload_ps(self.at(i), self.mask)
            }
        }
    }
}

/// One tile of a `TileActs`: its words, scales and `d·Σq`; or, `direct`, a
/// single activation row in its element layout (`QActs`), scales in group
/// order.
#[derive(Clone, Copy)]
struct TileRef {
    words: *const i32,
    d: *const f32,
    sd: *const f32,
    direct: bool,
}

/// An empty instruction that takes and gives back the tile's partial sums,
/// in program order: LLVM then cannot gather every word's operands ahead of
/// the products (which, with 16 registers, spills the accumulators).
#[target_feature(enable = "avx2")]
#[inline]
fn fence<const M: usize>(p: &mut [__m256i; M]) {
    for v in p.iter_mut() {
        // SAFETY: the block is empty: it reads and writes only `v`'s
        // register, touching no memory and no stack.
        unsafe {
            std::arch::asm!(
                "/* {0} */",
                inout(ymm_reg) * v,
                options(nomem, nostack, preserves_flags)
            )
        };
    }
}

/// Half `h` of the record at `r` against the `M` activation rows of a tile
/// whose words for this group start at `wq` and whose scales for it start at
/// `d`: adds the scale term `s·d·Σ u·q` of each row to `acc`, and for a
/// single 4-bit row the min term `min·d·Σq` (from `sd`) to `mins`.
///
/// Word by word, so that only one operand register is live next to the
/// tile's `M` integer partial sums and `M` accumulators: 16 registers are all
/// AVX2 has, and holding the group's 8 operands spilled the accumulators.
/// The integer sums are exact in any order.
///
/// # Safety
/// `r` is a whole record of `BITS`; word `k` of row `i` is at `wq + KS k +
/// i` (`KS` is `M` in a `TileActs`); `d` and `sd` hold `M` values each.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group<const M: usize, const BITS: u8, const KS: usize>(
    r: *const u8,
    h: usize,
    wq: *const i32,
    d: *const f32,
    sd: *const f32,
    acc: &mut [__m256; M],
    mins: &mut [__m256; M],
) {
    let wb = words_bytes(BITS);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: half h of the record's words and scales lies inside the
    // record; word k of row i is `wq[k * M + i]` (contract).
    unsafe {
        let half = |w: usize| _mm256_loadu_si256(r.add(64 * w + 32 * h).cast());
        let word = |k: usize, i: usize| _mm256_set1_epi32(wq.add(k * KS + i).read_unaligned());
        let x: [__m256i; M] = if BITS == 4 {
            let low = _mm256_set1_epi8(0x0F);
            let mut p = [_mm256_setzero_si256(); M];
            for w in 0..4 {
                let raw = half(w);
                let lo = _mm256_and_si256(raw, low);
                for (i, p) in p.iter_mut().enumerate() {
                    let t = _mm256_maddubs_epi16(lo, word(w, i));
                    *p = if w == 0 { t } else { _mm256_add_epi16(*p, t) };
                }
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                for (i, p) in p.iter_mut().enumerate() {
                    *p = _mm256_add_epi16(*p, _mm256_maddubs_epi16(hi, word(w + 4, i)));
                }
                fence(&mut p);
            }
            p.map(|p| _mm256_madd_epi16(p, ones))
        } else {
            let flip = _mm256_set1_epi8(-128);
            let mut x = [_mm256_setzero_si256(); M];
            for k in 0..8 {
                let v = _mm256_xor_si256(half(k), flip);
                let av = _mm256_abs_epi8(v);
                for (i, x) in x.iter_mut().enumerate() {
                    let sq = _mm256_sign_epi8(word(k, i), v);
                    let t = _mm256_madd_epi16(_mm256_maddubs_epi16(av, sq), ones);
                    *x = if k == 0 { t } else { _mm256_add_epi32(*x, t) };
                }
                fence(&mut x);
            }
            x
        };
        let s = _mm256_cvtph_ps(_mm_loadu_si128(r.add(wb + 2 * HALF * h).cast()));
        for i in 0..M {
            let di = _mm256_set1_ps(*d.add(i));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(x[i]), _mm256_mul_ps(s, di), acc[i]);
        }
        if BITS == 4 && M == 1 {
            // One row has registers to spare: its min term goes here (`tile`).
            let mn = _mm256_cvtph_ps(_mm_loadu_si128(r.add(wb + 32 + 2 * HALF * h).cast()));
            mins[0] = _mm256_fmadd_ps(mn, _mm256_set1_ps(*sd), mins[0]);
        }
    }
}

/// Half `h` of one `BITS`-bit panel against the `M` activation rows of tile
/// `a`.
///
/// # Safety
/// `rec` holds `groups` records of `BITS`; `a` is a tile of `M` rows of
/// `groups` groups (`TileActs`), or `direct` with `M = 1` and a row of
/// `groups` groups; the masked elements of `t.out` (rows
/// `t.i0..+M`, columns `t.c0..+8`) are in bounds and belong to the caller.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const M: usize, const BITS: u8>(
    rec: &[u8],
    h: usize,
    groups: usize,
    a: TileRef,
    t: Target,
) {
    let record = record_bytes(BITS);
    debug_assert!(rec.len() >= groups * record);
    debug_assert!(!a.direct || M == 1);
    let mut acc = [_mm256_setzero_ps(); M];
    let mut mins = [_mm256_setzero_ps(); M];
    let base = rec.as_ptr();
    // SAFETY: record g spans bytes g*record..(g+1)*record of `rec`; group g
    // of a tile has its 8·M words from `8 M g` and its M scales from `M g`,
    // of a direct row its words from the element positions below and its
    // scales at `g` (contract).
    unsafe {
        if a.direct {
            // A chunk group's words lie 8 words (32 bytes) apart, a tail
            // group's are consecutive (`crate::layout`).
            let shape = RowShape::new(groups * G);
            for g in 0..groups {
                let r = base.add(g * record);
                let (d, sd) = (a.d.add(g), a.sd.add(g));
                let wq = a.words.add(elem_pos(&shape, g, 0) / 4);
                if g < shape.chunks * CG {
                    group::<M, BITS, 8>(r, h, wq, d, sd, &mut acc, &mut mins);
                } else {
                    group::<M, BITS, 1>(r, h, wq, d, sd, &mut acc, &mut mins);
                }
            }
        } else {
            for g in 0..groups {
                let wq = a.words.add(8 * M * g);
                let (d, sd) = (a.d.add(M * g), a.sd.add(M * g));
                group::<M, BITS, M>(base.add(g * record), h, wq, d, sd, &mut acc, &mut mins);
            }
        }
        // 4-bit, several rows: the min term is added by `add_mins`.
        for i in 0..M {
            let y = if BITS == 4 && M == 1 {
                _mm256_add_ps(acc[i], mins[i])
            } else {
                acc[i]
            };
            t.store(i, y);
        }
    }
}

/// 4-bit, several rows: adds the min term `Σ_g min·d·Σq` of both halves of
/// a panel (`targets`, None for a half with no row of this call) to the
/// scale terms `tile` stored for the `M` activation rows of tile `a`.
///
/// Its own pass over the groups, in group order, so it needs no registers
/// during the products; and both halves at once: one broadcast of `d·Σq`
/// serves both, and 2·M chains of fused multiply-adds run side by side
/// instead of M (the pass per half was a tenth of the kernel's time at
/// M = 4; both at once took 1–2% off the kernel, `rowgroup`). `y = acc +
/// min`, added after the store, is the same f32 value as before it, so each
/// output's f32 operations stay those of the AVX-512 panel kernel.
///
/// # Safety
/// As for [`tile`] (each half's `Target` with this tile's rows), after
/// `tile` stored every live half's outputs.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_mins<const M: usize>(
    rec: &[u8],
    groups: usize,
    a: TileRef,
    targets: [Option<Target>; 2],
) {
    let record = record_bytes(4);
    let wb = words_bytes(4);
    let base = rec.as_ptr();
    let mut mins = [[_mm256_setzero_ps(); M]; 2];
    // SAFETY: record g spans bytes g*record..(g+1)*record of `rec`, its 16
    // mins at `wb + 32`; the tile has M `d·Σq` per group from `M g`; the
    // live lanes of each target are this call's outputs (contract).
    unsafe {
        for g in 0..groups {
            let at = base.add(g * record + wb + 32);
            let mn = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(at.add(2 * HALF * h).cast())));
            for i in 0..M {
                let sd = _mm256_set1_ps(*a.sd.add(M * g + i));
                mins[0][i] = _mm256_fmadd_ps(mn[0], sd, mins[0][i]);
                mins[1][i] = _mm256_fmadd_ps(mn[1], sd, mins[1][i]);
            }
        }
        for (h, t) in targets.iter().enumerate() {
            let Some(t) = t else { continue };
            for (i, &mn) in mins[h].iter().enumerate() {
                t.store(i, _mm256_add_ps(t.load(i), mn));
            }
        }
    }
}
