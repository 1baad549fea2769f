//! `QMatrix`: a row-major matrix of 4- or 8-bit affine-quantized weights
//! (w = scale*u + min per group of 32 columns, scale and min in f16), its
//! lossless import from ggml Q4_0/Q4_1/Q8_0 blocks, f32 quantization,
//! dequantization and row slicing/stacking. Element order inside a row follows
//! `crate::layout`; where rows, scales and mins are stored follows `crate::storage`.
//! An 8-bit matrix always holds symmetric values as `u = q + 128` with a min of
//! exactly `-128 * scale` (every constructor makes it so; the panel kernels
//! rely on it, AVX-512 taking the offset out in integers, AVX2 working on
//! `u - 128`, and the panels check it when they are built).

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use crate::buffer::AlignedBytes;
use crate::layout::{
    G, RowShape, elem_pos, f16_ceil, f16_floor, nibble_pos, pack_nibbles, to_layout, unpack_nibbles,
};
use crate::panel::{NaturalRow, Panels};
use crate::storage::Geom;
use crate::{Isa, KernelError};

/// Buffers reused by [`QMatrix::natural_row_into`] across the rows of one
/// matrix (or of matrices with the same columns).
#[derive(Default)]
pub(crate) struct RowScratch {
    /// Element-layout position of each natural column.
    perm: Vec<usize>,
    packed: Vec<u8>,
    laid: Vec<u8>,
}

/// Row `r` of the row storage `data` (geometry `geom`) in natural column
/// order.
fn natural_row(geom: &Geom, data: &[u8], r: usize, row: &mut NaturalRow, scratch: &mut RowScratch) {
    let shape = &geom.shape;
    let cols = shape.groups * G;
    if scratch.perm.len() != cols {
        scratch.perm = (0..cols).map(|c| elem_pos(shape, c / G, c % G)).collect();
    }
    scratch.packed.resize(cols * geom.bits as usize / 8, 0);
    scratch.laid.resize(cols, 0);
    geom.read_row(data, r, &mut scratch.packed, &mut row.sc, &mut row.mn);
    if geom.bits == 8 {
        scratch.laid.copy_from_slice(&scratch.packed);
    } else {
        unpack_nibbles(shape, &scratch.packed, &mut scratch.laid);
    }
    for (v, &p) in row.u[..cols].iter_mut().zip(&scratch.perm) {
        *v = scratch.laid[p];
    }
}

/// A quantized weight matrix in the crate's A8-C8-W4 layout.
#[derive(Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    bits: u8,
    geom: Geom,
    /// The storage of `crate::storage` (weights, scales and mins interleaved).
    data: AlignedBytes,
    /// The matrix in row panels (`crate::panel`): for an 8-bit matrix a
    /// copy built by [`QMatrix::prepare`] or on first use by the AVX-512
    /// and AVX2 kernels; for a 4-bit one set by [`QMatrix::repack`], which gives up
    /// `data`.
    panels: OnceLock<Panels>,
    /// `data` was given up: the matrix lives in `panels` only.
    panelled: bool,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bits", &self.bits)
            .field("size_bytes", &self.size_bytes())
            .finish_non_exhaustive()
    }
}

/// Validate a shape; `what` is the number of elements that must be addressable.
fn check_shape(rows: usize, cols: usize) -> Result<RowShape, KernelError> {
    let bad = |reason: &str| KernelError::BadShape {
        rows,
        cols,
        reason: reason.to_string(),
    };
    if cols == 0 {
        return Err(bad("cols must be at least 32"));
    }
    if !cols.is_multiple_of(G) {
        return Err(bad("cols must be a multiple of 32"));
    }
    if rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .is_none()
    {
        return Err(bad("rows*cols overflows usize"));
    }
    Ok(RowShape::new(cols))
}

/// Read a little-endian f16 at `b[0..2]`.
#[inline]
fn rd_f16(b: &[u8]) -> f16 {
    f16::from_le_bytes([b[0], b[1]])
}

impl QMatrix {
    /// Build a matrix row by row: `fill(r, u, scales, mins)` writes the natural-order
    /// unsigned values of row `r` and its per-group scales and mins.
    fn build(
        rows: usize,
        cols: usize,
        bits: u8,
        mut fill: impl FnMut(usize, &mut [u8], &mut [f16], &mut [f16]) -> Result<(), KernelError>,
    ) -> Result<QMatrix, KernelError> {
        let shape = check_shape(rows, cols)?;
        let geom = Geom::new(rows, cols, bits);
        let ng = shape.groups;
        let mut data = AlignedBytes::zeroed(geom.bytes());
        let mut natural = vec![0u8; cols];
        let mut laid = vec![0u8; cols];
        let mut packed = vec![0u8; cols * bits as usize / 8];
        let (mut sc, mut mn) = (vec![f16::ZERO; ng], vec![f16::ZERO; ng]);
        for r in 0..rows {
            fill(r, &mut natural, &mut sc, &mut mn)?;
            if bits == 4 {
                to_layout(&shape, &natural, &mut laid);
                pack_nibbles(&shape, &laid, &mut packed);
            } else {
                to_layout(&shape, &natural, &mut packed);
            }
            geom.write_row(data.as_mut_slice(), r, &packed, &sc, &mn);
        }
        Ok(QMatrix {
            rows,
            cols,
            bits,
            geom,
            data,
            panels: OnceLock::new(),
            panelled: false,
        })
    }

    /// An all-zero matrix with the same columns and bits and `rows` rows.
    fn empty_like(&self, rows: usize) -> QMatrix {
        let geom = Geom::new(rows, self.cols, self.bits);
        QMatrix {
            rows,
            cols: self.cols,
            bits: self.bits,
            geom,
            data: AlignedBytes::zeroed(geom.bytes()),
            panels: OnceLock::new(),
            panelled: false,
        }
    }

    /// Row `r` as (packed bytes in the element layout, scales, mins).
    fn read_row(&self, r: usize) -> (Vec<u8>, Vec<f16>, Vec<f16>) {
        let ng = self.geom.shape.groups;
        let mut packed = vec![0u8; self.cols * self.bits as usize / 8];
        let (mut sc, mut mn) = (vec![f16::ZERO; ng], vec![f16::ZERO; ng]);
        self.read_row_into(r, &mut packed, &mut sc, &mut mn);
        (packed, sc, mn)
    }

    /// Copy row `from` of `src` into row `to` of `self` (same cols and bits).
    fn copy_row_from(&mut self, to: usize, src: &QMatrix, from: usize) {
        let (packed, sc, mn) = src.read_row(from);
        self.geom
            .write_row(self.data.as_mut_slice(), to, &packed, &sc, &mn);
    }

    fn check_raw(
        format: &'static str,
        rows: usize,
        cols: usize,
        block: usize,
        raw: &[u8],
    ) -> Result<(), KernelError> {
        check_shape(rows, cols)?;
        let expected = rows * (cols / G) * block;
        if raw.len() != expected {
            return Err(KernelError::RawLength {
                format,
                rows,
                cols,
                expected,
                got: raw.len(),
            });
        }
        Ok(())
    }

    /// A min of `k * d` for a block scale `d`, erroring if it leaves the f16 range.
    fn scaled_min(
        rows: usize,
        cols: usize,
        r: usize,
        g: usize,
        d: f16,
        k: f32,
    ) -> Result<f16, KernelError> {
        let v = k * d.to_f32();
        let h = f16::from_f32(v);
        if d.is_finite() && !h.is_finite() {
            return Err(KernelError::F16Range {
                rows,
                cols,
                row: r,
                group: g,
                what: "min",
                value: v,
            });
        }
        Ok(h)
    }

    /// Import ggml Q4_0 blocks (18 bytes: f16 d, 16 bytes of nibbles; element
    /// `j < 16` is the low nibble of byte `j`, `j >= 16` the high nibble of byte
    /// `j - 16`; w = d*(q-8)). Lossless: scale = d, min = -8d.
    pub fn from_ggml_q4_0(rows: usize, cols: usize, raw: &[u8]) -> Result<Self, KernelError> {
        Self::check_raw("q4_0", rows, cols, 18, raw)?;
        let ng = cols / G;
        Self::build(rows, cols, 4, |r, u, sc, mn| {
            for g in 0..ng {
                let b = &raw[(r * ng + g) * 18..][..18];
                let d = rd_f16(b);
                sc[g] = d;
                mn[g] = Self::scaled_min(rows, cols, r, g, d, -8.0)?;
                for j in 0..16 {
                    u[g * G + j] = b[2 + j] & 0xF;
                    u[g * G + 16 + j] = b[2 + j] >> 4;
                }
            }
            Ok(())
        })
    }

    /// Import ggml Q4_1 blocks (20 bytes: f16 d, f16 m, 16 bytes of nibbles;
    /// w = d*q + m). Lossless: scale = d, min = m.
    pub fn from_ggml_q4_1(rows: usize, cols: usize, raw: &[u8]) -> Result<Self, KernelError> {
        Self::check_raw("q4_1", rows, cols, 20, raw)?;
        let ng = cols / G;
        Self::build(rows, cols, 4, |r, u, sc, mn| {
            for g in 0..ng {
                let b = &raw[(r * ng + g) * 20..][..20];
                sc[g] = rd_f16(b);
                mn[g] = rd_f16(&b[2..]);
                for j in 0..16 {
                    u[g * G + j] = b[4 + j] & 0xF;
                    u[g * G + 16 + j] = b[4 + j] >> 4;
                }
            }
            Ok(())
        })
    }

    /// Import ggml Q8_0 blocks (34 bytes: f16 d, 32 x i8 q; w = d*q). Lossless:
    /// u = q + 128, scale = d, min = -128d.
    pub fn from_ggml_q8_0(rows: usize, cols: usize, raw: &[u8]) -> Result<Self, KernelError> {
        Self::check_raw("q8_0", rows, cols, 34, raw)?;
        let ng = cols / G;
        Self::build(rows, cols, 8, |r, u, sc, mn| {
            for g in 0..ng {
                let b = &raw[(r * ng + g) * 34..][..34];
                let d = rd_f16(b);
                sc[g] = d;
                mn[g] = Self::scaled_min(rows, cols, r, g, d, -128.0)?;
                for j in 0..G {
                    u[g * G + j] = (b[2 + j] as i8 as i16 + 128) as u8;
                }
            }
            Ok(())
        })
    }

    fn check_f32(rows: usize, cols: usize, w: &[f32]) -> Result<(), KernelError> {
        check_shape(rows, cols)?;
        if w.len() != rows * cols {
            return Err(KernelError::DataLength {
                rows,
                cols,
                expected: rows * cols,
                got: w.len(),
            });
        }
        if let Some(p) = w.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::NonFinite {
                rows,
                cols,
                row: p / cols,
                col: p % cols,
                value: w[p],
            });
        }
        Ok(())
    }

    /// Quantize f32 weights to 4 bits with a per-group affine map (like Q4_1):
    /// min is the group minimum rounded down to f16, scale the smallest f16 with
    /// `min + 15*scale >= max`, `u = round((w - min)/scale)`. Every element is
    /// then within `scale/2` (plus f32 rounding) of its dequantized value.
    pub fn quantize_q4(rows: usize, cols: usize, w: &[f32]) -> Result<Self, KernelError> {
        Self::check_f32(rows, cols, w)?;
        let ng = cols / G;
        Self::build(rows, cols, 4, |r, u, sc, mn| {
            for g in 0..ng {
                let x = &w[r * cols + g * G..][..G];
                let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let range_err = |what, value| KernelError::F16Range {
                    rows,
                    cols,
                    row: r,
                    group: g,
                    what,
                    value,
                };
                let min_h = f16_floor(lo);
                if !min_h.is_finite() {
                    return Err(range_err("min", lo));
                }
                let min = min_h.to_f32();
                let scale_h = f16_ceil((hi - min) / 15.0);
                if !scale_h.is_finite() {
                    return Err(range_err("scale", (hi - min) / 15.0));
                }
                let scale = scale_h.to_f32();
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (i, &v) in x.iter().enumerate() {
                    u[g * G + i] = ((v - min) * inv).round().clamp(0.0, 15.0) as u8;
                }
                sc[g] = scale_h;
                mn[g] = min_h;
            }
            Ok(())
        })
    }

    /// Quantize f32 weights to 8 bits symmetrically per group (like Q8_0):
    /// scale = amax/127 rounded up to f16, q = round(w/scale) in -127..=127,
    /// stored as u = q + 128 with min = -128*scale.
    pub fn quantize_q8(rows: usize, cols: usize, w: &[f32]) -> Result<Self, KernelError> {
        Self::check_f32(rows, cols, w)?;
        let ng = cols / G;
        Self::build(rows, cols, 8, |r, u, sc, mn| {
            for g in 0..ng {
                let x = &w[r * cols + g * G..][..G];
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d_h = f16_ceil(amax / 127.0);
                let min_h = f16::from_f32(-128.0 * d_h.to_f32());
                if !min_h.is_finite() {
                    return Err(KernelError::F16Range {
                        rows,
                        cols,
                        row: r,
                        group: g,
                        what: "min",
                        value: -128.0 * d_h.to_f32(),
                    });
                }
                let d = d_h.to_f32();
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                for (i, &v) in x.iter().enumerate() {
                    let q = (v * inv).round().clamp(-127.0, 127.0) as i32;
                    u[g * G + i] = (q + 128) as u8;
                }
                sc[g] = d_h;
                mn[g] = min_h;
            }
            Ok(())
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (a multiple of 32).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bits per weight: 4 or 8.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Bytes of quantized data, scales and mins held (not counting the
    /// row-panel copy an 8-bit matrix keeps for AVX-512 and AVX2).
    pub fn size_bytes(&self) -> usize {
        if self.panelled {
            self.panels().size_bytes()
        } else {
            self.data.len()
        }
    }

    /// Whether [`QMatrix::repack`] converted this matrix to row panels.
    pub fn is_panelled(&self) -> bool {
        self.panelled
    }

    /// The `(scale, min)` of group `g` (columns `32g..32g+32`) of row `r`.
    pub fn group_params(&self, r: usize, g: usize) -> (f32, f32) {
        assert!(
            r < self.rows && g < self.geom.shape.groups,
            "group_params: row {r} group {g} out of range"
        );
        if self.panelled {
            let (s, m) = self.panels().params(r, g);
            return (s.to_f32(), m.to_f32());
        }
        let d = self.data.as_slice();
        let (s, m) = self.geom.params(r, g);
        let h = |at: usize| f16::from_le_bytes([d[at], d[at + 1]]).to_f32();
        (h(s), h(m))
    }

    /// The unsigned quantized value of row `r`, column `c` (0..=15 or 0..=255).
    pub fn quant(&self, r: usize, c: usize) -> u8 {
        self.u_at(r, c)
    }

    /// The unsigned quantized value of row `r`, column `c`.
    fn u_at(&self, r: usize, c: usize) -> u8 {
        if self.panelled {
            return self.panels().quant(r, c);
        }
        let p = elem_pos(&self.geom.shape, c / G, c % G);
        let d = self.data.as_slice();
        if self.bits == 8 {
            d[self.geom.byte(r, p)]
        } else {
            let (b, hi) = nibble_pos(&self.geom.shape, p);
            let v = d[self.geom.byte(r, b)];
            if hi { v >> 4 } else { v & 0xF }
        }
    }

    /// Write row `r` as f32 (`scale*u + min`, natural column order) into `out[..cols]`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows,
            "dequantize_row: row {r} out of range (rows {})",
            self.rows
        );
        assert!(
            out.len() >= self.cols,
            "dequantize_row: out has {} values, need cols {}",
            out.len(),
            self.cols
        );
        let shape = &self.geom.shape;
        let (packed, sc, mn) = self.read_row(r);
        let u = if self.bits == 8 {
            packed
        } else {
            let mut u = vec![0u8; self.cols];
            unpack_nibbles(shape, &packed, &mut u);
            u
        };
        for g in 0..shape.groups {
            let (s, m) = (sc[g].to_f32(), mn[g].to_f32());
            for i in 0..G {
                out[g * G + i] = s * u[elem_pos(shape, g, i)] as f32 + m;
            }
        }
    }

    /// A copy of rows `range`.
    pub fn slice_rows(&self, range: Range<usize>) -> QMatrix {
        assert!(
            range.start <= range.end && range.end <= self.rows,
            "slice_rows: range {range:?} out of bounds for {} rows",
            self.rows
        );
        let mut out = self.empty_like(range.end - range.start);
        for (to, from) in range.enumerate() {
            out.copy_row_from(to, self, from);
        }
        out
    }

    /// Stack matrices with equal cols and bits vertically (e.g. gate+up).
    pub fn concat_rows(parts: &[QMatrix]) -> Result<QMatrix, KernelError> {
        let first = parts.first().ok_or(KernelError::ConcatEmpty)?;
        for (index, p) in parts.iter().enumerate() {
            if p.cols != first.cols || p.bits != first.bits {
                return Err(KernelError::ConcatMismatch {
                    index,
                    rows: p.rows,
                    cols: p.cols,
                    bits: p.bits,
                    want_cols: first.cols,
                    want_bits: first.bits,
                });
            }
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        check_shape(rows, first.cols)?;
        let mut out = first.empty_like(rows);
        let mut to = 0;
        for p in parts {
            for from in 0..p.rows {
                out.copy_row_from(to, p, from);
                to += 1;
            }
        }
        Ok(out)
    }

    /// Row shape (chunks and tail).
    pub(crate) fn shape(&self) -> &RowShape {
        &self.geom.shape
    }

    /// Storage geometry of the row storage (not for a panelled matrix).
    pub(crate) fn geom(&self) -> &Geom {
        debug_assert!(!self.panelled, "row storage of a panelled matrix");
        &self.geom
    }

    /// This matrix in row panels: for an 8-bit matrix built on the first
    /// call (a copy of the values, kept for the life of the matrix).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn panels(&self) -> &Panels {
        self.panels.get_or_init(|| Panels::build(self))
    }

    /// Builds now whatever the `isa` kernels would build on first use (the
    /// row panels of an 8-bit matrix on AVX-512 and AVX2), so that the first request
    /// does not pay for it. Idempotent; other ISAs and 4-bit matrices need
    /// nothing (see [`QMatrix::repack`] for those).
    pub fn prepare(&self, isa: Isa) {
        if matches!(isa, Isa::Avx512 | Isa::Avx2) && self.bits == 8 {
            self.panels();
        }
    }

    /// Rearranges the matrix for the `isa` kernels, in place: on AVX-512 and AVX2 a
    /// 4-bit matrix is converted to row panels inside its own buffer (the
    /// same 20 bytes per row and group, so no memory is added) and an 8-bit matrix
    /// gets its panel copy, as with [`QMatrix::prepare`]. Values, and every
    /// accessor's results, are unchanged. A panelled matrix runs on the
    /// AVX-512, AVX2 and scalar kernels only. Idempotent.
    pub fn repack(&mut self, isa: Isa) {
        if !matches!(isa, Isa::Avx512 | Isa::Avx2) {
            return;
        }
        if self.bits == 4 && !self.panelled {
            let p = self.take_as_panels();
            self.panels = OnceLock::from(p);
            self.panelled = true;
        }
        self.prepare(isa);
    }

    /// Converts the row storage to panels in its own buffer, leaving `data`
    /// empty (`Panels::convert`).
    pub(crate) fn take_as_panels(&mut self) -> Panels {
        assert!(!self.panelled, "take_as_panels: already panelled");
        let data = std::mem::replace(&mut self.data, AlignedBytes::zeroed(0));
        let geom = self.geom;
        let mut scratch = RowScratch::default();
        Panels::convert(self.rows, self.cols, self.bits, data, |d, r, row| {
            natural_row(&geom, d, r, row, &mut scratch)
        })
    }

    /// The raw row-storage bytes (not for a panelled matrix).
    pub(crate) fn bytes(&self) -> &[u8] {
        debug_assert!(!self.panelled, "row storage of a panelled matrix");
        self.data.as_slice()
    }

    /// Row `r` as (packed bytes in the element layout, scales, mins), into the buffers.
    pub(crate) fn read_row_into(
        &self,
        r: usize,
        packed: &mut [u8],
        sc: &mut [f16],
        mn: &mut [f16],
    ) {
        if !self.panelled {
            self.geom.read_row(self.data.as_slice(), r, packed, sc, mn);
            return;
        }
        let mut row = NaturalRow::new(self.cols);
        self.panels().natural_row_into(r, &mut row);
        sc.copy_from_slice(&row.sc);
        mn.copy_from_slice(&row.mn);
        let shape = &self.geom.shape;
        if self.bits == 8 {
            to_layout(shape, &row.u, packed);
        } else {
            let mut laid = vec![0u8; self.cols];
            to_layout(shape, &row.u, &mut laid);
            pack_nibbles(shape, &laid, packed);
        }
    }

    /// Row `r` in natural column order; `scratch` is reused between calls
    /// (see [`RowScratch`]).
    pub(crate) fn natural_row_into(
        &self,
        r: usize,
        row: &mut NaturalRow,
        scratch: &mut RowScratch,
    ) {
        if self.panelled {
            self.panels().natural_row_into(r, row);
            return;
        }
        natural_row(&self.geom, self.data.as_slice(), r, row, scratch);
    }
}
