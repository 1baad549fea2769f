//! The `cardinal-loadtest` binary.
fn main() {}
