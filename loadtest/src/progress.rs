//! Live progress on stderr: an indicatif bar per level on a terminal, or
//! plain lines (every two seconds and at the end of a level) when stderr is
//! not a terminal or `CI=true`, or nothing. Stdout is kept for the table and
//! the final SUMMARY line.

use crate::cli::ProgressArg;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The chosen display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// indicatif bars.
    Bar,
    /// Plain lines.
    Plain,
    /// Silent.
    Quiet,
}

impl ProgressMode {
    /// Resolves `--progress auto` from the environment.
    pub fn from_arg(arg: ProgressArg) -> Self {
        match arg {
            ProgressArg::Bar => Self::Bar,
            ProgressArg::Plain => Self::Plain,
            ProgressArg::None => Self::Quiet,
            ProgressArg::Auto => {
                let ci =
                    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
                if std::io::stderr().is_terminal() && !ci {
                    Self::Bar
                } else {
                    Self::Plain
                }
            }
        }
    }

    /// Prints a line of status unless quiet (above any bar).
    pub fn note(self, msg: &str) {
        if self != Self::Quiet {
            eprintln!("{msg}");
        }
    }

    /// A display for one level of `total` requests.
    pub fn level(self, label: &str, total: u64) -> LevelBar {
        let bar = (self == Self::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {msg} {elapsed_precise}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            b.set_style(style);
            b.set_prefix(label.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        LevelBar {
            mode: self,
            bar,
            label: label.to_string(),
            total,
            last_line: Instant::now(),
        }
    }
}

/// Progress of one level.
#[derive(Debug)]
pub struct LevelBar {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    last_line: Instant,
}

impl LevelBar {
    fn text(&self, done: u64, errors: u64, tok_s: f64) -> String {
        format!(
            "[{}] {done}/{} done, errors={errors}, output tok/s={tok_s:.1}",
            self.label, self.total
        )
    }

    /// Updates the counts (called on every finished request and on a tick).
    pub fn update(&mut self, done: u64, errors: u64, tok_s: f64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_position(done);
                    b.set_message(format!("errors={errors} out tok/s={tok_s:.1}"));
                }
            }
            ProgressMode::Plain => {
                if self.last_line.elapsed() >= Duration::from_secs(2) {
                    self.last_line = Instant::now();
                    eprintln!("{}", self.text(done, errors, tok_s));
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    /// Ends the display for this level.
    pub fn finish(&mut self, done: u64, errors: u64, tok_s: f64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = self.bar.take() {
                    b.set_position(done);
                    b.set_message(format!("errors={errors} out tok/s={tok_s:.1}"));
                    b.abandon();
                }
            }
            ProgressMode::Plain => eprintln!("{} (level finished)", self.text(done, errors, tok_s)),
            ProgressMode::Quiet => {}
        }
    }
}
