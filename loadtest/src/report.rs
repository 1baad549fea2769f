//! The run's report: its JSON shape (`report.json`, which includes the full
//! configuration), the per-level table printed on stdout, `report.csv`, and
//! the one-line machine-parsable `SUMMARY` line that is always printed last.

use crate::cli::{Args, Arrival, Endpoint};
use crate::prom::ServerSide;
use crate::runner::StopReason;
use crate::stats::{Dist, LevelStats};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every level ran to its bound.
    Complete,
    /// Ctrl-C: the report covers what finished.
    Interrupted,
    /// Stopped after too many consecutive errors.
    Aborted,
    /// Could not start (for example, no model could be found).
    Failed,
}

impl RunStatus {
    /// The name used in the SUMMARY line.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Complete => "complete",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Aborted => "aborted",
            RunStatus::Failed => "failed",
        }
    }
}

/// What was targeted and what the server turned out to support.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// Base URL.
    pub base_url: String,
    /// Model used.
    pub model: String,
    /// Endpoint loaded.
    pub endpoint: Endpoint,
    /// Streaming on.
    pub stream: bool,
    /// `max_tokens` sent.
    pub max_tokens: Option<u32>,
    /// `temperature` sent (None: not sent).
    pub temperature: Option<f32>,
    /// `min_tokens` and `ignore_eos` were sent.
    pub length_forcing_sent: bool,
    /// `continuous_usage_stats` was asked for.
    pub continuous_usage_requested: bool,
    /// The server's `/tokenize` measured prompt lengths (None: dataset run).
    pub tokenize_available: Option<bool>,
    /// Measured or assumed tokens per synthetic word.
    pub tokens_per_word: Option<f64>,
}

/// The warmup phase.
#[derive(Debug, Clone, Serialize)]
pub struct WarmupInfo {
    /// Requests finished.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
}

/// One level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    /// "c=4" or "rate=2/s".
    pub label: String,
    /// Fixed concurrency, in concurrency mode.
    pub concurrency: Option<usize>,
    /// Requests per second, in rate mode.
    pub rate: Option<f64>,
    /// Arrival process, in rate mode.
    pub arrival: Option<Arrival>,
    /// Requests started.
    pub dispatched: usize,
    /// Requests abandoned at a stop (not counted anywhere else).
    pub cancelled: u64,
    /// Why the level ended.
    pub stop_reason: StopReason,
    /// Client-side measurements.
    #[serde(flatten)]
    pub stats: LevelStats,
    /// Server-side figures from /metrics.
    pub server: ServerSide,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "cardinal-loadtest".
    pub tool: &'static str,
    /// Crate version.
    pub version: &'static str,
    /// How the run ended.
    pub status: RunStatus,
    /// The full command-line configuration (API key redacted).
    pub config: Args,
    /// The target as resolved.
    pub target: Option<TargetInfo>,
    /// Things the reader must know (approximations, rejected extensions…).
    pub notes: Vec<String>,
    /// Warmup, when requested.
    pub warmup: Option<WarmupInfo>,
    /// One entry per level run.
    pub levels: Vec<LevelReport>,
}

fn na(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "n/a".to_string(),
    }
}

fn pick(d: &Option<Dist>, f: fn(&Dist) -> f64) -> Option<f64> {
    d.as_ref().map(f)
}

impl Report {
    /// Requests counted over all levels.
    pub fn total_requests(&self) -> u64 {
        self.levels.iter().map(|l| l.stats.requests).sum()
    }

    /// Errors over all levels.
    pub fn total_errors(&self) -> u64 {
        self.levels.iter().map(|l| l.stats.errors.total).sum()
    }

    /// Failed requests as a fraction of finished requests over all levels;
    /// None when no request finished.
    pub fn error_rate(&self) -> Option<f64> {
        let requests = self.total_requests();
        (requests > 0).then(|| self.total_errors() as f64 / requests as f64)
    }

    /// Why a complete run fails its error budget: a message when more than
    /// `config.max_error_rate` of its requests failed. Runs that did not
    /// complete have their own exit codes and are not judged here.
    pub fn error_budget_exceeded(&self) -> Option<String> {
        let max = self.config.max_error_rate;
        let rate = self.error_rate()?;
        (self.status == RunStatus::Complete && rate > max).then(|| {
            format!(
                "{} of {} requests failed ({:.1}%), more than --max-error-rate {max} allows",
                self.total_errors(),
                self.total_requests(),
                rate * 100.0
            )
        })
    }

    /// The per-level table shown on stdout.
    pub fn table(&self) -> String {
        let headers = [
            "level",
            "ok",
            "err",
            "req/s",
            "out tok/s",
            "tot tok/s",
            "TTFT p50",
            "TTFT p99",
            "ITL p50",
            "ITL p99",
            "TPOT p50",
            "E2E p50",
            "E2E p99",
            "goodput",
            "srv tok/s",
            "srv TTFT",
            "J/tok cards",
            "J/tok host",
        ];
        let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
        for l in &self.levels {
            let s = &l.stats;
            rows.push(vec![
                l.label.clone(),
                s.ok.to_string(),
                s.errors.total.to_string(),
                format!("{:.2}", s.request_throughput),
                format!("{:.1}", s.output_tok_s),
                format!("{:.1}", s.total_tok_s),
                na(pick(&s.ttft_ms, |d| d.p50), 1),
                na(pick(&s.ttft_ms, |d| d.p99), 1),
                na(pick(&s.itl_ms, |d| d.p50), 2),
                na(pick(&s.itl_ms, |d| d.p99), 2),
                na(pick(&s.tpot_ms, |d| d.p50), 2),
                na(pick(&s.e2e_ms, |d| d.p50), 0),
                na(pick(&s.e2e_ms, |d| d.p99), 0),
                na(s.goodput.as_ref().map(|g| g.req_s), 2),
                na(l.server.generation_tok_s, 1),
                na(l.server.ttft_mean_ms, 1),
                na(l.server.joules_per_token_cards, 4),
                na(l.server.joules_per_token_host, 4),
            ]);
        }
        let widths: Vec<usize> = (0..headers.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, r) in rows.iter().enumerate() {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (v, w))| {
                    if c == 0 {
                        format!("{v:<w$}")
                    } else {
                        format!("{v:>w$}")
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        let _ = writeln!(
            out,
            "(latencies in ms; tok/s = tokens per second; srv = from the server's /metrics)"
        );
        out
    }

    /// Lines after the table: token sources, forcing, errors, notes.
    pub fn details(&self) -> String {
        let mut out = String::new();
        for l in &self.levels {
            let s = &l.stats;
            let mut parts = vec![format!(
                "tokens from {}{}",
                s.token_count_source,
                if s.continuous_usage {
                    " (continuous usage: chunks spread by their token counts)"
                } else {
                    ""
                }
            )];
            if let Some(f) = &s.output_forcing {
                parts.push(format!(
                    "output length {} honoured by {}/{} ok requests",
                    f.requested, f.honoured, f.of
                ));
            }
            parts.push(format!(
                "mean input {:.1} tok, mean output {:.1} tok",
                s.mean_input_tokens, s.mean_output_tokens
            ));
            if s.errors.total > 0 {
                let classes: Vec<String> = crate::record::ErrorClass::ALL
                    .iter()
                    .filter(|c| s.errors.get(**c) > 0)
                    .map(|c| format!("{}={}", c.name(), s.errors.get(*c)))
                    .collect();
                parts.push(format!("errors: {}", classes.join(" ")));
            }
            if !s.usage_extension.is_empty() {
                let fields: Vec<String> = s
                    .usage_extension
                    .iter()
                    .map(|(k, f)| format!("{k}={:.4} ({:.5}/tok)", f.mean, f.per_output_token))
                    .collect();
                parts.push(format!("usage.cardinal per request: {}", fields.join(" ")));
            }
            if let Some(r) = l.server.prefix_cache_hit_rate {
                parts.push(format!(
                    "server prefix cache supplied {:.1}% of prompt tokens",
                    r * 100.0
                ));
            }
            if l.cancelled > 0 {
                parts.push(format!("{} cancelled", l.cancelled));
            }
            parts.push(format!("ended by {}", l.stop_reason.name()));
            let _ = writeln!(out, "[{}] {}", l.label, parts.join("; "));
            for e in &s.error_samples {
                let _ = writeln!(out, "    e.g. {e}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// `report.csv`: a header and one row per level.
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "level,concurrency,rate,requests,ok,errors,err_connect,err_http_status,err_timeout,err_malformed_sse,err_early_end,err_stream_error,wall_s,req_s,output_tok_s,total_tok_s,mean_input_tokens,mean_output_tokens,token_source,ttft_mean_ms,ttft_p50_ms,ttft_p90_ms,ttft_p95_ms,ttft_p99_ms,ttft_max_ms,itl_mean_ms,itl_p50_ms,itl_p90_ms,itl_p95_ms,itl_p99_ms,itl_max_ms,tpot_mean_ms,tpot_p50_ms,tpot_p90_ms,tpot_p95_ms,tpot_p99_ms,tpot_max_ms,e2e_mean_ms,e2e_p50_ms,e2e_p90_ms,e2e_p95_ms,e2e_p99_ms,e2e_max_ms,goodput_req_s,server_tok_s,server_ttft_mean_ms,joules_per_token_cards,joules_per_token_host\n",
        );
        let f = |v: Option<f64>| {
            v.filter(|x| x.is_finite())
                .map(|x| format!("{x:.6}"))
                .unwrap_or_default()
        };
        for l in &self.levels {
            let s = &l.stats;
            let mut cells = vec![
                l.label.clone(),
                l.concurrency.map(|c| c.to_string()).unwrap_or_default(),
                f(l.rate),
                s.requests.to_string(),
                s.ok.to_string(),
                s.errors.total.to_string(),
            ];
            for c in crate::record::ErrorClass::ALL {
                cells.push(s.errors.get(c).to_string());
            }
            cells.extend([
                f(Some(s.wall_s)),
                f(Some(s.request_throughput)),
                f(Some(s.output_tok_s)),
                f(Some(s.total_tok_s)),
                f(Some(s.mean_input_tokens)),
                f(Some(s.mean_output_tokens)),
                s.token_count_source.clone(),
            ]);
            for d in [&s.ttft_ms, &s.itl_ms, &s.tpot_ms, &s.e2e_ms] {
                for g in [
                    (|d: &Dist| d.mean) as fn(&Dist) -> f64,
                    |d| d.p50,
                    |d| d.p90,
                    |d| d.p95,
                    |d| d.p99,
                    |d| d.max,
                ] {
                    cells.push(f(pick(d, g)));
                }
            }
            cells.extend([
                f(s.goodput.as_ref().map(|g| g.req_s)),
                f(l.server.generation_tok_s),
                f(l.server.ttft_mean_ms),
                f(l.server.joules_per_token_cards),
                f(l.server.joules_per_token_host),
            ]);
            let _ = writeln!(out, "{}", cells.join(","));
        }
        out
    }

    /// The last line printed: `SUMMARY key=value …`, one comma-separated
    /// value per level for per-level keys, `na` where a value is missing.
    pub fn summary_line(&self) -> String {
        summary_line(self.status, &self.levels)
    }

    /// Writes report.json, report.csv and the three SVG plots into `dir`.
    pub fn write_dir(&self, dir: &Path) -> Result<Vec<String>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut written = Vec::new();
        let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
            written.push(p.display().to_string());
            Ok(())
        };
        put(
            "report.json",
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        put("report.csv", self.csv().as_bytes())?;
        put(
            "latency_vs_throughput.svg",
            crate::plot::latency_vs_throughput(&self.levels)?.as_bytes(),
        )?;
        put(
            "ttft_cdf.svg",
            crate::plot::cdf(&self.levels, "TTFT", |l| &l.stats.ttft_cdf)?.as_bytes(),
        )?;
        put(
            "itl_cdf.svg",
            crate::plot::cdf(&self.levels, "ITL (per token)", |l| &l.stats.itl_cdf)?.as_bytes(),
        )?;
        Ok(written)
    }
}

/// The SUMMARY line for `status` and `levels` (also used when the flags do
/// not even parse, with no levels).
pub fn summary_line(status: RunStatus, levels: &[LevelReport]) -> String {
    let list = |f: &dyn Fn(&LevelReport) -> Option<f64>, digits: usize| -> String {
        if levels.is_empty() {
            return "na".into();
        }
        levels
            .iter()
            .map(|l| match f(l) {
                Some(x) if x.is_finite() => format!("{x:.digits$}"),
                _ => "na".into(),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let requests: u64 = levels.iter().map(|l| l.stats.requests).sum();
    let errors: u64 = levels.iter().map(|l| l.stats.errors.total).sum();
    let fields = [
        format!("status={}", status.name()),
        format!("levels={}", levels.len()),
        format!("requests={requests}"),
        format!("errors={errors}"),
        format!("output_tok_s={}", list(&|l| Some(l.stats.output_tok_s), 2)),
        format!("req_s={}", list(&|l| Some(l.stats.request_throughput), 3)),
        format!(
            "ttft_p50_ms={}",
            list(&|l| pick(&l.stats.ttft_ms, |d| d.p50), 2)
        ),
        format!(
            "ttft_p99_ms={}",
            list(&|l| pick(&l.stats.ttft_ms, |d| d.p99), 2)
        ),
        format!(
            "itl_p50_ms={}",
            list(&|l| pick(&l.stats.itl_ms, |d| d.p50), 3)
        ),
        format!(
            "itl_p99_ms={}",
            list(&|l| pick(&l.stats.itl_ms, |d| d.p99), 3)
        ),
        format!(
            "e2e_p50_ms={}",
            list(&|l| pick(&l.stats.e2e_ms, |d| d.p50), 1)
        ),
        format!(
            "goodput_req_s={}",
            list(&|l| l.stats.goodput.as_ref().map(|g| g.req_s), 3)
        ),
        format!("server_tok_s={}", list(&|l| l.server.generation_tok_s, 2)),
        format!(
            "joules_per_token_cards={}",
            list(&|l| l.server.joules_per_token_cards, 5)
        ),
        format!(
            "joules_per_token_host={}",
            list(&|l| l.server.joules_per_token_host, 5)
        ),
    ];
    format!("SUMMARY {}", fields.join(" "))
}
