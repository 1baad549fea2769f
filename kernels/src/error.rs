//! The crate's error type: every fallible constructor or setting returns a
//! [`KernelError`] whose message names the offending value and the limit it broke.

/// Errors from building matrices or choosing an instruction set.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The matrix shape is not usable (zero or non-multiple-of-32 columns, overflow).
    #[error("matrix {rows}x{cols}: {reason}")]
    BadShape {
        /// Rows asked for.
        rows: usize,
        /// Columns asked for.
        cols: usize,
        /// What is wrong, e.g. "cols must be a multiple of 32".
        reason: String,
    },
    /// A ggml raw buffer does not hold exactly rows*cols/32 blocks.
    #[error("{format} matrix {rows}x{cols}: raw data is {got} bytes, expected exactly {expected}")]
    RawLength {
        /// ggml type name ("q4_0", "q4_1", "q8_0").
        format: &'static str,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes required.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// An f32 weight buffer does not hold exactly rows*cols values.
    #[error("matrix {rows}x{cols}: weight slice has {got} values, expected exactly {expected}")]
    DataLength {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Values required.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A weight is NaN or infinite.
    #[error(
        "matrix {rows}x{cols}: weight at row {row} col {col} is {value}, weights must be finite"
    )]
    NonFinite {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Row of the bad value.
        row: usize,
        /// Column of the bad value.
        col: usize,
        /// The value.
        value: f32,
    },
    /// A group's scale or offset cannot be held in f16 (|v| <= 65504).
    #[error(
        "matrix {rows}x{cols}: row {row} group {group} needs {what} {value}, outside the f16 range (|v| <= 65504)"
    )]
    F16Range {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Row.
        row: usize,
        /// Group index within the row.
        group: usize,
        /// "scale" or "min".
        what: &'static str,
        /// The value that does not fit.
        value: f32,
    },
    /// `concat_rows` got no parts.
    #[error("concat_rows: no matrices given, need at least 1")]
    ConcatEmpty,
    /// `concat_rows` got parts that differ in columns or bits.
    #[error(
        "concat_rows: part {index} is {rows}x{cols} {bits}-bit, but part 0 has {want_cols} cols and {want_bits} bits"
    )]
    ConcatMismatch {
        /// Index of the mismatching part.
        index: usize,
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
        /// Its bits.
        bits: u8,
        /// Columns of part 0.
        want_cols: usize,
        /// Bits of part 0.
        want_bits: u8,
    },
    /// `CARDINAL_ISA` (or a parsed string) names no known instruction set.
    #[error("unknown ISA {value:?}: allowed values are scalar, avx2, avx512, neon")]
    UnknownIsa {
        /// The value given.
        value: String,
    },
    /// The instruction set asked for is not supported by this CPU.
    #[error("ISA {isa} was requested but this CPU does not support it (available: {available})")]
    IsaUnavailable {
        /// The name of the ISA asked for.
        isa: &'static str,
        /// Comma-separated names of the ISAs this CPU has.
        available: String,
    },
}
