//! A scripted OpenAI-compatible stub server for the integration tests,
//! written on a raw tokio `TcpListener` so that it can misbehave on purpose:
//! exact delays between SSE chunks, a known number of tokens per chunk,
//! optional continuous usage, `/tokenize` and `/metrics`, and injected
//! failures (HTTP 500, malformed SSE, cut or unterminated streams, hangs,
//! in-stream errors, and dying mid-run).

#![allow(dead_code)]

use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What one completion request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// The scripted stream, ending with a finish reason, usage and [DONE].
    Ok,
    /// HTTP 500 with an OpenAI error body.
    Status500,
    /// A data line whose payload is not JSON.
    Malformed,
    /// Two content chunks, then the TCP connection is dropped mid-body.
    CutBeforeDone,
    /// The stream ends cleanly (terminating HTTP chunk) without [DONE].
    EndWithoutDone,
    /// Headers and the role chunk, then silence.
    Hang,
    /// An error object inside the stream.
    StreamError,
    /// [DONE] arrives but no chunk had a finish_reason.
    NoFinishReason,
}

/// The script.
#[derive(Debug, Clone)]
pub struct Script {
    /// Delay from request to the first content chunk (the role chunk is sent
    /// at once).
    pub ttft_ms: u64,
    /// Delay between content chunks.
    pub gap_ms: u64,
    /// Content chunks per response.
    pub chunks: u64,
    /// Tokens in the first content chunk.
    pub first_chunk_tokens: u64,
    /// Tokens in every later content chunk.
    pub tokens_per_chunk: u64,
    /// Put usage on every chunk (vLLM continuous usage stats).
    pub continuous_usage: bool,
    /// Send the final usage chunk when include_usage is asked.
    pub final_usage: bool,
    /// Cycled over completion requests.
    pub behaviors: Vec<Behavior>,
    /// Serve POST /tokenize.
    pub tokenize: bool,
    /// Serve GET /metrics.
    pub metrics: bool,
    /// Die when this many completion requests have arrived: that request
    /// and all in-flight ones are cut, later connections are refused.
    pub die_at_request: Option<usize>,
    /// Answer 400 to requests carrying the vLLM extensions, as a strict
    /// server would.
    pub reject_extensions: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            ttft_ms: 50,
            gap_ms: 40,
            chunks: 6,
            first_chunk_tokens: 1,
            tokens_per_chunk: 2,
            continuous_usage: true,
            final_usage: true,
            behaviors: vec![Behavior::Ok],
            tokenize: true,
            metrics: true,
            die_at_request: None,
            reject_extensions: false,
        }
    }
}

impl Script {
    /// Output tokens of one Ok response.
    pub fn output_tokens(&self) -> u64 {
        self.first_chunk_tokens + self.tokens_per_chunk * (self.chunks - 1)
    }
}

/// Stub tokenizer: 1.25 tokens per whitespace-separated word, rounded down.
pub fn stub_token_count(text: &str) -> u64 {
    let w = text.split_whitespace().count() as u64;
    w + w / 4
}

#[derive(Debug, Default)]
struct State {
    completions: AtomicUsize,
    generation_tokens: AtomicU64,
    ttft_count: AtomicU64,
    bodies: Mutex<Vec<Value>>,
}

/// A running stub.
#[derive(Debug)]
pub struct Stub {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    script: Arc<Script>,
    state: Arc<State>,
    dead: watch::Sender<bool>,
}

impl Stub {
    /// Starts a stub on an ephemeral loopback port.
    pub async fn start(script: Script) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let script = Arc::new(script);
        let state = Arc::new(State::default());
        let (dead, dead_rx) = watch::channel(false);
        let (s2, st2, dead2) = (script.clone(), state.clone(), dead.clone());
        tokio::spawn(async move {
            let mut dead_rx = dead_rx;
            loop {
                let sock = tokio::select! {
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => break },
                    _ = dead_rx.wait_for(|d| *d) => break,
                };
                let (s3, st3, d3) = (s2.clone(), st2.clone(), dead2.clone());
                tokio::spawn(async move {
                    let mut drx = d3.subscribe();
                    if *drx.borrow() {
                        return;
                    }
                    tokio::select! {
                        _ = serve(sock, s3, st3, d3) => {}
                        _ = drx.wait_for(|d| *d) => {} // dropping the socket cuts it
                    }
                });
            }
            // The listener is dropped here: new connections are refused.
        });
        Stub {
            url,
            script,
            state,
            dead,
        }
    }

    /// Completion requests received.
    pub fn completions(&self) -> usize {
        self.state.completions.load(Ordering::SeqCst)
    }

    /// Bodies of the completion requests received.
    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }

    /// Kills the stub now.
    pub fn kill(&self) {
        let _ = self.dead.send(true);
    }
}

/// A URL on which nothing listens.
pub async fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

pub async fn read_request(sock: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Some((method, path, body))
}

async fn respond(sock: &mut TcpStream, status: &str, ctype: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(msg.as_bytes()).await;
    let _ = sock.shutdown().await;
}

async fn chunk(sock: &mut TcpStream, data: &str) -> bool {
    let payload = format!("{data}\n\n");
    let framed = format!("{:x}\r\n{payload}\r\n", payload.len());
    sock.write_all(framed.as_bytes()).await.is_ok()
}

async fn event(sock: &mut TcpStream, v: &Value) -> bool {
    chunk(sock, &format!("data: {v}")).await
}

fn prompt_text(body: &Value) -> String {
    if let Some(p) = body.get("prompt").and_then(Value::as_str) {
        return p.to_string();
    }
    body.get("messages")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|x| x.get("content").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

async fn serve(
    mut sock: TcpStream,
    script: Arc<Script>,
    state: Arc<State>,
    dead: watch::Sender<bool>,
) {
    let _ = sock.set_nodelay(true);
    let Some((method, path, body)) = read_request(&mut sock).await else {
        return;
    };
    match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => {
            let b = json!({"object": "list", "data": [{"id": "stub-model", "object": "model"}]});
            respond(&mut sock, "200 OK", "application/json", &b.to_string()).await;
        }
        ("POST", "/tokenize") if script.tokenize => {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let n = stub_token_count(v.get("prompt").and_then(Value::as_str).unwrap_or(""));
            let b = json!({"tokens": (0..n).collect::<Vec<u64>>(), "count": n});
            respond(&mut sock, "200 OK", "application/json", &b.to_string()).await;
        }
        ("GET", "/metrics") if script.metrics => {
            let gen_tokens = state.generation_tokens.load(Ordering::SeqCst);
            let ttft_n = state.ttft_count.load(Ordering::SeqCst);
            let text = format!(
                "# HELP cardinal_generation_tokens_total Tokens generated.\n\
                 # TYPE cardinal_generation_tokens_total counter\n\
                 cardinal_generation_tokens_total{{model_name=\"stub-model\"}} {gen_tokens}\n\
                 # TYPE cardinal_energy_joules_total counter\n\
                 cardinal_energy_joules_total{{model_name=\"stub-model\",source=\"cards_modeled\"}} {}\n\
                 cardinal_energy_joules_total{{model_name=\"stub-model\",source=\"host\"}} {}\n\
                 # TYPE cardinal_time_to_first_token_seconds histogram\n\
                 cardinal_time_to_first_token_seconds_bucket{{model_name=\"stub-model\",le=\"+Inf\"}} {ttft_n}\n\
                 cardinal_time_to_first_token_seconds_sum{{model_name=\"stub-model\"}} {}\n\
                 cardinal_time_to_first_token_seconds_count{{model_name=\"stub-model\"}} {ttft_n}\n",
                gen_tokens as f64 * 0.5,
                gen_tokens as f64 * 2.0,
                ttft_n as f64 * script.ttft_ms as f64 / 1000.0,
            );
            respond(&mut sock, "200 OK", "text/plain; version=0.0.4", &text).await;
        }
        ("POST", "/v1/chat/completions" | "/v1/completions") => {
            let n = state.completions.fetch_add(1, Ordering::SeqCst) + 1;
            if script.die_at_request.is_some_and(|k| n >= k) {
                let _ = dead.send(true);
                return;
            }
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            state.bodies.lock().unwrap().push(v.clone());
            let behavior = script.behaviors[(n - 1) % script.behaviors.len()];
            let chat = path == "/v1/chat/completions";
            let extension = v.get("ignore_eos").is_some()
                || v.get("min_tokens").is_some()
                || v["stream_options"].get("continuous_usage_stats").is_some();
            if script.reject_extensions && extension {
                let b = json!({"error": {"message": "unknown field", "type": "invalid_request_error", "param": "ignore_eos", "code": 400}});
                respond(
                    &mut sock,
                    "400 Bad Request",
                    "application/json",
                    &b.to_string(),
                )
                .await;
            } else if v["stream"] == json!(false) {
                whole_completion(&mut sock, &script, &state, &v, chat).await;
            } else {
                stream_completion(&mut sock, &script, &state, &v, behavior, chat).await;
            }
        }
        _ => respond(&mut sock, "404 Not Found", "text/plain", "not found").await,
    }
}

async fn whole_completion(
    sock: &mut TcpStream,
    script: &Script,
    state: &State,
    req: &Value,
    chat: bool,
) {
    tokio::time::sleep(Duration::from_millis(
        script.ttft_ms + script.gap_ms * (script.chunks - 1),
    ))
    .await;
    let n = script.output_tokens();
    state.generation_tokens.fetch_add(n, Ordering::SeqCst);
    let text = "tok ".repeat(n as usize);
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
    } else {
        json!({"index": 0, "text": text, "finish_reason": "length"})
    };
    let p = stub_token_count(&prompt_text(req));
    let b = json!({"id": "cmpl-stub", "object": "chat.completion", "choices": [choice],
                   "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}});
    respond(sock, "200 OK", "application/json", &b.to_string()).await;
}

async fn stream_completion(
    sock: &mut TcpStream,
    script: &Script,
    state: &State,
    req: &Value,
    behavior: Behavior,
    chat: bool,
) {
    if behavior == Behavior::Status500 {
        let b =
            json!({"error": {"message": "injected failure", "type": "server_error", "code": 500}});
        respond(
            sock,
            "500 Internal Server Error",
            "application/json",
            &b.to_string(),
        )
        .await;
        return;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let prompt_tokens = stub_token_count(&prompt_text(req));
    let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    let continuous = script.continuous_usage && include_usage;
    let usage = |completion: u64| {
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion,
               "total_tokens": prompt_tokens + completion})
    };
    let wrap = |piece: Value, finish: Option<&str>, completion: Option<u64>| {
        let choice = if chat {
            json!({"index": 0, "delta": piece, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": piece.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish})
        };
        let mut c = json!({"id": "cmpl-stub", "object": "chat.completion.chunk", "model": "stub-model",
                           "choices": [choice]});
        c["usage"] = match completion {
            Some(n) if continuous => usage(n),
            _ => Value::Null,
        };
        c
    };
    if !event(
        sock,
        &wrap(json!({"role": "assistant", "content": ""}), None, Some(0)),
    )
    .await
    {
        return;
    }
    if behavior == Behavior::Hang {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    if behavior == Behavior::Malformed {
        tokio::time::sleep(Duration::from_millis(script.ttft_ms)).await;
        let _ = chunk(sock, "data: {\"choices\": [ this is not json").await;
        tokio::time::sleep(Duration::from_millis(script.gap_ms)).await;
        let _ = chunk(sock, "data: [DONE]").await;
        let _ = sock.write_all(b"0\r\n\r\n").await;
        return;
    }
    if behavior == Behavior::StreamError {
        tokio::time::sleep(Duration::from_millis(script.ttft_ms)).await;
        let _ = event(
            sock,
            &json!({"error": {"message": "injected in-stream error", "type": "server_error"}}),
        )
        .await;
        let _ = chunk(sock, "data: [DONE]").await;
        let _ = sock.write_all(b"0\r\n\r\n").await;
        return;
    }
    let mut sent = 0u64;
    state.ttft_count.fetch_add(1, Ordering::SeqCst);
    for i in 0..script.chunks {
        let delay = if i == 0 {
            script.ttft_ms
        } else {
            script.gap_ms
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let k = if i == 0 {
            script.first_chunk_tokens
        } else {
            script.tokens_per_chunk
        };
        sent += k;
        let text = "tok ".repeat(k as usize);
        if !event(sock, &wrap(json!({"content": text}), None, Some(sent))).await {
            return;
        }
        state.generation_tokens.fetch_add(k, Ordering::SeqCst);
        if behavior == Behavior::CutBeforeDone && i == 1 {
            return; // drop the socket without the terminating chunk
        }
    }
    if behavior == Behavior::EndWithoutDone {
        let _ = sock.write_all(b"0\r\n\r\n").await;
        return;
    }
    let finish = if behavior == Behavior::NoFinishReason {
        None
    } else {
        Some("length")
    };
    let _ = event(sock, &wrap(json!({}), finish, Some(sent))).await;
    if include_usage && script.final_usage {
        let u = json!({"id": "cmpl-stub", "object": "chat.completion.chunk", "model": "stub-model",
                       "choices": [], "usage": usage(sent)});
        let mut u = u;
        u["usage"]["cardinal"] = json!({"cards_modeled_joules": sent as f64 * 0.5,
                                        "host": {"joules": sent as f64 * 2.0, "source": "rapl"}});
        let _ = event(sock, &u).await;
    }
    let _ = chunk(sock, "data: [DONE]").await;
    let _ = sock.write_all(b"0\r\n\r\n").await;
}
