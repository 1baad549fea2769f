//! Errors in the OpenAI shape. Every failure the server reports, before or
//! after headers are sent, is an [`ApiError`]: an HTTP status plus the body
//! `{"error":{"message","type","param","code"}}` (with `n_prompt_tokens` and
//! `n_ctx` added for context overflows, as llama.cpp does). The response
//! carries an [`ErrorTag`] extension so the metrics middleware can count it
//! by type, or as a rejection by reason, without parsing the body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cardinal_models::ModelError;
use cardinal_models::sandbox::Stopped;
use cardinal_pipeline::SubmitError;
use serde_json::{Map, Value, json};

/// Seconds a client is told to wait after a 429 or 503.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// An error reply (boxed, so `Result<_, ApiError>` stays small).
#[derive(Clone, Debug)]
pub struct ApiError(Box<ErrorInfo>);

/// The contents of an [`ApiError`].
#[derive(Clone, Debug)]
pub struct ErrorInfo {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// The request field at fault, e.g. `messages[1].role`.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Extra fields inside `error` (e.g. `n_prompt_tokens`).
    pub extra: Map<String, Value>,
    /// Set for load-shedding replies: counted as rejections, not errors.
    pub rejected: Option<&'static str>,
}

/// Attached to error responses for the metrics middleware.
#[derive(Clone, Copy, Debug)]
pub struct ErrorTag {
    /// `request_errors_total{type}` label, or None for a rejection.
    pub error_type: Option<&'static str>,
    /// `requests_rejected_total{reason}` label.
    pub rejected: Option<&'static str>,
}

impl std::ops::Deref for ApiError {
    type Target = ErrorInfo;
    fn deref(&self) -> &ErrorInfo {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ErrorInfo {
        &mut self.0
    }
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError(Box::new(ErrorInfo {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            extra: Map::new(),
            rejected: None,
        }))
    }

    /// 400 naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e
    }

    /// 400 without a single field at fault (e.g. malformed JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 for a feature we do not implement.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(param, message);
        e.code = Some("unsupported_parameter");
        e
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 404 for an unknown route.
    pub fn no_route(method: &str, path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no route for {method} {}", clip(path, 200)),
        );
        e.code = Some("not_found");
        e
    }

    /// 404 for an unknown model name.
    pub fn unknown_model(name: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "the model `{}` does not exist; this server serves `{served}`",
                clip(name, 200)
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {}", clip(path, 200)),
        )
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(seconds: u64) -> Self {
        let mut e = Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {seconds} s"),
        );
        e.code = Some("request_timeout");
        e
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        );
        e.code = Some("request_too_large");
        e
    }

    /// 415.
    pub fn media_type(got: Option<&str>) -> Self {
        let got = got.map_or_else(|| "none".to_string(), |g| format!("`{}`", clip(g, 100)));
        let mut e = Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("the Content-Type must be application/json (got {got})"),
        );
        e.code = Some("unsupported_media_type");
        e
    }

    /// 415 for a compressed (or otherwise encoded) body.
    pub fn content_encoding(got: &str) -> Self {
        let mut e = Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "the Content-Encoding `{}` is not supported; send the body uncompressed",
                clip(got, 100)
            ),
        );
        e.code = Some("unsupported_content_encoding");
        e
    }

    /// 429 with Retry-After; `why` says which limit was reached.
    pub fn queue_full(why: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the server is at capacity: {why}; retry after {RETRY_AFTER_SECONDS} s"),
        );
        e.code = Some("rate_limit_exceeded");
        e.rejected = Some("queue_full");
        e
    }

    /// 503 with Retry-After (draining, loading, failed engine).
    pub fn unavailable(reason: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            message,
        );
        e.code = Some("service_unavailable");
        e.rejected = Some(reason);
        e
    }

    /// 400 for a prompt plus max_tokens beyond the context.
    pub fn context(param: &str, prompt: usize, max_tokens: usize, limit: usize) -> Self {
        let msg = if prompt >= limit {
            format!(
                "This model's maximum context length is {limit} tokens. However, the prompt has {prompt} tokens. Please reduce the length of the prompt."
            )
        } else {
            format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or of max_tokens.",
                prompt + max_tokens
            )
        };
        let mut e = Self::invalid(param, msg);
        e.code = Some("context_length_exceeded");
        e.extra.insert("n_prompt_tokens".into(), json!(prompt));
        e.extra.insert("n_ctx".into(), json!(limit));
        e
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message);
        e.code = Some("internal_error");
        e
    }

    /// 500 for a chat template its sandbox stopped (memory budget, time
    /// limit) or disabled after such a stop. The model's own template is at
    /// fault, not the request, so this is not a 4xx: vLLM answers a failure
    /// inside the server with 500 (`InternalServerError`) and OpenAI with
    /// 500 `server_error`, and clients treat 5xx as the server's problem. It
    /// is not a 503 either: retrying does not help while this process runs
    /// (the template stays disabled), though a prompt sent as text to
    /// /v1/completions still works, which the message says.
    pub fn template_stopped(message: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!(
                "{message}. The model's chat template cannot be used; send the prompt as text to /v1/completions instead"
            ),
        );
        e.code = Some("chat_template_error");
        e
    }

    /// Maps a failure to render the chat template: a 500 when the sandbox
    /// stopped the template ([`ApiError::template_stopped`]), else a 400
    /// naming `param` (what the messages or the template's checks of them,
    /// such as `raise_exception`, refused).
    pub fn from_render(e: ModelError, param: &str) -> Self {
        match e {
            ModelError::TemplateStopped(ref why) => {
                if !matches!(why, Stopped::Poisoned(_)) {
                    // Once per template: later renders are `Poisoned`.
                    tracing::error!("the model's chat template is disabled: {why}");
                }
                Self::template_stopped(e)
            }
            e => Self::invalid(param, e.to_string()),
        }
    }

    /// 504: the request ran past --request-timeout.
    pub fn timeout(seconds: f64) -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("the request did not finish within --request-timeout ({seconds} s)"),
        );
        e.code = Some("request_timeout");
        e
    }

    /// Maps an engine refusal; `param` is the prompt field of the request.
    pub fn from_submit(e: SubmitError, param: &str) -> Self {
        match e {
            SubmitError::QueueFull(n) => Self::queue_full(format_args!(
                "{n} requests are waiting, the --max-queue limit"
            )),
            SubmitError::Invalid(m) => Self::invalid(param, m),
            SubmitError::TooLong {
                prompt,
                max_tokens,
                limit,
            } => Self::context(param, prompt, max_tokens, limit),
            e @ SubmitError::NeverFits { .. } => {
                let mut a = Self::invalid("max_tokens", e.to_string());
                a.code = Some("context_length_exceeded");
                a
            }
            SubmitError::Stopped(m) => {
                Self::unavailable("engine_failed", format!("the engine is not running: {m}"))
            }
        }
    }

    /// The `request_errors_total{type}` label of this error.
    pub fn metric_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication",
            404 => "not_found",
            405 => "method_not_allowed",
            408 => "body_timeout",
            413 => "too_large",
            415 => "unsupported_media_type",
            504 => "timeout",
            500 if self.code == Some("chat_template_error") => "template",
            400..=499 => "invalid_request",
            500 => "engine",
            _ => "server",
        }
    }

    /// The JSON body, `{"error":{...}}`.
    pub fn body(&self) -> Value {
        let mut inner = Map::new();
        inner.insert("message".into(), json!(self.message));
        inner.insert("type".into(), json!(self.kind));
        inner.insert("param".into(), json!(self.param));
        inner.insert("code".into(), json!(self.code));
        for (k, v) in &self.extra {
            inner.insert(k.clone(), v.clone());
        }
        json!({ "error": Value::Object(inner) })
    }

    /// The tag the metrics middleware reads.
    pub fn tag(&self) -> ErrorTag {
        match self.rejected {
            Some(r) => ErrorTag {
                error_type: None,
                rejected: Some(r),
            },
            None => ErrorTag {
                error_type: Some(self.metric_type()),
                rejected: None,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(self.tag());
        resp
    }
}

/// At most `max` characters of `s`, for echoing client input in messages.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_extras() {
        let e = ApiError::context("messages", 300, 10, 256);
        let b = e.body();
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "messages");
        assert_eq!(b["error"]["code"], "context_length_exceeded");
        assert_eq!(b["error"]["n_prompt_tokens"], 300);
        assert_eq!(b["error"]["n_ctx"], 256);
        assert!(b["error"]["message"].as_str().unwrap().contains("300"));
    }

    #[test]
    fn stopped_templates_are_server_errors() {
        let stopped =
            ModelError::TemplateStopped(Stopped::Timeout(std::time::Duration::from_secs(2)));
        let e = ApiError::from_render(stopped, "messages");
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.metric_type(), "template");
        let b = e.body();
        assert_eq!(b["error"]["type"], "server_error");
        assert_eq!(b["error"]["code"], "chat_template_error");
        assert!(b["error"]["param"].is_null());
        let m = b["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("time limit of 2 s") && m.contains("/v1/completions"),
            "{m}"
        );
        let bad = ApiError::from_render(ModelError::Template("no".into()), "messages");
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.param.as_deref(), Some("messages"));
    }

    #[test]
    fn clip_is_char_safe() {
        assert_eq!(clip("héllo", 2), "hé…");
        assert_eq!(clip("ab", 5), "ab");
    }
}
