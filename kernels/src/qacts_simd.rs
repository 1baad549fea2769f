//! Per-ISA versions of the activation group quantizer; each reproduces
//! [`crate::qacts::quantize_group_scalar`] bit for bit.

use crate::Isa;
use crate::layout::G;
use crate::qacts::quantize_group_scalar;

/// Quantize one group of 32 with `isa` (already checked available).
#[inline]
pub(crate) fn quantize_group(isa: Isa, x: &[f32], q: &mut [i8; G]) -> (f32, i32) {
    match isa {
        _ => quantize_group_scalar(x, q),
    }
}
