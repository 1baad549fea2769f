//! Hostile request bodies through the whole router (tower `oneshot`, no
//! socket) on tiny-granite with a 64-token context, so any accepted request
//! is short. proptest sends arbitrary JSON values (biased to the API's field
//! names and to the numbers and strings that break parsers), valid chat and
//! completions bodies with one to four fields replaced, removed or nested
//! wrongly, and raw bytes (invalid UTF-8, cut JSON, other content types) to
//! `/v1/chat/completions`, `/v1/completions`, `/tokenize` and
//! `/detokenize`. The reply must never be a 5xx; a 4xx must be in the
//! OpenAI error shape; a 200 must be a well-formed completion or stream
//! without an error event. Afterwards the engine has not failed, the KV
//! cache is empty and the server still serves.

mod http_support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use cardinal_server::serve::ServeOptions;
use http_support::{App, Reply, app_with, call, sse_data};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

const PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
];

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "user",
    "stream",
    "stream_options",
    "ignore_eos",
    "skip_special_tokens",
    "stop_token_ids",
    "tools",
    "tool_choice",
    "response_format",
    "add_generation_prompt",
    "add_special_tokens",
    "tokens",
    "content",
    "role",
    "include_usage",
    "continuous_usage_stats",
];

/// One app for every case (the engine is shared, as in a real server).
fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        app_with(ServeOptions {
            served_model_name: Some("tiny".into()),
            max_model_len: Some(64),
            max_num_seqs: 16,
            max_queue: 64,
            request_timeout: 20.0,
            ..Default::default()
        })
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(2)),
        Just(json!(8)),
        Just(json!(9)),
        Just(json!(64)),
        Just(json!(65)),
        Just(json!(511)),
        Just(json!(512)),
        Just(json!(i64::MIN)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(0.5)),
        Just(json!(-0.0)),
        Just(json!(2.0000001)),
        any::<i64>().prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("tiny".to_string()),
        Just("user".to_string()),
        Just("system".to_string()),
        Just("assistant".to_string()),
        Just("<|end_of_text|>".to_string()),
        Just("{{ 7 * 7 }}{% for x in range(9) %}".to_string()),
        Just("\u{0}\u{1b}[31m\r\n\u{feff}\u{202e}".to_string()),
        Just("é😀 ".repeat(50)),
        Just("x".repeat(5000)),
        "\\PC{0,30}",
        any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

/// Any JSON value, with object keys mostly taken from the API.
fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            3 => prop::sample::select(FIELDS).prop_map(str::to_string),
            1 => "\\PC{0,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A message-like object: a role and content of any shape.
fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        3 => prop::sample::select(vec!["system", "user", "assistant", "tool", "developer"])
            .prop_map(|r| json!(r)),
        1 => leaf(),
    ];
    let part = prop_oneof![
        text().prop_map(|t| json!({"type": "text", "text": t})),
        any_json(),
    ];
    let content = prop_oneof![
        3 => text().prop_map(Value::String),
        1 => prop::collection::vec(part, 0..4).prop_map(Value::Array),
        1 => leaf(),
    ];
    (role, content).prop_map(|(r, c)| json!({"role": r, "content": c}))
}

/// An object made of the API's own fields, each with a value of any shape
/// (`messages` mostly message-like).
fn api_object() -> impl Strategy<Value = Value> {
    let value = prop_oneof![3 => leaf(), 1 => any_json()];
    let messages = prop::collection::vec(message(), 0..5).prop_map(Value::Array);
    (
        prop::collection::vec((prop::sample::select(FIELDS), value), 0..8),
        prop::option::of(messages),
    )
        .prop_map(|(kv, messages)| {
            let mut m: Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if let Some(ms) = messages {
                m.insert("messages".into(), ms);
            }
            Value::Object(m)
        })
}

fn valid_chat(stream: bool) -> Value {
    let mut b = json!({
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"}
        ],
        "max_tokens": 4,
        "temperature": 0.7,
        "stream": stream,
    });
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

fn valid_completion(stream: bool) -> Value {
    json!({
        "model": "tiny",
        "prompt": "Once upon",
        "max_tokens": 4,
        "logprobs": 2,
        "stop": ["\n"],
        "stream": stream,
    })
}

/// One change to a valid body.
#[derive(Clone, Debug)]
enum Change {
    Set(String, Value),
    Remove(String),
    /// Replaces part of the first message (role, content, or the whole).
    Message(usize, Value),
}

fn change() -> impl Strategy<Value = Change> {
    let field = prop::sample::select(FIELDS).prop_map(str::to_string);
    prop_oneof![
        4 => (field.clone(), prop_oneof![leaf(), any_json()]).prop_map(|(k, v)| Change::Set(k, v)),
        1 => field.prop_map(Change::Remove),
        2 => (0usize..3, prop_oneof![leaf(), any_json()]).prop_map(|(i, v)| Change::Message(i, v)),
    ]
}

fn apply(body: &mut Value, c: &Change) {
    let Some(map) = body.as_object_mut() else {
        return;
    };
    match c {
        Change::Set(k, v) => {
            map.insert(k.clone(), v.clone());
        }
        Change::Remove(k) => {
            map.remove(k);
        }
        Change::Message(part, v) => {
            if let Some(m) = map
                .get_mut("messages")
                .and_then(|m| m.as_array_mut())
                .and_then(|a| a.last_mut())
            {
                match (part, m.as_object_mut()) {
                    (0, Some(o)) => drop(o.insert("role".into(), v.clone())),
                    (1, Some(o)) => drop(o.insert("content".into(), v.clone())),
                    _ => *m = v.clone(),
                }
            }
        }
    }
}

/// Sends `body` with `content_type` to `path`; checks the reply.
fn check(path: &str, content_type: Option<&str>, body: Vec<u8>) -> Result<u16, TestCaseError> {
    let mut req = Request::post(path);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Body::from(body)).unwrap();
    let t = Instant::now();
    let r: Reply = runtime().block_on(async {
        tokio::time::timeout(Duration::from_secs(30), call(&app().router, req))
            .await
            .map_err(|_| TestCaseError::fail(format!("{path}: no reply within 30 s")))
    })?;
    let status = r.status.as_u16();
    prop_assert!(status < 500, "{path}: {status} {}", r.text());
    prop_assert!(t.elapsed() < Duration::from_secs(20), "{path}: slow");
    if status >= 400 {
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| TestCaseError::fail(format!("{status} not JSON ({e}): {}", r.text())))?;
        let e = &v["error"];
        prop_assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "no message: {v}"
        );
        prop_assert!(e["type"].is_string(), "no type: {v}");
        prop_assert!(
            e.get("param").is_some() && e.get("code").is_some(),
            "shape: {v}"
        );
        return Ok(status);
    }
    prop_assert_eq!(status, 200);
    let stream = r
        .headers
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
    if stream {
        let events = sse_data(&r.text());
        prop_assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e)
                .map_err(|x| TestCaseError::fail(format!("event not JSON ({x}): {e}")))?;
            prop_assert!(v.get("error").is_none(), "error event: {v}");
        }
    } else {
        let v = r.json();
        let ok = match path {
            "/tokenize" => v["tokens"].is_array(),
            "/detokenize" => v["prompt"].is_string(),
            _ => v["choices"].as_array().is_some_and(|c| !c.is_empty()),
        };
        prop_assert!(ok, "{path}: {v}");
    }
    Ok(status)
}

/// Runs `cases` cases of `strategy` through `test`, then prints how many
/// replies had each status and how long it took.
fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<u16, TestCaseError>,
) {
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let t = Instant::now();
    let result = runner.run(&strategy, |v| {
        let status = test(v)?;
        *statuses.lock().unwrap().entry(status).or_default() += 1;
        Ok(())
    });
    eprintln!(
        "{name}: {cases} cases in {:.1} s, replies by status {:?}",
        t.elapsed().as_secs_f64(),
        statuses.lock().unwrap()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn arbitrary_json_is_never_a_server_error() {
    let body = prop_oneof![1 => any_json(), 3 => api_object()];
    let strategy = (prop::sample::select(&PATHS[..]), body);
    run("arbitrary JSON", 2048, strategy, |(path, body)| {
        check(
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
    });
}

#[test]
fn mutated_valid_bodies_are_never_a_server_error() {
    let strategy = (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(change(), 1..5),
    );
    run(
        "mutated valid bodies",
        2048,
        strategy,
        |(chat, stream, changes)| {
            let (path, mut body) = if chat {
                ("/v1/chat/completions", valid_chat(stream))
            } else {
                ("/v1/completions", valid_completion(stream))
            };
            for c in &changes {
                apply(&mut body, c);
            }
            check(
                path,
                Some("application/json"),
                body.to_string().into_bytes(),
            )
        },
    );
}

#[test]
fn raw_bytes_are_never_a_server_error() {
    let content_types = prop::option::of(prop::sample::select(vec![
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/vnd.api+json",
        "",
    ]));
    let strategy = (
        prop::sample::select(&PATHS[..]),
        content_types,
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    run("raw bytes", 1024, strategy, |(path, ct, cut, noise)| {
        let mut bytes = valid_chat(false).to_string().into_bytes();
        bytes.truncate(cut.index(bytes.len() + 1));
        bytes.extend(noise);
        check(path, ct, bytes)
    });
}

#[test]
fn a_valid_request_still_works_and_nothing_leaks() {
    // Run after (or alongside) the properties: the engine has not failed
    // and serves a normal request; the KV cache drains.
    let status = check(
        "/v1/chat/completions",
        Some("application/json"),
        valid_chat(false).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 200);
    let engine = &app().engine;
    assert!(
        !engine
            .stats
            .failed
            .load(std::sync::atomic::Ordering::Acquire)
    );
    let end = Instant::now() + Duration::from_secs(5);
    while engine.kv_in_use().iter().any(|&b| b > 0) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
}
