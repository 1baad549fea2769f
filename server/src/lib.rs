//! The `cardinal` binary's library: start-up (model, cards, engine) and the
//! subcommands that run a model from the command line. The HTTP server lives
//! in `serve`.

pub mod cli;
pub mod serve;
pub mod setup;
