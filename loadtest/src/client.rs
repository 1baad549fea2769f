//! HTTP to the target: one measured completion request ([`Target::send`]),
//! and the helper calls around a run (`/v1/models`, `/tokenize`, `/metrics`,
//! and the probe that checks whether the server accepts the vLLM length
//! extensions). Every call is bounded by a timeout.

use crate::chunk::{TokenCounter, parse_chunk, spread_itl_ms};
use crate::cli::Endpoint;
use crate::prom::{self, Scrape};
use crate::record::{ErrorClass, RequestRecord};
use crate::sse::SseParser;
use crate::workload::{Prompt, PromptBody};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Timeout for helper calls (models, tokenize, metrics).
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// What is sent, and where.
#[derive(Debug, Clone)]
pub struct Target {
    http: reqwest::Client,
    base: String,
    metrics_url: String,
    api_key: Option<String>,
    /// Model name sent in every request.
    pub model: String,
    /// Endpoint loaded.
    pub endpoint: Endpoint,
    /// Streamed responses.
    pub stream: bool,
    /// `max_tokens` (None: the server decides).
    pub max_tokens: Option<u32>,
    /// Send `min_tokens` = `ignore_eos` forcing (with `max_tokens`).
    pub force_length: bool,
    /// Ask for `stream_options.continuous_usage_stats`.
    pub continuous_usage: bool,
    /// `temperature` sent with every request (None: not sent).
    pub temperature: Option<f32>,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// The `/tokenize` body key.
    tokenize_key: &'static str,
}

/// The error and its sources, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Target {
    /// A target with no model yet (see [`Target::resolve_model`]). Without
    /// `keep_alive`, every request opens a new connection.
    pub fn new(
        base: String,
        metrics_url: Option<String>,
        api_key: Option<String>,
        timeout: Duration,
        keep_alive: bool,
    ) -> Result<Self> {
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true);
        if !keep_alive {
            http = http.pool_max_idle_per_host(0);
        }
        let http = http.build().context("building the HTTP client")?;
        let metrics_url = metrics_url.unwrap_or_else(|| format!("{base}/metrics"));
        Ok(Self {
            http,
            base,
            metrics_url,
            api_key,
            model: String::new(),
            endpoint: Endpoint::Chat,
            stream: true,
            max_tokens: None,
            force_length: false,
            continuous_usage: false,
            temperature: None,
            timeout,
            tokenize_key: "prompt",
        })
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value> {
        let fut = async {
            let resp = self
                .auth(self.http.get(url))
                .send()
                .await
                .map_err(|e| anyhow!(chain(&e)))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| anyhow!(chain(&e)))?;
            if !status.is_success() {
                bail!("HTTP {status}");
            }
            serde_json::from_slice(&body).context("response is not JSON")
        };
        tokio::time::timeout(HELPER_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("timed out after {HELPER_TIMEOUT:?}"))?
    }

    /// The first model id from `GET /v1/models`.
    pub async fn first_model(&self) -> Result<String> {
        let url = format!("{}/v1/models", self.base);
        let v = self
            .get_json(&url)
            .await
            .with_context(|| format!("GET {url}"))?;
        v.get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("GET {url}: no model in `data`"))
    }

    /// Token count of `text` from `POST /tokenize`: the body is
    /// `{"prompt": text}` (Cardinal, vLLM), or `{"content": text}` (llama.cpp)
    /// once [`Target::detect_tokenize`] found that shape; the answer is
    /// `{"count": n}` or `{"tokens": [...]}`. `None` if the server has no
    /// such endpoint or it fails.
    pub async fn tokenize(&self, text: &str) -> Option<u64> {
        let url = format!("{}/tokenize", self.base);
        let body = json!({ self.tokenize_key: text });
        let fut = async {
            let resp = self
                .auth(self.http.post(&url))
                .json_body(&body)
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let v: Value = serde_json::from_slice(&resp.bytes().await.ok()?).ok()?;
            v.get("count").and_then(Value::as_u64).or_else(|| {
                v.get("tokens")
                    .and_then(Value::as_array)
                    .map(|t| t.len() as u64)
            })
        };
        tokio::time::timeout(HELPER_TIMEOUT, fut)
            .await
            .ok()
            .flatten()
    }

    /// Finds which `/tokenize` body the server takes, trying `prompt` then
    /// `content`; returns whether one works.
    pub async fn detect_tokenize(&mut self) -> bool {
        for key in ["prompt", "content"] {
            self.tokenize_key = key;
            if self.tokenize("hello world").await.is_some() {
                return true;
            }
        }
        self.tokenize_key = "prompt";
        false
    }

    /// Scrapes the metrics endpoint; `None` if absent or unreachable.
    pub async fn scrape(&self) -> Option<Scrape> {
        let fut = async {
            let resp = self
                .auth(self.http.get(&self.metrics_url))
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let text = String::from_utf8_lossy(&resp.bytes().await.ok()?).into_owned();
            let s = prom::parse(&text);
            (!s.samples.is_empty()).then_some(s)
        };
        tokio::time::timeout(HELPER_TIMEOUT, fut)
            .await
            .ok()
            .flatten()
    }

    /// The JSON request body for `prompt`.
    pub fn body(&self, prompt: &Prompt) -> Value {
        let (key, value) = prompt.request_field(self.endpoint);
        let mut b = json!({ "model": self.model, key: value, "stream": self.stream });
        if self.stream {
            let mut opts = json!({"include_usage": true});
            if self.continuous_usage {
                opts["continuous_usage_stats"] = json!(true);
            }
            b["stream_options"] = opts;
        }
        if let Some(t) = self.temperature {
            b["temperature"] = json!(t);
        }
        if let Some(n) = self.max_tokens {
            b["max_tokens"] = json!(n);
            if self.force_length {
                b["min_tokens"] = json!(n);
                b["ignore_eos"] = json!(true);
            }
        }
        b
    }

    fn url(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => format!("{}/v1/chat/completions", self.base),
            Endpoint::Completions => format!("{}/v1/completions", self.base),
        }
    }

    /// Sends one request and measures it. Never takes longer than the
    /// timeout (plus scheduling slack).
    pub async fn send(&self, prompt: &Prompt) -> RequestRecord {
        let start = Instant::now();
        let mut rec = match tokio::time::timeout(self.timeout, self.exchange(prompt, start)).await {
            Ok(r) => r,
            Err(_) => RequestRecord::failed(
                ErrorClass::Timeout,
                None,
                format!("no complete response within {:?}", self.timeout),
            ),
        };
        if rec.e2e.is_zero() {
            rec.e2e = start.elapsed();
        }
        if rec.input_tokens.is_none() {
            rec.input_tokens = prompt.tokens;
        }
        rec
    }

    async fn exchange(&self, prompt: &Prompt, start: Instant) -> RequestRecord {
        let req = self
            .auth(self.http.post(self.url()))
            .json_body(&self.body(prompt));
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return RequestRecord::failed(ErrorClass::Connect, None, chain(&e)),
        };
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return RequestRecord::failed(
                ErrorClass::HttpStatus,
                Some(status.as_u16()),
                format!("HTTP {status}: {text}"),
            );
        }
        if self.stream {
            read_stream(resp, start).await
        } else {
            read_whole(resp, start).await
        }
    }

    /// Sends a short request with the current extension settings and, if
    /// the server rejects it with 400 or 422, retries without
    /// `continuous_usage_stats`, then without `min_tokens`/`ignore_eos`.
    /// Returns the settings the server accepts (apply them with
    /// [`Target::apply_probe`]) and notes for the report. `self` is not
    /// changed, so the probe can be abandoned safely.
    pub async fn probe_extensions(&self) -> Probe {
        let mut t = self.clone();
        t.max_tokens = t.max_tokens.map(|n| n.min(4));
        let prompt = Prompt {
            body: PromptBody::Text("Say hello.".to_string()),
            tokens: None,
        };
        let mut notes = Vec::new();
        loop {
            let rec = t.send(&prompt).await;
            let rejected = rec
                .error
                .as_ref()
                .is_some_and(|e| matches!(e.status, Some(400 | 422)));
            if !rejected {
                if let Some(e) = &rec.error {
                    notes.push(format!(
                        "extension probe failed ({}: {}); extensions kept",
                        e.class.name(),
                        e.detail
                    ));
                }
                break;
            }
            if t.continuous_usage {
                t.continuous_usage = false;
                notes.push("server rejected stream_options.continuous_usage_stats; chunks count as one token each for ITL".into());
            } else if t.force_length {
                t.force_length = false;
                notes.push("server rejected min_tokens/ignore_eos: output length is not forced (max_tokens only)".into());
            } else {
                notes.push(format!(
                    "probe request rejected even without extensions: {}",
                    rec.error.map(|e| e.detail).unwrap_or_default()
                ));
                break;
            }
        }
        Probe {
            continuous_usage: t.continuous_usage,
            force_length: t.force_length,
            notes,
        }
    }

    /// Adopts what the probe found the server accepts.
    pub fn apply_probe(&mut self, p: &Probe) {
        self.continuous_usage = p.continuous_usage;
        self.force_length = p.force_length;
    }
}

/// What [`Target::probe_extensions`] found.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `continuous_usage_stats` accepted.
    pub continuous_usage: bool,
    /// `min_tokens`/`ignore_eos` accepted.
    pub force_length: bool,
    /// What the report should say.
    pub notes: Vec<String>,
}

/// `RequestBuilder::json` needs reqwest's `json` feature; this does the same
/// with serde_json directly.
trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(v.to_string())
    }
}

fn finish_record(counter: &TokenCounter, e2e: Duration) -> RequestRecord {
    let (tokens, from_usage) = counter.output_tokens();
    RequestRecord {
        ttft: counter.ttft(),
        e2e,
        itl_ms: spread_itl_ms(&counter.events),
        output_tokens: tokens,
        tokens_from_usage: from_usage,
        input_tokens: counter.prompt_tokens(),
        continuous_usage: counter.continuous_usage,
        finish_reason: counter.finish_reason.clone(),
        usage_extension: counter.usage_extension(),
        ..RequestRecord::default()
    }
}

fn fail_at(class: ErrorClass, detail: impl Into<String>, start: Instant) -> RequestRecord {
    let mut r = RequestRecord::failed(class, None, detail);
    r.e2e = start.elapsed();
    r
}

async fn read_stream(mut resp: reqwest::Response, start: Instant) -> RequestRecord {
    let mut parser = SseParser::new();
    let mut counter = TokenCounter::new();
    let mut done_at: Option<Duration> = None;
    'read: loop {
        let (events, at, eof) = match resp.chunk().await {
            Ok(Some(bytes)) => {
                let at = start.elapsed();
                match parser.push(&bytes) {
                    Ok(ev) => (ev, at, false),
                    Err(e) => return fail_at(ErrorClass::MalformedSse, e.0, start),
                }
            }
            Ok(None) => match parser.finish() {
                Ok(ev) => (ev.into_iter().collect::<Vec<_>>(), start.elapsed(), true),
                Err(e) => return fail_at(ErrorClass::MalformedSse, e.0, start),
            },
            Err(e) => {
                return fail_at(
                    ErrorClass::EarlyEnd,
                    format!("stream broke before [DONE]: {}", chain(&e)),
                    start,
                );
            }
        };
        for ev in events {
            let data = ev.data.trim();
            if data == "[DONE]" {
                done_at = Some(at);
                break 'read;
            }
            let info = match parse_chunk(data) {
                Ok(i) => i,
                Err(msg) => return fail_at(ErrorClass::MalformedSse, msg, start),
            };
            if let Some(msg) = &info.error {
                return fail_at(ErrorClass::StreamError, msg.clone(), start);
            }
            counter.on_chunk(at, &info);
        }
        if eof {
            break;
        }
    }
    let Some(e2e) = done_at else {
        return fail_at(
            ErrorClass::EarlyEnd,
            "stream ended without data: [DONE]",
            start,
        );
    };
    if counter.finish_reason.is_none() {
        return fail_at(
            ErrorClass::EarlyEnd,
            "[DONE] without any finish_reason",
            start,
        );
    }
    // Let the connection return to the pool if the body ends promptly.
    let _ = tokio::time::timeout(Duration::from_millis(50), async {
        while let Ok(Some(_)) = resp.chunk().await {}
    })
    .await;
    finish_record(&counter, e2e)
}

async fn read_whole(resp: reqwest::Response, start: Instant) -> RequestRecord {
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return fail_at(
                ErrorClass::EarlyEnd,
                format!("body broke: {}", chain(&e)),
                start,
            );
        }
    };
    let e2e = start.elapsed();
    let text = String::from_utf8_lossy(&body);
    let info = match parse_chunk(&text) {
        Ok(i) => i,
        Err(msg) => return fail_at(ErrorClass::MalformedSse, msg, start),
    };
    if let Some(msg) = &info.error {
        return fail_at(ErrorClass::StreamError, msg.clone(), start);
    }
    let mut counter = TokenCounter::new();
    counter.on_chunk(e2e, &info);
    if counter.finish_reason.is_none() {
        return fail_at(
            ErrorClass::EarlyEnd,
            "response without finish_reason",
            start,
        );
    }
    let mut rec = finish_record(&counter, e2e);
    rec.ttft = None;
    rec.itl_ms.clear();
    rec
}
