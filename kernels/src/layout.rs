//! The internal element layout shared by weights and activations, the nibble
//! packing of 4-bit weights, and f16 rounding helpers.
//!
//! A row of `cols` elements has `groups = cols / 32` groups. The first
//! `chunks * 8` groups are stored in *chunks* of 8 groups (256 elements) in a
//! transposed order: element `i` of group `j` of a chunk sits at
//! `(i / 4) * 32 + 4 * j + i % 4`, so each 32-byte *slice* of a chunk holds 4
//! consecutive elements of each of the 8 groups and a `vpdpbusd`/`pmaddubsw`+`pmaddwd`
//! lane `j` always accumulates group `j`: after summing the 8 slices, lane `j`
//! is the whole group's integer dot product, with no horizontal reduction.
//! The remaining `tail < 8` groups follow in natural order.
//!
//! Activations and 8-bit weights use this element layout byte for byte. 4-bit
//! weights split the element sequence into *blocks* — each chunk (256 elements),
//! then each pair of tail groups (64), then an odd last group (32) — and a block
//! of `n` elements packs into `n / 2` bytes where byte `k` holds element `k` in
//! its low nibble and element `n/2 + k` in its high nibble. So one 32-byte load
//! of a chunk yields, after `& 0xF` and `>> 4`, the operands matching activation
//! slices `s` and `s + 4`.

use half::f16;

/// Elements per group.
pub(crate) const G: usize = crate::GROUP;
/// Groups per chunk.
pub(crate) const CG: usize = 8;
/// Elements per chunk.
pub(crate) const CHUNK: usize = G * CG;

/// How a row of a given width splits into chunks and tail groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowShape {
    /// Groups in the row.
    pub groups: usize,
    /// Whole chunks of 8 groups.
    pub chunks: usize,
    /// Groups after the chunks (0..8), stored in natural order.
    pub tail: usize,
}

impl RowShape {
    pub(crate) fn new(cols: usize) -> RowShape {
        debug_assert!(cols.is_multiple_of(G));
        let groups = cols / G;
        RowShape {
            groups,
            chunks: groups / CG,
            tail: groups % CG,
        }
    }

    /// First element position (and group index * 32) of the tail.
    pub(crate) fn tail_start(&self) -> usize {
        self.chunks * CHUNK
    }
}

/// Position of element `i` of group `g` in the element layout.
#[inline]
pub(crate) fn elem_pos(shape: &RowShape, g: usize, i: usize) -> usize {
    if g < shape.chunks * CG {
        let (c, j) = (g / CG, g % CG);
        c * CHUNK + (i / 4) * 32 + 4 * j + i % 4
    } else {
        g * G + i
    }
}

/// The 4-bit block that contains element layout position `p`: (start, length).
#[inline]
fn nibble_block(shape: &RowShape, p: usize) -> (usize, usize) {
    let ts = shape.tail_start();
    if p < ts {
        (p / CHUNK * CHUNK, CHUNK)
    } else {
        let t = (p - ts) / G;
        if t / 2 * 2 + 1 < shape.tail {
            (ts + t / 2 * 2 * G, 2 * G)
        } else {
            (ts + t * G, G)
        }
    }
}

/// Byte index and whether it is the high nibble, for element layout position `p`.
#[inline]
pub(crate) fn nibble_pos(shape: &RowShape, p: usize) -> (usize, bool) {
    let (base, n) = nibble_block(shape, p);
    let off = p - base;
    if off < n / 2 {
        (base / 2 + off, false)
    } else {
        (base / 2 + off - n / 2, true)
    }
}

/// Reorder one row from natural order into the element layout.
pub(crate) fn to_layout<T: Copy>(shape: &RowShape, natural: &[T], out: &mut [T]) {
    for g in 0..shape.groups {
        for i in 0..G {
            out[elem_pos(shape, g, i)] = natural[g * G + i];
        }
    }
}

/// Pack a row of 4-bit values (each `< 16`) given in element layout into bytes.
pub(crate) fn pack_nibbles(shape: &RowShape, elems: &[u8], out: &mut [u8]) {
    out.fill(0);
    for (p, &e) in elems.iter().enumerate() {
        debug_assert!(e < 16);
        let (b, hi) = nibble_pos(shape, p);
        out[b] |= if hi { e << 4 } else { e };
    }
}

/// Unpack a row of 4-bit values into element layout (inverse of [`pack_nibbles`]).
pub(crate) fn unpack_nibbles(shape: &RowShape, bytes: &[u8], elems: &mut [u8]) {
    let ts = shape.tail_start();
    let mut unpack_block = |base: usize, n: usize| {
        let h = n / 2;
        for k in 0..h {
            let b = bytes[base / 2 + k];
            elems[base + k] = b & 0xF;
            elems[base + h + k] = b >> 4;
        }
    };
    for c in 0..shape.chunks {
        unpack_block(c * CHUNK, CHUNK);
    }
    let mut t = 0;
    while t + 1 < shape.tail {
        unpack_block(ts + t * G, 2 * G);
        t += 2;
    }
    if t < shape.tail {
        unpack_block(ts + t * G, G);
    }
}

/// The next f16 toward minus infinity.
fn f16_next_down(h: f16) -> f16 {
    let b = h.to_bits();
    if b & 0x7FFF == 0 {
        f16::from_bits(0x8001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

/// The next f16 toward plus infinity.
fn f16_next_up(h: f16) -> f16 {
    let b = h.to_bits();
    if b & 0x7FFF == 0 {
        f16::from_bits(0x0001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

/// The largest f16 `<= v` (minus infinity below the range).
pub(crate) fn f16_floor(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() > v { f16_next_down(h) } else { h }
}

/// The smallest f16 `>= v` (infinity above the range).
pub(crate) fn f16_ceil(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() < v { f16_next_up(h) } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_a_permutation() {
        for cols in [32, 64, 96, 256, 288, 576, 1536, 4096 + 7 * 32] {
            let shape = RowShape::new(cols);
            let mut seen = vec![false; cols];
            let mut nib = vec![[false; 2]; cols / 2];
            for g in 0..shape.groups {
                for i in 0..G {
                    let p = elem_pos(&shape, g, i);
                    assert!(!seen[p], "cols {cols} g {g} i {i}");
                    seen[p] = true;
                    let (b, hi) = nibble_pos(&shape, p);
                    assert!(!nib[b][hi as usize]);
                    nib[b][hi as usize] = true;
                }
            }
            let elems: Vec<u8> = (0..cols).map(|i| (i * 7 % 16) as u8).collect();
            let mut packed = vec![0; cols / 2];
            pack_nibbles(&shape, &elems, &mut packed);
            let mut back = vec![0; cols];
            unpack_nibbles(&shape, &packed, &mut back);
            assert_eq!(elems, back);
        }
    }

    #[test]
    fn directed_f16() {
        for v in [0.0f32, 1e-9, -1e-9, 0.1, -0.1, 3.3, -2.6, 65504.0, 1e-5] {
            let lo = f16_floor(v).to_f32();
            let hi = f16_ceil(v).to_f32();
            assert!(lo <= v && v <= hi, "{v}: {lo} {hi}");
        }
        assert!(f16_ceil(70000.0).to_f32().is_infinite());
    }
}
