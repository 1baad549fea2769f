//! avx2 elementwise kernels (placeholder delegating to scalar).

/// # Safety
/// CPU supports avx2.
pub(crate) unsafe fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    super::scalar::rmsnorm(x, weight, eps, out)
}
/// # Safety
/// CPU supports avx2.
pub(crate) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    super::scalar::swiglu(gate, up, out)
}
/// # Safety
/// CPU supports avx2.
pub(crate) unsafe fn softmax(x: &mut [f32]) {
    super::scalar::softmax(x)
}
/// # Safety
/// CPU supports avx2.
pub(crate) unsafe fn add_scaled(acc: &mut [f32], x: &[f32], s: f32) {
    super::scalar::add_scaled(acc, x, s)
}
