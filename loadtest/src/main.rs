//! The `cardinal-loadtest` binary: parses flags, installs the Ctrl-C
//! handler (first press: stop and print the partial report; second: exit at
//! once), runs the load test, prints the table on stdout, writes `--out`
//! files, and prints the SUMMARY line last.
//!
//! Exit codes: 0 run complete within its error budget, 1 could not start or
//! more than `--max-error-rate` of the requests failed (the report and the
//! `--out` files are still written, and stderr says why), 2 stopped after
//! too many consecutive errors, 130 interrupted.

use cardinal_loadtest::progress::ProgressMode;
use cardinal_loadtest::report::{RunStatus, summary_line};
use cardinal_loadtest::{Args, run};
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            println!("{}", summary_line(RunStatus::Failed, &[]));
            return ExitCode::from(1);
        }
    };
    let mode = ProgressMode::from_arg(args.progress);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: finishing with a partial report (Ctrl-C again to quit now)");
            let _ = stop_tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let out_dir = args.out.clone();
    let mut report = match run::run(args.clone(), stop_rx, mode).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            cardinal_loadtest::run::failed_report(args, format!("{e:#}"))
        }
    };
    // Said in the report's notes too, so report.json explains the exit code.
    let over_budget = report.error_budget_exceeded();
    if let Some(why) = &over_budget {
        report.notes.push(format!("{why}: exit code 1"));
    }
    let mut stdout = std::io::stdout().lock();
    if !report.levels.is_empty() {
        let _ = write!(stdout, "\n{}{}", report.table(), report.details());
    }
    if let Some(dir) = out_dir {
        match report.write_dir(&dir) {
            Ok(files) => {
                let _ = writeln!(stdout, "wrote {}", files.join(", "));
            }
            Err(e) => {
                let _ = writeln!(stdout, "could not write --out files: {e:#}");
            }
        }
    }
    let _ = writeln!(stdout, "{}", report.summary_line());
    let _ = stdout.flush();
    if let Some(why) = over_budget {
        eprintln!("error: {why}");
        return ExitCode::from(1);
    }
    match report.status {
        RunStatus::Complete => ExitCode::SUCCESS,
        RunStatus::Failed => ExitCode::from(1),
        RunStatus::Aborted => ExitCode::from(2),
        RunStatus::Interrupted => ExitCode::from(130),
    }
}
