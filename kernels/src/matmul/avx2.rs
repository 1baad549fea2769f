//! avx2 matmul kernel (placeholder delegating to the scalar kernel).

use std::ops::Range;

use super::Out;
use crate::{QActs, QMatrix};

/// avx2 kernel for weight rows `rows`.
///
/// # Safety
/// Same contract as `super::run`.
pub(crate) unsafe fn matmul_rows(w: &QMatrix, a: &QActs, rows: Range<usize>, out: Out) {
    // SAFETY: forwarded contract.
    unsafe { super::scalar::matmul_rows(w, a, rows, out) }
}
