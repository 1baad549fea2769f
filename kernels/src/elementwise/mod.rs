//! Elementwise vector kernels used between matmuls — RMSNorm, SwiGLU, softmax and
//! scaled residual add — with ISA dispatch to scalar, AVX2 or AVX-512 versions.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod scalar;

use crate::Isa;

/// `out = x / sqrt(mean(x^2) + eps) * weight`.
pub fn rmsnorm(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        weight.len() == x.len() && out.len() == x.len(),
        "rmsnorm: x has {} values, weight {}, out {}; all must match",
        x.len(),
        weight.len(),
        out.len()
    );
    match isa.checked() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA availability checked by `Isa::checked`.
        Isa::Avx2 => unsafe { avx2::rmsnorm(x, weight, eps, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 availability checked by `Isa::checked`.
        Isa::Avx512 => unsafe { avx512::rmsnorm(x, weight, eps, out) },
        _ => scalar::rmsnorm(x, weight, eps, out),
    }
}

/// `out = silu(gate) * up` with `silu(g) = g / (1 + exp(-g))`.
pub fn swiglu(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        up.len() == gate.len() && out.len() == gate.len(),
        "swiglu: gate has {} values, up {}, out {}; all must match",
        gate.len(),
        up.len(),
        out.len()
    );
    match isa.checked() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA availability checked by `Isa::checked`.
        Isa::Avx2 => unsafe { avx2::swiglu(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 availability checked by `Isa::checked`.
        Isa::Avx512 => unsafe { avx512::swiglu(gate, up, out) },
        _ => scalar::swiglu(gate, up, out),
    }
}

/// In-place numerically stable softmax. An empty slice is left alone.
pub fn softmax(isa: Isa, x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    match isa.checked() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA availability checked by `Isa::checked`.
        Isa::Avx2 => unsafe { avx2::softmax(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 availability checked by `Isa::checked`.
        Isa::Avx512 => unsafe { avx512::softmax(x) },
        _ => scalar::softmax(x),
    }
}

/// `acc += s * x`.
pub fn add_scaled(isa: Isa, acc: &mut [f32], x: &[f32], s: f32) {
    assert_eq!(
        acc.len(),
        x.len(),
        "add_scaled: acc has {} values, x {}; they must match",
        acc.len(),
        x.len()
    );
    match isa.checked() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA availability checked by `Isa::checked`.
        Isa::Avx2 => unsafe { avx2::add_scaled(acc, x, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 availability checked by `Isa::checked`.
        Isa::Avx512 => unsafe { avx512::add_scaled(acc, x, s) },
        _ => scalar::add_scaled(acc, x, s),
    }
}
