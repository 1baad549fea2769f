//! cardinal-kernels: the numeric core of Cardinal's CPU inference — A8-C8-W4
//! quantized matmul (4/8-bit grouped affine weights x int8 activations), int8
//! KV-cache attention, and the elementwise ops between them, each with a scalar
//! reference and AVX2 / AVX-512 VNNI / NEON versions chosen at run time, plus a
//! low-overhead persistent thread pool.
//!
//! See [`layout`](crate::layout) (private) for the internal weight layout; the
//! public types hide it.

mod attention;
mod attention_simd;
mod elementwise;
mod error;
mod isa;
mod layout;
mod matmul;
mod pool;
mod qacts;
mod qacts_simd;
mod qmatrix;
mod rope;
mod storage;

/// Columns per quantization group (weights and activations).
pub const GROUP: usize = 32;

pub use attention::{AttnState, attend, attend_finish, quantize_kv};
pub use elementwise::{add_scaled, rmsnorm, softmax, swiglu};
pub use error::KernelError;
pub use isa::{ISA_ENV, Isa, active_isa, init_isa};
pub use matmul::{matmul, matmul_rows};
pub use pool::Pool;
pub use qacts::QActs;
pub use qmatrix::QMatrix;
pub use rope::Rope;
