//! Command-line interface: the subcommands and their flags, and the
//! dispatch from `main`. Each subcommand lives in its own file.

mod bench;
mod generate;
mod plan;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use bench::{BenchArgs, PerplexityArgs};
pub use generate::{GenerateArgs, TokenizeArgs};
pub use plan::PlanArgs;

/// Cardinal: an int4 LLM server on emulated NorthPole cards.
#[derive(Parser, Debug)]
#[command(name = "cardinal", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (e.g. info, debug, cardinal=debug).
    #[arg(long, global = true, env = "CARDINAL_LOG", default_value = "info")]
    pub log: String,
}

/// Flags of `serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::setup::ModelArgs,
    #[command(flatten)]
    pub serve: crate::serve::ServeOptions,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API (the main job).
    Serve(ServeArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Perplexity of a text file (llama.cpp's method; see --help).
    Perplexity(PerplexityArgs),
    /// Measure prefill and decode speed.
    Bench(BenchArgs),
    /// Plan the placement of a model on cards and model its time and energy.
    Plan(PlanArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let json_logs = matches!(&cli.command, Command::Serve(a) if a.serve.json_logs());
    init_logging(&cli.log, json_logs);
    match cli.command {
        Command::Serve(a) => {
            crate::serve::run_blocking(a.serve, a.model)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(a) => generate::run(a),
        Command::Tokenize(a) => generate::tokenize(a),
        Command::Perplexity(a) => bench::perplexity(a),
        Command::Bench(a) => bench::run(a),
        Command::Plan(a) => plan::run(a),
    }
}

/// Logs to stderr, as text or JSON lines.
pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
