//! The command line: every flag, its parsing (lists, `--slo`, input-length
//! distributions) and the measurement definitions shown by `--help`. The
//! parsed [`Args`] are also what `report.json` records as the run's
//! configuration (with the API key redacted).

use clap::{Parser, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;
use std::str::FromStr;

/// The definitions printed at the end of `--help` (and repeated in the
/// README).
pub const MEASUREMENTS: &str = "\
MEASUREMENTS (client side; times start when the request is handed to the HTTP client)
  TTFT     time to the first chunk that carries generated text (the role-only
           first chunk does not count).
  ITL      inter-token latency, per token, not per chunk. Content chunks arrive at
           a_1..a_m carrying k_1..k_m tokens. Chunk i>1 spreads its gap a_i-a_(i-1)
           equally over its k_i tokens (k_i samples of gap/k_i); chunk 1's extra
           k_1-1 tokens get 0. N tokens give N-1 samples summing to a_m-a_1. k_i is
           the rise of usage.completion_tokens on that chunk when the server sends
           continuous usage stats, else 1 per content chunk.
  TPOT     per request (E2E - TTFT) / (N - 1), N = output tokens, N >= 2.
  E2E      request sent -> `data: [DONE]` received (whole body when not streaming).
  req/s    successful requests / level wall time (first dispatch -> last completion).
  out tok/s  sum of output tokens of successful requests / wall time.
  tot tok/s  (input + output tokens) of successful requests / wall time.
  goodput  successful requests meeting every --slo bound / wall time (ttft vs the
           request's TTFT, itl vs its mean ITL, e2e vs its E2E).
  tokens   from the server's usage (stream_options.include_usage) when sent, else
           counted content chunks; the report says which.
  errors   connect (no response headers: refused, reset, DNS), http_status (non-2xx),
           timeout (--timeout exceeded), malformed_sse (a line or data payload that
           is not SSE/JSON chunk), early_end (stream ended without [DONE] or without
           a finish_reason), stream_error (an error object sent inside the stream).
  Percentiles p50/p90/p95/p99/max come from HDR histograms (3 significant digits).
SERVER SIDE (Δ of /metrics scraped before and after each level)
  server tok/s   Δ cardinal_generation_tokens_total / time between scrapes.
  J/token        Δ cardinal_energy_joules_total{source=...} / Δ generation tokens,
                 for source=cards_modeled and source=host.
  server TTFT    Δ cardinal_time_to_first_token_seconds_sum / Δ _count.
  n/a when the metrics are absent.
LAST LINE
  SUMMARY status=<complete|interrupted|aborted> levels=L requests=R errors=E
  output_tok_s=v1,v2,.. req_s=.. ttft_p50_ms=.. ttft_p99_ms=.. itl_p50_ms=..
  itl_p99_ms=.. e2e_p50_ms=.. goodput_req_s=.. server_tok_s=..
  joules_per_token_cards=.. joules_per_token_host=..  (one value per level, na = n/a)
EXIT CODES
  0 every level ran and at most --max-error-rate of the requests failed;
  1 could not start, or more than --max-error-rate of the requests failed
  (default 0: any failed request; reports are still written); 2 stopped after
  --max-consecutive-errors failures in a row; 130 interrupted.";

/// Which OpenAI endpoint to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// POST /v1/chat/completions with a user message.
    Chat,
    /// POST /v1/completions with a prompt string.
    Completions,
}

/// How requests arrive in `--rate` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Exponential gaps (a Poisson process).
    Poisson,
    /// Equal gaps of 1/rate.
    Constant,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressArg {
    /// A bar on a terminal; plain lines when stderr is not a TTY or CI=true.
    Auto,
    /// Always the indicatif bar.
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing.
    None,
}

/// Input length distribution: `MEAN` or `MEAN/STDDEV`, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InputTokens {
    /// Mean length.
    pub mean: f64,
    /// Standard deviation.
    pub stddev: f64,
}

impl FromStr for InputTokens {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (m, d) = s.split_once(['/', ',']).unwrap_or((s, "0"));
        let mean: f64 = m.trim().parse().map_err(|_| format!("bad mean {m:?}"))?;
        let stddev: f64 = d.trim().parse().map_err(|_| format!("bad stddev {d:?}"))?;
        if !(mean >= 1.0 && stddev >= 0.0 && mean.is_finite() && stddev.is_finite()) {
            return Err("need MEAN >= 1 and STDDEV >= 0".into());
        }
        Ok(Self { mean, stddev })
    }
}

/// Service-level objectives for goodput, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Bound on TTFT.
    pub ttft_ms: Option<f64>,
    /// Bound on the request's mean per-token ITL.
    pub itl_ms: Option<f64>,
    /// Bound on E2E.
    pub e2e_ms: Option<f64>,
}

impl FromStr for Slo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once(['=', ':'])
                .ok_or_else(|| format!("{part:?}: expected key=milliseconds"))?;
            let v = v.trim().trim_end_matches("ms");
            let ms: f64 = v.parse().map_err(|_| format!("{part:?}: bad number"))?;
            if !(ms > 0.0 && ms.is_finite()) {
                return Err(format!("{part:?}: bound must be > 0"));
            }
            match k.trim() {
                "ttft" => slo.ttft_ms = Some(ms),
                "itl" | "tpot" => slo.itl_ms = Some(ms),
                "e2e" | "e2el" => slo.e2e_ms = Some(ms),
                other => return Err(format!("unknown SLO key {other:?} (ttft, itl, e2e)")),
            }
        }
        Ok(slo)
    }
}

impl Slo {
    /// No bound was given.
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.itl_ms.is_none() && self.e2e_ms.is_none()
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: expected an integer >= 1")),
    }
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{s:?}: expected a number > 0")),
    }
}

/// cardinal-loadtest: load an OpenAI-compatible server and report latency,
/// throughput, goodput and (from Cardinal's /metrics) energy per token.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "cardinal-loadtest", version, after_long_help = MEASUREMENTS)]
pub struct Args {
    /// Server base URL (a trailing /v1 is accepted).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name; default: the first id from GET /v1/models.
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token sent as `Authorization: Bearer …` (redacted in reports).
    #[arg(long, env = "CARDINAL_LOADTEST_API_KEY", hide_env_values = true)]
    #[serde(serialize_with = "redact")]
    pub api_key: Option<String>,
    /// Endpoint to load.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// Ask for a non-streamed response (TTFT and ITL are then not measured).
    #[arg(long)]
    pub no_stream: bool,
    /// Fixed-concurrency levels, run one after another as a sweep: 1,4,16.
    #[arg(long, value_delimiter = ',', value_parser = positive_usize, default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Request-rate levels in requests/s, run as a sweep instead of the
    /// concurrency levels (--concurrency is then ignored): 2,5.
    #[arg(long, value_delimiter = ',', value_parser = positive_f64)]
    pub rate: Option<Vec<f64>>,
    /// Arrival process for --rate.
    #[arg(long, value_enum, default_value_t = Arrival::Poisson)]
    pub arrival: Arrival,
    /// In --rate mode, at most this many requests in flight (later arrivals wait).
    #[arg(long, default_value_t = 256)]
    pub max_concurrency: usize,
    /// Ramp-up seconds at the start of each level: concurrency grows linearly
    /// from 1 to the level's value, or the rate from 0 to the level's rate.
    #[arg(long, default_value_t = 0.0)]
    pub ramp_up: f64,
    /// Requests per level (the level ends at --requests or --duration, whichever first).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Seconds per level; no new request starts after it, in-flight ones finish.
    #[arg(long, default_value_t = 300.0)]
    pub duration: f64,
    /// Requests sent before the first level and not counted.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Per-request timeout in seconds (whole request, headers to [DONE]).
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Open a new connection for every request instead of reusing idle
    /// ones. For servers that close idle keep-alive connections without
    /// saying so (llama.cpp's llama-server does): a request sent on such a
    /// connection fails as a connect error.
    #[arg(long)]
    pub no_keep_alive: bool,
    /// Synthetic prompt length in tokens: MEAN or MEAN/STDDEV.
    #[arg(long, default_value = "128")]
    pub input_tokens: InputTokens,
    /// A system prompt of about this many tokens, the same for every
    /// request of a level, before each synthetic prompt (as vLLM's
    /// benchmark's --random-prefix-len): measures a server's prefix cache.
    /// Each level has its own, so levels do not share it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_SHARED_PREFIX))]
    pub shared_prefix_tokens: u64,
    /// Output tokens per request: sent as max_tokens, with min_tokens and
    /// ignore_eos to force the length; 0 leaves the length to the server.
    #[arg(long, default_value_t = 128)]
    pub output_tokens: u32,
    /// Do not send the vLLM extensions ignore_eos, min_tokens and
    /// stream_options.continuous_usage_stats.
    #[arg(long)]
    pub no_extensions: bool,
    /// Sampling temperature sent with every request (0 = greedy, as in
    /// llama.cpp's server benchmarks); default: not sent, the server decides.
    #[arg(long, value_parser = parse_temperature)]
    pub temperature: Option<f32>,
    /// JSONL dataset: one {"messages":[…]} or {"prompt":"…"} per line (instead
    /// of synthetic prompts).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Seed for prompts, dataset order and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput objectives in ms: ttft=500,itl=50,e2e=10000 (any subset).
    #[arg(long)]
    pub slo: Option<Slo>,
    /// Directory for report.json, report.csv and the SVG plots.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Metrics URL (default: <url>/metrics).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Do not scrape server metrics.
    #[arg(long)]
    pub no_metrics: bool,
    /// Stop the run after this many consecutive failed requests (the report
    /// is still printed); 0 disables.
    #[arg(long, default_value_t = 50)]
    pub max_consecutive_errors: usize,
    /// Largest fraction of failed requests (errors / finished requests, over
    /// every level) for which the run still exits 0. 0, the default, fails
    /// the run (exit 1) on any failed request; 1 never fails it for errors.
    /// The report and --out files are written either way.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = parse_error_rate, allow_negative_numbers = true)]
    pub max_error_rate: f64,
    /// Progress display on stderr.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

fn redact<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

impl Args {
    /// The base URL without a trailing `/` or `/v1`.
    pub fn base_url(&self) -> String {
        let u = self.url.trim_end_matches('/');
        u.strip_suffix("/v1").unwrap_or(u).to_string()
    }

    /// Checks cross-flag constraints clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.requests == 0 {
            return Err("--requests must be >= 1".into());
        }
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            return Err("--duration must be > 0".into());
        }
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            return Err("--timeout must be > 0".into());
        }
        if !(self.ramp_up >= 0.0 && self.ramp_up.is_finite()) {
            return Err("--ramp-up must be >= 0".into());
        }
        if self.max_concurrency == 0 {
            return Err("--max-concurrency must be >= 1".into());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err("--url must start with http://".into());
        }
        Ok(())
    }
}

/// Largest `--shared-prefix-tokens`.
pub const MAX_SHARED_PREFIX: u64 = 1 << 20;

/// An error fraction in [0, 1].
fn parse_error_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number (expected a fraction in [0, 1])"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is outside [0, 1] (a fraction of requests)"))
    }
}

/// A temperature in [0, 2] (OpenAI's range).
fn parse_temperature(s: &str) -> Result<f32, String> {
    let t: f32 = s
        .parse()
        .map_err(|_| format!("temperature {s:?} is not a number"))?;
    if (0.0..=2.0).contains(&t) {
        Ok(t)
    } else {
        Err(format!("temperature {t} is outside [0, 2]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_slo() {
        let s: Slo = "ttft=500,itl=50ms,e2e=10000".parse().unwrap();
        assert_eq!(s.ttft_ms, Some(500.0));
        assert_eq!(s.itl_ms, Some(50.0));
        assert_eq!(s.e2e_ms, Some(10000.0));
        assert!("ttft=0".parse::<Slo>().is_err());
        assert!("foo=1".parse::<Slo>().is_err());
        assert!("ttft".parse::<Slo>().is_err());
        assert!("".parse::<Slo>().unwrap().is_empty());
    }

    #[test]
    fn parses_flags() {
        let a = Args::try_parse_from([
            "x",
            "--url",
            "http://h:1/v1/",
            "--concurrency",
            "1,4,16",
            "--input-tokens",
            "256/32",
            "--slo",
            "ttft=100",
        ])
        .unwrap();
        assert_eq!(a.concurrency, vec![1, 4, 16]);
        assert_eq!(a.base_url(), "http://h:1");
        assert_eq!(a.input_tokens.mean, 256.0);
        assert_eq!(a.input_tokens.stddev, 32.0);
        assert!(a.validate().is_ok());
        assert!(Args::try_parse_from(["x", "--concurrency", "0"]).is_err());
        assert!(Args::try_parse_from(["x", "--rate", "-1"]).is_err());
        let r = Args::try_parse_from(["x", "--rate", "2,5", "--arrival", "constant"]).unwrap();
        assert_eq!(r.rate, Some(vec![2.0, 5.0]));
        let j = serde_json::to_value(Args::try_parse_from(["x", "--api-key", "sekrit"]).unwrap())
            .unwrap();
        assert_eq!(j["api_key"], "<redacted>");
    }

    #[test]
    fn max_error_rate_is_a_fraction() {
        assert_eq!(Args::try_parse_from(["x"]).unwrap().max_error_rate, 0.0);
        let a = Args::try_parse_from(["x", "--max-error-rate", "0.25"]).unwrap();
        assert_eq!(a.max_error_rate, 0.25);
        assert_eq!(
            Args::try_parse_from(["x", "--max-error-rate", "1"])
                .unwrap()
                .max_error_rate,
            1.0
        );
        for bad in ["1.5", "-0.1", "NaN", "inf", "lots"] {
            let e = Args::try_parse_from(["x", "--max-error-rate", bad])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--max-error-rate") && e.contains(bad),
                "names the flag and the value: {e}"
            );
            assert!(e.contains("[0, 1]"), "names the limit: {e}");
        }
    }
}
