//! Prometheus metrics at `/metrics`: every series is prefixed `cardinal_` and
//! labelled `model_name` (and `card` where it applies). Latency and length
//! histograms use vLLM's buckets so existing dashboards work. Request-level
//! series are updated by the request handlers; engine-level ones (tokens,
//! energy, card counters, KV) are read from the engine's atomics at scrape
//! time. Throughput and joules per token are computed over a sliding window
//! of [`WINDOW_SECONDS`] from samples taken every second and at each scrape.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardinal_pipeline::Engine;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Length of the window of the rate gauges.
pub const WINDOW_SECONDS: u64 = 30;
/// Most samples kept in the window.
const MAX_SAMPLES: usize = 256;

/// vLLM's time-to-first-token buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (e2e, queue).
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// vLLM's 1-2-5 buckets up to `max` (1, 2, 5, 10, 20, 50, ... <= max).
pub fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    'outer: loop {
        for m in [1, 2, 5] {
            let v = m * scale;
            if v > max {
                break 'outer;
            }
            out.push(v as f64);
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => break,
        };
    }
    if out.is_empty() {
        out.push(1.0);
    }
    out
}

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    generated: u64,
    card_uj: u64,
    host_uj: u64,
    modeled_ns: u64,
    busy_ns: Vec<u64>,
}

/// Every metric of the server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: Histogram,
    pub generation_tokens: Histogram,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub rejected: IntCounterVec,
    pub cancelled: IntCounter,
    prompt_total: IntCounter,
    generation_total: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    energy: CounterVec,
    busy: CounterVec,
    link: IntCounterVec,
    running: IntGauge,
    waiting: IntGauge,
    tps: Gauge,
    joules_per_token: GaugeVec,
    memory: IntGaugeVec,
    kv_ratio: GaugeVec,
    utilization: GaugeVec,
    build_info: IntGaugeVec,
    window: Mutex<VecDeque<Sample>>,
    scrape: Mutex<()>,
}

fn hist(r: &Registry, model: &str, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace("cardinal")
            .const_label("model_name", model)
            .buckets(buckets),
    )
    .expect("valid histogram");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn opts(model: &str, name: &str, help: &str) -> Opts {
    Opts::new(name, help)
        .namespace("cardinal")
        .const_label("model_name", model)
}

macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m.expect("valid metric");
        $r.register(Box::new(m.clone())).expect("unique metric");
        m
    }};
}

impl Metrics {
    /// Metrics for `model` (the served name) with a context of `max_model_len`.
    pub fn new(model: &str, max_model_len: usize) -> Metrics {
        let r = Registry::new();
        let tokens = buckets_1_2_5(max_model_len);
        let w = WINDOW_SECONDS;
        let m = Metrics {
            ttft: hist(
                &r,
                model,
                "time_to_first_token_seconds",
                "Time from HTTP arrival to the first generated token, per sequence.",
                TTFT_BUCKETS.to_vec(),
            ),
            itl: hist(
                &r,
                model,
                "inter_token_latency_seconds",
                "Time between consecutive generated tokens of a sequence.",
                ITL_BUCKETS.to_vec(),
            ),
            e2e: hist(
                &r,
                model,
                "e2e_request_latency_seconds",
                "Time from HTTP arrival to the last token of a finished request.",
                REQUEST_BUCKETS.to_vec(),
            ),
            queue_time: hist(
                &r,
                model,
                "request_queue_time_seconds",
                "Time a sequence waited in the engine queue before it was scheduled.",
                REQUEST_BUCKETS.to_vec(),
            ),
            prompt_tokens: hist(
                &r,
                model,
                "request_prompt_tokens",
                "Prompt length of each request prompt, in tokens.",
                tokens.clone(),
            ),
            generation_tokens: hist(
                &r,
                model,
                "request_generation_tokens",
                "Tokens generated by each finished sequence.",
                tokens,
            ),
            requests: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        model,
                        "requests_total",
                        "Finished sequences by finish reason."
                    ),
                    &["finish_reason"]
                )
            ),
            errors: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        model,
                        "request_errors_total",
                        "Requests that failed, by error type."
                    ),
                    &["type"]
                )
            ),
            rejected: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        model,
                        "requests_rejected_total",
                        "Requests refused by load shedding or server state, by reason."
                    ),
                    &["reason"]
                )
            ),
            cancelled: reg!(
                r,
                IntCounter::with_opts(opts(
                    model,
                    "requests_cancelled_total",
                    "Requests whose client went away before they finished."
                ))
            ),
            prompt_total: reg!(
                r,
                IntCounter::with_opts(opts(
                    model,
                    "prompt_tokens_total",
                    "Prompt tokens of admitted requests, prefix-cache hits included (as vLLM counts them)."
                ))
            ),
            generation_total: reg!(
                r,
                IntCounter::with_opts(opts(model, "generation_tokens_total", "Tokens generated."))
            ),
            prefix_queries: reg!(
                r,
                IntCounter::with_opts(opts(
                    model,
                    "prefix_cache_queries_total",
                    "Prompt tokens looked up in the prefix cache."
                ))
            ),
            prefix_hits: reg!(
                r,
                IntCounter::with_opts(opts(
                    model,
                    "prefix_cache_hits_total",
                    "Prompt tokens found in the prefix cache (not prefilled)."
                ))
            ),
            energy: reg!(
                r,
                CounterVec::new(
                    opts(
                        model,
                        "energy_joules_total",
                        "Energy spent: modeled on the cards (cards_modeled) and on the host (host)."
                    ),
                    &["source"]
                )
            ),
            busy: reg!(
                r,
                CounterVec::new(
                    opts(
                        model,
                        "card_busy_seconds_total",
                        "Modeled busy time of each card."
                    ),
                    &["card"]
                )
            ),
            link: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        model,
                        "link_bytes_total",
                        "Bytes sent on each card's outgoing link."
                    ),
                    &["card"]
                )
            ),
            running: reg!(
                r,
                IntGauge::with_opts(opts(
                    model,
                    "requests_running",
                    "Sequences running in the engine."
                ))
            ),
            waiting: reg!(
                r,
                IntGauge::with_opts(opts(
                    model,
                    "requests_waiting",
                    "Sequences waiting in the engine queue."
                ))
            ),
            tps: reg!(
                r,
                Gauge::with_opts(opts(
                    model,
                    "generation_tokens_per_second",
                    &format!(
                        "Tokens generated per second over a sliding window of the last {w} s."
                    )
                ))
            ),
            joules_per_token: reg!(
                r,
                GaugeVec::new(
                    opts(
                        model,
                        "joules_per_token",
                        &format!(
                            "Energy per generated token over a sliding window of the last {w} s, by source (cards_modeled, host)."
                        )
                    ),
                    &["source"]
                )
            ),
            memory: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        model,
                        "card_memory_bytes",
                        "Card memory in use, by kind: weights, kv (running sequences' cache) and kv_prefix_cache (cached blocks no sequence uses, evicted when room is needed)."
                    ),
                    &["card", "kind"]
                )
            ),
            kv_ratio: reg!(
                r,
                GaugeVec::new(
                    opts(
                        model,
                        "kv_cache_usage_ratio",
                        "Fraction of each card's KV cache budget used by running sequences (0 to 1); idle prefix-cache blocks count as free."
                    ),
                    &["card"]
                )
            ),
            utilization: reg!(
                r,
                GaugeVec::new(
                    opts(
                        model,
                        "card_utilization_ratio",
                        &format!(
                            "Modeled busy fraction of each card over a sliding window of the last {w} s."
                        )
                    ),
                    &["card"]
                )
            ),
            build_info: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        model,
                        "build_info",
                        "Build and runtime information (always 1)."
                    ),
                    &["version", "isa", "cards", "model"]
                )
            ),
            registry: r,
            window: Mutex::new(VecDeque::new()),
            scrape: Mutex::new(()),
        };
        for reason in ["stop", "length"] {
            m.requests.with_label_values(&[reason]).inc_by(0);
        }
        for t in [
            "invalid_request",
            "authentication",
            "not_found",
            "too_large",
            "unsupported_media_type",
            "timeout",
            "engine",
            "template",
        ] {
            m.errors.with_label_values(&[t]).inc_by(0);
        }
        for reason in ["queue_full", "draining", "not_ready", "engine_failed"] {
            m.rejected.with_label_values(&[reason]).inc_by(0);
        }
        for source in ["cards_modeled", "host"] {
            m.energy.with_label_values(&[source]).inc_by(0.0);
            m.joules_per_token.with_label_values(&[source]).set(0.0);
        }
        m
    }

    /// Records the runtime facts of `build_info` and the per-card series.
    pub fn set_engine(&self, engine: &Engine, isa: &str, model: &str) {
        let cards = engine.cards.cards.len().to_string();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), isa, &cards, model])
            .set(1);
        self.update(engine);
    }

    /// Takes a window sample (called every second and at each scrape).
    pub fn sample(&self, engine: &Engine) {
        let s = &engine.stats;
        let sample = Sample {
            at: Instant::now(),
            generated: s.generated_tokens.load(Ordering::Relaxed),
            card_uj: s.card_energy_uj.load(Ordering::Relaxed),
            host_uj: s.host_energy_uj.load(Ordering::Relaxed),
            modeled_ns: s.modeled_ns.load(Ordering::Relaxed),
            busy_ns: engine
                .cards
                .cards
                .iter()
                .map(|c| c.counters.busy_ns.load(Ordering::Relaxed))
                .collect(),
        };
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = sample.at.checked_sub(Duration::from_secs(WINDOW_SECONDS));
        w.push_back(sample);
        // Keep one sample at or before the window start so the window is spanned.
        while w.len() > 2 && horizon.is_some_and(|h| w[1].at <= h) {
            w.pop_front();
        }
        while w.len() > MAX_SAMPLES {
            w.pop_front();
        }
    }

    /// Brings the engine-derived series up to date.
    fn update(&self, engine: &Engine) {
        let s = &engine.stats;
        set_counter(&self.prompt_total, s.prompt_tokens.load(Ordering::Relaxed));
        set_counter(
            &self.generation_total,
            s.generated_tokens.load(Ordering::Relaxed),
        );
        set_counter(
            &self.prefix_queries,
            s.prefix_query_tokens.load(Ordering::Relaxed),
        );
        set_counter(
            &self.prefix_hits,
            s.prefix_hit_tokens.load(Ordering::Relaxed),
        );
        let idle = engine.kv_idle_cached();
        set_fcounter(
            &self.energy.with_label_values(&["cards_modeled"]),
            s.card_energy_uj.load(Ordering::Relaxed) as f64 / 1e6,
        );
        set_fcounter(
            &self.energy.with_label_values(&["host"]),
            s.host_energy_uj.load(Ordering::Relaxed) as f64 / 1e6,
        );
        self.running.set(s.running.load(Ordering::Relaxed) as i64);
        self.waiting.set(s.waiting.load(Ordering::Relaxed) as i64);
        for (c, &idle) in engine.cards.cards.iter().zip(&idle) {
            let id = c.id.to_string();
            let in_use = c.kv.used().saturating_sub(idle);
            set_fcounter(
                &self.busy.with_label_values(&[&id]),
                c.counters.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
            );
            set_counter(
                &self.link.with_label_values(&[&id]),
                c.counters.link_bytes.load(Ordering::Relaxed),
            );
            self.memory
                .with_label_values(&[&id, "weights"])
                .set(c.weight_bytes as i64);
            self.memory
                .with_label_values(&[&id, "kv"])
                .set(in_use as i64);
            self.memory
                .with_label_values(&[&id, "kv_prefix_cache"])
                .set(idle as i64);
            let limit = c.kv.limit();
            self.kv_ratio.with_label_values(&[&id]).set(if limit == 0 {
                0.0
            } else {
                in_use as f64 / limit as f64
            });
        }
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(a), Some(b)) = (w.front(), w.back()) {
            let dt = (b.at - a.at).as_secs_f64();
            let tokens = b.generated.saturating_sub(a.generated);
            self.tps
                .set(if dt >= 0.5 { tokens as f64 / dt } else { 0.0 });
            let per_token = |x: u64, y: u64| {
                if tokens == 0 {
                    0.0
                } else {
                    y.saturating_sub(x) as f64 / 1e6 / tokens as f64
                }
            };
            self.joules_per_token
                .with_label_values(&["cards_modeled"])
                .set(per_token(a.card_uj, b.card_uj));
            self.joules_per_token
                .with_label_values(&["host"])
                .set(per_token(a.host_uj, b.host_uj));
            let modeled = b.modeled_ns.saturating_sub(a.modeled_ns);
            for (i, c) in engine.cards.cards.iter().enumerate() {
                let busy = b
                    .busy_ns
                    .get(i)
                    .zip(a.busy_ns.get(i))
                    .map_or(0, |(y, x)| y.saturating_sub(*x));
                let ratio = if modeled == 0 {
                    0.0
                } else {
                    (busy as f64 / modeled as f64).min(1.0)
                };
                self.utilization
                    .with_label_values(&[&c.id.to_string()])
                    .set(ratio);
            }
        }
    }

    /// The text exposition, after bringing engine series up to date.
    pub fn render(&self, engine: Option<&Engine>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = engine {
            self.sample(e);
            self.update(e);
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics failed: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn set_counter(c: &IntCounter, v: u64) {
    let cur = c.get();
    if v > cur {
        c.inc_by(v - cur);
    }
}

fn set_fcounter(c: &Counter, v: f64) {
    let cur = c.get();
    if v > cur {
        c.inc_by(v - cur);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_two_five() {
        assert_eq!(
            buckets_1_2_5(256),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
        );
        assert_eq!(buckets_1_2_5(0), vec![1.0]);
    }

    #[test]
    fn renders_names_without_engine() {
        let m = Metrics::new("m", 256);
        m.ttft.observe(0.1);
        let t = m.render(None);
        for name in [
            "cardinal_time_to_first_token_seconds_bucket",
            "cardinal_requests_total",
            "cardinal_generation_tokens_per_second",
        ] {
            assert!(t.contains(name), "{name} missing");
        }
        assert!(t.contains("model_name=\"m\""));
    }
}
