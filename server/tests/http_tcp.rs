//! The server over real TCP on 127.0.0.1 (tiny-granite): 32 concurrent
//! streams that all complete with correct usage, a client that disconnects
//! mid-stream after which every card's KV returns to 0, a drain (new
//! requests get 503 while in-flight streams finish, then the server
//! returns), and an injected engine panic that ends a stream with one error
//! event and makes /ready fail, and slow or oversized clients (unfinished
//! headers, an unfinished body, huge headers, idle keep-alive) that are cut
//! off. One test function, so the process-wide panic
//! hook cannot disturb another test.

mod http_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardinal_server::serve::{AppState, ServeOptions, serve_on};
use http_support::*;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Server {
    base: String,
    app: App,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(opts: ServeOptions) -> Server {
    let app = app_with(opts);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let state: AppState = app.state.clone();
    let task = tokio::spawn(serve_on(listener, state, async move {
        let _ = rx.await;
    }));
    Server {
        base,
        app,
        stop: Some(tx),
        task,
    }
}

fn chat_body(max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// Streams one chat request to the end; returns the completion tokens.
async fn stream_to_end(client: &reqwest::Client, base: &str, max_tokens: usize) -> u64 {
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_body(max_tokens, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream ends with [DONE]"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    usage["usage"]["completion_tokens"].as_u64().unwrap()
}

async fn kv_drains(app: &App, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if app.engine.kv_in_use().iter().all(|&b| b == 0) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp() {
    let overall = Instant::now();
    let opts = ServeOptions {
        served_model_name: Some("tiny".into()),
        max_num_seqs: 16,
        max_queue: 64,
        drain_timeout: 10.0,
        ..Default::default()
    };
    let mut srv = start(opts).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // 1. 32 concurrent streams all complete with the right usage.
    let t = Instant::now();
    let jobs: Vec<_> = (0..32)
        .map(|_| {
            let (c, b) = (client.clone(), srv.base.clone());
            tokio::spawn(async move { stream_to_end(&c, &b, 24).await })
        })
        .collect();
    for j in jobs {
        assert_eq!(j.await.unwrap(), 24);
    }
    eprintln!(
        "32 streams of 24 tokens: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(kv_drains(&srv.app, Duration::from_secs(2)).await);

    // 2. A client that disconnects mid-stream frees its KV.
    let cancelled_before = srv.app.engine.stats.cancelled.load(Ordering::Relaxed);
    let mut resp = client
        .post(format!("{}/v1/chat/completions", srv.base))
        .json(&chat_body(200, true))
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let kv_while = srv.app.engine.kv_in_use().iter().sum::<usize>();
    drop(resp);
    let t = Instant::now();
    assert!(
        kv_drains(&srv.app, Duration::from_secs(2)).await,
        "KV still in use 2 s after the disconnect: {:?}",
        srv.app.engine.kv_in_use()
    );
    let cancelled = srv.app.engine.stats.cancelled.load(Ordering::Relaxed) - cancelled_before;
    eprintln!(
        "disconnect: KV {kv_while} bytes while streaming, 0 after {:.3} s; engine cancelled {cancelled}",
        t.elapsed().as_secs_f64()
    );
    let scrape = client
        .get(format!("{}/metrics", srv.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    eprintln!(
        "requests_cancelled_total = {}",
        metric(&scrape, "cardinal_requests_cancelled_total")
    );
    // The server keeps serving.
    assert_eq!(stream_to_end(&client, &srv.base, 4).await, 4);

    // 3. An injected engine panic: one error event, then /ready fails.
    // (Done on a second server below so the drain test runs on a healthy one.)

    // 4. Drain: in-flight streams finish, new requests get 503, the server returns.
    let long: Vec<_> = (0..8)
        .map(|_| {
            let (c, b) = (client.clone(), srv.base.clone());
            tokio::spawn(async move { stream_to_end(&c, &b, 200).await })
        })
        .collect();
    while srv.app.state.inflight() < 8 && overall.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let inflight_at_signal = srv.app.state.inflight();
    srv.stop.take().unwrap().send(()).unwrap();
    while !srv.app.state.inner.draining.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let refused = client
        .post(format!("{}/v1/chat/completions", srv.base))
        .json(&chat_body(4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let e: Value = refused.json().await.unwrap();
    assert_eq!(e["error"]["type"], "unavailable_error");
    for j in long {
        assert_eq!(
            j.await.unwrap(),
            200,
            "in-flight streams finish during the drain"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), &mut srv.task)
        .await
        .expect("serve_on returns after the drain")
        .unwrap()
        .unwrap();
    eprintln!("drain: {inflight_at_signal} in flight at the signal, all finished");

    // 3. Engine panic on a fresh server.
    let srv2 = start(ServeOptions {
        served_model_name: Some("tiny".into()),
        ..Default::default()
    })
    .await;
    let mut resp = client
        .post(format!("{}/v1/chat/completions", srv2.base))
        .json(&chat_body(200, true))
        .send()
        .await
        .unwrap();
    let _role = resp.chunk().await.unwrap();
    cardinal_pipeline::engine::INJECT_STEP_PANIC.store(true, Ordering::Release);
    let mut rest = String::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the stream does not hang")
        .unwrap()
    {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    cardinal_pipeline::engine::INJECT_STEP_PANIC.store(false, Ordering::Release);
    let events = sse_data(&rest);
    let errors: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("{\"error\""))
        .collect();
    // The stream may have finished before the hook took effect; when it did not, exactly one error event.
    if srv2.app.engine.stats.failed.load(Ordering::Acquire) {
        assert_eq!(errors.len(), 1, "one error event: {events:?}");
        let e: Value = serde_json::from_str(errors[0]).unwrap();
        assert_eq!(e["error"]["type"], "server_error");
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let ready = client
            .get(format!("{}/ready", srv2.base))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503);
        let next = client
            .post(format!("{}/v1/chat/completions", srv2.base))
            .json(&chat_body(4, false))
            .send()
            .await
            .unwrap();
        assert_eq!(next.status(), 503);
    } else {
        eprintln!("the stream finished before the injected panic took effect");
    }

    // 5. Slow and oversized clients.
    slow_clients().await;
    assert!(overall.elapsed() < Duration::from_secs(60));
}

/// Reads what the server sends until it closes the connection (bounded).
async fn read_until_close(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

async fn slow_clients() {
    use tokio::io::AsyncWriteExt;
    let opts = ServeOptions {
        header_timeout: 0.3,
        body_timeout: 0.3,
        ..Default::default()
    };
    let srv = start(opts).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    // Headers that never finish: the connection is closed.
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let _ = read_until_close(&mut s).await;
    let header_close = t.elapsed();
    assert!(
        header_close < Duration::from_secs(3),
        "slow headers closed after {header_close:?}"
    );
    // A body that never finishes: 408 in the OpenAI shape.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro").await.unwrap();
    let reply = read_until_close(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"error\""));
    // Oversized headers: 431.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let reply = read_until_close(&mut s).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );
    // An idle keep-alive connection is closed too.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = read_until_close(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    eprintln!(
        "slow clients: unfinished headers closed after {:.2} s",
        header_close.as_secs_f64()
    );
}
