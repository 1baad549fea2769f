//! `cardinal serve`: the OpenAI-compatible HTTP server. This module owns the
//! serve flags ([`ServeOptions`]), the shared server state ([`AppState`]),
//! and the listener: an HTTP/1.1 accept loop with per-connection limits
//! (header read and keep-alive idle timeout, header count, a connection cap),
//! and the graceful shutdown (on SIGTERM or SIGINT: new requests get 503,
//! in-flight ones may finish until `--drain-timeout`, then the rest end with
//! an error event and the server returns). Routes live in `routes`,
//! generation in `generate`, request parsing in `openai`, text streaming in
//! `stream`, response shapes in `render`, metrics in `metrics`.

mod errors;
mod fields;
mod generate;
mod metrics;
mod openai;
mod render;
mod routes;
mod stream;

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cardinal_models::LoadedModel;
use cardinal_pipeline::Engine;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, error, info, warn};

pub use errors::ApiError;
pub use metrics::{Metrics, WINDOW_SECONDS};
pub use routes::router;

use crate::setup::{Limits, ModelArgs, Runtime};

const DEFAULT_MAX_NUM_SEQS: usize = 16;
const DEFAULT_MAX_QUEUE: usize = 64;
const DEFAULT_BODY_BYTES: usize = 2 << 20;
/// Largest request head (request line and headers), bytes.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Unknown field names remembered for warn-once (more are not logged).
const MAX_UNKNOWN_NAMES: usize = 256;

/// Log line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// An API key. Its Debug form is redacted so it never reaches a log.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the API key is empty".into());
        }
        Ok(ApiKey(s.to_string()))
    }
}

impl ApiKey {
    /// A key from a string.
    pub fn new(s: impl Into<String>) -> Self {
        ApiKey(s.into())
    }
}

/// Flags of `cardinal serve` (the model flags are in [`ModelArgs`]).
#[derive(clap::Args, Clone, Debug)]
pub struct ServeOptions {
    /// Model name the API answers to (default: the model's own name).
    #[arg(long, env = "CARDINAL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Address to bind. Binding a non-loopback address without --api-key logs a warning.
    #[arg(long, env = "CARDINAL_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port to listen on.
    #[arg(long, env = "CARDINAL_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Most sequences running at once (continuous batching).
    #[arg(long, env = "CARDINAL_MAX_NUM_SEQS", default_value_t = DEFAULT_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// Most sequences waiting; past it requests get 429 with Retry-After.
    #[arg(long, env = "CARDINAL_MAX_QUEUE", default_value_t = DEFAULT_MAX_QUEUE)]
    pub max_queue: usize,
    /// Context limit in tokens, prompt plus output (default: the model's, at most 8192).
    #[arg(long, env = "CARDINAL_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Most prompt tokens computed per engine step (chunked prefill): smaller
    /// keeps running streams smooth while long prompts arrive, larger gives
    /// faster prefill.
    #[arg(long, env = "CARDINAL_PREFILL_CHUNK", default_value_t = crate::setup::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Turn off the prefix cache (on by default: full 64-token KV blocks are
    /// kept after use, while memory allows, and reused by prompts that start
    /// with the same tokens).
    #[arg(long, env = "CARDINAL_NO_PREFIX_CACHE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_prefix_cache: bool,
    /// Require `Authorization: Bearer KEY` on every endpoint but the probes /health and /ready (and /metrics).
    #[arg(long, env = "CARDINAL_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// Seconds a generation request may run before it is ended (0: no limit).
    #[arg(long, env = "CARDINAL_REQUEST_TIMEOUT", default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Log format.
    #[arg(long, env = "CARDINAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Comma-separated origins allowed by CORS ("*" for any). CORS is off without it.
    #[arg(long, env = "CARDINAL_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Seconds in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "CARDINAL_DRAIN_TIMEOUT", default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// With --api-key, require it on /metrics too.
    #[arg(long, env = "CARDINAL_METRICS_REQUIRE_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_require_auth: bool,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "CARDINAL_MAX_BODY_BYTES", default_value_t = DEFAULT_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Seconds a client may take to send request headers; also the idle keep-alive limit (0: none).
    #[arg(long, env = "CARDINAL_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client may take to send the request body (0: none).
    #[arg(long, env = "CARDINAL_BODY_TIMEOUT", default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Most open connections; further ones wait in the kernel's backlog.
    #[arg(long, env = "CARDINAL_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// /ready fails when the engine has work but made no progress for this many seconds.
    #[arg(long, env = "CARDINAL_STALL_TIMEOUT", default_value_t = 30.0)]
    pub stall_timeout: f64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            served_model_name: None,
            host: "127.0.0.1".into(),
            port: 8000,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_queue: DEFAULT_MAX_QUEUE,
            max_model_len: None,
            prefill_chunk: crate::setup::DEFAULT_PREFILL_CHUNK,
            no_prefix_cache: false,
            api_key: None,
            request_timeout: 600.0,
            log_format: LogFormat::Text,
            allowed_origins: Vec::new(),
            drain_timeout: 30.0,
            metrics_require_auth: false,
            max_body_bytes: DEFAULT_BODY_BYTES,
            header_timeout: 10.0,
            body_timeout: 30.0,
            max_connections: 1024,
            stall_timeout: 30.0,
        }
    }
}

impl ServeOptions {
    /// The engine limits to pass to [`crate::setup::start`].
    pub fn limits(&self) -> Limits {
        Limits {
            max_num_seqs: self.max_num_seqs,
            max_queue: self.max_queue,
            max_model_len: self.max_model_len,
            prefill_chunk: self.prefill_chunk,
            compute_nice: crate::setup::SERVE_COMPUTE_NICE,
            prefix_cache: !self.no_prefix_cache,
        }
    }

    /// Whether logs should be JSON lines.
    pub fn json_logs(&self) -> bool {
        self.log_format == LogFormat::Json
    }

    /// Checks the flags that clap cannot.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("--request-timeout", self.request_timeout),
            ("--drain-timeout", self.drain_timeout),
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
            ("--stall-timeout", self.stall_timeout),
        ] {
            if !v.is_finite() || !(0.0..=1e7).contains(&v) {
                bail!("{name} {v}: must be between 0 and 10000000 seconds");
            }
        }
        if self.max_body_bytes < 1024 {
            bail!(
                "--max-body-bytes {}: must be at least 1024",
                self.max_body_bytes
            );
        }
        if self.max_connections == 0 {
            bail!("--max-connections 0: must be at least 1");
        }
        if self.served_model_name.as_deref() == Some("") {
            bail!("--served-model-name is empty");
        }
        Ok(())
    }

    fn secs(v: f64) -> Option<Duration> {
        (v > 0.0).then(|| Duration::from_secs_f64(v))
    }
}

/// A loaded model being served.
#[derive(Debug)]
pub struct Served {
    pub loaded: Arc<LoadedModel>,
    pub engine: Arc<Engine>,
    pub max_model_len: usize,
    pub vocab: usize,
}

/// State shared by every request.
#[derive(Debug)]
pub struct Shared {
    pub opts: ServeOptions,
    pub served_name: String,
    served: OnceLock<Served>,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    inflight: AtomicUsize,
    /// Requests past the load-shedding check and not yet submitted to the
    /// engine (reading the body, rendering the template, tokenizing).
    preparing: AtomicUsize,
    /// Set to end every in-flight request now (drain timeout, second signal).
    pub abort: watch::Sender<bool>,
    unknown: Mutex<HashSet<String>>,
    key_digest: Option<[u8; 32]>,
    /// Server start, Unix seconds (`created` in /v1/models).
    pub started: u64,
}

/// The server state handed to the router. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub inner: Arc<Shared>,
}

impl AppState {
    /// State serving `rt`.
    pub fn new(opts: ServeOptions, rt: Runtime) -> AppState {
        let name = opts
            .served_model_name
            .clone()
            .unwrap_or_else(|| rt.loaded.name.clone());
        let s = AppState::loading(opts, &name, rt.engine.config.max_model_len);
        s.set_runtime(rt);
        s
    }

    /// State for a model still loading: requests get 503 until
    /// [`AppState::set_runtime`]. `max_model_len` sizes the token histograms.
    pub fn loading(opts: ServeOptions, model_name: &str, max_model_len: usize) -> AppState {
        let name = opts
            .served_model_name
            .clone()
            .unwrap_or_else(|| model_name.to_string());
        let key_digest = opts
            .api_key
            .as_ref()
            .map(|k| Sha256::digest(k.0.as_bytes()).into());
        AppState {
            inner: Arc::new(Shared {
                metrics: Arc::new(Metrics::new(&name, max_model_len)),
                served_name: name,
                served: OnceLock::new(),
                draining: AtomicBool::new(false),
                inflight: AtomicUsize::new(0),
                preparing: AtomicUsize::new(0),
                abort: watch::Sender::new(false),
                unknown: Mutex::new(HashSet::new()),
                key_digest,
                started: render::unix_seconds(),
                opts,
            }),
        }
    }

    /// Makes the model available; false if one already was.
    pub fn set_runtime(&self, rt: Runtime) -> bool {
        let s = &self.inner;
        s.metrics
            .set_engine(&rt.engine, rt.isa.name(), &rt.loaded.name);
        let vocab = rt.loaded.model.cfg.vocab;
        let served = Served {
            max_model_len: rt.engine.config.max_model_len,
            vocab,
            loaded: rt.loaded,
            engine: rt.engine,
        };
        s.served.set(served).is_ok()
    }

    /// The model, once loaded.
    pub fn served(&self) -> Option<&Served> {
        self.inner.served.get()
    }

    /// Requests being generated now.
    pub fn inflight(&self) -> usize {
        self.inner.inflight.load(Ordering::Acquire)
    }

    /// Starts draining as on SIGTERM (new requests get 503).
    pub fn start_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }
}

impl Shared {
    /// Counts a generation request in flight until the guard drops.
    /// Load shedding at arrival: counts the request as preparing and returns
    /// its guard, or why it is refused: the engine's queue is full, or would
    /// be once every request already preparing is submitted (running +
    /// waiting + preparing reaching `max_num_seqs + max_queue`). Without the
    /// second condition a burst of N requests all pass while the queue is
    /// still empty, and N − capacity of them are refused only after
    /// rendering and tokenizing, behind the others. The guard must be
    /// dropped *before* the request is submitted: counted both as preparing
    /// and as waiting or running, it would refuse others spuriously.
    pub(crate) fn admit(
        self: &Arc<Self>,
        stats: &cardinal_pipeline::engine::EngineStats,
        max_num_seqs: usize,
        max_queue: usize,
    ) -> Result<PreparingGuard, String> {
        let preparing = self.preparing.fetch_add(1, Ordering::AcqRel);
        let guard = PreparingGuard(self.clone());
        let waiting = stats.waiting.load(Ordering::Acquire);
        let running = stats.running.load(Ordering::Acquire);
        if waiting >= max_queue {
            return Err(format!(
                "{waiting} requests are waiting, the --max-queue limit"
            ));
        }
        let limit = max_num_seqs + max_queue;
        if running + waiting + preparing >= limit {
            return Err(format!(
                "{running} running, {waiting} waiting and {preparing} being read or tokenized \
                 fill --max-num-seqs + --max-queue = {limit}"
            ));
        }
        Ok(guard)
    }

    pub(crate) fn inflight_guard(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self.clone())
    }

    /// Logs each unknown request field name once (at most
    /// [`MAX_UNKNOWN_NAMES`] names are remembered).
    pub(crate) fn warn_unknown(&self, endpoint: &str, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let mut seen = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        for n in names {
            if seen.len() < MAX_UNKNOWN_NAMES && seen.insert(n.clone()) {
                warn!(endpoint, field = %errors::clip(&n.escape_debug().to_string(), 64), "ignoring an unknown request field (logged once per field name)");
            }
        }
    }

    /// Whether `presented` is the API key, compared in constant time.
    pub(crate) fn key_matches(&self, presented: &[u8]) -> bool {
        let Some(expected) = &self.key_digest else {
            return true;
        };
        let got: [u8; 32] = Sha256::digest(presented).into();
        let mut diff = 0u8;
        for (a, b) in got.iter().zip(expected.iter()) {
            diff |= std::hint::black_box(a ^ b);
        }
        std::hint::black_box(diff) == 0
    }

    pub(crate) fn auth_required(&self) -> bool {
        self.key_digest.is_some()
    }
}

/// Decrements the in-flight count on drop.
#[derive(Debug)]
pub(crate) struct InflightGuard(Arc<Shared>);

/// Counts a request as preparing until dropped (see [`Shared::admit`]).
pub(crate) struct PreparingGuard(Arc<Shared>);

impl Drop for PreparingGuard {
    fn drop(&mut self) {
        self.0.preparing.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `rt` until SIGTERM or SIGINT, then drains and returns.
pub async fn run(opts: ServeOptions, rt: Runtime) -> Result<()> {
    opts.validate()?;
    log_runtime(&rt);
    let listener = bind(&opts).await?;
    let state = AppState::new(opts, rt);
    serve_on(listener, state.clone(), shutdown_signal(state)).await
}

/// Binds first, then loads the model in the background: until it is loaded
/// `/health` answers 200, `/ready` and the API 503. Serves until SIGTERM or
/// SIGINT; a failed load is returned as the error.
pub async fn run_loading(opts: ServeOptions, model: ModelArgs) -> Result<()> {
    opts.validate()?;
    let name = cardinal_models::ModelSource::parse(&model.model)?.display_name();
    let listener = bind(&opts).await?;
    let state = AppState::loading(opts.clone(), &name, opts.max_model_len.unwrap_or(8192));
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let st = state.clone();
    let limits = opts.limits();
    tokio::task::spawn_blocking(move || {
        let mut log = |line: &str| info!("{line}");
        match crate::setup::start(&model, &limits, &mut log) {
            Ok(rt) => {
                log_runtime(&rt);
                st.set_runtime(rt);
                info!("model loaded: ready to serve");
            }
            Err(e) => {
                let _ = fail_tx.send(e);
            }
        }
    });
    let failed = Arc::new(Mutex::new(None));
    let f2 = failed.clone();
    let serve_state = state.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal(state) => {}
            Ok(e) = fail_rx => {
                error!("loading the model failed: {e:#}");
                *f2.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        }
    };
    serve_on(listener, serve_state, stop).await?;
    match failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e.context("loading the model")),
        None => Ok(()),
    }
}

/// [`run_loading`] on a new multi-threaded tokio runtime, for a sync `main`.
pub fn run_blocking(opts: ServeOptions, model: ModelArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cardinal-http")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run_loading(opts, model))
}

async fn bind(opts: &ServeOptions) -> Result<TcpListener> {
    let addr = format!("{}:{}", opts.host, opts.port);
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    info!("listening on http://{local}");
    let loopback =
        opts.host == "localhost" || opts.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && opts.api_key.is_none() {
        warn!(
            "listening on the non-loopback address {} without --api-key: anyone who can reach it can use the API",
            opts.host
        );
    }
    Ok(listener)
}

fn log_runtime(rt: &Runtime) {
    info!(
        isa = rt.isa.name(),
        threads = rt.threads,
        cards = rt.plan.cards,
        prefix_cache = rt.engine.config.prefix_cache,
        "model {} on {} card(s)",
        rt.loaded.name,
        rt.plan.cards
    );
    for c in &rt.plan.per_card {
        let parts: Vec<String> = c.parts.iter().map(|p| p.to_string()).collect();
        info!(
            "card {:>2}: weights {:>8.1} MiB, kv {:>8.1} MiB, free {:>8.1} MiB, {} params, parts {}",
            c.card,
            c.weight_bytes as f64 / 1048576.0,
            c.kv_bytes as f64 / 1048576.0,
            c.free_bytes as f64 / 1048576.0,
            c.params,
            compact(&parts)
        );
    }
}

/// "a, b, …, z (n parts)" for long part lists.
fn compact(parts: &[String]) -> String {
    if parts.len() <= 4 {
        return parts.join(", ");
    }
    format!(
        "{}, {}, …, {} ({} parts)",
        parts[0],
        parts[1],
        parts[parts.len() - 1],
        parts.len()
    )
}

/// Resolves on the first SIGTERM or SIGINT; a second one aborts in-flight requests.
async fn shutdown_signal(state: AppState) {
    wait_signal().await;
    info!("shutdown signal received");
    tokio::spawn(async move {
        wait_signal().await;
        warn!("second shutdown signal: ending in-flight requests now");
        state.inner.abort.send_replace(true);
    });
}

async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains: new requests
/// get 503, in-flight ones get up to `--drain-timeout` to finish, the rest
/// end with an error event; then connections are closed and it returns.
pub async fn serve_on(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let app = router(state.clone());
    let max_conns = state.inner.opts.max_connections.clamp(1, 1 << 20);
    let conns = Arc::new(Semaphore::new(max_conns));
    let (close_tx, close_rx) = watch::channel(None::<Instant>);
    let header_timeout = ServeOptions::secs(state.inner.opts.header_timeout);
    let sampler = tokio::spawn(sample_loop(Arc::downgrade(&state.inner)));
    let drain = drain(state.clone(), shutdown);
    tokio::pin!(drain);
    let mut drained = None;
    loop {
        let permit = tokio::select! {
            d = &mut drain => {
                drained = Some(d);
                break;
            }
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            d = &mut drain => {
                drained = Some(d);
                break;
            }
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(
            tcp,
            app.clone(),
            header_timeout,
            close_rx.clone(),
            permit,
        ));
    }
    drop(listener);
    // Connections finish writing what they hold (a slow reader may still be
    // receiving a finished stream) until the drain deadline, at least 1 s.
    let until = drained
        .unwrap_or_else(Instant::now)
        .max(Instant::now() + Duration::from_secs(1));
    let _ = close_tx.send(Some(until));
    let all_closed = conns.acquire_many(max_conns as u32);
    let _ = tokio::time::timeout_at((until + Duration::from_millis(100)).into(), all_closed).await;
    sampler.abort();
    info!("server stopped");
    Ok(())
}

async fn serve_connection(
    tcp: TcpStream,
    app: axum::Router,
    header_timeout: Option<Duration>,
    mut close: watch::Receiver<Option<Instant>>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let mut b = hyper::server::conn::http1::Builder::new();
    // Oversized headers get 431; slow headers and idle keep-alive
    // connections are closed after `header_timeout`.
    b.timer(TokioTimer::new())
        .keep_alive(true)
        .max_header_size(MAX_HEADER_BYTES)
        .header_read_timeout(header_timeout);
    let conn = b.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!("connection ended: {e}");
            }
            return;
        }
        _ = close.wait_for(|c| c.is_some()) => {}
    }
    conn.as_mut().graceful_shutdown();
    let until = (*close.borrow()).unwrap_or_else(Instant::now);
    let _ = tokio::time::timeout_at(until.into(), conn).await;
}

/// Waits for `shutdown`, then drains; returns the drain deadline.
async fn drain(state: AppState, shutdown: impl Future<Output = ()>) -> Instant {
    shutdown.await;
    state.start_drain();
    let s = &state.inner;
    let limit = Duration::from_secs_f64(s.opts.drain_timeout);
    info!(
        inflight = state.inflight(),
        "draining: new requests get 503; waiting up to {:.0} s for in-flight requests",
        limit.as_secs_f64()
    );
    let deadline = Instant::now() + limit;
    let mut abort = s.abort.subscribe();
    while state.inflight() > 0 && Instant::now() < deadline && !*abort.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            _ = abort.wait_for(|a| *a) => {}
        }
    }
    if state.inflight() > 0 {
        warn!(
            inflight = state.inflight(),
            "drain timeout: ending the remaining requests with an error event"
        );
        s.abort.send_replace(true);
        let end = Instant::now() + Duration::from_secs(2);
        while state.inflight() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    deadline
}

/// Samples the engine for the sliding-window gauges every second.
async fn sample_loop(state: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(s) = state.upgrade() else { return };
        if let Some(sv) = s.served.get() {
            s.metrics.sample(&sv.engine);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        serve: ServeOptions,
    }

    #[test]
    fn flags_parse_next_to_model_args() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "cardinal",
            "--model",
            "synthetic:tiny",
            "--port",
            "9000",
            "--api-key",
            "k3y",
            "--allowed-origins",
            "http://a,http://b",
            "--max-model-len",
            "512",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(c.serve.port, 9000);
        assert_eq!(c.serve.allowed_origins, vec!["http://a", "http://b"]);
        assert!(c.serve.json_logs());
        assert_eq!(c.serve.limits().max_model_len, Some(512));
        assert!(
            !format!("{c:?}").contains("k3y"),
            "the key is redacted in Debug"
        );
        c.serve.validate().unwrap();
        let bad = ServeOptions {
            drain_timeout: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn key_compare() {
        let s = AppState::loading(
            ServeOptions {
                api_key: Some(ApiKey::new("abc")),
                ..Default::default()
            },
            "m",
            64,
        );
        assert!(s.inner.key_matches(b"abc"));
        assert!(!s.inner.key_matches(b"abd"));
        assert!(!s.inner.key_matches(b""));
        assert!(!s.inner.key_matches(b"abcabc"));
    }
}
