//! `QActs`: activations quantized per group of 32 to symmetric int8 (A8) in the
//! crate's element layout, with per-group f32 scale `d`, `d*Σq` (for the
//! weights' min term) and the integer `Σq`. The per-group quantizer has scalar,
//! AVX2 and AVX-512 versions that give bit-identical results.

use std::fmt;

use crate::buffer::AlignedBytes;
use crate::layout::{CG, CHUNK, G, RowShape};
use crate::{Isa, Pool, RowsPtr};

/// Reusable buffer of quantized activation rows.
#[derive(Default, Clone)]
pub struct QActs {
    m: usize,
    cols: usize,
    q: AlignedBytes,
    d: Vec<f32>,
    sd: Vec<f32>,
    sumq: Vec<i32>,
}

impl fmt::Debug for QActs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QActs")
            .field("m", &self.m)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// Scalar quantizer of one group: writes `q`, returns `(d, Σq)`.
///
/// d = amax/127, q = round-half-even(x * (1/d)) clamped to ±127. All ISAs
/// compute exactly these f32 operations, so their outputs are bit-identical.
pub(crate) fn quantize_group_scalar(x: &[f32], q: &mut [i8; G]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        *o = r;
        sum += r as i32;
    }
    (d, sum)
}

/// One row quantized into its buffers: `q` in the element layout, and per
/// group `d`, `d*Σq` and `Σq`.
fn quantize_row(
    isa: Isa,
    shape: &RowShape,
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    sd: &mut [f32],
    sumq: &mut [i32],
) {
    let mut tmp = [0i8; G];
    let mut whole = 0;
    for c in 0..shape.chunks {
        let (gs, cs) = (c * CG..(c + 1) * CG, c * CHUNK..(c + 1) * CHUNK);
        let done = crate::qacts_simd::quantize_chunk(
            isa,
            (&x[cs.clone()]).try_into().expect("a chunk of values"),
            (&mut q[cs]).try_into().expect("a chunk of quants"),
            (&mut d[gs.clone()]).try_into().expect("8 scales"),
            (&mut sd[gs.clone()]).try_into().expect("8 scaled sums"),
            (&mut sumq[gs]).try_into().expect("8 sums"),
        );
        if !done {
            break;
        }
        whole = c + 1;
    }
    for g in whole * CG..shape.groups {
        let (dg, s) = crate::qacts_simd::quantize_group(isa, &x[g * G..(g + 1) * G], &mut tmp);
        d[g] = dg;
        sd[g] = dg * s as f32;
        sumq[g] = s;
        if g < shape.chunks * CG {
            let (c, j) = (g / CG, g % CG);
            let chunk: &mut [i8; CHUNK] = (&mut q[c * CHUNK..(c + 1) * CHUNK])
                .try_into()
                .expect("a chunk is CHUNK bytes");
            scatter_group(chunk, j, &tmp);
        } else {
            q[g * G..(g + 1) * G].copy_from_slice(&tmp);
        }
    }
}

/// Place group `j`'s 32 values into its chunk: value `i` at
/// `(i / 4) * 32 + 4 * j + i % 4` (see [`crate::layout`]). The fixed sizes
/// let the compiler drop every bounds check from the eight 4-byte moves.
#[inline(always)]
fn scatter_group(chunk: &mut [i8; CHUNK], j: usize, group: &[i8; G]) {
    let j = j % CG;
    for t in 0..G / 4 {
        let at = t * 32 + 4 * j;
        chunk[at..at + 4].copy_from_slice(&group[4 * t..4 * t + 4]);
    }
}

impl QActs {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantize `m` rows of `cols` values (row-major `x`), replacing the contents.
    ///
    /// # Panics
    /// If `cols` is not a positive multiple of 32 or `x.len() != m * cols`.
    pub fn quantize(&mut self, isa: Isa, x: &[f32], m: usize, cols: usize) {
        self.prepare(x, m, cols);
        let isa = isa.checked();
        let shape = RowShape::new(cols);
        let ng = shape.groups;
        let q = self.q.as_i8_mut();
        for i in 0..m {
            quantize_row(
                isa,
                &shape,
                &x[i * cols..(i + 1) * cols],
                &mut q[i * cols..(i + 1) * cols],
                &mut self.d[i * ng..(i + 1) * ng],
                &mut self.sd[i * ng..(i + 1) * ng],
                &mut self.sumq[i * ng..(i + 1) * ng],
            );
        }
    }

    /// [`QActs::quantize`] with the rows split across `pool`'s threads
    /// (each row is quantized exactly as there, so the result is the same).
    pub fn quantize_pool(&mut self, pool: &Pool, isa: Isa, x: &[f32], m: usize, cols: usize) {
        assert_eq!(
            x.len(),
            m * cols,
            "QActs::quantize: x has {} values, expected m*cols = {m}*{cols}",
            x.len()
        );
        let rows = self.rows(isa, m, cols);
        pool.run(&|t, nt| {
            for i in (t * m / nt)..((t + 1) * m / nt) {
                // SAFETY: row i < m is handled by exactly one index t
                // (contiguous, disjoint ranges).
                unsafe { rows.quantize(i, &x[i * cols..(i + 1) * cols]) };
            }
        });
    }

    /// Sizes the buffers for `m` rows of `cols` and returns a writer through
    /// which threads quantize rows one at a time, each as
    /// [`QActs::quantize`] would: a caller can then quantize a row in the
    /// same pass that computes it (a norm, SwiGLU) instead of in a pass of
    /// its own. Rows never written keep stale values.
    ///
    /// # Panics
    /// If `cols` is not a positive multiple of 32.
    pub fn rows(&mut self, isa: Isa, m: usize, cols: usize) -> QActsRows<'_> {
        self.size(m, cols);
        QActsRows {
            isa: isa.checked(),
            shape: RowShape::new(cols),
            q: RowsPtr::new(self.q.as_i8_mut()),
            d: RowsPtr::new(&mut self.d),
            sd: RowsPtr::new(&mut self.sd),
            sumq: RowsPtr::new(&mut self.sumq),
            m,
        }
    }

    /// Checks the shape and sizes the buffers for `m` rows of `cols`.
    fn prepare(&mut self, x: &[f32], m: usize, cols: usize) {
        assert_eq!(
            x.len(),
            m * cols,
            "QActs::quantize: x has {} values, expected m*cols = {m}*{cols}",
            x.len()
        );
        self.size(m, cols);
    }

    /// Checks `cols` and sizes the buffers for `m` rows of it.
    fn size(&mut self, m: usize, cols: usize) {
        assert!(
            cols > 0 && cols.is_multiple_of(G),
            "QActs::quantize: cols {cols} must be a positive multiple of 32"
        );
        let ng = cols / G;
        self.m = m;
        self.cols = cols;
        self.q.resize(m * cols);
        self.d.resize(m * ng, 0.0);
        self.sd.resize(m * ng, 0.0);
        self.sumq.resize(m * ng, 0);
    }

    /// Rounds `x` through A8 in place, group by group: each group of 32 becomes
    /// `d*q` exactly as [`QActs::quantize`] then [`QActs::dequantize_row`]
    /// would leave it, without the element layout in between. A tail shorter
    /// than a group is left as it is.
    pub fn round_trip(isa: Isa, x: &mut [f32]) {
        let isa = isa.checked();
        let mut q = [0i8; G];
        for g in x.chunks_exact_mut(G) {
            let (d, _) = crate::qacts_simd::quantize_group(isa, g, &mut q);
            for (v, &qi) in g.iter_mut().zip(&q) {
                *v = d * qi as f32;
            }
        }
    }

    /// Number of rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Per-group scales `d` of row `i`.
    pub fn row_scales(&self, i: usize) -> &[f32] {
        let ng = self.cols / G;
        &self.d[i * ng..(i + 1) * ng]
    }

    /// The int8 values of row `i` in natural column order, into `out[..cols]`.
    pub fn row_quants(&self, i: usize, out: &mut [i8]) {
        let shape = RowShape::new(self.cols);
        let q = self.row_q(i);
        for g in 0..shape.groups {
            for k in 0..G {
                out[g * G + k] = q[crate::layout::elem_pos(&shape, g, k)];
            }
        }
    }

    /// Row `i` dequantized (`d*q`) in natural order, into `out[..cols]`.
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let mut q = vec![0i8; self.cols];
        self.row_quants(i, &mut q);
        let d = self.row_scales(i);
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            *o = d[c / G] * q[c] as f32;
        }
    }

    /// Row `i`'s int8 values in the element layout.
    #[inline]
    pub(crate) fn row_q(&self, i: usize) -> &[i8] {
        &self.q.as_i8()[i * self.cols..(i + 1) * self.cols]
    }

    /// Row `i`'s `d*Σq` per group.
    #[inline]
    pub(crate) fn row_sd(&self, i: usize) -> &[f32] {
        let ng = self.cols / G;
        &self.sd[i * ng..(i + 1) * ng]
    }

    /// Row `i`'s `Σq` per group.
    #[inline]
    pub(crate) fn row_sumq(&self, i: usize) -> &[i32] {
        let ng = self.cols / G;
        &self.sumq[i * ng..(i + 1) * ng]
    }
}

/// Writes rows of a [`QActs`] from several threads (see [`QActs::rows`]).
pub struct QActsRows<'a> {
    isa: Isa,
    shape: RowShape,
    m: usize,
    q: RowsPtr<'a, i8>,
    d: RowsPtr<'a, f32>,
    sd: RowsPtr<'a, f32>,
    sumq: RowsPtr<'a, i32>,
}

impl QActsRows<'_> {
    /// Quantize `x` (one row of `cols` values) into row `i`.
    ///
    /// # Panics
    /// If `i` is not below `m` or `x` is not `cols` long.
    ///
    /// # Safety
    /// No other thread writes row `i` during this call.
    pub unsafe fn quantize(&self, i: usize, x: &[f32]) {
        let cols = self.shape.groups * G;
        assert!(
            i < self.m && x.len() == cols,
            "QActsRows::quantize: row {i} of {} with {} values, want {cols}",
            self.m,
            x.len()
        );
        let ng = self.shape.groups;
        // SAFETY: `rows` sized q to m*cols and d, sd, sumq to m*ng; row i is
        // this call's alone (contract), and the `QActs` stays exclusively
        // borrowed while this writer lives.
        let (qr, dr, sdr, sr) = unsafe {
            (
                self.q.row(i, cols),
                self.d.row(i, ng),
                self.sd.row(i, ng),
                self.sumq.row(i, ng),
            )
        };
        quantize_row(self.isa, &self.shape, x, qr, dr, sdr, sr);
    }
}
