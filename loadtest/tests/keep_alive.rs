//! `--no-keep-alive` against a server that drops idle keep-alive connections
//! without saying so, as llama.cpp's llama-server does: it answers without
//! `Connection: close`, then closes the connection instead of answering the
//! next request sent on it. Reusing connections then fails every other
//! request with a connect error; a new connection per request fails none.

mod common;

use cardinal_loadtest::progress::ProgressMode;
use cardinal_loadtest::{Args, Report, run};
use clap::Parser;
use common::read_request;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves one request per connection, keep-alive style, and drops the
/// connection when a second request arrives on it. Returns the URL and the
/// count of accepted connections.
async fn dropping_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Some((_, path, _)) = read_request(&mut sock).await else {
                    return;
                };
                let body = if path == "/v1/completions" {
                    r#"{"id":"c","object":"text_completion","choices":[{"index":0,"text":"a b c","finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}"#
                } else {
                    r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#
                };
                let msg = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(msg.as_bytes()).await;
                // The next request on this connection is never answered.
                let _ = read_request(&mut sock).await;
            });
        }
    });
    (url, conns)
}

async fn run_against(url: &str, extra: &[&str]) -> Report {
    let mut v = vec![
        "cardinal-loadtest",
        "--url",
        url,
        "--model",
        "m",
        "--endpoint",
        "completions",
        "--no-stream",
        "--no-extensions",
        "--no-metrics",
        "--output-tokens",
        "0",
        "--requests",
        "8",
        "--max-consecutive-errors",
        "100",
        "--progress",
        "none",
    ];
    v.extend_from_slice(extra);
    let args = Args::try_parse_from(v).expect("valid flags");
    let (_tx, rx) = watch::channel(false);
    tokio::time::timeout(Duration::from_secs(25), run(args, rx, ProgressMode::Quiet))
        .await
        .expect("run finished within the bound")
        .expect("run started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_keep_alive_survives_a_server_that_drops_idle_connections() {
    let (url, conns) = dropping_server().await;
    let r = run_against(&url, &[]).await;
    let s = &r.levels[0].stats;
    eprintln!(
        "reusing connections: {} ok, {} errors over {} connections",
        s.ok,
        s.errors.total,
        conns.load(Ordering::SeqCst)
    );
    assert!(
        s.errors.total > 0,
        "the server drops reused connections, so some requests must fail"
    );

    let (url, conns) = dropping_server().await;
    let r = run_against(&url, &["--no-keep-alive"]).await;
    let s = &r.levels[0].stats;
    assert_eq!(
        (s.ok, s.errors.total),
        (8, 0),
        "a new connection per request"
    );
    assert!(conns.load(Ordering::SeqCst) >= 8);
}
