//! Where a `QMatrix`'s bytes live: rows are stored in blocks of [`RB`] = 4, and
//! inside a block *step-major* — for each step of a row (a pair of chunks = 16
//! groups, then an odd chunk, then the tail groups) the records of the block's
//! rows follow each other, each record holding its step's packed weights (see
//! [`crate::layout`]) followed by its f16 scales and f16 mins. A matrix-vector
//! kernel that walks 4 rows at once therefore reads one sequential stream with
//! no separate scale arrays, and blocks are padded to 64 bytes so 16-group
//! records stay cache-line aligned.
//!
//! Record layouts (`DP`, `DO`, `DT` = packed bytes of 16 groups, 8 groups and
//! the tail; `T` = tail groups):
//! pair `[DP data][16 scales][16 mins]`, odd `[DO data][8 scales][8 mins]`,
//! tail `[DT data][T scales][T mins]`.

use half::f16;

use crate::layout::{CG, G, RowShape};

/// Rows per storage block.
pub(crate) const RB: usize = 4;

/// Byte geometry of one matrix's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    pub shape: RowShape,
    pub rows: usize,
    pub bits: u8,
    /// Whole 16-group steps per row.
    pub pairs: usize,
    /// Packed bytes of one group.
    pub gb: usize,
    /// Packed data bytes of a pair record.
    pub dp: usize,
    /// Bytes of a pair record.
    pub rec_p: usize,
    /// Bytes of the odd-chunk record (0 if the chunk count is even).
    pub rec_o: usize,
    /// Packed data bytes of the tail.
    pub dt: usize,
    /// Bytes of the tail record (0 if there is no tail).
    pub rec_t: usize,
    /// Bytes of one row's records.
    pub row_rec: usize,
    /// Bytes of a full block (4 rows), padded to 64.
    pub block: usize,
}

/// Where one row's records are, for kernels.
#[derive(Clone, Copy)]
pub(crate) struct RowLoc {
    /// First pair record.
    pub pair: usize,
    /// Distance between this row's consecutive pair records.
    pub stride: usize,
    /// Odd-chunk record.
    pub odd: usize,
    /// Tail record.
    pub tail: usize,
}

impl Geom {
    pub(crate) fn new(rows: usize, cols: usize, bits: u8) -> Geom {
        let shape = RowShape::new(cols);
        let gb = G * bits as usize / 8;
        let pairs = shape.chunks / 2;
        let dp = 2 * CG * gb;
        let rec_p = dp + 2 * 2 * (2 * CG);
        let rec_o = if shape.chunks % 2 == 1 {
            CG * gb + 2 * 2 * CG
        } else {
            0
        };
        let dt = shape.tail * gb;
        let rec_t = dt + 2 * 2 * shape.tail;
        let row_rec = pairs * rec_p + rec_o + rec_t;
        Geom {
            shape,
            rows,
            bits,
            pairs,
            gb,
            dp,
            rec_p,
            rec_o,
            dt,
            rec_t,
            row_rec,
            block: (RB * row_rec).next_multiple_of(64),
        }
    }

    /// Total bytes of storage.
    pub(crate) fn bytes(&self) -> usize {
        let full = self.rows / RB;
        let rest = self.rows % RB;
        full * self.block + (rest * self.row_rec).next_multiple_of(64)
    }

    /// Record offsets of row `r`.
    #[inline]
    pub(crate) fn loc(&self, r: usize) -> RowLoc {
        let (b, k) = (r / RB, r % RB);
        let nb = (self.rows - b * RB).min(RB);
        let base = b * self.block;
        let after_pairs = base + self.pairs * nb * self.rec_p;
        RowLoc {
            pair: base + k * self.rec_p,
            stride: nb * self.rec_p,
            odd: after_pairs + k * self.rec_o,
            tail: after_pairs + nb * self.rec_o + k * self.rec_t,
        }
    }

    /// Offset of byte `b` of row `r`'s packed row (the layout of `crate::layout`).
    pub(crate) fn byte(&self, r: usize, b: usize) -> usize {
        let l = self.loc(r);
        let in_pairs = self.pairs * self.dp;
        if b < in_pairs {
            l.pair + b / self.dp * l.stride + b % self.dp
        } else if self.rec_o > 0 && b - in_pairs < CG * self.gb {
            l.odd + (b - in_pairs)
        } else {
            l.tail + (b - in_pairs - if self.rec_o > 0 { CG * self.gb } else { 0 })
        }
    }

    /// Offsets of the f16 scale and min of group `g` of row `r`.
    pub(crate) fn params(&self, r: usize, g: usize) -> (usize, usize) {
        let l = self.loc(r);
        let gp = self.pairs * 2 * CG;
        if g < gp {
            let at = l.pair + g / (2 * CG) * l.stride + self.dp + 2 * (g % (2 * CG));
            (at, at + 2 * 2 * CG)
        } else if g < self.shape.chunks * CG {
            let at = l.odd + CG * self.gb + 2 * (g - gp);
            (at, at + 2 * CG)
        } else {
            let t = g - self.shape.chunks * CG;
            let at = l.tail + self.dt + 2 * t;
            (at, at + 2 * self.shape.tail)
        }
    }

    /// Copy row `r`'s pieces between its packed form and the storage: `f` gets
    /// (storage offset, packed-row range) for data and (storage offset, group
    /// range, is_min) for parameters, each a contiguous run.
    fn pieces(
        &self,
        r: usize,
        mut data: impl FnMut(usize, std::ops::Range<usize>),
        mut par: impl FnMut(usize, std::ops::Range<usize>, bool),
    ) {
        let l = self.loc(r);
        let gp = 2 * CG;
        for p in 0..self.pairs {
            let at = l.pair + p * l.stride;
            data(at, p * self.dp..(p + 1) * self.dp);
            par(at + self.dp, p * gp..(p + 1) * gp, false);
            par(at + self.dp + 2 * gp, p * gp..(p + 1) * gp, true);
        }
        let (mut b, mut g) = (self.pairs * self.dp, self.pairs * gp);
        if self.rec_o > 0 {
            let n = CG * self.gb;
            data(l.odd, b..b + n);
            par(l.odd + n, g..g + CG, false);
            par(l.odd + n + 2 * CG, g..g + CG, true);
            b += n;
            g += CG;
        }
        if self.rec_t > 0 {
            let t = self.shape.tail;
            data(l.tail, b..b + self.dt);
            par(l.tail + self.dt, g..g + t, false);
            par(l.tail + self.dt + 2 * t, g..g + t, true);
        }
    }

    /// Write row `r` (packed bytes, scales, mins) into `data`.
    pub(crate) fn write_row(
        &self,
        data: &mut [u8],
        r: usize,
        packed: &[u8],
        sc: &[f16],
        mn: &[f16],
    ) {
        let cell = std::cell::RefCell::new(data);
        self.pieces(
            r,
            |at, range| {
                let n = range.len();
                cell.borrow_mut()[at..at + n].copy_from_slice(&packed[range]);
            },
            |at, groups, is_min| {
                let src = if is_min { mn } else { sc };
                let mut d = cell.borrow_mut();
                for (k, g) in groups.enumerate() {
                    d[at + 2 * k..at + 2 * k + 2].copy_from_slice(&src[g].to_le_bytes());
                }
            },
        );
    }

    /// Read row `r` back (inverse of [`Geom::write_row`]).
    pub(crate) fn read_row(
        &self,
        data: &[u8],
        r: usize,
        packed: &mut [u8],
        sc: &mut [f16],
        mn: &mut [f16],
    ) {
        let (sc, mn) = (std::cell::RefCell::new(sc), std::cell::RefCell::new(mn));
        self.pieces(
            r,
            |at, range| {
                let n = range.len();
                packed[range].copy_from_slice(&data[at..at + n]);
            },
            |at, groups, is_min| {
                let mut dst = if is_min {
                    mn.borrow_mut()
                } else {
                    sc.borrow_mut()
                };
                for (k, g) in groups.enumerate() {
                    dst[g] = f16::from_le_bytes([data[at + 2 * k], data[at + 2 * k + 1]]);
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every packed byte and every scale/min of every row has its own slot.
    #[test]
    fn storage_is_injective_and_in_bounds() {
        for bits in [4u8, 8] {
            for cols in [32, 64, 96, 256, 288, 512, 576, 1536, 32 * 27] {
                for rows in [1, 2, 3, 4, 5, 7, 9] {
                    let g = Geom::new(rows, cols, bits);
                    let mut used = vec![false; g.bytes()];
                    let mut mark = |at: usize, n: usize| {
                        for u in &mut used[at..at + n] {
                            assert!(!*u, "bits {bits} cols {cols} rows {rows}: overlap at {at}");
                            *u = true;
                        }
                    };
                    for r in 0..rows {
                        for b in 0..cols * bits as usize / 8 {
                            mark(g.byte(r, b), 1);
                        }
                        for gi in 0..cols / G {
                            let (s, m) = g.params(r, gi);
                            mark(s, 2);
                            mark(m, 2);
                        }
                    }
                    let used_n = used.iter().filter(|&&u| u).count();
                    assert_eq!(used_n, rows * g.row_rec);
                    assert!(g.bytes() - used_n < 64 * rows.div_ceil(RB));
                }
            }
        }
    }
}
