//! `cardinal-loadtest` as a library: a load generator for OpenAI-compatible
//! servers that measures TTFT, per-token ITL, TPOT, E2E, throughput and
//! goodput on the client, and generation tokens/s, joules per token and TTFT
//! from the server's Prometheus metrics. The binary in `main.rs` is a thin
//! shell over [`run::run`]; tests drive the same entry point.

pub mod chunk;
pub mod cli;
pub mod client;
pub mod plot;
pub mod progress;
pub mod prom;
pub mod record;
pub mod report;
pub mod rng;
pub mod run;
pub mod runner;
pub mod sse;
pub mod stats;
pub mod workload;

pub use cli::Args;
pub use report::Report;
pub use run::run;
