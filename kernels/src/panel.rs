//! Row panels: a second arrangement of an 8-bit [`QMatrix`] for the AVX-512
//! kernels, where one register holds 16 rows side by side.
//!
//! Rows are taken 16 at a time (a *panel*; the last one padded with zero
//! rows). For each group `g` of 32 columns a panel has one 576-byte record:
//! eight 64-byte *words* `t = 0..8`, where bytes `4j..4j+4` of word `t` are
//! columns `32g + 4t .. 32g + 4t + 4` of the panel's row `j`; then the 16
//! rows' f16 scales, then their 16 f16 mins. One `vpdpbusd` of word `t`
//! against those 4 activation bytes broadcast to every lane adds 4 products
//! to each of 16 rows at once, so a kernel needs no horizontal sum and no
//! special case for a row's last groups. The values are copied from the
//! matrix unchanged (same quantized bytes, same f16 parameters).
//!
//! Built by `QMatrix::prepare` at engine start (or on first use by an
//! AVX-512 kernel); the matrix keeps its own storage for every other reader.

use half::f16;

use crate::QMatrix;
use crate::buffer::AlignedBytes;
use crate::layout::{G, RowShape, elem_pos};

/// Rows per panel.
pub(crate) const PANEL_ROWS: usize = 16;
/// Bytes of the packed 8-bit words of one (panel, group) record.
pub(crate) const WORDS_BYTES: usize = PANEL_ROWS * G;
/// Bytes of one (panel, group) record: words, 16 f16 scales, 16 f16 mins.
pub(crate) const RECORD: usize = WORDS_BYTES + 2 * 2 * PANEL_ROWS;

/// An 8-bit matrix in row panels (see the module comment).
#[derive(Clone)]
pub(crate) struct Panels {
    groups: usize,
    panels: usize,
    /// Where activation word `t` of group `g` sits in an activation row's
    /// element layout (`crate::layout`), at index `g * 8 + t`.
    words: Vec<usize>,
    data: AlignedBytes,
}

impl Panels {
    /// The panels of the 8-bit matrix `w`.
    pub(crate) fn build(w: &QMatrix) -> Panels {
        assert_eq!(w.bits(), 8, "row panels hold 8-bit matrices");
        let shape = RowShape::new(w.cols());
        let groups = shape.groups;
        let panels = w.rows().div_ceil(PANEL_ROWS);
        let mut data = AlignedBytes::zeroed(panels * groups * RECORD);
        let out = data.as_mut_slice();
        let mut packed = vec![0u8; w.cols()];
        let (mut sc, mut mn) = (vec![f16::ZERO; groups], vec![f16::ZERO; groups]);
        for r in 0..w.rows() {
            w.read_row_into(r, &mut packed, &mut sc, &mut mn);
            let (p, j) = (r / PANEL_ROWS, r % PANEL_ROWS);
            for g in 0..groups {
                let rec = &mut out[(p * groups + g) * RECORD..][..RECORD];
                for t in 0..G / 4 {
                    for k in 0..4 {
                        rec[t * 64 + 4 * j + k] = packed[elem_pos(&shape, g, 4 * t + k)];
                    }
                }
                rec[WORDS_BYTES + 2 * j..][..2].copy_from_slice(&sc[g].to_le_bytes());
                rec[WORDS_BYTES + 2 * PANEL_ROWS + 2 * j..][..2]
                    .copy_from_slice(&mn[g].to_le_bytes());
            }
        }
        let words = (0..groups * G / 4)
            .map(|k| elem_pos(&shape, k / (G / 4), 4 * (k % (G / 4))))
            .collect();
        Panels {
            groups,
            panels,
            words,
            data,
        }
    }

    /// Groups of 32 columns.
    #[cfg(test)]
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
        self.panels
    }

    /// Panel `p`'s records, group after group (`groups * RECORD` bytes).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn panel(&self, p: usize) -> &[u8] {
        &self.data.as_slice()[p * self.groups * RECORD..(p + 1) * self.groups * RECORD]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_its_lane() {
        let (rows, cols) = (19, 96);
        let mut raw = Vec::new();
        for r in 0..rows {
            for g in 0..cols / G {
                raw.extend_from_slice(
                    &f16::from_f32(0.5 + r as f32 + g as f32 / 8.0).to_le_bytes(),
                );
                raw.extend((0..G).map(|i| (r * 7 + g * 3 + i) as u8));
            }
        }
        let w = QMatrix::from_ggml_q8_0(rows, cols, &raw).unwrap();
        let p = Panels::build(&w);
        assert_eq!((p.panels(), p.groups()), (2, 3));
        for r in 0..rows {
            let rec0 = p.panel(r / PANEL_ROWS);
            let j = r % PANEL_ROWS;
            for g in 0..3 {
                let rec = &rec0[g * RECORD..(g + 1) * RECORD];
                for i in 0..G {
                    assert_eq!(rec[(i / 4) * 64 + 4 * j + i % 4], w.quant(r, g * G + i));
                }
                let h = |at: usize| f16::from_le_bytes([rec[at], rec[at + 1]]).to_f32();
                let (s, m) = w.group_params(r, g);
                assert_eq!(h(WORDS_BYTES + 2 * j), s);
                assert_eq!(h(WORDS_BYTES + 2 * PANEL_ROWS + 2 * j), m);
            }
        }
        // The padding rows of the last panel are zero.
        let last = p.panel(1);
        for g in 0..3 {
            for j in rows % PANEL_ROWS..PANEL_ROWS {
                assert!((0..8).all(|t| last[g * RECORD + t * 64 + 4 * j..][..4] == [0; 4]));
            }
        }
    }
}
