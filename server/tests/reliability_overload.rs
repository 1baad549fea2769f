//! Overload over real TCP on 127.0.0.1 (tiny-granite, in process): with
//! `--max-num-seqs 4 --max-queue 4`, bursts of 10 × (4 + 4) = 80 clients
//! start a 64-token stream at the same instant, on connections opened
//! beforehand so the timing is the server's alone (the first burst warms
//! the server up and is not timed). Every request must get
//! either the full stream with the right usage or a 429 with `Retry-After`
//! in the OpenAI error shape; the p99 of the time from a request's arrival
//! to its 429, as the server logs it for every 429, must be under 50 ms,
//! and at the client under 250 ms (that time also holds the single-threaded
//! test client scheduling 80 connections on the same cores as the server and
//! the engine); nothing may answer 5xx or hang; and `cardinal_requests_waiting`,
//! scraped from /metrics all along (and the engine's own counter, sampled
//! far faster), must never exceed 4. Prints admitted, rejected and latency
//! figures.

mod http_support;
mod reliability_support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_support::app_with;
use reliability_support::*;
use tokio::sync::Barrier;

const SEQS: usize = 4;
const QUEUE: usize = 4;
const CLIENTS: usize = 10 * (SEQS + QUEUE);
const TOKENS: usize = 64;
/// Timed bursts in a series (after one untimed warm-up burst).
const TIMED: usize = 3;
/// Series run at most (the next only when one misses the latency target).
const ATTEMPTS: usize = 2;
/// Bound on the p99 time to a 429 seen by the client. It holds what the
/// server takes (bounded at 50 ms from arrival, below) plus the test client's
/// own work: one thread polling 80 connections on the cores that also run
/// the server and the engine, which alone reached 50-100 ms at p99 on a
/// 2-core machine while the server's p99 stayed far lower.
const CLIENT_P99_MS: f64 = 250.0;
/// No request may take longer than this (a hung connection fails the test).
const PER_REQUEST: Duration = Duration::from_secs(60);

/// What one request got; bodies are checked after the burst, so the
/// client does as little as possible while the server is timed.
enum Outcome {
    Admitted(Vec<u8>),
    Rejected { ms: f64, head: Head, body: Vec<u8> },
}

/// One request on `conn`; a connection still usable is handed back.
async fn one(
    mut conn: Raw,
    req: Arc<Vec<u8>>,
    start: Arc<Barrier>,
) -> Result<(Outcome, Option<Raw>), String> {
    start.wait().await;
    let t = Instant::now();
    conn.send(&req).await?;
    let head = conn.head().await?;
    match head.status {
        429 => {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let body = conn.body(&head).await?;
            Ok((Outcome::Rejected { ms, head, body }, Some(conn)))
        }
        200 => Ok((Outcome::Admitted(conn.body(&head).await?), None)),
        other => {
            let body = conn.body(&head).await.unwrap_or_default();
            Err(format!(
                "status {other}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
}

/// Checks a 429: Retry-After and the OpenAI error shape.
fn check_rejection(head: &Head, body: &[u8]) -> Result<(), String> {
    let retry = head.get("retry-after").and_then(|v| v.parse::<u64>().ok());
    if retry.is_none_or(|s| s < 1) {
        return Err(format!("429 without a valid Retry-After: {head:?}"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("429 body: {e}"))?;
    let e = &v["error"];
    if e["type"] != "rate_limit_error"
        || !e["message"].is_string()
        || e.get("param").is_none()
        || e["code"] != "rate_limit_exceeded"
    {
        return Err(format!("429 not in the OpenAI shape: {v}"));
    }
    Ok(())
}

/// Checks a whole stream: every event, [DONE], the finish and the usage.
fn check_stream(body: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("stream not UTF-8: {e}"))?;
    let s = summarize(text)?;
    if !s.done || !s.errors.is_empty() {
        return Err(format!("incomplete stream: {s:?}"));
    }
    if s.completion_tokens != Some(TOKENS as u64) || s.finish_reason.as_deref() != Some("length") {
        return Err(format!("wrong usage or finish: {s:?}"));
    }
    if s.prompt_tokens.is_none_or(|p| p == 0) {
        return Err(format!("no prompt tokens in the usage: {s:?}"));
    }
    Ok(())
}

/// Totals over bursts.
#[derive(Default)]
struct Tally {
    admitted: usize,
    rejected: usize,
    latencies: Vec<f64>,
    failures: Vec<String>,
}

/// One burst: every client sends at the same instant; all is checked.
async fn burst(conns: &mut Vec<Raw>, base: &str, req: &Arc<Vec<u8>>, round: usize, t: &mut Tally) {
    let started = Instant::now();
    let start = Arc::new(Barrier::new(CLIENTS));
    // Rejected requests hand their (kept-alive) connection back; replace
    // the ones that carried a stream.
    while conns.len() < CLIENTS {
        conns.push(Raw::connect(base).await);
    }
    let jobs: Vec<_> = conns
        .drain(..)
        .map(|c| {
            let job = one(c, req.clone(), start.clone());
            tokio::spawn(tokio::time::timeout(PER_REQUEST, job))
        })
        .collect();
    let (mut a, mut r) = (0, 0);
    for j in jobs {
        match j.await.expect("client task") {
            Err(_) => t
                .failures
                .push(format!("burst {round}: hung for {PER_REQUEST:?}")),
            Ok(Err(e)) => t.failures.push(format!("burst {round}: {e}")),
            Ok(Ok((outcome, conn))) => {
                let checked = match outcome {
                    Outcome::Admitted(body) => {
                        a += 1;
                        check_stream(&body)
                    }
                    Outcome::Rejected { ms, head, body } => {
                        r += 1;
                        t.latencies.push(ms);
                        check_rejection(&head, &body)
                    }
                };
                if let Err(e) = checked {
                    t.failures.push(format!("burst {round}: {e}"));
                }
                conns.extend(conn);
            }
        }
    }
    eprintln!(
        "burst {round}: {CLIENTS} clients, {a} admitted, {r} rejected, {:.2} s",
        started.elapsed().as_secs_f64()
    );
    t.admitted += a;
    t.rejected += r;
}

#[tokio::test(flavor = "current_thread")]
async fn overload_is_shed_fast_and_the_queue_stays_bounded() {
    let overall = Instant::now();
    // The server logs every 4xx with its time since arrival: keep them.
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || Capture(sink.clone()))
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let srv = Local::start(app_with(opts(SEQS, QUEUE)));
    let base = srv.base.clone();

    // Watchers: /metrics over HTTP, and the engine's counter directly.
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicUsize::new(0));
    let scraper = {
        let (stop, scrapes, base) = (stop.clone(), scrapes.clone(), base.clone());
        tokio::spawn(async move {
            let c = reqwest::Client::new();
            let (mut max_waiting, mut max_running) = (0f64, 0f64);
            while !stop.load(Ordering::Acquire) {
                let t = scrape(&c, &base).await;
                max_waiting = max_waiting.max(metric_sum(&t, "cardinal_requests_waiting"));
                max_running = max_running.max(metric_sum(&t, "cardinal_requests_running"));
                scrapes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            (max_waiting, max_running)
        })
    };
    let sampler = {
        let (stop, stats) = (stop.clone(), srv.app.engine.stats.clone());
        std::thread::spawn(move || {
            let (mut max, mut n) = (0usize, 0u64);
            while !stop.load(Ordering::Acquire) {
                max = max.max(stats.waiting.load(Ordering::Acquire));
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            (max, n)
        })
    };

    // One connection per client, opened (and used once) before the bursts.
    let req = Arc::new(Raw::post("/v1/chat/completions", &chat_body(TOKENS, true)));
    let mut conns = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut c = Raw::connect(&base).await;
        c.send(&Raw::get("/health")).await.unwrap();
        let h = c.head().await.unwrap();
        assert_eq!(h.status, 200);
        c.body(&h).await.unwrap();
        conns.push(c);
    }

    // A warm-up burst, then timed series of bursts: a second series only
    // if the first missed the latency target (a busy neighbour on a small
    // machine); every burst of every series is checked in full.
    let mut t = Tally::default();
    burst(&mut conns, &base, &req, 0, &mut t).await;
    t.latencies.clear();
    let mut series = Vec::new();
    for s in 0..ATTEMPTS {
        for b in 0..TIMED {
            burst(&mut conns, &base, &req, 1 + s * TIMED + b, &mut t).await;
        }
        let lat = std::mem::take(&mut t.latencies);
        series.push((
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            percentile(&lat, 100.0),
            lat.len(),
        ));
        if series[s].1 < CLIENT_P99_MS {
            break;
        }
    }
    let bursts = 1 + series.len() * TIMED;
    stop.store(true, Ordering::Release);
    let (max_waiting, max_running) = scraper.await.unwrap();
    let (max_waiting_engine, samples_engine) = sampler.join().unwrap();
    let text = scrape(&reqwest::Client::new(), &base).await;
    let shed = metric_sum(&text, "cardinal_requests_rejected_total");
    let errors = metric_sum(&text, "cardinal_request_errors_total");

    let server_ms: Vec<f64> = String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["status"] == 429)
        .filter_map(|v| v["fields"]["ms"].as_f64())
        .collect();
    let server_p99 = percentile(&server_ms, 99.0);
    let (admitted, rejected) = (t.admitted, t.rejected);
    let series_text: Vec<String> = series
        .iter()
        .map(|(p50, p99, max, n)| {
            format!("p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms over {n}")
        })
        .collect();
    let p99 = series.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    eprintln!(
        "overload: {} requests ({bursts} bursts of {CLIENTS}, the first untimed) with --max-num-seqs {SEQS} --max-queue {QUEUE}: \
         {admitted} admitted (each {TOKENS} tokens, usage checked), {rejected} rejected with 429; \
         rejection latency at the client, per series of {TIMED} bursts: {}; \
         (inside the server: p50 {:.1} ms, p99 {server_p99:.1} ms over {} logged 429s); \
         requests_waiting max {max_waiting} over {} scrapes (engine counter max {max_waiting_engine} over {samples_engine} samples); \
         requests_running max {max_running}; rejected_total {shed}, request_errors_total {errors}; load average {}; {:.1} s",
        bursts * CLIENTS,
        series_text.join("; "),
        percentile(&server_ms, 50.0),
        server_ms.len(),
        scrapes.load(Ordering::Relaxed),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        overall.elapsed().as_secs_f64()
    );
    let failures = t.failures;
    assert!(failures.is_empty(), "failures: {failures:#?}");
    assert_eq!(admitted + rejected, bursts * CLIENTS);
    assert!(
        admitted >= bursts * SEQS,
        "every burst fills the engine's running slots at least"
    );
    assert!(rejected > 0, "the overload was shed");
    // Every 429, the warm-up burst's too, is logged with its time since
    // arrival: the measure. A log format change that hides them
    // fails here instead of passing on no samples.
    assert_eq!(
        server_ms.len(),
        rejected,
        "logged 429s with a time (the rest of the log: {} bytes)",
        logs.lock().unwrap().len()
    );
    assert!(
        server_p99 < 50.0,
        "p99 time from arrival to 429 inside the server {server_p99:.1} ms (limit 50 ms)"
    );
    assert!(
        p99 < CLIENT_P99_MS,
        "p99 rejection latency at the client {p99:.1} ms in the best series (limit {CLIENT_P99_MS} ms)"
    );
    assert!(
        max_waiting <= QUEUE as f64,
        "scraped requests_waiting reached {max_waiting}"
    );
    assert!(
        max_waiting_engine <= QUEUE,
        "engine waiting reached {max_waiting_engine}"
    );
    assert!(max_running <= SEQS as f64);
    assert_eq!(
        shed as usize, rejected,
        "every 429 is counted as a rejection"
    );
    assert_eq!(errors, 0.0, "no request errors");
    assert!(
        scrapes.load(Ordering::Relaxed) > 3,
        "/metrics was scraped during the run"
    );
}

/// A log sink shared with the test.
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
