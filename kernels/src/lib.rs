//! cardinal-kernels: the numeric core of Cardinal's CPU inference — A8-C8-W4
//! quantized matmul (4/8-bit grouped affine weights x int8 activations), int8
//! KV-cache attention, and the elementwise ops between them, each with a scalar
//! reference and AVX2 / AVX-512 VNNI / NEON versions chosen at run time, plus a
//! low-overhead persistent thread pool.
//!
//! Internals, for maintainers:
//! - `layout`: the element order inside a row. Groups come in chunks of 8 whose
//!   values are transposed in 4-byte units, so SIMD lane `j` of a
//!   `vpdpbusd`/`pmaddubsw` always accumulates group `j` (no per-group horizontal
//!   sums); 4-bit values pack two elements of the same block per byte so one
//!   load, `& 0xF` and `>> 4` yields operands in activation order.
//! - `storage`: rows are stored in blocks of 4, step-major (16 groups at a
//!   time), with each step's f16 scales and mins next to its weights, so the
//!   4-row matrix-vector kernel reads one sequential stream.
//! - `matmul`: dispatch, threading, and the per-ISA kernels.
//! - `pool`: the persistent thread pool (index claiming, spin/yield/park).

mod attention;
mod attention_group;
mod attention_simd;
mod buffer;
mod elementwise;
mod error;
mod hadamard;
mod isa;
mod layout;
mod matmul;
mod panel;
mod pool;
mod prefetch;
mod qacts;
mod qacts_simd;
mod qmatrix;
mod rope;
mod rows_ptr;
mod storage;

/// Columns per quantization group (weights and activations).
pub const GROUP: usize = 32;

pub use attention::{
    AttnState, KEY_TILE, attend, attend_finish, key_len, key_offset, quantize_kv, quantize_kv_with,
    store_key, tile_keys,
};
pub use attention_group::attend_group;
pub use elementwise::{add_scaled, rmsnorm, softmax, swiglu};
pub use error::KernelError;
pub use hadamard::{HADAMARD_BLOCK, hadamard32};
pub use isa::{ISA_ENV, Isa, active_isa, init_isa};
pub use matmul::{matmul, matmul_rows};
pub use pool::{Pool, set_thread_nice};
pub use prefetch::prefetch;
pub use qacts::{QActs, QActsRows};
pub use qmatrix::QMatrix;
pub use rope::Rope;
pub use rows_ptr::RowsPtr;
