//! The OpenAI request bodies: parsing and validation of `/v1/chat/completions`
//! and `/v1/completions` (plus vLLM's extensions) into one [`GenRequest`].
//!
//! Fields are read one by one from the JSON object, so a wrong type or an
//! out-of-range value is reported with `param` naming the exact field
//! (`messages[2].content`, `top_p`). Unsupported features (tools, images,
//! `response_format` other than text, `echo`, `suffix`) are rejected with 400.
//! Unknown fields are *ignored*, as vLLM does, because real clients send
//! extensions nobody can list in advance; their names are returned in
//! [`GenRequest::unknown`] so the caller can warn once per name.

use cardinal_models::template::ChatMessage;
use cardinal_pipeline::SamplingParams;
use serde_json::Value;

use super::errors::{ApiError, clip};
use super::fields::show_int;
pub use super::fields::{Fields, describe};

/// Most choices one request may ask for (`n`).
pub const MAX_N: usize = 8;
/// Most stop strings.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 32;
/// Most alternatives per token (`top_logprobs`, completions `logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Default `max_tokens` of `/v1/completions` (OpenAI's legacy default).
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// Which endpoint a request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// One or more texts.
    Texts(Vec<String>),
    /// One or more pre-tokenized prompts.
    Ids(Vec<Vec<u32>>),
}

/// A validated generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub prompt: Prompt,
    /// None: the endpoint default (the rest of the context for chat).
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// vLLM's `include_stop_str_in_output`: a matched stop string stays in
    /// the text.
    pub include_stop_str: bool,
    pub stop_token_ids: Vec<u32>,
    pub n: usize,
    /// None: no logprobs; Some(k): logprobs with k alternatives per token.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// Top-level fields that were not recognised (ignored).
    pub unknown: Vec<String>,
}

impl GenRequest {
    /// The name of the prompt field, for error messages.
    pub fn prompt_param(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        }
    }
}

const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "user",
    "stream",
    "stream_options",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "best_of", "echo", "suffix"];

/// Limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_model_len: usize,
    pub vocab: usize,
}

/// Parses and validates a request body (already known to be a JSON value).
pub fn parse(endpoint: Endpoint, body: &Value, b: Bounds) -> Result<GenRequest, ApiError> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            describe(body)
        )));
    };
    let f = Fields::new(map, "");
    let extra = match endpoint {
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Completions => COMPLETION_FIELDS,
    };
    let unknown = f.unknown(&[COMMON_FIELDS, extra]);
    let model = f.string("model")?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            check_chat_unsupported(&f)?;
            Prompt::Chat(parse_messages(&f)?)
        }
        Endpoint::Completions => {
            check_completion_unsupported(&f)?;
            parse_prompt(&f, b.vocab)?
        }
    };
    let limit = b.max_model_len as i64;
    let mut max_tokens = f.int("max_tokens", 1, i64::MAX)?;
    if endpoint == Endpoint::Chat
        && let Some(m) = f.int("max_completion_tokens", 1, i64::MAX)?
    {
        max_tokens = Some(m);
    }
    if let Some(m) = max_tokens
        && m > limit
    {
        let name = if endpoint == Endpoint::Chat && f.raw("max_completion_tokens").is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(ApiError::invalid(
            name,
            format!(
                "`{name}` is {}; it must be at most the context limit of {limit} tokens",
                show_int(m)
            ),
        ));
    }
    let max_tokens = max_tokens.map(|m| m as usize);
    let min_tokens = f.int("min_tokens", 0, limit)?.unwrap_or(0) as usize;
    if let Some(m) = max_tokens
        && min_tokens > m
    {
        return Err(ApiError::invalid(
            "min_tokens",
            format!("`min_tokens` ({min_tokens}) must not exceed max_tokens ({m})"),
        ));
    }
    let params = parse_sampling(&f, b.vocab)?;
    let (stop, stop_token_ids) = parse_stops(&f, b.vocab)?;
    let n = f.int("n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    let logprobs = match endpoint {
        Endpoint::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.int("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
            if top.is_some_and(|t| t > 0) && !on {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            on.then_some(top.unwrap_or(0) as usize)
        }
        Endpoint::Completions => f
            .int("logprobs", 0, MAX_TOP_LOGPROBS as i64)?
            .map(|k| k as usize),
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let (mut include_usage, mut continuous_usage) = (false, false);
    if let Some(so) = f.raw("stream_options") {
        let Some(so_map) = so.as_object() else {
            return Err(ApiError::invalid(
                "stream_options",
                format!("`stream_options` must be an object, not {}", describe(so)),
            ));
        };
        if !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        let sf = Fields::new(so_map, "stream_options.");
        include_usage = sf.bool("include_usage")?.unwrap_or(false);
        continuous_usage = sf.bool("continuous_usage_stats")?.unwrap_or(false);
    }
    let _user: Option<String> = f.string("user")?;
    Ok(GenRequest {
        endpoint,
        model,
        prompt,
        max_tokens,
        min_tokens,
        params,
        stop,
        include_stop_str: f.bool("include_stop_str_in_output")?.unwrap_or(false),
        stop_token_ids,
        n,
        logprobs,
        stream,
        include_usage,
        continuous_usage,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        skip_special_tokens: f.bool("skip_special_tokens")?.unwrap_or(true),
        unknown,
    })
}

fn parse_sampling(f: &Fields, vocab: usize) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams::default();
    if let Some(t) = f.number("temperature", 0.0, 100.0)? {
        p.temperature = t as f32;
    }
    if let Some(t) = f.number("top_p", f64::MIN, f64::MAX)? {
        if !(t > 0.0 && t <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` is {t}; it must be in (0, 1]"),
            ));
        }
        p.top_p = t as f32;
    }
    if let Some(k) = f.int("top_k", -1, i64::MAX)? {
        p.top_k = if k <= 0 { 0 } else { (k as usize).min(vocab) };
    }
    if let Some(m) = f.number("min_p", 0.0, 1.0)? {
        p.min_p = m as f32;
    }
    if let Some(v) = f.number("presence_penalty", -2.0, 2.0)? {
        p.presence_penalty = v as f32;
    }
    if let Some(v) = f.number("frequency_penalty", -2.0, 2.0)? {
        p.frequency_penalty = v as f32;
    }
    if let Some(v) = f.number("repetition_penalty", f64::MIN, f64::MAX)? {
        if !(v > 0.0 && v <= 10.0) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` is {v}; it must be in (0, 10]"),
            ));
        }
        p.repetition_penalty = v as f32;
    }
    if let Some(s) = f.int("seed", i64::MIN, i64::MAX)? {
        p.seed = Some(s as u64);
    }
    if let Some(lb) = f.raw("logit_bias") {
        let Some(m) = lb.as_object() else {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "`logit_bias` must be an object mapping token ids to biases, not {}",
                    describe(lb)
                ),
            ));
        };
        if m.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "`logit_bias` has {} entries; at most {MAX_LOGIT_BIAS} are allowed",
                    m.len()
                ),
            ));
        }
        let bf = Fields::new(m, "logit_bias.");
        for k in m.keys() {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&i: &u32| (i as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!(
                            "`logit_bias` key \"{}\" is not a token id below {vocab}",
                            clip(k, 40)
                        ),
                    )
                })?;
            let bias = bf.number(k, -100.0, 100.0)?.unwrap_or(0.0);
            p.logit_bias.push((id, bias as f32));
        }
    }
    p.validate()
        .map_err(|m| ApiError::invalid(m.split(' ').next().unwrap_or("").to_string(), m))?;
    Ok(p)
}

fn parse_stops(f: &Fields, vocab: usize) -> Result<(Vec<String>, Vec<u32>), ApiError> {
    let stop: Vec<String> = match f.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOP {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "`stop` has {} strings; at most {MAX_STOP} are allowed",
                        a.len()
                    ),
                ));
            }
            let mut out = Vec::new();
            for (i, v) in a.iter().enumerate() {
                match v {
                    Value::String(s) => out.push(s.clone()),
                    other => {
                        return Err(ApiError::invalid(
                            format!("stop[{i}]"),
                            format!("`stop[{i}]` must be a string, not {}", describe(other)),
                        ));
                    }
                }
            }
            out
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "`stop` must be a string or an array of strings, not {}",
                    describe(other)
                ),
            ));
        }
    };
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop string has {} bytes; at most {MAX_STOP_BYTES} are allowed",
                s.len()
            ),
        ));
    }
    // An empty stop string would match at once; clients that send one mean none.
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let ids: Vec<u32> = f
        .get::<Vec<u32>>("stop_token_ids", "an array of token ids")?
        .unwrap_or_default();
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("token id {bad} is out of range: the vocabulary has {vocab} tokens"),
        ));
    }
    if ids.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("at most {MAX_LOGIT_BIAS} stop token ids are allowed"),
        ));
    }
    Ok((stop, ids))
}

fn check_chat_unsupported(f: &Fields) -> Result<(), ApiError> {
    if let Some(t) = f.raw("tools")
        && t.as_array().is_none_or(|a| !a.is_empty())
    {
        return Err(ApiError::unsupported(
            "tools",
            "tools (function calling) are not supported",
        ));
    }
    if let Some(tc) = f.raw("tool_choice")
        && tc.as_str().is_none_or(|s| s != "none" && s != "auto")
    {
        return Err(ApiError::unsupported(
            "tool_choice",
            "tool_choice is not supported (tools are not supported)",
        ));
    }
    for name in ["functions", "function_call"] {
        if f.raw(name).is_some() {
            return Err(ApiError::unsupported(
                name,
                format!("`{name}` (function calling) is not supported"),
            ));
        }
    }
    let _parallel: Option<bool> = f.bool("parallel_tool_calls")?;
    if let Some(rf) = f.raw("response_format") {
        let kind = rf.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            let what = kind.map_or_else(|| describe(rf), |k| format!("type \"{}\"", clip(k, 40)));
            return Err(ApiError::unsupported(
                "response_format",
                format!("`response_format` {what} is not supported; only {{\"type\":\"text\"}} is"),
            ));
        }
    }
    Ok(())
}

fn check_completion_unsupported(f: &Fields) -> Result<(), ApiError> {
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::unsupported("echo", "`echo` is not supported"));
    }
    if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "`suffix` (insertion) is not supported",
        ));
    }
    if let Some(bo) = f.int("best_of", 1, MAX_N as i64)? {
        let n = f.int("n", 1, MAX_N as i64)?.unwrap_or(1);
        if bo != n {
            return Err(ApiError::unsupported(
                "best_of",
                "`best_of` different from `n` is not supported",
            ));
        }
    }
    Ok(())
}

/// The `messages` field of a chat request (also used by `/tokenize`).
pub fn parse_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(v) = f.raw("messages") else {
        return Err(ApiError::invalid("messages", "`messages` is required"));
    };
    let Some(arr) = v.as_array() else {
        return Err(ApiError::invalid(
            "messages",
            format!("`messages` must be an array, not {}", describe(v)),
        ));
    };
    if arr.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is empty: at least one message is needed",
        ));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                p.clone(),
                format!("`{p}` must be an object, not {}", describe(m)),
            ));
        };
        let mf = Fields::new(obj, format!("{p}."));
        let role = mf.string("role")?.ok_or_else(|| {
            ApiError::invalid(format!("{p}.role"), format!("`{p}.role` is required"))
        })?;
        let role = match role.as_str() {
            "system" | "user" | "assistant" => role,
            "developer" => "system".to_string(),
            "tool" | "function" => {
                return Err(ApiError::unsupported(
                    format!("{p}.role"),
                    format!("role \"{role}\" is not supported (tools are not supported)"),
                ));
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{p}.role"),
                    format!(
                        "unknown role \"{}\"; expected system, user or assistant",
                        clip(other, 40)
                    ),
                ));
            }
        };
        for name in ["tool_calls", "function_call"] {
            if mf
                .raw(name)
                .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(ApiError::unsupported(
                    format!("{p}.{name}"),
                    format!("`{name}` in messages is not supported"),
                ));
            }
        }
        let content = match mf.raw("content") {
            None if role == "assistant" => String::new(),
            None => {
                return Err(ApiError::invalid(
                    format!("{p}.content"),
                    format!("`{p}.content` is required"),
                ));
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(parts, &format!("{p}.content"))?,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{p}.content"),
                    format!(
                        "`{p}.content` must be a string or an array of text parts, not {}",
                        describe(other)
                    ),
                ));
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

fn text_parts(parts: &[Value], p: &str) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let pp = format!("{p}[{j}]");
        let Some(obj) = part.as_object() else {
            return Err(ApiError::invalid(
                pp.clone(),
                format!("`{pp}` must be an object, not {}", describe(part)),
            ));
        };
        let pf = Fields::new(obj, format!("{pp}."));
        match pf.string("type")?.as_deref() {
            Some("text") => {}
            Some(other) => {
                return Err(ApiError::unsupported(
                    format!("{pp}.type"),
                    format!(
                        "content parts of type \"{}\" are not supported; only \"text\" is",
                        clip(other, 40)
                    ),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{pp}.type"),
                    format!("`{pp}.type` is required"),
                ));
            }
        }
        let text = pf.string("text")?.ok_or_else(|| {
            ApiError::invalid(format!("{pp}.text"), format!("`{pp}.text` is required"))
        })?;
        texts.push(text);
    }
    Ok(texts.join("\n"))
}

fn parse_prompt(f: &Fields, vocab: usize) -> Result<Prompt, ApiError> {
    let Some(v) = f.raw("prompt") else {
        return Err(ApiError::invalid("prompt", "`prompt` is required"));
    };
    let bad = |what: String| ApiError::invalid("prompt", what);
    let check_ids = |ids: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        if ids.is_empty() {
            return Err(bad(format!("`{at}` is an empty list of token ids")));
        }
        ids.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&i| (i as usize) < vocab)
                    .map(|i| i as u32)
                    .ok_or_else(|| {
                        bad(format!(
                            "`{at}` holds {}, which is not a token id below {vocab}",
                            describe(x)
                        ))
                    })
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(Prompt::Texts(vec![s.clone()])),
        Value::Array(a) if a.is_empty() => Err(bad("`prompt` is an empty list".into())),
        Value::Array(a) if a.len() > MAX_PROMPTS && !a[0].is_number() => Err(bad(format!(
            "`prompt` has {} prompts; at most {MAX_PROMPTS} are allowed",
            a.len()
        ))),
        Value::Array(a) => match &a[0] {
            Value::String(_) => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        bad(format!(
                            "`prompt[{i}]` must be a string, not {}",
                            describe(x)
                        ))
                    })
                })
                .collect::<Result<_, _>>()
                .map(Prompt::Texts),
            Value::Number(_) => Ok(Prompt::Ids(vec![check_ids(a, "prompt")?])),
            Value::Array(_) => a
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Array(ids) => check_ids(ids, &format!("prompt[{i}]")),
                    other => Err(bad(format!(
                        "`prompt[{i}]` must be a list of token ids, not {}",
                        describe(other)
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(Prompt::Ids),
            other => Err(bad(format!(
                "`prompt` must be a string, a list of strings or token ids, not a list of {}",
                describe(other)
            ))),
        },
        other => Err(bad(format!(
            "`prompt` must be a string, a list of strings or token ids, not {}",
            describe(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const B: Bounds = Bounds {
        max_model_len: 256,
        vocab: 512,
    };

    fn chat(v: Value) -> Result<GenRequest, ApiError> {
        parse(Endpoint::Chat, &v, B)
    }

    fn param_of(r: Result<GenRequest, ApiError>) -> String {
        r.expect_err("should fail")
            .param
            .clone()
            .unwrap_or_default()
    }

    #[test]
    fn minimal_chat() {
        let r = chat(json!({"messages":[{"role":"user","content":"hi"}]})).unwrap();
        assert_eq!(r.n, 1);
        assert!(r.skip_special_tokens);
        assert!(r.max_tokens.is_none());
    }

    #[test]
    fn fields_are_named() {
        let m = json!([{"role":"user","content":"hi"}]);
        assert_eq!(
            param_of(chat(json!({"messages": m, "temperature": "hot"}))),
            "temperature"
        );
        assert_eq!(
            param_of(chat(json!({"messages": m, "temperature": -0.5}))),
            "temperature"
        );
        assert_eq!(
            param_of(chat(json!({"messages": m, "top_p": 1.5}))),
            "top_p"
        );
        assert_eq!(param_of(chat(json!({"messages": m, "n": 0}))), "n");
        assert_eq!(
            param_of(chat(json!({"messages": m, "max_tokens": -1}))),
            "max_tokens"
        );
        assert_eq!(
            param_of(chat(json!({"messages": m, "max_tokens": 1e30}))),
            "max_tokens"
        );
        assert_eq!(
            param_of(chat(
                json!({"messages": m, "max_tokens": 99999999999999999999u128.to_string().parse::<f64>().unwrap()})
            )),
            "max_tokens"
        );
        assert_eq!(
            param_of(chat(json!({"messages": [{"role":"wizard","content":"x"}]}))),
            "messages[0].role"
        );
        assert_eq!(param_of(chat(json!({"messages": []}))), "messages");
        assert_eq!(
            param_of(chat(
                json!({"messages": [{"role":"user","content":[{"type":"image_url"}]}]})
            )),
            "messages[0].content[0].type"
        );
        assert_eq!(
            param_of(chat(json!({"messages": m, "tools": [{"type":"function"}]}))),
            "tools"
        );
        assert_eq!(
            param_of(chat(
                json!({"messages": m, "response_format": {"type":"json_object"}})
            )),
            "response_format"
        );
        assert_eq!(
            param_of(chat(json!({"messages": m, "stop": ["a","b","c","d","e"]}))),
            "stop"
        );
        assert_eq!(
            param_of(chat(
                json!({"messages": m, "stream_options": {"include_usage": true}})
            )),
            "stream_options"
        );
        assert_eq!(
            param_of(chat(json!({"messages": m, "logit_bias": {"9999": 1}}))),
            "logit_bias"
        );
    }

    #[test]
    fn unknown_fields_are_listed_not_rejected() {
        let r = chat(
            json!({"messages":[{"role":"user","content":"hi"}], "frobnicate": 1, "user": "u"}),
        )
        .unwrap();
        assert_eq!(r.unknown, vec!["frobnicate".to_string()]);
    }

    #[test]
    fn text_parts_and_prompts() {
        let r = chat(json!({"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]})).unwrap();
        let Prompt::Chat(m) = r.prompt else { panic!() };
        assert_eq!(m[0].content, "a\nb");
        let c = |p: Value| parse(Endpoint::Completions, &json!({"prompt": p}), B);
        assert!(matches!(c(json!("x")).unwrap().prompt, Prompt::Texts(t) if t.len() == 1));
        assert!(matches!(c(json!(["x","y"])).unwrap().prompt, Prompt::Texts(t) if t.len() == 2));
        assert!(matches!(c(json!([1,2,3])).unwrap().prompt, Prompt::Ids(i) if i[0] == vec![1,2,3]));
        assert!(matches!(c(json!([[1],[2]])).unwrap().prompt, Prompt::Ids(i) if i.len() == 2));
        assert_eq!(param_of(c(json!([600]))), "prompt");
        assert_eq!(param_of(c(json!([]))), "prompt");
    }
}
