//! Row panels: the arrangement of a [`QMatrix`] for the AVX-512 and AVX2
//! kernels, where one register holds 16 rows side by side (AVX2: 8 rows,
//! half of each 64-byte word).
//!
//! Rows are taken 16 at a time (a *panel*; the last one padded with zero
//! rows). For each group `g` of 32 columns a panel has one *record*: its
//! packed 64-byte *words*, then the 16 rows' f16 scales, then their 16 f16
//! mins. One `vpdpbusd` of an (expanded) word against 4 activation bytes
//! broadcast to every lane adds 4 products to each of 16 rows at once, so a
//! kernel needs no horizontal sum and no special case for a row's last groups.
//!
//! - 8-bit: eight words `t = 0..8`; bytes `4j..4j+4` of word `t` are columns
//!   `32g + 4t .. 32g + 4t + 4` of the panel's row `j` (576-byte records).
//! - 4-bit: four words `t = 0..4`; byte `4j + k` of word `t` holds column
//!   `32g + 4t + k` of row `j` in its low nibble and column `32g + 16 + 4t + k`
//!   in its high nibble, so `& 0xF` gives the operand of activation word `t`
//!   and `>> 4` that of word `t + 4` (320-byte records: the same 20 bytes per
//!   row and group as the row storage, so a 4-bit matrix is converted, not
//!   copied).
//!
//! The values are the matrix's own (same quantized values, same f16
//! parameters). An 8-bit matrix keeps its row storage beside its panels (the
//! embedding lookup and other ISAs read it); a 4-bit matrix that
//! `QMatrix::repack` converted holds only panels.

use half::f16;

use crate::QMatrix;
use crate::buffer::AlignedBytes;
use crate::layout::{G, RowShape, elem_pos};

/// Rows per panel.
pub(crate) const PANEL_ROWS: usize = 16;

/// Bytes of the packed words of one (panel, group) record.
pub(crate) const fn words_bytes(bits: u8) -> usize {
    PANEL_ROWS * G * bits as usize / 8
}

/// Bytes of one (panel, group) record: words, 16 f16 scales, 16 f16 mins.
pub(crate) const fn record_bytes(bits: u8) -> usize {
    words_bytes(bits) + 2 * 2 * PANEL_ROWS
}

/// A matrix in row panels (see the module comment).
#[derive(Clone)]
pub(crate) struct Panels {
    bits: u8,
    rows: usize,
    groups: usize,
    /// Where activation word `t` of group `g` sits in an activation row's
    /// element layout (`crate::layout`), at index `g * 8 + t`.
    words: Vec<usize>,
    data: AlignedBytes,
}

/// One row in natural column order: unsigned values, per-group scales and mins.
pub(crate) struct NaturalRow {
    pub u: Vec<u8>,
    pub sc: Vec<f16>,
    pub mn: Vec<f16>,
}

impl NaturalRow {
    pub(crate) fn new(cols: usize) -> NaturalRow {
        let groups = cols / G;
        NaturalRow {
            u: vec![0; cols],
            sc: vec![f16::ZERO; groups],
            mn: vec![f16::ZERO; groups],
        }
    }
}

/// Where column `i` (0..32) of a group sits for lane `j` in a record's
/// words: the byte, and the shift of its bits in it (4 for a high nibble).
#[inline]
fn lane_pos(bits: u8, j: usize, i: usize) -> (usize, u32) {
    let (word, shift) = if bits == 8 {
        (i / 4, 0)
    } else {
        (i % 16 / 4, 4 * (i / 16) as u32)
    };
    (word * 64 + 4 * j + i % 4, shift)
}

/// Column `i` of lane `j` in the record `rec`.
#[inline]
fn lane_value(rec: &[u8], bits: u8, j: usize, i: usize) -> u8 {
    let (at, shift) = lane_pos(bits, j, i);
    let v = rec[at] >> shift;
    if bits == 8 { v } else { v & 0xF }
}

/// The f16 (scale, min) of lane `j` in the record `rec`.
fn lane_params(rec: &[u8], bits: u8, j: usize) -> (f16, f16) {
    let wb = words_bytes(bits);
    let h = |at: usize| f16::from_le_bytes([rec[at], rec[at + 1]]);
    (h(wb + 2 * j), h(wb + 2 * PANEL_ROWS + 2 * j))
}

/// Writes `row` into lane `j` of every record of one panel (`panel` holds
/// the panel's `groups` records, and is zero in that lane).
fn write_lane(panel: &mut [u8], bits: u8, j: usize, row: &NaturalRow) {
    let rec_len = record_bytes(bits);
    let wb = words_bytes(bits);
    for (g, rec) in panel.chunks_exact_mut(rec_len).enumerate() {
        for (i, &v) in row.u[g * G..(g + 1) * G].iter().enumerate() {
            let (at, shift) = lane_pos(bits, j, i);
            rec[at] |= v << shift;
        }
        rec[wb + 2 * j..][..2].copy_from_slice(&row.sc[g].to_le_bytes());
        rec[wb + 2 * PANEL_ROWS + 2 * j..][..2].copy_from_slice(&row.mn[g].to_le_bytes());
    }
}

impl Panels {
    /// Bytes of the panels of a `rows x cols` matrix of `bits`.
    pub(crate) fn bytes_for(rows: usize, cols: usize, bits: u8) -> usize {
        rows.div_ceil(PANEL_ROWS) * (cols / G) * record_bytes(bits)
    }

    /// The panels of `w` (4- or 8-bit), in a new buffer.
    pub(crate) fn build(w: &QMatrix) -> Panels {
        let (rows, cols, bits) = (w.rows(), w.cols(), w.bits());
        let mut data = AlignedBytes::zeroed(Panels::bytes_for(rows, cols, bits));
        let n = (cols / G) * record_bytes(bits);
        let mut row = NaturalRow::new(cols);
        let mut scratch = crate::qmatrix::RowScratch::default();
        for r in 0..rows {
            w.natural_row_into(r, &mut row, &mut scratch);
            let p = r / PANEL_ROWS;
            write_lane(
                &mut data.as_mut_slice()[p * n..(p + 1) * n],
                bits,
                r % PANEL_ROWS,
                &row,
            );
        }
        Panels::from_parts(rows, cols, bits, data)
    }

    /// Rearranges `data`, which holds a `rows x cols` matrix in another
    /// layout, into panels in the same buffer. `read(data, r, row)` gives
    /// row `r`, and must read only bytes at or after offset `(r / 16) * n`
    /// (`n` = one panel's bytes), since panels before row `r`'s are written
    /// by then. The row storage (`crate::storage`) satisfies this: a panel
    /// is 16 rows of 20 bytes a group (4-bit), a storage block 4 such rows
    /// padded to 64 bytes. The buffer grows first when the panels need more
    /// bytes than it holds (a last, partial panel), and is cut to size after.
    pub(crate) fn convert(
        rows: usize,
        cols: usize,
        bits: u8,
        mut data: AlignedBytes,
        mut read: impl FnMut(&[u8], usize, &mut NaturalRow),
    ) -> Panels {
        let need = Panels::bytes_for(rows, cols, bits);
        if need > data.len() {
            let mut bigger = AlignedBytes::zeroed(need);
            bigger.as_mut_slice()[..data.len()].copy_from_slice(data.as_slice());
            data = bigger;
        }
        let n = (cols / G) * record_bytes(bits);
        let mut lanes: Vec<NaturalRow> = (0..PANEL_ROWS).map(|_| NaturalRow::new(cols)).collect();
        for p in 0..rows.div_ceil(PANEL_ROWS) {
            let here = (rows - p * PANEL_ROWS).min(PANEL_ROWS);
            // Read the panel's rows before overwriting: their bytes start at
            // or after this panel's first byte (see above).
            for (j, lane) in lanes.iter_mut().take(here).enumerate() {
                read(data.as_slice(), p * PANEL_ROWS + j, lane);
            }
            let panel = &mut data.as_mut_slice()[p * n..(p + 1) * n];
            panel.fill(0);
            for (j, lane) in lanes.iter().take(here).enumerate() {
                write_lane(panel, bits, j, lane);
            }
        }
        data.resize(need);
        Panels::from_parts(rows, cols, bits, data)
    }

    fn from_parts(rows: usize, cols: usize, bits: u8, data: AlignedBytes) -> Panels {
        let shape = RowShape::new(cols);
        let groups = shape.groups;
        let words = (0..groups * G / 4)
            .map(|k| elem_pos(&shape, k / (G / 4), 4 * (k % (G / 4))))
            .collect();
        // The 8-bit kernels take the offset out in integers (AVX-512) or
        // work on u - 128 (AVX2).
        assert!(
            bits != 8
                || data.as_slice().chunks_exact(record_bytes(8)).all(|rec| {
                    (0..PANEL_ROWS).all(|j| {
                        let (sc, mn) = lane_params(rec, 8, j);
                        mn.to_f32() == -128.0 * sc.to_f32()
                    })
                }),
            "8-bit panels need every min to be -128 * scale (q + 128 storage)"
        );
        Panels {
            bits,
            rows,
            groups,
            words,
            data,
        }
    }

    /// Row `r` in natural column order (see [`NaturalRow`]).
    pub(crate) fn natural_row_into(&self, r: usize, row: &mut NaturalRow) {
        for g in 0..self.groups {
            let (rec, j) = self.record(r, g);
            for (i, v) in row.u[g * G..(g + 1) * G].iter_mut().enumerate() {
                *v = lane_value(rec, self.bits, j, i);
            }
            (row.sc[g], row.mn[g]) = lane_params(rec, self.bits, j);
        }
    }

    /// The record of row `r`'s group `g` and the row's lane in it.
    fn record(&self, r: usize, g: usize) -> (&[u8], usize) {
        assert!(
            r < self.rows && g < self.groups,
            "panel row {r} group {g} out of range ({} rows, {} groups)",
            self.rows,
            self.groups
        );
        let n = record_bytes(self.bits);
        let at = (r / PANEL_ROWS * self.groups + g) * n;
        (&self.data.as_slice()[at..at + n], r % PANEL_ROWS)
    }

    /// The f16 (scale, min) of row `r`'s group `g`.
    pub(crate) fn params(&self, r: usize, g: usize) -> (f16, f16) {
        let (rec, j) = self.record(r, g);
        lane_params(rec, self.bits, j)
    }

    /// The unsigned quantized value of row `r`, column `c`.
    pub(crate) fn quant(&self, r: usize, c: usize) -> u8 {
        let (rec, j) = self.record(r, c / G);
        lane_value(rec, self.bits, j, c % G)
    }

    /// Bits per weight (4 or 8).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn bits(&self) -> u8 {
        self.bits
    }

    /// Groups of 32 columns.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn groups(&self) -> usize {
        self.groups
    }

    /// Activation word offsets: `words()[g * 8 + t]` is where columns
    /// `32g + 4t .. 32g + 4t + 4` of an activation row start.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn words(&self) -> &[usize] {
        &self.words
    }

    /// Number of panels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL_ROWS)
    }

    /// Bytes held.
    pub(crate) fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// Panel `p`'s records, group after group (`groups * record_bytes` bytes).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn panel(&self, p: usize) -> &[u8] {
        let n = self.groups * record_bytes(self.bits);
        &self.data.as_slice()[p * n..(p + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(w: &QMatrix) {
        let (rows, bits) = (w.rows(), w.bits());
        let (rec_len, wb) = (record_bytes(bits), words_bytes(bits));
        let p = Panels::build(w);
        assert_eq!((p.panels(), p.groups()), (rows.div_ceil(16), w.cols() / G));
        let groups = p.groups();
        for r in 0..rows {
            let rec0 = p.panel(r / PANEL_ROWS);
            let j = r % PANEL_ROWS;
            for g in 0..groups {
                let rec = &rec0[g * rec_len..(g + 1) * rec_len];
                for i in 0..G {
                    let got = if bits == 8 {
                        rec[(i / 4) * 64 + 4 * j + i % 4]
                    } else {
                        let b = rec[(i % 16 / 4) * 64 + 4 * j + i % 4];
                        if i < 16 { b & 0xF } else { b >> 4 }
                    };
                    assert_eq!(
                        got,
                        w.quant(r, g * G + i),
                        "{bits}-bit row {r} col {}",
                        g * G + i
                    );
                }
                let h = |at: usize| f16::from_le_bytes([rec[at], rec[at + 1]]).to_f32();
                let (s, m) = w.group_params(r, g);
                assert_eq!(h(wb + 2 * j), s);
                assert_eq!(h(wb + 2 * PANEL_ROWS + 2 * j), m);
            }
            // Reading a row back gives the matrix's row.
            let mut row = NaturalRow::new(w.cols());
            p.natural_row_into(r, &mut row);
            assert!((0..w.cols()).all(|c| row.u[c] == w.quant(r, c)));
            assert!(
                (0..groups)
                    .all(|g| (row.sc[g].to_f32(), row.mn[g].to_f32()) == w.group_params(r, g))
            );
        }
        // The padding rows of the last panel are zero.
        let last = p.panel(p.panels() - 1);
        for g in 0..groups {
            for j in (rows - 1) % PANEL_ROWS + 1..PANEL_ROWS {
                let n = wb / 64;
                assert!((0..n).all(|t| last[g * rec_len + t * 64 + 4 * j..][..4] == [0; 4]));
            }
        }
    }

    /// Converting the row storage in its own buffer gives the same bytes as
    /// building panels in a new one, for row counts with and without a
    /// partial last panel or storage block, and widths with and without
    /// chunk pairs, an odd chunk and tail groups.
    #[test]
    fn conversion_in_place_equals_a_fresh_build() {
        let mut seed = 7u32;
        for bits in [4u8, 8] {
            for cols in [32, 96, 288, 576, 1536] {
                for rows in [1, 3, 4, 5, 15, 16, 17, 31, 33, 49, 64] {
                    let mut raw = Vec::new();
                    for _ in 0..rows * cols / G {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        let d = f16::from_f32(0.01 + (seed >> 20) as f32 / 4096.0);
                        raw.extend_from_slice(&d.to_le_bytes());
                        let n = G * bits as usize / 8;
                        raw.extend((0..n).map(|i| (seed >> (i % 24)) as u8 ^ i as u8));
                    }
                    let w = if bits == 4 {
                        QMatrix::from_ggml_q4_0(rows, cols, &raw).unwrap()
                    } else {
                        QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap()
                    };
                    let built = Panels::build(&w);
                    let converted = w.clone().take_as_panels();
                    assert_eq!(
                        built.data.as_slice(),
                        converted.data.as_slice(),
                        "{bits}-bit {rows}x{cols}"
                    );
                    assert_eq!(built.words, converted.words);
                }
            }
        }
    }

    #[test]
    fn every_value_lands_in_its_lane() {
        for (rows, cols) in [(19, 96), (16, 32), (33, 576)] {
            let (mut raw8, mut raw4) = (Vec::new(), Vec::new());
            for r in 0..rows {
                for g in 0..cols / G {
                    let d = f16::from_f32(0.5 + r as f32 + g as f32 / 8.0).to_le_bytes();
                    raw8.extend_from_slice(&d);
                    raw8.extend((0..G).map(|i| (r * 7 + g * 3 + i) as u8));
                    raw4.extend_from_slice(&d);
                    raw4.extend((0..G / 2).map(|i| (r * 5 + g * 11 + i * 29) as u8));
                }
            }
            check(&QMatrix::from_ggml_q8_0(rows, cols, &raw8).unwrap());
            check(&QMatrix::from_ggml_q4_0(rows, cols, &raw4).unwrap());
        }
    }
}
