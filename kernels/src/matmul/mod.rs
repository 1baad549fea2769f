//! Quantized matrix multiplication `out[i][r] = dot(w row r, activation row i)`:
//! argument checks, per-ISA dispatch, and the split of rows across a [`Pool`].
//!
//! Also the raw row views (`ActRow`, `WRow`) the SIMD kernels address data
//! through, and the batched-loop order (`tiles`). For m = 1 the row-storage
//! kernels read the 4 rows of a storage block together (one sequential
//! stream), and the AVX2 panel kernel 4 panels side by side; for m > 1 each
//! block of weight rows (~256 KB) is read from memory once and reused from L2 by
//! every tile of up to 4 activation rows.

use std::ops::Range;

use crate::{Isa, Pool, QActs, QMatrix};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
pub(crate) mod scalar;

/// Where a kernel writes results: `m x rows` row-major f32, written through a raw
/// pointer so threads can fill disjoint row ranges of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    ptr: *mut f32,
    len: usize,
    stride: usize,
}

// SAFETY: `Out` is only a pointer into a buffer that outlives every use (the
// callers borrow it mutably for the whole call); threads write disjoint indices.
unsafe impl Send for Out {}
// SAFETY: as above; concurrent use only ever writes distinct elements.
unsafe impl Sync for Out {}

impl Out {
    /// Store `v` at activation row `i`, weight row `r`.
    ///
    /// # Safety
    /// `i * stride + r < len`, and no other thread accesses that element concurrently.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, i: usize, r: usize, v: f32) {
        let at = i * self.stride + r;
        debug_assert!(at < self.len);
        // SAFETY: the caller guarantees `at` is in bounds and unshared.
        unsafe { self.ptr.add(at).write(v) }
    }
}

/// Raw pointers to one activation row's data, for SIMD kernels.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) struct ActRow {
    /// int8 values in element layout (`cols`).
    pub q: *const i8,
    /// Per-group scale `d` (`groups`).
    pub d: *const f32,
    /// Per-group `d*Σq` (`groups`).
    pub sd: *const f32,
    /// Per-group `Σq` (`groups`).
    pub sumq: *const i32,
}

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
impl ActRow {
    /// Pointers into row `i` of `a`.
    pub(crate) fn new(a: &QActs, i: usize) -> ActRow {
        ActRow {
            q: a.row_q(i).as_ptr(),
            d: a.row_scales(i).as_ptr(),
            sd: a.row_sd(i).as_ptr(),
            sumq: a.row_sumq(i).as_ptr(),
        }
    }
}

/// Raw pointers to one weight row's records (see `crate::storage`), for SIMD kernels.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) struct WRow {
    /// First pair record (16 groups: data, 16 scales, 16 mins).
    pub pair: *const u8,
    /// Bytes between consecutive pair records of this row.
    pub stride: usize,
    /// Odd-chunk record (8 groups).
    pub odd: *const u8,
    /// Tail record.
    pub tail: *const u8,
    /// Whole pairs per row.
    pub pairs: usize,
    /// Packed data bytes of a pair record.
    pub dp: usize,
    /// Packed data bytes of the tail record.
    pub dt: usize,
    /// Tail groups.
    pub tail_n: usize,
    /// Packed bytes per group.
    pub gb: usize,
}

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
impl WRow {
    /// Pointers into row `r` of `w`. Offsets are computed with wrapping
    /// arithmetic; only records that exist for this shape are ever read.
    pub(crate) fn new(w: &QMatrix, r: usize) -> WRow {
        let g = w.geom();
        let l = g.loc(r);
        let base = w.bytes().as_ptr();
        WRow {
            pair: base.wrapping_add(l.pair),
            stride: l.stride,
            odd: base.wrapping_add(l.odd),
            tail: base.wrapping_add(l.tail),
            pairs: g.pairs,
            dp: g.dp,
            dt: g.dt,
            tail_n: g.shape.tail,
            gb: g.gb,
        }
    }

    /// Packed data of pair `p` (groups 16p..16p+16).
    #[inline(always)]
    pub(crate) fn pair_data(&self, p: usize) -> *const u8 {
        self.pair.wrapping_add(p * self.stride)
    }

    /// The 16 f16 scales of pair `p`.
    #[inline(always)]
    pub(crate) fn pair_sc(&self, p: usize) -> *const half::f16 {
        self.pair_data(p).wrapping_add(self.dp).cast()
    }

    /// The 16 f16 mins of pair `p`.
    #[inline(always)]
    pub(crate) fn pair_mn(&self, p: usize) -> *const half::f16 {
        self.pair_data(p).wrapping_add(self.dp + 32).cast()
    }

    /// The 8 f16 scales of the odd chunk.
    #[inline(always)]
    pub(crate) fn odd_sc(&self) -> *const half::f16 {
        self.odd.wrapping_add(self.dp / 2).cast()
    }

    /// The 8 f16 mins of the odd chunk.
    #[inline(always)]
    pub(crate) fn odd_mn(&self) -> *const half::f16 {
        self.odd.wrapping_add(self.dp / 2 + 16).cast()
    }

    /// Packed data of tail group `t` (pairs of tail groups are contiguous).
    #[inline(always)]
    pub(crate) fn tail_data(&self, t: usize) -> *const u8 {
        self.tail.wrapping_add(t * self.gb)
    }

    /// Scale of tail group `t`.
    #[inline(always)]
    pub(crate) fn tail_sc(&self, t: usize) -> *const half::f16 {
        self.tail.wrapping_add(self.dt + 2 * t).cast()
    }

    /// Min of tail group `t`.
    #[inline(always)]
    pub(crate) fn tail_mn(&self, t: usize) -> *const half::f16 {
        self.tail
            .wrapping_add(self.dt + 2 * self.tail_n + 2 * t)
            .cast()
    }

    /// (data, 8 scales, 8 mins) of chunk `c` (groups 8c..8c+8).
    #[inline(always)]
    pub(crate) fn chunk(&self, c: usize) -> (*const u8, *const half::f16, *const half::f16) {
        let p = c / 2;
        if p < self.pairs {
            let h = c % 2;
            (
                self.pair_data(p).wrapping_add(h * self.dp / 2),
                self.pair_sc(p).wrapping_add(8 * h),
                self.pair_mn(p).wrapping_add(8 * h),
            )
        } else {
            (self.odd, self.odd_sc(), self.odd_mn())
        }
    }
}

/// Bytes of weights per row block in batched kernels: a block is re-read
/// from L2 (not memory) by each activation tile after the first.
const BLOCK_BYTES: usize = 256 * 1024;

/// Visit every (weight row, activation tile) of a batched matmul: rows in
/// blocks of about [`BLOCK_BYTES`], and within a block every tile of at most
/// `max` activation rows over every row, calling `f(r, i0, n)`. Each weight row
/// is read from memory once per call while the current activation tile stays
/// in L1 (with 16 activation rows of 4096 values, all of them would not).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
pub(crate) fn tiles(
    w: &QMatrix,
    rows: Range<usize>,
    m: usize,
    max: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    tile_blocks(w, rows, m, max, |block, i0, n| {
        for r in block {
            f(r, i0, n);
        }
    });
}

/// [`tiles`] a block at a time: `f(block, i0, n)` visits every row of
/// `block` with activation rows `i0..i0 + n`, so a kernel can keep its
/// per-tile set-up out of the row loop.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
pub(crate) fn tile_blocks(
    w: &QMatrix,
    rows: Range<usize>,
    m: usize,
    max: usize,
    mut f: impl FnMut(Range<usize>, usize, usize),
) {
    let per_row = w.geom().row_rec.max(1);
    let block = (BLOCK_BYTES / per_row).max(crate::storage::RB);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + block).min(rows.end);
        let mut i0 = 0;
        while i0 < m {
            let n = (m - i0).min(max);
            f(r0..r1, i0, n);
            i0 += n;
        }
        r0 = r1;
    }
}

fn check(w: &QMatrix, a: &QActs, out: &[f32], what: &str) {
    assert_eq!(
        a.cols(),
        w.cols(),
        "{what}: activations have {} cols but the matrix has {}",
        a.cols(),
        w.cols()
    );
    assert_eq!(
        out.len(),
        a.m() * w.rows(),
        "{what}: out has {} values, expected m*rows = {}*{}",
        out.len(),
        a.m(),
        w.rows()
    );
}

/// Run the `isa` kernel for weight rows `rows`.
///
/// # Safety
/// `rows` within `w.rows()`, `a.cols() == w.cols()`, `out` covers `a.m() x w.rows()`,
/// `isa` available, and no other thread writes the same (i, r) elements.
unsafe fn run(isa: Isa, w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    if rows.is_empty() || a.m() == 0 {
        return;
    }
    assert!(
        !w.is_panelled() || matches!(isa, Isa::Avx512 | Isa::Avx2 | Isa::Scalar),
        "a matrix repacked into row panels cannot run on {isa}"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2+FMA+F16C availability was checked by the caller (`Isa::checked`).
        Isa::Avx2 => unsafe { avx2::matmul_rows(w, a, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/BW/VL/VNNI availability was checked by the caller.
        Isa::Avx512 => unsafe { avx512::matmul_rows(w, a, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON availability was checked by the caller.
        Isa::Neon => unsafe { neon::matmul_rows(w, a, rows, out) },
        // SAFETY: forwarded caller contract.
        _ => unsafe { scalar::matmul_rows(w, a, rows, out) },
    }
}

/// `out` is `m x w.rows()` row-major: `out[i*w.rows() + r] = dot(row r of w,
/// activation row i)`. Only rows in `rows` are written.
pub fn matmul_rows(isa: Isa, w: &QMatrix, a: &QActs, rows: Range<usize>, out: &mut [f32]) {
    check(w, a, out, "matmul_rows");
    assert!(
        rows.start <= rows.end && rows.end <= w.rows(),
        "matmul_rows: rows {rows:?} out of bounds for {} rows",
        w.rows()
    );
    let isa = isa.checked();
    let o = Out {
        ptr: out.as_mut_ptr(),
        len: out.len(),
        stride: w.rows(),
    };
    // SAFETY: bounds checked above; `out` is borrowed mutably for the call.
    unsafe { run(isa, w, a, rows, o) }
}

/// Below this many weight-element x activation-row products a matmul runs on the
/// calling thread alone (waking workers would cost more than it saves).
const PARALLEL_MIN_WORK: usize = 64 * 1024;

/// Rows per thread are rounded to this, so threads never share an output cache line (m=1).
const ROW_ALIGN: usize = 16;

/// The same as [`matmul_rows`] over all rows, split across the pool's threads.
pub fn matmul(pool: &Pool, isa: Isa, w: &QMatrix, a: &QActs, out: &mut [f32]) {
    check(w, a, out, "matmul");
    let isa = isa.checked();
    let o = Out {
        ptr: out.as_mut_ptr(),
        len: out.len(),
        stride: w.rows(),
    };
    let n = w.rows();
    let threads = pool.threads();
    if threads == 1 || n * w.cols() * a.m() < PARALLEL_MIN_WORK || n < 2 * ROW_ALIGN {
        // SAFETY: whole range on one thread; bounds checked above.
        unsafe { run(isa, w, a, 0..n, o) };
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(ROW_ALIGN);
    pool.run(&|t, _| {
        let lo = (t * per).min(n);
        let hi = ((t + 1) * per).min(n);
        // SAFETY: thread t owns rows lo..hi exclusively (ranges are disjoint),
        // all within bounds; `out` outlives `pool.run`, which waits for all threads.
        unsafe { run(isa, w, a, lo..hi, o) };
    });
}
