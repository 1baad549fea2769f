//! Portable reference matmul kernel: unpacks each weight row once into the
//! element layout, then takes plain integer dot products per group with every
//! activation row. Every SIMD kernel is tested against this one.

use std::ops::Range;

use half::f16;

use super::Out;
use crate::layout::{CG, CHUNK, G, RowShape, unpack_nibbles};
use crate::{QActs, QMatrix};

/// Dot product of one unpacked weight row `u` (element layout) with activation row `i`.
pub(crate) fn row_dot(
    shape: &RowShape,
    u: &[u8],
    sc: &[f16],
    mn: &[f16],
    a: &QActs,
    i: usize,
) -> f32 {
    let q = a.row_q(i);
    let d = a.row_scales(i);
    let sd = a.row_sd(i);
    let mut acc = 0.0f32;
    let mut group = |g: usize, isum: i32| {
        acc += sc[g].to_f32() * (d[g] * isum as f32) + mn[g].to_f32() * sd[g];
    };
    for c in 0..shape.chunks {
        let base = c * CHUNK;
        let mut lanes = [0i32; 32];
        for t in 0..CHUNK / 32 {
            for l in 0..32 {
                let k = base + t * 32 + l;
                lanes[l] += u[k] as i32 * q[k] as i32;
            }
        }
        for j in 0..CG {
            group(c * CG + j, lanes[4 * j..4 * j + 4].iter().sum());
        }
    }
    for g in shape.chunks * CG..shape.groups {
        let isum = (g * G..(g + 1) * G)
            .map(|k| u[k] as i32 * q[k] as i32)
            .sum();
        group(g, isum);
    }
    acc
}

/// Scalar kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `super::run`.
pub(crate) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    let ng = w.shape().groups;
    let mut packed = vec![0u8; w.cols() * w.bits() as usize / 8];
    let mut u = vec![0u8; w.cols()];
    let (mut sc, mut mn) = (vec![f16::ZERO; ng], vec![f16::ZERO; ng]);
    for r in rows {
        w.read_row_into(r, &mut packed, &mut sc, &mut mn);
        if w.bits() == 8 {
            u.copy_from_slice(&packed);
        } else {
            unpack_nibbles(w.shape(), &packed, &mut u);
        }
        for i in 0..a.m() {
            let v = row_dot(w.shape(), &u, &sc, &mn, a, i);
            // SAFETY: (i, r) is within the output and owned by this call (caller contract).
            unsafe { out.write(i, r, v) };
        }
    }
}
