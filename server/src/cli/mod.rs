//! Command-line interface: the subcommands and their flags, and the
//! dispatch from `main`. Each subcommand lives in its own file; this one
//! also holds what they share: range parsers for numeric flags (so a bad
//! value is refused before any model is loaded, with a message naming the
//! value and its limit), and stdout writes that end the command quietly
//! when the reader has gone (`cardinal plan | head -1`).

mod bench;
mod generate;
mod plan;

use std::fmt;
use std::io::{self, IsTerminal, Write};
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
    let result = match cli.command {
        Command::Serve(a) => {
            // The model flags are checked before the port is bound.
            a.model.check()?;
            crate::serve::run_blocking(a.serve, a.model)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Generate(a) => generate::run(a),
        Command::Tokenize(a) => generate::tokenize(a),
        Command::Perplexity(a) => bench::perplexity(a),
        Command::Bench(a) => bench::run(a),
        Command::Plan(a) => plan::run(a),
    };
    quiet_when_stdout_closed(result)
}

/// A command whose stdout reader went away (EPIPE) has nobody left to tell:
/// it ends with exit 0 and nothing on stderr, as `cat` would under `head`.
fn quiet_when_stdout_closed(result: Result<ExitCode>) -> Result<ExitCode> {
    match result {
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => Ok(ExitCode::SUCCESS),
        other => other,
    }
}

/// Logs to stderr, as text or JSON lines. ANSI colours only in text mode
/// on a terminal: a file or a pipe gets plain text.
pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_ansi(json, std::io::stderr().is_terminal()));
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Whether log lines may carry ANSI colour codes.
fn use_ansi(json: bool, stderr_is_terminal: bool) -> bool {
    !json && stderr_is_terminal
}

/// The reader of stdout has gone (EPIPE): see [`quiet_when_stdout_closed`].
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed by its reader (broken pipe)")
    }
}

impl std::error::Error for StdoutClosed {}

/// An error of a write to stdout: [`StdoutClosed`] for a broken pipe (a
/// quiet exit 0), otherwise the I/O error itself.
pub(crate) fn stdout_error(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// Writes `args` and a newline to a locked stdout; the engine of [`outln!`].
pub(crate) fn write_stdout_line(args: fmt::Arguments<'_>) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

/// `println!` for command output: `outln!("{x}")?` writes the line to
/// stdout and returns an error instead of panicking when stdout is closed
/// (a broken pipe becomes [`StdoutClosed`], which `run` turns into exit 0).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// A `clap` value parser for an integer in `min..=max`; clap's error names
/// the flag and the value, the message here the limit. Negative numbers
/// are read too (the flag needs `allow_negative_numbers = true`), so `-1`
/// is reported as below the limit rather than as an unknown flag.
pub(crate) fn int_in(
    min: usize,
    max: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: i128 = s.trim().parse().map_err(|_| "not an integer".to_string())?;
        if v < min as i128 {
            Err(format!("must be ≥ {min}"))
        } else if v > max as i128 {
            Err(format!("must be ≤ {max}"))
        } else {
            Ok(v as usize)
        }
    }
}

/// A `clap` value parser for an integer of at least `min`.
pub(crate) fn int_at_least(
    min: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    int_in(min, usize::MAX)
}

/// A `clap` value parser for a number in `[lo, hi]`, or `(lo, hi]` when
/// `lo_open`. NaN and infinities are refused.
pub(crate) fn float_in(
    lo: f32,
    hi: f32,
    lo_open: bool,
) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: f32 = s.trim().parse().map_err(|_| "not a number".to_string())?;
        let above_lo = if lo_open { v > lo } else { v >= lo };
        if above_lo && v <= hi {
            Ok(v)
        } else if lo_open {
            Err(format!("must be > {lo} and ≤ {hi}"))
        } else {
            Err(format!("must be ≥ {lo} and ≤ {hi}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README says every run-time flag of `serve` has a `CARDINAL_*`
    /// environment variable: so it does.
    #[test]
    fn every_serve_flag_has_an_environment_variable() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        let missing: Vec<String> = serve
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| {
                a.get_env()
                    .is_none_or(|e| !e.to_string_lossy().starts_with("CARDINAL_"))
            })
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(
            missing.is_empty(),
            "flags without CARDINAL_* env: {missing:?}"
        );
    }

    #[test]
    fn int_parser_names_the_value_and_the_limit() {
        let p = int_in(1, 256);
        assert_eq!(p("1"), Ok(1));
        assert_eq!(p(" 256 "), Ok(256));
        assert_eq!(p("0"), Err("must be ≥ 1".into()));
        assert_eq!(p("-1"), Err("must be ≥ 1".into()));
        assert_eq!(p("257"), Err("must be ≤ 256".into()));
        assert_eq!(p("two"), Err("not an integer".into()));
        let q = int_at_least(0);
        assert_eq!(q("-3"), Err("must be ≥ 0".into()));
        assert_eq!(
            q("99999999999999999999999"),
            Err("must be ≤ 18446744073709551615".into())
        );
    }

    #[test]
    fn float_parser_names_the_value_and_the_limit() {
        let top_p = float_in(0.0, 1.0, true);
        assert_eq!(top_p("1"), Ok(1.0));
        assert_eq!(top_p("0.5"), Ok(0.5));
        assert_eq!(top_p("0"), Err("must be > 0 and ≤ 1".into()));
        assert_eq!(top_p("5"), Err("must be > 0 and ≤ 1".into()));
        assert_eq!(top_p("NaN"), Err("must be > 0 and ≤ 1".into()));
        let temp = float_in(0.0, 100.0, false);
        assert_eq!(temp("0"), Ok(0.0));
        assert_eq!(temp("-1"), Err("must be ≥ 0 and ≤ 100".into()));
        assert_eq!(temp("inf"), Err("must be ≥ 0 and ≤ 100".into()));
        assert!(temp("hot").unwrap_err().contains("not a number"));
    }

    #[test]
    fn a_closed_stdout_is_a_quiet_success() {
        let closed = stdout_error(io::Error::from(io::ErrorKind::BrokenPipe));
        let r = quiet_when_stdout_closed(Err(closed.context("printing the plan")));
        assert_eq!(r.unwrap(), ExitCode::SUCCESS);
        // Any other write error is still an error.
        let full = stdout_error(io::Error::from(io::ErrorKind::StorageFull));
        let r = quiet_when_stdout_closed(Err(full));
        assert!(format!("{:#}", r.unwrap_err()).starts_with("writing to stdout"));
        // A broken pipe that is not stdout's is not hidden.
        let other = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(quiet_when_stdout_closed(Err(other)).is_err());
    }

    #[test]
    fn no_ansi_in_json_or_off_a_terminal() {
        assert!(use_ansi(false, true));
        assert!(!use_ansi(false, false));
        assert!(!use_ansi(true, true));
        assert!(!use_ansi(true, false));
    }
}
