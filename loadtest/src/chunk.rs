//! What one streamed OpenAI chunk says (content present, finish reason,
//! usage, error), how many output tokens each chunk carries, and the
//! per-token inter-token-latency arithmetic ("chunk spreading").
//!
//! Spreading, exactly: let the content-carrying chunks of one request arrive
//! at times a_1 < a_2 < … < a_m and carry k_1 … k_m tokens. The first token of
//! chunk 1 is the first token (its delay is the TTFT). The other k_1 − 1
//! tokens of chunk 1 arrived together with it and get an ITL of 0. For every
//! later chunk i, the gap g_i = a_i − a_(i−1) is divided equally among its
//! k_i tokens: k_i ITL samples of g_i / k_i. So a request with N tokens gives
//! N − 1 ITL samples whose sum is a_m − a_1. k_i comes from the server's
//! continuous usage statistics (the rise of `usage.completion_tokens` on a
//! chunk that also has choices) when the server sends them; otherwise every
//! content chunk counts as one token.

use serde_json::Value;
use std::time::Duration;

/// The token counts a server reported in a `usage` object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
    /// Numeric fields of Cardinal's optional `usage.cardinal` extension
    /// object, flattened one level (`{"a":{"b":1}}` gives `a.b`).
    pub extension: Vec<(String, f64)>,
}

/// Flattens the numeric fields of an extension object.
fn numeric_fields(v: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    if let Value::Object(map) = v {
        for (k, val) in map {
            match val {
                Value::Number(n) => out.extend(n.as_f64().map(|x| (k.clone(), x))),
                Value::Object(inner) => {
                    for (k2, v2) in inner {
                        if let Some(x) = v2.as_f64() {
                            out.push((format!("{k}.{k2}"), x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The facts the load generator needs from one chunk (or one non-streamed
/// response body).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkInfo {
    /// The chunk carries non-empty generated text (content, text, reasoning
    /// or tool-call fragments).
    pub has_content: bool,
    /// The `choices` array is missing or empty (the final usage chunk).
    pub choices_empty: bool,
    /// `choices[0].finish_reason` when set.
    pub finish_reason: Option<String>,
    /// `usage` when it is an object.
    pub usage: Option<Usage>,
    /// An `error` object or message sent inside the stream.
    pub error: Option<String>,
}

fn non_empty_str(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::String(s)) if !s.is_empty())
}

/// Parses one SSE `data:` payload (or a whole non-streamed response).
/// An `Err` means the payload is not a chunk at all (malformed SSE).
pub fn parse_chunk(data: &str) -> Result<ChunkInfo, String> {
    let v: Value = serde_json::from_str(data).map_err(|e| {
        let shown: String = data.chars().take(80).collect();
        format!("data is not JSON ({e}): {shown:?}")
    })?;
    let Value::Object(obj) = &v else {
        return Err("data is JSON but not an object".to_string());
    };
    let mut info = ChunkInfo::default();
    if let Some(err) = obj.get("error").filter(|e| !e.is_null()) {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        info.error = Some(msg);
        return Ok(info);
    }
    let choices = obj.get("choices");
    let usage = obj.get("usage").filter(|u| u.is_object());
    if choices.is_none() && usage.is_none() {
        return Err("chunk has neither `choices` nor `usage`".to_string());
    }
    if let Some(u) = usage {
        info.usage = Some(Usage {
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64),
            completion_tokens: u.get("completion_tokens").and_then(Value::as_u64),
            extension: u.get("cardinal").map(numeric_fields).unwrap_or_default(),
        });
    }
    match choices {
        None | Some(Value::Null) => info.choices_empty = true,
        Some(Value::Array(list)) if list.is_empty() => info.choices_empty = true,
        Some(Value::Array(list)) => {
            let c = &list[0];
            if !c.is_object() {
                return Err("choices[0] is not an object".to_string());
            }
            info.finish_reason = c
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_string);
            let holder = c.get("delta").or_else(|| c.get("message"));
            info.has_content = non_empty_str(c.get("text"))
                || holder.is_some_and(|d| {
                    non_empty_str(d.get("content"))
                        || non_empty_str(d.get("reasoning_content"))
                        || non_empty_str(d.get("reasoning"))
                        || matches!(d.get("tool_calls"), Some(Value::Array(t)) if !t.is_empty())
                });
        }
        Some(_) => return Err("`choices` is not an array".to_string()),
    }
    Ok(info)
}

/// One arrival of output tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenEvent {
    /// Time since the request was sent.
    pub at: Duration,
    /// Tokens carried (k ≥ 1).
    pub tokens: u64,
}

/// Follows one streamed response chunk by chunk and attributes tokens to
/// arrival times.
#[derive(Debug, Default)]
pub struct TokenCounter {
    prev_completion: u64,
    /// Usage arrived on chunks that also carry choices (vLLM's
    /// `continuous_usage_stats`), so chunk token counts are known.
    pub continuous_usage: bool,
    /// Token arrivals in order.
    pub events: Vec<TokenEvent>,
    /// Chunks with non-empty content.
    pub content_chunks: u64,
    /// The most recent usage object seen (the final one wins).
    pub last_usage: Option<Usage>,
    /// The last finish reason seen.
    pub finish_reason: Option<String>,
}

impl TokenCounter {
    /// A counter for a new response.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts for one chunk that arrived `at` after the request was sent.
    pub fn on_chunk(&mut self, at: Duration, info: &ChunkInfo) {
        if info.finish_reason.is_some() {
            self.finish_reason.clone_from(&info.finish_reason);
        }
        let usage_total = info.usage.as_ref().and_then(|u| u.completion_tokens);
        if info.usage.is_some() {
            self.last_usage.clone_from(&info.usage);
        }
        if info.choices_empty {
            return; // the final usage chunk carries no new tokens
        }
        if info.has_content {
            self.content_chunks += 1;
        }
        let k = match usage_total {
            Some(total) => {
                self.continuous_usage = true;
                let k = total.saturating_sub(self.prev_completion);
                self.prev_completion = self.prev_completion.max(total);
                if k == 0 && info.has_content { 1 } else { k }
            }
            None => u64::from(info.has_content),
        };
        if k > 0 {
            self.events.push(TokenEvent { at, tokens: k });
        }
    }

    /// Time to the first token, if any token arrived.
    pub fn ttft(&self) -> Option<Duration> {
        self.events.first().map(|e| e.at)
    }

    /// Output tokens and whether they come from the server's usage (true)
    /// or from counting content chunks (false).
    pub fn output_tokens(&self) -> (u64, bool) {
        match self.last_usage.as_ref().and_then(|u| u.completion_tokens) {
            Some(n) => (n, true),
            None => (self.content_chunks, false),
        }
    }

    /// The `usage.cardinal` numeric fields of the last usage seen.
    pub fn usage_extension(&self) -> Vec<(String, f64)> {
        self.last_usage
            .as_ref()
            .map(|u| u.extension.clone())
            .unwrap_or_default()
    }

    /// Prompt tokens reported by the server.
    pub fn prompt_tokens(&self) -> Option<u64> {
        self.last_usage.as_ref().and_then(|u| u.prompt_tokens)
    }
}

/// Per-token inter-token latencies in milliseconds, by the spreading rule in
/// this module's documentation.
pub fn spread_itl_ms(events: &[TokenEvent]) -> Vec<f64> {
    let mut out = Vec::new();
    let mut prev: Option<Duration> = None;
    for e in events.iter().filter(|e| e.tokens > 0) {
        match prev {
            None => out.extend(std::iter::repeat_n(0.0, (e.tokens - 1) as usize)),
            Some(p) => {
                let gap_ms = e.at.saturating_sub(p).as_secs_f64() * 1000.0;
                let each = gap_ms / e.tokens as f64;
                out.extend(std::iter::repeat_n(each, e.tokens as usize));
            }
        }
        prev = Some(e.at);
    }
    out
}

/// Time per output token for one request, vLLM's definition:
/// (E2E − TTFT) / (N − 1), defined for N ≥ 2.
pub fn tpot_ms(e2e: Duration, ttft: Duration, output_tokens: u64) -> Option<f64> {
    if output_tokens < 2 {
        return None;
    }
    let span = e2e.saturating_sub(ttft).as_secs_f64() * 1000.0;
    Some(span / (output_tokens - 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn spreading_divides_gaps_among_tokens() {
        let ev = [
            TokenEvent {
                at: ms(50),
                tokens: 1,
            },
            TokenEvent {
                at: ms(90),
                tokens: 2,
            },
            TokenEvent {
                at: ms(150),
                tokens: 3,
            },
        ];
        let itl = spread_itl_ms(&ev);
        assert_eq!(itl.len(), 5); // N − 1 with N = 6
        let want = [20.0, 20.0, 20.0, 20.0, 20.0];
        for (a, b) in itl.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{itl:?}");
        }
        assert!((itl.iter().sum::<f64>() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn first_chunk_extra_tokens_get_zero() {
        let ev = [
            TokenEvent {
                at: ms(50),
                tokens: 3,
            },
            TokenEvent {
                at: ms(80),
                tokens: 1,
            },
        ];
        assert_eq!(spread_itl_ms(&ev), vec![0.0, 0.0, 30.0]);
        assert!(spread_itl_ms(&[]).is_empty());
        assert!(spread_itl_ms(&ev[..1]).len() == 2);
    }

    #[test]
    fn tpot_definition() {
        assert_eq!(tpot_ms(ms(250), ms(50), 11), Some(20.0));
        assert_eq!(tpot_ms(ms(250), ms(50), 1), None);
    }

    #[test]
    fn parses_openai_chunk_shapes() {
        let role = parse_chunk(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#).unwrap();
        assert!(!role.has_content && !role.choices_empty && role.usage.is_none());
        let c = parse_chunk(r#"{"choices":[{"delta":{"content":"hi"}}]}"#).unwrap();
        assert!(c.has_content);
        let t = parse_chunk(r#"{"choices":[{"text":"x","finish_reason":"length"}]}"#).unwrap();
        assert!(t.has_content);
        assert_eq!(t.finish_reason.as_deref(), Some("length"));
        let u = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"cardinal":{"joules":1.0}}}"#).unwrap();
        assert!(u.choices_empty);
        let usage = u.usage.unwrap();
        assert_eq!(usage.completion_tokens, Some(7));
        assert_eq!(usage.extension, vec![("joules".to_string(), 1.0)]);
        let e = parse_chunk(r#"{"error":{"message":"boom","type":"server_error"}}"#).unwrap();
        assert_eq!(e.error.as_deref(), Some("boom"));
        assert!(parse_chunk("not json").is_err());
        assert!(parse_chunk("[1,2]").is_err());
        assert!(parse_chunk(r#"{"id":"x"}"#).is_err());
        assert!(parse_chunk(r#"{"choices":5}"#).is_err());
    }

    #[test]
    fn counter_uses_continuous_usage() {
        let mut c = TokenCounter::new();
        let chunk = |content: &str, ct: Option<u64>| ChunkInfo {
            has_content: !content.is_empty(),
            usage: ct.map(|n| Usage {
                prompt_tokens: Some(9),
                completion_tokens: Some(n),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.on_chunk(ms(10), &chunk("", Some(0))); // role chunk
        c.on_chunk(ms(50), &chunk("a", Some(1)));
        c.on_chunk(ms(90), &chunk("bc", Some(3)));
        c.on_chunk(ms(130), &chunk("de", Some(5)));
        let fin = ChunkInfo {
            choices_empty: true,
            usage: Some(Usage {
                prompt_tokens: Some(9),
                completion_tokens: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.on_chunk(ms(131), &fin);
        assert!(c.continuous_usage);
        assert_eq!(c.ttft(), Some(ms(50)));
        assert_eq!(c.output_tokens(), (5, true));
        assert_eq!(c.prompt_tokens(), Some(9));
        let tokens: Vec<u64> = c.events.iter().map(|e| e.tokens).collect();
        assert_eq!(tokens, vec![1, 2, 2]);
        assert_eq!(spread_itl_ms(&c.events), vec![20.0; 4]);
    }

    #[test]
    fn counter_without_usage_counts_chunks() {
        let mut c = TokenCounter::new();
        let content = ChunkInfo {
            has_content: true,
            ..Default::default()
        };
        for i in 0..4 {
            c.on_chunk(ms(50 + 20 * i), &content);
        }
        assert_eq!(c.output_tokens(), (4, false));
        assert!(!c.continuous_usage);
        // A final usage-only chunk supplies the count but no timed tokens.
        c.on_chunk(
            ms(200),
            &ChunkInfo {
                choices_empty: true,
                usage: Some(Usage {
                    prompt_tokens: None,
                    completion_tokens: Some(8),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(c.output_tokens(), (8, true));
        assert_eq!(c.events.len(), 4);
    }
}
