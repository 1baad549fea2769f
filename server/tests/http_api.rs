//! The OpenAI-compatible API driven through the router without a socket, on
//! the tiny-granite fixture: chat and completions (plain and streaming, with
//! the exact chunk order), prompt forms, `n`, stop strings, logprobs, the
//! small endpoints, every bad-input case of the spec with its status and
//! `param`, auth, and the metric names after traffic.

mod http_support;

use axum::body::Body;
use axum::http::Request;
use cardinal_server::serve::{ApiKey, ServeOptions};
use http_support::*;
use serde_json::{Value, json};

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

#[tokio::test]
async fn chat_non_streaming() {
    let a = app();
    let r = post_json(
        &a.router,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": user("Hello"), "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert!(matches!(
        c["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let u = &v["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && (1..=8).contains(&n));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + n);
    let ext = &u["cardinal"];
    for k in [
        "card_joules",
        "host_joules",
        "host_energy_source",
        "decode_tokens_per_second",
        "time_to_first_token_seconds",
    ] {
        assert!(ext.get(k).is_some(), "usage.cardinal.{k} missing: {u}");
    }
    assert!(ext["card_joules"].as_f64().unwrap() > 0.0);
    assert!(matches!(
        ext["host_energy_source"].as_str(),
        Some("measured" | "estimate")
    ));
    assert!(ext["time_to_first_token_seconds"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn chat_stream_chunk_order_with_usage() {
    let a = app();
    let body = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 6, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let r = post_json(&a.router, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let events = sse_data(&r.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(
        chunks.iter().all(|c| c["id"] == id),
        "one id for the whole stream"
    );
    // 1. the role chunk
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    // 2. content deltas, 3. the finish chunk, 4. the usage chunk
    let n = chunks.len();
    let finish = &chunks[n - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let mut text = String::new();
    for c in &chunks[1..n - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(
            c["usage"].is_null() && c.get("usage").is_some(),
            "usage: null on every chunk but the last"
        );
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    let usage = &chunks[n - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert!(usage["usage"]["cardinal"]["card_joules"].as_f64().unwrap() > 0.0);
    // The streamed text equals the non-streamed one (greedy, same prompt).
    let body = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6, "ignore_eos": true, "temperature": 0,
    });
    let whole = post_json(&a.router, "/v1/chat/completions", body)
        .await
        .json();
    let streamed_greedy = {
        let r = post_json(
            &a.router,
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": true, "temperature": 0, "stream": true}),
        )
        .await;
        let ev = sse_data(&r.text());
        ev[..ev.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .inspect(|c| {
                assert!(
                    c.get("usage").is_none(),
                    "no usage key without include_usage"
                )
            })
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect::<String>()
    };
    assert_eq!(
        whole["choices"][0]["message"]["content"].as_str().unwrap(),
        streamed_greedy
    );
    let _ = text;
}

#[tokio::test]
async fn completions_prompt_forms_and_n() {
    let a = app();
    let base = json!({"max_tokens": 5, "ignore_eos": true, "temperature": 0});
    let with = |prompt: Value, extra: Value| {
        let mut b = base.clone();
        b["prompt"] = prompt;
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let one = post_json(
        &a.router,
        "/v1/completions",
        with(json!("Once upon a time"), json!({})),
    )
    .await
    .json();
    assert_eq!(one["object"], "text_completion");
    assert!(one["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(one["choices"].as_array().unwrap().len(), 1);
    assert_eq!(one["choices"][0]["finish_reason"], "length");
    assert_eq!(one["usage"]["completion_tokens"], 5);

    let two = post_json(
        &a.router,
        "/v1/completions",
        with(json!(["Once upon a time", "The end"]), json!({})),
    )
    .await
    .json();
    let ch = two["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 2);
    assert_eq!(
        (ch[0]["index"].as_u64(), ch[1]["index"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(two["usage"]["completion_tokens"], 10);
    assert_eq!(
        ch[0]["text"], one["choices"][0]["text"],
        "greedy: same prompt, same text"
    );

    let tokens: Value = post_json(
        &a.router,
        "/tokenize",
        json!({"prompt": "Once upon a time"}),
    )
    .await
    .json();
    let ids = tokens["tokens"].clone();
    assert_eq!(
        tokens["count"].as_u64().unwrap() as usize,
        ids.as_array().unwrap().len()
    );
    let by_ids = post_json(&a.router, "/v1/completions", with(ids.clone(), json!({})))
        .await
        .json();
    assert_eq!(by_ids["choices"][0]["text"], one["choices"][0]["text"]);
    assert_eq!(
        by_ids["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    let lists = post_json(
        &a.router,
        "/v1/completions",
        with(json!([ids, [5, 6, 7]]), json!({})),
    )
    .await
    .json();
    assert_eq!(lists["choices"].as_array().unwrap().len(), 2);

    let n2 = post_json(
        &a.router,
        "/v1/completions",
        with(json!("Hi"), json!({"n": 2, "temperature": 1.0, "seed": 7})),
    )
    .await;
    assert_eq!(n2.status, 200);
    let n2 = n2.json();
    assert_eq!(n2["choices"].as_array().unwrap().len(), 2);
    assert_eq!(n2["usage"]["completion_tokens"], 10);
    assert_eq!(
        n2["usage"]["prompt_tokens"],
        post_json(&a.router, "/tokenize", json!({"prompt": "Hi"}))
            .await
            .json()["count"],
        "prompt counted once for n=2"
    );
}

#[tokio::test]
async fn chat_n2_stream_has_both_indexes() {
    let a = app();
    let r = post_json(&a.router, "/v1/chat/completions", json!({"messages": user("Hi"), "n": 2, "max_tokens": 4, "ignore_eos": true, "stream": true, "seed": 1})).await;
    let events = sse_data(&r.text());
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(
            mine[0]["choices"][0]["delta"]["role"], "assistant",
            "choice {i} starts with its role chunk"
        );
        assert_eq!(
            mine.last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );
        assert_eq!(
            mine.iter()
                .filter(|c| !c["choices"][0]["finish_reason"].is_null())
                .count(),
            1
        );
    }
}

/// Greedy text and the per-token texts of a completion.
async fn greedy_tokens(a: &App, prompt: &str, max_tokens: usize) -> (String, Vec<String>) {
    let v = post_json(&a.router, "/v1/completions", json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0, "logprobs": 1})).await.json();
    let c = &v["choices"][0];
    let toks = c["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (c["text"].as_str().unwrap().to_string(), toks)
}

#[tokio::test]
async fn stop_strings_never_leak() {
    let a = app();
    let (text, toks) = greedy_tokens(&a, "The quick brown fox", 40).await;
    assert_eq!(toks.concat(), text, "token texts add up to the text");
    // A stop string spanning a token boundary: the last char of one token and the first of the next.
    let k = (4..toks.len() - 1)
        .find(|&k| !toks[k].is_empty() && !toks[k + 1].is_empty())
        .expect("two non-empty tokens");
    let stop = format!(
        "{}{}",
        toks[k].chars().last().unwrap(),
        toks[k + 1].chars().next().unwrap()
    );
    let cut = text.find(&stop).unwrap();
    let body = |stream: bool| json!({"prompt": "The quick brown fox", "max_tokens": 40, "ignore_eos": true, "temperature": 0, "stop": [stop.clone(), "\u{1F600}never"], "stream": stream});
    let v = post_json(&a.router, "/v1/completions", body(false))
        .await
        .json();
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &text[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
    let r = post_json(&a.router, "/v1/completions", body(true)).await;
    let events = sse_data(&r.text());
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let piece = c["choices"][0]["text"].as_str().unwrap();
        assert!(!piece.contains(&stop));
        streamed.push_str(piece);
    }
    assert_eq!(streamed, &text[..cut]);
    // Chat takes a single string too.
    let v = post_json(
        &a.router,
        "/v1/chat/completions",
        json!({"messages": user("x"), "max_tokens": 3, "stop": "zz"}),
    )
    .await;
    assert_eq!(v.status, 200);
}

#[tokio::test]
async fn logprobs_shapes() {
    let a = app();
    let v = post_json(&a.router, "/v1/chat/completions", json!({"messages": user("Hi"), "max_tokens": 3, "ignore_eos": true, "logprobs": true, "top_logprobs": 2})).await.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert!(t["token"].is_string() && t["bytes"].is_array());
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
    }
    let v = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 3, "ignore_eos": true, "logprobs": 2}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test]
async fn small_endpoints() {
    let a = app();
    let m = call(&a.router, get("/v1/models")).await.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["max_model_len"], 256);
    assert_eq!(call(&a.router, get("/v1/models/tiny")).await.status, 200);
    call(&a.router, get("/v1/models/other"))
        .await
        .assert_error(404, Some("model"));
    assert_eq!(call(&a.router, get("/health")).await.json()["status"], "ok");
    assert_eq!(
        call(&a.router, get("/ready")).await.json()["status"],
        "ready"
    );
    let t = post_json(&a.router, "/tokenize", json!({"prompt": "hello world"}))
        .await
        .json();
    let back = post_json(&a.router, "/detokenize", json!({"tokens": t["tokens"]}))
        .await
        .json();
    assert_eq!(back["prompt"], "hello world");
    let chat = post_json(&a.router, "/tokenize", json!({"messages": user("hello")}))
        .await
        .json();
    assert!(chat["count"].as_u64().unwrap() > t["count"].as_u64().unwrap());
    call(&a.router, get("/v1/nothing"))
        .await
        .assert_error(404, None);
    let r = call(&a.router, get("/v1/chat/completions")).await;
    r.assert_error(405, None);
}

#[tokio::test]
async fn bad_input_is_rejected_with_the_field_named() {
    let a = app();
    let chat = "/v1/chat/completions";
    let raw = |body: &'static [u8], ct: &str| {
        Request::post(chat)
            .header("content-type", ct)
            .body(Body::from(body))
            .unwrap()
    };
    let m = user("hi");
    // Malformed JSON, invalid UTF-8, wrong content type.
    call(&a.router, raw(b"{\"messages\": [", "application/json"))
        .await
        .assert_error(400, None);
    let r = call(
        &a.router,
        raw(
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}",
            "application/json",
        ),
    )
    .await;
    assert!(
        r.assert_error(400, None)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    call(&a.router, raw(b"{}", "text/plain"))
        .await
        .assert_error(415, None);
    call(
        &a.router,
        raw(b"messages=1", "application/x-www-form-urlencoded"),
    )
    .await
    .assert_error(415, None);
    // A wrong JSON type per field.
    for (field, value) in [
        ("temperature", json!("hot")),
        ("max_tokens", json!("10")),
        ("stream", json!("yes")),
        ("n", json!(1.5)),
        ("stop", json!(3)),
        ("seed", json!([1])),
    ] {
        let mut b = json!({"messages": m});
        b[field] = value;
        post_json(&a.router, chat, b)
            .await
            .assert_error(400, Some(field));
    }
    post_json(&a.router, chat, json!({"messages": "hi"}))
        .await
        .assert_error(400, Some("messages"));
    post_json(
        &a.router,
        chat,
        json!({"messages": [{"role": "user", "content": 5}]}),
    )
    .await
    .assert_error(400, Some("messages[0].content"));
    // Empty messages, unknown role, unsupported features.
    post_json(&a.router, chat, json!({"messages": []}))
        .await
        .assert_error(400, Some("messages"));
    post_json(
        &a.router,
        chat,
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    )
    .await
    .assert_error(400, Some("messages[0].role"));
    post_json(
        &a.router,
        chat,
        json!({"messages": m, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    )
    .await
    .assert_error(400, Some("tools"));
    post_json(&a.router, chat, json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))
        .await
        .assert_error(400, Some("messages[0].content[0].type"));
    post_json(
        &a.router,
        chat,
        json!({"messages": m, "response_format": {"type": "json_object"}}),
    )
    .await
    .assert_error(400, Some("response_format"));
    // Out-of-range values.
    for (field, value) in [
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(1_000_000_000_000u64)),
        ("max_tokens", json!(1e300)),
        ("temperature", json!(-0.1)),
        ("top_p", json!(1.5)),
        ("top_p", json!(0)),
        ("n", json!(0)),
        ("n", json!(9)),
        ("top_logprobs", json!(21)),
        ("presence_penalty", json!(3)),
        ("min_p", json!(2)),
    ] {
        let mut b = json!({"messages": m, "logprobs": true});
        b[field] = value.clone();
        post_json(&a.router, chat, b)
            .await
            .assert_error(400, Some(field));
    }
    // A prompt over the context (256 tokens), and prompt + max_tokens over it.
    let long: Vec<u32> = (0..300).map(|i| 10 + i % 400).collect();
    let r = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": long, "max_tokens": 4}),
    )
    .await;
    let e = r.assert_error(400, Some("prompt"));
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(
        (
            e["error"]["n_prompt_tokens"].as_u64(),
            e["error"]["n_ctx"].as_u64()
        ),
        (Some(300), Some(256))
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("256"));
    let r = post_json(
        &a.router,
        "/v1/completions",
        json!({"prompt": [1, 2, 3], "max_tokens": 255}),
    )
    .await;
    assert_eq!(
        r.assert_error(400, Some("prompt"))["error"]["code"],
        "context_length_exceeded"
    );
    // A 10 MB body.
    let big = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(10 << 20)
    );
    let r = call(
        &a.router,
        Request::post(chat)
            .header("content-type", "application/json")
            .body(Body::from(big))
            .unwrap(),
    )
    .await;
    r.assert_error(413, None);
    // An unknown model.
    let r = post_json(&a.router, chat, json!({"model": "gpt-9", "messages": m})).await;
    assert_eq!(
        r.assert_error(404, Some("model"))["error"]["code"],
        "model_not_found"
    );
    // An unknown field is ignored, and the server still serves.
    let r = post_json(
        &a.router,
        chat,
        json!({"messages": m, "max_tokens": 2, "some_future_extension": {"x": 1}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The errors were counted.
    let metrics = call(&a.router, get("/metrics")).await.text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("cardinal_request_errors_total{")
                && l.contains("type=\"invalid_request\"")
        })
        .unwrap();
    assert!(
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 20.0,
        "{line}"
    );
}

#[tokio::test]
async fn api_key_is_required_except_on_health() {
    let opts = ServeOptions {
        api_key: Some(ApiKey::new("s3cret")),
        served_model_name: Some("tiny".into()),
        ..Default::default()
    };
    let a = app_with(opts);
    // Capture every log line of this test (the runtime is single-threaded).
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || Capture(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let body = json!({"messages": user("hi"), "max_tokens": 2});
    post_json(&a.router, "/v1/chat/completions", body.clone())
        .await
        .assert_error(401, None);
    let with_key = |k: &str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {k}"))
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let r = call(&a.router, with_key("wrong")).await;
    r.assert_error(401, None);
    assert!(!r.text().contains("s3cret"));
    assert_eq!(call(&a.router, with_key("s3cret")).await.status, 200);
    assert_eq!(call(&a.router, get("/health")).await.status, 200);
    assert_eq!(call(&a.router, get("/metrics")).await.status, 200);
    call(&a.router, get("/v1/models"))
        .await
        .assert_error(401, None);
    assert!(
        !format!("{:?}", a.state).contains("s3cret"),
        "the key never shows in Debug output"
    );
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("status=401"), "requests are logged: {logs}");
    assert!(
        !logs.contains("s3cret") && !logs.contains("wrong"),
        "no key in the logs: {logs}"
    );
}

/// A log sink shared with the test.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn metrics_after_traffic() {
    let a = app();
    for stream in [false, true] {
        let r = post_json(
            &a.router,
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 4, "ignore_eos": true, "stream": stream}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    post_json(&a.router, "/v1/chat/completions", json!({"messages": []}))
        .await
        .assert_error(400, Some("messages"));
    let r = call(&a.router, get("/metrics")).await;
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let t = r.text();
    // For `promtool check metrics` (run by .ci/run): CARDINAL_METRICS_DUMP=path.
    if let Ok(path) = std::env::var("CARDINAL_METRICS_DUMP") {
        std::fs::write(path, &t).unwrap();
    }
    for name in [
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        "request_prompt_tokens_bucket",
        "request_generation_tokens_bucket",
        "prompt_tokens_total",
        "generation_tokens_total",
        "requests_total",
        "request_errors_total",
        "requests_rejected_total",
        "requests_cancelled_total",
        "energy_joules_total",
        "card_busy_seconds_total",
        "link_bytes_total",
        "requests_running",
        "requests_waiting",
        "generation_tokens_per_second",
        "joules_per_token",
        "card_memory_bytes",
        "kv_cache_usage_ratio",
        "card_utilization_ratio",
        "build_info",
    ] {
        assert!(
            t.contains(&format!("\ncardinal_{name}{{")),
            "cardinal_{name} missing"
        );
    }
    let value = |prefix: &str| -> f64 {
        t.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} missing"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("cardinal_generation_tokens_total{"), 8.0);
    assert_eq!(
        value("cardinal_requests_total{finish_reason=\"length\""),
        2.0
    );
    assert_eq!(value("cardinal_time_to_first_token_seconds_count{"), 2.0);
    assert_eq!(value("cardinal_inter_token_latency_seconds_count{"), 6.0);
    assert!(
        value("cardinal_energy_joules_total{model_name=\"tiny\",source=\"cards_modeled\"}") > 0.0
    );
    assert!(t.contains("le=\"2560\""), "vLLM TTFT buckets");
    assert!(t.contains("sliding window of the last 30 s"));
    assert!(t.contains("card=\"0\",kind=\"weights\""));
}

#[tokio::test]
async fn queue_full_gets_429_with_retry_after() {
    let a = app_with(ServeOptions {
        max_num_seqs: 1,
        max_queue: 1,
        ..Default::default()
    });
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": true});
    let calls = (0..6).map(|_| post_json(&a.router, "/v1/completions", body.clone()));
    let replies = futures_join(calls).await;
    let rejected: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(!rejected.is_empty(), "some requests are shed");
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    for r in &rejected {
        assert_eq!(r.headers["retry-after"], "1");
        assert_eq!(
            r.assert_error(429, None)["error"]["code"],
            "rate_limit_exceeded"
        );
    }
    let t = call(&a.router, get("/metrics")).await.text();
    assert!(t.contains(&format!(
        "cardinal_requests_rejected_total{{model_name=\"tiny-granite\",reason=\"queue_full\"}} {}",
        rejected.len()
    )));
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<_> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, o) in handles.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *o = Some(v);
                        *h = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn request_timeout_ends_requests() {
    let a = app_with(ServeOptions {
        request_timeout: 0.002,
        ..Default::default()
    });
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 250, "ignore_eos": true});
    let r = post_json(&a.router, "/v1/completions", body.clone()).await;
    assert_eq!(
        r.assert_error(504, None)["error"]["code"],
        "request_timeout"
    );
    let mut b = body;
    b["stream"] = json!(true);
    let events = sse_data(&post_json(&a.router, "/v1/completions", b).await.text());
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let e: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(
        e["error"]["code"], "request_timeout",
        "one error event, then [DONE]"
    );
    assert_eq!(events.iter().filter(|e| e.contains("\"error\"")).count(), 1);
}

#[tokio::test]
async fn cors_only_with_allowed_origins_and_drain_refuses() {
    let preflight = || {
        Request::builder()
            .method("OPTIONS")
            .uri("/v1/chat/completions")
            .header("origin", "http://ui.example")
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap()
    };
    let plain = app();
    let r = call(&plain.router, preflight()).await;
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "CORS is off by default"
    );
    let with = app_with(ServeOptions {
        allowed_origins: vec!["http://ui.example".into()],
        ..Default::default()
    });
    let r = call(&with.router, preflight()).await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://ui.example"
    );
    // Draining: the API answers 503, /health stays up.
    plain.state.start_drain();
    let r = post_json(
        &plain.router,
        "/v1/chat/completions",
        json!({"messages": user("hi")}),
    )
    .await;
    r.assert_error(503, None);
    assert_eq!(r.headers["connection"], "close");
    assert_eq!(call(&plain.router, get("/health")).await.status, 200);
    assert_eq!(call(&plain.router, get("/ready")).await.status, 503);
}

#[tokio::test]
async fn while_loading_only_health_and_metrics_answer() {
    let state = cardinal_server::serve::AppState::loading(ServeOptions::default(), "m", 256);
    let r = cardinal_server::serve::router(state.clone());
    assert_eq!(call(&r, get("/health")).await.status, 200);
    assert_eq!(call(&r, get("/metrics")).await.status, 200);
    call(&r, get("/ready")).await.assert_error(503, None);
    let reply = post_json(&r, "/v1/chat/completions", json!({"messages": user("hi")})).await;
    reply.assert_error(503, None);
    assert_eq!(reply.headers["retry-after"], "1");
    // Once the model is set, it serves.
    let rt = runtime(&ServeOptions::default());
    assert!(state.set_runtime(rt));
    let reply = post_json(
        &r,
        "/v1/chat/completions",
        json!({"messages": user("hi"), "max_tokens": 2}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn abort_ends_requests_with_an_error() {
    let a = app();
    a.state.inner.abort.send_replace(true);
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": true});
    post_json(&a.router, "/v1/completions", body.clone())
        .await
        .assert_error(503, None);
    let mut b = body;
    b["stream"] = json!(true);
    let events = sse_data(&post_json(&a.router, "/v1/completions", b).await.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let e: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(e["error"]["type"], "unavailable_error");
    assert!(kv_is_free(&a).await);
}

async fn kv_is_free(a: &App) -> bool {
    for _ in 0..200 {
        if a.engine.kv_used().iter().all(|&b| b == 0) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}
