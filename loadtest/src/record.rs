//! The outcome of one request as measured by the client ([`RequestRecord`])
//! and the error classes a failed request is counted under.

use serde::Serialize;
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// No response headers: connection refused or reset, DNS failure,
    /// connection closed before the status line.
    Connect,
    /// The server answered with a non-2xx status.
    HttpStatus,
    /// The request did not finish within `--timeout`.
    Timeout,
    /// A line that is not SSE, or a `data:` payload that is not a JSON chunk.
    MalformedSse,
    /// The stream ended (cleanly or by a reset) without `data: [DONE]`, or
    /// `[DONE]` came without any `finish_reason`.
    EarlyEnd,
    /// The server sent an error object inside the stream.
    StreamError,
}

impl ErrorClass {
    /// Every class, in report order.
    pub const ALL: [ErrorClass; 6] = [
        ErrorClass::Connect,
        ErrorClass::HttpStatus,
        ErrorClass::Timeout,
        ErrorClass::MalformedSse,
        ErrorClass::EarlyEnd,
        ErrorClass::StreamError,
    ];

    /// The snake_case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Connect => "connect",
            ErrorClass::HttpStatus => "http_status",
            ErrorClass::Timeout => "timeout",
            ErrorClass::MalformedSse => "malformed_sse",
            ErrorClass::EarlyEnd => "early_end",
            ErrorClass::StreamError => "stream_error",
        }
    }
}

/// A failure: its class, the HTTP status when there was one, and a short
/// human-readable detail.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The class counted in the report.
    pub class: ErrorClass,
    /// The HTTP status, for `HttpStatus`.
    pub status: Option<u16>,
    /// What happened, for the first few errors shown in the report.
    pub detail: String,
}

/// What the client measured for one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestRecord {
    /// `None` when the request succeeded.
    pub error: Option<RequestError>,
    /// When the request was sent, relative to the level start.
    pub sent_at: Duration,
    /// Time to first token (streaming only).
    pub ttft: Option<Duration>,
    /// Request sent to `[DONE]` (or to the end of the body, or to the failure).
    pub e2e: Duration,
    /// Per-token inter-token latencies in ms (see [`crate::chunk`]).
    pub itl_ms: Vec<f64>,
    /// Output tokens (usage if reported, else content chunks).
    pub output_tokens: u64,
    /// Whether `output_tokens` came from the server's usage.
    pub tokens_from_usage: bool,
    /// Prompt tokens: usage if reported, else the workload's own count.
    pub input_tokens: Option<u64>,
    /// Whether the server sent usage on chunks that also carried choices.
    pub continuous_usage: bool,
    /// The finish reason.
    pub finish_reason: Option<String>,
    /// Numeric fields of the server's `usage.cardinal` extension, if sent.
    pub usage_extension: Vec<(String, f64)>,
}

impl RequestRecord {
    /// The request succeeded.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// A failed record.
    pub fn failed(class: ErrorClass, status: Option<u16>, detail: impl Into<String>) -> Self {
        Self {
            error: Some(RequestError {
                class,
                status,
                detail: detail.into(),
            }),
            ..Self::default()
        }
    }

    /// Mean per-token ITL of this request in ms.
    pub fn mean_itl_ms(&self) -> Option<f64> {
        if self.itl_ms.is_empty() {
            return None;
        }
        Some(self.itl_ms.iter().sum::<f64>() / self.itl_ms.len() as f64)
    }
}
