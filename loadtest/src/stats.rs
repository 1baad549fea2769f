//! Aggregation of request records into one level's statistics: HDR
//! histograms and their percentiles, throughput, goodput against `--slo`,
//! error counts by class, and whether forced output lengths were honoured.

use crate::cli::Slo;
use crate::record::{ErrorClass, RequestRecord};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// Largest latency a histogram holds: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds (3 significant digits, so any
/// percentile is within 0.1 % of the exact sample value) with an exact mean,
/// minimum and maximum kept beside it.
#[derive(Debug, Clone)]
pub struct LatencyHist {
    h: Histogram<u64>,
    sum_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

/// A distribution summary in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Dist {
    /// Number of samples.
    pub count: u64,
    /// Exact mean.
    pub mean: f64,
    /// Exact minimum.
    pub min: f64,
    /// Percentiles from the histogram.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Exact maximum.
    pub max: f64,
}

impl LatencyHist {
    /// An empty histogram.
    pub fn new() -> Self {
        let h =
            Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid");
        Self {
            h,
            sum_ms: 0.0,
            min_ms: f64::INFINITY,
            max_ms: 0.0,
        }
    }

    /// Records one latency in milliseconds (negative values count as 0).
    pub fn record_ms(&mut self, ms: f64) {
        let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
        let us = (ms * 1000.0).round().min(MAX_US as f64) as u64;
        self.h.saturating_record(us);
        self.sum_ms += ms;
        self.min_ms = self.min_ms.min(ms);
        self.max_ms = self.max_ms.max(ms);
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// No samples yet.
    pub fn is_empty(&self) -> bool {
        self.h.len() == 0
    }

    /// The value at quantile `q` in [0, 1], in ms: the smallest recorded
    /// value v such that at least a fraction q of samples are ≤ v (to
    /// histogram precision).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.is_empty() {
            return None;
        }
        let v = self.h.value_at_quantile(q.clamp(0.0, 1.0)) as f64 / 1000.0;
        // The histogram reports the top of a bucket; never exceed the true max.
        Some(v.min(self.max_ms))
    }

    /// The summary, `None` when empty.
    pub fn summary(&self) -> Option<Dist> {
        let q = |x| self.quantile_ms(x);
        Some(Dist {
            count: self.len(),
            mean: self.sum_ms / self.len().max(1) as f64,
            min: self.min_ms,
            p50: q(0.50)?,
            p90: q(0.90)?,
            p95: q(0.95)?,
            p99: q(0.99)?,
            max: self.max_ms,
        })
    }

    /// Points (latency ms, cumulative fraction ≤ it) for a CDF plot.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let total = self.len();
        if total == 0 {
            return Vec::new();
        }
        let mut seen = 0u64;
        let mut out = Vec::new();
        for v in self.h.iter_recorded() {
            seen += v.count_since_last_iteration();
            let ms = (v.value_iterated_to() as f64 / 1000.0).min(self.max_ms);
            out.push((ms, seen as f64 / total as f64));
        }
        out
    }
}

/// Whether a successful request meets every bound of the SLO. Without
/// streaming, the first token is seen at E2E, so TTFT = E2E. A request with
/// fewer than two tokens has no ITL and passes the ITL bound.
pub fn meets_slo(r: &RequestRecord, slo: &Slo) -> bool {
    if !r.ok() {
        return false;
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let ttft = r.ttft.map(ms).unwrap_or_else(|| ms(r.e2e));
    slo.ttft_ms.is_none_or(|b| ttft <= b)
        && slo.e2e_ms.is_none_or(|b| ms(r.e2e) <= b)
        && slo
            .itl_ms
            .is_none_or(|b| r.mean_itl_ms().is_none_or(|itl| itl <= b))
}

/// Requests per second.
pub fn per_second(count: f64, wall_s: f64) -> f64 {
    if wall_s > 0.0 { count / wall_s } else { 0.0 }
}

/// Failed requests by class.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorCounts {
    /// Connection failures.
    pub connect: u64,
    /// Non-2xx answers.
    pub http_status: u64,
    /// Timeouts.
    pub timeout: u64,
    /// Malformed SSE.
    pub malformed_sse: u64,
    /// Streams that ended early.
    pub early_end: u64,
    /// Error objects inside streams.
    pub stream_error: u64,
    /// All of the above.
    pub total: u64,
    /// HTTP status code → count.
    pub by_status: BTreeMap<u16, u64>,
}

impl ErrorCounts {
    /// Count for one class.
    pub fn get(&self, c: ErrorClass) -> u64 {
        match c {
            ErrorClass::Connect => self.connect,
            ErrorClass::HttpStatus => self.http_status,
            ErrorClass::Timeout => self.timeout,
            ErrorClass::MalformedSse => self.malformed_sse,
            ErrorClass::EarlyEnd => self.early_end,
            ErrorClass::StreamError => self.stream_error,
        }
    }

    fn add(&mut self, c: ErrorClass, status: Option<u16>) {
        let slot = match c {
            ErrorClass::Connect => &mut self.connect,
            ErrorClass::HttpStatus => &mut self.http_status,
            ErrorClass::Timeout => &mut self.timeout,
            ErrorClass::MalformedSse => &mut self.malformed_sse,
            ErrorClass::EarlyEnd => &mut self.early_end,
            ErrorClass::StreamError => &mut self.stream_error,
        };
        *slot += 1;
        self.total += 1;
        if let Some(s) = status {
            *self.by_status.entry(s).or_default() += 1;
        }
    }
}

/// Goodput figures.
#[derive(Debug, Clone, Serialize)]
pub struct Goodput {
    /// The objectives.
    pub slo: Slo,
    /// Requests meeting all of them.
    pub good_requests: u64,
    /// good_requests / wall time.
    pub req_s: f64,
    /// good_requests / successful requests.
    pub fraction_of_ok: f64,
}

/// Whether `--output-tokens` was honoured.
#[derive(Debug, Clone, Serialize)]
pub struct Forcing {
    /// The requested output length.
    pub requested: u32,
    /// Successful requests whose completion_tokens equalled it.
    pub honoured: u64,
    /// Successful requests.
    pub of: u64,
}

/// One numeric field of the `usage.cardinal` extension, over a level.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExtensionField {
    /// Successful requests that carried it.
    pub requests: u64,
    /// Sum over those requests.
    pub sum: f64,
    /// Mean per request.
    pub mean: f64,
    /// Sum divided by the output tokens of those requests (for example
    /// joules per token when the field is a request's joules).
    pub per_output_token: f64,
    #[serde(skip)]
    tokens: u64,
}

/// Everything measured in one level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelStats {
    /// Requests that finished (ok + failed); cancelled ones are not counted.
    pub requests: u64,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests by class.
    pub errors: ErrorCounts,
    /// First dispatch to last completion, seconds.
    pub wall_s: f64,
    /// TTFT distribution (ms).
    pub ttft_ms: Option<Dist>,
    /// Per-token ITL distribution (ms).
    pub itl_ms: Option<Dist>,
    /// Per-request TPOT distribution (ms).
    pub tpot_ms: Option<Dist>,
    /// E2E distribution (ms).
    pub e2e_ms: Option<Dist>,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_tok_s: f64,
    /// Input + output tokens per second.
    pub total_tok_s: f64,
    /// Output tokens of successful requests.
    pub output_tokens: u64,
    /// Input tokens of successful requests (where known).
    pub input_tokens: u64,
    /// Mean output tokens per successful request.
    pub mean_output_tokens: f64,
    /// Mean input tokens per successful request.
    pub mean_input_tokens: f64,
    /// "usage", "chunks", "mixed" or "none".
    pub token_count_source: String,
    /// The server sent per-chunk usage, so chunks were spread by their
    /// actual token counts.
    pub continuous_usage: bool,
    /// Goodput, when `--slo` was given.
    pub goodput: Option<Goodput>,
    /// Forced-length check, when `--output-tokens` was sent.
    pub output_forcing: Option<Forcing>,
    /// The first few error details.
    pub error_samples: Vec<String>,
    /// Cardinal's per-request `usage.cardinal` numbers, per field.
    pub usage_extension: BTreeMap<String, ExtensionField>,
    /// CDF of TTFT, for plots.
    #[serde(skip)]
    pub ttft_cdf: Vec<(f64, f64)>,
    /// CDF of ITL, for plots.
    #[serde(skip)]
    pub itl_cdf: Vec<(f64, f64)>,
}

/// Accumulates records of one level as they arrive.
#[derive(Debug, Clone, Default)]
pub struct LevelAccum {
    ttft: LatencyHist,
    itl: LatencyHist,
    tpot: LatencyHist,
    e2e: LatencyHist,
    errors: ErrorCounts,
    error_samples: Vec<String>,
    ok: u64,
    good: u64,
    output_tokens: u64,
    input_tokens: u64,
    from_usage: u64,
    from_chunks: u64,
    continuous: bool,
    honoured: u64,
    extension: BTreeMap<String, ExtensionField>,
}

impl LevelAccum {
    /// Adds one finished request.
    pub fn add(&mut self, r: &RequestRecord, slo: &Slo, requested_output: Option<u32>) {
        if let Some(err) = &r.error {
            self.errors.add(err.class, err.status);
            if self.error_samples.len() < 5 {
                self.error_samples
                    .push(format!("{}: {}", err.class.name(), err.detail));
            }
            return;
        }
        self.ok += 1;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        if let Some(t) = r.ttft {
            self.ttft.record_ms(ms(t));
            if let Some(tpot) = crate::chunk::tpot_ms(r.e2e, t, r.output_tokens) {
                self.tpot.record_ms(tpot);
            }
        }
        for &v in &r.itl_ms {
            self.itl.record_ms(v);
        }
        self.e2e.record_ms(ms(r.e2e));
        self.output_tokens += r.output_tokens;
        self.input_tokens += r.input_tokens.unwrap_or(0);
        if r.tokens_from_usage {
            self.from_usage += 1;
        } else {
            self.from_chunks += 1;
        }
        self.continuous |= r.continuous_usage;
        if meets_slo(r, slo) {
            self.good += 1;
        }
        if requested_output.is_some_and(|n| r.output_tokens == u64::from(n)) {
            self.honoured += 1;
        }
        for (k, v) in &r.usage_extension {
            let f = self.extension.entry(k.clone()).or_default();
            f.requests += 1;
            f.sum += v;
            f.tokens += r.output_tokens;
        }
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.ok
    }

    /// Failed requests so far.
    pub fn errors(&self) -> u64 {
        self.errors.total
    }

    /// Output tokens so far.
    pub fn output_tokens(&self) -> u64 {
        self.output_tokens
    }

    /// Final statistics over `wall_s` seconds.
    pub fn finish(&self, wall_s: f64, slo: &Slo, requested_output: Option<u32>) -> LevelStats {
        let ok = self.ok;
        let source = match (self.from_usage, self.from_chunks) {
            (0, 0) => "none",
            (_, 0) => "usage",
            (0, _) => "chunks",
            _ => "mixed",
        };
        let mean = |x: u64| if ok > 0 { x as f64 / ok as f64 } else { 0.0 };
        LevelStats {
            requests: ok + self.errors.total,
            ok,
            errors: self.errors.clone(),
            wall_s,
            ttft_ms: self.ttft.summary(),
            itl_ms: self.itl.summary(),
            tpot_ms: self.tpot.summary(),
            e2e_ms: self.e2e.summary(),
            request_throughput: per_second(ok as f64, wall_s),
            output_tok_s: per_second(self.output_tokens as f64, wall_s),
            total_tok_s: per_second((self.output_tokens + self.input_tokens) as f64, wall_s),
            output_tokens: self.output_tokens,
            input_tokens: self.input_tokens,
            mean_output_tokens: mean(self.output_tokens),
            mean_input_tokens: mean(self.input_tokens),
            token_count_source: source.to_string(),
            continuous_usage: self.continuous,
            goodput: (!slo.is_empty()).then(|| Goodput {
                slo: *slo,
                good_requests: self.good,
                req_s: per_second(self.good as f64, wall_s),
                fraction_of_ok: if ok > 0 {
                    self.good as f64 / ok as f64
                } else {
                    0.0
                },
            }),
            output_forcing: requested_output.map(|n| Forcing {
                requested: n,
                honoured: self.honoured,
                of: ok,
            }),
            error_samples: self.error_samples.clone(),
            usage_extension: self
                .extension
                .iter()
                .map(|(k, f)| {
                    let mut f = f.clone();
                    f.mean = f.sum / f.requests.max(1) as f64;
                    f.per_output_token = if f.tokens > 0 {
                        f.sum / f.tokens as f64
                    } else {
                        0.0
                    };
                    (k.clone(), f)
                })
                .collect(),
            ttft_cdf: self.ttft.cdf(),
            itl_cdf: self.itl.cdf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RequestRecord;
    use std::time::Duration;

    #[test]
    fn percentiles_of_known_samples() {
        let mut h = LatencyHist::new();
        for v in 1..=100 {
            h.record_ms(v as f64);
        }
        let d = h.summary().unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 1e-9;
        assert!(close(d.p50, 50.0), "{d:?}");
        assert!(close(d.p90, 90.0), "{d:?}");
        assert!(close(d.p95, 95.0), "{d:?}");
        assert!(close(d.p99, 99.0), "{d:?}");
        assert_eq!(d.max, 100.0);
        assert_eq!(d.min, 1.0);
        assert!((d.mean - 50.5).abs() < 1e-9);
        assert_eq!(d.count, 100);
        let cdf = h.cdf();
        assert_eq!(cdf.last().unwrap().1, 1.0);
        assert!(LatencyHist::new().summary().is_none());
        let mut z = LatencyHist::new();
        z.record_ms(0.0);
        z.record_ms(0.0);
        z.record_ms(20.0);
        assert_eq!(z.quantile_ms(0.5), Some(0.0));
        assert!(close(z.quantile_ms(1.0).unwrap(), 20.0));
    }

    fn rec(ttft_ms: u64, e2e_ms: u64, itl: &[f64], tokens: u64) -> RequestRecord {
        RequestRecord {
            ttft: Some(Duration::from_millis(ttft_ms)),
            e2e: Duration::from_millis(e2e_ms),
            itl_ms: itl.to_vec(),
            output_tokens: tokens,
            tokens_from_usage: true,
            input_tokens: Some(10),
            ..Default::default()
        }
    }

    #[test]
    fn goodput_arithmetic() {
        let slo: Slo = "ttft=100,itl=30,e2e=1000".parse().unwrap();
        let good = rec(80, 500, &[20.0, 25.0], 3);
        let slow_first = rec(150, 500, &[20.0], 2);
        let slow_tokens = rec(80, 500, &[20.0, 50.0], 3); // mean 35 > 30
        let slow_total = rec(80, 1500, &[20.0], 2);
        let failed = RequestRecord::failed(ErrorClass::HttpStatus, Some(500), "boom");
        assert!(meets_slo(&good, &slo));
        assert!(!meets_slo(&slow_first, &slo));
        assert!(!meets_slo(&slow_tokens, &slo));
        assert!(!meets_slo(&slow_total, &slo));
        assert!(!meets_slo(&failed, &slo));
        let mut acc = LevelAccum::default();
        for r in [
            &good,
            &good,
            &slow_first,
            &slow_tokens,
            &slow_total,
            &failed,
        ] {
            acc.add(r, &slo, Some(3));
        }
        let s = acc.finish(2.0, &slo, Some(3));
        assert_eq!(s.requests, 6);
        assert_eq!(s.ok, 5);
        let g = s.goodput.unwrap();
        assert_eq!(g.good_requests, 2);
        assert_eq!(g.req_s, 1.0);
        assert!((g.fraction_of_ok - 0.4).abs() < 1e-12);
        assert_eq!(s.request_throughput, 2.5);
        assert_eq!(s.output_tokens, 3 + 3 + 2 + 3 + 2);
        assert_eq!(s.output_tok_s, 6.5);
        assert_eq!(s.total_tok_s, (13.0 + 50.0) / 2.0);
        assert_eq!(s.errors.http_status, 1);
        assert_eq!(s.errors.by_status.get(&500), Some(&1));
        assert_eq!(s.token_count_source, "usage");
        let f = s.output_forcing.unwrap();
        assert_eq!((f.honoured, f.of), (3, 5));
        assert!(s.usage_extension.is_empty());
        let mut acc2 = LevelAccum::default();
        let mut with_ext = rec(80, 500, &[20.0], 4);
        with_ext.usage_extension = vec![("joules_cards".into(), 2.0)];
        acc2.add(&with_ext, &slo, None);
        acc2.add(&with_ext, &slo, None);
        let e = &acc2.finish(1.0, &slo, None).usage_extension["joules_cards"];
        assert_eq!(
            (e.requests, e.sum, e.mean, e.per_output_token),
            (2, 4.0, 2.0, 0.5)
        );
        // No SLO: no goodput section; the non-streaming TTFT is the E2E.
        let none = acc.finish(2.0, &Slo::default(), None);
        assert!(none.goodput.is_none());
        let mut ns = rec(0, 90, &[], 5);
        ns.ttft = None;
        assert!(meets_slo(&ns, &"ttft=100".parse().unwrap()));
        assert!(!meets_slo(&ns, &"ttft=80".parse().unwrap()));
    }
}
