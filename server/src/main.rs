//! The `cardinal` binary: parses the command line, sets up logging and
//! dispatches to a subcommand (serve, generate, tokenize, perplexity, bench,
//! plan). Errors are printed once, in full, and exit non-zero.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cardinal_server::cli::Cli::parse();
    match cardinal_server::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
