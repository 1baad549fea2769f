//! The router: routes, the middleware around them (arrival time, draining,
//! request log and error counting; API-key auth; CORS when
//! `--allowed-origins` is given; the body size limit), the small endpoints
//! (`/health`, `/ready`, `/metrics`, `/v1/models`, `/tokenize`,
//! `/detokenize`, `/reset_prefix_cache`), the OpenAI-shaped 404/405, and reading JSON bodies with
//! their content type, size, time and UTF-8 checks.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::{debug, info, warn};

use super::errors::{ApiError, ErrorTag, clip};
use super::openai::{Fields, describe, parse_messages};
use super::{AppState, Served, generate};

/// When the request arrived, for time-to-first-token.
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub Instant);

/// The router of the whole API over `state`.
pub fn router(state: AppState) -> Router {
    let opts = &state.inner.opts;
    let mut r = Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state.clone());
    if !opts.allowed_origins.is_empty() {
        r = r.layer(cors(&opts.allowed_origins));
    }
    r
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600))
}

/// Paths that stay open while draining and that are not counted as errors.
fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// Records the arrival, refuses requests while draining, logs the request
/// (never its headers) and counts error replies.
async fn observe(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let arrival = Instant::now();
    req.extensions_mut().insert(Arrival(arrival));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let draining = s.inner.draining.load(Ordering::Acquire);
    let mut resp = if draining && !is_probe(&path) {
        ApiError::unavailable(
            "draining",
            "the server is shutting down; retry on another replica",
        )
        .into_response()
    } else {
        next.run(req).await
    };
    if draining {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(tag) = resp.extensions().get::<ErrorTag>().copied()
        && !is_probe(&path)
    {
        let m = &s.inner.metrics;
        match (tag.error_type, tag.rejected) {
            (_, Some(reason)) => m.rejected.with_label_values(&[reason]).inc(),
            (Some(t), None) => m.errors.with_label_values(&[t]).inc(),
            (None, None) => {}
        }
    }
    let status = resp.status().as_u16();
    // A number (ms, to 0.1) and the path as text, so JSON logs get
    // "ms":12.3 and "path":"/v1/models".
    let ms = (arrival.elapsed().as_secs_f64() * 1e4).round() / 10.0;
    let path = clip(&path, 200);
    // A 503 from /ready or /health is the answer a probe asks for while
    // loading or draining, not a fault: info, not warn, so probes do not
    // flood the warnings.
    let probe = matches!(path.as_str(), "/ready" | "/health");
    match status {
        503 if probe => info!(%method, %path, status, ms, "request"),
        500.. => warn!(%method, %path, status, ms, "request"),
        400.. => info!(%method, %path, status, ms, "request"),
        _ => debug!(%method, %path, status, ms, "request"),
    }
    resp
}

/// With `--api-key`, requires `Authorization: Bearer KEY` except on the
/// probes /health and /ready (a Kubernetes probe sends no key, and they tell
/// only whether the server is up and loaded), and /metrics unless
/// `--metrics-require-auth`.
async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let sh = &s.inner;
    if !sh.auth_required() {
        return next.run(req).await;
    }
    let path = req.uri().path();
    if matches!(path, "/health" | "/ready") || (path == "/metrics" && !sh.opts.metrics_require_auth)
    {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(k) if sh.key_matches(k) => next.run(req).await,
        Some(_) => ApiError::unauthorized("the API key is not valid").into_response(),
        None => ApiError::unauthorized(
            "an API key is required: send the header `Authorization: Bearer <key>`",
        )
        .into_response(),
    }
}

fn bearer(h: &HeaderMap) -> Option<&[u8]> {
    let v = h.get(header::AUTHORIZATION)?.as_bytes();
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        let k = &v[7..];
        let start = k.iter().position(|&b| b != b' ').unwrap_or(k.len());
        Some(&k[start..])
    } else {
        Some(&[])
    }
}

async fn fallback(req: Request) -> ApiError {
    ApiError::no_route(req.method().as_str(), req.uri().path())
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::method_not_allowed(req.method().as_str(), req.uri().path())
}

/// Reads a JSON body: 415 for a content type other than JSON (a missing one
/// is accepted), 413 over the size limit, 408 when it arrives too slowly,
/// 400 for invalid UTF-8 or malformed JSON.
pub async fn read_json(s: &AppState, req: Request) -> Result<Value, ApiError> {
    let opts = &s.inner.opts;
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let text = ct.to_str().unwrap_or("");
        let mime = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json"
            && !(mime.starts_with("application/") && mime.ends_with("+json"))
        {
            return Err(ApiError::media_type(Some(text)));
        }
    }
    if let Some(enc) = req.headers().get(header::CONTENT_ENCODING) {
        let text = enc.to_str().unwrap_or("(not text)");
        if !text.trim().eq_ignore_ascii_case("identity") {
            return Err(ApiError::content_encoding(text));
        }
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > opts.max_body_bytes as u64) {
        return Err(ApiError::too_large(opts.max_body_bytes));
    }
    let read = Bytes::from_request(req, &());
    let bytes = match super::ServeOptions::secs(opts.body_timeout) {
        Some(t) => tokio::time::timeout(t, read)
            .await
            .map_err(|_| ApiError::body_timeout(opts.body_timeout as u64))?,
        None => read.await,
    };
    let bytes = bytes.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(opts.max_body_bytes)
        } else {
            ApiError::bad_request(format!(
                "could not read the request body: {}",
                rej.body_text()
            ))
        }
    })?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(ApiError::bad_request(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The model, or 503 while it loads.
pub fn served(s: &AppState) -> Result<&Served, ApiError> {
    s.served().ok_or_else(|| {
        ApiError::unavailable("not_ready", "the model is still loading; retry shortly")
    })
}

/// Checks the request's `model` against the served name.
pub fn check_model(s: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.inner.served_name => {
            Err(ApiError::unknown_model(m, &s.inner.served_name))
        }
        _ => Ok(()),
    }
}

/// Liveness: 200 unless the engine has failed (it does not recover).
async fn health(State(s): State<AppState>) -> Response {
    if s.served()
        .is_some_and(|sv| sv.engine.stats.failed.load(Ordering::Acquire))
    {
        return ApiError::unavailable("engine_failed", "an engine step failed; restart the server")
            .into_response();
    }
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// Readiness: loaded, not draining, not failed, and making progress.
async fn ready(State(s): State<AppState>) -> Response {
    let Some(sv) = s.served() else {
        return ApiError::unavailable("not_ready", "the model is still loading").into_response();
    };
    if s.inner.draining.load(Ordering::Acquire) {
        return ApiError::unavailable("draining", "the server is shutting down").into_response();
    }
    let st = &sv.engine.stats;
    if st.failed.load(Ordering::Acquire) {
        return ApiError::unavailable("engine_failed", "an engine step failed").into_response();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let since = now.saturating_sub(st.last_progress_ms.load(Ordering::Acquire)) as f64 / 1e3;
    if st.busy.load(Ordering::Acquire) && since > s.inner.opts.stall_timeout {
        return ApiError::unavailable(
            "engine_stalled",
            format!("the engine has made no progress for {since:.1} s"),
        )
        .into_response();
    }
    // /ready needs no key (probes send none), so with one it names no model.
    if s.inner.auth_required() {
        return axum::Json(json!({ "status": "ready" })).into_response();
    }
    axum::Json(json!({ "status": "ready", "model": s.inner.served_name })).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let text = s.inner.metrics.render(s.served().map(|sv| &*sv.engine));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// The model's card; a 503 while it is still loading (its name and context
/// length are not known yet, and it cannot serve).
fn model_card(s: &AppState) -> Result<Value, ApiError> {
    let sv = served(s)?;
    Ok(json!({
        "id": s.inner.served_name,
        "object": "model",
        "created": s.inner.started,
        "owned_by": "cardinal",
        "root": sv.loaded.name,
        "max_model_len": sv.max_model_len,
    }))
}

async fn models(State(s): State<AppState>) -> Response {
    match model_card(&s) {
        Ok(card) => axum::Json(json!({ "object": "list", "data": [card] })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match check_model(&s, Some(&id)).and_then(|()| model_card(&s)) {
        Ok(card) => axum::Json(card).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The body of a small endpoint as a JSON object, or a 400 naming what it was.
fn json_object(body: &Value) -> Result<&serde_json::Map<String, Value>, ApiError> {
    body.as_object().ok_or_else(|| {
        ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            describe(body)
        ))
    })
}

/// `POST /reset_prefix_cache`: forgets every cached prefix block, as vLLM's
/// endpoint of that name does, so a benchmark can start cold. 200 with
/// `{"status": "ok"}`; 503 while the model loads or when the engine's
/// command queue is full.
async fn reset_prefix_cache(State(s): State<AppState>) -> Response {
    let reset = served(&s).and_then(|sv| {
        sv.engine.reset_prefix_cache().map_err(|e| {
            ApiError::unavailable(
                "engine_busy",
                format!("could not reset the prefix cache: {e}"),
            )
        })
    });
    match reset {
        Ok(()) => {
            info!("prefix cache reset");
            (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /tokenize`: `{"prompt": text}` (or llama.cpp's `content`), or
/// `{"messages": [...]}` rendered with the chat template; answers
/// `{"count", "max_model_len", "tokens"}` as vLLM does.
async fn tokenize(State(s): State<AppState>, req: Request) -> Response {
    tokenize_inner(&s, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn tokenize_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let sv = served(s)?;
    let body = read_json(s, req).await?;
    let map = json_object(&body)?;
    let f = Fields::new(map, "");
    check_model(s, f.string("model")?.as_deref())?;
    let tok = sv
        .loaded
        .tokenizer()
        .map_err(|e| ApiError::invalid("model", e.to_string()))?;
    let add_special = f.bool("add_special_tokens")?.unwrap_or(true);
    let mut ids = if f.raw("messages").is_some() {
        let msgs = parse_messages(&f)?;
        let gen_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
        // The template renders on its own thread and can take up to its
        // time limit: wait for it off the async workers.
        let loaded = sv.loaded.clone();
        let text = tokio::task::spawn_blocking(move || loaded.render_chat_with(&msgs, gen_prompt))
            .await
            .map_err(|e| ApiError::internal(format!("rendering failed: {e}")))?
            .map_err(|e| ApiError::from_render(e, "messages"))?;
        tok.encode(&text, true)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?
    } else {
        let key = if f.raw("prompt").is_some() {
            "prompt"
        } else {
            "content"
        };
        let text = f.string(key)?.ok_or_else(|| {
            ApiError::invalid("prompt", "`prompt` (a string) or `messages` is required")
        })?;
        tok.encode(&text, true)
            .map_err(|e| ApiError::invalid(key, e.to_string()))?
    };
    if add_special
        && let Some(bos) = tok.bos_id().filter(|_| tok.add_bos())
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    Ok(
        axum::Json(json!({ "count": ids.len(), "max_model_len": sv.max_model_len, "tokens": ids }))
            .into_response(),
    )
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"prompt": text}`.
async fn detokenize(State(s): State<AppState>, req: Request) -> Response {
    detokenize_inner(&s, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn detokenize_inner(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let sv = served(s)?;
    let body = read_json(s, req).await?;
    let map = json_object(&body)?;
    let f = Fields::new(map, "");
    check_model(s, f.string("model")?.as_deref())?;
    let tok = sv
        .loaded
        .tokenizer()
        .map_err(|e| ApiError::invalid("model", e.to_string()))?;
    let ids: Vec<u32> = f
        .get("tokens", "an array of token ids")?
        .ok_or_else(|| ApiError::invalid("tokens", "`tokens` is required"))?;
    let text = tok
        .decode(&ids, false)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(axum::Json(json!({ "prompt": text })).into_response())
}
