//! The real `cardinal` process (tiny-granite, `--port 0`, JSON logs read
//! from stderr). SIGTERM while 16 streams are active: /ready turns 503 at
//! once, a new request gets 503 with `Retry-After` (or, once the listener is
//! closed, a refused connection), every stream either finishes with its full
//! usage or ends with one error event and `[DONE]` by the drain timeout,
//! and the process exits 0. Run twice: with a drain timeout long enough for
//! all to finish, and with one so short that most are cut. Also: binding
//! 0.0.0.0 without `--api-key` logs a clear warning, and the loopback bind
//! does not.

mod http_support;
mod reliability_support;

use std::time::{Duration, Instant};

use reliability_support::*;
use serde_json::Value;

/// How one stream ended.
#[derive(Debug)]
struct Ended {
    summary: StreamSummary,
    at: Instant,
}

async fn stream(client: reqwest::Client, base: String, max_tokens: usize) -> Result<Ended, String> {
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_body(max_tokens, true))
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let summary = read_stream(&mut SseReader::new(resp)).await?;
    Ok(Ended {
        summary,
        at: Instant::now(),
    })
}

/// Runs the SIGTERM scenario; returns (finished, cut) stream counts.
async fn sigterm_during_streams(
    max_num_seqs: usize,
    drain: f64,
    max_tokens: usize,
) -> (usize, usize) {
    let drain_s = drain.to_string();
    let seqs = max_num_seqs.to_string();
    // The real model: the tiny one can finish a 200-token stream before
    // all 16 requests have arrived, and the scenario needs 16 live streams.
    let mut p = Proc::spawn_model(
        &real_model(),
        &["--max-num-seqs", &seqs, "--drain-timeout", &drain_s],
    );
    assert!(p.base.starts_with("http://127.0.0.1:"), "{}", p.base);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    p.wait_ready(&client).await;

    // 16 streams, all with their headers and first event before the signal.
    let streams: Vec<_> = (0..16)
        .map(|_| tokio::spawn(stream(client.clone(), p.base.clone(), max_tokens)))
        .collect();
    let t = Instant::now();
    loop {
        let text = scrape(&client, &p.base).await;
        let active = metric_sum(&text, "cardinal_requests_running")
            + metric_sum(&text, "cardinal_requests_waiting");
        if active >= 16.0 {
            break;
        }
        if let Some(s) = streams.iter().find(|s| s.is_finished()) {
            panic!("a stream ended before the signal: {:?}", s);
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "streams did not start: {text}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let signalled = Instant::now();
    p.term();

    // New work is refused while the streams drain.
    let mut ready = 0;
    while ready != 503 {
        ready = match client.get(format!("{}/ready", p.base)).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 503, // Already closed: nothing more to accept.
        };
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "/ready still {ready}"
        );
    }
    let refused = match client
        .post(format!("{}/v1/chat/completions", p.base))
        .json(&chat_body(4, false))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry = r.headers().contains_key("retry-after");
            let v: Value = r.json().await.unwrap_or_default();
            assert_eq!(status, 503, "{v}");
            assert!(retry, "503 carries Retry-After");
            assert_eq!(v["error"]["type"], "unavailable_error", "{v}");
            "503"
        }
        Err(e) => {
            assert!(e.is_connect(), "refused, not broken: {e}");
            "connection refused"
        }
    };

    let (mut finished, mut cut) = (0, 0);
    let mut last_end = signalled;
    for s in streams {
        let e = s
            .await
            .unwrap()
            .expect("a stream started before the signal");
        let sm = &e.summary;
        assert!(sm.done, "every stream ends with [DONE]: {sm:?}");
        if sm.errors.is_empty() {
            assert_eq!(sm.completion_tokens, Some(max_tokens as u64), "{sm:?}");
            finished += 1;
        } else {
            assert_eq!(sm.errors.len(), 1, "one error event: {sm:?}");
            assert_eq!(sm.errors[0]["error"]["type"], "unavailable_error");
            cut += 1;
        }
        last_end = last_end.max(e.at);
    }
    let streams_done = last_end - signalled;
    let status = p
        .wait_exit(Duration::from_secs_f64(drain + 10.0))
        .expect("the process exits after the drain");
    let exited = signalled.elapsed();
    let log = p.lines().join("\n");
    eprintln!(
        "SIGTERM with 16 active streams (--max-num-seqs {max_num_seqs}, {max_tokens} tokens each, \
         --drain-timeout {drain}): new request got {refused}; {finished} finished in full, {cut} ended \
         with an error event; last stream ended {:.2} s after the signal; exit {:?} after {:.2} s",
        streams_done.as_secs_f64(),
        status.code(),
        exited.as_secs_f64()
    );
    assert_eq!(status.code(), Some(0), "exit code; log:\n{log}");
    assert!(
        streams_done < Duration::from_secs_f64(drain + 2.5),
        "streams ended by the drain timeout"
    );
    assert!(log.contains("shutdown signal received") && log.contains("server stopped"));
    assert!(
        !log.contains("non-loopback"),
        "no exposure warning on 127.0.0.1"
    );
    assert_eq!(finished + cut, 16);
    (finished, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_active_streams_and_exits_0() {
    let (finished, cut) = sigterm_during_streams(4, 30.0, 64).await;
    assert_eq!(
        (finished, cut),
        (16, 0),
        "a long drain lets every stream finish"
    );
    // One sequence at a time: 16 x 200 tokens take seconds (~3 ms a token
    // on one thread), so a 0.05 s drain must cut some.
    let (finished, cut) = sigterm_during_streams(1, 0.05, 200).await;
    assert!(
        cut > 0,
        "a 0.05 s drain cuts the queued streams ({finished} finished)"
    );
}

#[test]
fn non_loopback_bind_without_a_key_warns() {
    // 0.0.0.0 only for as long as it takes to see the warning: no request
    // is sent, and the process is stopped at once.
    let mut p = Proc::spawn(&["--host", "0.0.0.0"]);
    let warned = p.wait_log(Duration::from_secs(10), |m| m.contains("non-loopback"));
    p.term();
    let status = p.wait_exit(Duration::from_secs(15));
    let warning = p
        .records()
        .into_iter()
        .find(|r| {
            r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("non-loopback"))
        })
        .unwrap_or_default();
    eprintln!("0.0.0.0 without --api-key: {warning}");
    let msg = warned.expect("a warning about the exposed address");
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert!(
        msg.contains("0.0.0.0") && msg.contains("--api-key"),
        "{msg}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}
