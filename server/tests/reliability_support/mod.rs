//! Helpers shared by the reliability tests: an in-process server over real
//! TCP on 127.0.0.1, the `cardinal` binary as a child process (its address
//! read from its JSON log on stderr, its RSS from /proc), an incremental SSE
//! reader over a reqwest response, Prometheus text parsing, a seeded PRNG
//! and percentiles. The crate root must declare `mod http_support;` too.

#![allow(dead_code)]

use std::io::BufRead;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardinal_server::serve::{ServeOptions, serve_on};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::http_support::App;

/// The real default model (SmolLM2-135M Q4_1; `.ci/run` fetches it), or
/// the GGUF `CARDINAL_TEST_GGUF` names: for tests that need generation
/// slow enough to act while streams are still running.
pub fn real_model() -> String {
    std::env::var("CARDINAL_TEST_GGUF").unwrap_or_else(|_| "smollm2-135m-instruct".into())
}

/// The tiny-granite fixture directory.
pub const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/tests/fixtures/tiny-granite"
);

/// A server running in this process on 127.0.0.1, on a tokio runtime of
/// its own (two workers, like the binary on this machine), so the test's
/// clients do not queue behind its tasks or it behind theirs.
pub struct Local {
    pub base: String,
    pub app: App,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Local {
    /// Serves `app` on a fresh 127.0.0.1 port.
    pub fn start(app: App) -> Local {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let state = app.state.clone();
        let thread = std::thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve_on(listener, state, async move {
                        let _ = rx.await;
                    })
                    .await
                })
            })
            .unwrap();
        Local {
            base,
            app,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Starts the drain, as SIGTERM would.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for `serve_on` to return after [`Local::stop`].
    pub async fn stopped(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match self.thread.take() {
            Some(t) => t.join().expect("server thread").is_ok(),
            None => true,
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Options named "tiny" with the given queue limits.
pub fn opts(max_num_seqs: usize, max_queue: usize) -> ServeOptions {
    ServeOptions {
        served_model_name: Some("tiny".into()),
        max_num_seqs,
        max_queue,
        ..Default::default()
    }
}

/// A chat body of fixed length: EOS is ignored and `min_tokens` equals
/// `max_tokens`, so every completion has exactly `max_tokens` tokens.
pub fn chat_body(max_tokens: usize, stream: bool) -> Value {
    let mut b = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse"}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    });
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// A bare HTTP/1.1 client connection: requests are written as prepared
/// bytes and replies parsed by hand, so the client costs next to nothing
/// and a timing is the server's.
pub struct Raw {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// A reply's status line and headers (names lower-cased).
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header called `name` (lower case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Raw {
    /// Connects to `base` (`http://host:port`).
    pub async fn connect(base: &str) -> Raw {
        let s = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
            .await
            .expect("connect");
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    /// A POST of JSON `body` to `path`, as bytes.
    pub fn post(path: &str, body: &Value) -> Vec<u8> {
        let b = body.to_string();
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .into_bytes()
    }

    /// A GET of `path`, as bytes.
    pub fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
    }

    /// Writes a prepared request.
    pub async fn send(&mut self, req: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        self.s
            .write_all(req)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    async fn fill(&mut self) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let mut tmp = [0u8; 16 << 10];
        let n = self
            .s
            .read(&mut tmp)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l: Vec<u8> = self.buf.drain(..p + 2).collect();
                return Ok(String::from_utf8_lossy(&l[..p]).into_owned());
            }
            self.fill().await?;
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads the status line and headers of the next reply.
    pub async fn head(&mut self) -> Result<Head, String> {
        let status_line = self.line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line().await?;
            if l.is_empty() {
                return Ok(Head { status, headers });
            }
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| format!("bad header {l:?}"))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }

    /// The next chunk of a chunked body; None after the last one.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let size_line = self.line().await?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            while !self.line().await?.is_empty() {}
            return Ok(None);
        }
        let data = self.exact(size).await?;
        if self.exact(2).await? != b"\r\n" {
            return Err("a chunk does not end with CRLF".into());
        }
        Ok(Some(data))
    }

    /// The whole body of a reply (chunked or with a Content-Length).
    pub async fn body(&mut self, head: &Head) -> Result<Vec<u8>, String> {
        if head.get("transfer-encoding") == Some("chunked") {
            let mut out = Vec::new();
            while let Some(c) = self.chunk().await? {
                out.extend_from_slice(&c);
            }
            return Ok(out);
        }
        let n = head.get("content-length").unwrap_or("0");
        let n: usize = n.parse().map_err(|_| format!("bad content-length {n}"))?;
        self.exact(n).await
    }
}

/// Where an [`SseReader`] gets its bytes.
pub enum Source {
    Reqwest(reqwest::Response),
    Raw(Raw),
}

/// Reads a `text/event-stream` body one event at a time.
pub struct SseReader {
    src: Source,
    buf: Vec<u8>,
    /// Events returned so far.
    pub events: usize,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self::from_source(Source::Reqwest(resp))
    }

    pub fn from_source(src: Source) -> Self {
        SseReader {
            src,
            buf: Vec::new(),
            events: 0,
        }
    }

    async fn more(&mut self) -> Result<Option<Vec<u8>>, String> {
        match &mut self.src {
            Source::Reqwest(r) => r
                .chunk()
                .await
                .map(|c| c.map(|b| b.to_vec()))
                .map_err(|e| format!("reading the stream failed: {e}")),
            Source::Raw(r) => r.chunk().await,
        }
    }

    /// The next event's `data:` payload; None at the end of the body.
    pub async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..p + 2).collect();
                let text = String::from_utf8(ev[..p].to_vec())
                    .map_err(|e| format!("an event is not UTF-8: {e}"))?;
                let data = text
                    .strip_prefix("data: ")
                    .ok_or_else(|| format!("not an SSE data event: {text:?}"))?;
                self.events += 1;
                return Ok(Some(data.to_string()));
            }
            match self.more().await? {
                Some(c) => self.buf.extend_from_slice(&c),
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => {
                    return Err(format!(
                        "the body ended inside an event: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ));
                }
            }
        }
    }
}

/// What a whole chat stream contained.
#[derive(Debug, Default)]
pub struct StreamSummary {
    /// Content deltas with text.
    pub deltas: usize,
    pub finish_reason: Option<String>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    /// Error events (`{"error": ...}`).
    pub errors: Vec<Value>,
    pub done: bool,
}

/// Reads a chat stream to its end and checks its shape as it goes.
pub async fn read_stream(r: &mut SseReader) -> Result<StreamSummary, String> {
    let mut s = StreamSummary::default();
    while let Some(data) = r.next().await? {
        s.add(&data)?;
    }
    Ok(s)
}

/// The summary of a whole SSE body.
pub fn summarize(body: &str) -> Result<StreamSummary, String> {
    let mut s = StreamSummary::default();
    for ev in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = ev
            .strip_prefix("data: ")
            .ok_or_else(|| format!("not an SSE data event: {ev:?}"))?;
        s.add(data)?;
    }
    Ok(s)
}

impl StreamSummary {
    /// Takes in one event's data.
    pub fn add(&mut self, data: &str) -> Result<(), String> {
        if self.done {
            return Err(format!("an event after [DONE]: {data}"));
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("event not JSON ({e}): {data}"))?;
        if v.get("error").is_some() {
            self.errors.push(v);
            return Ok(());
        }
        if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
            if c["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                self.deltas += 1;
            }
            if let Some(f) = c["finish_reason"].as_str() {
                self.finish_reason = Some(f.to_string());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.completion_tokens = u["completion_tokens"].as_u64();
            self.prompt_tokens = u["prompt_tokens"].as_u64();
        }
        Ok(())
    }
}

/// Every sample of the metric `name` in a Prometheus text exposition, as
/// (label text, value).
pub fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, v) = r.split_once("} ")?;
                    (labels.to_string(), v)
                }
                None => (String::new(), rest.strip_prefix(' ')?),
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` (0 when absent).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    samples(text, name).iter().map(|s| s.1).sum()
}

/// GETs `/metrics`.
pub async fn scrape(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("scrape body")
}

/// splitmix64: a small seeded generator, so every run sees the same choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The `p`-th percentile (0-100, nearest rank) of `v`; 0 for an empty set.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// The `cardinal` binary, started as a child process with JSON logs.
pub struct Proc {
    pub child: Child,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
    pub base: String,
}

impl Proc {
    /// Runs `cardinal serve --model <tiny-granite> --port 0 --log-format json
    /// --threads 1 --served-model-name tiny` plus `args`, and waits for its "listening on" line.
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_model(TINY, args)
    }

    /// [`Proc::spawn`] with another `--model` (still served as `tiny`).
    pub fn spawn_model(model: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cardinal"))
            .args([
                "serve",
                "--model",
                model,
                "--port",
                "0",
                "--log-format",
                "json",
                "--threads",
                "1",
                "--served-model-name",
                "tiny",
            ])
            .args(args)
            .env_remove("CARDINAL_API_KEY")
            .env_remove("CARDINAL_HOST")
            .env("CARDINAL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cardinal");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut p = Proc {
            child,
            log,
            base: String::new(),
        };
        let line = p
            .wait_log(Duration::from_secs(30), |m| {
                m.starts_with("listening on http://")
            })
            .unwrap_or_else(|| panic!("no 'listening on' line; log: {:?}", p.lines()));
        let addr = line.trim_start_matches("listening on http://");
        p.base = format!("http://{}", addr.replace("0.0.0.0", "127.0.0.1"));
        p
    }

    /// The log lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The log as parsed JSON objects (other lines are skipped).
    pub fn records(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a log record whose message satisfies `f`; returns the message.
    pub fn wait_log(&self, within: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + within;
        loop {
            let hit = self.records().into_iter().find_map(|r| {
                let m = r["fields"]["message"].as_str()?.to_string();
                f(&m).then_some(m)
            });
            if hit.is_some() {
                return hit;
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `/ready` answers 200 (the model loads after the bind).
    pub async fn wait_ready(&self, client: &reqwest::Client) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/ready", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < end, "not ready: {:?}", self.lines());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size of the process, KiB (from /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Sends SIGTERM to the child.
    pub fn term(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the child to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
