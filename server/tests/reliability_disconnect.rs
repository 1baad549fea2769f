//! Disconnect storm over real TCP on 127.0.0.1 (tiny-granite on two cards,
//! in process): 200 streaming chat requests of 200 tokens, 40 at a time,
//! each closed by its client after a seeded random number of events (0 to
//! 99, some after a further pause of a few milliseconds), so every one
//! ends before it finishes, some while still queued. Within 2 s of the last
//! close, every card's `cardinal_kv_cache_usage_ratio` and
//! `cardinal_requests_running` (and `_waiting`) must be 0 on /metrics,
//! `cardinal_requests_cancelled_total` must have grown by exactly 200 (as
//! must the engine's own count), and the next request must be served in
//! full. Prints the figures.

mod http_support;
mod reliability_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardinal_server::serve::AppState;
use cardinal_server::setup::{self, ModelArgs};
use http_support::{App, tiny_granite};
use reliability_support::*;
use tokio::sync::Mutex;

const REQUESTS: usize = 200;
const CONCURRENT: usize = 40;
const MAX_TOKENS: usize = 200;
const SEED: u64 = 0x5EED_D15C;

/// Tiny-granite split over two cards.
fn two_card_app() -> App {
    let opts = opts(16, 256);
    let args = ModelArgs {
        cards: Some(2),
        ..tiny_granite()
    };
    let rt = setup::start(&args, &opts.limits(), &mut |_| {}).expect("tiny-granite on 2 cards");
    assert_eq!(rt.plan.cards, 2);
    let engine = rt.engine.clone();
    let state = AppState::new(opts, rt);
    App {
        router: cardinal_server::serve::router(state.clone()),
        engine,
        state,
    }
}

/// One request closed after `after` events (and `pause` more): returns the
/// instant of the close.
async fn closed_early(base: String, after: u64, pause: Duration) -> Result<Instant, String> {
    let mut conn = Raw::connect(&base).await;
    conn.send(&Raw::post(
        "/v1/chat/completions",
        &chat_body(MAX_TOKENS, true),
    ))
    .await?;
    let head = conn.head().await?;
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    let mut r = SseReader::from_source(Source::Raw(conn));
    for _ in 0..after {
        match r.next().await? {
            Some(d) if d == "[DONE]" || d.contains("finish_reason\":\"length") => {
                return Err(format!("finished before event {after}: {d}"));
            }
            Some(_) => {}
            None => return Err("the stream ended early".into()),
        }
    }
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    drop(r);
    Ok(Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_storm_frees_everything() {
    let overall = Instant::now();
    let srv = Local::start(two_card_app());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let before = scrape(&client, &srv.base).await;
    let cancelled_before = metric_sum(&before, "cardinal_requests_cancelled_total");
    let completed_before = metric_sum(&before, "cardinal_requests_total");
    let engine_before = srv.app.engine.stats.cancelled.load(Ordering::Relaxed);
    let finished_before = srv.app.engine.stats.finished.load(Ordering::Relaxed);

    // The plan: a seeded close point per request.
    let mut rng = Rng::new(SEED);
    let plan: Vec<(u64, Duration)> = (0..REQUESTS)
        .map(|_| {
            let after = rng.below(100);
            let pause = match rng.below(4) {
                0 => Duration::from_millis(rng.below(5)),
                _ => Duration::ZERO,
            };
            (after, pause)
        })
        .collect();
    let queue = Arc::new(Mutex::new(plan.clone()));
    let workers: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (queue, base) = (queue.clone(), srv.base.clone());
            tokio::spawn(async move {
                let mut closes = Vec::new();
                loop {
                    let Some((after, pause)) = queue.lock().await.pop() else {
                        return Ok(closes);
                    };
                    let closed = tokio::time::timeout(
                        Duration::from_secs(30),
                        closed_early(base.clone(), after, pause),
                    )
                    .await
                    .map_err(|_| "a request hung".to_string())??;
                    closes.push(closed);
                }
            })
        })
        .collect();
    let mut closes = Vec::new();
    for w in workers {
        let r: Result<Vec<Instant>, String> = w.await.unwrap();
        closes.extend(r.expect("every request streams until its client closes it"));
    }
    assert_eq!(closes.len(), REQUESTS);
    let last_close = closes.iter().max().copied().unwrap();
    let storm = overall.elapsed();

    // Everything returns to zero, and every close is counted.
    let mut polls = 0;
    let (freed_after, text) = loop {
        let text = scrape(&client, &srv.base).await;
        polls += 1;
        let kv = samples(&text, "cardinal_kv_cache_usage_ratio");
        let running = metric_sum(&text, "cardinal_requests_running");
        let waiting = metric_sum(&text, "cardinal_requests_waiting");
        let cancelled = metric_sum(&text, "cardinal_requests_cancelled_total") - cancelled_before;
        let completed = metric_sum(&text, "cardinal_requests_total") - completed_before;
        let zero =
            kv.len() == 2 && kv.iter().all(|s| s.1 == 0.0) && running == 0.0 && waiting == 0.0;
        if zero && cancelled + completed >= REQUESTS as f64 {
            break (last_close.elapsed(), text);
        }
        assert!(
            last_close.elapsed() < Duration::from_secs(2),
            "2 s after the last close: kv {kv:?}, running {running}, waiting {waiting}, cancelled {cancelled}, completed {completed}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cancelled = metric_sum(&text, "cardinal_requests_cancelled_total") - cancelled_before;
    // The tiny model can finish a stream, and the server send all of it,
    // before the client reads far enough to close: such a stream counts as
    // completed (requests_total), not cancelled. Every stream counts once.
    let completed = metric_sum(&text, "cardinal_requests_total") - completed_before;
    let engine_cancelled = srv.app.engine.stats.cancelled.load(Ordering::Relaxed) - engine_before;
    // A stream the engine completed before its client closed it (its events
    // wait in the stream's buffer) ends as finished there, not cancelled.
    let engine_finished = srv.app.engine.stats.finished.load(Ordering::Relaxed) - finished_before;
    let kv_used = srv.app.engine.kv_in_use();
    let mean_after = plan.iter().map(|p| p.0).sum::<u64>() as f64 / REQUESTS as f64;

    // The next request is served in full.
    let resp = client
        .post(format!("{}/v1/chat/completions", srv.base))
        .json(&chat_body(16, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let s = read_stream(&mut SseReader::new(resp)).await.unwrap();
    assert!(s.done && s.errors.is_empty(), "{s:?}");
    assert_eq!(s.completion_tokens, Some(16));

    eprintln!(
        "disconnect storm: {REQUESTS} streams of {MAX_TOKENS} tokens ({CONCURRENT} at a time) closed after \
         0-99 events (mean {mean_after:.1}) in {:.2} s; 2 cards' kv_cache_usage_ratio, requests_running \
         and requests_waiting all 0 {:.0} ms after the last close ({polls} scrapes); \
         requests_cancelled_total +{cancelled}, requests_total +{completed} (engine: cancelled +{engine_cancelled}, completed \
         before the close +{engine_finished}); KV bytes now {kv_used:?}; \
         next request served ({} tokens); {:.1} s in all",
        storm.as_secs_f64(),
        freed_after.as_secs_f64() * 1e3,
        s.completion_tokens.unwrap(),
        overall.elapsed().as_secs_f64()
    );
    assert!(freed_after < Duration::from_secs(2));
    assert_eq!(
        cancelled + completed,
        REQUESTS as f64,
        "every stream is counted once: cancelled or completed"
    );
    assert!(
        cancelled >= REQUESTS as f64 * 0.5,
        "most streams are closed while the engine still runs them ({cancelled} of {REQUESTS})"
    );
    assert_eq!(
        engine_cancelled + engine_finished,
        REQUESTS as u64,
        "the engine ends every stream once: cancelled or completed"
    );
    assert!(kv_used.iter().all(|&b| b == 0));
}
